"""The memory tiers (issue 19) as pure functions: the full-size model's bytes (counted on empty
models of the real shapes, as the worker counts them from the checkpoint's headers), the tier each
card size gets, and the up-front refusal of a job that would not fit. What the tiers cost in speed
is measured on the GPU (bench/harness.py, section memory)."""
import pytest
import torch

from bench import fullsize
from s2v_worker.checkpoint import read_checkpoint
from s2v_worker.memory import (GiB, ModelBytes, activation_bytes, count_model_bytes, model_bytes,
                               plan_memory, tokens_at)
from s2v_worker.official import import_official
from s2v_worker.resolutions import RESOLUTIONS
from s2v_worker.weights import ComponentShapes


@pytest.fixture(scope="module")
def full_size() -> ModelBytes:
    """Wan2.2-S2V-14B's components, counted as model_bytes counts a real checkpoint."""
    official = import_official()
    with torch.device("meta"):
        dit = official.model_s2v.WanModel_S2V(**fullsize.DIT_CONFIG)
        t5 = official.t5.T5Encoder(**fullsize.T5_CONFIG)
        vae = official.vae.WanVAE_(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                   attn_scales=[], temperal_downsample=[False, True, True])
    shapes = ComponentShapes(
        dit={name: tuple(t.shape) for name, t in dit.state_dict().items()},
        t5={name: tuple(t.shape) for name, t in t5.state_dict().items()},
        vae_values=sum(t.numel() for t in vae.state_dict().values()),
        wav2vec_values=315_000_000)  # wav2vec2-large: about 315 M values
    return count_model_bytes(shapes)


def test_the_full_size_model_in_each_form(full_size):
    assert full_size.dit_bf16 / GiB == pytest.approx(30.35, abs=0.05)  # 16.3 B parameters
    assert full_size.dit_float8 / GiB == pytest.approx(19.2, abs=0.1)  # 12.0 B of them in FP8
    assert full_size.t5 / GiB == pytest.approx(10.6, abs=0.1)
    assert full_size.t5_streamed < 1 * GiB
    assert full_size.others / GiB == pytest.approx(1.65, abs=0.05)  # VAE and wav2vec2, float32


@pytest.mark.parametrize("card_gib, weights, t5_streamed, streamed_blocks, serves", [
    (139, "bf16", False, 0, ("720p", "480p")),  # H200: as today
    (79, "bf16", False, 0, ("720p", "480p")),  # 80 GB cards
    (47, "fp8", True, 0, ("720p", "480p")),  # a 48 GB card's whole memory
    (44, "fp8", True, 0, ("720p", "480p")),  # the same, capped a little lower
    (22, "fp8", True, 27, ("480p",)),  # 24 GB cards: two thirds of the blocks streamed
])
def test_each_card_size_gets_its_tier(full_size, card_gib, weights, t5_streamed, streamed_blocks,
                                      serves):
    plan = plan_memory(card_gib * GiB, full_size, "auto")
    assert (plan.weights, plan.t5_streamed, plan.resolutions) == (weights, t5_streamed, serves)
    assert plan.streamed_blocks == pytest.approx(streamed_blocks, abs=2)
    largest = activation_bytes(tokens_at(serves[0], dict(RESOLUTIONS)))
    assert plan.resident_bytes + largest <= card_gib * GiB  # what it serves fits
    assert plan.refusal(tokens_at(serves[0], dict(RESOLUTIONS)), serves[0]) is None


def test_a_job_that_does_not_fit_is_refused_with_what_it_needs(full_size):
    plan = plan_memory(22 * GiB, full_size, "auto")
    tokens = tokens_at("720p", dict(RESOLUTIONS))
    message = plan.refusal(tokens, "720p")
    needed = activation_bytes(tokens) / GiB
    assert message.startswith(f"this job needs about {needed:.1f} GiB of GPU memory for its 720p "
                              f"clips ({tokens} DiT tokens)")
    assert "use 480p" in message


def test_the_weights_setting_restricts_the_tiers(full_size):
    assert plan_memory(139 * GiB, full_size, "fp8").weights == "fp8"
    forced = plan_memory(44 * GiB, full_size, "bf16")  # bf16 on a 48 GB card: 480p only
    assert (forced.weights, forced.t5_streamed, forced.resolutions) == ("bf16", True, ("480p",))
    with pytest.raises(ValueError, match=r"cannot run in 8\.0 GiB of GPU memory"):
        plan_memory(8 * GiB, full_size, "auto")


def test_the_bytes_come_from_the_checkpoints_headers(tiny_checkpoint):
    sizes = model_bytes(read_checkpoint(tiny_checkpoint))
    dit = weights_of(tiny_checkpoint)
    assert sizes.dit_bf16 == 2 * sum(t.numel() for t in dit.state_dict().values())
    assert sizes.num_blocks == len(dit.blocks)
    assert sizes.dit_float8 < sizes.dit_bf16 and sizes.t5_streamed < sizes.t5


def weights_of(folder):
    from s2v_worker.weights import load_dit

    return load_dit(read_checkpoint(folder), torch.device("cpu"), torch.bfloat16)
