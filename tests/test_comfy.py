"""s2v_worker.comfy: the ComfyUI / kijai files of Wan2.2-S2V-14B read into the official classes.

One tiny model (make_tiny_checkpoint with COMFY_SIZES) is written in the official layout and, by
builder/make_tiny_comfy.py, as ComfyUI's and kijai's files in bf16, fp16 and fp8_scaled. Each
reader is checked against the official state dict; then the worker finds and loads the set
(`comfy_pipeline`: checkpoint.find_checkpoint, prepare_checkpoint, loading.load_pipeline) and is
compared with its loading of the official layout: the same numbers for bf16 and fp16 files (against the official weights
rounded to the file's dtype, which is all such a file can hold), close ones for fp8_scaled.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from builder import make_tiny_checkpoint as tiny
from builder.make_tiny_comfy import file_names, make_tiny_comfy, quantize
from conftest import generate_video, load_tiny_pipeline, plan_job, speech_excerpt
from s2v_worker import comfy
from s2v_worker.checkpoint import (T5_CHECKPOINT, T5_TOKENIZER_DIR, VAE_CHECKPOINT, WAV2VEC_DIR,
                                   Checkpoint, CheckpointNotFound, find_checkpoint,
                                   prepare_checkpoint)
from s2v_worker.dit import DiTEngine
from s2v_worker.job import parse_job
from s2v_worker.loading import load_pipeline
from s2v_worker.official import import_official
from s2v_worker.pipeline import S2VPipeline
from s2v_worker.settings import Settings
from s2v_worker.weights import infer_t5_architecture

_official = import_official()
CPU = torch.device("cpu")
FILE_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}


# --- the files -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def official_dir(tmp_path_factory) -> Path:
    return tiny.make_tiny_checkpoint(tmp_path_factory.mktemp("official") / "Wan2.2-S2V-14B",
                                     sizes=tiny.COMFY_SIZES)


@pytest.fixture(scope="module")
def comfy_dir(official_dir, tmp_path_factory):
    """comfy_dir(weights, layout): that ComfyUI set of the tiny model, written once."""
    made: dict[tuple[str, str], Path] = {}

    def make(weights: str, layout: str = "comfy") -> Path:
        if (weights, layout) not in made:
            out = tmp_path_factory.mktemp(f"{weights}-{layout}")
            made[weights, layout] = make_tiny_comfy(official_dir, out, weights, layout)
        return made[weights, layout]

    return make


def official_dit(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    state = {}
    for shard in set(index["weight_map"].values()):
        state.update(load_file(str(folder / shard)))
    return state


def round_trip(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The official tensors as a file in `dtype` holds them, back in their own dtype."""
    return {name: tensor.to(dtype).to(tensor.dtype) for name, tensor in state.items()}


