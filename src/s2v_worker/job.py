"""The job schema, declared once as pydantic models, and `parse_job`: RunPod's job JSON to a `JobRequest`.

The models are the schema: `schema/job.schema.json` and the job-field table of docs/job.md are
generated from them (`python -m s2v_worker.reference`), and tests keep both in sync. Nothing here touches the
network, the disk or the GPU, so every rule is tested directly (and by property-based tests)
without a model. A job that breaks a rule raises `JobInputError`, whose message names the field and
the rule in the worker's own words (never pydantic's); the runner returns it as `{"error": ...}`.

Over 500 lines on purpose: it is the whole job contract in one place, each field with its
description and its rule (which generate the published schema and docs); split, a reader
would have to assemble one job from several files.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal, Mapping, get_args
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from .errors import JobError
from .resolutions import Resolution

# Seeds. Clip r's noise generator is seeded with seed + r, as in the official code, and that must
# stay within torch's 64-bit generator seed: a job may give any seed up to MAX_SEED, which leaves
# room for any clip count. A job that gives none gets one drawn from [0, SEED_RANGE) (runner.py),
# returned in the result. The official code draws from [0, sys.maxsize] (wan/speech2video.py); the
# worker draws from a smaller range so that the seed it returns is short and exact as a JSON number
# in every client (JavaScript's numbers are exact only up to 2**53), ready to be sent back.
MAX_SEED = 2**62
SEED_RANGE = 2**32
MAX_PROMPT_CHARS = 5000
MAX_LORAS = 4
LORA_STRENGTH_LIMIT = 4.0
# The schema's bound on audio_start_s and audio_duration_s (a day): the real limit is the decoded
# audio's length (media.py), which MAX_AUDIO_SECONDS bounds.
AUDIO_SLICE_LIMIT_S = 86_400.0

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


# --- rules pydantic has no constraint for --------------------------------------------------------
# A broken rule is a PydanticCustomError: "job_rule" carries the rule, which the message puts after
# the field's name; "job_message" (a rule between fields) carries the whole message.

def _rule(rule: str) -> PydanticCustomError:
    return PydanticCustomError("job_rule", "{rule}", {"rule": rule})


def _message(message: str) -> PydanticCustomError:
    return PydanticCustomError("job_message", "{message}", {"message": message})


def _http_url(value: str) -> str:
    try:
        parts = urlsplit(value)
    except ValueError:
        raise _rule("is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _rule("must be an http or https URL")
    return value


def _not_blank(value: str) -> str:
    if not value or value.isspace():  # no stripped copy of megabytes of base64
        raise _rule("is empty")
    return value


def _integer_choice(value: Any) -> Any:
    """A Literal of integers compares by equality, so 24.0 (and True for 1) would pass: the
    schema promises no coercion, so only an integer is one of the choices."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise PydanticCustomError("literal_error", "not an integer", {})
    return value


def _volume_path(value: str) -> str:
    """A path relative to the network volume, by its form only: what can be refused without disk.
    That it resolves inside the volume (symlinks included) is checked when it is loaded (lora.py)."""
    if not value.strip() or "\x00" in value or "\\" in value:
        raise _rule("must be a path relative to the network volume")
    path = PurePosixPath(value)
    if path.is_absolute() or ".." in path.parts:
        raise _rule("must be relative to the network volume, without '..'")
    if path.suffix.lower() != ".safetensors":
        raise _rule("must name a .safetensors file")
    return value


HttpUrl = Annotated[str, Field(max_length=8192, json_schema_extra={"format": "uri"}),
                    AfterValidator(_http_url)]
Base64Text = Annotated[str, AfterValidator(_not_blank)]  # its size is media.py's to check, decoded
VolumePath = Annotated[str, Field(max_length=1024), AfterValidator(_volume_path)]


def _present(name: str) -> dict:
    return {"required": [name], "properties": {name: {"not": {"type": "null"}}}}


def _exactly_one(first: str, second: str) -> dict:
    """The JSON Schema form of "exactly one of the two, not null" (a null field is an absent one)."""
    return {"oneOf": [_present(first), _present(second)]}


# --- the models ----------------------------------------------------------------------------------

class _Model(BaseModel):
    # strict: no coercion ("30" is not 30, true is not 1, 2.5 is no integer); unknown fields refused.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False,
                              use_attribute_docstrings=True)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # A known field given as JSON null takes its default (unknown ones stay, to be refused).
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}
        return data


