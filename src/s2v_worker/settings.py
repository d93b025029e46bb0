"""Every environment setting of the worker, declared once: name, type, default and why it exists.

Settings are read once, at worker start, into a frozen `Settings` made of groups, one per concern:
`model`, `parallel`, `network`, `media`, `video`, `storage`, `limits`, `folders` and `logging`.
Each stage receives the group it needs (the media intake `settings.media`, the encoder
`settings.video`, ...), never the whole object. A group is a frozen dataclass whose fields are
declared with `setting(...)`: the environment variable, the parser that turns its text into the
field's type, the default and the help text, which generates docs/settings.md
(`python -m s2v_worker.reference`). Nothing else in the package reads `os.environ`.

Over 500 lines on purpose: most of it is the declarations themselves, each variable with its help
text; splitting them would scatter what is meant to be read in one place.
"""
from __future__ import annotations

import dataclasses
import enum
import ipaddress
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Union

from .resolutions import RESOLUTIONS, Resolution

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
MiB = 1024 * 1024


class SettingsError(ValueError):
    """An environment setting has a value the worker cannot use."""


def writable_dir(folder: Path) -> bool:
    """A folder this process can create files in (write and search permission)."""
    return folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)


# --- the choices --------------------------------------------------------------------------------
# String enums: their members compare equal to the variable's text ("cpu" == Device.CPU).

class Device(enum.StrEnum):
    AUTO = "auto"
    CUDA = "cuda"
    CPU = "cpu"


class Attention(enum.StrEnum):
    AUTO = "auto"
    FA3 = "fa3"
    SDPA = "sdpa"
    FLASH = "flash"


class WeightFormat(enum.StrEnum):
    AUTO = "auto"
    BF16 = "bf16"
    FP8 = "fp8"


class AudioEncoderDevice(enum.StrEnum):
    GPU = "gpu"
    CPU = "cpu"


class AddressingStyle(enum.StrEnum):
    AUTO = "auto"
    PATH = "path"
    VIRTUAL = "virtual"