def through_float8(weight: torch.Tensor) -> torch.Tensor:
    """What a scaled FP8 file holds of `weight`, dequantized (the builder's own quantization)."""
    stored, scale = quantize(weight)
    return (stored.float() * scale).to(weight.dtype)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def write_file(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


# --- classification and the set --------------------------------------------------------------------

@pytest.mark.parametrize("weights,layout", [("bf16", "comfy"), ("fp16", "kijai"),
                                            ("fp8_scaled", "comfy"), ("fp8_scaled", "kijai")])
def test_each_file_is_told_by_its_keys(comfy_dir, weights, layout, tmp_path):
    folder = comfy_dir(weights, layout)
    for role, name in file_names(weights, layout).items():
        renamed = tmp_path / f"{role}-as-model.safetensors"  # the file's name plays no part
        shutil.copy(folder / name, renamed)
        found = comfy.classify_file(renamed)
        assert found.role == role, (name, found.note)
        if role in ("dit", "t5"):
            assert found.note == weights
    files = comfy.find_comfy_files(folder)
    assert files == comfy.ComfyFiles(**{role: folder / name
                                        for role, name in file_names(weights, layout).items()})


def foreign_files(folder: Path) -> dict[str, str]:
    """Files ComfyUI users keep beside the S2V set, each with the words its note must hold."""
    def small() -> torch.Tensor:
        return torch.zeros(1, dtype=torch.bfloat16)

    t5_v1_1 = {"shared.weight": torch.zeros(2, 4096),
               **{f"encoder.block.{i}.layer.0.SelfAttention.q.weight": torch.zeros(1, 1) for i in (0, 1)},
               "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": torch.zeros(1, 1)}
    umt5_untokenized = {"shared.weight": torch.zeros(2, 4096),
                        "encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(1, 1)}
    wan22_vae = {name: small() for name in ("encoder.conv1.weight", "decoder.conv1.weight",
                                          "decoder.middle.0.residual.0.gamma")}
    wan22_vae["conv2.weight"] = torch.zeros(48, 1)
    files = {
        "diffusion_models/wan2.2_t2v_low_noise_14B_fp16.safetensors": (
            {"model.diffusion_model.head.modulation": small()}, "not the S2V one"),
        "text_encoders/t5xxl_fp16.safetensors": (t5_v1_1, "not umt5"),
        "text_encoders/umt5_xxl_no_tokenizer.safetensors": (umt5_untokenized, "no spiece_model"),
        "vae/wan2.2_vae.safetensors": (wan22_vae, "48 latent channels"),
        "vae/ae.safetensors": ({"decoder.conv_in.weight": small()}, "none of the four"),
    }
    for name, (tensors, _) in files.items():
        write_file(folder / name, tensors)
    (folder / "audio_encoders").mkdir(exist_ok=True)
    (folder / "audio_encoders" / "broken.safetensors").write_bytes(b"\xff" * 64)
    return {**{name: words for name, (_, words) in files.items()},
            "audio_encoders/broken.safetensors": "not a readable safetensors file"}


def test_foreign_files_are_named_with_the_reason(tmp_path):
    for name, words in foreign_files(tmp_path).items():
        found = comfy.classify_file(tmp_path / name)
        assert found.role is None and words in found.note, (name, found.note)
    # No S2V DiT: not a ComfyUI S2V set, unless the user named the folder.
    assert comfy.find_comfy_files(tmp_path) is None
    with pytest.raises(comfy.ComfyFilesError) as error:
        comfy.find_comfy_files(tmp_path, required=True)
    message = str(error.value)
    for role in comfy.ROLES:
        assert f"missing {role.title}" in message
        assert all(name in message for name in role.typical)
    assert "vae/wan2.2_vae.safetensors (a Wan VAE with 48 latent channels" in message
    assert "audio_encoders/broken.safetensors (not a readable safetensors file" in message


def copy_set(source: Path, target: Path) -> Path:
    return Path(shutil.copytree(source, target))


def test_a_missing_file_is_named_with_what_was_found(comfy_dir, tmp_path):
    folder = copy_set(comfy_dir("fp8_scaled"), tmp_path / "models")
    (folder / "vae" / "wan_2.1_vae.safetensors").unlink()
    foreign_files(folder)
    with pytest.raises(comfy.ComfyFilesError) as error:
        comfy.find_comfy_files(folder)
    message = str(error.value)
    assert "missing the Wan 2.1 VAE (wan_2.1_vae.safetensors, in vae/)" in message
    assert ("diffusion_models/wan2.2_s2v_14B_fp8_scaled.safetensors (the S2V diffusion model, "
            "fp8_scaled)") in message
    assert "text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors (the umt5-xxl text encoder" in message
    assert "vae/wan2.2_vae.safetensors (a Wan VAE with 48 latent channels" in message
    assert "missing the S2V" not in message and "missing the umt5" not in message


def test_two_files_for_one_role_are_refused_but_a_linked_folder_is_one(comfy_dir, tmp_path):
    folder = copy_set(comfy_dir("bf16"), tmp_path / "models")
    (folder / "unet").symlink_to(folder / "diffusion_models")  # the same file twice: one file
    assert comfy.find_comfy_files(folder).dit == folder / file_names("bf16", "comfy")["dit"]
    (folder / "clip").mkdir()
    shutil.copy(folder / "text_encoders" / "umt5_xxl_bf16.safetensors",
                folder / "clip" / "umt5_xxl_copy.safetensors")
    with pytest.raises(comfy.ComfyFilesError, match="2 files are the umt5-xxl text encoder: "
                       r"text_encoders/umt5_xxl_bf16.safetensors, clip/umt5_xxl_copy.safetensors; keep one"):
        comfy.find_comfy_files(folder)


def test_the_four_files_in_one_folder(comfy_dir, tmp_path):
    source = comfy_dir("fp16", "kijai")
    for name in file_names("fp16", "kijai").values():
        shutil.copy(source / name, tmp_path / Path(name).name)
    files = comfy.find_comfy_files(tmp_path)
    assert files.t5 == tmp_path / "umt5_xxl_fp16.safetensors"


# --- the DiT ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("weights,layout", [("bf16", "comfy"), ("fp8_scaled", "kijai")])
def test_dit_config_is_the_official_config_json(official_dir, comfy_dir, weights, layout):
    config = json.loads((official_dir / "config.json").read_text())
    expected = {key: value for key, value in config.items() if not key.startswith("_")}
    path = comfy_dir(weights, layout) / file_names(weights, layout)["dit"]
    assert comfy.dit_config(path) == expected


def dit_header_file(path: Path, dim: int, layers: int, injectors: int) -> Path:
    """A DiT file's header at any size: empty tensors where the shape does not matter."""
    tensors = {"head.modulation": torch.zeros(1, 2, dim),
               "patch_embedding.weight": torch.zeros(dim, 16, 1, 2, 2),
               "text_embedding.0.weight": torch.zeros(0, 4096),
               "time_embedding.0.weight": torch.zeros(0, 256),
               "head.head.weight": torch.zeros(64, 0), "cond_encoder.weight": torch.zeros(0, 16, 1, 2, 2),
               "casual_audio_encoder.encoder.conv1_local.conv.weight": torch.zeros(dim, 1024, 0),
               "casual_audio_encoder.encoder.final_linear.weight": torch.zeros(1),
               "audio_injector.injector_adain_layers.0.linear.weight": torch.zeros(1),
               "frame_packer.proj.weight": torch.zeros(1)}
    tensors.update({f"blocks.{i}.ffn.0.weight": torch.zeros(3 * dim, 0) for i in range(layers)})
    tensors.update({f"audio_injector.injector.{i}.q.weight": torch.zeros(1) for i in range(injectors)})
    return write_file(path, tensors)


def test_dit_config_of_the_full_size_file_and_refusals(tmp_path):
    full = comfy.dit_config(dit_header_file(tmp_path / "full.safetensors", 5120, 40, 12))
    transformer = _official.config.transformer
    assert full["audio_inject_layers"] == transformer.audio_inject_layers
    assert (full["num_heads"], full["num_layers"], full["audio_dim"], full["num_audio_token"]) == (
        transformer.num_heads, transformer.num_layers, transformer.audio_dim, 4)
    assert full["framepack_drop_mode"] == "padd" and full["enable_framepack"] and full["enable_adain"]
    with pytest.raises(comfy.ComfyFilesError, match="5 audio injectors for 40 blocks"):
        comfy.dit_config(dit_header_file(tmp_path / "odd.safetensors", 5120, 40, 5))
    with pytest.raises(comfy.ComfyFilesError, match="width 5000 is not a multiple of the head size 128"):
        comfy.dit_config(dit_header_file(tmp_path / "narrow.safetensors", 5000, 40, 40))
    with pytest.raises(comfy.ComfyFilesError, match="not a Wan2.2-S2V diffusion model file"):
        comfy.dit_config(write_file(tmp_path / "vae.safetensors", {"conv1.weight": torch.zeros(1)}))


@pytest.mark.parametrize("weights,layout", [("bf16", "comfy"), ("fp16", "comfy"),
                                            ("fp8_scaled", "comfy"), ("fp8_scaled", "kijai")])
def test_dit_tensors_are_the_official_ones(official_dir, comfy_dir, weights, layout):
    official = official_dit(official_dir)
    read = {name: (tensor, scale) for name, tensor, scale in
            comfy.dit_tensors(comfy_dir(weights, layout) / file_names(weights, layout)["dit"])}
    assert read.keys() == official.keys()  # prefix, marker and input scales gone
    quantized = [name for name, (tensor, _) in read.items() if tensor.dtype == torch.float8_e4m3fn]
    if weights != "fp8_scaled":
        assert quantized == [] and all(scale is None for _, scale in read.values())
        for name, (tensor, _) in read.items():
            assert tensor.dtype == FILE_DTYPE[weights]
            assert torch.equal(tensor, official[name].to(FILE_DTYPE[weights])), name
        return
    assert "blocks.0.ffn.0.weight" in quantized and "blocks.2.self_attn.q.weight" in quantized
    assert ("text_embedding.0.weight" in quantized) == (layout == "comfy")  # kijai keeps it bf16
    for name, (tensor, scale) in read.items():
        restored = comfy.dequantize(tensor, scale, torch.bfloat16)
        if name in quantized:
            assert scale.dtype == torch.float32 and scale.shape == ()
            assert torch.equal(restored, through_float8(official[name])), name
            assert 0 < rel_l2(restored, official[name]) < 0.05, name  # float8_e4m3fn: 3 mantissa bits
        else:
            assert scale is None and torch.equal(restored, official[name]), name


def test_other_scale_spellings_and_refused_formats(tmp_path):
    weight = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    per_channel = weight.abs().amax(dim=1) / 448
    stored = (weight / per_channel[:, None]).to(torch.float8_e4m3fn)
    prefix = "model.diffusion_model."
    path = write_file(tmp_path / "new.safetensors", {
        prefix + "casual_audio_encoder.encoder.final_linear.weight": stored,
        prefix + "casual_audio_encoder.encoder.final_linear.weight_scale": per_channel,  # newer name
        prefix + "casual_audio_encoder.encoder.final_linear.input_scale": torch.tensor(2.0),
        prefix + "casual_audio_encoder.encoder.final_linear.comfy_quant":
            torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8),
        prefix + "head.head.weight": stored.clone(),  # plain FP8: no scale
        "first_stage_model.conv1.weight": torch.zeros(1),  # outside the DiT's prefix: ignored
    })
    read = {name: (tensor, scale) for name, tensor, scale in comfy.dit_tensors(path)}
    assert read.keys() == {"casual_audio_encoder.encoder.final_linear.weight", "head.head.weight"}
    tensor, scale = read["casual_audio_encoder.encoder.final_linear.weight"]
    assert rel_l2(comfy.dequantize(tensor, scale, torch.float32), weight) < 0.05
    tensor, scale = read["head.head.weight"]
    assert torch.equal(comfy.dequantize(tensor, scale, torch.float32), stored.float())

    nvfp4 = write_file(tmp_path / "nvfp4.safetensors", {
        "casual_audio_encoder.encoder.final_linear.weight": torch.zeros(2, 2, dtype=torch.uint8),
        "casual_audio_encoder.encoder.final_linear.comfy_quant":
            torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)})
    with pytest.raises(comfy.ComfyFilesError, match="quantized as nvfp4, which the worker does not read"):
        list(comfy.dit_tensors(nvfp4))
    int8 = write_file(tmp_path / "int8.safetensors", {
        "casual_audio_encoder.encoder.final_linear.weight": torch.zeros(2, 2, dtype=torch.int8)})
    with pytest.raises(comfy.ComfyFilesError, match="torch.int8, a quantized format"):
        list(comfy.dit_tensors(int8))


