"""Write a tiny official-layout checkpoint again as the single files ComfyUI users have.

    python builder/make_tiny_comfy.py OFFICIAL_DIR OUT_DIR [--weights bf16|fp16|fp8_scaled]
                                      [--layout comfy|kijai]

OFFICIAL_DIR is a tiny checkpoint made with `make_tiny_checkpoint(..., sizes=COMFY_SIZES)`: these
files carry no config, and the worker reads the heads back from the widths as ComfyUI's loaders do
(DiT heads 128 wide, wav2vec2 heads 64 wide), which the default tiny sizes do not follow.
OUT_DIR gets the layout of a ComfyUI `models` folder:

    diffusion_models/wan2.2_s2v_14B_<weights>.safetensors   the DiT under its official names, each
                                     prefixed `model.diffusion_model.` (kijai: bare names)
    text_encoders/umt5_xxl_<weights>.safetensors            the T5 encoder under transformers' UMT5
                                     names, its tokenizer as a SentencePiece model in `spiece_model`
    vae/wan_2.1_vae.safetensors                             the VAE under its official names
    audio_encoders/wav2vec2_large_english_<dtype>.safetensors   wav2vec2 without its config, under
                                     Wav2Vec2Model's bare names (kijai: Wav2Vec2ForCTC's, `wav2vec2.`
                                     prefix and CTC head, the position convolution as weight_g/_v)
    tiny-checkpoint.json                                    the tiny checkpoint's marker, copied

Between them the two layouts write each spelling a real file may have. `weights`: bf16 or fp16,
every tensor in that dtype; fp8_scaled, ComfyUI's convention: every Linear weight of the DiT and
the T5 in float8_e4m3fn with a float32 per-tensor `scale_weight` (the DiT's with a `scale_input` of
1 too), a `scaled_fp8` marker (an empty float8 tensor), everything else in bf16; the VAE in bf16
and wav2vec2 in fp16, as Comfy-Org ships them. (kijai keeps more of his DiT in bf16: KIJAI_KEEP.)
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FLOAT8 = torch.float8_e4m3fn
LAYOUTS = ("comfy", "kijai")
WEIGHTS = ("bf16", "fp16", "fp8_scaled")
DIT_PREFIX = {"comfy": "model.diffusion_model.", "kijai": ""}
# Parts kijai's loader keeps in the base dtype whatever the file (his params_to_keep).
MARKER = "tiny-checkpoint.json"  # make_tiny_checkpoint's: random weights, its small resolutions
KIJAI_KEEP = ("time_", "modulation", "text_embedding", "patch_embedding", "casual_audio_encoder",
              "cond_encoder", "frame_packer")

# transformers' UMT5 encoder names of each official T5Encoder block tensor, written out here
# rather than taken from s2v_worker.comfy, so that the tests check one table against the other
# (and this one against transformers' UMT5EncoderModel).
HF_T5_BLOCK = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # the GELU branch
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",  # the linear branch
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}


def file_names(weights: str, layout: str) -> dict[str, str]:
    """Where each file goes, named as people download them."""
    dit = ("Wan2_2-S2V-14B_fp8_e4m3fn_scaled_KJ" if layout == "kijai" and weights == "fp8_scaled"
           else f"wan2.2_s2v_14B_{weights}")
    t5 = {"fp8_scaled": "umt5_xxl_fp8_e4m3fn_scaled"}.get(weights, f"umt5_xxl_{weights}")
    audio = "fp16" if weights == "fp8_scaled" else weights
    return {"dit": f"diffusion_models/{dit}.safetensors", "t5": f"text_encoders/{t5}.safetensors",
            "vae": "vae/wan_2.1_vae.safetensors",
            "wav2vec2": f"audio_encoders/wav2vec2_large_english_{audio}.safetensors"}


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float8_e4m3fn with a per-tensor float32 scale (its largest value maps to float8's largest),
    as ComfyUI's scaled FP8 files store a Linear weight."""
    amax = weight.float().abs().max()
    scale = (amax / torch.finfo(FLOAT8).max if amax > 0 else torch.tensor(1.0)).to(torch.float32)
    return (weight.float() / scale).to(FLOAT8), scale.reshape(())


