"""LoRA stage, between media intake and generation: fetch the job's LoRA files, check them against
the DiT, and keep that set merged into the resident weights.

Merging (W += strength * scale * up @ down) costs one pass over the touched layers, while sampling
with a separate LoRA branch would cost every step of every job; so the set stays merged for as long
as the following jobs ask for the same set. The base weights of every touched tensor are kept as
exact CPU copies taken before its first change; restoring copies them back, so the base model is
bit-identical whatever was merged before.

Accepted formats (the common Wan ones), with or without a `diffusion_model.` or
`model.diffusion_model.` prefix on every key:
  X.lora_down.weight + X.lora_up.weight (+ optional X.alpha: scale = alpha / rank)
  X.lora_A.weight + X.lora_B.weight (+ optional X.alpha, else scale 1)
  X.diff (a full weight delta) and X.diff_b (a bias delta), which distillation LoRAs carry for norms
where X names a layer of the DiT, e.g. `blocks.0.self_attn.q`.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .job import LoraSource
from .media import download
from .settings import Settings

logger = logging.getLogger(__name__)

LORA_CACHE_SUBDIR = "wan-s2v-loras"
KEY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")  # longest first
LOW_RANK_SUFFIXES = {  # suffix -> (pair name, role)
    ".lora_down.weight": ("down_up", "down"), ".lora_up.weight": ("down_up", "up"),
    ".lora_A.weight": ("a_b", "down"), ".lora_B.weight": ("a_b", "up"),
}
FULL_SUFFIXES = {".diff": "weight", ".diff_b": "bias"}
ALPHA_SUFFIX = ".alpha"
HASH_CHUNK = 16 * 1024 * 1024


class LoraError(ValueError):
    """A LoRA cannot be loaded or does not fit the model. The message is safe for the client."""


@dataclass(frozen=True)
class ResolvedLora:
    """A LoRA file on local disk, identified by the sha256 of its bytes."""

    field: str
    path: Path
    identity: str
    strength: float


@dataclass(frozen=True)
class ParamDelta:
    """A change to one DiT tensor: `up @ down` (low rank) or `full`, times `scale`, in float32."""

    param: str  # e.g. "blocks.0.self_attn.q.weight"
    scale: float
    up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    full: torch.Tensor | None = None

    def tensor(self, device: torch.device) -> torch.Tensor:
        if self.full is not None:
            return self.full.to(device) * self.scale
        return (self.up.to(device) @ self.down.to(device)) * self.scale


# --- fetch ---------------------------------------------------------------------------------------

def lora_cache_dir(settings: Settings) -> Path:
    """LORA_CACHE_DIR; else wan-s2v-loras on the network volume if mounted, else in temp."""
    if settings.lora_cache_dir:
        return Path(settings.lora_cache_dir).absolute()
    volume = Path(settings.network_volume_dir)
    if volume.is_dir() and os.access(volume, os.W_OK):
        return volume.absolute() / LORA_CACHE_SUBDIR
    return Path(tempfile.gettempdir()).absolute() / LORA_CACHE_SUBDIR


def _download_cached(source: LoraSource, settings: Settings) -> Path:
    # Named by the URL's hash: no client text in paths, and the same URL is downloaded once.
    folder = lora_cache_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / f"{hashlib.sha256(source.url.encode()).hexdigest()}.safetensors"
    if dest.is_file():
        logger.info("%s: cached at %s", source.field, dest)
        return dest
    # A unique partial name, renamed at the end, so a cut download never passes as cached.
    handle, partial = tempfile.mkstemp(dir=folder, suffix=".part")
    os.close(handle)
    try:
        size = download(f"{source.field}.url", source.url, Path(partial), settings.max_lora_bytes,
                        settings)
        os.replace(partial, dest)
    finally:
        Path(partial).unlink(missing_ok=True)
    logger.info("%s: downloaded %d bytes", source.field, size)
    return dest


def _volume_file(source: LoraSource, settings: Settings) -> Path:
    volume = Path(settings.network_volume_dir)
    if not volume.is_dir():
        raise LoraError(f"'{source.field}.path' needs a network volume, and none is mounted")
    volume = volume.resolve()
    # Resolved first: a symlink inside the volume must not lead outside it either.
    path = (volume / source.path).resolve()
    if not path.is_relative_to(volume):
        raise LoraError(f"'{source.field}.path' leads outside the network volume")
    if not path.is_file():
        raise LoraError(f"'{source.field}.path' is not a file on the network volume")
    if path.stat().st_size > settings.max_lora_bytes:
        raise LoraError(f"'{source.field}.path' is larger than {settings.max_lora_bytes} bytes "
                        "(MAX_LORA_BYTES)")
    return path


_identity_cache: dict[tuple[str, int, int], str] = {}


def file_identity(path: Path) -> str:
    """sha256 of the file's bytes, remembered per (path, size, mtime) so a resident set costs no
    re-hash of gigabytes on every job."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _identity_cache:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                digest.update(chunk)
        _identity_cache[key] = digest.hexdigest()
    return _identity_cache[key]


