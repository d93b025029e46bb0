"""Keeping a set of LoRAs merged into the resident DiT (`LoraManager`), with exact restores.

Merging (W += strength * scale * up @ down) costs one pass over the touched layers, while sampling
with a separate LoRA branch would cost every step of every job; so the set stays merged for as long
as the following jobs ask for the same set. The base weights of every touched tensor are kept as
exact copies taken before its first change (on the GPU when it has memory to spare, else in pinned
host memory); restoring copies them back, so the base model is bit-identical whatever was merged
before. What a LoRA file changes, and the checks before any weight changes, are lora.py's.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .float8 import Float8Linear, Float8Weight
from .lora import LoraError, ParamDelta, ParsedLora, ResolvedLora, forget_cached, parse_lora, short

logger = logging.getLogger(__name__)

# GPU memory a merge leaves free when it keeps base copies on the GPU: the activations of a 720p
# job, fast mode's FP8 copies and the VAE's decode fit in it (H200: the 26.6 GB of base copies of
# a full LoRA stay on the GPU; an 80 GB GPU keeps them in host memory).
GPU_RESERVE_BYTES = 40 * 2**30


def spare_gpu_bytes(device: torch.device) -> int:
    """GPU memory a merge may fill with base copies when no memory plan says: what the card has
    free beyond GPU_RESERVE_BYTES."""
    free, _ = torch.cuda.mem_get_info(device)
    return free - GPU_RESERVE_BYTES


def _base_copy(weight: torch.Tensor, spare: Callable[[torch.device], int]) -> torch.Tensor:
    """An exact copy of a weight before its first change. On a GPU with memory to spare (`spare`)
    it stays there (a device copy: the first LoRA merge of the 14B DiT measured 27 s with its
    copies going to pageable host memory); else it goes to pinned host memory, asynchronously
    (the change that follows is queued behind it on the same stream)."""
    if not weight.is_cuda:
        return weight.detach().clone()
    if spare(weight.device) >= weight.nbytes:
        return weight.detach().clone()
    host = torch.empty(weight.shape, dtype=weight.dtype, pin_memory=True)
    return host.copy_(weight.detach(), non_blocking=True)


@dataclass(frozen=True)
class LoraSet:
    """A job's LoRAs, parsed and checked against the DiT (`LoraManager.load`), ready to merge."""

    wanted: tuple[tuple[str, float], ...]  # (identity, strength) of each, in order
    parsed: tuple[tuple[ResolvedLora, ParsedLora], ...]


