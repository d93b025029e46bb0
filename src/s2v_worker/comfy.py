"""Reading the ComfyUI and kijai files of Wan2.2-S2V-14B into what the official classes load.

People who use ComfyUI hold the model as four single safetensors files rather than the official
repository's folder: Comfy-Org's repackaged set, each file in bf16, fp16 or "fp8_scaled", and
kijai's fp8_scaled DiT in its place. This module finds such a set in a folder, telling the files
apart by the names in their headers (never by the file names, which users change), and reads each
into the official module's names:

- the DiT (wan2.2_s2v_14B_fp8_scaled / _bf16): the official names, prefixed
  `model.diffusion_model.` or bare (kijai); `dit_config`, `dit_tensors`;
- the T5 (umt5_xxl_fp8_e4m3fn_scaled / _fp16): transformers' UMT5 names, the tokenizer in a
  `spiece_model` tensor; `t5_state_dict`, `write_t5_tokenizer`;
- the VAE (wan_2.1_vae): the official names; `vae_state_dict`;
- wav2vec2 (wav2vec2_large_english_fp16): transformers' names, with a `wav2vec2.` prefix or bare,
  and no config; `wav2vec2_folder`.

The mappings are those of ComfyUI's loaders (comfy/model_detection.py, comfy/text_encoders/t5.py,
comfy/audio_encoders/wav2vec2.py) and kijai's (ComfyUI-WanVideoWrapper, nodes_model_loading.py):
the DiT and VAE need no renaming, the T5 is renamed block by block, and the sizes the files do not
state are read from the tensors' shapes as those loaders read them.

Scaled FP8 (ComfyUI's `scaled_fp8` format; `weight_scale` is its newer spelling of `scale_weight`):
a weight stored in float8 with a float32 scale beside it, per tensor (per output channel is read
too); the real weight is `weight.float() * scale`. The `scaled_fp8` marker and the `scale_input`s,
which only ComfyUI's FP8 matmuls use, are dropped. Other quantized formats are refused by name.

Over 500 lines on purpose: it is the one place that knows the foreign layouts (finding a set
and reading each of its four files share the same key maps and header reader); the worker's
own modules only see the official names it gives back.
"""
from __future__ import annotations

import importlib
import inspect
import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import torch

from .official import import_official

logger = logging.getLogger(__name__)


class ComfyFilesError(RuntimeError):
    """A ComfyUI file set that cannot be used: a file missing, two for one role, a file that is
    none of the four, or one in a format the worker does not read. The message names the files
    and what was expected.

    (Its own class rather than checkpoint.CheckpointNotFound, so that checkpoint.py, which looks
    for these sets, can import this module without an import circle.)"""


class Role(NamedTuple):
    name: str
    title: str
    folder: str  # where ComfyUI keeps it, under models/
    typical: tuple[str, ...]  # the file names people download


ROLES = (
    Role("dit", "the S2V diffusion model", "diffusion_models/",
         ("wan2.2_s2v_14B_fp8_scaled.safetensors", "wan2.2_s2v_14B_bf16.safetensors",
          "Wan2_2-S2V-14B_fp8_e4m3fn_scaled_KJ.safetensors")),
    Role("t5", "the umt5-xxl text encoder", "text_encoders/",
         ("umt5_xxl_fp8_e4m3fn_scaled.safetensors", "umt5_xxl_fp16.safetensors")),
    Role("vae", "the Wan 2.1 VAE", "vae/", ("wan_2.1_vae.safetensors",)),
    Role("wav2vec2", "the wav2vec2 audio encoder", "audio_encoders/",
         ("wav2vec2_large_english_fp16.safetensors",)),
)
# ComfyUI's model folders for these roles (it lists them recursively); unet/ and clip/ are the
# older names of diffusion_models/ and text_encoders/.
SUBFOLDERS = ("diffusion_models", "unet", "text_encoders", "clip", "vae", "audio_encoders")

DIT_PREFIXES = ("model.diffusion_model.", "model.", "")  # ComfyUI saves the first; kijai strips both
DIT_KEYS = ("casual_audio_encoder.encoder.final_linear.weight",  # ComfyUI's S2V test ("casual" sic)
            "audio_injector.injector.0.k.weight")  # kijai's
FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)
FLOAT8_FORMATS = ("float8_e4m3fn", "float8_e5m2")
SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
DROPPED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")
MARKER = "scaled_fp8"