def resolve_loras(sources: Sequence[LoraSource], settings: Settings) -> list[ResolvedLora]:
    """Each LoRA as a local file with its identity (downloads go through media.download's policy)."""
    resolved = []
    for source in sources:
        path = _download_cached(source, settings) if source.url else _volume_file(source, settings)
        resolved.append(ResolvedLora(source.field, path, file_identity(path), source.strength))
    return resolved


# --- parse ---------------------------------------------------------------------------------------

def _short(text: str, limit: int = 80) -> str:
    return repr(text) if len(text) <= limit else repr(text[:limit] + "...")


def _strip_prefix(key: str) -> str:
    for prefix in KEY_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _split_key(key: str) -> tuple[str, str]:
    """(layer name, suffix) for a recognised key."""
    for suffix in (*LOW_RANK_SUFFIXES, *FULL_SUFFIXES, ALPHA_SUFFIX):
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[:-len(suffix)], suffix
    raise ValueError(key)


def _read_safetensors(lora: ResolvedLora) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(lora.path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError):
        raise LoraError(f"'{lora.field}' is not a readable safetensors file") from None


def parse_lora(lora: ResolvedLora, noise_model: torch.nn.Module) -> list[ParamDelta]:
    """The file's changes to `noise_model`, checked to fit it (every layer exists, shapes match)."""
    state = _read_safetensors(lora)
    misfit = f"'{lora.field}' does not fit this model:"
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for raw_key, tensor in state.items():
        try:
            layer, suffix = _split_key(_strip_prefix(raw_key))
        except ValueError:
            raise LoraError(f"{misfit} unrecognised key {_short(raw_key)}") from None
        groups.setdefault(layer, {})[suffix] = tensor
    if not groups:
        raise LoraError(f"'{lora.field}' holds no LoRA weights")

    deltas = []
    for layer, parts in groups.items():
        try:
            module = noise_model.get_submodule(layer)
        except AttributeError:
            raise LoraError(f"{misfit} it has no layer {_short(layer)}") from None
        alpha = parts.get(ALPHA_SUFFIX)
        pairs = {}
        for suffix, (pair, role) in LOW_RANK_SUFFIXES.items():
            if suffix in parts:
                pairs.setdefault(pair, {})[role] = parts[suffix].float()
        if len(pairs) > 1:
            raise LoraError(f"{misfit} layer {_short(layer)} mixes lora_down/up and lora_A/B")
        for roles in pairs.values():
            deltas.append(_low_rank(misfit, layer, module, roles, alpha))
        for suffix, param in FULL_SUFFIXES.items():
            if suffix in parts:
                deltas.append(_full(misfit, layer, module, param, parts[suffix].float()))
        if not pairs and not any(s in parts for s in FULL_SUFFIXES):
            raise LoraError(f"{misfit} layer {_short(layer)} has an alpha but no weights")
    logger.info("%s: %d tensor change(s), sha256 %s", lora.field, len(deltas), lora.identity[:12])
    return deltas


