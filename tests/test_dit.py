"""The worker's DiT engine against the official WanModel_S2V.forward, on the CPU with tiny random
weights: same latents, timestep and conditioning in, the same prediction out (float32 on the CPU,
where the official code computes in float32 too)."""

import pytest
import torch

from bench import fullsize  # the random-weight builders
from builder import make_tiny_checkpoint as tiny
from s2v_worker.blocks import BlockWeights
from s2v_worker.dit import DiTEngine, rope_table
from s2v_worker.float8 import FLOAT8_LAYER_SETS, Float8Weight
from s2v_worker.official import import_official, install_attention
from s2v_worker.sampling import reused_steps

_official = import_official()

LAT_H, LAT_W = 8, 12


@pytest.fixture(scope="module")
def dit():
    install_attention("sdpa")  # the official modules' attention without flash_attn, for every test
    model = _official.model_s2v.WanModel_S2V(**tiny.DIT_CONFIG).eval().requires_grad_(False)
    return fullsize.randomize_(model, seed=5)


def clip_inputs(seed: int, drop_motion_frames: bool, text_tokens: int = 7) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        context=[torch.randn(text_tokens, 4096, generator=g)], seq_len=0,
        ref_latents=torch.randn(1, 16, 1, LAT_H, LAT_W, generator=g),
        motion_latents=torch.randn(1, 16, 19, LAT_H, LAT_W, generator=g),
        cond_states=torch.randn(1, 16, 20, LAT_H, LAT_W, generator=g),
        audio_input=torch.randn(1, 25, tiny.WAV2VEC_HIDDEN, 80, generator=g),
        motion_frames=[73, 19], drop_motion_frames=drop_motion_frames)


def rel_l2(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("drop_motion_frames", [False, True])
def test_engine_matches_the_official_forward(dit, drop_motion_frames):
    install_attention("sdpa")
    inputs = clip_inputs(1, drop_motion_frames)
    engine = DiTEngine(dit)
    conditioning = engine.prepare(**inputs)
    g = torch.Generator().manual_seed(2)
    for t in (999.0, 500.0, 3.0):  # one preparation serves every step of the clip
        x = [torch.randn(16, 20, LAT_H, LAT_W, generator=g)]
        expected = dit(x, t=torch.tensor([t]), **inputs)[0]
        got = engine.forward(x, torch.tensor([t]), conditioning)[0]
        assert got.shape == expected.shape == (16, 20, LAT_H, LAT_W)
        assert torch.equal(got, expected)  # same operations on the same values: bit-identical
        assert expected.norm() > 0


def test_engine_follows_the_conditioning(dit):
    """Another prompt, audio or reference image changes the prediction (nothing is stale)."""
    engine = DiTEngine(dit)
    x = [torch.randn(16, 20, LAT_H, LAT_W, generator=torch.Generator().manual_seed(3))]
    t = torch.tensor([700.0])
    base = clip_inputs(1, False)
    reference = engine.forward(x, t, engine.prepare(**base))[0]
    for field in ("context", "audio_input", "ref_latents", "motion_latents", "cond_states"):
        changed = dict(base, **{field: clip_inputs(9, False)[field]})
        other = engine.forward(x, t, engine.prepare(**changed))[0]
        assert rel_l2(other, reference) > 1e-4, field
        assert torch.equal(other, dit(x, t=t, **changed)[0]), field


def test_rope_table_is_the_official_factors_as_cos_sin():
    angles = torch.rand(5, 3, 4, dtype=torch.float64)
    freqs = torch.polar(torch.ones_like(angles), angles)
    table = rope_table(freqs.unsqueeze(0))
    assert table.shape == (5, 1, 4, 2) and table.dtype == torch.float64
    assert torch.equal(table[:, 0, :, 0], freqs[:, 0].real) and torch.equal(table[:, 0, :, 1], freqs[:, 0].imag)


def test_float8_weights_round_trip_within_float8_precision(dit):
    weight = BlockWeights.of(dit.blocks[0]).ffn1_w
    quantized = Float8Weight.quantize(weight)
    assert quantized.weight.dtype == torch.float8_e4m3fn and quantized.scale.shape == (1, weight.shape[0])
    restored = quantized.weight.float() * quantized.scale.t()
    assert rel_l2(restored, weight.float()) < 0.05  # 3 mantissa bits
    assert restored.abs().amax(dim=1).allclose(weight.float().abs().amax(dim=1), rtol=1e-6)


@pytest.mark.parametrize("layers", sorted(FLOAT8_LAYER_SETS))
def test_fast_mode_forward_is_near_the_exact_one(dit, layers):
    """FP8 GEMMs (CPU kernels here, cuBLAS on the GPU) move the prediction by FP8 rounding only."""
    engine = DiTEngine(dit)
    conditioning = engine.prepare(**clip_inputs(1, False))
    x = [torch.randn(16, 20, LAT_H, LAT_W, generator=torch.Generator().manual_seed(4))]
    t = torch.tensor([600.0])
    exact = engine.forward(x, t, conditioning)[0]
    fast = engine.forward(x, t, conditioning, float8=layers)[0]
    assert fast.dtype == torch.float32 and torch.isfinite(fast).all()
    assert 1e-4 < rel_l2(fast, exact) < 0.1


def test_float8_copies_follow_weight_changes(dit):
    """A LoRA merge changes the DiT's weights; the runner then drops the FP8 copies."""
    engine = DiTEngine(dit)
    first = engine.float8_blocks("ffn")
    assert engine.float8_blocks("ffn") is first  # quantized once
    weight = dit.blocks[0].ffn[0].weight
    original = weight.detach().clone()
    with torch.no_grad():
        weight.mul_(2)
    try:
        engine.forget_float8()
        again = engine.float8_blocks("ffn")
        assert again is not first
        assert torch.equal(again[0].ffn1_w.scale, first[0].ffn1_w.scale * 2)
    finally:
        with torch.no_grad():
            weight.copy_(original)


def test_reused_steps_keep_the_first_and_last_steps():
    reused = reused_steps(30)
    assert len(reused) == 12 and min(reused) == 4 and max(reused) == 26
    assert not reused & {0, 1, 2, 3, 27, 28, 29}
    assert all(step - 1 not in reused for step in reused)  # never two reuses in a row
    assert reused_steps(8) == reused_steps(11) == frozenset()