# The official S2V-14B config's audio injection layers (wan/configs/wan_s2v_14B.py), the only
# 12-of-40 pattern there is; ComfyUI hard-codes the same list.
OFFICIAL_INJECT_LAYERS = [0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39]
DIT_HEAD_DIM = 128  # ComfyUI's Wan loader: num_heads = dim // 128
WAV2VEC_HEAD_DIM = 64  # wav2vec2 large: 1024 / 16 heads, base: 768 / 12


# --- headers and classification -----------------------------------------------------------------

@dataclass(frozen=True)
class Header:
    """A safetensors file's table of contents: each tensor's dtype name ("BF16", "F8_E4M3", ...)
    and shape, and the file's metadata. Read without loading a tensor."""

    tensors: dict[str, tuple[str, tuple[int, ...]]]
    metadata: dict[str, str]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name][1]

    def storage(self) -> str:
        """How the weights are stored, for logs: "fp8_scaled", "bf16", "fp16", "fp32"."""
        elements: Counter[str] = Counter()
        for dtype, shape in self.tensors.values():
            elements[dtype] += math.prod(shape)
        if any(dtype.startswith("F8") for dtype in elements):
            return "fp8_scaled" if any(n.endswith(SCALE_SUFFIXES) for n in self.tensors) else "fp8"
        floats = [d for d, _ in elements.most_common() if d in ("BF16", "F16", "F32")]
        return {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}.get(floats[0] if floats else "", "?")


def read_header(path: Path) -> Header:
    """The header of a safetensors file (safe_open maps the file and reads only the header)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt", device="cpu") as file:
        tensors = {}
        for name in file.keys():
            piece = file.get_slice(name)
            tensors[name] = (piece.get_dtype(), tuple(piece.get_shape()))
        return Header(tensors, dict(file.metadata() or {}))


@dataclass(frozen=True)
class Classified:
    """What one file is: a role's name, or None with the reason it is none of them (foreign)."""

    path: Path
    role: str | None
    note: str  # a role's file: how it is stored; a foreign file: why it is not one


def dit_prefix(names) -> str | None:
    """The prefix of a Wan2.2-S2V DiT file's keys ("" for bare keys); None: not such a file."""
    for prefix in DIT_PREFIXES:
        if any(prefix + key in names for key in DIT_KEYS):
            return prefix
    return None


def wav2vec2_prefix(names) -> str | None:
    """The prefix of a wav2vec2 file's keys: "wav2vec2." (Wav2Vec2ForCTC's names) or "" (ComfyUI's
    bare Wav2Vec2Model names); None: not such a file."""
    for prefix in ("wav2vec2.", ""):
        if {prefix + "encoder.layer_norm.bias",
                prefix + "feature_extractor.conv_layers.0.conv.weight"} <= names:
            return prefix
    return None


def _what_it_is(header: Header) -> tuple[str | None, str]:
    names = header.tensors.keys()
    if dit_prefix(names) is not None:
        return "dit", header.storage()
    if any(name.endswith("head.modulation") for name in names):
        return None, "a Wan diffusion model, but not the S2V one (no casual_audio_encoder or audio_injector)"
    if {"shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight"} <= names:
        if ("encoder.block.1.layer.0.SelfAttention.q.weight" in names and
                "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" not in names):
            return None, ("a T5 encoder, but not umt5 (one position bias for all blocks: "
                          "T5 v1.1, as Flux and SD3 use)")
        if header.shape("shared.weight")[1] != 4096:
            return None, f"a umt5 encoder {header.shape('shared.weight')[1]} wide; S2V needs umt5-xxl (4096)"
        if "spiece_model" not in names:
            return None, "a umt5 encoder without its tokenizer (no spiece_model tensor)"
        return "t5", header.storage()
    if {"encoder.conv1.weight", "decoder.conv1.weight", "conv2.weight",
            "decoder.middle.0.residual.0.gamma"} <= names:
        channels = header.shape("conv2.weight")[0]
        if channels != 16:
            return None, (f"a Wan VAE with {channels} latent channels (Wan2.2's); "
                          f"S2V uses the Wan 2.1 VAE (16)")
        return "vae", header.storage()
    if wav2vec2_prefix(names) is not None:
        return "wav2vec2", header.storage()
    return None, "none of the four models' tensors"