# --- T5 and its tokenizer --------------------------------------------------------------------------

@pytest.mark.parametrize("weights", ["bf16", "fp16", "fp8_scaled"])
def test_t5_state_dict_is_the_official_one(official_dir, comfy_dir, weights):
    official = torch.load(official_dir / T5_CHECKPOINT, map_location="cpu", weights_only=True)
    read = comfy.t5_state_dict(comfy_dir(weights) / file_names(weights, "comfy")["t5"])
    assert read.keys() == official.keys()
    assert {t.dtype for t in read.values()} == {torch.bfloat16}
    linear = (".attn.q.weight", ".attn.k.weight", ".attn.v.weight", ".attn.o.weight",
              ".ffn.gate.0.weight", ".ffn.fc1.weight", ".ffn.fc2.weight")
    for name, tensor in read.items():
        if weights != "fp8_scaled":
            assert torch.equal(tensor, official[name].to(FILE_DTYPE[weights]).to(torch.bfloat16)), name
        elif name.endswith(linear):  # every Linear of the T5 is FP8 in ComfyUI's file
            assert torch.equal(tensor, through_float8(official[name])), name
            assert 0 < rel_l2(tensor, official[name]) < 0.05, name
        else:  # embedding, norms, position biases: bf16
            assert torch.equal(tensor, official[name]), name