class _MediaFields(_Model):
    image_url: HttpUrl | None = None
    """The portrait, downloaded from an http(s) URL. Exactly one of `image_url` and `image_base64`
    is required. PNG, JPEG, WebP and the other formats Pillow reads (EPS refused: Pillow would run
    Ghostscript)."""
    image_base64: Base64Text | None = None
    """The portrait as base64 text, raw or a `data:` URI."""
    audio_url: HttpUrl | None = None
    """The speech, downloaded from an http(s) URL. Exactly one of `audio_url` and `audio_base64` is
    required. WAV, MP3, FLAC, OGG, M4A/AAC, Opus, ... (audio formats only: playlists and ffmpeg
    scripts are refused)."""
    audio_base64: Base64Text | None = None
    """The speech as base64 text, raw or a `data:` URI."""
    audio_start_s: float = Field(0.0, ge=0.0, le=AUDIO_SLICE_LIMIT_S)
    """Where the spoken part starts in the audio, in seconds: the video speaks the audio from here
    (what comes before is not used). It must lie inside the audio, checked once it is decoded."""
    audio_duration_s: float | None = Field(None, ge=0.0, le=AUDIO_SLICE_LIMIT_S)
    """How many seconds of the audio, from `audio_start_s`, the video speaks; the clip count, the
    estimate and the MP4's length follow it. null: to the audio's end. The slice must end inside
    the audio and last at least `MIN_AUDIO_SECONDS`."""
    pose_video_url: HttpUrl | None = None
    """Optional driving pose video (MP4, MOV, MKV, WebM or AVI), as the official code takes it; at
    most one of `pose_video_url` and `pose_video_base64`."""
    pose_video_base64: Base64Text | None = None
    """The pose video as base64 text, raw or a `data:` URI."""

    @model_validator(mode="after")
    def _one_source_per_medium(self) -> _MediaFields:
        for medium, required in (("image", True), ("audio", True), ("pose_video", False)):
            url, base64 = f"{medium}_url", f"{medium}_base64"
            given = [getattr(self, url) is not None, getattr(self, base64) is not None]
            if all(given):
                raise _message(f"give only one of '{url}' and '{base64}', not both")
            if required and not any(given):
                raise _message(f"the job needs one of '{url}' or '{base64}'")
        return self


class GenerationSettings(_Model):
    """How the video is generated: the job's generation fields, checked, with defaults filled in."""

    prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    """What the video shows."""
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    """What the video avoids. null or empty: the official model's default."""
    resolution: Resolution = "720p"
    """`"480p"` (max area 832x480) or `"720p"` (1024x704). The image's aspect ratio is kept and the
    sides are multiples of 64, as the official code sizes it; an image so wide or tall that this
    sizing leaves a side at 0 (from about 5,800:1 at 480p and 10,500:1 at 720p) is refused."""
    sample_steps: int = Field(30, ge=1, le=100)
    """Denoising steps per clip."""
    guidance_scale: float = Field(4.5, ge=0.0, le=20.0)
    """Classifier-free guidance; 1 or less turns it off (half the model calls)."""
    shift: float = Field(3.0, ge=MIN_SHIFT, le=MAX_SHIFT)
    """Noise-schedule shift. With `"solver": "unipc"` also at most a ceiling that falls with the
    steps (1000.99 at 2 steps, 35.48 at 30, 11.1 at 100: above it the official unipc solver fails);
    dpm++ runs across the whole range."""
    solver: Literal["unipc", "dpm++"] = "unipc"
    """One of the official code's two solvers."""
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    """Each clip's noise is seeded with seed + its index, as the official code does. null: a random
    seed. Always returned in the result."""
    infer_frames: int = Field(80, ge=8, le=200, multiple_of=4)
    """Frames per clip at 16 fps."""
    max_clips: int | None = Field(None, ge=1, le=1000)
    """Caps the clip count; the video is then shorter than the audio. null: as many clips as the
    audio needs."""
    fps: Annotated[Literal[24, 16], BeforeValidator(_integer_choice)] = 24
    """24 (motion-interpolated from the native 16) or 16 (native frames)."""
    init_first_frame: bool = False
    """Use the image as the first frame (official option)."""
    speed: Literal["exact", "fast", "fastest"] = "exact"
    """`"exact"`: the official model's numbers within bfloat16 noise; `"fast"`: FP8 matrix
    multiplies and step reuse, about 1.9x faster sampling, visibly different output
    (docs/performance.md, Speed modes); `"fastest"`: fast with FP8 self-attention too, which moves
    the result further. The fast modes need an FP8 GPU (Ada, Hopper or newer)."""
    step_cache: bool = Field(default_factory=lambda fields: fields.get("speed", "exact") != "exact")
    """Reuse of the guided prediction on alternate middle steps, part of the fast modes. Default:
    true with `"speed": "fast"` or `"fastest"` (false keeps FP8 but computes every step), false with
    `"exact"`, which refuses true."""

    @model_validator(mode="after")
    def _rules_between_fields(self) -> GenerationSettings:
        if self.step_cache and self.speed == "exact":
            raise _message("'step_cache' is part of fast mode: set \"speed\": \"fast\" or "
                           "\"fastest\" with it")
        limit = unipc_max_shift(self.sample_steps)
        if self.solver == "unipc" and self.shift > limit:
            raise _message(
                f"'shift' must be at most {limit:g} with the unipc solver at {self.sample_steps} "
                "steps (above it the solver's first two timesteps coincide and it fails), got "
                f"{_shown(self.shift)}; lower the shift, use fewer steps, or \"solver\": \"dpm++\"")
        return self

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump()


