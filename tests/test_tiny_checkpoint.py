"""builder/make_tiny_checkpoint.py: layout, determinism, and loading through the official classes.

One checkpoint is built per test session (a second and third only for the determinism tests); each
model is then loaded the way the worker loads it and run once on tiny CPU inputs.
"""
from __future__ import annotations

import importlib
import json
import shutil
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from builder import make_tiny_checkpoint as builder
from s2v_worker.checkpoint import (DIT_INDEX as INDEX, T5_CHECKPOINT as T5_FILE,
                                   T5_TOKENIZER_DIR as TOKENIZER_DIR, VAE_CHECKPOINT as VAE_FILE,
                                   WAV2VEC_DIR)
from s2v_worker.official import import_official, sdpa_attention
from s2v_worker.weights import infer_t5_architecture

SHARDS = [f"diffusion_pytorch_model-{i:05d}-of-00004.safetensors" for i in range(1, 5)]
EXPECTED_FILES = [
    "config.json", *SHARDS, INDEX, T5_FILE, VAE_FILE,
    f"{TOKENIZER_DIR}/tokenizer.json", f"{TOKENIZER_DIR}/tokenizer_config.json",
    f"{TOKENIZER_DIR}/special_tokens_map.json",
    f"{WAV2VEC_DIR}/config.json", f"{WAV2VEC_DIR}/model.safetensors",
    f"{WAV2VEC_DIR}/preprocessor_config.json", f"{WAV2VEC_DIR}/vocab.json",
    f"{WAV2VEC_DIR}/tokenizer_config.json", f"{WAV2VEC_DIR}/special_tokens_map.json",
    "tiny-checkpoint.json",
]


# --- helpers -----------------------------------------------------------------------------------------

