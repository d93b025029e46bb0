"""The job schema: a pure function from RunPod's job JSON to a validated `JobRequest`.

Nothing here touches the network, the disk or the GPU, so every rule is tested directly (and by
property-based tests) without a model. Each violated rule raises `JobInputError`, whose message names
the field and the rule; the runner returns that message to the client as `{"error": ...}`.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from .errors import JobError

# The official Wan2.2 S2V default negative prompt (wan/configs/wan_s2v_14B.py, `sample_neg_prompt`).
# It is read from the installed package at load time too; this copy lets validation run without it,
# and a test checks that the two are the same.
DEFAULT_NEGATIVE_PROMPT = (
    "画面模糊，最差质量，画面模糊，细节模糊不清，情绪激动剧烈，手快速抖动，字幕，丑陋的，残缺的，"
    "多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

RESOLUTIONS = ("480p", "720p")
SOLVERS = ("unipc", "dpm++")
OUTPUT_FPS = (24, 16)
SPEEDS = ("exact", "fast", "fastest")
MAX_SEED = 2**62  # seed + clip index must stay inside torch's int64 generator seed
MAX_PROMPT_CHARS = 5000
MAX_LORAS = 4
LORA_STRENGTH_LIMIT = 4.0
LORA_FIELDS = frozenset({"url", "path", "strength"})

# The noise-schedule shift each solver accepts, as measured on the official schedulers
# (wan/utils/fm_solvers_unipc.py, wan/utils/fm_solvers.py) for 1 to 100 steps. Below 1.0e-6 the
# unipc solver fails and below 3.5e-13 dpm++ returns NaN; 0.001 is a round floor far above both.
# Above, dpm++ stays finite past 1.9e5 at 100 steps (the schema's 100 bounds it), while unipc has
# a ceiling that falls with the step count (`unipc_max_shift`).
MIN_SHIFT = 0.001
MAX_SHIFT = 100.0
# FlowUniPCMultistepScheduler's largest sigma, 1 - 1/num_train_timesteps as its float32 tensor holds it.
UNIPC_SIGMA_MAX = 0.9990000128746033
UNIPC_TRAIN_TIMESTEPS = 1000

# A lone UTF-16 surrogate (JSON's "\ud800") is a Python str character with no UTF-8 encoding:
# a result that echoed it could not be sent back (RunPod and the SDK's local API encode results as
# UTF-8 JSON), so the job would run and its video be lost.
_SURROGATE = re.compile("[\ud800-\udfff]")


class JobInputError(JobError, ValueError):
    """The job's JSON breaks a rule of the schema. The message is safe to return to the client."""


@dataclass(frozen=True)
class MediaSource:
    """Where one input comes from: an http(s) URL or base64 text (raw or a data: URI)."""

    field: str  # the job field it came from, used in error messages
    url: str | None = None
    base64: str | None = None


@dataclass(frozen=True)
class LoraSource:
    """One LoRA of the job: an http(s) URL or a path relative to the network volume, and a strength.

    `path` is only checked for its form here (relative, no '..', .safetensors); that it resolves
    inside the volume (symlinks included) is checked when it is loaded (lora.py).
    """

    field: str  # e.g. "loras[0]", used in error messages
    url: str | None = None
    path: str | None = None
    strength: float = 1.0


@dataclass(frozen=True)
class StorageOverride:
    """RunPod's per-job `s3Config`: replaces the bucket settings for this job only."""

    access_id: str
    access_secret: str
    bucket_name: str
    endpoint_url: str

    def __repr__(self) -> str:
        return f"StorageOverride(bucket_name={self.bucket_name!r}, endpoint_url={self.endpoint_url!r})"


@dataclass(frozen=True)
class GenerationSettings:
    prompt: str
    negative_prompt: str
    resolution: str
    sample_steps: int
    guidance_scale: float
    shift: float
    solver: str
    seed: int | None
    infer_frames: int
    max_clips: int | None
    fps: int
    init_first_frame: bool
    speed: str = "exact"
    step_cache: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class JobRequest:
    job_id: str
    image: MediaSource
    audio: MediaSource
    pose_video: MediaSource | None
    generation: GenerationSettings
    storage: StorageOverride | None
    loras: tuple[LoraSource, ...] = ()


# --- field rules ----------------------------------------------------------------------------------

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    # Integers are always finite; math.isfinite would overflow on one too large for a float
    # (JSON allows 10**400, which fuzzing sent).
    return isinstance(value, int) or math.isfinite(value)