class LoraEntry(_Model):
    """One LoRA, merged into the DiT for this job: exactly one of `url` and `path`."""

    model_config = ConfigDict(json_schema_extra=_exactly_one("url", "path"))

    url: HttpUrl | None = None
    """Downloaded from an http(s) URL with the same address policy as media, at most
    `MAX_LORA_BYTES`, cached in `LORA_CACHE_DIR`."""
    path: VolumePath | None = None
    """A `.safetensors` file relative to the network volume, without `..`; it must resolve inside
    the volume, symlinks included."""
    strength: float = Field(1.0, ge=-LORA_STRENGTH_LIMIT, le=LORA_STRENGTH_LIMIT)
    """The LoRA's weight in the merge: W += strength * scale * up @ down."""

    @model_validator(mode="after")
    def _one_source(self) -> LoraEntry:
        if (self.url is None) == (self.path is None):
            raise _rule("needs exactly one of 'url' and 'path'")
        return self


class JobInput(GenerationSettings, _MediaFields):
    """The job's `input`: the media, the generation settings and the LoRAs. A field given as null
    takes its default."""

    model_config = ConfigDict(json_schema_extra={"allOf": [
        _exactly_one("image_url", "image_base64"), _exactly_one("audio_url", "audio_base64"),
        {"not": {"allOf": [_present("pose_video_url"), _present("pose_video_base64")]}}]})

    loras: list[LoraEntry] | None = Field(None, max_length=MAX_LORAS)
    """LoRAs merged into the model for this job, in order (docs/job.md, LoRA)."""


class StorageOverride(_Model):
    """RunPod's per-job `s3Config`, beside `input`: the bucket this job's video is uploaded to,
    instead of the worker's BUCKET_* settings."""

    model_config = ConfigDict(str_strip_whitespace=True)

    access_id: str = Field(alias="accessId", min_length=1, repr=False)
    """The bucket's access key id."""
    access_secret: str = Field(alias="accessSecret", min_length=1, repr=False)
    """The bucket's secret access key."""
    bucket_name: str = Field(alias="bucketName", min_length=1)
    """The bucket."""
    endpoint_url: HttpUrl = Field(alias="endpointUrl", min_length=1)
    """The S3-compatible endpoint, http(s)."""


class Job(_Model):
    """A request to the Wan2.2-S2V worker: the body of a call to the endpoint's /run or /runsync.
    RunPod adds the job's `id` and reads its own keys (webhook, policy)."""

    model_config = ConfigDict(extra="ignore", title="Wan2.2-S2V job")

    input: JobInput
    storage: StorageOverride | None = Field(None, alias="s3Config")


# --- what the rest of the worker reads ---------------------------------------------------------

@dataclass(frozen=True)
class MediaSource:
    """Where one input comes from: an http(s) URL or base64 text (raw or a data: URI)."""

    field: str  # the job field it came from, used in error messages
    url: str | None = None
    base64: str | None = None


@dataclass(frozen=True)
class LoraSource:
    """One LoRA of the job: an http(s) URL or a path relative to the network volume, and a strength."""

    field: str  # e.g. "loras[0]", used in error messages
    url: str | None = None
    path: str | None = None
    strength: float = 1.0


@dataclass(frozen=True)
class AudioSlice:
    """The part of the audio the video speaks: from `start_s`, for `duration_s` seconds (None: to
    the audio's end). Checked against the audio's length once it is decoded (media.py)."""

    start_s: float = 0.0
    duration_s: float | None = None

    @property
    def whole(self) -> bool:
        """The whole audio: no slice asked for."""
        return self.start_s == 0 and self.duration_s is None


