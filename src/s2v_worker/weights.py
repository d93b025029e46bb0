"""Reading the model's weights from a checkpoint folder: the DiT's sharded safetensors, tensor by
tensor onto the device (in bfloat16, or its large Linear layers in FP8), and the architecture of the
T5 and VAE files (their widths read from the tensors, so that the tiny test checkpoint goes through
the same code as the real one).

The DiT is built empty (accelerate's `init_empty_weights`: parameters on the meta device) and each
tensor is read straight onto the device and put in place; a Linear weight that is to be FP8 is
quantized there as it arrives. So the device never holds a second copy of the model: the FP8 DiT
(19.2 GiB) loads on a card that could not hold the bfloat16 one (30.4 GiB).
"""
from __future__ import annotations

import json
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from . import comfy
from .checkpoint import T5_CHECKPOINT, VAE_CHECKPOINT, WAV2VEC_DIR, Checkpoint, dit_files
from .float8 import Float8Linear, Float8Weight
from .official import import_official

# The DiT's Linear layers kept in FP8 when its weights are (WAN_S2V_WEIGHTS=fp8): the 40 blocks'
# self-attention, the query and output of their cross-attention, and their feed-forward layers,
# 12.0 of its 16.3 billion parameters. The projections of the text (cross-attention key and value)
# and the audio injectors stay in bfloat16 with the embeddings, norms, modulations, convolutions
# and heads: in FP8 too they moved a 480p forward by 6.8e-2 (FP8 GEMMs) and 5.2e-2 (weight-only),
# without them 5.2e-2 and 3.9e-2 (random weights, H200: bench memory --fp8-variants), at 3.7 GiB
# more memory and little speed (the text's and the audio's keys and values see a few hundred
# tokens; the injectors' other layers are about 5% of a call's GEMM work).
_FLOAT8_LINEAR = re.compile(r"blocks\.\d+\.(self_attn\.[qkvo]|cross_attn\.[qo]|ffn\.\d+)")


def keeps_float8(module_name: str) -> bool:
    """Whether the DiT's Linear `module_name` is kept in FP8 when the weights are."""
    return _FLOAT8_LINEAR.fullmatch(module_name) is not None

# Held while a model is constructed or given its tensors (load_state_dict with assign=True
# registers new parameters). accelerate's `init_empty_weights` (the DiT's empty build) patches
# `torch.nn.Module` for every thread, so a parameter registered in another thread meanwhile (T5,
# the VAE, wav2vec2: loading.load_pipeline loads them at once) would land on the meta device and
# keep no values.
MODEL_CONSTRUCTION = threading.Lock()


@dataclass(frozen=True)
class Float8Recipe:
    """How the DiT's large Linear weights are kept in FP8: per output row or per tensor scales,
    multiplied by FP8 GEMMs ("fp8", compute capability 8.9 or newer) or dequantized to bfloat16
    for the GEMM ("upcast", any GPU)."""

    rowwise: bool = True
    gemm: str = "fp8"


_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
                       "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn,
                       "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
                       "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
READ_CHUNK_BYTES = 64 * 2**20  # one pinned staging buffer (two per reader: read one, copy one)
READERS = 8  # file ranges read at once: a network volume or NVMe serves parallel reads faster


@dataclass(frozen=True)
class _TensorSpan:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offset in the file
    end: int


def _safetensors_spans(path: Path) -> list[_TensorSpan]:
    """The file's tensors and where their bytes are, from its header (safetensors' format: an
    8-byte little-endian header size, a JSON header, then the data), in file order."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    base = 8 + size
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, end = entry["data_offsets"]
        spans.append(_TensorSpan(name, _SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"]),
                                 base + start, base + end))
    return sorted(spans, key=lambda span: span.start)


def _split_by_bytes(spans: list[_TensorSpan], parts: int) -> list[list[_TensorSpan]]:
    """Contiguous runs of spans of about equal bytes (one reader each)."""
    total = sum(span.end - span.start for span in spans) or 1
    runs: list[list[_TensorSpan]] = [[]]
    taken = 0
    for span in spans:
        if runs[-1] and taken >= total * len(runs) / parts:
            runs.append([])
        runs[-1].append(span)
        taken += span.end - span.start
    return runs


class _Reader:
    """Reads spans of a file straight into tensors on `device`: on a GPU through two pinned
    staging buffers on a stream of its own (a chunk is read while the previous one is copied)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.buffers = [torch.empty(READ_CHUNK_BYTES, dtype=torch.uint8, pin_memory=True)
                            for _ in range(2)]
            self.done = [None, None]
            self.stream = torch.cuda.Stream(device)

    def read(self, f, span: _TensorSpan) -> tuple[torch.Tensor, object]:
        """The tensor, and the event its copy completes at (None on the CPU)."""
        out = torch.empty(span.shape, dtype=span.dtype, device=self.device)
        target = out.view(-1).view(torch.uint8) if out.numel() else out.view(torch.uint8)
        if not self.cuda:
            f.seek(span.start)
            f.readinto(memoryview(target.numpy()))
            return out, None
        offset, turn = 0, 0
        length = span.end - span.start
        while offset < length:
            n = min(READ_CHUNK_BYTES, length - offset)
            buffer = self.buffers[turn]
            if self.done[turn] is not None:
                self.done[turn].synchronize()  # its previous copy has left it
            f.seek(span.start + offset)
            f.readinto(memoryview(buffer.numpy())[:n])
            with torch.cuda.stream(self.stream):
                target[offset:offset + n].copy_(buffer[:n], non_blocking=True)
                self.done[turn] = torch.cuda.Event()
                self.done[turn].record(self.stream)
            offset += n
            turn = 1 - turn
        return out, self.done[1 - turn]