def scaled(state: dict[str, torch.Tensor], quantized: set[str], with_input_scale: bool,
           marker: str) -> dict[str, torch.Tensor]:
    """`state` in ComfyUI's scaled FP8 format: the `quantized` weights in float8 with their
    scale_weight, the rest in bf16, and the marker."""
    result = {marker: torch.empty(0, dtype=FLOAT8)}
    for name, tensor in state.items():
        if name in quantized:
            layer = name.removesuffix(".weight")
            result[name], result[f"{layer}.scale_weight"] = quantize(tensor)
            if with_input_scale:
                result[f"{layer}.scale_input"] = torch.ones((), dtype=torch.float32)
        else:
            result[name] = tensor.to(torch.bfloat16)
    return result


def linear_weights(model: torch.nn.Module) -> set[str]:
    return {f"{name}.weight" for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear)}


def convert_dit(official_dir: Path, weights: str, layout: str) -> dict[str, torch.Tensor]:
    from s2v_worker.official import import_official

    index = json.loads((official_dir / "diffusion_pytorch_model.safetensors.index.json").read_text())
    state = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(load_file(str(official_dir / shard)))
    if weights == "fp8_scaled":
        config = json.loads((official_dir / "config.json").read_text())
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        with torch.device("meta"):
            model = import_official().model_s2v.WanModel_S2V(**config)
        quantized = {name for name in linear_weights(model)
                     if layout == "comfy" or not any(part in name for part in KIJAI_KEEP)}
        state = scaled(state, quantized, with_input_scale=True, marker="scaled_fp8")
    else:
        state = {name: tensor.to(dtype_of(weights)) for name, tensor in state.items()}
    return {DIT_PREFIX[layout] + name: tensor for name, tensor in state.items()}


def convert_t5(official_dir: Path, weights: str) -> dict[str, torch.Tensor]:
    official = torch.load(official_dir / "models_t5_umt5-xxl-enc-bf16.pth", map_location="cpu",
                          weights_only=True)
    state = {}
    for name, tensor in official.items():
        if name == "token_embedding.weight":
            state["shared.weight"] = tensor
        elif name == "norm.weight":
            state["encoder.final_layer_norm.weight"] = tensor
        else:
            _, block, rest = name.split(".", 2)
            state[f"encoder.block.{block}.{HF_T5_BLOCK[rest]}"] = tensor
    if weights == "fp8_scaled":
        quantized = {n for n in state if n.endswith(("q.weight", "k.weight", "v.weight", "o.weight",
                                                     "wi_0.weight", "wi_1.weight", "wo.weight"))}
        state = scaled(state, quantized, with_input_scale=False, marker="scaled_fp8")
    else:
        state = {name: tensor.to(dtype_of(weights)) for name, tensor in state.items()}
    model = spiece_model(official_dir / "google" / "umt5-xxl" / "tokenizer.json")
    state["spiece_model"] = torch.frombuffer(bytearray(model), dtype=torch.uint8)
    return state


def spiece_model(tokenizer_json: Path) -> bytes:
    """The tiny Unigram tokenizer (tokenizers' format) as the SentencePiece model ComfyUI keeps in
    a umt5 file: the same pieces and scores; pad, eos, unk as in google/umt5-xxl; spaces become
    "▁" before each word, as the Metaspace pre-tokenizer does."""
    from sentencepiece import sentencepiece_model_pb2 as proto

    tokenizer = json.loads(tokenizer_json.read_text())
    special = {token["content"]: token["id"] for token in tokenizer["added_tokens"]}
    piece_type = proto.ModelProto.SentencePiece
    model = proto.ModelProto()
    for piece, score in tokenizer["model"]["vocab"]:
        entry = model.pieces.add(piece=piece, score=score)
        entry.type = (piece_type.UNKNOWN if piece == "<unk>" else
                      piece_type.CONTROL if piece in special else piece_type.NORMAL)
    model.trainer_spec.model_type = proto.TrainerSpec.UNIGRAM
    model.trainer_spec.vocab_size = len(model.pieces)
    model.trainer_spec.pad_id, model.trainer_spec.eos_id = special["<pad>"], special["</s>"]
    model.trainer_spec.unk_id, model.trainer_spec.bos_id = special["<unk>"], -1
    # google/umt5-xxl's normalizer, as in ComfyUI's files (transformers 5.17 cannot build the
    # tokenizer of a model without one): NFKC leaves the tests' ASCII prompts as they are.
    model.normalizer_spec.name = "nmt_nfkc"
    model.normalizer_spec.precompiled_charsmap = _nmt_nfkc_charsmap()
    model.normalizer_spec.add_dummy_prefix = True
    model.normalizer_spec.remove_extra_whitespaces = True
    model.normalizer_spec.escape_whitespaces = True
    return model.SerializeToString()