@dataclass(frozen=True)
class JobRequest:
    job_id: str
    image: MediaSource
    audio: MediaSource
    pose_video: MediaSource | None
    generation: GenerationSettings
    storage: StorageOverride | None
    loras: tuple[LoraSource, ...] = ()
    audio_slice: AudioSlice = AudioSlice()


# --- pydantic's errors in the worker's words -----------------------------------------------------

_PHRASES = {"int_type": "must be an integer, got {type}",
            "float_type": "must be a number, got {type}",
            "finite_number": "must be a finite number, got {shown}",
            "string_type": "must be a string, got {type}",
            "string_too_long": "must be at most {max_length} characters, got {length}",
            "bool_type": "must be true or false, got {shown}",
            "list_type": "must be a list",
            "too_long": "may hold at most {max_length} LoRAs, got {actual_length}",
            "model_type": "must be an object with 'url' or 'path', and 'strength'"}  # a LoRA
_NOT_AN_OBJECT = {(): "the job must be a JSON object", ("input",): "the job's 'input' must be a JSON object",
                  ("s3Config",): "'s3Config' must be an object"}
_UNKNOWN = ("extra_forbidden", "invalid_key")
UNKNOWN_NAMES_SHOWN = 5


def _shown(value: Any, limit: int = 40) -> str:
    """A client value as quoted in an error message: short, whatever was sent."""
    try:
        text = repr(value)
    except ValueError:  # an integer past Python's 4300-digit str() limit
        return "a number with too many digits"
    return text if len(text) <= limit else text[:limit] + "..."


def _some_names(keys: list, quoted: bool) -> str:
    """At most UNKNOWN_NAMES_SHOWN of the keys, sorted and each cut short, and how many more:
    a job of 50,000 unknown keys gets a message of a line, not of their names."""
    def name(key: Any) -> str:
        text = str(key)
        if quoted:
            return _shown(text, 20)
        return text if len(text) <= 40 else text[:40] + "..."

    names = sorted(map(name, keys))
    shown = ", ".join(names[:UNKNOWN_NAMES_SHOWN])
    more = len(names) - UNKNOWN_NAMES_SHOWN
    return shown + (f" and {more} more" if more > 0 else "")


def _field_name(loc: tuple) -> str:
    """("input", "loras", 0, "url") -> "loras[0].url"; ("s3Config", "bucketName") -> "s3Config.bucketName"."""
    name = ""
    for part in loc[1:] if loc[:1] == ("input",) else loc:
        name += f"[{part}]" if isinstance(part, int) else f".{part}" if name else part
    return name


def _check_order(error: dict) -> tuple:
    """The job, then `input` (unknown fields first, then the fields as declared), `s3Config`, and
    the LoRAs one by one. The rules between fields run only once every field passes its own."""
    loc = error["loc"]
    if loc[:2] == ("input", "loras"):
        section = (3, loc[2] if len(loc) > 2 else -1)
    else:
        section = ({"input": 1, "s3Config": 2}.get(loc[0], 0) if loc else 0, 0)
    return (*section, error["type"] not in _UNKNOWN)


def _client_message(errors: list[dict]) -> str:
    """The message for the first broken rule (in `_check_order`), never pydantic's own text."""
    errors = sorted((e for e in errors if e["type"] != "default_factory_not_called"), key=_check_order)
    kind, loc, value, ctx = errors[0]["type"], errors[0]["loc"], errors[0]["input"], errors[0].get("ctx", {})
    field = _field_name(loc)
    if kind == "job_message":
        return ctx["message"]
    if kind == "job_rule":
        return f"'{field}' {ctx['rule']}"
    if kind in _UNKNOWN:
        keys = [e["loc"][-1] for e in errors if e["type"] in _UNKNOWN and e["loc"][:-1] == loc[:-1]]
        if loc[:-1] == ("input",):
            if not all(isinstance(key, str) for key in keys):
                return "the job's 'input' keys must be strings"
            return f"unknown input fields: {_some_names(keys, quoted=False)}"
        return (f"'{_field_name(loc[:-1])}' has unknown fields: "
                f"{_some_names(keys, quoted=loc[0] != 's3Config')}")
    if loc in _NOT_AN_OBJECT and kind in ("model_type", "missing"):
        return _NOT_AN_OBJECT[loc]
    if loc[:1] == ("s3Config",) and kind != "string_too_long":  # missing, not text, or blank
        return f"'{field}' must be a non-empty string"
    info = (LoraEntry if len(loc) == 4 else JobInput).model_fields.get(loc[-1])
    if kind in ("greater_than_equal", "less_than_equal", "multiple_of", "float_type") and (
            kind != "float_type" or type(value) is int):  # an integer too large for a float
        bounds = {key: getattr(m, key) for m in info.metadata
                  for key in ("ge", "le", "multiple_of") if hasattr(m, key)}
        low, high, step = bounds["ge"], bounds["le"], bounds.get("multiple_of")
        if isinstance(low, float):  # a number field
            return f"'{field}' must be at least {low} and at most {high}, got {_shown(value)}"
        if step and low <= value <= high:
            return f"'{field}' must be a multiple of {step}, got {_shown(value)}"
        return f"'{field}' must be between {low} and {high}, got {_shown(value)}"
    if kind == "literal_error":
        choices = ", ".join(repr(choice) for choice in get_args(info.annotation))
        return f"'{field}' must be one of {choices}, got {_shown(value)}"
    length = len(value) if isinstance(value, (str, list)) else 0
    return f"'{field}' " + _PHRASES.get(kind, "is not valid").format(
        type=type(value).__name__, shown=_shown(value), length=length, **ctx)


