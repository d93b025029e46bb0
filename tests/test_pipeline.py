"""The pipeline on the tiny random-weight checkpoint, on the CPU: planning, shapes, seeds, guidance,
stopping, and the attention dispatch against a plain softmax reference."""
import dataclasses
import math

import pytest
import torch

from conftest import generate_video, plan_job, speech_excerpt
from s2v_worker.errors import JobStopped
from s2v_worker.estimate import ClipTiming, DiTSpeed, dit_calls_per_step
from s2v_worker.job import MAX_SHIFT, MIN_SHIFT, parse_job, unipc_max_shift
from s2v_worker.official import sdpa_attention
from s2v_worker.planning import (WARM_UP_IMAGE_SIZE, dit_tokens, latent_frames, plan_clip_count,
                                 video_size)
from s2v_worker import pipeline as pipeline_module
from s2v_worker.pose import pose_latents
from s2v_worker.sampling import make_scheduler


@pytest.fixture(scope="module")
def pipeline(tiny_pipeline):
    return tiny_pipeline


@pytest.fixture(scope="module")
def speech_2s(tmp_path_factory):
    return speech_excerpt(tmp_path_factory.mktemp("audio") / "speech_2s.wav", 2.0, "-c:a", "pcm_f32le")


def settings(**fields):
    base = {"image_url": "https://x/i.png", "audio_url": "https://x/a.wav", "resolution": "480p",
            "sample_steps": 2, "infer_frames": 16}
    return parse_job({"input": {**base, **fields}}).generation


def test_clip_count_covers_the_audio_and_the_dropped_frames():
    assert plan_clip_count(7.3, 80, 3) == 2      # 117 frames + 3 dropped > 80
    assert plan_clip_count(4.8, 80, 3) == 1      # 77 + 3 = 80 fits one clip exactly
    assert plan_clip_count(4.85, 80, 3) == 2     # one frame more needs a second clip
    assert plan_clip_count(4.85, 80, 0) == 1
    assert plan_clip_count(300, 80, 3, max_clips=2) == 2
    for seconds in (0.1, 1.0, 4.99, 5.0, 12.34, 60.0):
        clips = plan_clip_count(seconds, 80, 3)
        assert clips * 80 - 3 >= math.ceil(seconds * 16 - 1e-6) > (clips - 1) * 80 - 3


def test_plan_sizes_the_official_way_inside_the_declared_areas(pipeline, portrait_png):
    plan_480 = plan_job(pipeline, portrait_png, 7.3, settings(infer_frames=80))
    plan_720 = plan_job(pipeline, portrait_png, 7.3, settings(infer_frames=80, resolution="720p"))
    for plan, area in ((plan_480, 64 * 64), (plan_720, 128 * 64)):
        assert plan.height % 64 == 0 and plan.width % 64 == 0 and plan.height * plan.width <= area
        assert (plan.num_clips, plan.native_frames) == (2, 157)
        assert plan.video_seconds == pytest.approx(7.3)
    assert plan_720.height * plan_720.width > plan_480.height * plan_480.width
    capped = plan_job(pipeline, portrait_png, 7.3, settings(infer_frames=80, max_clips=1))
    assert capped.num_clips == 1 and capped.video_seconds == pytest.approx(77 / 16)
    first_frame = plan_job(pipeline, portrait_png, 7.3, settings(infer_frames=80, init_first_frame=True))
    assert first_frame.dropped_frames == 0


def two_runs_settings():
    return settings(prompt="a person talks")


@pytest.fixture(scope="module")
def two_runs(pipeline, portrait_png, speech_2s):
    """Seed 7 twice and seed 8 once (its first clip), 2 s of speech, 16 frames a clip: 3 clips,
    2 guided steps."""
    gen = two_runs_settings()
    plan = plan_job(pipeline, portrait_png, 2.0, gen)
    steps, pieces = [], []
    timings = pipeline.generate(portrait_png, speech_2s, plan, gen, 7, on_frames=pieces.append,
                                on_step=lambda *a: steps.append(a))
    first = torch.cat(pieces, dim=1)
    again = generate_video(pipeline, portrait_png, speech_2s, plan, gen, 7)
    # The first clip is enough to tell seeds apart.
    other = generate_video(pipeline, portrait_png, speech_2s,
                           dataclasses.replace(plan, num_clips=1), gen, 8)
    return plan, steps, first, again, other, timings