def _nmt_nfkc_charsmap() -> bytes:
    """SentencePiece's built-in nmt_nfkc normalization table, as its trainer writes it into a
    model (from a throwaway model trained on a few words: the table does not depend on them)."""
    import io

    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2 as proto

    written = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(["a person talks about the weather today"] * 20),
        model_writer=written, vocab_size=25, normalization_rule_name="nmt_nfkc",
        model_type="unigram", minloglevel=2)
    model = proto.ModelProto()
    model.ParseFromString(written.getvalue())
    return model.normalizer_spec.precompiled_charsmap


def convert_vae(official_dir: Path, weights: str) -> dict[str, torch.Tensor]:
    state = torch.load(official_dir / "Wan2.1_VAE.pth", map_location="cpu", weights_only=True)
    dtype = torch.bfloat16 if weights == "fp8_scaled" else dtype_of(weights)
    return {name: tensor.to(dtype) for name, tensor in state.items()}


def convert_wav2vec2(official_dir: Path, weights: str, layout: str) -> dict[str, torch.Tensor]:
    state = load_file(str(official_dir / "wav2vec2-large-xlsr-53-english" / "model.safetensors"))
    dtype = torch.float16 if weights == "fp8_scaled" else dtype_of(weights)
    result = {}
    for name, tensor in state.items():
        if layout == "comfy":
            if name.startswith("lm_head."):
                continue
            name = name.removeprefix("wav2vec2.")
        else:
            name = name.replace("parametrizations.weight.original0", "weight_g")
            name = name.replace("parametrizations.weight.original1", "weight_v")
        result[name] = tensor.to(dtype)
    return result


def dtype_of(weights: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[weights]


def make_tiny_comfy(official_dir: Path, out_dir: Path, weights: str = "bf16",
                    layout: str = "comfy") -> Path:
    """Write the tiny official-layout checkpoint in `official_dir` as ComfyUI's (or kijai's)
    files into `out_dir` (see the module's docstring); returns `out_dir`."""
    if weights not in WEIGHTS or layout not in LAYOUTS:
        raise ValueError(f"weights in {WEIGHTS}, layout in {LAYOUTS}")
    official_dir, out_dir = Path(official_dir), Path(out_dir)
    states = {"dit": convert_dit(official_dir, weights, layout), "t5": convert_t5(official_dir, weights),
              "vae": convert_vae(official_dir, weights),
              "wav2vec2": convert_wav2vec2(official_dir, weights, layout)}
    for role, name in file_names(weights, layout).items():
        (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in states[role].items()}, str(out_dir / name))
    # The tiny checkpoint's declarations go with it: the worker reads it as a test checkpoint.
    shutil.copy(official_dir / MARKER, out_dir / MARKER)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("official_dir", type=Path, help="a tiny checkpoint (sizes=COMFY_SIZES)")
    parser.add_argument("out_dir", type=Path, help="the folder to write the files into")
    parser.add_argument("--weights", choices=WEIGHTS, default="bf16")
    parser.add_argument("--layout", choices=LAYOUTS, default="comfy")
    args = parser.parse_args(argv)
    print(make_tiny_comfy(args.official_dir, args.out_dir, args.weights, args.layout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