def classify_file(path: Path) -> Classified:
    """What a safetensors file is, from the names, dtypes and shapes in its header."""
    try:
        header = read_header(path)
    except Exception as error:  # safetensors raises its own error type for a damaged header
        return Classified(path, None, f"not a readable safetensors file ({error})")
    return Classified(path, *_what_it_is(header))


# --- finding the set -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ComfyFiles:
    """The four files of a ComfyUI-layout S2V set."""

    dit: Path
    t5: Path
    vae: Path
    wav2vec2: Path


def candidate_files(folder: Path) -> list[Path]:
    """The safetensors files in `folder` itself and anywhere under its ComfyUI model folders,
    each once (unet/ is often a link to diffusion_models/)."""
    found = sorted(folder.glob("*.safetensors"))
    for sub in SUBFOLDERS:
        if (folder / sub).is_dir():
            found += sorted((folder / sub).rglob("*.safetensors"))
    unique: dict[Path, Path] = {}
    for path in found:
        if path.is_file():
            unique.setdefault(path.resolve(), path)
    return list(unique.values())


def find_comfy_files(folder: Path, required: bool = False) -> ComfyFiles | None:
    """The ComfyUI / kijai set in `folder` (a ComfyUI `models` folder, or one folder holding the
    four files), so that the worker can start from the files ComfyUI users already have.

    None when there is no S2V DiT file (the folder is not such a set), unless `required` (the user
    named this folder): then that is an error too. A set with a role missing, or two files for one
    role, raises ComfyFilesError naming what was found, what is missing, and the files that are
    none of the four.
    """
    if not folder.is_dir():
        if required:
            raise ComfyFilesError(f"{folder} is not a folder. {expected_files()}")
        return None
    classified = [classify_file(path) for path in candidate_files(folder)]
    by_role = {role.name: [c for c in classified if c.role == role.name] for role in ROLES}
    foreign = [c for c in classified if c.role is None]
    for c in classified:
        logger.debug("%s: %s (%s)", c.path, c.role or "foreign", c.note)
    if not by_role["dit"] and not required:
        if any(by_role.values()):
            logger.info("%s holds ComfyUI model files but no Wan2.2-S2V DiT", folder)
        return None

    problems = []
    for role in ROLES:
        files = by_role[role.name]
        if not files:
            problems.append(f"missing {role.title} ({' or '.join(role.typical)}, in {role.folder})")
        elif len(files) > 1:
            problems.append(f"{len(files)} files are {role.title}: "
                            f"{', '.join(_shown(c, folder) for c in files)}; keep one")
    if problems:
        found = [f"{_shown(c, folder)} ({role.title}, {c.note})"
                 for role in ROLES for c in by_role[role.name]]
        message = (f"{folder} is not a complete ComfyUI Wan2.2-S2V set: {'; '.join(problems)}. "
                   f"Found: {', '.join(found) or 'nothing usable'}.")
        if foreign:
            shown = [f"{_shown(c, folder)} ({c.note})" for c in foreign[:10]]
            more = f" and {len(foreign) - 10} more" if len(foreign) > 10 else ""
            message += f" Not used: {', '.join(shown)}{more}."
        raise ComfyFilesError(message + " " + expected_files())
    files = ComfyFiles(**{role.name: by_role[role.name][0].path for role in ROLES})
    logger.info("ComfyUI set in %s: %s", folder, ", ".join(
        f"{role.name} {_shown(by_role[role.name][0], folder)} ({by_role[role.name][0].note})"
        for role in ROLES))
    return files


def expected_files() -> str:
    """The four files a set needs, with their usual names: for error messages."""
    return "Expected: " + "; ".join(f"{role.title} in {role.folder} ({' or '.join(role.typical)})"
                                    for role in ROLES) + "."


def _shown(c: Classified, folder: Path) -> str:
    try:
        return str(c.path.relative_to(folder))
    except ValueError:
        return str(c.path)


# --- tensors and scales ----------------------------------------------------------------------------