def test_output_shape_range_and_progress(two_runs):
    plan, steps, first, _, _, timings = two_runs
    assert plan.num_clips == 3  # ceil((32 + 3) / 16)
    assert first.shape == (3, 3 * 16 - 3, plan.height, plan.width)
    assert first.dtype == torch.float32 and first.abs().max() <= 1.0
    assert first.std() > 0.01  # random weights give noise, not a constant
    assert steps == [(c, 3, s, 2) for c in range(3) for s in range(2)]
    assert set(timings) == {"text_encoding_s", "audio_encoding_s", "vae_encoding_s",
                                  "sampling_s", "decoding_s"}


def test_same_seed_same_frames_other_seed_other_frames(two_runs):
    _, _, first, again, other, _ = two_runs
    assert torch.equal(first, again)
    assert other.shape[1] == 16 - 3
    assert (first[:, :16 - 3] - other).abs().mean() > 1e-3


# A few pixels of `two_runs`' first video (conftest's portrait, 2 s of the speech fixture, seed 7:
# 3 clips of 16 frames, 2 guided UniPC steps, on the tiny checkpoint built with seed 0), as
# diffusers pins `expected_slice`: video[:, frame, PINNED_ROW, PINNED_COLUMNS] for each frame in
# PINNED_FRAMES, one per clip. Elsewhere the tiny job is only compared with itself, so a change to
# the math (sampler, DiT, VAE, audio or text path, planning) would pass unnoticed on the CPU; these
# values fail it. 1e-4 is far above run-to-run noise (1e-5 between 1 and 2 CPU threads) and far
# below what a changed computation moves. A failure means the numbers changed: if that is meant
# (a new torch or wan22, a deliberate change), say why in the commit (bench/faithfulness.py checks
# the GPU path against the official pipeline) and paste the values the failure prints here.
PINNED_FRAMES, PINNED_ROW, PINNED_COLUMNS = (0, 20, 44), 31, slice(30, 33)
PINNED_VALUES = torch.tensor([
    [[-0.21197, -0.20563, -0.20095], [-0.19673, -0.19653, -0.19791], [-0.18794, -0.18449, -0.18982]],
    [[0.28356, 0.28831, 0.27262], [0.12186, 0.12659, 0.13023], [0.12911, 0.13278, 0.13103]],
    [[0.29657, 0.29235, 0.3053], [0.14456, 0.13942, 0.13797], [0.10921, 0.1026, 0.10864]]])


def test_pinned_pixels_of_a_whole_tiny_job(two_runs):
    _, _, first, _, _, _ = two_runs
    values = first[:, list(PINNED_FRAMES), PINNED_ROW, PINNED_COLUMNS]
    assert values.shape == (3, 3, 3) and values.std() > 0.01  # noise from random weights
    now = "PINNED_VALUES = torch.tensor(" + repr([[[round(v, 5) for v in row] for row in channel]
                                                 for channel in values.tolist()]) + ")"
    torch.testing.assert_close(values, PINNED_VALUES, rtol=0, atol=1e-4,
                               msg=lambda message: f"{message}\nthe values now:\n{now}")


def count_model_calls(pipeline, portrait_png, audio, **fields):
    calls = []
    handle = pipeline.denoiser.model.patch_embedding.register_forward_pre_hook(
        lambda *a: calls.append(1))  # one patch embedding of the latents per DiT call
    before = pipeline.denoiser.dit_calls
    try:
        gen = settings(**fields)
        plan = plan_job(pipeline, portrait_png, 0.5, gen)
        generate_video(pipeline, portrait_png, audio, plan, gen, 1)
    finally:
        handle.remove()
    # prepare() embeds the reference image once per clip and branch: the rest are DiT calls
    guided = gen.guidance_scale > 1
    calls = len(calls) - plan.num_clips * (2 if guided else 1)
    assert calls == pipeline.denoiser.dit_calls - before
    return calls, plan.num_clips


