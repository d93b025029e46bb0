"""Finding the Wan2.2-S2V-14B checkpoint and reading what it declares about itself.

Search order (the first folder that holds a complete checkpoint wins):
1. `WAN_S2V_CKPT_DIR`, when set. A set but incomplete folder is an error, never skipped.
2. RunPod's cached model: `<RUNPOD_HF_CACHE_DIR>/models--Wan-AI--Wan2.2-S2V-14B/snapshots/<rev>/`,
   the revision `refs/main` names first, then the others.
3. A network volume: `<NETWORK_VOLUME_DIR>/models/Wan2.2-S2V-14B`, `<NETWORK_VOLUME_DIR>/Wan2.2-S2V-14B`.
4. Weights baked into the image: `/models/Wan2.2-S2V-14B` (Dockerfile's BAKE_WEIGHTS build).
5. ComfyUI's files on a network volume: `<NETWORK_VOLUME_DIR>/ComfyUI/models`,
   `<NETWORK_VOLUME_DIR>/models` (the layout of RunPod's ComfyUI workers), each searched as
   comfy.find_comfy_files does.

A folder is either the official repository's layout or a ComfyUI set (comfy.py): the S2V DiT,
umt5-xxl, the Wan 2.1 VAE and wav2vec2 as single safetensors files, in bf16, fp16 or scaled FP8.
Of a ComfyUI set the worker reads the DiT and T5 from their files; the VAE, the tokenizer and
wav2vec2 are first written once in the official form (`prepare_checkpoint`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .resolutions import RESOLUTIONS
from .settings import FolderSettings, ModelSettings

if TYPE_CHECKING:
    from .comfy import ComfyFiles

# comfy.py (and torch with it) is imported where a ComfyUI set is looked at, not here: the
# read-ahead (read_ahead.py) finds an official checkpoint before the worker imports torch.

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
COMFY_VOLUME_DIRS = ("ComfyUI/models", "models")  # under NETWORK_VOLUME_DIR
COMFY_PREPARED_SUBDIR = "wan-s2v-comfyui"  # the official forms of a ComfyUI set's small parts
PREPARED_MARKER = "prepared.json"  # written last: the folder is complete


class CheckpointNotFound(RuntimeError):
    """No complete checkpoint where the worker looked; the message lists every place."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    # The largest pixel area of each resolution: the official ones, unless a tiny test checkpoint
    # declares its own (its videos are a few latent patches wide).
    max_area: dict[str, int] = field(default_factory=lambda: dict(RESOLUTIONS))
    random_weights: bool = False
    # A ComfyUI set: its four files, and the folder its VAE, tokenizer and wav2vec2 were written
    # to in the official form (prepare_checkpoint). None: the official layout, all in `path`.
    comfy: ComfyFiles | None = None
    prepared: Path | None = None

    @property
    def layout(self) -> str:
        return "official" if self.comfy is None else "ComfyUI files"

    def dit_config(self) -> dict:
        """WanModel_S2V's constructor arguments: config.json, or read from a ComfyUI DiT file."""
        if self.comfy is not None:
            from . import comfy

            return comfy.dit_config(self.comfy.dit)
        return json.loads((self.path / DIT_CONFIG).read_text())

    @property
    def dit_heads(self) -> int:
        """The DiT's attention heads, which bound how far its tokens can be split over GPUs
        (parallel.py); the official default when the config does not say."""
        return int(self.dit_config().get("num_heads", DEFAULT_DIT_HEADS))

    def _official_part(self, name: str) -> Path:
        if self.comfy is None:
            return self.path / name
        if self.prepared is None:
            raise RuntimeError("a ComfyUI set's parts are read after prepare_checkpoint")
        return self.prepared / name

    @property
    def t5_tokenizer_dir(self) -> Path:
        return self._official_part(T5_TOKENIZER_DIR)

    @property
    def vae_file(self) -> Path:
        return self._official_part(VAE_CHECKPOINT)

    @property
    def wav2vec_dir(self) -> Path:
        return self._official_part(WAV2VEC_DIR)


def missing_entries(folder: Path) -> list[str]:
    missing = [name for name in REQUIRED_ENTRIES if not (folder / name).exists()]
    if not (folder / DIT_INDEX).is_file() and not (folder / DIT_SINGLE_FILE).is_file():
        missing.append(f"{DIT_INDEX} (or {DIT_SINGLE_FILE})")
    return missing


def dit_files(folder: Path) -> list[Path]:
    """The DiT's safetensors files, as the checkpoint's index lists them."""
    index = folder / DIT_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    return [folder / DIT_SINGLE_FILE]


def large_files(checkpoint: Checkpoint) -> list[Path]:
    """The files the loaders read, in the order the start-up needs them: the DiT (its compilation
    follows it), T5, the VAE, wav2vec2."""
    if checkpoint.comfy is not None:
        files = checkpoint.comfy
        return [files.dit, files.t5, files.vae, files.wav2vec2]
    wav2vec = checkpoint.path / WAV2VEC_DIR
    # transformers reads model.safetensors where there is one, else pytorch_model.bin
    weights = sorted(wav2vec.glob("*.safetensors")) or sorted(wav2vec.glob("*.bin"))
    return [*dit_files(checkpoint.path), checkpoint.path / T5_CHECKPOINT,
            checkpoint.path / VAE_CHECKPOINT, *weights]


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


