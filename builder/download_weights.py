"""Download the Wan2.2-S2V-14B checkpoint files the worker needs into one folder.

    python builder/download_weights.py DEST [--revision REV]

Used by the Dockerfile when the image is built with `--build-arg BAKE_WEIGHTS=1`, and by hand to
fill a network volume. Only the files the S2V pipeline loads are fetched (about 46 GB instead of the
whole repository, which also holds example media and duplicate encoder formats).

The Hugging Face token is optional (the repository is public; a token lifts rate limits). It is read
from the BuildKit secret file /run/secrets/hf_token when present, else from HF_TOKEN. It is never
logged or printed.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Mapping, Sequence

logger = logging.getLogger("s2v_worker.builder.download_weights")

REPO_ID = "Wan-AI/Wan2.2-S2V-14B"

# The one pinned revision of the weights. This is the commit of Wan-AI/Wan2.2-S2V-14B that other
# projects pin for these weights; change it here (and in the Dockerfile's WAN_S2V_REVISION default,
# which a test keeps equal to this) only after checking the new commit's files with the worker.
DEFAULT_REVISION = "dab4e9c55bbe4c8c4d03db1c2c98c7f0ac9c454b"

# Exactly what wan/speech2video.py and wan/configs/wan_s2v_14B.py load from the checkpoint folder.
ALLOW_PATTERNS: tuple[str, ...] = (
    "config.json",                                  # DiT (WanModel_S2V) config
    "diffusion_pytorch_model*.safetensors",         # DiT shards
    "diffusion_pytorch_model.safetensors.index.json",
    "models_t5_umt5-xxl-enc-bf16.pth",              # umT5-XXL text encoder
    "google/umt5-xxl/*",                            # its tokenizer
    "Wan2.1_VAE.pth",                               # VAE
    "wav2vec2-large-xlsr-53-english/*",             # audio encoder + processor
)

# Formats of the audio encoder that PyTorch never reads.
IGNORE_PATTERNS: tuple[str, ...] = ("*.msgpack", "*.h5", "*.onnx")

SECRET_TOKEN_FILE = Path("/run/secrets/hf_token")

# Files that must be present after a download (shards are read from the index).
REQUIRED_FILES: tuple[str, ...] = (
    "config.json",
    "diffusion_pytorch_model.safetensors.index.json",
    "models_t5_umt5-xxl-enc-bf16.pth",
    "Wan2.1_VAE.pth",
)
REQUIRED_DIRS: tuple[str, ...] = ("google/umt5-xxl", "wav2vec2-large-xlsr-53-english")


class DownloadError(RuntimeError):
    """The checkpoint could not be downloaded or is incomplete."""


def read_token(secret_file: Path = SECRET_TOKEN_FILE,
               environ: Mapping[str, str] | None = None) -> str | None:
    """The Hugging Face token: the BuildKit secret file first, then HF_TOKEN; None when neither."""
    environ = os.environ if environ is None else environ
    try:
        token = secret_file.read_text(encoding="utf-8").strip()
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        token = ""
    if token:
        logger.info("using the Hugging Face token from the build secret")
        return token
    token = (environ.get("HF_TOKEN") or "").strip()
    if token:
        logger.info("using the Hugging Face token from HF_TOKEN")
        return token
    logger.info("no Hugging Face token given; downloading anonymously")
    return None


def missing_files(dest: Path) -> list[str]:
    """Relative paths the worker needs that are absent from `dest` (empty when complete)."""
    missing = [name for name in REQUIRED_FILES if not (dest / name).is_file()]
    missing += [name + "/" for name in REQUIRED_DIRS
                if not (dest / name).is_dir() or not any((dest / name).iterdir())]
    index = dest / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, AttributeError):
            missing.append(f"{index.name} (unreadable)")
        else:
            missing += [shard for shard in shards if not (dest / shard).is_file()]
    return missing


def download(dest: Path, revision: str = DEFAULT_REVISION, token: str | None = None) -> Path:
    """Fetch the allow-listed files of REPO_ID at `revision` into `dest` and check them."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise DownloadError("HF_HUB_OFFLINE is set; unset it to download the weights")
    from huggingface_hub import snapshot_download  # imported here so tests need no network

    dest.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s@%s into %s", REPO_ID, revision, dest)
    try:
        snapshot_download(
            repo_id=REPO_ID,
            revision=revision,
            local_dir=str(dest),
            allow_patterns=list(ALLOW_PATTERNS),
            ignore_patterns=list(IGNORE_PATTERNS),
            token=token if token else False,  # False: never fall back to a stored login
        )
    except Exception as exc:  # huggingface_hub raises many types; report them all the same way
        raise DownloadError(
            f"download of {REPO_ID}@{revision} failed: {type(exc).__name__}: {exc}") from exc
    missing = missing_files(dest)
    if missing:
        raise DownloadError(f"checkpoint in {dest} is incomplete, missing: {', '.join(missing)}")
    (dest / ".wan_s2v_revision").write_text(f"{REPO_ID}@{revision}\n", encoding="utf-8")
    logger.info("checkpoint complete in %s", dest)
    return dest


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=f"Download the {REPO_ID} files the worker needs.")
    parser.add_argument("dest", type=Path, help="folder to write the checkpoint into")
    parser.add_argument("--revision", default=DEFAULT_REVISION,
                        help=f"commit hash (or branch) of {REPO_ID} (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        download(args.dest, args.revision, read_token())
    except DownloadError as exc:
        logger.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
