"""LoRA files, between media intake and generation: fetch the job's LoRA files (URL cache or the
network volume), read them, and check what they change against the DiT, before any weight changes.
Merging the checked set into the resident weights is lora_merge.py's.

Key layouts: those that ComfyUI's and LightX2V's Wan LoRA loaders read. A key is PREFIX X SUFFIX:
  PREFIX  none, `diffusion_model.`, `model.diffusion_model.`, `model.` or `transformer.`, with X a
          layer of the DiT as it names it (`blocks.0.self_attn.q`); or kohya's `lora_unet_` or
          `lora_unet__`, with X spelled with underscores (`blocks_0_self_attn_q`), mapped back
          through the DiT's own layer names (a spelling two layers share is refused, not guessed).
  SUFFIX  low rank, delta = up @ down times alpha/rank when `X.alpha` is given, else times 1:
            .lora_down.weight + .lora_up.weight        .lora_A.weight + .lora_B.weight
            .lora_A.default.weight + .lora_B.default.weight (PEFT)      .lora_A + .lora_B
            _lora.down.weight + _lora.up.weight        .lora.down.weight + .lora.up.weight
            .lora_linear_layer.down.weight + .lora_linear_layer.up.weight
          full deltas: .diff (X.weight), .diff_b (X.bias), .diff_m (X.modulation: the modulation
          parameter of a block or of the head, which LightX2V's distill LoRAs carry).
Low rank applies to Linear layers and is applied to convolutions too (`patch_embedding` is a
Conv3d): down is [r, in*kt*kh*kw] or conv-shaped [r, in, kt, kh, kw], up is [out, r] or
[out, r, 1, 1, 1], and up @ down reshaped to the kernel's shape [out, in, kt, kh, kw] is the same
linear map on each flattened input patch. Grouped convolutions are refused.

Keys for layers (or tensors) this DiT does not have, such as an I2V LoRA's image branch
(`cross_attn.k_img`, `cross_attn.norm_k_img`, `img_emb.*`), are skipped and reported per LoRA; a
LoRA of which nothing applies is refused. Refused before any weight changes, each with the LoRA's
field and the layer named: a key of no known layout, a tensor stored in a dtype the merge cannot
use, shapes that do not fit a layer the DiT has (a LoRA for another model size), NaN or infinite
values (in the tensors that apply), rank 0, and values so large that the merged change could
overflow float32.

Dtypes: tensors in float8 (e4m3, e5m2), float16, bfloat16, float32 or float64 load, converted to
float32 for the merge (exactly, but for float64 values that float32 cannot hold: those become
infinite and are refused); an `.alpha` may also be an integer. Anything else (float8_e8m0, complex,
integer or bool weights) is refused naming the dtype, from the file's header, before it can enter
the URL cache. The finiteness check runs twice: on each tensor as float32 when the file is parsed
(cheap, before any weight changes), and on every merged value after the products, the sum and the
cast to the weight's dtype (what could still overflow: float32 products of huge factors whose
scale would have brought them back); a failure there restores the base weights before the error.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .errors import JobError
from .job import LORA_STRENGTH_LIMIT, MAX_LORAS, LoraSource
from .net import download
from .settings import FolderSettings, MediaSettings, NetworkSettings

logger = logging.getLogger(__name__)

LORA_CACHE_SUBDIR = "wan-s2v-loras"
KEY_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "model.")  # longest first
KOHYA_PREFIXES = ("lora_unet__", "lora_unet_")  # longest first
LOW_RANK_SUFFIXES = {  # suffix -> (layout, role); the layout names the pair in messages
    ".lora_down.weight": ("lora_down/lora_up", "down"), ".lora_up.weight": ("lora_down/lora_up", "up"),
    ".lora_A.weight": ("lora_A/lora_B", "down"), ".lora_B.weight": ("lora_A/lora_B", "up"),
    ".lora_A.default.weight": ("lora_A/lora_B.default", "down"),
    ".lora_B.default.weight": ("lora_A/lora_B.default", "up"),
    ".lora_A": ("lora_A/lora_B without .weight", "down"),
    ".lora_B": ("lora_A/lora_B without .weight", "up"),
    "_lora.down.weight": ("_lora.down/up", "down"), "_lora.up.weight": ("_lora.down/up", "up"),
    ".lora.down.weight": ("lora.down/up", "down"), ".lora.up.weight": ("lora.down/up", "up"),
    ".lora_linear_layer.down.weight": ("lora_linear_layer.down/up", "down"),
    ".lora_linear_layer.up.weight": ("lora_linear_layer.down/up", "up"),
}
FULL_SUFFIXES = {".diff": "weight", ".diff_b": "bias", ".diff_m": "modulation"}
ALPHA_SUFFIX = ".alpha"
# Longest first: a key is read by the longest suffix it ends with.
SUFFIXES = tuple(sorted((*LOW_RANK_SUFFIXES, *FULL_SUFFIXES, ALPHA_SUFFIX), key=len, reverse=True))
# Safetensors dtype names (as the file's header spells them) the merge reads, each converted to
# float32; an alpha may also be an integer (ComfyUI reads it with .item()).
MERGEABLE_DTYPES = frozenset({"F8_E4M3", "F8_E5M2", "F16", "BF16", "F32", "F64"})
ALPHA_DTYPES = MERGEABLE_DTYPES | {"I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64"}
# The largest change one LoRA may make to one value: the most LoRAs a job may give, each at the
# largest strength, then still sum to a finite float32 (and bfloat16, which has the same range).
MAX_CHANGE = torch.finfo(torch.float32).max / (MAX_LORAS * LORA_STRENGTH_LIMIT)
SKIPPED_NAMES_SHOWN = 3
HASH_CHUNK = 16 * 1024 * 1024


class LoraError(JobError, ValueError):
    """A LoRA cannot be loaded or does not fit the model. The message is safe for the client."""


@dataclass(frozen=True)
class ResolvedLora:
    """A LoRA file on local disk, identified by the sha256 of its bytes."""

    field: str
    path: Path
    identity: str
    strength: float
    cached: bool = False  # in the URL cache, which must drop it if it does not load


@dataclass(frozen=True)
class ParamDelta:
    """A change to one DiT tensor, times `scale`: `up @ down` reshaped to `shape` (low rank), or
    `full`. The tensors stay as the file stores them; `tensor` computes in float32."""

    param: str  # e.g. "blocks.0.self_attn.q.weight"
    scale: float
    shape: tuple[int, ...]
    up: torch.Tensor | None = None  # [out, rank]
    down: torch.Tensor | None = None  # [rank, fan_in]
    full: torch.Tensor | None = None

    def tensor(self, device: torch.device) -> torch.Tensor:
        # Moved in the file's dtype, widened on the device: half the bytes to copy for bf16 files.
        if self.full is not None:
            return self.full.to(device).float() * self.scale
        product = self.up.to(device).float() @ self.down.to(device).float()
        return product.reshape(self.shape) * self.scale


@dataclass(frozen=True)
class ParsedLora:
    """What one LoRA file changes in the DiT, and what it holds for layers the DiT does not have."""

    deltas: tuple[ParamDelta, ...]
    skipped_keys: int = 0
    skipped_layers: tuple[str, ...] = ()  # distinct, in the file's order

    def warning(self, field: str) -> str | None:
        """The line for the job result's `warnings`, None when nothing was skipped."""
        if not self.skipped_keys:
            return None
        shown = [short(name) for name in self.skipped_layers[:SKIPPED_NAMES_SHOWN]]
        if len(self.skipped_layers) > SKIPPED_NAMES_SHOWN:
            shown.append("...")
        return (f"{field}: skipped {self.skipped_keys} key(s) for layers this model does not have "
                f"({', '.join(shown)})")