def dequantize(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """A stored weight as `dtype`: an FP8 weight times its scale (computed in float32, as ComfyUI
    dequantizes), any other weight only cast. The scale is per tensor (shape [] or [1]) or per
    output channel ([out] or [out, 1])."""
    if scale is None:
        return weight.to(dtype)
    scale = scale.to(torch.float32)
    if scale.numel() == 1:
        scale = scale.reshape(())
    elif scale.numel() == weight.shape[0]:
        scale = scale.reshape(-1, *([1] * (weight.dim() - 1)))
    else:
        raise ValueError(f"a scale of shape {tuple(scale.shape)} for a weight of shape {tuple(weight.shape)}")
    return (weight.to(torch.float32) * scale).to(dtype)


def _check_quantization(path: Path, file, names: set[str]) -> None:
    """Refuse the newer ComfyUI quantized formats that are not plain scaled FP8 (nvfp4, int8, ...):
    their layers say so in `<layer>.comfy_quant` tensors or the `_quantization_metadata` header."""
    formats = set()
    for name in names:
        if name.endswith(".comfy_quant"):
            formats.add(json.loads(bytes(file.get_tensor(name).tolist()).decode("utf-8")).get("format"))
    metadata = (file.metadata() or {}).get("_quantization_metadata")
    if metadata:
        formats.update(layer.get("format") for layer in json.loads(metadata).get("layers", {}).values())
    unknown = sorted(str(f) for f in formats if f not in FLOAT8_FORMATS)
    if unknown:
        raise ComfyFilesError(f"{path}: quantized as {', '.join(unknown)}, which the worker does not "
                              f"read; use the bf16, fp16 or fp8_scaled file")


class _Layout:
    """How one file stores its tensors: which to read (the prefix's, less the `scaled_fp8` marker,
    the input scales and the weight scales), and the scale that goes with each weight. The scales
    are a few floats: read with the header."""

    def __init__(self, path: Path, prefix: str = "") -> None:
        from safetensors import safe_open

        self.path, self.prefix = path, prefix
        with safe_open(str(path), "pt", device="cpu") as file:
            self.names = list(file.keys())
            _check_quantization(path, file, set(self.names))
            self.scales = {name: file.get_tensor(name) for name in self.names
                           if name.startswith(prefix) and name.endswith(SCALE_SUFFIXES)}
        self.skipped = sum(not name.startswith(prefix) for name in self.names)

    def wanted(self, name: str) -> bool:
        return name.startswith(self.prefix) and _is_weight(name[len(self.prefix):])

    def entry(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor, torch.Tensor | None]:
        """(name less the prefix, tensor, its scale or None, on the tensor's device). An FP8
        tensor without a scale gets 1 (plain FP8)."""
        short = name[len(self.prefix):]
        base = name[:-len(".weight")] if name.endswith(".weight") else name
        scale = next((self.scales[base + suffix] for suffix in SCALE_SUFFIXES
                      if base + suffix in self.scales), None)
        if scale is None and tensor.dtype in FLOAT8:
            scale = torch.ones((), dtype=torch.float32)
        if not (tensor.is_floating_point() or short == "spiece_model"):
            raise ComfyFilesError(f"{self.path}: tensor {name} is {tensor.dtype}, a quantized format "
                                  f"the worker does not read; use the bf16, fp16 or fp8_scaled file")
        return short, tensor, None if scale is None else scale.to(tensor.device)


# A reader of a file's tensors: (wanted names) -> (name, tensor) of each, in any order, on the
# device it reads onto (weights.read_safetensors reads with several threads).
TensorReader = Callable[[Callable[[str], bool]], Iterator[tuple[str, torch.Tensor]]]


def _stored_tensors(path: Path, prefix: str = "", read: TensorReader | None = None,
                    ) -> Iterator[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """(name less `prefix`, tensor, its scale or None), one tensor at a time, markers and input
    scales dropped; read by `read`, else one by one onto the CPU."""
    from safetensors import safe_open

    layout = _Layout(path, prefix)
    if layout.skipped:
        logger.info("%s: %d tensors outside the prefix %r ignored", path, layout.skipped, prefix)
    if read is not None:
        for name, tensor in read(layout.wanted):
            yield layout.entry(name, tensor)
        return
    with safe_open(str(path), "pt", device="cpu") as file:
        for name in layout.names:
            if layout.wanted(name):
                yield layout.entry(name, file.get_tensor(name))


# --- DiT -------------------------------------------------------------------------------------------

def dit_tensors(path: Path, read: TensorReader | None = None,
                ) -> Iterator[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """The DiT file's tensors as (official WanModel_S2V name, stored tensor, scale or None), one at
    a time, so that the caller can dequantize (`dequantize`) or keep FP8 layer by layer without a
    second copy of the model; read by `read` (weights.read_safetensors: onto the GPU, by several
    threads), else one by one onto the CPU. The prefix is stripped, the `scaled_fp8` marker and
    the `scale_input`s dropped; an FP8 weight comes with its `scale_weight` (or `weight_scale`)."""
    prefix = dit_prefix(read_header(path).tensors.keys())
    if prefix is None:
        raise ComfyFilesError(f"{path} is not a Wan2.2-S2V diffusion model file. {expected_files()}")
    yield from _stored_tensors(path, prefix, read)


def dit_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The DiT's tensors' shapes under their official names, from the header: what it takes on
    the GPU (memory.py)."""
    header = read_header(path)
    prefix = dit_prefix(header.tensors.keys()) or ""
    return {name[len(prefix):]: shape for name, (_, shape) in header.tensors.items()
            if name.startswith(prefix) and _is_weight(name[len(prefix):])}


def _is_weight(short: str) -> bool:
    """Whether a tensor (its name less the prefix) is part of the model, not a marker or scale."""
    return short != MARKER and not short.endswith(DROPPED_SUFFIXES + SCALE_SUFFIXES)


def dit_config(path: Path) -> dict:
    """WanModel_S2V's constructor arguments for a DiT file, which carries no config: the keys of
    the official config.json, the sizes read from the tensors' shapes (num_heads as ComfyUI reads
    it, dim // 128), the rest from the official S2V-14B config."""
    header = read_header(path)
    prefix = dit_prefix(header.tensors.keys())
    if prefix is None:
        raise ComfyFilesError(f"{path} is not a Wan2.2-S2V diffusion model file. {expected_files()}")
    shapes = {name[len(prefix):]: shape for name, (_, shape) in header.tensors.items()
              if name.startswith(prefix)}
    try:
        return _dit_config(shapes)
    except KeyError as error:
        raise ComfyFilesError(f"{path}: not a whole Wan2.2-S2V DiT (no tensor {error})") from error
    except ValueError as error:
        raise ComfyFilesError(f"{path}: cannot read the DiT's architecture from its tensors "
                              f"({error})") from error


def _count(shapes: dict, pattern: str) -> int:
    return len({match[1] for name in shapes if (match := re.match(pattern, name))})


def _dit_config(shapes: dict[str, tuple[int, ...]]) -> dict:
    official = import_official()
    transformer = official.config.transformer
    signature = inspect.signature(official.model_s2v.WanModel_S2V.__init__)

    def class_default(name: str):
        return signature.parameters[name].default

    dim = shapes["head.modulation"][-1]
    if dim % DIT_HEAD_DIM:
        raise ValueError(f"width {dim} is not a multiple of the head size {DIT_HEAD_DIM}")
    patch = shapes["patch_embedding.weight"][2:]
    if tuple(patch) != tuple(transformer.patch_size):
        raise ValueError(f"patch size {tuple(patch)}, not {tuple(transformer.patch_size)}")
    text_dim = shapes["text_embedding.0.weight"][1]
    if text_dim != class_default("text_dim"):
        raise ValueError(f"text width {text_dim}, not {class_default('text_dim')}")
    num_layers = _count(shapes, r"blocks\.(\d+)\.")
    injectors = _count(shapes, r"audio_injector\.injector\.(\d+)\.")
    if injectors == num_layers:
        inject_layers = list(range(num_layers))
    elif (injectors, num_layers) == (len(OFFICIAL_INJECT_LAYERS), 40):
        inject_layers = list(OFFICIAL_INJECT_LAYERS)
    else:
        raise ValueError(f"{injectors} audio injectors for {num_layers} blocks: "
                         f"which blocks they serve is not known")
    if any(name.startswith("audio_injector.injector_adain_output_layers.") for name in shapes):
        raise ValueError("AdaIN output layers (an adain_mode other than the official attn_norm)")
    local_channels = shapes["casual_audio_encoder.encoder.conv1_local.conv.weight"][0]
    return dict(
        cond_dim=shapes["cond_encoder.weight"][1] if "cond_encoder.weight" in shapes else 0,
        audio_dim=shapes["casual_audio_encoder.encoder.conv1_local.conv.weight"][1],
        num_audio_token=local_channels // (dim // 4),  # MotionEncoder_tc: dim // 4 channels a token
        enable_adain="audio_injector.injector_adain_layers.0.linear.weight" in shapes,
        adain_mode=transformer.adain_mode,
        audio_inject_layers=inject_layers,
        zero_init=transformer.zero_init,
        zero_timestep=transformer.zero_timestep,
        enable_motioner=any(name.startswith("motioner.") for name in shapes),
        add_last_motion=transformer.add_last_motion,
        enable_tsm=transformer.enable_tsm,
        trainable_token_pos_emb=class_default("trainable_token_pos_emb"),
        motion_token_num=class_default("motion_token_num"),
        enable_framepack=any(name.startswith("frame_packer.") for name in shapes),
        framepack_drop_mode=transformer.framepack_drop_mode,
        model_type="s2v",
        text_len=official.config.text_len,
        in_dim=shapes["patch_embedding.weight"][1],
        dim=dim,
        ffn_dim=shapes["blocks.0.ffn.0.weight"][0],
        freq_dim=shapes["time_embedding.0.weight"][1],
        out_dim=shapes["head.head.weight"][0] // (patch[0] * patch[1] * patch[2]),
        num_heads=dim // DIT_HEAD_DIM,
        num_layers=num_layers,
        eps=transformer.eps,
    )


# --- T5 --------------------------------------------------------------------------------------------

# transformers' UMT5 encoder block names -> wan.modules.t5.T5Encoder's. umt5 has a relative
# position bias in every block (shared_pos=False); the gated feed-forward is
# wo(gelu(wi_0(x)) * wi_1(x)), the official fc2(fc1(x) * gate(x)).
T5_BLOCK_NAMES = {
    "layer.0.layer_norm.weight": "norm1.weight",
    "layer.0.SelfAttention.q.weight": "attn.q.weight",
    "layer.0.SelfAttention.k.weight": "attn.k.weight",
    "layer.0.SelfAttention.v.weight": "attn.v.weight",
    "layer.0.SelfAttention.o.weight": "attn.o.weight",
    "layer.0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
    "layer.1.layer_norm.weight": "norm2.weight",
    "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",
    "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",
    "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight",
}
# What a T5 file may hold beside the encoder: the tokenizer, the embedding's tied copy, a decoder.
T5_UNUSED = re.compile(r"spiece_model|encoder\.embed_tokens\.weight|decoder\..*|lm_head\.weight")


def t5_official_name(name: str) -> str | None:
    """The official T5Encoder name of a transformers UMT5 encoder tensor; None: not one."""
    if name == "shared.weight":
        return "token_embedding.weight"
    if name == "encoder.final_layer_norm.weight":
        return "norm.weight"
    match = re.fullmatch(r"encoder\.block\.(\d+)\.(.+)", name)
    if match and match[2] in T5_BLOCK_NAMES:
        return f"blocks.{match[1]}.{T5_BLOCK_NAMES[match[2]]}"
    return None


def t5_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The T5 encoder's tensors' shapes under the official names, from the header."""
    return {official: shape for name, (_, shape) in read_header(path).tensors.items()
            if (official := t5_official_name(name)) is not None}


def t5_state_dict(path: Path, dtype: torch.dtype = torch.bfloat16,
                  read: TensorReader | None = None) -> dict[str, torch.Tensor]:
    """The T5 file as the state dict of the official `T5Encoder` (umt5_xxl, encoder only) in
    `dtype`, FP8 weights dequantized (where `read` puts them: weights.read_safetensors reads onto
    the GPU with several threads; else the CPU): what T5EncoderModel loads from the official .pth
    file."""
    state, unknown = {}, []
    for name, tensor, scale in _stored_tensors(path, read=read):
        official = t5_official_name(name)
        if official is not None:
            state[official] = dequantize(tensor, scale, dtype)
        elif not T5_UNUSED.fullmatch(name):
            unknown.append(name)
    if unknown:
        raise ComfyFilesError(f"{path}: tensors that are not part of a umt5 encoder: "
                              f"{', '.join(sorted(unknown)[:10])}")
    return state


def write_t5_tokenizer(path: Path, folder: Path) -> Path:
    """Write the T5 file's tokenizer (its `spiece_model` tensor: a SentencePiece model's bytes) as
    a folder the official HuggingfaceTokenizer loads (AutoTokenizer: spiece.model, read by
    transformers' T5Tokenizer; converting it needs the sentencepiece and protobuf packages)."""
    import sentencepiece
    from safetensors import safe_open

    try:  # without it, transformers fails with a misleading error about tiktoken
        importlib.import_module("google.protobuf")
    except ImportError as error:
        raise ComfyFilesError(f"reading the tokenizer in {path} needs the protobuf package, with "
                              f"which transformers reads SentencePiece models") from error
    with safe_open(str(path), "pt", device="cpu") as file:
        if "spiece_model" not in file.keys():
            raise ComfyFilesError(f"{path} holds no spiece_model tensor (the SentencePiece tokenizer "
                                  f"ComfyUI's umt5 files carry). {expected_files()}")
        model = file.get_tensor("spiece_model").numpy().tobytes()
    try:
        sentencepiece.SentencePieceProcessor(model_proto=model)
    except Exception as error:  # sentencepiece raises RuntimeError or its own parse errors
        raise ComfyFilesError(f"{path}: its spiece_model is not a SentencePiece model ({error})") from error
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(model)
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    # extra_ids 0: T5Tokenizer would otherwise add 100 <extra_id_N> tokens that ComfyUI's
    # SentencePiece tokenizer does not have.
    _write_json(folder / "tokenizer_config.json", {**special, "additional_special_tokens": [],
                                                   "extra_ids": 0, "tokenizer_class": "T5Tokenizer"})
    _write_json(folder / "special_tokens_map.json", {**special, "additional_special_tokens": []})
    return folder


# --- VAE -------------------------------------------------------------------------------------------

def vae_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The VAE file as the official WanVAE_ state dict (the names are the same) in float32, the
    official VAE's dtype."""
    return {name: dequantize(tensor, scale, torch.float32) for name, tensor, scale in _stored_tensors(path)}


# --- wav2vec2 --------------------------------------------------------------------------------------

# jonatasgrosman/wav2vec2-large-xlsr-53-english's config, for what the tensors do not state (the
# dropouts are inactive in eval). dtype float32: the official model's, which transformers would
# otherwise take from the file (fp16).
WAV2VEC_CONFIG = dict(
    architectures=["Wav2Vec2ForCTC"], hidden_act="gelu", feat_extract_activation="gelu",
    layer_norm_eps=1e-5, activation_dropout=0.05, attention_dropout=0.1, hidden_dropout=0.05,
    feat_proj_dropout=0.05, final_dropout=0.0, layerdrop=0.05, apply_spec_augment=True,
    mask_time_prob=0.05, mask_time_length=10, mask_feature_prob=0.0, ctc_loss_reduction="mean",
    ctc_zero_infinity=True, pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.02,
    dtype="float32")
CONV_STRIDES = (5, 2, 2, 2, 2, 2, 2)  # every wav2vec2 model's: 320 samples a frame, 50 frames/s
# Its CTC alphabet; the worker reads the hidden states, never the letters.
CTC_VOCAB = ("<pad>", "<s>", "</s>", "<unk>", "|", "'", "-", *"ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def wav2vec2_config(shapes: dict[str, tuple[int, ...]]) -> dict:
    """Wav2Vec2Config's arguments for a wav2vec2 state dict (bare Wav2Vec2Model names), its sizes
    read from the shapes as ComfyUI's loader reads them (the heads 64 wide: large 1024/16)."""
    hidden = shapes["encoder.layer_norm.bias"][0]
    if hidden % WAV2VEC_HEAD_DIM:
        raise ValueError(f"width {hidden} is not a multiple of the head size {WAV2VEC_HEAD_DIM}")
    convs = [shapes[f"feature_extractor.conv_layers.{i}.conv.weight"]
             for i in range(_count(shapes, r"feature_extractor\.conv_layers\.(\d+)\.conv\.weight"))]
    if len(convs) != len(CONV_STRIDES):
        raise ValueError(f"{len(convs)} feature convolutions, not {len(CONV_STRIDES)}")
    position = shapes["encoder.pos_conv_embed.conv.parametrizations.weight.original1"]
    # A layer norm after every feature convolution: the large models' "layer" extractor, whose
    # encoder is the stable-layer-norm one; "group" (base): a group norm after the first only.
    layer_norms = "feature_extractor.conv_layers.1.layer_norm.weight" in shapes
    return dict(
        WAV2VEC_CONFIG,
        hidden_size=hidden,
        num_hidden_layers=_count(shapes, r"encoder\.layers\.(\d+)\."),
        num_attention_heads=hidden // WAV2VEC_HEAD_DIM,
        intermediate_size=shapes["encoder.layers.0.feed_forward.intermediate_dense.weight"][0],
        conv_dim=[shape[0] for shape in convs],
        conv_kernel=[shape[2] for shape in convs],
        conv_stride=list(CONV_STRIDES),
        conv_bias="feature_extractor.conv_layers.0.conv.bias" in shapes,
        feat_extract_norm="layer" if layer_norms else "group",
        do_stable_layer_norm=layer_norms,
        num_conv_pos_embeddings=position[2],
        num_conv_pos_embedding_groups=hidden // position[1],
        vocab_size=shapes["lm_head.weight"][0] if "lm_head.weight" in shapes else len(CTC_VOCAB),
    )


def _wav2vec2_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors under bare Wav2Vec2Model names (lm_head.* as they are), the position
    convolution's weight norm under torch's current names."""
    prefix = wav2vec2_prefix(read_header(path).tensors.keys())
    if prefix is None:
        raise ComfyFilesError(f"{path} is not a wav2vec2 file. {expected_files()}")
    tensors = {}
    for name, tensor, scale in _stored_tensors(path):
        if scale is not None:
            tensor = dequantize(tensor, scale, torch.float32)
        name = name.removeprefix(prefix)
        name = name.replace("conv.weight_g", "conv.parametrizations.weight.original0")
        name = name.replace("conv.weight_v", "conv.parametrizations.weight.original1")
        tensors[name] = tensor
    return tensors


def wav2vec2_folder(path: Path, folder: Path) -> Path:
    """Write the wav2vec2 file as the folder the official AudioEncoder loads
    (Wav2Vec2Processor + Wav2Vec2ForCTC.from_pretrained): config.json inferred from the tensors,
    model.safetensors under Wav2Vec2ForCTC's names (the tensors as stored; transformers casts them
    to the config's float32), and the processor's files. A CTC head the file lacks is written as
    zeros: the worker uses the hidden states only."""
    from safetensors.torch import save_file
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    tensors = _wav2vec2_tensors(path)
    try:
        config = Wav2Vec2Config(**wav2vec2_config({k: tuple(v.shape) for k, v in tensors.items()}))
    except KeyError as error:
        raise ComfyFilesError(f"{path}: not a whole wav2vec2 model (no tensor {error})") from error
    except ValueError as error:
        raise ComfyFilesError(f"{path}: cannot read wav2vec2's architecture from its tensors "
                              f"({error})") from error
    with torch.device("meta"):
        expected = Wav2Vec2ForCTC(config).state_dict()
    state = {(name if name.startswith("lm_head.") else "wav2vec2." + name): tensor
             for name, tensor in tensors.items()}
    stored = tensors["encoder.layer_norm.bias"].dtype
    for name, tensor in expected.items():
        if name not in state and (name.startswith("lm_head.") or name == "wav2vec2.masked_spec_embed"):
            state[name] = torch.zeros(tensor.shape, dtype=stored)
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ComfyFilesError(f"{path}: not the wav2vec2 model its sizes describe "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")

    folder.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.contiguous() for name, tensor in state.items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.to_json_file(str(folder / "config.json"))
    _write_json(folder / "preprocessor_config.json", {
        "do_normalize": True, "feature_extractor_type": "Wav2Vec2FeatureExtractor",
        "feature_size": 1, "padding_side": "right", "padding_value": 0.0,
        "processor_class": "Wav2Vec2Processor", "return_attention_mask": True,
        "sampling_rate": 16000})
    vocab = list(CTC_VOCAB[:config.vocab_size])
    vocab += [f"<unused_{i}>" for i in range(config.vocab_size - len(vocab))]
    _write_json(folder / "vocab.json", {token: i for i, token in enumerate(vocab)})
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    _write_json(folder / "tokenizer_config.json", {
        **special, "do_lower_case": False, "word_delimiter_token": "|",
        "processor_class": "Wav2Vec2Processor", "tokenizer_class": "Wav2Vec2CTCTokenizer"})
    _write_json(folder / "special_tokens_map.json", special)
    return folder


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True) + "\n",
                    encoding="utf-8")