def test_the_files_t5_names_are_transformers_umt5(official_dir, comfy_dir):
    """The builder's table of T5 names, checked against transformers' own UMT5 encoder: the same
    tensors under those names compute what the official T5Encoder computes."""
    from transformers import UMT5Config, UMT5EncoderModel

    official = torch.load(official_dir / T5_CHECKPOINT, map_location="cpu", weights_only=True)
    arch = infer_t5_architecture(official)
    t5 = _official.t5.umt5_xxl(encoder_only=True, return_tokenizer=False, dtype=torch.float32,
                               device="cpu", **arch)
    t5.load_state_dict(official)
    hf_state = load_file(str(comfy_dir("bf16") / file_names("bf16", "comfy")["t5"]))
    del hf_state["spiece_model"]
    config = UMT5Config(vocab_size=arch["vocab_size"], d_model=arch["dim"], d_ff=arch["dim_ffn"],
                        num_heads=arch["num_heads"], d_kv=arch["dim_attn"] // arch["num_heads"],
                        num_layers=arch["encoder_layers"], relative_attention_num_buckets=arch["num_buckets"],
                        feed_forward_proj="gated-gelu", dropout_rate=0.0)
    hf = UMT5EncoderModel(config).eval()
    missing, unexpected = hf.load_state_dict({k: v.float() for k, v in hf_state.items()}, strict=False)
    assert unexpected == [] and set(missing) <= {"encoder.embed_tokens.weight"}  # tied to shared
    ids = torch.randint(3, 400, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        expected = t5.eval()(ids, mask)
        got = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


PROMPTS = ["a man talking to the camera", "  A Woman singing,   close-up!  42 ",
           "unknownword qqq", tiny.NEGATIVE_PROMPT]


def test_the_tokenizer_from_spiece_model_tokenizes_as_the_official_folder(official_dir, comfy_dir, tmp_path):
    import sentencepiece

    t5_file = comfy_dir("fp8_scaled") / file_names("fp8_scaled", "comfy")["t5"]
    folder = comfy.write_t5_tokenizer(t5_file, tmp_path / "umt5-xxl")
    tokenizers = _official.t5.HuggingfaceTokenizer
    ours = tokenizers(name=str(folder), seq_len=512, clean="whitespace")
    theirs = tokenizers(name=str(official_dir / T5_TOKENIZER_DIR), seq_len=512, clean="whitespace")
    assert ours.vocab_size == theirs.vocab_size
    for got, expected in zip(ours(PROMPTS, return_mask=True, add_special_tokens=True),
                             theirs(PROMPTS, return_mask=True, add_special_tokens=True)):
        assert torch.equal(got, expected)
    # ComfyUI's own tokenizer (SentencePiece, EOS added) reads the same model the same way.
    model = load_file(str(t5_file))["spiece_model"].numpy().tobytes()
    spm = sentencepiece.SentencePieceProcessor(model_proto=model, add_eos=True)
    ids = ours(PROMPTS[:3], return_mask=False, add_special_tokens=True)
    for prompt, row in zip(PROMPTS[:3], ids):
        expected = spm.encode(" ".join(prompt.split()))
        assert row[:len(expected)].tolist() == expected and row[len(expected):].eq(0).all()

    without = write_file(tmp_path / "no_tokenizer.safetensors", {"shared.weight": torch.zeros(1)})
    with pytest.raises(comfy.ComfyFilesError, match="holds no spiece_model tensor"):
        comfy.write_t5_tokenizer(without, tmp_path / "nothing")


# --- VAE and wav2vec2 ------------------------------------------------------------------------------

@pytest.mark.parametrize("weights", ["bf16", "fp16"])
def test_vae_state_dict_is_the_official_one(official_dir, comfy_dir, weights):
    official = torch.load(official_dir / VAE_CHECKPOINT, map_location="cpu", weights_only=True)
    read = comfy.vae_state_dict(comfy_dir(weights) / file_names(weights, "comfy")["vae"])
    assert read.keys() == official.keys()
    assert all(read[k].dtype == torch.float32 and torch.equal(read[k], v.to(FILE_DTYPE[weights]).float())
               for k, v in official.items())


@pytest.fixture(scope="module")
def speech_1s(tmp_path_factory):
    return speech_excerpt(tmp_path_factory.mktemp("audio") / "speech_1s.wav", 1.0, "-c:a", "pcm_f32le")


def rounded_wav2vec2(official_dir: Path, target: Path, dtype: torch.dtype) -> Path:
    folder = Path(shutil.copytree(official_dir / WAV2VEC_DIR, target))
    state = load_file(str(folder / "model.safetensors"))
    save_file(round_trip(state, dtype), str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("weights,layout", [("fp16", "comfy"), ("bf16", "kijai")])
def test_wav2vec2_folder_gives_the_official_features(official_dir, comfy_dir, weights, layout,
                                                     speech_1s, tmp_path):
    path = comfy_dir(weights, layout) / file_names(weights, layout)["wav2vec2"]
    folder = comfy.wav2vec2_folder(path, tmp_path / "wav2vec2")
    config = json.loads((folder / "config.json").read_text())
    official_config = json.loads((official_dir / WAV2VEC_DIR / "config.json").read_text())
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "conv_dim", "conv_kernel", "conv_stride", "conv_bias", "feat_extract_norm",
                "do_stable_layer_norm", "num_conv_pos_embeddings", "num_conv_pos_embedding_groups",
                "layer_norm_eps", "vocab_size", "hidden_act", "feat_extract_activation"):
        assert config[key] == official_config[key], key

    reference = rounded_wav2vec2(official_dir, tmp_path / "reference", FILE_DTYPE[weights])
    ours = _official.audio_encoder.AudioEncoder(device="cpu", model_id=str(folder))
    theirs = _official.audio_encoder.AudioEncoder(device="cpu", model_id=str(reference))
    assert ours.model.dtype == torch.float32
    with torch.no_grad():
        got = ours.extract_audio_feat(str(speech_1s), return_all_layers=True)
        expected = theirs.extract_audio_feat(str(speech_1s), return_all_layers=True)
    assert got.shape[0] == 25 and got.shape[2] == tiny.COMFY_SIZES.wav2vec_hidden
    assert torch.equal(got, expected)


# --- the official modules from the readers, against the official layout ----------------------------

def comfy_checkpoint(folder: Path, work_dir: Path) -> Checkpoint:
    """The checkpoint a worker with WAN_S2V_CKPT_DIR=`folder` finds, its small parts written in the
    official form under `work_dir` (standing for the network volume)."""
    settings = Settings.from_env({}).replace(ckpt_dir=folder, network_volume_dir=work_dir)
    return prepare_checkpoint(find_checkpoint(settings.model, settings.folders), settings.folders)


def comfy_pipeline(folder: Path, work_dir: Path, **model: str) -> S2VPipeline:
    """The worker's pipeline on the CPU from a ComfyUI set, loaded as the worker loads it
    (loading.load_pipeline): T5 and the DiT from their files, the rest in the official form."""
    work_dir.mkdir(parents=True, exist_ok=True)
    settings = Settings.from_env({}).replace(**model)
    return load_pipeline(comfy_checkpoint(folder, work_dir), CPU, settings.model)


def rounded_official(official_dir: Path, target: Path, dtype: torch.dtype | None) -> Path:
    """A copy of the official layout whose tensors went through `dtype` (None: as they are)."""
    folder = Path(shutil.copytree(official_dir, target))
    if dtype is None:
        return folder
    for shard in folder.glob("diffusion_pytorch_model-*.safetensors"):
        save_file(round_trip(load_file(str(shard)), dtype), str(shard), metadata={"format": "pt"})
    for name in (T5_CHECKPOINT, VAE_CHECKPOINT):
        torch.save(round_trip(torch.load(folder / name, weights_only=True), dtype), folder / name)
    state = load_file(str(folder / WAV2VEC_DIR / "model.safetensors"))
    save_file(round_trip(state, dtype), str(folder / WAV2VEC_DIR / "model.safetensors"),
              metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def pipelines(official_dir, comfy_dir, tmp_path_factory):
    """pipelines(weights, layout): (the official layout's pipeline, rounded to the files' dtype
    for bf16 and fp16; the ComfyUI set's), each loaded once."""
    loaded = {}

    def load(weights: str, layout: str = "comfy"):
        rounding = FILE_DTYPE.get(weights)
        if rounding not in loaded:
            loaded[rounding] = load_tiny_pipeline(rounded_official(
                official_dir, tmp_path_factory.mktemp("rounded") / "ckpt", rounding))
        work = tmp_path_factory.mktemp(f"loaded-{weights}-{layout}")
        return loaded[rounding], comfy_pipeline(comfy_dir(weights, layout), work)

    return load


def dit_inputs(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    h, w = 8, 8
    return dict(context=[torch.randn(7, 4096, generator=g)], seq_len=0,
                ref_latents=torch.randn(1, 16, 1, h, w, generator=g),
                motion_latents=torch.randn(1, 16, 19, h, w, generator=g),
                cond_states=torch.randn(1, 16, 2, h, w, generator=g),
                audio_input=torch.randn(1, 25, tiny.COMFY_SIZES.wav2vec_hidden, 8, generator=g),
                motion_frames=[73, 19], drop_motion_frames=False)


@pytest.mark.parametrize("weights,layout", [("bf16", "comfy"), ("fp16", "comfy"), ("bf16", "kijai"),
                                            ("fp8_scaled", "comfy"), ("fp8_scaled", "kijai")])
def test_official_modules_from_the_readers_compute_as_the_official_layout(pipelines, weights, layout):
    official, ours = pipelines(weights, layout)
    exact = weights != "fp8_scaled"
    with torch.no_grad():
        # T5: tokenizer and encoder.
        prompts = ["a person talks", tiny.NEGATIVE_PROMPT]
        got, expected = ours.text_encoder(prompts, CPU), official.text_encoder(prompts, CPU)
        assert [u.shape for u in got] == [u.shape for u in expected]
        for a, b in zip(got, expected):
            # fp8: the weights are 2.6% off (test_t5_state_dict_is_the_official_one); random
            # weights make the tiny T5's attention nearly one-hot, which turns that into 16-28%.
            assert torch.equal(a, b) if exact else 0 < rel_l2(a, b) < 0.5
        # One DiT forward, through the worker's engine.
        inputs = dit_inputs(1)
        x = [torch.randn(16, 2, 8, 8, generator=torch.Generator().manual_seed(2))]
        t = torch.tensor([700.0])
        ours_engine, official_engine = DiTEngine(ours.denoiser.model), DiTEngine(official.denoiser.model)
        got = ours_engine.forward(x, t, ours_engine.prepare(**inputs))[0]
        expected = official_engine.forward(x, t, official_engine.prepare(**inputs))[0]
        assert got.shape == (16, 2, 8, 8) and expected.norm() > 0
        assert torch.equal(got, expected) if exact else 0 < rel_l2(got, expected) < 0.1  # fp8: 2.7%
    if exact:  # VAE and wav2vec2 hold the same numbers (fp8 sets ship them in bf16 and fp16)
        for a, b in ((ours.vae.model, official.vae.model),
                     (ours.audio_encoder.model, official.audio_encoder.model)):
            theirs = b.state_dict()
            # ComfyUI's wav2vec2 file has no CTC head (written as zeros): the worker never reads it
            differ = [k for k, v in a.state_dict().items() if not torch.equal(v, theirs[k])]
            assert differ == ([] if layout == "kijai" or a is ours.vae.model else
                              ["lm_head.weight", "lm_head.bias"])


@pytest.mark.parametrize("weights", ["bf16", "fp8_scaled"])
def test_a_whole_tiny_job_from_the_comfy_files(pipelines, portrait_png, speech_1s, weights):
    """The same video from the ComfyUI bf16 files as from the official layout; fp8_scaled runs."""
    official, ours = pipelines(weights)
    generation = parse_job({"input": {"image_url": "https://x/i.png", "audio_url": "https://x/a.wav",
                                      "prompt": "a person talks", "sample_steps": 2,
                                      "infer_frames": 16, "max_clips": 1}}).generation
    plan = plan_job(ours, portrait_png, 1.0, generation)
    got = generate_video(ours, portrait_png, speech_1s, plan, generation, 3)
    expected = generate_video(official, portrait_png, speech_1s, plan, generation, 3)
    assert got.shape == expected.shape == (3, 16 - 3, plan.height, plan.width)
    if weights == "bf16":
        assert torch.equal(got, expected)
    else:
        assert torch.isfinite(got).all() and got.std() > 0.01


# --- the worker with a ComfyUI set -----------------------------------------------------------------

def test_the_worker_finds_a_set_where_comfyui_users_keep_it(comfy_dir, tmp_path):
    """Without WAN_S2V_CKPT_DIR and the official checkpoint anywhere, a set under the network
    volume's ComfyUI/models (RunPod's ComfyUI workers' layout) is found."""
    volume = tmp_path / "volume"
    shutil.copytree(comfy_dir("fp8_scaled"), volume / "ComfyUI" / "models")
    settings = Settings.from_env({}).replace(network_volume_dir=volume,
                                             hf_cache_dir=tmp_path / "no-cache")
    checkpoint = find_checkpoint(settings.model, settings.folders)
    assert checkpoint.layout == "ComfyUI files" and checkpoint.random_weights
    assert checkpoint.path == volume / "ComfyUI" / "models"
    assert checkpoint.comfy.dit.name == file_names("fp8_scaled", "comfy")["dit"].split("/")[-1]
    assert checkpoint.dit_heads == tiny.COMFY_SIZES.dit_heads


def test_a_folder_that_is_neither_layout_is_a_clear_error(comfy_dir, tmp_path):
    settings = Settings.from_env({}).replace(ckpt_dir=tmp_path)
    with pytest.raises(CheckpointNotFound) as error:
        find_checkpoint(settings.model, settings.folders)
    message = str(error.value)
    assert "missing: config.json" in message and "ComfyUI" in message and "wan_2.1_vae" in message

    incomplete = Path(shutil.copytree(comfy_dir("bf16"), tmp_path / "incomplete"))
    (incomplete / file_names("bf16", "comfy")["vae"]).unlink()
    settings = Settings.from_env({}).replace(ckpt_dir=incomplete)
    with pytest.raises(CheckpointNotFound, match="missing the Wan 2.1 VAE"):
        find_checkpoint(settings.model, settings.folders)


def test_the_small_parts_are_written_once_for_all_workers(comfy_dir, tmp_path):
    first = comfy_checkpoint(comfy_dir("bf16"), tmp_path)
    assert first.prepared.parent == tmp_path / "wan-s2v-comfyui"
    written = {p: p.stat().st_mtime_ns for p in first.prepared.rglob("*") if p.is_file()}
    assert first.vae_file in written and first.t5_tokenizer_dir / "spiece.model" in written
    assert first.wav2vec_dir / "config.json" in written
    second = comfy_checkpoint(comfy_dir("bf16"), tmp_path)  # a later worker on the same volume
    assert second.prepared == first.prepared
    assert {p: p.stat().st_mtime_ns for p in second.prepared.rglob("*") if p.is_file()} == written
    assert [p.name for p in first.prepared.parent.iterdir()] == [first.prepared.name]  # no leftovers


def test_memory_counts_a_set_as_the_official_layout(official_dir, comfy_dir, tmp_path):
    """The tiers (memory.py) see the same model in either layout: the DiT and T5 to the byte;
    wav2vec2 less its CTC head, which ComfyUI's file does not carry."""
    from s2v_worker.checkpoint import read_checkpoint
    from s2v_worker.memory import model_bytes

    official = model_bytes(read_checkpoint(official_dir))
    for weights in ("bf16", "fp8_scaled"):
        ours = model_bytes(comfy_checkpoint(comfy_dir(weights), tmp_path / weights))
        assert (ours.dit_bf16, ours.dit_float8, ours.dit_blocks, ours.num_blocks, ours.t5,
                ours.t5_streamed) == (official.dit_bf16, official.dit_float8, official.dit_blocks,
                                      official.num_blocks, official.t5, official.t5_streamed)
        assert 0.9 * official.others < ours.others <= official.others


def test_fp8_weights_keep_the_files_fp8_values(comfy_dir, tmp_path, portrait_png, speech_1s):
    """WAN_S2V_WEIGHTS=fp8 with an fp8_scaled file: the DiT's FP8 Linear layers hold the file's
    FP8 values and scales as they are (never dequantized and quantized again), the layers the file
    keeps in bf16 are quantized as the official layout's are, and a job runs."""
    from s2v_worker.float8 import Float8Linear

    for layout in ("comfy", "kijai"):
        folder = comfy_dir("fp8_scaled", layout)
        pipeline = comfy_pipeline(folder, tmp_path / layout, weights="fp8")
        stored = {name: (tensor, scale) for name, tensor, scale
                  in comfy.dit_tensors(folder / file_names("fp8_scaled", layout)["dit"])}
        layers = {name: m for name, m in pipeline.denoiser.model.named_modules()
                  if isinstance(m, Float8Linear)}
        assert layers
        from_file = 0
        for name, layer in layers.items():
            tensor, scale = stored[f"{name}.weight"]
            if scale is not None:
                from_file += 1
                assert torch.equal(layer.weight.view(torch.uint8), tensor.view(torch.uint8)), name
                assert torch.equal(layer.scale.reshape(-1), scale.float().reshape(-1)), name
            else:  # kijai keeps some in bf16: quantized here, per row
                assert layer.scale.numel() == layer.out_features, name
        assert from_file > 0
    generation = parse_job({"input": {"image_url": "https://x/i.png", "audio_url": "https://x/a.wav",
                                      "sample_steps": 2, "infer_frames": 16, "max_clips": 1}}).generation
    plan = plan_job(pipeline, portrait_png, 1.0, generation)
    video = generate_video(pipeline, portrait_png, speech_1s, plan, generation, 3)
    assert torch.isfinite(video).all() and video.std() > 0.01


def test_handler_serves_a_job_from_comfyui_files(comfy_dir, portrait_png, tmp_path):
    """`python handler.py --test_input` with WAN_S2V_CKPT_DIR at a ComfyUI set: a video."""
    from test_handler import run_cli, speech_job, with_image, worker_env

    volume = tmp_path / "volume"
    volume.mkdir()
    env = worker_env(comfy_dir("fp8_scaled"), NETWORK_VOLUME_DIR=str(volume),
                     MAX_INLINE_VIDEO_BYTES="1")
    # A small MP3: the job travels as one command-line argument.
    speech = speech_excerpt(tmp_path / "speech.mp3", 1.0, "-c:a", "libmp3lame", "-b:a", "32k")
    job = with_image(speech_job(speech, sample_steps=1, infer_frames=16, max_clips=1), portrait_png)
    code, payload, log = run_cli(job, env, tmp_path)
    assert code == 0, log[-3000:]
    assert "ComfyUI files layout" in log
    assert Path(payload["output"]["video_path"]).is_file()