# --- fetch ---------------------------------------------------------------------------------------

def lora_cache_dir(folders: FolderSettings) -> Path:
    """LORA_CACHE_DIR; else wan-s2v-loras on the network volume if mounted, else in temp."""
    return folders.lasting(folders.lora_cache_dir, LORA_CACHE_SUBDIR)


def _download_cached(source: LoraSource, max_bytes: int, network: NetworkSettings,
                     folders: FolderSettings) -> Path:
    # Named by the URL's hash: no client text in paths, and the same URL is downloaded once.
    folder = lora_cache_dir(folders)
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / f"{hashlib.sha256(source.url.encode()).hexdigest()}.safetensors"
    if dest.is_file():
        logger.info("%s: cached at %s", source.field, dest)
        return dest
    # A unique partial name, renamed at the end, so a cut download never passes as cached.
    handle, partial = tempfile.mkstemp(dir=folder, suffix=".part")
    os.close(handle)
    try:
        size = download(f"{source.field}.url", source.url, Path(partial), max_bytes, network)
        # Only what reads as a LoRA enters the cache, so a URL that served something else (an
        # error page, a model) is fetched again as soon as it serves a LoRA; what needs the model
        # to check is checked at merge time, which drops a cached file that fails (forget_cached).
        check_lora_file(Path(partial), source.field)
        os.replace(partial, dest)
    finally:
        Path(partial).unlink(missing_ok=True)
    logger.info("%s: downloaded %d bytes", source.field, size)
    return dest