class LoraManager:
    """Keeps one LoRA set merged into `noise_model`; restores the exact base weights on a change."""

    def __init__(self, noise_model: torch.nn.Module,
                 on_change: Callable[[], None] | None = None,
                 spare: Callable[[torch.device], int] = spare_gpu_bytes) -> None:
        self.noise_model = noise_model
        self.spare = spare  # GPU bytes the base copies may take (the memory plan's, or free)
        # Called whenever the weights may have changed (e.g. to drop copies derived from them).
        self.on_change = on_change
        self.base: dict[str, torch.Tensor] = {}  # exact copies, taken on first touch
        self.current: tuple[tuple[str, float], ...] = ()
        self.warnings: tuple[str, ...] = ()  # the merged set's skipped keys, one line per LoRA
        self.merges = 0  # sets merged so far (tests check that a repeated set is not re-merged)

    def load(self, loras: Sequence[ResolvedLora]) -> LoraSet | None:
        """Parse and check `loras` against the DiT without changing any weight; None when that
        set is merged already. A file that fails here leaves the URL cache."""
        wanted = tuple((lora.identity, lora.strength) for lora in loras)
        if wanted == self.current:
            return None
        return LoraSet(wanted, tuple((lora, self._parse(lora)) for lora in loras))

    def merge(self, loras: LoraSet | None) -> bool:
        """Make a loaded set the merged one; False when there was nothing to do (None)."""
        if loras is None:
            return False
        try:
            self.restore()
            self._merge(loras.parsed)
        except BaseException:
            self.restore()  # never leave half a set merged
            raise
        finally:
            if self.on_change is not None:
                self.on_change()
        self.current = loras.wanted
        self.warnings = tuple(line for lora, result in loras.parsed
                              if (line := result.warning(lora.field)) is not None)
        self.merges += 1
        logger.info("merged %d LoRA(s): %s", len(loras.parsed),
                    ", ".join(f"{lora.field} {lora.identity[:12]} x{lora.strength:g}"
                              for lora, _ in loras.parsed))
        return True

    def apply(self, loras: Sequence[ResolvedLora]) -> bool:
        """`load`, then `merge`: make `loras` (in order) the merged set; False when it already was."""
        return self.merge(self.load(loras))

    def restore(self) -> None:
        """Copy every touched tensor's base value back (bit-identical)."""
        with torch.no_grad():
            for name, base in self.base.items():
                fp8 = self._float8_linear(name)
                if fp8 is not None:  # the base FP8 values and scale
                    fp8.set_stored(Float8Weight(*base))
                    continue
                target = self.noise_model.get_parameter(name)
                target.copy_(base.to(target.device))
        if self.current:
            logger.info("restored the base weights of %d tensor(s)", len(self.base))
        self.current, self.warnings = (), ()

    def _parse(self, lora: ResolvedLora) -> ParsedLora:
        try:
            return parse_lora(lora, self.noise_model)
        except BaseException:  # a LoraError, or a bug: either way the file did not load
            forget_cached(lora)
            raise

    def _merge(self, parsed: Sequence[tuple[ResolvedLora, ParsedLora]]) -> None:
        # Deltas of one tensor are summed in float32 and added once, so a bf16 weight is rounded
        # once, whatever the number of LoRAs. One tensor at a time: float32 sums for every layer
        # of the 14B DiT at once would take about 56 GB of GPU memory.
        by_param: dict[str, list[tuple[ParamDelta, float, ResolvedLora]]] = {}
        for lora, result in parsed:
            for delta in result.deltas:
                by_param.setdefault(delta.param, []).append((delta, lora.strength, lora))
        finite: list[torch.Tensor] = []  # per tensor, whether every merged value is finite
        with torch.no_grad():
            for name, changes in by_param.items():
                target = self.noise_model.get_parameter(name)
                total = changes[0][0].tensor(target.device) * changes[0][1]
                for delta, strength, _ in changes[1:]:
                    total += delta.tensor(target.device) * strength
                fp8 = self._float8_linear(name)
                if fp8 is not None:
                    # FP8 weights: the change is added to the dequantized weight, and the sum is
                    # quantized again with scales of the same kind; the base values and scale
                    # are kept exactly for the restore.
                    stored = Float8Weight(fp8.weight.data, fp8.scale)
                    if name not in self.base:
                        self.base[name] = (_base_copy(stored.weight, self.spare),
                                           _base_copy(stored.scale, self.spare))
                    merged = stored.dequantize(torch.float32) + total
                    finite.append(torch.isfinite(merged).all())
                    fp8.set_stored(Float8Weight.quantize(merged, rowwise=stored.rowwise))
                    continue
                if name not in self.base:
                    self.base[name] = _base_copy(target, self.spare)
                target.copy_((target.float() + total).to(target.dtype))
                # Checked on what was written (after the products, the sum and the cast), with no
                # wait for the GPU per tensor: the flags are read once, below.
                finite.append(torch.isfinite(target).all())
            if finite and not bool(torch.stack(finite).all()):
                name = next(n for n, ok in zip(by_param, torch.stack(finite).tolist()) if not ok)
                involved = list(dict.fromkeys(lora for _, _, lora in by_param[name]))
                for lora in involved:
                    forget_cached(lora)
                fields = " and ".join(f"'{lora.field}'" for lora in involved)
                raise LoraError(f"{fields} {'has' if len(involved) == 1 else 'have'} values too "
                                f"large to merge in layer {short(name.rsplit('.', 1)[0])}: the "
                                "merged weights would not be finite")
            copies = [t for base in self.base.values()
                      for t in (base if isinstance(base, tuple) else (base,))]
            if any(t.is_pinned() for t in copies):
                torch.cuda.synchronize()  # the copies to pinned host memory have landed

    def _float8_linear(self, name: str) -> Float8Linear | None:
        """The Float8Linear whose weight `name` is (its FP8 values take a LoRA their own way)."""
        module_name, _, leaf = name.rpartition(".")
        module = self.noise_model.get_submodule(module_name)
        return module if leaf == "weight" and isinstance(module, Float8Linear) else None