def _shown(value: Any, limit: int = 40) -> str:
    """A client value as quoted in an error message: short, whatever was sent."""
    try:
        text = repr(value)
    except ValueError:  # an integer past Python's 4300-digit str() limit
        return "a number with too many digits"
    return text if len(text) <= limit else text[:limit] + "..."


def _string(field: str, value: Any, *, max_chars: int = MAX_PROMPT_CHARS) -> str:
    if not isinstance(value, str):
        raise JobInputError(f"'{field}' must be a string, got {type(value).__name__}")
    if len(value) > max_chars:
        raise JobInputError(f"'{field}' must be at most {max_chars} characters, got {len(value)}")
    return value


def _choice(choices: tuple) -> Callable[[str, Any], Any]:
    def check(field: str, value: Any) -> Any:
        if value not in choices or isinstance(value, bool):
            allowed = ", ".join(repr(c) for c in choices)
            raise JobInputError(f"'{field}' must be one of {allowed}, got {_shown(value)}")
        return value

    return check


def _int_range(low: int, high: int, *, multiple_of: int = 1) -> Callable[[str, Any], int]:
    def check(field: str, value: Any) -> int:
        if not _is_int(value):
            raise JobInputError(f"'{field}' must be an integer, got {type(value).__name__}")
        if not low <= value <= high:
            raise JobInputError(f"'{field}' must be between {low} and {high}, got {_shown(value)}")
        if value % multiple_of:
            raise JobInputError(f"'{field}' must be a multiple of {multiple_of}, "
                                f"got {_shown(value)}")
        return value

    return check


def _number_range(low: float, high: float, *, low_open: bool = False) -> Callable[[str, Any], float]:
    def check(field: str, value: Any) -> float:
        if isinstance(value, float) and not math.isfinite(value):
            raise JobInputError(f"'{field}' must be a finite number, got {_shown(value)}")
        if not _is_number(value):
            raise JobInputError(f"'{field}' must be a number, got {type(value).__name__}")
        if value > high or value < low or (low_open and value == low):
            bound = f"greater than {low}" if low_open else f"at least {low}"
            raise JobInputError(f"'{field}' must be {bound} and at most {high}, "
                                f"got {_shown(value)}")
        return float(value)

    return check


