"""Several ranks per worker, on the CPU: the test process is rank 0 (as the worker's process is)
and starts the other ranks as processes over gloo, on the tiny checkpoint (4 attention heads).
Every layout must sample what one process samples; faults must end the job with a clear error
and `refresh_worker`, never hang it."""
import base64
import os
import signal
import threading
import time
from contextlib import contextmanager

import pytest
import torch

from builder import make_tiny_checkpoint as tiny
from conftest import speech_excerpt
from s2v_worker.parallel import ParallelGroup, RankFailure, check_world_size, resolve_world_size
from s2v_worker.ranks import RankWorker, rank_main
from s2v_worker.runner import Worker
from s2v_worker.sampling import ClipRequest, Layout, plan_layout
from s2v_worker.settings import Settings

CPU = torch.device("cpu")
LATENTS_ATOL = 1e-5


def launch(pipeline, world_size: int, entry=rank_main, **settings) -> ParallelGroup:
    config = Settings.from_env({}).replace(world_size=world_size, **settings)
    group = ParallelGroup.launch(pipeline.checkpoint, world_size, CPU, config.model,
                                 config.parallel, config.logging.log_level, entry=entry)
    group.wait_ready()
    return group


@contextmanager
def attached(pipeline, world_size: int, **settings):
    """The session's tiny pipeline as rank 0 of a group of `world_size` ranks."""
    group = launch(pipeline, world_size, **settings)
    pipeline.denoiser.attach(group)
    try:
        yield group
    finally:
        pipeline.denoiser.group = None
        group.close()


@pytest.fixture(scope="class")
def two_ranks(tiny_pipeline):
    """One group of two ranks for the tests of a class (one process group at a time, as in a
    worker: the class's teardown ends it before the next test starts its own)."""
    with attached(tiny_pipeline, 2) as group:
        yield group


def clip_request(seed: int, guidance_scale: float = 4.5, steps: int = 3, **fields) -> ClipRequest:
    """One clip's inputs at the tiny DiT's sizes: 20 latent frames of 8x12 (24 tokens each)."""
    g = torch.Generator().manual_seed(seed)
    lat_h, lat_w = 8, 12

    def branch() -> dict:
        return dict(context=[torch.randn(7, 4096, generator=g)], seq_len=0,
                    ref_latents=torch.randn(1, 16, 1, lat_h, lat_w, generator=g),
                    motion_latents=torch.randn(1, 16, 19, lat_h, lat_w, generator=g),
                    cond_states=torch.zeros(1, 16, 20, lat_h, lat_w),
                    audio_input=torch.randn(1, 25, tiny.WAV2VEC_HIDDEN, 80, generator=g),
                    motion_frames=[73, 19], drop_motion_frames=False)

    cond = branch()
    uncond = {**cond, "context": [torch.randn(9, 4096, generator=g)],
              "audio_input": 0.0 * cond["audio_input"]}
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(16, 20, lat_h, lat_w, generator=generator)
    return ClipRequest(latents=latents, generator_state=generator.get_state(), solver="unipc",
                       steps=steps, shift=3.0, guidance_scale=guidance_scale, cond=cond,
                       uncond=uncond if guidance_scale > 1 else None, **fields)


@contextmanager
def without_ranks(pipeline):
    """The pipeline's Denoiser on its own for a while (as a worker of one GPU)."""
    group, pipeline.denoiser.group = pipeline.denoiser.group, None
    try:
        yield
    finally:
        pipeline.denoiser.group = group


def alone(pipeline, request: ClipRequest) -> torch.Tensor:
    with without_ranks(pipeline):
        return pipeline.denoiser.sample(request)


def assert_same_latents(pipeline, request: ClipRequest, layout: Layout) -> None:
    assert pipeline.denoiser.layout(request.guided) == layout
    expected = alone(pipeline, request)
    got = pipeline.denoiser.sample(request)
    assert got.dtype == expected.dtype == torch.float32 and got.shape == expected.shape
    assert (got - expected).abs().max().item() <= LATENTS_ATOL
    assert expected.abs().max() > 0.1


# --- layouts -----------------------------------------------------------------------------------------