class LogLevel(enum.StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class RunpodLogLevel(enum.StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARN = "warn"
    ERROR = "error"


# --- parsers: the variable's text to the field's type --------------------------------------------

def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true/false, got {raw!r}")


def _text(raw: str) -> str:
    return raw


def _optional_text(raw: str) -> str | None:
    return raw.strip() or None


def _path(raw: str) -> Path:
    return Path(raw)


def _optional_path(raw: str) -> Path | None:
    return Path(raw.strip()) if raw.strip() else None


def _int(raw: str) -> int:
    return int(raw)


def _float(raw: str) -> float:
    return float(raw)


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError(f"expected a positive integer, got {raw!r}")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError(f"expected a positive number, got {raw!r}")
    return value


def _optional_positive_float(raw: str) -> float | None:
    return _positive_float(raw) if raw.strip() else None


def _world_size(raw: str) -> int | None:
    """'auto' is None: every visible GPU (parallel.resolve_world_size)."""
    value = raw.strip().lower()
    return None if value == "auto" else _positive_int(value)


def _cfg_parallel(raw: str) -> bool:
    value = raw.strip().lower()
    if value not in ("auto", "off"):
        raise ValueError(f"expected one of auto, off, got {raw!r}")
    return value == "auto"


def _networks(raw: str) -> tuple[IPNetwork, ...]:
    """Comma-separated CIDR ranges, checked at start-up: a typo must not surface only when a job
    downloads."""
    networks = []
    for part in filter(None, (p.strip() for p in raw.split(","))):
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ValueError(f"{part!r} is not a CIDR range") from None
    return tuple(networks)


def _resolutions(raw: str) -> tuple[Resolution, ...]:
    values = tuple(filter(None, (p.strip().lower() for p in raw.split(","))))
    for value in values:
        if value not in RESOLUTIONS:
            raise ValueError(f"expected a comma-separated list of {'/'.join(RESOLUTIONS)}, "
                             f"got {raw!r}")
    return values  # type: ignore[return-value]


def _choice(kind: type[enum.StrEnum]) -> Callable[[str], Any]:
    def parse(raw: str) -> enum.StrEnum:
        try:
            return kind(raw.strip().lower())
        except ValueError:
            raise ValueError(f"expected one of {', '.join(kind)}, got {raw!r}") from None

    return parse


def setting(env: str, default: Any, parse: Callable[[str], Any], help: str,
            secret: bool = False, shown_default: str | None = None) -> Any:
    """A group's field read from the environment variable `env` (text -> `parse` -> the field).
    A secret is left out of every repr."""
    return dataclasses.field(default=default, repr=not secret, metadata={
        "env": env, "parse": parse, "help": help, "secret": secret,
        "shown_default": shown_default})


# --- the groups ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSettings:
    """The checkpoint and how the model runs (pipeline loading, the DiT, the warm-up)."""

    ckpt_dir: Path | None = setting(
        "WAN_S2V_CKPT_DIR", None, _optional_path,
        help="Folder holding the Wan2.2-S2V-14B checkpoint. When unset the worker looks in "
             "RunPod's model cache, then the network volume, then the image (docs/deploying.md, "
             "'Weights').")
    hf_cache_dir: Path = setting(
        "RUNPOD_HF_CACHE_DIR", Path("/runpod-volume/huggingface-cache/hub"), _path,
        help="Hugging Face hub cache that RunPod's cached-model feature fills.")
    device: Device = setting(
        "WAN_S2V_DEVICE", Device.AUTO, _choice(Device),
        help="Where the pipeline runs. 'auto' takes the GPU when there is one and logs a warning "
             "when it falls to the CPU, which is only sensible for the tiny test checkpoint.")
    weights: WeightFormat = setting(
        "WAN_S2V_WEIGHTS", WeightFormat.AUTO, _choice(WeightFormat),
        help="How the DiT's weights are kept on the GPU. 'bf16': as the official checkpoint has "
             "them (30.4 GiB). 'fp8': its large Linear weights in FP8 e4m3 with per-row scales "
             "(19.2 GiB), quantized at load (a scaled-FP8 file's taken as they are); the "
             "GEMMs run in FP8 on GPUs with FP8 tensor cores (Ada, Hopper), else each weight is "
             "upcast to bfloat16 for its GEMM. 'auto': bf16 where the GPU (or "
             "WAN_S2V_GPU_MEMORY_GB) holds it with 720p jobs, else fp8 (README, 'Which "
             "GPU'). A job's result says which weights served it.")
    gpu_memory_gb: float | None = setting(
        "WAN_S2V_GPU_MEMORY_GB", None, _optional_positive_float, shown_default="the card's",
        help="GPU memory the worker may use, in GiB (default: the card's). Every placement "
             "decision follows it (FP8 weights, T5 streamed from host memory, DiT blocks streamed "
             "from host memory on 24 GB cards) and the allocator is held to it, so a 48 GB or "
             "24 GB card can be played on a larger one. A job that would not fit is refused up "
             "front with the memory it needs.")
    offload: bool = setting(
        "WAN_S2V_OFFLOAD", False, _bool,
        help="Keep the text encoder and the DiT on the CPU between uses, moved whole to the GPU "
             "for each job (slower than what WAN_S2V_GPU_MEMORY_GB's tiers do by themselves). "
             "Off: the tiers decide.")
    attention: Attention = setting(
        "WAN_S2V_ATTENTION", Attention.AUTO, _choice(Attention),
        help="Attention kernel. 'auto': FlashAttention-3 (the fa3-fwd package) for the DiT on a "
             "Hopper GPU (H100, H200) when it imports, else PyTorch SDPA (cuDNN on Hopper), with "
             "one log line saying why; 'fa3' insists on it (start-up fails without it); 'sdpa' "
             "never uses it. The official modules (T5, frame packing) use flash-attn when it is "
             "installed, else SDPA; 'flash' insists on flash-attn for them.")
    compile: bool = setting(
        "WAN_S2V_COMPILE", True, _bool,
        help="Compile the DiT blocks with torch.compile (GPU only): about 1.4x faster per step, "
             "same numbers within bfloat16 rounding. The first compilation takes tens of seconds "
             "(see WAN_S2V_WARMUP and TORCH_COMPILE_CACHE_DIR).")
    audio_encoder_device: AudioEncoderDevice = setting(
        "WAN_S2V_AUDIO_ENCODER_DEVICE", AudioEncoderDevice.GPU, _choice(AudioEncoderDevice),
        help="Where wav2vec2 encodes the speech: 'gpu' (the pipeline's device; 21 s faster for "
             "4.5 s of speech) or 'cpu' (as the official code). With 'cpu' and "
             "WAN_S2V_COMPILE=false the output is bit-identical to the official code's.")
    read_ahead: bool = setting(
        "WAN_S2V_READ_AHEAD", True, _bool,
        help="While the worker imports its code (about 22 s of a cold start), read the "
             "checkpoint's files into the page cache with 8 threads, as far as the host's free "
             "memory (or the container's limit) allows less 24 GiB, so that the loaders find "
             "them there. Off: the loaders read the disk themselves (docs/deploying.md, "
             "'Start-up', says what each costs).")
    warmup: tuple[Resolution, ...] = setting(
        "WAN_S2V_WARMUP", ("480p",), _resolutions, shown_default="480p",
        help="Resolutions run once on blank inputs while the worker starts, so the compilation "
             "happens before the first job ('' for none). One compilation serves every image "
             "size.")


@dataclass(frozen=True)
class ParallelSettings:
    """Several GPUs per worker (parallel.py)."""

    world_size: int | None = setting(
        "WAN_S2V_WORLD_SIZE", None, _world_size, shown_default="auto",
        help="GPUs one job runs on: 'auto' takes every visible CUDA GPU (the most that divide "
             "the DiT's 40 attention heads: 1, 2, 4, 5 or 8), or a number to use fewer. The "
             "worker starts one process per GPU. On a machine without a GPU a number above 1 "
             "runs that many CPU processes (gloo), which is how the tests exercise the "
             "multi-GPU code.")
    cfg_parallel: bool = setting(
        "WAN_S2V_CFG_PARALLEL", True, _cfg_parallel, shown_default="auto",
        help="With several GPUs: 'auto' runs the two guidance branches at once on the two "
             "halves of the GPUs when the count is even and the job is guided, each half "
             "splitting the tokens (Ulysses); 'off' splits every DiT call's tokens over all GPUs.")
    rank_timeout_s: float = setting(
        "WAN_S2V_RANK_TIMEOUT_S", 300.0, _positive_float,
        help="With several GPUs: how long a rank may keep the others waiting in a job (one "
             "collective, or the end of a command) before the group is declared failed; the job "
             "then ends with an error and refresh_worker. A rank that exits or raises is "
             "reported at once.")


@dataclass(frozen=True)
class NetworkSettings:
    """What the worker may connect to, and for how long (media and LoRA downloads, the bucket)."""

    download_timeout_s: float = setting(
        "DOWNLOAD_TIMEOUT_S", 60.0, _positive_float,
        help="Connect and read timeout for each media download.")
    max_redirects: int = setting(
        "MAX_REDIRECTS", 5, _int,
        help="Redirects followed per media download; each hop's address is checked again.")
    allowed_private_networks: tuple[IPNetwork, ...] = setting(
        "ALLOWED_PRIVATE_NETWORKS", (), _networks, shown_default="",
        help="Comma-separated CIDR ranges that media URLs, LoRA URLs and the bucket endpoint "
             "may resolve to although they are loopback, private, link-local or reserved (e.g. "
             "10.0.0.0/8 for a private MinIO, 127.0.0.0/8 for local tests). Empty: none.")


@dataclass(frozen=True)
class MediaSettings:
    """What the media intake accepts (media.py) and the LoRA files (lora.py)."""

    max_image_bytes: int = setting(
        "MAX_IMAGE_BYTES", 25 * MiB, _positive_int,
        help="Largest image accepted, as downloaded or decoded from base64.")
    max_audio_bytes: int = setting(
        "MAX_AUDIO_BYTES", 100 * MiB, _positive_int, help="Largest audio file accepted.")
    max_pose_video_bytes: int = setting(
        "MAX_POSE_VIDEO_BYTES", 200 * MiB, _positive_int, help="Largest pose video accepted.")
    max_audio_seconds: float = setting(
        "MAX_AUDIO_SECONDS", 300.0, _positive_float,
        help="Longest audio accepted; the video is as long as the audio.")
    min_audio_seconds: float = setting(
        "MIN_AUDIO_SECONDS", 0.1, _positive_float, help="Shortest audio accepted.")
    max_audio_channels: int = setting(
        "MAX_AUDIO_CHANNELS", 8, _positive_int,
        help="Most channels an audio file may have (8: 7.1 surround). The model hears their "
             "mean.")
    max_audio_sample_rate: int = setting(
        "MAX_AUDIO_SAMPLE_RATE", 192_000, _positive_int,
        help="Highest audio sample rate accepted, in Hz (at least 4000 is needed). Audio is "
             "decoded as a stream, in bounded memory, whatever its rate; this bounds the "
             "decoding work.")
    max_image_pixels: int = setting(
        "MAX_IMAGE_PIXELS", 64_000_000, _positive_int,
        help="Largest image accepted, in pixels, checked before decoding (decompression bombs).")
    max_pose_video_frames: int = setting(
        "MAX_POSE_VIDEO_FRAMES", 20_000, _positive_int,
        help="Most frames a pose video may have.")
    max_pose_video_side: int = setting(
        "MAX_POSE_VIDEO_SIDE", 4096, _positive_int,
        help="Longest side, in pixels, a pose video may have.")
    max_lora_bytes: int = setting(
        "MAX_LORA_BYTES", 2048 * MiB, _positive_int,
        help="Largest LoRA file accepted, downloaded or on the network volume.")


@dataclass(frozen=True)
class VideoSettings:
    """The MP4 the worker writes (video.py)."""

    crf: int = setting(
        "VIDEO_CRF", 18, _int,
        help="x264 constant rate factor of the output (lower is better quality, larger files).")
    preset: str = setting("VIDEO_PRESET", "medium", _text, help="x264 preset of the output.")
    audio_bitrate: str = setting(
        "VIDEO_AUDIO_BITRATE", "192k", _text, help="AAC bitrate of the muxed audio.")


@dataclass(frozen=True)
class StorageSettings:
    """Where finished videos go (storage.py): the bucket, or the job's answer itself; and whether
    the answer streams each clip as it finishes (handler.py)."""

    bucket_endpoint_url: str | None = setting(
        "BUCKET_ENDPOINT_URL", None, _optional_text,
        help="S3-compatible endpoint (AWS, R2, B2, MinIO, ...). With BUCKET_NAME and keys set, "
             "videos are uploaded and returned as presigned links.")
    bucket_access_key_id: str | None = setting(
        "BUCKET_ACCESS_KEY_ID", None, _optional_text, help="Access key of the bucket.",
        secret=True)
    bucket_secret_access_key: str | None = setting(
        "BUCKET_SECRET_ACCESS_KEY", None, _optional_text, help="Secret key of the bucket.",
        secret=True)
    bucket_name: str | None = setting(
        "BUCKET_NAME", None, _optional_text, help="Bucket the videos go to.")
    bucket_region: str = setting(
        "BUCKET_REGION", "us-east-1", _text, help="Region used to sign requests.")
    bucket_key_prefix: str = setting(
        "BUCKET_KEY_PREFIX", "wan-s2v/", _text, help="Prefix of every object key the worker "
                                                    "writes.")
    bucket_url_expiry_s: int = setting(
        "BUCKET_URL_EXPIRY_S", 24 * 3600, _positive_int,
        help="Lifetime of the presigned link returned as video_url (S3 allows at most 7 days).")
    bucket_addressing_style: AddressingStyle = setting(
        "BUCKET_ADDRESSING_STYLE", AddressingStyle.AUTO, _choice(AddressingStyle),
        help="How the bucket is named in request URLs. 'auto': virtual-hosted for AWS, path "
             "style for every other endpoint (MinIO, R2, B2, ...); 'virtual' for services that "
             "refuse path style, such as Alibaba OSS.")
    bucket_timeout_s: float = setting(
        "BUCKET_TIMEOUT_S", 30.0, _positive_float,
        help="Connect and read timeout of each bucket request.")
    bucket_max_attempts: int = setting(
        "BUCKET_MAX_ATTEMPTS", 3, _positive_int,
        help="Tries per bucket request, the first included, before the upload fails.")
    max_inline_video_bytes: int = setting(
        "MAX_INLINE_VIDEO_BYTES", 7 * MiB, _positive_int,
        help="Without a bucket, videos up to this size come back as video_base64 (base64 adds a "
             "third; RunPod caps /run results at 10 MB and /runsync at 20 MB).")
    stream: bool = setting(
        "WAN_S2V_STREAM", False, _bool,
        help="Streaming endpoint: the handler yields an item for each clip as soon as its MP4 "
             "(the video's own frames for that span, with its audio) is delivered as videos are "
             "(bucket, inline up to 700 kB, network volume), then the whole video's result, "
             "last. /stream shows the clips as they finish; /run, /runsync and /status return "
             "the list of items. Off: one result per job (docs/job.md, 'Streaming endpoints').")

    @property
    def bucket_configured(self) -> bool:
        return bool(self.bucket_name and self.bucket_access_key_id
                    and self.bucket_secret_access_key)


@dataclass(frozen=True)
class LimitSettings:
    """How long a job may run, and how often it reports (runner.py)."""

    job_timeout_s: float = setting(
        "JOB_TIMEOUT_S", 3600.0, _positive_float,
        help="Longest a job may run. A job whose estimated duration (from this worker's "
             "measured seconds per DiT call and per clip) is longer is refused before any model "
             "work; past the limit, sampling stops at the next step and the job ends with an "
             "error, but a job whose sampling has finished delivers its video with a warning. "
             "Keep it below RunPod's execution timeout (docs/job.md, 'Long jobs').")
    progress_interval_s: float = setting(
        "PROGRESS_INTERVAL_S", 2.0, _float,
        help="Least time between two progress updates sent during sampling.")


@dataclass(frozen=True)
class FolderSettings:
    """Where the worker keeps files: per job, and between jobs (on the network volume when one is
    mounted, so that they outlive the worker)."""

    network_volume_dir: Path = setting(
        "NETWORK_VOLUME_DIR", Path("/runpod-volume"), _path,
        help="Mount point of the network volume; without a bucket, videos too large to inline "
             "are written under <dir>/wan-s2v-outputs/ when it is mounted.")
    work_dir: Path | None = setting(
        "WORK_DIR", None, _optional_path,
        help="Parent of each job's temporary folder (default: the system temp folder).")
    undelivered_dir: Path | None = setting(
        "UNDELIVERED_DIR", None, _optional_path,
        help="Where a finished video is kept when no storage could take it (default: "
             "<NETWORK_VOLUME_DIR>/wan-s2v-undelivered when the volume is mounted, else "
             "<system temp>/wan-s2v-undelivered); the job's error names the file.")
    lora_cache_dir: Path | None = setting(
        "LORA_CACHE_DIR", None, _optional_path,
        help="Where LoRAs given by URL are kept, named by the URL's sha256 and reused by later "
             "jobs (default: <NETWORK_VOLUME_DIR>/wan-s2v-loras when the volume is mounted, "
             "else <system temp>/wan-s2v-loras). A download enters it only if it reads as a "
             "LoRA, and leaves it if it then fails to load; nothing else is evicted.")
    compile_cache_dir: Path | None = setting(
        "TORCH_COMPILE_CACHE_DIR", None, _optional_path,
        help="Where torch.compile keeps its kernels between workers (default: "
             "<NETWORK_VOLUME_DIR>/torch-compile-cache when the volume is mounted, else "
             "<system temp>/torch-compile-cache). A shared cache turns a new worker's "
             "compilation into a lookup.")

    @property
    def volume_mounted(self) -> bool:
        return writable_dir(self.network_volume_dir)

    def lasting(self, explicit: Path | None, name: str) -> Path:
        """A folder that should outlive the job (LoRA cache, compile cache, kept videos): its
        own setting when set; else `name` on the network volume when one is mounted and
        writable (it outlives the worker too); else `name` in the system's temporary folder."""
        if explicit is not None:
            return explicit.absolute()
        if self.volume_mounted:
            return self.network_volume_dir.absolute() / name
        return Path(tempfile.gettempdir()).absolute() / name


@dataclass(frozen=True)
class LoggingSettings:
    """The worker's log, and RunPod's (handler.py, logs.py)."""

    log_level: LogLevel = setting(
        "LOG_LEVEL", LogLevel.INFO, _choice(LogLevel),
        help="Level of the worker's own loggers; other libraries log at warning (error when "
             "this is error), since their debug output is for their developers.")
    runpod_log_level: RunpodLogLevel = setting(
        "RUNPOD_LOG_LEVEL", RunpodLogLevel.INFO, _choice(RunpodLogLevel),
        help="Level of the runpod SDK's own log. Its 'debug' prints whole job inputs and outputs "
             "(media as base64, s3Config keys), so it is off unless asked for.")
    runpod_webhook_post_output: str | None = setting(
        "RUNPOD_WEBHOOK_POST_OUTPUT", None, _optional_text,
        help="Set by RunPod on its workers (not by users). Progress updates are sent only where "
             "it is set; local runs have nowhere to send them.")


GROUPS: dict[str, type] = {
    "model": ModelSettings, "parallel": ParallelSettings, "network": NetworkSettings,
    "media": MediaSettings, "video": VideoSettings, "storage": StorageSettings,
    "limits": LimitSettings, "folders": FolderSettings, "logging": LoggingSettings,
}


@dataclass(frozen=True)
class Setting:
    """One environment variable, as its group declares it."""

    group: str
    field: str
    env: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    secret: bool
    shown_default: str | None

    @property
    def default_text(self) -> str:
        """The default as the variable would spell it."""
        if self.shown_default is not None:
            return self.shown_default
        return "unset" if self.default is None else str(self.default)


def _declared() -> Iterator[Setting]:
    for group, kind in GROUPS.items():
        for f in dataclasses.fields(kind):
            meta = f.metadata
            yield Setting(group, f.name, meta["env"], meta["parse"], f.default, meta["help"],
                          meta["secret"], meta["shown_default"])


SETTINGS: tuple[Setting, ...] = tuple(_declared())


@dataclass(frozen=True)
class Settings:
    """Typed, immutable view of the environment, one group per concern. Build it with
    `Settings.from_env()`."""

    model: ModelSettings = ModelSettings()
    parallel: ParallelSettings = ParallelSettings()
    network: NetworkSettings = NetworkSettings()
    media: MediaSettings = MediaSettings()
    video: VideoSettings = VideoSettings()
    storage: StorageSettings = StorageSettings()
    limits: LimitSettings = LimitSettings()
    folders: FolderSettings = FolderSettings()
    logging: LoggingSettings = LoggingSettings()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        environ = os.environ if environ is None else environ
        values: dict[str, dict[str, Any]] = {group: {} for group in GROUPS}
        for s in SETTINGS:
            raw = environ.get(s.env)
            if raw is None:
                continue
            try:
                values[s.group][s.field] = s.parse(raw)
            except ValueError as exc:
                raise SettingsError(f"{s.env}: {exc}") from None
        return cls(**{group: kind(**values[group]) for group, kind in GROUPS.items()})

    def replace(self, **changes: Any) -> "Settings":
        """A copy with fields changed, each named by its field name (unique across the groups),
        given as the field's type or as the variable's text: `settings.replace(job_timeout_s=60.0,
        work_dir="/tmp/x", allowed_private_networks="127.0.0.0/8")`."""
        by_field = {s.field: s for s in SETTINGS}
        by_group: dict[str, dict[str, Any]] = {}
        for name, value in changes.items():
            if name not in by_field:
                raise TypeError(f"no setting is named {name!r}")
            declared = by_field[name]
            if isinstance(value, str):
                value = declared.parse(value)
            by_group.setdefault(declared.group, {})[name] = value
        return dataclasses.replace(self, **{
            group: dataclasses.replace(getattr(self, group), **fields)
            for group, fields in by_group.items()})

    def __repr__(self) -> str:  # never print secrets, even by accident
        shown = []
        for s in SETTINGS:
            value = getattr(getattr(self, s.group), s.field)
            shown.append(f"{s.group}.{s.field}={'***' if s.secret and value else value!r}")
        return f"Settings({', '.join(shown)})"


def export_to_libraries(variables: Mapping[str, str], keep_existing: bool = False) -> None:
    """Set environment variables that libraries read for themselves (torch.compile's cache
    folders, NCCL's error handling). keep_existing: a value the deployment set wins. Kept here so
    that this module stays the only one touching the environment."""
    for name, value in variables.items():
        if not (keep_existing and name in os.environ):
            os.environ[name] = value