def test_guidance_one_or_less_halves_the_model_calls(pipeline, portrait_png, speech_2s):
    guided, clips = count_model_calls(pipeline, portrait_png, speech_2s, guidance_scale=4.5)
    unguided, _ = count_model_calls(pipeline, portrait_png, speech_2s, guidance_scale=1.0)
    assert (guided, unguided) == (2 * 2 * clips, 2 * clips)
    # what the duration estimate counts
    assert (guided, unguided) == (clips * sum(dit_calls_per_step(2, True, False)),
                                  clips * sum(dit_calls_per_step(2, False, False)))


def test_the_estimate_counts_the_calls_a_step_cached_job_makes(pipeline, portrait_png, speech_2s,
                                                               monkeypatch):
    """12 steps with the step cache (fast mode's reuse, run here without FP8): steps 4, 6 and 8
    reuse the previous prediction."""
    monkeypatch.setattr(pipeline.denoiser, "speed", DiTSpeed())
    # model_copy skips validation: the exact speed with the step cache, which a job cannot ask for
    gen = settings(sample_steps=12, max_clips=1).model_copy(update={"step_cache": True})
    plan = plan_job(pipeline, portrait_png, 2.0, gen)

    def estimate_now():
        return pipeline.denoiser.estimate(plan.dit_tokens, plan.num_clips, gen.sample_steps,
                                          gen.guidance_scale > 1, gen.step_cache)

    assert estimate_now() is None  # nothing measured yet
    before = pipeline.denoiser.dit_calls
    generate_video(pipeline, portrait_png, speech_2s, plan, gen, 1)
    estimate = estimate_now()
    assert estimate.calls == pipeline.denoiser.dit_calls - before == 2 * (12 - 3)
    assert estimate.tokens == dit_tokens(plan.height, plan.width, plan.frames_per_clip)
    assert 0 < estimate.seconds_per_call < 60  # this job's own measurement
    assert estimate.remaining_s(0, 1, 11) == 0
    # before the first step, the clip's preparation is behind it
    assert estimate.remaining_s(0, 1, -1) == pytest.approx(
        estimate.seconds - estimate.overhead_per_clip_s)


def steady(per_call: float, overhead: float = 0.0, calls: int = 60) -> ClipTiming:
    return ClipTiming(calls=calls, steps_s=per_call * calls, overhead_s=overhead)


def test_dit_speed_scales_a_measurement_to_other_token_counts():
    speed = DiTSpeed(sizes=3)
    assert speed.rates(29_120) is None
    speed.record(29_120, steady(2.89, overhead=1.0))  # an H100's 480p forward (2026-11-27)
    assert speed.rates(29_120) == pytest.approx((2.89, 1.0))
    per_call, overhead = speed.rates(54_400)  # its 720p forward; preparation by the tokens
    assert per_call == pytest.approx(7.97, rel=0.01) and overhead == pytest.approx(54_400 / 29_120)
    speed.record(54_400, steady(8.5))  # a measurement at that size wins over the scaling
    assert speed.rates(54_400)[0] == pytest.approx(8.5)
    assert speed.rates(50_000)[0] == pytest.approx(8.5 * (50_000 + 50_000**2 / 24_000)
                                                   / (54_400 + 54_400**2 / 24_000))
    speed.record(1_000, steady(0.1))
    speed.record(2_000, steady(0.2))  # a fourth size: the oldest (29,120) is forgotten
    assert speed.rates(29_120)[0] != pytest.approx(2.89)


def test_one_odd_job_moves_neither_rate():
    """A median over the recent clips, the calls' over the clips of MIN_STEADY_CALLS or more."""
    speed = DiTSpeed()
    for _ in range(3):
        speed.record(1_000, steady(0.25, overhead=0.5))
    speed.record(1_000, ClipTiming(calls=1, steps_s=3.0, overhead_s=0.5))  # a 1-step job
    speed.record(1_000, steady(2.5, overhead=9.0))  # a clip slowed by something else
    assert speed.rates(1_000) == pytest.approx((0.25, 0.5))
    only_short = DiTSpeed()  # until a longer clip is measured, short ones are all there is
    only_short.record(1_000, ClipTiming(calls=2, steps_s=1.0, overhead_s=0.1))
    assert only_short.rates(1_000) == pytest.approx((0.5, 0.1))