def test_layouts_split_guidance_over_halves_then_tokens():
    assert plan_layout(8, cfg_parallel=True, guided=True) == Layout(8, True, 4)
    assert plan_layout(8, cfg_parallel=True, guided=False) == Layout(8, False, 8)
    assert plan_layout(8, cfg_parallel=False, guided=True) == Layout(8, False, 8)
    assert plan_layout(5, cfg_parallel=True, guided=True) == Layout(5, False, 5)  # odd: tokens only
    assert plan_layout(2, cfg_parallel=True, guided=True) == Layout(2, True, 1)


def test_world_sizes_must_divide_the_heads():
    for good in (1, 2, 4, 5, 8):
        check_world_size(good, 40)
    with pytest.raises(ValueError, match=r"40 attention heads cannot be split 3 ways; use one of "
                                         r"1, 2, 4, 5, 8"):
        check_world_size(3, 40)
    assert resolve_world_size(None, CPU, 40) == 1  # no GPU: one process unless a number is set
    assert resolve_world_size(4, CPU, 4) == 4


def test_a_world_size_that_does_not_divide_the_heads_fails_start_up(tiny_checkpoint):
    settings = Settings.from_env({"WAN_S2V_CKPT_DIR": str(tiny_checkpoint),
                                  "WAN_S2V_WORLD_SIZE": "3"})
    with pytest.raises(ValueError, match="4 attention heads cannot be split 3 ways"):
        Worker.start(settings)


# --- the same latents and videos as one process ------------------------------------------------

@pytest.fixture(scope="module")
def speech_1s_b64(tmp_path_factory):
    path = tmp_path_factory.mktemp("a") / "speech_1s.wav"
    speech_excerpt(path, 1.0)
    return base64.b64encode(path.read_bytes()).decode()


def make_worker(pipeline, tmp_path, send_progress=None, **settings) -> Worker:
    (tmp_path / "work").mkdir(exist_ok=True)
    config = Settings.from_env({}).replace(**{"work_dir": str(tmp_path / "work"),
                                              "progress_interval_s": 0.0,
                                              "network_volume_dir": str(tmp_path / "no-volume"),
                                              **settings})
    return Worker(config, pipeline, send_progress=send_progress)


def job(image_png, audio_b64, **fields) -> dict:
    return {"id": "parallel", "input": {
        "image_base64": base64.b64encode(image_png.read_bytes()).decode(), "audio_base64": audio_b64,
        "resolution": "480p", "sample_steps": 3, "infer_frames": 16, "fps": 16, "seed": 5,
        "max_clips": 1, **fields}}