def _boolean(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise JobInputError(f"'{field}' must be true or false, got {_shown(value)}")
    return value


def _optional(check: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    def wrapped(field: str, value: Any) -> Any:
        return None if value is None else check(field, value)

    return wrapped


def _http_url(field: str, value: Any) -> str:
    value = _string(field, value, max_chars=8192)
    try:
        parts = urlsplit(value)
    except ValueError:
        raise JobInputError(f"'{field}' is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise JobInputError(f"'{field}' must be an http or https URL")
    return value


def _base64_text(field: str, value: Any) -> str:
    value = _string(field, value, max_chars=1 << 31)
    if not value.strip():
        raise JobInputError(f"'{field}' is empty")
    return value


# Generation fields: name -> (rule, default). Defaults follow the issue and the official config.
GENERATION_FIELDS: dict[str, tuple[Callable[[str, Any], Any], Any]] = {
    "prompt": (_string, ""),
    "negative_prompt": (_optional(_string), None),
    "resolution": (_choice(RESOLUTIONS), "720p"),
    "sample_steps": (_int_range(1, 100), 30),
    "guidance_scale": (_number_range(0.0, 20.0), 4.5),
    "shift": (_number_range(MIN_SHIFT, MAX_SHIFT), 3.0),
    "solver": (_choice(SOLVERS), "unipc"),
    "seed": (_optional(_int_range(0, MAX_SEED)), None),
    "infer_frames": (_int_range(8, 200, multiple_of=4), 80),
    "max_clips": (_optional(_int_range(1, 1000)), None),
    "fps": (_choice(OUTPUT_FPS), 24),
    "init_first_frame": (_boolean, False),
    # "exact": the official model's numbers (bfloat16); "fast": FP8 GEMMs and, unless step_cache
    # is false, reuse of the guided prediction on alternate middle steps; "fastest": fast with
    # FP8 self-attention too, which moves the result further (README: trade-offs).
    "speed": (_choice(SPEEDS), "exact"),
    "step_cache": (_optional(_boolean), None),
}

MEDIA_FIELDS = {
    "image": ("image_url", "image_base64", True),
    "audio": ("audio_url", "audio_base64", True),
    "pose_video": ("pose_video_url", "pose_video_base64", False),
}

KNOWN_INPUT_FIELDS = frozenset(GENERATION_FIELDS) | {
    name for url, b64, _ in MEDIA_FIELDS.values() for name in (url, b64)} | {"loras"}

S3_CONFIG_FIELDS = {"accessId": "access_id", "accessSecret": "access_secret",
                    "bucketName": "bucket_name", "endpointUrl": "endpoint_url"}


def _media(payload: Mapping[str, Any], name: str) -> MediaSource | None:
    url_field, b64_field, required = MEDIA_FIELDS[name]
    has_url = payload.get(url_field) is not None
    has_b64 = payload.get(b64_field) is not None
    if has_url and has_b64:
        raise JobInputError(f"give only one of '{url_field}' and '{b64_field}', not both")
    if has_url:
        return MediaSource(url_field, url=_http_url(url_field, payload[url_field]))
    if has_b64:
        return MediaSource(b64_field, base64=_base64_text(b64_field, payload[b64_field]))
    if required:
        raise JobInputError(f"the job needs one of '{url_field}' or '{b64_field}'")
    return None


def _volume_path(field: str, value: Any) -> str:
    """A path relative to the network volume, by its form only: what can be refused without disk."""
    value = _string(field, value, max_chars=1024)
    if not value.strip() or "\x00" in value or "\\" in value:
        raise JobInputError(f"'{field}' must be a path relative to the network volume")
    path = PurePosixPath(value)
    if path.is_absolute() or ".." in path.parts:
        raise JobInputError(f"'{field}' must be relative to the network volume, without '..'")
    if path.suffix.lower() != ".safetensors":
        raise JobInputError(f"'{field}' must name a .safetensors file")
    return value


def _lora(field: str, raw: Any) -> LoraSource:
    if not isinstance(raw, Mapping):
        raise JobInputError(f"'{field}' must be an object with 'url' or 'path', and 'strength'")
    unknown = sorted(_shown(k, 20) for k in set(raw) - LORA_FIELDS)
    if unknown:
        raise JobInputError(f"'{field}' has unknown fields: {', '.join(unknown[:5])}")
    has_url, has_path = raw.get("url") is not None, raw.get("path") is not None
    if has_url == has_path:
        raise JobInputError(f"'{field}' needs exactly one of 'url' and 'path'")
    strength = raw.get("strength")
    strength = 1.0 if strength is None else _number_range(
        -LORA_STRENGTH_LIMIT, LORA_STRENGTH_LIMIT)(f"{field}.strength", strength)
    if has_url:
        return LoraSource(field, url=_http_url(f"{field}.url", raw["url"]), strength=strength)
    return LoraSource(field, path=_volume_path(f"{field}.path", raw["path"]), strength=strength)


def _loras(raw: Any) -> tuple[LoraSource, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise JobInputError("'loras' must be a list")
    if len(raw) > MAX_LORAS:
        raise JobInputError(f"'loras' may hold at most {MAX_LORAS} LoRAs, got {len(raw)}")
    return tuple(_lora(f"loras[{i}]", item) for i, item in enumerate(raw))


def unipc_max_shift(steps: int) -> float:
    """The largest shift the official unipc solver runs with at `steps` steps (rounded down to
    0.01); infinite for one step.

    FlowUniPCMultistepScheduler.set_timesteps spaces the sigmas evenly from UNIPC_SIGMA_MAX down to
    0, shifts each to shift*s / (1 + (shift - 1)*s) and truncates s*1000 to integer timesteps. When
    the first two timesteps coincide (both 999), `index_for_timestep` starts the solver at its
    second index, and its last step fails (`assert self.this_order > 0`). For shift >= 1 the first
    is 999, and the second reaches 999 once its shifted sigma reaches 0.999, i.e. from
    shift = 999 * (1 - s1) / s1, with s1 the second unshifted sigma. tests/test_pipeline.py runs the
    official scheduler at and just above this limit.
    """
    if steps < 2:
        return math.inf
    s1 = UNIPC_SIGMA_MAX * (1 - 1 / steps)
    limit = (UNIPC_TRAIN_TIMESTEPS - 1) * (1 - s1) / s1
    return math.floor(limit * 100) / 100


def _check_shift_for_solver(generation: dict[str, Any]) -> None:
    if generation["solver"] != "unipc":
        return
    steps, limit = generation["sample_steps"], unipc_max_shift(generation["sample_steps"])
    if generation["shift"] > limit:
        raise JobInputError(
            f"'shift' must be at most {limit:g} with the unipc solver at {steps} steps (above it "
            f"the solver's first two timesteps coincide and it fails), got {_shown(generation['shift'])}; "
            "lower the shift, use fewer steps, or \"solver\": \"dpm++\"")


def _path_text(path: str) -> str:
    return path if len(path) <= 60 else path[:57] + "..."


def _refuse_unencodable_text(job: Mapping[str, Any]) -> None:
    """Every string the worker reads or may echo back (keys included) must have a UTF-8 encoding.

    Walked iteratively, so deep nesting cannot exhaust the stack. `str.isascii` is O(1) in
    CPython, so base64 media (ASCII) cost nothing to check.
    """
    pending: list[tuple[Any, str]] = [(job.get(key), key) for key in ("id", "input", "s3Config")]
    while pending:
        value, path = pending.pop()
        if isinstance(value, str):
            if not value.isascii() and _SURROGATE.search(value):
                raise JobInputError(f"'{_path_text(path)}' is not valid text: it holds a lone "
                                    "UTF-16 surrogate (\\ud800-\\udfff), which has no UTF-8 form")
        elif isinstance(value, Mapping):
            for key, item in value.items():
                if isinstance(key, str) and not key.isascii() and _SURROGATE.search(key):
                    raise JobInputError(f"a key in '{_path_text(path)}' is not valid text: it holds "
                                        "a lone UTF-16 surrogate (\\ud800-\\udfff), which has "
                                        "no UTF-8 form")
                pending.append((item, f"{path}.{key}" if isinstance(key, str) else path))
        elif isinstance(value, (list, tuple)):
            pending.extend((item, f"{path}[{i}]") for i, item in enumerate(value))


def _storage_override(raw: Any) -> StorageOverride | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise JobInputError("'s3Config' must be an object")
    unknown = sorted(set(raw) - set(S3_CONFIG_FIELDS))
    if unknown:
        raise JobInputError(f"'s3Config' has unknown fields: {', '.join(unknown)}")
    values = {}
    for key, attr in S3_CONFIG_FIELDS.items():
        value = raw.get(key)
        if not isinstance(value, str) or not value.strip():
            raise JobInputError(f"'s3Config.{key}' must be a non-empty string")
        values[attr] = value.strip()
    _http_url("s3Config.endpointUrl", values["endpoint_url"])
    return StorageOverride(**values)


def parse_job(job: Mapping[str, Any]) -> JobRequest:
    """Validate RunPod's job dict (`{"id", "input", "s3Config"?}`) into a `JobRequest`."""
    if not isinstance(job, Mapping):
        raise JobInputError("the job must be a JSON object")
    _refuse_unencodable_text(job)
    payload = job.get("input")
    if not isinstance(payload, Mapping):
        raise JobInputError("the job's 'input' must be a JSON object")
    non_string_keys = [k for k in payload if not isinstance(k, str)]
    if non_string_keys:
        raise JobInputError("the job's 'input' keys must be strings")
    unknown = sorted(set(payload) - KNOWN_INPUT_FIELDS)
    if unknown:
        raise JobInputError(f"unknown input fields: {', '.join(unknown)}")

    image = _media(payload, "image")
    audio = _media(payload, "audio")
    pose_video = _media(payload, "pose_video")

    generation = {}
    for name, (rule, default) in GENERATION_FIELDS.items():
        value = payload.get(name)
        generation[name] = default if value is None else rule(name, value)

    fast = generation["speed"] != "exact"
    if generation["step_cache"] and not fast:
        raise JobInputError("'step_cache' is part of fast mode: set \"speed\": \"fast\" or "
                            "\"fastest\" with it")
    if generation["step_cache"] is None:
        generation["step_cache"] = fast
    _check_shift_for_solver(generation)

    job_id = job.get("id")
    return JobRequest(
        job_id=job_id if isinstance(job_id, str) and job_id else "local",
        image=image,
        audio=audio,
        pose_video=pose_video,
        generation=GenerationSettings(**generation),
        storage=_storage_override(job.get("s3Config")),
        loras=_loras(payload.get("loras")),
    )