# --- parse_job -----------------------------------------------------------------------------------

def _path_text(path: str) -> str:
    return path if len(path) <= 60 else path[:57] + "..."


def _refuse_unencodable_text(job: Mapping[str, Any]) -> None:
    """Every string the worker reads or may echo back (keys included) must have a UTF-8 encoding.

    Walked iteratively, so deep nesting cannot exhaust the stack. `str.isascii` is O(1) in
    CPython, so base64 media (ASCII) cost nothing to check. Places are named as every other error
    names fields (`_field_name`: `prompt`, `loras[0].url`, `s3Config.bucketName`).
    """
    pending: list[tuple[Any, tuple]] = [(job.get(key), (key,)) for key in ("id", "input", "s3Config")]
    while pending:
        value, loc = pending.pop()
        if isinstance(value, str):
            if not value.isascii() and _SURROGATE.search(value):
                raise JobInputError(f"'{_path_text(_field_name(loc))}' is not valid text: it holds "
                                    "a lone UTF-16 surrogate (\\ud800-\\udfff), which has no "
                                    "UTF-8 form")
        elif isinstance(value, Mapping):
            for key, item in value.items():
                if isinstance(key, str) and not key.isascii() and _SURROGATE.search(key):
                    where = "the job's 'input'" if loc == ("input",) else f"'{_path_text(_field_name(loc))}'"
                    raise JobInputError(f"a key in {where} is not valid text: it holds a lone "
                                        "UTF-16 surrogate (\\ud800-\\udfff), which has no UTF-8 "
                                        "form")
                pending.append((item, (*loc, key) if isinstance(key, str) else loc))
        elif isinstance(value, (list, tuple)):
            pending.extend((item, (*loc, i)) for i, item in enumerate(value))


def _media(payload: JobInput, medium: str) -> MediaSource | None:
    url, base64 = getattr(payload, f"{medium}_url"), getattr(payload, f"{medium}_base64")
    if url is not None:
        return MediaSource(f"{medium}_url", url=url)
    return None if base64 is None else MediaSource(f"{medium}_base64", base64=base64)


def parse_job(job: Mapping[str, Any]) -> JobRequest:
    """Validate RunPod's job dict (`{"id", "input", "s3Config"?}`) into a `JobRequest`."""
    if not isinstance(job, Mapping):
        raise JobInputError("the job must be a JSON object")
    _refuse_unencodable_text(job)
    try:
        parsed = Job.model_validate(dict(job))
    except ValidationError as exc:
        raise JobInputError(_client_message(exc.errors(include_url=False))) from None
    payload, job_id = parsed.input, job.get("id")
    return JobRequest(
        job_id=job_id if isinstance(job_id, str) and job_id else "local",
        image=_media(payload, "image"),
        audio=_media(payload, "audio"),
        pose_video=_media(payload, "pose_video"),
        # JobInput is a GenerationSettings: its values passed these rules already.
        generation=GenerationSettings.model_construct(**{
            name: getattr(payload, name) for name in GenerationSettings.model_fields}),
        storage=parsed.storage,
        loras=tuple(LoraSource(f"loras[{i}]", url=entry.url, path=entry.path, strength=entry.strength)
                    for i, entry in enumerate(payload.loras or ())),
        audio_slice=AudioSlice(payload.audio_start_s, payload.audio_duration_s),
    )