def write_volume_lora(model, volume) -> str:
    """A random rank-2 LoRA on two of the DiT's layers, saved on `volume`; its path there."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(11)
    tensors = {}
    for layer in ("blocks.0.self_attn.q", "blocks.1.ffn.0"):
        linear = model.get_submodule(layer)
        tensors[f"diffusion_model.{layer}.lora_down.weight"] = torch.randn(
            2, linear.in_features, generator=g) * 0.2
        tensors[f"diffusion_model.{layer}.lora_up.weight"] = torch.randn(
            linear.out_features, 2, generator=g) * 0.2
    (volume / "loras").mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(volume / "loras" / "two-layers.safetensors"))
    return "loras/two-layers.safetensors"


class TestTwoRanks:
    """Guidance-parallel (each rank one branch) and sequence-parallel (each rank half the
    tokens) on one group of two."""

    def test_two_ranks_guidance_parallel(self, tiny_pipeline, two_ranks):
        assert_same_latents(tiny_pipeline, clip_request(1), Layout(2, True, 1))

    def test_two_ranks_sequence_parallel(self, tiny_pipeline, two_ranks):
        two_ranks.cfg_parallel = False
        try:
            assert_same_latents(tiny_pipeline, clip_request(2), Layout(2, False, 2))
            assert_same_latents(tiny_pipeline, clip_request(3, guidance_scale=1.0),
                                Layout(2, False, 2))
        finally:
            two_ranks.cfg_parallel = True

    def test_two_ranks_unguided_jobs_split_the_tokens(self, tiny_pipeline, two_ranks):
        assert_same_latents(tiny_pipeline, clip_request(4, guidance_scale=1.0),
                            Layout(2, False, 2))

    def test_fast_mode_step_reuse_on_two_ranks(self, tiny_pipeline, two_ranks):
        """The step cache decides the same reuses on every rank; FP8 GEMMs per branch as alone."""
        assert_same_latents(tiny_pipeline, clip_request(7, steps=14, fast=True, step_cache=True),
                            Layout(2, True, 1))

    def test_a_job_on_two_ranks_makes_one_process_video(self, tiny_pipeline, two_ranks,
                                                        portrait_png, speech_1s_b64, tmp_path):
        worker = make_worker(tiny_pipeline, tmp_path)
        result = worker.run(job(portrait_png, speech_1s_b64))
        assert result["parallel"] == {"world_size": 2, "cfg_parallel": True, "sequence_parallel": 1}
        with without_ranks(tiny_pipeline):
            single = worker.run(job(portrait_png, speech_1s_b64))
        assert single["parallel"] == {"world_size": 1, "cfg_parallel": False, "sequence_parallel": 1}
        assert result["video_base64"] == single["video_base64"]

    def test_every_rank_merges_the_job_loras_and_restores_them(self, tiny_pipeline, two_ranks,
                                                               portrait_png, speech_1s_b64,
                                                               tmp_path):
        """A job's LoRA set reaches rank 1 too (it computes the unconditional branch: a rank
        without it would change the video), and the next job without LoRAs is the base one."""
        volume = tmp_path / "volume"
        lora = {"loras": [{"path": write_volume_lora(tiny_pipeline.denoiser.model, volume)}]}
        worker = make_worker(tiny_pipeline, tmp_path, network_volume_dir=str(volume),
                             max_inline_video_bytes=50 * 2**20)

        def videos() -> tuple[str, str]:
            return (worker.run(job(portrait_png, speech_1s_b64, **lora))["video_base64"],
                    worker.run(job(portrait_png, speech_1s_b64))["video_base64"])

        with_lora, base = videos()
        assert with_lora != base
        with without_ranks(tiny_pipeline):
            assert videos() == (with_lora, base)  # one process, the same LoRA, the same videos

    def test_the_estimate_after_a_short_job_predicts_a_longer_one(self, tiny_pipeline, two_ranks,
                                                                  portrait_png, speech_1s_b64,
                                                                  tmp_path, monkeypatch):
        """A clip's preparation and the ranks' hand-off are measured apart from its steps (at
        world size 2 estimates ran 2x high after 2-step jobs): after a 2-step job, a 16-step
        job's estimate is its time within a factor of 2 (with preparation passing for calls it
        would be over 3x). Sleeps in rank 0's preparation and calls make both costly, and several
        times the tiny model's own compute (30 to 80 ms a step, the first steps of a job the
        slowest), so that a loaded machine, which slows that compute unevenly between the two
        jobs, cannot move the ratio much."""
        from s2v_worker.estimate import DiTSpeed

        engine = tiny_pipeline.denoiser.engine
        prepare, forward = engine.prepare, engine.forward

        def slow_prepare(*args, **kwargs):
            time.sleep(1.0)
            return prepare(*args, **kwargs)

        def slow_forward(*args, **kwargs):
            time.sleep(0.1)
            return forward(*args, **kwargs)

        monkeypatch.setattr(engine, "prepare", slow_prepare)
        monkeypatch.setattr(engine, "forward", slow_forward)
        monkeypatch.setattr(tiny_pipeline.denoiser, "speed", DiTSpeed())
        worker = make_worker(tiny_pipeline, tmp_path)
        assert "video_base64" in worker.run(job(portrait_png, speech_1s_b64, sample_steps=2))
        result = worker.run(job(portrait_png, speech_1s_b64, sample_steps=16))
        estimated, took = result["timings"]["estimated_sampling_s"], result["timings"]["sampling_s"]
        assert took / 2 <= estimated <= took * 2, (estimated, took)

    def test_a_stopped_job_stops_every_rank_after_the_same_step(self, tiny_pipeline, two_ranks,
                                                                portrait_png, speech_1s_b64,
                                                                tmp_path):
        steps, cancelled = [], threading.Event()

        def progress(job, update):
            if update.get("stage") == "sampling":
                steps.append(update["step"])
                if update["step"] == 2:
                    cancelled.set()

        worker = make_worker(tiny_pipeline, tmp_path, send_progress=progress)
        result = worker.run(job(portrait_png, speech_1s_b64, sample_steps=50), cancelled)
        assert result == {"error": "the job was cancelled"}
        assert steps == [1, 2] and two_ranks.failure is None
        # Every rank left the clip after step 2: the group samples the next job as before.
        again = worker.run(job(portrait_png, speech_1s_b64))
        assert "video_base64" in again, again


def test_four_ranks_guidance_and_sequence_parallel(tiny_pipeline):
    with attached(tiny_pipeline, 4) as group:
        assert_same_latents(tiny_pipeline, clip_request(5), Layout(4, True, 2))
        group.cfg_parallel = False
        assert_same_latents(tiny_pipeline, clip_request(6), Layout(4, False, 4))


# --- faults --------------------------------------------------------------------------------------

def _signal_rank_at_step(group, signum, step=2):
    def progress(job, update):
        if update.get("stage") == "sampling" and update["step"] == step:
            os.kill(group.processes[0].pid, signum)
    return progress


@pytest.mark.parametrize("signum, timeout_s, expected", [
    (signal.SIGKILL, 300.0, "rank 1 exited"),
    # A rank that stops answering (here: stopped by a signal) fails the next collective after
    # the rank time-out.
    (signal.SIGSTOP, 3.0, "the worker's GPU group failed"),
])
def test_a_rank_that_dies_or_hangs_ends_the_job_with_refresh_worker(
        tiny_pipeline, portrait_png, speech_1s_b64, tmp_path, signum, timeout_s, expected):
    with attached(tiny_pipeline, 2, rank_timeout_s=timeout_s) as group:
        worker = make_worker(tiny_pipeline, tmp_path,
                             send_progress=_signal_rank_at_step(group, signum))
        started = time.monotonic()
        result = worker.run(job(portrait_png, speech_1s_b64, sample_steps=30))
        assert time.monotonic() - started < timeout_s + 60
        assert result["refresh_worker"] is True and expected in result["error"], result
        assert "Traceback" not in result["error"]
        assert not group.processes[0].is_alive()  # stopped for good, not left hanging
        later = worker.run(job(portrait_png, speech_1s_b64))
        assert later["refresh_worker"] is True and "will be replaced" in later["error"]


def rank_main_failing_to_sample(spec, conn):
    """A rank whose sampling raises (as out of memory on its GPU would)."""
    def sample(self, payload):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")
    RankWorker.sample = sample
    rank_main(spec, conn)


def test_a_rank_that_raises_ends_the_job_with_its_reason(tiny_pipeline, portrait_png,
                                                         speech_1s_b64, tmp_path):
    group = launch(tiny_pipeline, 2, entry=rank_main_failing_to_sample)
    tiny_pipeline.denoiser.attach(group)
    try:
        result = make_worker(tiny_pipeline, tmp_path).run(job(portrait_png, speech_1s_b64))
    finally:
        tiny_pipeline.denoiser.group = None
        group.close()
    assert result["refresh_worker"] is True
    assert "rank 1: sample failed: OutOfMemoryError" in result["error"], result
    with pytest.raises(RankFailure):
        group.release()  # never: a broken group takes no more commands
        group.run("release", None, lambda: None)


def rank_main_that_cannot_load(spec, conn):
    def init(self, spec):
        raise FileNotFoundError("diffusion_pytorch_model-00001-of-00004.safetensors (injected)")
    RankWorker.__init__ = init
    rank_main(spec, conn)


def test_a_rank_that_cannot_start_fails_start_up_with_its_reason(tiny_pipeline):
    with pytest.raises(RuntimeError, match=r"ranks could not start: rank 1 could not start: "
                                           r"FileNotFoundError: diffusion_pytorch_model"):
        launch(tiny_pipeline, 2, entry=rank_main_that_cannot_load)


def rank_main_exiting_on_loras(spec, conn):
    """A rank that dies while it merges a LoRA set (outside any collective)."""
    def set_loras(self, loras):
        os._exit(3)
    RankWorker.set_loras = set_loras
    rank_main(spec, conn)


def test_a_rank_that_dies_between_collectives_breaks_the_group(tiny_pipeline):
    group = launch(tiny_pipeline, 2, entry=rank_main_exiting_on_loras)
    try:
        with pytest.raises(RankFailure, match=r"rank 1 exited during loras \(exit code 3\); this "
                                              r"worker will be replaced"):
            group.set_loras([])
        assert group.failure is not None and not group.processes[0].is_alive()
    finally:
        group.close()