def test_warm_up_measures_a_call_for_the_first_jobs_estimate(pipeline, monkeypatch):
    monkeypatch.setattr(pipeline.denoiser, "speed", DiTSpeed())
    pipeline.warm_up(("480p",), frames_per_clip=16)
    height, width = video_size(*WARM_UP_IMAGE_SIZE, pipeline.checkpoint.max_area["480p"], "480p")
    per_call, overhead = pipeline.denoiser.speed.rates(dit_tokens(height, width, 16))
    assert per_call > 0 and overhead >= 0


def test_dpm_solver_runs(pipeline, portrait_png, speech_2s):
    gen = settings(solver="dpm++", max_clips=1)
    plan = plan_job(pipeline, portrait_png, 2.0, gen)
    assert generate_video(pipeline, portrait_png, speech_2s, plan, gen, 3).shape[1] == 16 - 3


def test_a_callback_can_stop_sampling_between_steps(pipeline, portrait_png, speech_2s):
    seen = []

    def stop_at_second_step(clip, clips, step, steps):
        seen.append((clip, step))
        if step == 1:
            raise JobStopped("stop")

    gen = settings()
    with pytest.raises(JobStopped):
        generate_video(pipeline, portrait_png, speech_2s, plan_job(pipeline, portrait_png, 2.0, gen),
                       gen, 1, on_step=stop_at_second_step)
    assert seen == [(0, 0), (0, 1)]


# --- attention dispatch ----------------------------------------------------------------------------

def reference_attention(q, k, v, k_lens=None):
    q, k, v = (t.to(torch.bfloat16).float().transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if k_lens is not None:
        mask = torch.arange(k.shape[2])[None, :] < k_lens[:, None]
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


def test_sdpa_attention_matches_softmax_and_masks_keys_past_k_lens():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 7, 3, 16, generator=g) for _ in range(3))
    k_lens = torch.tensor([5, 7])
    out = sdpa_attention(q, k, v, k_lens=k_lens)
    assert out.shape == q.shape and out.dtype == torch.float32  # back in q's dtype, as upstream
    torch.testing.assert_close(out, reference_attention(q, k, v, k_lens), atol=2e-2, rtol=2e-2)
    # keys past k_lens must not matter
    k2, v2 = k.clone(), v.clone()
    k2[0, 5:], v2[0, 5:] = 100.0, -100.0
    torch.testing.assert_close(sdpa_attention(q, k2, v2, k_lens=k_lens)[0], out[0])
    # full lengths behave like no lengths
    torch.testing.assert_close(sdpa_attention(q, k, v, k_lens=torch.tensor([7, 7])),
                               sdpa_attention(q, k, v))


def test_sdpa_attention_refuses_what_it_cannot_do_exactly():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(NotImplementedError):
        sdpa_attention(q, q, q, window_size=(2, 2))
    with pytest.raises(NotImplementedError):
        sdpa_attention(q, q, q, q_lens=torch.tensor([3]))


def test_skipping_the_unread_first_motion_encode_changes_no_frame(pipeline, portrait_png, speech_2s,
                                                                  monkeypatch):
    """With the first clip's motion frames dropped, the worker does not VAE-encode the 73 blank
    motion frames (nothing reads them); encoding them as upstream does gives the same video."""
    gen = settings(prompt="a person talks", max_clips=2)
    plan = plan_job(pipeline, portrait_png, 2.0, gen)
    encoded = []
    encode = pipeline.vae.encode
    monkeypatch.setattr(pipeline.vae, "encode", lambda videos: (encoded.append(1), encode(videos))[1])
    skipped = generate_video(pipeline, portrait_png, speech_2s, plan, gen, 11)
    calls_skipped = len(encoded)
    monkeypatch.setattr(pipeline, "first_motion_latents",
                        lambda pixels, dropped: torch.stack(pipeline.vae.encode(pixels)))
    upstream = generate_video(pipeline, portrait_png, speech_2s, plan, gen, 11)
    assert len(encoded) - calls_skipped == calls_skipped + 1  # upstream: one encode more
    assert torch.equal(skipped, upstream)