def read_safetensors(files: list[Path], device: torch.device, readers: int = READERS,
                     wanted: Callable[[str], bool] | None = None,
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the files (or those `wanted` names), read straight onto `device` by
    `readers` threads at once (each a run of one file's bytes), yielded as each is complete."""
    import queue

    def spans(path: Path) -> list[_TensorSpan]:
        return [span for span in _safetensors_spans(path) if wanted is None or wanted(span.name)]

    runs = [(path, run) for path in files
            for run in _split_by_bytes(spans(path), max(1, readers // len(files))) if run]
    ready: queue.Queue = queue.Queue(maxsize=4 * readers)
    failures: list[BaseException] = []

    def read_runs(assigned: list[tuple[Path, list[_TensorSpan]]]) -> None:
        try:
            reader = _Reader(device)
            for path, run in assigned:
                with open(path, "rb", buffering=0) as f:
                    for span in run:
                        ready.put((span.name, *reader.read(f, span)))
        except BaseException as exc:  # handed to the consuming thread
            failures.append(exc)
        finally:
            ready.put(None)

    threads = [threading.Thread(target=read_runs, args=(runs[i::readers],), daemon=True,
                                name=f"weights-reader-{i}") for i in range(min(readers, len(runs)))]
    for thread in threads:
        thread.start()
    remaining = len(threads)
    while remaining:
        item = ready.get()
        if item is None:
            remaining -= 1
            continue
        name, tensor, copied = item
        if copied is not None:  # the consumer's stream waits for the reader's copy
            torch.cuda.current_stream(device).wait_event(copied)
        yield name, tensor
    if failures:
        raise failures[0]


def load_dit(checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype,
             float8: Float8Recipe | None = None) -> torch.nn.Module:
    """The DiT (`WanModel_S2V`) from the checkpoint's config.json and sharded safetensors (or a
    ComfyUI DiT file), onto `device`: every tensor in `dtype` (float tensors), or with `float8`,
    the large Linear weights in FP8 (`Float8Linear`), quantized on the device as each arrives (a
    scaled-FP8 file's weights kept as they are, with their scales)."""
    if checkpoint.comfy is not None:  # one file, FP8 weights with their scales
        path = checkpoint.comfy.dit
        tensors = comfy.dit_tensors(path, read=lambda wanted: read_safetensors([path], device,
                                                                                wanted=wanted))
    else:
        tensors = ((name, tensor, None) for name, tensor in read_safetensors(
            dit_files(checkpoint.path), device))
    return build_dit(checkpoint.dit_config(), tensors, dtype, float8)


def build_dit(config: dict, tensors: Iterator[tuple[str, torch.Tensor, torch.Tensor | None]],
              dtype: torch.dtype, float8: Float8Recipe | None) -> torch.nn.Module:
    """A `WanModel_S2V` of `config` filled from `tensors`: (official name, tensor on the device, its
    FP8 scale or None). A tensor given with a scale is FP8 already (a scaled-FP8 file): kept so when
    the weights are FP8, dequantized to `dtype` when they are not."""
    from accelerate import init_empty_weights

    with MODEL_CONSTRUCTION, init_empty_weights():
        model = import_official().model_s2v.WanModel_S2V.from_config(config)
    quantized = {name for name, module in model.named_modules()
                 if isinstance(module, torch.nn.Linear) and keeps_float8(name)}
    expected = set(model.state_dict())
    seen: set[str] = set()
    for name, tensor, scale in tensors:
        if name not in expected:
            raise ValueError(f"the DiT has no tensor {name!r} (a checkpoint of another model?)")
        module_name, _, leaf = name.rpartition(".")
        if scale is not None and tensor.dtype != torch.float8_e4m3fn:  # e5m2: requantized here
            tensor, scale = comfy.dequantize(tensor, scale, dtype), None
        if leaf == "weight" and module_name in quantized and float8 is not None:
            # A file's scale is per tensor ([1, 1]: the activation scaled per tensor too) or per
            # output channel ([1, N], as ours).
            stored = (Float8Weight(tensor, scale.float().reshape(1, -1)) if scale is not None
                      else Float8Weight.quantize(tensor, float8.rowwise))
            _replace_linear(model, module_name, stored, float8.gemm)
        else:
            if scale is not None:  # FP8 in the file, bfloat16 (or float32 on the CPU) here
                tensor = comfy.dequantize(tensor, scale, dtype)
            elif tensor.is_floating_point():
                tensor = tensor.to(dtype)
            _set_tensor(model, module_name, leaf, tensor)
        seen.add(name)
    missing = expected - seen
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} tensor(s) of the DiT, e.g. "
                         f"{sorted(missing)[:3]}")
    return model.eval().requires_grad_(False)


def _replace_linear(model: torch.nn.Module, name: str, stored: Float8Weight, gemm: str) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    linear = getattr(parent, child)
    bias = None if linear.bias is None or linear.bias.is_meta else linear.bias.data
    replacement = Float8Linear(stored, bias, gemm)
    if linear.bias is not None and linear.bias.is_meta:
        replacement.bias = linear.bias  # its value arrives later
    setattr(parent, child, replacement)


def _set_tensor(model: torch.nn.Module, module_name: str, leaf: str, tensor: torch.Tensor) -> None:
    module = model.get_submodule(module_name) if module_name else model
    if leaf in module._parameters:
        module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[leaf] = tensor


@dataclass(frozen=True)
class ComponentShapes:
    """The shapes of each model's tensors under the official names, read from the files' headers
    (no tensor loaded): what memory.py counts."""

    dit: dict[str, tuple[int, ...]]
    t5: dict[str, tuple[int, ...]]
    vae_values: int
    wav2vec_values: int


def component_shapes(checkpoint: Checkpoint) -> ComponentShapes:
    files = checkpoint.comfy
    if files is not None:
        return ComponentShapes(
            dit=comfy.dit_shapes(files.dit), t5=comfy.t5_shapes(files.t5),
            vae_values=_values(comfy.read_header(files.vae).tensors.values()),
            wav2vec_values=_values(comfy.read_header(files.wav2vec2).tensors.values()))
    wav2vec_files = sorted((checkpoint.path / WAV2VEC_DIR).glob("*.safetensors"))
    return ComponentShapes(
        dit={name: shape for name, (shape, _) in safetensors_shapes(dit_files(checkpoint.path)).items()},
        t5={name: tuple(t.shape) for name, t in peek_state_dict(checkpoint.path / T5_CHECKPOINT).items()},
        vae_values=sum(t.numel() for t in peek_state_dict(checkpoint.path / VAE_CHECKPOINT).values()),
        wav2vec_values=sum(math.prod(shape) for shape, _ in safetensors_shapes(wav2vec_files).values()))


def _values(header_entries) -> int:
    """The values of a comfy.Header's tensors ((dtype, shape) each)."""
    return sum(math.prod(shape) for _, shape in header_entries)


def safetensors_shapes(files: list[Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype) of every tensor of the files, from their headers."""
    from safetensors import safe_open

    shapes = {}
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                piece = f.get_slice(key)
                shapes[key] = (tuple(piece.get_shape()), piece.get_dtype())
    return shapes


def is_float8_linear(name: str, shape: tuple[int, ...]) -> bool:
    """Whether a DiT tensor is a Linear weight kept in FP8 when the weights are."""
    module, _, leaf = name.rpartition(".")
    return leaf == "weight" and len(shape) == 2 and keeps_float8(module)


def dit_bytes(shapes: dict[str, tuple[int, ...]], float8: Float8Recipe | None) -> tuple[int, int]:
    """(the whole DiT's bytes, its blocks' bytes) on the GPU, in bfloat16 or FP8 form."""
    total = blocks = 0
    for name, shape in shapes.items():
        numel = math.prod(shape)
        if float8 is not None and is_float8_linear(name, shape):
            size = numel + 4 * (shape[0] if float8.rowwise else 1)
        else:
            size = 2 * numel
        total += size
        blocks += size if name.startswith("blocks.") else 0
    return total, blocks


def module_bytes(shapes: dict[str, tuple[int, ...]], element_size: int) -> tuple[dict[str, int], int]:
    """(bytes by top-level module at `element_size` per value, the number of `blocks.N`)."""
    by_module: dict[str, int] = {}
    for name, shape in shapes.items():
        top = name.split(".")[0]
        by_module[top] = by_module.get(top, 0) + math.prod(shape) * element_size
    return by_module, len({name.split(".")[1] for name in shapes if name.startswith("blocks.")})


def dit_memory_bytes(model: torch.nn.Module) -> int:
    """The bytes the DiT's tensors take where they are."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def infer_t5_architecture(state_dict: dict[str, torch.Tensor]) -> dict[str, int]:
    """The `umt5_xxl` builder arguments that match a T5 encoder state dict (full size: umt5-xxl)."""
    vocab_size, dim = state_dict["token_embedding.weight"].shape
    num_buckets, num_heads = state_dict["blocks.0.pos_embedding.embedding.weight"].shape
    return dict(
        vocab_size=vocab_size, dim=dim,
        dim_attn=state_dict["blocks.0.attn.q.weight"].shape[0],
        dim_ffn=state_dict["blocks.0.ffn.fc1.weight"].shape[0],
        num_heads=num_heads, num_buckets=num_buckets,
        encoder_layers=len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")}),
    )


def infer_vae_width(state_dict: dict[str, torch.Tensor]) -> int:
    return state_dict["encoder.conv1.weight"].shape[0]


def peek_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A `.pth` state dict, memory-mapped: only the shapes are read (the official classes load the
    tensors afterwards)."""
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