def forget_cached(lora: ResolvedLora) -> None:
    """Remove a URL's cached file that did not load, so the next job downloads the URL again."""
    if lora.cached:
        lora.path.unlink(missing_ok=True)
        logger.info("%s: removed from the LoRA cache (it does not load)", lora.field)


def _volume_file(source: LoraSource, max_bytes: int, folders: FolderSettings) -> Path:
    volume = folders.network_volume_dir
    if not volume.is_dir():
        raise LoraError(f"'{source.field}.path' needs a network volume, and none is mounted")
    try:
        volume = volume.resolve()
        # Resolved first: a symlink inside the volume must not lead outside it either.
        path = (volume / source.path).resolve()
        if not path.is_relative_to(volume):
            raise LoraError(f"'{source.field}.path' leads outside the network volume")
        if not path.is_file():
            raise LoraError(f"'{source.field}.path' is not a file on the network volume")
        size = path.stat().st_size
    except (OSError, RuntimeError) as exc:  # a name too long, a symlink loop (RuntimeError on 3.11)
        reason = os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else "a symlink loop"
        raise LoraError(f"'{source.field}.path' cannot be read on the network volume "
                        f"({reason.lower()})") from None
    if size > max_bytes:
        raise LoraError(f"'{source.field}.path' is larger than {max_bytes} bytes "
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


def resolve_loras(sources: Sequence[LoraSource], media: MediaSettings, network: NetworkSettings,
                  folders: FolderSettings) -> list[ResolvedLora]:
    """Each LoRA as a local file with its identity (downloads go through net.download's policy)."""
    resolved = []
    for source in sources:
        path = (_download_cached(source, media.max_lora_bytes, network, folders) if source.url
                else _volume_file(source, media.max_lora_bytes, folders))
        resolved.append(ResolvedLora(source.field, path, file_identity(path), source.strength,
                                     cached=source.url is not None))
    return resolved


# --- parse ---------------------------------------------------------------------------------------

def short(text: str, limit: int = 80) -> str:
    return repr(text) if len(text) <= limit else repr(text[:limit] + "...")


@dataclass(frozen=True)
class _Key:
    """A key of a known layout: its layer as the file spells it, and its suffix."""

    layer: str
    kohya: bool  # the layer is spelled with underscores for dots
    suffix: str


def _strip_prefix(key: str, prefixes: tuple[str, ...]) -> tuple[str, bool]:
    for prefix in prefixes:
        if key.startswith(prefix):
            return key[len(prefix):], True
    return key, False


def _split_key(raw_key: str) -> _Key:
    """The key's layer and suffix; ValueError for a key of no known layout."""
    key, kohya = _strip_prefix(raw_key, KOHYA_PREFIXES)
    if not kohya:
        key, _ = _strip_prefix(key, KEY_PREFIXES)
    for suffix in SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return _Key(key[:-len(suffix)], kohya, suffix)
    raise ValueError(raw_key)


def _key(field: str, raw_key: str) -> _Key:
    try:
        return _split_key(raw_key)
    except ValueError:
        raise LoraError(f"'{field}' has a key of no LoRA layout this worker reads: "
                        f"{short(raw_key)}") from None


class _LayerNames:
    """The DiT's layer names, and the kohya spelling of each (dots as underscores)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.modules = dict(model.named_modules())
        self.kohya: dict[str, list[str]] = {}
        for name in self.modules:
            if name:
                self.kohya.setdefault(name.replace(".", "_"), []).append(name)

    def find(self, misfit: str, key: _Key) -> str | None:
        """The DiT's name of the layer `key` names; None when the DiT has no such layer."""
        if not key.kohya:
            return key.layer if key.layer in self.modules else None
        names = self.kohya.get(key.layer, [])
        if len(names) > 1:  # underscores lose where the dots were: never guess between layers
            raise LoraError(f"{misfit} the kohya name {short(key.layer)} could mean any of "
                            f"{', '.join(short(n) for n in names)}")
        return names[0] if names else None


def check_lora_file(path: Path, field: str) -> None:
    """What can be checked without the model, from the header alone: a readable safetensors file
    with at least one tensor, every key of a known layout, every tensor in a dtype the merge
    reads."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            dtypes = {key: f.get_slice(key).get_dtype() for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError):
        raise LoraError(f"'{field}' is not a readable safetensors file") from None
    if not dtypes:
        raise LoraError(f"'{field}' holds no LoRA weights")
    for raw_key, dtype in dtypes.items():
        key = _key(field, raw_key)
        accepted = ALPHA_DTYPES if key.suffix == ALPHA_SUFFIX else MERGEABLE_DTYPES
        if dtype not in accepted:
            raise LoraError(
                f"'{field}' stores {short(raw_key)} as {dtype}, which a LoRA merge cannot use; "
                "LoRA tensors load in float8 (F8_E4M3, F8_E5M2), F16, BF16, F32 or F64")


def _read_safetensors(lora: ResolvedLora) -> dict[str, torch.Tensor]:
    """The file's tensors as it stores them (converted to float32 where they are used: the checks
    and `ParamDelta.tensor`), after `check_lora_file`'s checks."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_lora_file(lora.path, lora.field)
    try:
        return load_file(str(lora.path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError):
        raise LoraError(f"'{lora.field}' is not a readable safetensors file") from None


def parse_lora(lora: ResolvedLora, noise_model: torch.nn.Module) -> ParsedLora:
    """The file's changes to `noise_model`, each checked to fit it, and the keys it skipped."""
    state = _read_safetensors(lora)
    if not state:
        raise LoraError(f"'{lora.field}' holds no LoRA weights")
    misfit = f"'{lora.field}' does not fit this model:"
    names = _LayerNames(noise_model)
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    skipped: dict[str, int] = {}  # layer as the file spells it -> keys skipped
    for raw_key, tensor in state.items():
        key = _key(lora.field, raw_key)
        layer = names.find(misfit, key)
        if layer is None:
            skipped[key.layer] = skipped.get(key.layer, 0) + 1
            continue
        parts = groups.setdefault(layer, {})
        if key.suffix in parts:  # e.g. the same layer with and without a prefix
            raise LoraError(f"{misfit} its keys {short(parts[key.suffix][0])} and "
                            f"{short(raw_key)} are the same tensor of layer {short(layer)}")
        parts[key.suffix] = (raw_key, tensor)

    deltas = []
    for layer, parts in groups.items():
        changes, absent = _layer_deltas(lora.field, misfit, layer, names.modules[layer], parts)
        deltas += changes
        for name in absent:
            skipped[name] = skipped.get(name, 0) + 1
    if not deltas:
        examples = ", ".join(short(name) for name in list(skipped)[:SKIPPED_NAMES_SHOWN])
        raise LoraError(f"{misfit} none of its {len(state)} keys is for a layer this model has "
                        f"(e.g. {examples})")
    parsed = ParsedLora(tuple(deltas), sum(skipped.values()), tuple(skipped))
    logger.info("%s: %d tensor change(s), %d key(s) skipped, sha256 %s", lora.field, len(deltas),
                parsed.skipped_keys, lora.identity[:12])
    return parsed


def _layer_deltas(field: str, misfit: str, layer: str, module: torch.nn.Module,
                  parts: dict[str, tuple[str, torch.Tensor]]) -> tuple[list[ParamDelta], list[str]]:
    """One layer's changes, and the names of the tensors it gives that the layer does not have."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for suffix, (layout, role) in LOW_RANK_SUFFIXES.items():
        if suffix in parts:
            pairs.setdefault(layout, {})[role] = parts[suffix][1]
    if len(pairs) > 1:
        raise LoraError(f"{misfit} layer {short(layer)} mixes the layouts {' and '.join(sorted(pairs))}")
    alpha = parts[ALPHA_SUFFIX][1] if ALPHA_SUFFIX in parts else None
    if alpha is not None and not pairs:
        raise LoraError(f"{misfit} layer {short(layer)} has an alpha but no low-rank pair")
    deltas = [_low_rank(field, misfit, layer, module, roles, alpha) for roles in pairs.values()]
    absent = []
    for suffix, param in FULL_SUFFIXES.items():
        if suffix not in parts:
            continue
        target = getattr(module, param, None)
        if isinstance(target, torch.Tensor):
            deltas.append(_full(field, misfit, layer, param, target, parts[suffix][1]))
        else:  # e.g. a norm without an affine weight in this model
            absent.append(f"{layer}.{param}")
    return deltas, absent


def _max_abs(field: str, layer: str, part: str, tensor: torch.Tensor) -> float:
    """The largest magnitude of `tensor` as float32, the merge's dtype; a LoraError if any value
    is NaN or infinite there (a float64 value past float32's range included)."""
    if tensor.numel() == 0:
        return 0.0
    peak = float(tensor.float().abs().max())  # max propagates NaN, so one reduction checks both
    if not math.isfinite(peak):
        raise LoraError(f"'{field}' has non-finite values (NaN or infinity) in layer "
                        f"{short(layer)} ({part})")
    return peak


def _too_large(field: str, layer: str) -> LoraError:
    return LoraError(f"'{field}' has values too large to merge in layer {short(layer)}: the "
                     "change could overflow float32")


def _low_rank_weight(misfit: str, layer: str, module: torch.nn.Module) -> torch.Tensor:
    if isinstance(module, torch.nn.Linear):
        return module.weight
    if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
        if module.groups != 1:
            raise LoraError(f"{misfit} {short(layer)} is a grouped convolution, which a low-rank "
                            "LoRA cannot change")
        return module.weight
    raise LoraError(f"{misfit} {short(layer)} is not a Linear or convolution layer")


def _as_matrices(up: torch.Tensor, down: torch.Tensor,
                 weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(up [out, rank], down [rank, fan_in]) for `weight`, conv-shaped factors flattened; None
    when the shapes do not fit it."""
    if weight.dim() > 2 and down.dim() == weight.dim() and down.shape[1:] == weight.shape[1:]:
        down = down.flatten(1)
    if weight.dim() > 2 and up.dim() == weight.dim() and all(s == 1 for s in up.shape[2:]):
        up = up.flatten(1)
    if down.dim() != 2 or up.dim() != 2:
        return None
    if down.shape[1] != weight[0].numel() or tuple(up.shape) != (weight.shape[0], down.shape[0]):
        return None
    return up, down


def _low_rank(field: str, misfit: str, layer: str, module: torch.nn.Module,
              roles: dict[str, torch.Tensor], alpha: torch.Tensor | None) -> ParamDelta:
    if set(roles) != {"down", "up"}:
        raise LoraError(f"{misfit} layer {short(layer)} lacks its {'up' if 'down' in roles else 'down'}"
                        " matrix")
    weight = _low_rank_weight(misfit, layer, module)
    down, up = roles["down"], roles["up"]
    if (down.dim() >= 1 and down.shape[0] == 0) or (up.dim() >= 2 and up.shape[1] == 0):
        raise LoraError(f"'{field}' has rank 0 in layer {short(layer)}")
    matrices = _as_matrices(up, down, weight)
    if matrices is None:
        raise LoraError(f"{misfit} layer {short(layer)} has a weight of shape {tuple(weight.shape)}, "
                        f"the LoRA gives up {tuple(up.shape)} and down {tuple(down.shape)}")
    up, down = matrices
    rank = down.shape[0]
    scale = 1.0
    if alpha is not None:
        if alpha.numel() != 1:
            raise LoraError(f"{misfit} layer {short(layer)} has an alpha that is not one number")
        _max_abs(field, layer, "alpha", alpha)
        scale = float(alpha.float()) / rank
    # |up @ down| <= rank * max|up| * max|down|, entry by entry.
    peak = _max_abs(field, layer, "up", up) * _max_abs(field, layer, "down", down)
    if peak * rank * abs(scale) > MAX_CHANGE:
        raise _too_large(field, layer)
    return ParamDelta(f"{layer}.weight", scale, tuple(weight.shape), up=up, down=down)


def _full(field: str, misfit: str, layer: str, param: str, target: torch.Tensor,
          delta: torch.Tensor) -> ParamDelta:
    if target.shape != delta.shape:
        raise LoraError(f"{misfit} layer {short(layer)} has a {param} of shape "
                        f"{tuple(target.shape)}, the LoRA's delta is {tuple(delta.shape)}")
    if _max_abs(field, layer, f"{param} delta", delta) > MAX_CHANGE:
        raise _too_large(field, layer)
    return ParamDelta(f"{layer}.{param}", 1.0, tuple(target.shape), full=delta)
