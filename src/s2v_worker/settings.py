"""Every environment setting of the worker, declared once: name, type, default and why it exists.

Settings are read once, at worker start, into a frozen `Settings` object that is passed down to the
stages that need it. Nothing else in the package reads `os.environ`. The README's settings table is
generated from `SETTINGS` (see `settings_table_markdown`), so the two cannot drift apart.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping


def writable_dir(folder: Path) -> bool:
    """A folder this process can create files in (write and search permission)."""
    return folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)


class SettingsError(ValueError):
    """An environment setting has a value the worker cannot use."""


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true/false, got {raw!r}")


def _parse_optional_str(raw: str) -> str | None:
    return raw.strip() or None


def _parse_positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError(f"expected a positive integer, got {raw!r}")
    return value


def _parse_positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError(f"expected a positive number, got {raw!r}")
    return value


def _parse_world_size(raw: str) -> str | int:
    value = raw.strip().lower()
    return value if value == "auto" else _parse_positive_int(value)


def _parse_cidr_list(raw: str) -> str:
    """Checked at start-up (a typo must not surface only when a job downloads); kept as text."""
    import ipaddress

    for part in filter(None, (p.strip() for p in raw.split(","))):
        ipaddress.ip_network(part, strict=False)  # ValueError names the bad range
    return raw.strip()


def _parse_resolution_list(raw: str) -> tuple[str, ...]:
    values = tuple(filter(None, (p.strip().lower() for p in raw.split(","))))
    for value in values:
        if value not in ("480p", "720p"):
            raise ValueError(f"expected a comma-separated list of 480p/720p, got {raw!r}")
    return values


def _one_of(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {raw!r}")
        return value

    return parse


@dataclass(frozen=True)
class Setting:
    env: str
    field: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    secret: bool = False


MiB = 1024 * 1024

SETTINGS: tuple[Setting, ...] = (
    # --- model ---------------------------------------------------------------------------------
    Setting("WAN_S2V_CKPT_DIR", "ckpt_dir", _parse_optional_str, None,
            "Folder holding the Wan2.2-S2V-14B checkpoint. When unset the worker looks in RunPod's "
            "model cache, then the network volume, then the image (see README, 'Weights')."),
    Setting("RUNPOD_HF_CACHE_DIR", "hf_cache_dir", str, "/runpod-volume/huggingface-cache/hub",
            "Hugging Face hub cache that RunPod's cached-model feature fills."),
    Setting("WAN_S2V_DEVICE", "device", _one_of("auto", "cuda", "cpu"), "auto",
            "Where the pipeline runs. 'auto' takes the GPU when there is one and logs a warning when it "
            "falls to the CPU, which is only sensible for the tiny test checkpoint."),
    Setting("WAN_S2V_OFFLOAD", "offload", _parse_bool, False,
            "Keep the text encoder and the DiT on the CPU between uses (fits smaller GPUs, slower). "
            "Off: everything stays resident on the GPU."),
    Setting("WAN_S2V_ATTENTION", "attention", _one_of("auto", "fa3", "sdpa", "flash"), "auto",
            "Attention kernel. 'auto': FlashAttention-3 (the fa3-fwd package) for the DiT on a "
            "Hopper GPU (H100, H200) when it imports, else PyTorch SDPA (cuDNN on Hopper), with "
            "one log line saying why; 'fa3' insists on it (start-up fails without it); 'sdpa' "
            "never uses it. The official modules (T5, frame packing) use flash-attn when it is "
            "installed, else SDPA; 'flash' insists on flash-attn for them."),
    Setting("WAN_S2V_COMPILE", "compile", _parse_bool, True,
            "Compile the DiT blocks with torch.compile (GPU only): about 1.4x faster per step, "
            "same numbers within bfloat16 rounding. The first compilation takes tens of seconds "
            "(see WAN_S2V_WARMUP and TORCH_COMPILE_CACHE_DIR)."),
    Setting("WAN_S2V_AUDIO_ENCODER_DEVICE", "audio_encoder_device", _one_of("gpu", "cpu"), "gpu",
            "Where wav2vec2 encodes the speech: 'gpu' (the pipeline's device; 21 s faster for 4.5 s "
            "of speech) or 'cpu' (as the official code). With 'cpu' and WAN_S2V_COMPILE=false the "
            "output is bit-identical to the official code's."),
    Setting("WAN_S2V_WARMUP", "warmup", _parse_resolution_list, ("480p",),
            "Resolutions run once on blank inputs while the worker starts, so the compilation "
            "happens before the first job ('' for none). One compilation serves every image size."),
    Setting("WAN_S2V_WORLD_SIZE", "world_size", _parse_world_size, "auto",
            "GPUs one job runs on: 'auto' takes every visible CUDA GPU (the most that divide the "
            "DiT's 40 attention heads: 1, 2, 4, 5 or 8), or a number to use fewer. The worker "
            "starts one process per GPU. On a machine without a GPU a number above 1 runs that "
            "many CPU processes (gloo), which is how the tests exercise the multi-GPU code."),
    Setting("WAN_S2V_CFG_PARALLEL", "cfg_parallel", _one_of("auto", "off"), "auto",
            "With several GPUs: 'auto' runs the two guidance branches at once on the two halves "
            "of the GPUs when the count is even and the job is guided, each half splitting the "
            "tokens (Ulysses); 'off' splits every DiT call's tokens over all GPUs."),
    Setting("WAN_S2V_RANK_TIMEOUT_S", "rank_timeout_s", _parse_positive_float, 300.0,
            "With several GPUs: how long a rank may keep the others waiting in a job (one "
            "collective, or the end of a command) before the group is declared failed; the job "
            "then ends with an error and refresh_worker. A rank that exits or raises is reported "
            "at once."),
    Setting("TORCH_COMPILE_CACHE_DIR", "compile_cache_dir", _parse_optional_str, None,
            "Where torch.compile keeps its kernels between workers (default: "
            "<NETWORK_VOLUME_DIR>/torch-compile-cache when the volume is mounted, else "
            "<system temp>/torch-compile-cache). A shared cache turns a new worker's compilation "
            "into a lookup."),
    # --- media intake ----------------------------------------------------------------------------
    Setting("MAX_IMAGE_BYTES", "max_image_bytes", _parse_positive_int, 25 * MiB,
            "Largest image accepted, as downloaded or decoded from base64."),
    Setting("MAX_AUDIO_BYTES", "max_audio_bytes", _parse_positive_int, 100 * MiB,
            "Largest audio file accepted."),
    Setting("MAX_POSE_VIDEO_BYTES", "max_pose_video_bytes", _parse_positive_int, 200 * MiB,
            "Largest pose video accepted."),
    Setting("MAX_AUDIO_SECONDS", "max_audio_seconds", _parse_positive_float, 300.0,
            "Longest audio accepted; the video is as long as the audio."),
    Setting("MIN_AUDIO_SECONDS", "min_audio_seconds", _parse_positive_float, 0.1,
            "Shortest audio accepted."),
    Setting("MAX_AUDIO_CHANNELS", "max_audio_channels", _parse_positive_int, 8,
            "Most channels an audio file may have (8: 7.1 surround). The model hears their mean."),
    Setting("MAX_AUDIO_SAMPLE_RATE", "max_audio_sample_rate", _parse_positive_int, 192_000,
            "Highest audio sample rate accepted, in Hz (at least 4000 is needed). Audio is decoded "
            "as a stream, in bounded memory, whatever its rate; this bounds the decoding work."),
    Setting("DOWNLOAD_TIMEOUT_S", "download_timeout_s", _parse_positive_float, 60.0,
            "Connect and read timeout for each media download."),
    Setting("MAX_REDIRECTS", "max_redirects", int, 5,
            "Redirects followed per media download; each hop's address is checked again."),
    Setting("ALLOWED_PRIVATE_NETWORKS", "allowed_private_networks", _parse_cidr_list, "",
            "Comma-separated CIDR ranges that media URLs, LoRA URLs and the bucket endpoint may "
            "resolve to although they are loopback, private, link-local or reserved (e.g. "
            "10.0.0.0/8 for a private MinIO, 127.0.0.0/8 for local tests). Empty: none."),
    Setting("MAX_IMAGE_PIXELS", "max_image_pixels", _parse_positive_int, 64_000_000,
            "Largest image accepted, in pixels, checked before decoding (decompression bombs)."),
    Setting("MAX_POSE_VIDEO_FRAMES", "max_pose_video_frames", _parse_positive_int, 20_000,
            "Most frames a pose video may have."),
    Setting("MAX_POSE_VIDEO_SIDE", "max_pose_video_side", _parse_positive_int, 4096,
            "Longest side, in pixels, a pose video may have."),
    Setting("MAX_LORA_BYTES", "max_lora_bytes", _parse_positive_int, 2048 * MiB,
            "Largest LoRA file accepted, downloaded or on the network volume."),
    Setting("LORA_CACHE_DIR", "lora_cache_dir", _parse_optional_str, None,
            "Where LoRAs given by URL are kept, named by the URL's sha256 and reused by later jobs "
            "(default: <NETWORK_VOLUME_DIR>/wan-s2v-loras when the volume is mounted, else "
            "<system temp>/wan-s2v-loras). A download enters it only if it reads as a LoRA, and "
            "leaves it if it then fails to load; nothing else is evicted."),
    # --- video ---------------------------------------------------------------------------------
    Setting("VIDEO_CRF", "video_crf", int, 18,
            "x264 constant rate factor of the output (lower is better quality, larger files)."),
    Setting("VIDEO_PRESET", "video_preset", str, "medium", "x264 preset of the output."),
    Setting("VIDEO_AUDIO_BITRATE", "video_audio_bitrate", str, "192k", "AAC bitrate of the muxed audio."),
    # --- storage -------------------------------------------------------------------------------
    Setting("BUCKET_ENDPOINT_URL", "bucket_endpoint_url", _parse_optional_str, None,
            "S3-compatible endpoint (AWS, R2, B2, MinIO, ...). With BUCKET_NAME and keys set, videos "
            "are uploaded and returned as presigned links."),
    Setting("BUCKET_ACCESS_KEY_ID", "bucket_access_key_id", _parse_optional_str, None,
            "Access key of the bucket.", secret=True),
    Setting("BUCKET_SECRET_ACCESS_KEY", "bucket_secret_access_key", _parse_optional_str, None,
            "Secret key of the bucket.", secret=True),
    Setting("BUCKET_NAME", "bucket_name", _parse_optional_str, None, "Bucket the videos go to."),
    Setting("BUCKET_REGION", "bucket_region", str, "us-east-1", "Region used to sign requests."),
    Setting("BUCKET_KEY_PREFIX", "bucket_key_prefix", str, "wan-s2v/",
            "Prefix of every object key the worker writes."),
    Setting("BUCKET_URL_EXPIRY_S", "bucket_url_expiry_s", _parse_positive_int, 24 * 3600,
            "Lifetime of the presigned link returned as video_url (S3 allows at most 7 days)."),
    Setting("BUCKET_ADDRESSING_STYLE", "bucket_addressing_style", _one_of("auto", "path", "virtual"),
            "auto", "How the bucket is named in request URLs. 'auto': virtual-hosted for AWS, path "
            "style for every other endpoint (MinIO, R2, B2, ...); 'virtual' for services that "
            "refuse path style, such as Alibaba OSS."),
    Setting("BUCKET_TIMEOUT_S", "bucket_timeout_s", _parse_positive_float, 30.0,
            "Connect and read timeout of each bucket request."),
    Setting("BUCKET_MAX_ATTEMPTS", "bucket_max_attempts", _parse_positive_int, 3,
            "Tries per bucket request, the first included, before the upload fails."),
    Setting("MAX_INLINE_VIDEO_BYTES", "max_inline_video_bytes", _parse_positive_int, 7 * MiB,
            "Without a bucket, videos up to this size come back as video_base64 (base64 adds a "
            "third; RunPod caps /run results at 10 MB and /runsync at 20 MB)."),
    Setting("NETWORK_VOLUME_DIR", "network_volume_dir", str, "/runpod-volume",
            "Mount point of the network volume; without a bucket, videos too large to inline are "
            "written under <dir>/wan-s2v-outputs/ when it is mounted."),
    # --- worker --------------------------------------------------------------------------------
    Setting("WORK_DIR", "work_dir", _parse_optional_str, None,
            "Parent of each job's temporary folder (default: the system temp folder)."),
    Setting("UNDELIVERED_DIR", "undelivered_dir", _parse_optional_str, None,
            "Where a finished video is kept when no storage could take it (default: "
            "<NETWORK_VOLUME_DIR>/wan-s2v-undelivered when the volume is mounted, else "
            "<system temp>/wan-s2v-undelivered); the job's error names the file."),
    Setting("JOB_TIMEOUT_S", "job_timeout_s", _parse_positive_float, 3600.0,
            "Longest a job may run. A job whose estimated duration (from this worker's measured "
            "seconds per DiT call and per clip) is longer is refused before any model work; past "
            "the limit, sampling stops at the next step and the job ends with an error, but a job "
            "whose sampling has finished delivers its video with a warning. Keep it below "
            "RunPod's execution timeout (README, 'Long jobs')."),
    Setting("PROGRESS_INTERVAL_S", "progress_interval_s", float, 2.0,
            "Least time between two progress updates sent during sampling."),
    Setting("RUNPOD_WEBHOOK_POST_OUTPUT", "runpod_webhook_post_output", _parse_optional_str, None,
            "Set by RunPod on its workers (not by users). Progress updates are sent only where it "
            "is set; local runs have nowhere to send them."),
    Setting("LOG_LEVEL", "log_level", _one_of("debug", "info", "warning", "error"), "info",
            "Level of the worker's own loggers; other libraries log at warning (error when this "
            "is error), since their debug output is for their developers."),
    Setting("RUNPOD_LOG_LEVEL", "runpod_log_level", _one_of("debug", "info", "warn", "error"), "info",
            "Level of the runpod SDK's own log. Its 'debug' prints whole job inputs and outputs "
            "(media as base64, s3Config keys), so it is off unless asked for."),
)


def _settings_fields() -> list[tuple[str, type, dataclasses.Field]]:
    return [(s.field, Any, dataclasses.field(default=s.default)) for s in SETTINGS]


_SettingsBase = dataclasses.make_dataclass("_SettingsBase", _settings_fields(), frozen=True)


class Settings(_SettingsBase):  # type: ignore[misc, valid-type]
    """Typed, immutable view of the environment. Build it with `Settings.from_env()`."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for setting in SETTINGS:
            raw = environ.get(setting.env)
            if raw is None:
                continue
            try:
                values[setting.field] = setting.parse(raw)
            except ValueError as exc:
                raise SettingsError(f"{setting.env}: {exc}") from None
        return cls(**values)

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)

    def worker_folder(self, explicit: str | None, name: str) -> Path:
        """Where a folder that should outlive the job lives (LoRA cache, compile cache, kept
        videos): its own setting when set; else `name` on the network volume when one is mounted
        and writable (it outlives the worker too); else `name` in the system's temporary folder."""
        if explicit:
            return Path(explicit).absolute()
        volume = Path(self.network_volume_dir)
        if writable_dir(volume):
            return volume.absolute() / name
        return Path(tempfile.gettempdir()).absolute() / name

    @property
    def bucket_configured(self) -> bool:
        return bool(self.bucket_name and self.bucket_access_key_id and self.bucket_secret_access_key)

    def __repr__(self) -> str:  # never print secrets, even by accident
        shown = []
        for s in SETTINGS:
            value = getattr(self, s.field)
            shown.append(f"{s.field}={'***' if s.secret and value else value!r}")
        return f"Settings({', '.join(shown)})"


def export_to_libraries(variables: Mapping[str, str], keep_existing: bool = False) -> None:
    """Set environment variables that libraries read for themselves (torch.compile's cache
    folders, NCCL's error handling). keep_existing: a value the deployment set wins. Kept here so
    that this module stays the only one touching the environment."""
    for name, value in variables.items():
        if not (keep_existing and name in os.environ):
            os.environ[name] = value


def settings_table_markdown() -> str:
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for s in SETTINGS:
        default = "unset" if s.default is None else f"`{s.default}`"
        rows.append(f"| `{s.env}` | {default} | {s.help} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python src/s2v_worker/settings.py: the README's settings table
    print(settings_table_markdown())