def record_dit_conditioning(pipeline, monkeypatch) -> list[torch.Tensor]:
    """The cond_states (pose latents) of every DiTEngine.prepare call, one per clip and branch."""
    seen = []
    prepare = pipeline.denoiser.engine.prepare

    def recording_prepare(**inputs):
        seen.append(inputs["cond_states"].clone())
        return prepare(**inputs)

    monkeypatch.setattr(pipeline.denoiser.engine, "prepare", recording_prepare)
    return seen


def test_without_a_pose_video_the_dit_gets_zero_pose_latents_and_no_pose_work(
        pipeline, portrait_png, speech_2s, monkeypatch):
    """Upstream VAE-encodes infer_frames + 1 blank pose frames and multiplies the latents by 0;
    the worker hands the DiT zeros of that shape itself: no pose decoding, no extra VAE encode."""
    gen = settings(max_clips=2)  # guided: each clip prepares a conditional and an unconditional branch
    plan = plan_job(pipeline, portrait_png, 2.0, gen)
    seen = record_dit_conditioning(pipeline, monkeypatch)
    encoded_frames = []
    encode = pipeline.vae.encode
    monkeypatch.setattr(pipeline.vae, "encode",
                        lambda videos: (encoded_frames.append(videos[0].shape[1]), encode(videos))[1])

    def no_pose_work(*args, **kwargs):
        raise AssertionError("pose conditioning computed without a pose video")

    monkeypatch.setattr(pipeline_module, "pose_latents", no_pose_work)
    monkeypatch.setattr(pipeline, "load_pose_cond", no_pose_work)
    generate_video(pipeline, portrait_png, speech_2s, plan, gen, 1)

    _, lat_frames = latent_frames(16)
    assert lat_frames == (16 + 3 + 73) // 4 - (73 + 3) // 4 == 4  # WanS2V.generate's count
    assert len(seen) == 2 * plan.num_clips == 4
    for cond_states in seen:
        assert cond_states.shape == (1, 16, lat_frames, plan.height // 8, plan.width // 8)
        assert cond_states.dtype == pipeline.param_dtype and not cond_states.any()
    # The reference image (1 frame), then the second clip's motion frames (73): no 17-frame pose clip.
    assert encoded_frames == [1, pipeline.motion_frames]


def test_with_a_pose_video_each_clip_conditions_the_dit_on_its_own_pose_latents(
        pipeline, portrait_png, speech_2s, monkeypatch, tmp_path):
    gen = settings(max_clips=2)
    plan = plan_job(pipeline, portrait_png, 2.0, gen)
    seen = record_dit_conditioning(pipeline, monkeypatch)
    _, lat_frames = latent_frames(16)
    shape = (1, 16, lat_frames, plan.height // 8, plan.width // 8)
    per_clip = [torch.full(shape, float(r + 1)) for r in range(plan.num_clips)]
    asked = []
    monkeypatch.setattr(pipeline_module, "pose_latents",
                        lambda path, plan_, vae, dtype, field: (asked.append((path, plan_, field)),
                                                                per_clip)[1])
    pose = tmp_path / "pose.mp4"  # never opened: pose_latents is replaced
    generate_video(pipeline, portrait_png, speech_2s, plan, gen, 1, pose_video_path=pose,
                   pose_video_field="pose_video_url")
    assert asked == [(pose, plan, "pose_video_url")]
    # clip r's two branches get clip r's latents, in the DiT's dtype
    assert [int(c.unique().item()) for c in seen] == [1, 1, 2, 2]
    assert all(c.shape == shape and c.dtype == pipeline.param_dtype for c in seen)


def test_the_vae_decoded_in_pieces_is_the_whole_decode(pipeline):
    """decode_chunks (what lets the MP4 encoder start during the decode) yields the pieces of
    the very tensor the official decode returns."""
    z = torch.randn(16, 5, 8, 8, generator=torch.Generator().manual_seed(0))
    whole = pipeline.vae.decode([z])[0]
    pieces = list(pipeline.vae.decode_chunks(z))
    assert [p.shape[1] for p in pieces] == [1, 4, 4, 4, 4]
    assert torch.equal(torch.cat(pieces, dim=1), whole)


def test_the_vae_warm_up_leaves_no_state_behind(pipeline):
    """The start-up's VAE warm-up (a small encode and decode, loading.load_vae) changes no later
    encode or decode: the official VAE keeps a feature cache between its calls."""
    from s2v_worker.pipeline import warm_up_vae

    pixels = torch.rand(3, 5, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    before = pipeline.vae.encode([pixels])[0], torch.cat(list(pipeline.vae.decode_chunks(z)), dim=1)
    assert warm_up_vae(pipeline.vae) > 0
    after = pipeline.vae.encode([pixels])[0], torch.cat(list(pipeline.vae.decode_chunks(z)), dim=1)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def run_scheduler(pipeline, solver: str, steps: int, shift: float) -> torch.Tensor:
    """The worker's scheduler (the official classes) through every step, on random predictions."""
    scheduler, timesteps = make_scheduler(solver, steps, shift, pipeline.device)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 2, 4, 4, generator=generator)
    for t in timesteps:
        prediction = torch.randn(latents.shape, generator=generator)
        latents = scheduler.step(prediction.unsqueeze(0), t, latents.unsqueeze(0), return_dict=False,
                                 generator=generator)[0].squeeze(0)
    return latents


@pytest.mark.parametrize("steps", [2, 5, 12, 20, 30, 50, 100])
def test_unipc_runs_at_its_shift_ceiling_and_fails_just_above_it(pipeline, steps):
    limit = unipc_max_shift(steps)
    for shift in (MIN_SHIFT, min(limit, MAX_SHIFT)):
        assert torch.isfinite(run_scheduler(pipeline, "unipc", steps, shift)).all()
    with pytest.raises(AssertionError):  # the official solver's own failure, which job.py prevents
        run_scheduler(pipeline, "unipc", steps, limit * 1.01)


@pytest.mark.parametrize("steps", [1, 2, 30, 100])
def test_dpm_runs_across_the_whole_accepted_shift_range(pipeline, steps):
    for shift in (MIN_SHIFT, 1.0, MAX_SHIFT):
        assert torch.isfinite(run_scheduler(pipeline, "dpm++", steps, shift)).all()


@pytest.mark.parametrize("size", [(192, 256), (1280, 720), (720, 1280), (500, 16), (3000, 2000), (64, 64)])
def test_video_size_sizes_as_the_official_get_gen_size(pipeline, tmp_path, size):
    from PIL import Image

    path = tmp_path / "image.png"
    Image.new("RGB", size).save(path)
    for resolution in ("480p", "720p"):
        max_area = pipeline.checkpoint.max_area[resolution]
        assert video_size(*size, max_area, resolution) == pipeline.get_gen_size(
            size=None, max_area=max_area, ref_image_path=str(path), pre_video_path=None)


def test_video_size_refuses_what_the_official_sizing_makes_zero_wide(pipeline, tmp_path):
    from PIL import Image

    from s2v_worker.job import JobInputError

    path = tmp_path / "strip.png"
    Image.new("RGB", (1000, 16)).save(path)
    official = pipeline.get_gen_size(size=None, max_area=pipeline.checkpoint.max_area["480p"],
                                     ref_image_path=str(path), pre_video_path=None)
    assert official == (0, 64)  # what the official code would go on to sample with
    with pytest.raises(JobInputError, match=r"^'image_url' is 1000x16, too wide for 480p"):
        video_size(1000, 16, pipeline.checkpoint.max_area["480p"], "480p", "image_url")


def make_pose_video(dest, size: str, rate: int, seconds: float):
    import subprocess

    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i",
                    f"testsrc2=size={size}:rate={rate}", "-t", str(seconds), "-pix_fmt", "yuv420p",
                    str(dest)], check=True)
    return dest