def read_checkpoint(folder: Path, files: ComfyFiles | None = None) -> Checkpoint:
    """Describe a complete checkpoint folder (official, or with `files` a ComfyUI set), applying a
    tiny test checkpoint's declarations."""
    marker = folder / TINY_MARKER
    if not marker.is_file():
        return Checkpoint(path=folder, comfy=files)
    declared = json.loads(marker.read_text())
    logger.warning("checkpoint %s holds random weights (%s): its videos are noise", folder, TINY_MARKER)
    return Checkpoint(path=folder, max_area={**RESOLUTIONS, **declared.get("max_area", {})},
                      random_weights=bool(declared.get("random_weights", True)), comfy=files)


def _comfy_files(folder: Path, required: bool) -> ComfyFiles | None:
    from . import comfy

    try:
        return comfy.find_comfy_files(folder, required=required)
    except comfy.ComfyFilesError as error:
        raise CheckpointNotFound(str(error)) from None


def find_checkpoint(model: ModelSettings, folders: FolderSettings) -> Checkpoint:
    if model.ckpt_dir:
        folder = model.ckpt_dir
        missing = missing_entries(folder)
        if not missing:
            return read_checkpoint(folder)
        files = _comfy_files(folder, required=False)
        if files is not None:
            return read_checkpoint(folder, files)
        from . import comfy

        raise CheckpointNotFound(
            f"WAN_S2V_CKPT_DIR={folder} is neither a complete {REPO_ID} checkpoint (missing: "
            f"{', '.join(missing)}) nor a folder of ComfyUI's files (no Wan2.2-S2V diffusion "
            f"model file in it or its diffusion_models/). {comfy.expected_files()}")

    looked = []
    for folder in candidate_dirs(model, folders):
        missing = missing_entries(folder)
        if not missing:
            logger.info("checkpoint found at %s", folder)
            return read_checkpoint(folder)
        looked.append(f"{folder} ({'absent' if not folder.exists() else 'missing ' + ', '.join(missing)})")
    for folder in (folders.network_volume_dir / name for name in COMFY_VOLUME_DIRS):
        files = _comfy_files(folder, required=False)
        if files is not None:
            logger.info("ComfyUI files found in %s", folder)
            return read_checkpoint(folder, files)
        looked.append(f"{folder} (no ComfyUI Wan2.2-S2V files)")
    raise CheckpointNotFound(
        f"no {REPO_ID} checkpoint found. Set WAN_S2V_CKPT_DIR (the official folder or one with "
        f"ComfyUI's files), or enable RunPod's cached model for {REPO_ID}, or put either on the "
        f"network volume. Looked in: " + "; ".join(looked))


def prepare_checkpoint(checkpoint: Checkpoint, folders: FolderSettings) -> Checkpoint:
    """A ComfyUI set's VAE, T5 tokenizer and wav2vec2 written in the official form (the VAE as a
    float32 .pth, the tokenizer and wav2vec2 as the folders transformers loads), once: in a folder
    named by the files' identity, on the network volume when one is mounted, so that later
    workers find them. The official layout is returned as it is."""
    if checkpoint.comfy is None:
        return checkpoint
    files = checkpoint.comfy
    sources = [[str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns]
               for path in (files.t5, files.vae, files.wav2vec2)]
    digest = hashlib.sha256(json.dumps(sources).encode()).hexdigest()[:16]
    folder = folders.lasting(None, COMFY_PREPARED_SUBDIR) / digest
    if not (folder / PREPARED_MARKER).is_file():
        import torch

        from . import comfy

        logger.info("writing the VAE, tokenizer and wav2vec2 of the ComfyUI files to %s", folder)
        # Written aside and renamed whole: other workers may share the volume.
        partial = folder.with_name(f"{folder.name}.partial-{uuid.uuid4().hex[:8]}")
        partial.mkdir(parents=True)
        try:
            torch.save(comfy.vae_state_dict(files.vae), partial / VAE_CHECKPOINT)
            comfy.write_t5_tokenizer(files.t5, partial / T5_TOKENIZER_DIR)
            comfy.wav2vec2_folder(files.wav2vec2, partial / WAV2VEC_DIR)
        except comfy.ComfyFilesError as error:
            shutil.rmtree(partial, ignore_errors=True)
            raise CheckpointNotFound(str(error)) from None
        (partial / PREPARED_MARKER).write_text(json.dumps({"sources": sources}, indent=1))
        try:
            partial.rename(folder)
        except OSError:  # another worker was quicker: the folder is there, whole
            shutil.rmtree(partial, ignore_errors=True)
    return replace(checkpoint, prepared=folder)