def _low_rank(misfit: str, layer: str, module: torch.nn.Module, roles: dict[str, torch.Tensor],
              alpha: torch.Tensor | None) -> ParamDelta:
    if set(roles) != {"down", "up"}:
        raise LoraError(f"{misfit} layer {_short(layer)} lacks its {'up' if 'down' in roles else 'down'}"
                        " matrix")
    if not isinstance(module, torch.nn.Linear):
        raise LoraError(f"{misfit} {_short(layer)} is not a Linear layer")
    down, up = roles["down"], roles["up"]
    rank = down.shape[0] if down.dim() == 2 else -1
    if down.dim() != 2 or up.dim() != 2 or up.shape[1] != rank \
            or down.shape[1] != module.in_features or up.shape[0] != module.out_features:
        raise LoraError(f"{misfit} layer {_short(layer)} is {module.out_features}x"
                        f"{module.in_features}, the LoRA gives {tuple(up.shape)} @ {tuple(down.shape)}")
    scale = 1.0
    if alpha is not None:
        if alpha.numel() != 1:
            raise LoraError(f"{misfit} layer {_short(layer)} has an alpha that is not one number")
        scale = float(alpha) / rank
    return ParamDelta(f"{layer}.weight", scale, up=up, down=down)


def _full(misfit: str, layer: str, module: torch.nn.Module, param: str,
          delta: torch.Tensor) -> ParamDelta:
    target = getattr(module, param, None)
    if not isinstance(target, torch.Tensor) or target.shape != delta.shape:
        raise LoraError(f"{misfit} layer {_short(layer)} has no {param} of shape "
                        f"{tuple(delta.shape)}")
    return ParamDelta(f"{layer}.{param}", 1.0, full=delta)


# --- merge ---------------------------------------------------------------------------------------

class LoraManager:
    """Keeps one LoRA set merged into `noise_model`; restores the exact base weights on a change."""

    def __init__(self, noise_model: torch.nn.Module,
                 on_change: Callable[[], None] | None = None) -> None:
        self.noise_model = noise_model
        # Called whenever the weights may have changed (e.g. to drop copies derived from them).
        self.on_change = on_change
        self.base: dict[str, torch.Tensor] = {}  # exact CPU copies, taken on first touch
        self.current: tuple[tuple[str, float], ...] = ()
        self.merges = 0  # sets merged so far (tests check that a repeated set is not re-merged)

    def apply(self, loras: Sequence[ResolvedLora]) -> bool:
        """Make `loras` (in order) the merged set; False when it already was (nothing done)."""
        wanted = tuple((lora.identity, lora.strength) for lora in loras)
        if wanted == self.current:
            return False
        # Parsed (and checked) before anything changes: a LoRA that does not fit leaves the
        # merged set as it was.
        parsed = [(lora, parse_lora(lora, self.noise_model)) for lora in loras]
        try:
            self.restore()
            self._merge(parsed)
        except BaseException:
            self.restore()  # never leave half a set merged
            raise
        finally:
            if self.on_change is not None:
                self.on_change()
        self.current = wanted
        self.merges += 1
        logger.info("merged %d LoRA(s): %s", len(loras),
                    ", ".join(f"{lora.field} {lora.identity[:12]} x{lora.strength:g}" for lora in loras))
        return True

    def restore(self) -> None:
        """Copy every touched tensor's base value back (bit-identical)."""
        with torch.no_grad():
            for name, base in self.base.items():
                target = self.noise_model.get_parameter(name)
                target.copy_(base.to(target.device))
        if self.current:
            logger.info("restored the base weights of %d tensor(s)", len(self.base))
        self.current = ()

    def _merge(self, parsed: list[tuple[ResolvedLora, list[ParamDelta]]]) -> None:
        # Deltas of one tensor are summed in float32 and added once, so a bf16 weight is rounded
        # once, whatever the number of LoRAs.
        totals: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for lora, deltas in parsed:
                for delta in deltas:
                    target = self.noise_model.get_parameter(delta.param)
                    change = delta.tensor(target.device) * lora.strength
                    totals[delta.param] = totals[delta.param] + change if delta.param in totals \
                        else change
            for name, change in totals.items():
                target = self.noise_model.get_parameter(name)
                if name not in self.base:
                    self.base[name] = target.detach().to("cpu", copy=True)
                target.copy_((target.float() + change).to(target.dtype))