def dit_state(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for shard in SHARDS:
        state.update(load_file(str(folder / shard)))
    return state


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, keyed by file and name."""
    tensors = {f"dit/{k}": v for k, v in dit_state(folder).items()}
    for file in (T5_FILE, VAE_FILE):
        tensors.update({f"{file}/{k}": v for k, v in
                        torch.load(folder / file, map_location="cpu", weights_only=True).items()})
    wav2vec = load_file(str(folder / WAV2VEC_DIR / "model.safetensors"))
    tensors.update({f"wav2vec2/{k}": v for k, v in wav2vec.items()})
    return tensors


@pytest.fixture(scope="session")
def official() -> types.SimpleNamespace:
    """The official modules as the worker imports them (s2v_worker.official), and the two more
    these tests use directly."""
    modules = import_official()
    return types.SimpleNamespace(**vars(modules),
                                 tokenizers=importlib.import_module("wan.modules.tokenizers"),
                                 model=importlib.import_module("wan.modules.model"))


@pytest.fixture(scope="session")
def ckpt(tiny_checkpoint) -> Path:
    """The session's tiny checkpoint (seed 0), which the other tests load."""
    return tiny_checkpoint


# --- layout ------------------------------------------------------------------------------------------

def test_every_file_of_the_official_layout_is_written(ckpt):
    missing = [name for name in EXPECTED_FILES if not (ckpt / name).is_file()]
    assert missing == []
    assert not (ckpt / builder.STAGING_DIR).exists()


def test_index_maps_exactly_the_tensors_of_the_four_shards(ckpt):
    index = json.loads((ckpt / INDEX).read_text())
    keys_by_shard = {shard: set(load_file(str(ckpt / shard))) for shard in SHARDS}
    assert all(keys_by_shard.values()), "every shard holds tensors"
    assert sorted(set(index["weight_map"].values())) == SHARDS
    for shard, keys in keys_by_shard.items():
        assert {k for k, v in index["weight_map"].items() if v == shard} == keys
    state = dit_state(ckpt)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    assert {t.dtype for t in state.values()} == {torch.bfloat16}


def test_configs_and_marker(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    assert config["_class_name"] == "WanModel_S2V" and config["_diffusers_version"]
    assert config["model_type"] == "s2v" and config["enable_framepack"] and not config["enable_motioner"]
    wav2vec = json.loads((ckpt / WAV2VEC_DIR / "config.json").read_text())
    assert wav2vec["num_hidden_layers"] == 24 and config["audio_dim"] == wav2vec["hidden_size"]
    marker = json.loads((ckpt / "tiny-checkpoint.json").read_text())
    assert marker["random_weights"] is True and "noise" in marker["note"]
    assert set(marker["max_area"]) == {"480p", "720p"}
    assert all(isinstance(v, int) and v >= 64 * 64 for v in marker["max_area"].values())


def test_no_dit_tensor_is_left_constant(ckpt):
    # zero_init leaves the audio injector outputs, cond encoder, ... at zero; the builder must not.
    constant = [name for name, t in dit_state(ckpt).items() if t.numel() > 1 and t.float().std() == 0]
    assert constant == []


def test_shards_are_contiguous_and_non_empty():
    assignment = builder.shard_assignment([1, 100, 1, 1, 1, 50, 50], 4)
    assert assignment == sorted(assignment) and set(assignment) == {0, 1, 2, 3}
    assert builder.shard_assignment([5, 5, 5, 5], 4) == [0, 1, 2, 3]


# --- determinism and overwriting ---------------------------------------------------------------------

def test_same_seed_same_tensors_other_seed_different(ckpt, tmp_path):
    first = all_tensors(ckpt)
    again = all_tensors(builder.make_tiny_checkpoint(tmp_path / "again", seed=0))
    other = all_tensors(builder.make_tiny_checkpoint(tmp_path / "other", seed=1))
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert all(first[k].dtype == other[k].dtype and first[k].shape == other[k].shape for k in first)
    assert not any(torch.equal(first[k], other[k]) for k in first if first[k].numel() > 1)
    for name in ("config.json", INDEX, f"{TOKENIZER_DIR}/tokenizer.json"):
        assert (ckpt / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


def test_rebuilds_in_place_but_refuses_a_foreign_folder(ckpt, tmp_path):
    folder = Path(shutil.copytree(ckpt, tmp_path / "ckpt"))
    before = load_file(str(folder / SHARDS[0]))
    builder.make_tiny_checkpoint(folder, seed=1)
    assert not all(torch.equal(before[k], v) for k, v in load_file(str(folder / SHARDS[0])).items())

    real_looking = tmp_path / "real"
    real_looking.mkdir()
    (real_looking / "config.json").write_text("{}")
    with pytest.raises(FileExistsError):
        builder.make_tiny_checkpoint(real_looking)
    assert (real_looking / "config.json").read_text() == "{}"


# --- loading through the official classes, and one forward each --------------------------------------

def test_tokenizer_is_umt5_like(ckpt):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(ckpt / TOKENIZER_DIR))
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    ids = tokenizer("a man talking to the camera", add_special_tokens=True).input_ids
    assert ids[-1] == 1 and 2 not in ids
    assert tokenizer("a man", add_special_tokens=False).input_ids[-1] != 1
    negative = tokenizer(builder.NEGATIVE_PROMPT).input_ids
    assert 2 not in negative, "every character of the default negative prompt is in the vocabulary"


def test_t5_loads_strict_and_encodes(ckpt, official):
    state = torch.load(ckpt / T5_FILE, map_location="cpu", weights_only=True)
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    # The official builder with the sizes the worker reads from the checkpoint (loading.load_pipeline).
    arch = infer_t5_architecture(state)
    model = official.t5.umt5_xxl(encoder_only=True, return_tokenizer=False, dtype=torch.bfloat16,
                                 device="cpu", **arch)
    model.load_state_dict(state, strict=True)
    model = model.eval()

    # The official tokenizer wrapper, as T5EncoderModel uses it.
    tokenizer = official.tokenizers.HuggingfaceTokenizer(
        name=str(ckpt / TOKENIZER_DIR), seq_len=512, clean="whitespace")
    assert tokenizer.vocab_size <= arch["vocab_size"]
    ids, mask = tokenizer(["a woman singing", builder.NEGATIVE_PROMPT], return_mask=True,
                          add_special_tokens=True)
    with torch.no_grad():
        out = model(ids, mask)
    assert out.shape == (2, 512, arch["dim"]) and torch.isfinite(out).all()
    # The DiT's text projection is fixed at 4096 inputs (text_dim is not read from config.json).
    assert arch["dim"] == 4096


def test_vae_loads_strict_and_round_trips(ckpt, official):
    state = torch.load(ckpt / VAE_FILE, map_location="cpu", weights_only=True)
    dim = state["encoder.conv1.weight"].shape[0]
    model = official.vae.WanVAE_(dim=dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                    attn_scales=[], temperal_downsample=[False, True, True],
                                    dropout=0.0)
    model.load_state_dict(state, strict=True)
    model.eval()
    scale = [torch.zeros(16), torch.ones(16)]
    video = torch.rand(1, 3, 5, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = model.encode(video, scale)
        decoded = model.decode(latents, scale)
    assert latents.shape == (1, 16, 2, 8, 8) and torch.isfinite(latents).all()
    assert decoded.shape == (1, 3, 5, 64, 64) and torch.isfinite(decoded).all()


def test_wav2vec2_loads_and_gives_25_hidden_states(ckpt):
    from transformers import Wav2Vec2ForCTC, Wav2Vec2Processor

    folder = str(ckpt / WAV2VEC_DIR)
    processor = Wav2Vec2Processor.from_pretrained(folder)
    model = Wav2Vec2ForCTC.from_pretrained(folder).eval()
    audio = torch.randn(16000, generator=torch.Generator().manual_seed(0)).numpy() * 0.1
    inputs = processor(audio, sampling_rate=16000, return_tensors="pt").input_values
    with torch.no_grad():
        out = model(inputs, output_hidden_states=True)
    hidden = model.config.hidden_size
    assert len(out.hidden_states) == 25
    assert all(h.shape == (1, 49, hidden) for h in out.hidden_states)  # 50 frames/s
    assert out.logits.shape == (1, 49, len(processor.tokenizer))
    # The weights on disk are the ones the model holds (no key was silently re-initialised).
    on_disk = load_file(str(ckpt / WAV2VEC_DIR / "model.safetensors"))
    assert torch.equal(model.lm_head.weight, on_disk["lm_head.weight"])


def test_dit_loads_with_diffusers_and_runs(ckpt, official, monkeypatch):
    model = official.model_s2v.WanModel_S2V.from_pretrained(str(ckpt), torch_dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    on_disk = dit_state(ckpt)
    loaded = model.state_dict()
    assert loaded.keys() == on_disk.keys()
    assert all(torch.equal(loaded[k], on_disk[k]) for k in on_disk)

    for module in (official.model, official.model_s2v):
        monkeypatch.setattr(module, "flash_attention", sdpa_attention)
    model = model.float().eval()
    config = model.config
    g = torch.Generator().manual_seed(0)
    infer_frames, motion_frames = 8, 73          # official motion_frames; 8 video frames per clip
    lat_motion = (motion_frames + 3) // 4         # 19
    lat_frames = (infer_frames + 3 + motion_frames) // 4 - lat_motion  # 2
    h = w = 8                                     # a 64x64 video
    with torch.no_grad():
        out = model(
            [torch.randn(16, lat_frames, h, w, generator=g)],
            t=torch.tensor([500.0]),
            context=[torch.randn(7, 4096, generator=g)],
            seq_len=lat_frames * h * w // 4,
            ref_latents=torch.randn(1, 16, 1, h, w, generator=g),
            motion_latents=torch.randn(1, 16, lat_motion, h, w, generator=g),
            cond_states=torch.zeros(1, config.cond_dim, lat_frames, h, w),
            audio_input=torch.randn(1, 25, config.audio_dim, infer_frames, generator=g),
            motion_frames=[motion_frames, lat_motion],
            drop_motion_frames=False,
        )
    assert len(out) == 1 and out[0].shape == (16, lat_frames, h, w)
    assert torch.isfinite(out[0]).all() and out[0].std() > 0
