"""Finding the Wan2.2-S2V-14B checkpoint and reading what it declares about itself.

Search order (the first folder that holds a complete checkpoint wins):
1. `WAN_S2V_CKPT_DIR`, when set. A set but incomplete folder is an error, never skipped.
2. RunPod's cached model: `<RUNPOD_HF_CACHE_DIR>/models--Wan-AI--Wan2.2-S2V-14B/snapshots/<rev>/`,
   the revision `refs/main` names first, then the others.
3. A network volume: `<NETWORK_VOLUME_DIR>/models/Wan2.2-S2V-14B`, `<NETWORK_VOLUME_DIR>/Wan2.2-S2V-14B`.
4. Weights baked into the image: `/models/Wan2.2-S2V-14B` (Dockerfile's BAKE_WEIGHTS build).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from .resolutions import RESOLUTIONS
from .settings import FolderSettings, ModelSettings

logger = logging.getLogger(__name__)

REPO_ID = "Wan-AI/Wan2.2-S2V-14B"
IMAGE_CHECKPOINT_DIR = Path("/models/Wan2.2-S2V-14B")
TINY_MARKER = "tiny-checkpoint.json"

# Files and folders of the official repository the worker reads (names from wan/configs/wan_s2v_14B.py).
T5_CHECKPOINT = "models_t5_umt5-xxl-enc-bf16.pth"
T5_TOKENIZER_DIR = "google/umt5-xxl"
VAE_CHECKPOINT = "Wan2.1_VAE.pth"
WAV2VEC_DIR = "wav2vec2-large-xlsr-53-english"
DIT_CONFIG = "config.json"
DIT_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DIT_SINGLE_FILE = "diffusion_pytorch_model.safetensors"
REQUIRED_ENTRIES = (DIT_CONFIG, T5_CHECKPOINT, VAE_CHECKPOINT, T5_TOKENIZER_DIR, WAV2VEC_DIR)


DEFAULT_DIT_HEADS = 40  # WanModel_S2V's default, and Wan2.2-S2V-14B's


class CheckpointNotFound(RuntimeError):
    """No complete checkpoint where the worker looked; the message lists every place."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    # The largest pixel area of each resolution: the official ones, unless a tiny test checkpoint
    # declares its own (its videos are a few latent patches wide).
    max_area: dict[str, int] = field(default_factory=lambda: dict(RESOLUTIONS))
    random_weights: bool = False

    @property
    def dit_heads(self) -> int:
        """The DiT's attention heads (config.json), which bound how far its tokens can be split
        over GPUs (parallel.py); the official default when the config does not say."""
        config = json.loads((self.path / DIT_CONFIG).read_text())
        return int(config.get("num_heads", DEFAULT_DIT_HEADS))


def missing_entries(folder: Path) -> list[str]:
    missing = [name for name in REQUIRED_ENTRIES if not (folder / name).exists()]
    if not (folder / DIT_INDEX).is_file() and not (folder / DIT_SINGLE_FILE).is_file():
        missing.append(f"{DIT_INDEX} (or {DIT_SINGLE_FILE})")
    return missing


def _hf_cache_snapshots(hf_cache_dir: Path) -> list[Path]:
    repo_dir = hf_cache_dir / f"models--{REPO_ID.replace('/', '--')}"
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir():
        return [snapshots]
    ordered = []
    main_ref = repo_dir / "refs" / "main"
    if main_ref.is_file():
        ordered.append(snapshots / main_ref.read_text().strip())
    ordered += sorted((p for p in snapshots.iterdir() if p not in ordered),
                      key=lambda p: p.stat().st_mtime, reverse=True)
    return ordered


def candidate_dirs(model: ModelSettings, folders: FolderSettings) -> list[Path]:
    volume = folders.network_volume_dir
    return [*_hf_cache_snapshots(model.hf_cache_dir),
            volume / "models" / "Wan2.2-S2V-14B", volume / "Wan2.2-S2V-14B", IMAGE_CHECKPOINT_DIR]


def read_checkpoint(folder: Path) -> Checkpoint:
    """Describe a complete checkpoint folder, applying a tiny test checkpoint's declarations."""
    marker = folder / TINY_MARKER
    if not marker.is_file():
        return Checkpoint(path=folder)
    declared = json.loads(marker.read_text())
    logger.warning("checkpoint %s holds random weights (%s): its videos are noise", folder, TINY_MARKER)
    return Checkpoint(path=folder, max_area={**RESOLUTIONS, **declared.get("max_area", {})},
                      random_weights=bool(declared.get("random_weights", True)))


def find_checkpoint(model: ModelSettings, folders: FolderSettings) -> Checkpoint:
    if model.ckpt_dir:
        folder = model.ckpt_dir
        missing = missing_entries(folder)
        if missing:
            raise CheckpointNotFound(
                f"WAN_S2V_CKPT_DIR={folder} is not a complete {REPO_ID} checkpoint; "
                f"missing: {', '.join(missing)}")
        return read_checkpoint(folder)

    looked = []
    for folder in candidate_dirs(model, folders):
        missing = missing_entries(folder)
        if not missing:
            logger.info("checkpoint found at %s", folder)
            return read_checkpoint(folder)
        looked.append(f"{folder} ({'absent' if not folder.exists() else 'missing ' + ', '.join(missing)})")
    raise CheckpointNotFound(
        f"no {REPO_ID} checkpoint found. Set WAN_S2V_CKPT_DIR, or enable RunPod's cached model "
        f"for {REPO_ID}, or put it on the network volume. Looked in: " + "; ".join(looked))