@pytest.mark.parametrize("size, rate, seconds, clips, batch_frames", [
    ("96x80", 30, 1.2, 3, 5),  # every 2nd frame: clip 2 part padded with -1, clip 3 all padding
    ("100x60", 16, 1.0, 1, 1),  # every frame, odd sizes for the resize and crop, a frame a batch
    ("80x64", 24, 1.0, 1, 100),  # every 2nd frame (round(1.5) == 2), the whole clip in one batch
])
def test_pose_latents_are_the_official_load_pose_cond_in_batches(pipeline, portrait_png, tmp_path,
                                                                 monkeypatch, size, rate, seconds,
                                                                 clips, batch_frames):
    from s2v_worker import pose

    video = make_pose_video(tmp_path / "pose.mp4", size, rate, seconds)
    plan = plan_job(pipeline, portrait_png, 0.5, settings(infer_frames=16))
    plan = type(plan)(**{**plan.__dict__, "num_clips": clips})
    official = pipeline.load_pose_cond(pose_video=str(video), num_repeat=clips, infer_frames=16,
                                       size=(plan.height, plan.width))
    width, height = map(int, size.split("x"))
    monkeypatch.setattr(pose, "POSE_BATCH_BYTES", batch_frames * width * height * 3 * 4)
    ours = pose_latents(video, plan, pipeline.vae, pipeline.param_dtype)
    assert len(ours) == len(official) == clips
    for mine, theirs in zip(ours, official):
        assert torch.equal(mine, theirs)


def test_pose_frames_are_decoded_outside_the_worker(pipeline, portrait_png, tmp_path):
    """A 720p pose video: upstream holds its sampled frames at full size in float32 in the
    worker; here they are decoded and resized in a child, and the worker holds the resized ones."""
    video = make_pose_video(tmp_path / "pose720.mp4", "1280x720", 30, 2.0)  # 30 frames sampled
    plan = plan_job(pipeline, portrait_png, 0.5, settings(infer_frames=32))
    plan = type(plan)(**{**plan.__dict__, "num_clips": 1})

    def status_mb(key: str) -> float:
        return next(int(line.split()[1]) / 1024 for line in open("/proc/self/status")
                    if line.startswith(key))

    before = status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # VmHWM := VmRSS
    pose_latents(video, plan, pipeline.vae, pipeline.param_dtype)
    growth = status_mb("VmHWM") - before
    # In this process, 30 frames of 1280x720 float32 alone are 316 MB (decord's buffers come on top).
    assert growth < 150, f"the worker grew by {growth:.0f} MB"


def test_a_pose_video_the_child_cannot_decode_is_a_client_error(pipeline, portrait_png, tmp_path):
    """The intake's probe refuses such files first; should decord fail in the child anyway, the
    job gets a MediaError naming the field (no refresh_worker: the worker's GPU is not involved)."""
    from s2v_worker.media import MediaError

    video = make_pose_video(tmp_path / "pose.mp4", "96x80", 16, 2.0)
    data = video.read_bytes()
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(data[: len(data) * 2 // 3])  # decord refuses a partial file when it opens it
    plan = plan_job(pipeline, portrait_png, 0.5, settings(infer_frames=16))
    plan = type(plan)(**{**plan.__dict__, "num_clips": 2})
    with pytest.raises(MediaError, match=r"^'pose_video_url' could not be decoded to the end$"):
        pose_latents(broken, plan, pipeline.vae, pipeline.param_dtype, "pose_video_url")


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_reference_pixels_are_upstreams(pipeline, portrait_png, tmp_path, mode):
    """As upstream's generate prepares the reference, without its numpy round trip."""
    import numpy as np
    from PIL import Image
    from torchvision import transforms

    path = tmp_path / "reference.png"
    Image.open(portrait_png).convert(mode).save(path)
    size = (64, 48)
    ref_image = np.array(Image.open(path).convert("RGB"))  # upstream, line for line
    resize, crop = transforms.Resize(min(size)), transforms.CenterCrop(size)
    upstream = transforms.ToTensor()(crop(resize(Image.fromarray(ref_image))))
    upstream = (upstream.unsqueeze(1).unsqueeze(0) * 2 - 1.0).to(dtype=pipeline.vae.dtype)
    assert torch.equal(pipeline.reference_pixels(path, size), upstream)
