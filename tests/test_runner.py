"""The job runner's control, in-process on the tiny checkpoint: RunPod's per-job stop, the job time
limit, GPU failures (injected), progress updates, and temporary files, with the worker staying
ready for the next job after each."""
import asyncio
import base64
import json
import re
import threading
import time
from pathlib import Path

import pytest
import torch
from runpod.serverless.modules.rp_job import run_job
from runpod.serverless.modules.rp_scale import JobScaler

from conftest import speech_excerpt
from s2v_worker.estimate import ClipTiming, DiTSpeed
from s2v_worker.planning import dit_tokens, video_size
from s2v_worker.runner import ProgressReporter, Worker
from s2v_worker.settings import Settings


@pytest.fixture(scope="module")
def pipeline(tiny_pipeline):
    return tiny_pipeline


@pytest.fixture(scope="module")
def speech_1s_b64(tmp_path_factory):
    path = tmp_path_factory.mktemp("a") / "speech_1s.wav"
    speech_excerpt(path, 1.0)
    return base64.b64encode(path.read_bytes()).decode()


@pytest.fixture
def worker(pipeline, tmp_path):
    """A worker whose job folders live in tmp_path/work, returning videos inline."""
    (tmp_path / "work").mkdir()
    settings = Settings.from_env({}).replace(work_dir=str(tmp_path / "work"),
                                             network_volume_dir=str(tmp_path / "no-volume"),
                                             progress_interval_s=0.0)
    updates = []
    worker = Worker(settings, pipeline, send_progress=lambda job, update: updates.append(
        (time.monotonic(), update)))
    worker.updates = updates
    return worker


def job(image_png, audio_b64, job_id="job", **fields):
    return {"id": job_id, "input": {
        "image_base64": base64.b64encode(image_png.read_bytes()).decode(), "audio_base64": audio_b64,
        "resolution": "480p", "sample_steps": 2, "infer_frames": 16, "fps": 16, "seed": 1, **fields}}


def assert_ready_for_the_next_job(worker, portrait_png, audio_b64):
    # One clip and one step: any finished job shows the worker still works.
    result = worker.run(job(portrait_png, audio_b64, job_id="next", max_clips=1, sample_steps=1))
    assert "video_base64" in result and "error" not in result, result
    assert not list(Path(worker.settings.folders.work_dir).iterdir()), "a job folder was left behind"


def test_progress_reports_stages_and_every_step(worker, portrait_png, speech_1s_b64):
    result = worker.run(job(portrait_png, speech_1s_b64, sample_steps=3))
    assert "video_base64" in result
    updates = [u for _, u in worker.updates]
    assert [u["stage"] for u in updates if u["stage"] != "sampling"] == [
        "download", "generate", "encode", "upload"]
    steps = [(u["clip"], u["step"]) for u in updates if u["stage"] == "sampling"]
    clips = result["num_clips"]
    assert steps == [(c, s) for c in range(1, clips + 1) for s in (1, 2, 3)]


def test_progress_is_throttled():
    sent = []
    reporter = ProgressReporter({"id": "x"}, lambda job, update: sent.append(update), interval_s=60)
    reporter.stage("generate")
    for step in range(10):
        reporter.step(0, 1, step, 10)
    assert [u.get("step") for u in sent] == [None, 10]  # the stage, then only the last step


def sampled_steps(worker) -> list[int]:
    return [u["step"] for _, u in worker.updates if u["stage"] == "sampling"]


def test_runpod_per_job_stop_ends_sampling_within_one_step(worker, portrait_png, speech_1s_b64,
                                                           monkeypatch):
    """The SDK's stop reaches the running job, which stops within one step of it. Sampling is held
    at its third step until the stop has reached the job (the event handle() gives the job), so
    how many steps a fast or a loaded machine would run meanwhile does not count."""
    steps = 100
    running = job(portrait_png, speech_1s_b64, job_id="to-stop", sample_steps=steps, max_clips=1)
    stop_events = []  # the `cancelled` event of each run handle() starts
    run = worker.run

    def recording_run(job, cancelled=None):
        stop_events.append(cancelled)
        return run(job, cancelled)

    monkeypatch.setattr(worker, "run", recording_run)
    held, reached = threading.Event(), []
    send = worker.send_progress

    def progress(job, update):
        send(job, update)
        if update["stage"] == "sampling" and update["step"] == 3 and not held.is_set():
            held.set()
            # Generous: only a stop that never reaches the job waits this long.
            reached.append(stop_events[0].wait(120))

    worker.send_progress = progress

    async def scenario():
        scaler = JobScaler({"handler": worker.handle})
        task = asyncio.ensure_future(run_job(worker.handle, running))
        scaler.jobs_tasks[running["id"]] = task  # what the SDK's job loop records
        while not held.is_set():
            assert not task.done(), task.result()
            await asyncio.sleep(0.01)
        assert await scaler.stop_job(running["id"])  # the SDK's own per-job stop
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert reached == [True], "the stop never reached the running job"
    sampled = sampled_steps(worker)
    assert sampled[:3] == [1, 2, 3] and len(sampled) <= 4, (
        f"{len(sampled) - 3} steps ran after the stop")
    assert not any(u["stage"] == "encode" for _, u in worker.updates)
    worker.send_progress = send
    assert_ready_for_the_next_job(worker, portrait_png, speech_1s_b64)


class FakeClock:
    """JOB_TIMEOUT_S's clock, moved by the test: deadlines without waiting for them."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_job_time_limit_ends_the_job_cleanly(worker, portrait_png, speech_1s_b64, monkeypatch):
    """The limit passes during the third step (on the worker's clock, moved by the test: a loaded
    machine's speed does not count), and the job stops at the check after that step."""
    # No measured DiT speed: the worker cannot refuse the job up front (see the estimate tests
    # below), so the limit must stop it during sampling.
    monkeypatch.setattr(worker.pipeline.denoiser, "speed", DiTSpeed())
    clock = FakeClock()
    worker.clock = clock
    worker.settings = worker.settings.replace(job_timeout_s=60.0)
    send = worker.send_progress

    def progress(job, update):
        send(job, update)
        if update["stage"] == "sampling" and update["step"] == 3:
            clock.now += 120

    worker.send_progress = progress
    result = worker.run(job(portrait_png, speech_1s_b64, sample_steps=100))
    assert result == {"error": "the job ran past its time limit of 60 s (JOB_TIMEOUT_S)"}
    sampled = sampled_steps(worker)
    assert sampled[:3] == [1, 2, 3] and len(sampled) <= 4, (
        f"{len(sampled) - 3} steps ran past the limit")
    assert not any(u["stage"] == "encode" for _, u in worker.updates)
    worker.send_progress = send
    assert_ready_for_the_next_job(worker, portrait_png, speech_1s_b64)


@pytest.mark.parametrize("failure, fragment", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), "ran out of memory"),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), "internal error (RuntimeError)"),
])
def test_gpu_failures_ask_for_a_fresh_worker(worker, portrait_png, speech_1s_b64, monkeypatch,
                                             failure, fragment):
    def failing_generate(*args, **kwargs):
        raise failure

    with monkeypatch.context() as patch:
        patch.setattr(worker.pipeline, "generate", failing_generate)
        result = worker.run(job(portrait_png, speech_1s_b64))
    assert result["refresh_worker"] is True and fragment in result["error"]
    assert "Traceback" not in result["error"] and "File " not in result["error"]
    assert_ready_for_the_next_job(worker, portrait_png, speech_1s_b64)


def test_bad_input_leaves_no_files_and_no_refresh(worker, portrait_png, speech_1s_b64):
    result = worker.run(job(portrait_png, base64.b64encode(b"not audio" * 50).decode()))
    assert result == {"error": "'audio_base64' is not a readable audio file"}
    assert_ready_for_the_next_job(worker, portrait_png, speech_1s_b64)


@pytest.mark.parametrize("speed", ["fast", "fastest"])
def test_fast_modes_on_a_machine_without_fp8_are_a_clear_error(worker, portrait_png, speech_1s_b64,
                                                                speed):
    result = worker.run(job(portrait_png, speech_1s_b64, speed=speed))
    assert result == {"error": f'"speed": "{speed}" needs a GPU with FP8 tensor cores; this '
                               "worker runs on the CPU"}
    assert_ready_for_the_next_job(worker, portrait_png, speech_1s_b64)


def test_an_unexpected_error_before_any_model_work_asks_for_no_fresh_worker(worker, portrait_png,
                                                                            speech_1s_b64, monkeypatch):
    """Nothing on the GPU or in the resident weights was touched yet: a new worker would fix
    nothing, and the flag would let a caller who found such a bug force cold starts at will."""
    from s2v_worker import runner

    def broken_intake(*args, **kwargs):
        raise RuntimeError("a bug in the intake")

    with monkeypatch.context() as patch:
        patch.setattr(runner, "load_audio", broken_intake)
        result = worker.run(job(portrait_png, speech_1s_b64, job_id="intake-bug"))
    assert result == {"error": "internal error (RuntimeError); the worker's logs have the details "
                               "for job intake-bug"}


def test_an_unexpected_error_once_the_weights_change_asks_for_a_fresh_worker(worker, portrait_png,
                                                                             speech_1s_b64, monkeypatch):
    def half_merged(lora_set):
        raise RuntimeError("half-merged weights")

    with monkeypatch.context() as patch:
        patch.setattr(worker.pipeline.denoiser, "merge_loras", half_merged)
        result = worker.run(job(portrait_png, speech_1s_b64, job_id="merge-bug"))
    assert result == {"error": "internal error (RuntimeError); the worker's logs have the details "
                               "for job merge-bug", "refresh_worker": True}


@pytest.mark.parametrize("size, message", [
    ((20000, 16), "'image_base64' is 20000x16, too wide for 480p: the model's sizing would make the "
                  "video 0 pixels high (each side needs at least 16); crop the image closer to a "
                  "video's shape"),
    ((16, 20000), "'image_base64' is 16x20000, too tall for 480p: the model's sizing would make the "
                  "video 0 pixels wide (each side needs at least 16); crop the image closer to a "
                  "video's shape"),
])
def test_an_image_the_model_cannot_size_is_a_client_error(worker, tmp_path, speech_1s_b64, size,
                                                          message, monkeypatch):
    from PIL import Image

    from s2v_worker import runner

    path = tmp_path / "strip.png"
    Image.new("RGB", size, (90, 90, 90)).save(path)
    audio_loads = []
    with monkeypatch.context() as patch:  # refused before the audio is even looked at
        patch.setattr(runner, "load_audio", lambda *a, **k: audio_loads.append(a))
        result = worker.run(job(path, speech_1s_b64))
    assert result == {"error": message} and audio_loads == []
    assert not list(Path(worker.settings.folders.work_dir).iterdir())


@pytest.mark.parametrize("when", ["last_step", "encode"])
def test_past_the_limit_after_sampling_the_video_is_delivered_with_a_warning(
        worker, portrait_png, speech_1s_b64, monkeypatch, when):
    """Once the last step is done, only a cancellation stops a job: the limit passed during the
    last step's check, or while the MP4 is finished, would throw the GPU's work away."""
    from s2v_worker import runner

    monkeypatch.setattr(worker.pipeline.denoiser, "speed", DiTSpeed())  # nothing to refuse it by
    clock = FakeClock()
    worker.clock = clock
    worker.settings = worker.settings.replace(job_timeout_s=60.0)
    if when == "last_step":
        send = worker.send_progress

        def progress(job, update):  # the limit passes during the job's only step
            if update["stage"] == "sampling":
                clock.now += 120
            send(job, update)

        worker.send_progress = progress
    else:
        finish = runner.Mp4Stream.finish

        def slow_finish(stream):
            clock.now += 120  # the limit passes while the MP4 is finished
            return finish(stream)

        monkeypatch.setattr(runner.Mp4Stream, "finish", slow_finish)
    result = worker.run(job(portrait_png, speech_1s_b64, sample_steps=1, max_clips=1))
    assert "video_base64" in result, result
    assert result["warnings"] == ["the job ran past its time limit of 60 s (JOB_TIMEOUT_S) after "
                                  "its sampling had finished; the video was delivered anyway"]


def test_past_the_limit_a_video_that_cannot_be_delivered_is_kept_and_named(
        worker, portrait_png, speech_1s_b64, monkeypatch, tmp_path):
    from s2v_worker import runner

    monkeypatch.setattr(worker.pipeline.denoiser, "speed", DiTSpeed())
    clock = FakeClock()
    worker.clock = clock
    kept = tmp_path / "undelivered"
    worker.settings = worker.settings.replace(job_timeout_s=60.0, max_inline_video_bytes=1,
                                              undelivered_dir=str(kept))
    finish = runner.Mp4Stream.finish

    def slow_finish(stream):
        clock.now += 120
        return finish(stream)

    monkeypatch.setattr(runner.Mp4Stream, "finish", slow_finish)
    result = worker.run(job(portrait_png, speech_1s_b64, sample_steps=1, max_clips=1))
    assert set(result) == {"error"}, result
    [video] = kept.iterdir()
    assert f"The video was kept on the worker at {video} (UNDELIVERED_DIR)" in result["error"]


def test_a_cancellation_after_sampling_still_stops_the_job(worker, portrait_png, speech_1s_b64,
                                                           monkeypatch):
    from s2v_worker import runner

    cancelled = threading.Event()
    finish = runner.Mp4Stream.finish

    def cancelled_while_finishing(stream):
        cancelled.set()
        return finish(stream)

    monkeypatch.setattr(runner.Mp4Stream, "finish", cancelled_while_finishing)
    result = worker.run(job(portrait_png, speech_1s_b64, sample_steps=1, max_clips=1), cancelled)
    assert result == {"error": "the job was cancelled"}


def test_the_estimate_after_a_one_step_job_predicts_a_longer_one(worker, portrait_png,
                                                                 speech_1s_b64, monkeypatch):
    """A clip's preparation is measured apart from its DiT calls: after a 1-step job (whose
    preparation once passed for a slow call, and estimated a 30-step job at 2.3x its time) the
    estimate of a 20-step job is its time within a factor of 2 (with preparation passing for a
    call it would be about 7x). Sleeps make preparation and calls costly, and several times what
    the tiny model's own compute costs (about 20 ms a call), so that a loaded machine, which slows
    that compute unevenly between the two jobs, cannot move the ratio much."""
    engine = worker.pipeline.denoiser.engine
    prepare, forward = engine.prepare, engine.forward

    def slow_prepare(*args, **kwargs):
        time.sleep(1.0)
        return prepare(*args, **kwargs)

    def slow_forward(*args, **kwargs):
        time.sleep(0.1)
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine, "prepare", slow_prepare)
    monkeypatch.setattr(engine, "forward", slow_forward)
    monkeypatch.setattr(worker.pipeline.denoiser, "speed", DiTSpeed())
    unguided = {"guidance_scale": 1.0, "max_clips": 1}
    assert "video_base64" in worker.run(job(portrait_png, speech_1s_b64, sample_steps=1, **unguided))
    result = worker.run(job(portrait_png, speech_1s_b64, sample_steps=20, **unguided))
    estimated, took = result["timings"]["estimated_sampling_s"], result["timings"]["sampling_s"]
    assert took / 2 <= estimated <= took * 2, (estimated, took)


def job_tokens(worker, image_png) -> int:
    """The DiT tokens of `job(...)`'s clips (480p, 16 frames a clip) for this image."""
    from PIL import Image

    with Image.open(image_png) as image:
        height, width = video_size(*image.size, worker.pipeline.checkpoint.max_area["480p"], "480p")
    return dit_tokens(height, width, 16)


def test_progress_carries_the_estimated_sampling_time_left(worker, portrait_png, speech_1s_b64,
                                                           monkeypatch):
    speed = DiTSpeed()
    # as if measured: 0.25 s a call, 0.5 s of preparation a clip
    speed.record(job_tokens(worker, portrait_png), ClipTiming(calls=8, steps_s=2.0, overhead_s=0.5))
    monkeypatch.setattr(worker.pipeline.denoiser, "speed", speed)
    result = worker.run(job(portrait_png, speech_1s_b64, sample_steps=3, max_clips=1))
    clips = result["num_clips"]
    calls = clips * 3 * 2  # guided: two calls a step
    assert result["timings"]["estimated_sampling_s"] == round(calls * 0.25 + clips * 0.5, 1)
    assert result["timings"]["estimated_s"] >= result["timings"]["estimated_sampling_s"]
    updates = [u for _, u in worker.updates]
    generate = next(u for u in updates if u["stage"] == "generate")
    assert generate["eta_s"] == round(calls * 0.25 + clips * 0.5, 1)
    etas = [u["eta_s"] for u in updates if u["stage"] == "sampling"]
    assert etas == [round((calls - 2 * done) * 0.25 + (clips - 1 - (done - 1) // 3) * 0.5, 1)
                    for done in range(1, clips * 3 + 1)]


def test_a_job_estimated_past_the_time_limit_is_refused_before_any_model_work(worker, portrait_png,
                                                                              speech_1s_b64, monkeypatch):
    speed = DiTSpeed()  # a very slow GPU, as measured
    speed.record(job_tokens(worker, portrait_png), ClipTiming(calls=10, steps_s=4000.0, overhead_s=20.0))
    monkeypatch.setattr(worker.pipeline.denoiser, "speed", speed)
    calls_before = worker.pipeline.denoiser.dit_calls
    result = worker.run(job(portrait_png, speech_1s_b64, sample_steps=3))
    clips = 2  # 1 s of speech in 16-frame clips
    assert set(result) == {"error"}  # a client error: no refresh_worker
    match = re.fullmatch(r"the job would take about (\d+) s \((\d+) DiT calls at 400.00 s each and "
                         r"20.00 s of preparation for each of 2 clip\(s\), as measured on this "
                         r"worker\), more than its time limit of 3600 s \(JOB_TIMEOUT_S\); use fewer "
                         r"sample_steps, a shorter audio or max_clips, or 480p", result["error"])
    assert match, result["error"]
    assert int(match.group(2)) == clips * 3 * 2
    assert int(match.group(1)) >= clips * 3 * 2 * 400 + clips * 20
    assert worker.pipeline.denoiser.dit_calls == calls_before
    assert not any(u["stage"] in ("generate", "sampling") for _, u in worker.updates)


def as_runpod_sends(run_result: dict) -> bytes:
    """The job's answer as the SDK serializes it: rp_http's json.dumps(ensure_ascii=False), which
    aiohttp encodes as UTF-8, and the local API's JSONResponse (Starlette), which must agree."""
    from starlette.responses import JSONResponse

    sent = json.dumps(run_result, ensure_ascii=False).encode("utf-8")
    assert JSONResponse(run_result).body == json.dumps(
        run_result, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
    return sent


def test_results_serialize_as_runpod_sends_them(worker, portrait_png, speech_1s_b64):
    text = "Ünïcödé 你好 \U0001f600 \u202eright-to-left\u202c e\u0301"  # valid, outside ASCII and the BMP
    good = job(portrait_png, speech_1s_b64, sample_steps=1, max_clips=1, prompt=text)
    result = asyncio.run(run_job(worker.handle, good))
    assert json.loads(as_runpod_sends(result))["output"]["settings"]["prompt"] == text
    for bad_input, fragment in (({"prompt": "\ud800"}, "'prompt' is not valid text"),
                                ({"\udc00": 1}, "a key in the job's 'input' is not valid text")):
        bad = job(portrait_png, speech_1s_b64, **bad_input)
        result = asyncio.run(run_job(worker.handle, bad))
        sent = json.loads(as_runpod_sends(result))
        assert fragment in sent["error"] and "stopPod" not in sent


def test_a_job_with_a_pose_video_completes(worker, portrait_png, speech_1s_b64, tmp_path):
    import subprocess

    pose = tmp_path / "pose.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc2=size=96x80:rate=30",
                    "-t", "1", "-pix_fmt", "yuv420p", str(pose)], check=True)
    result = worker.run(job(portrait_png, speech_1s_b64, sample_steps=1, max_clips=1,
                            pose_video_base64=base64.b64encode(pose.read_bytes()).decode()))
    assert "video_base64" in result and "error" not in result, result


# --- a slice of the audio ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def speech_2s_b64(tmp_path_factory):
    path = tmp_path_factory.mktemp("a") / "speech_2s.wav"
    speech_excerpt(path, 2.0)
    return base64.b64encode(path.read_bytes()).decode()


def test_a_sliced_job_is_as_long_as_its_slice_and_says_so(worker, portrait_png, speech_2s_b64,
                                                          tmp_path):
    import subprocess

    result = worker.run(job(portrait_png, speech_2s_b64, sample_steps=1, audio_start_s=0.25,
                            audio_duration_s=1.0))
    assert "video_base64" in result, result
    assert result["num_clips"] == 2  # 16 frames a clip cover 1.0 s and the 3 the first drops
    assert (result["num_frames"], result["duration_s"]) == (16, 1.0)
    assert (result["settings"]["audio_start_s"], result["settings"]["audio_duration_s"]) == (0.25, 1.0)
    video = tmp_path / "sliced.mp4"
    video.write_bytes(base64.b64decode(result["video_base64"]))
    audio_s = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "a:0", "-show_entries",
                              "stream=duration", "-of", "csv=p=0", str(video)], check=True,
                             capture_output=True, text=True).stdout
    assert float(audio_s) == pytest.approx(1.0, abs=0.03)
    whole = worker.run(job(portrait_png, speech_2s_b64, sample_steps=1, max_clips=1))
    assert (whole["settings"]["audio_start_s"], whole["settings"]["audio_duration_s"]) == (0.0, 2.0)


def test_a_slice_past_the_audio_is_refused_before_any_model_work(worker, portrait_png,
                                                                 speech_2s_b64):
    calls_before = worker.pipeline.denoiser.dit_calls
    result = worker.run(job(portrait_png, speech_2s_b64, audio_start_s=1.5, audio_duration_s=1.0))
    assert result == {"error": "'audio_start_s' + 'audio_duration_s' is 2.5 s, past the end of "
                               "'audio_base64', which is 2.000 s long"}
    assert worker.pipeline.denoiser.dit_calls == calls_before
    assert not list(Path(worker.settings.folders.work_dir).iterdir())


# --- a streaming endpoint (WAN_S2V_STREAM), through the SDK's own job loop ---------------------

class RunPodJobLoop:
    """The SDK's production path for a job (rp_job.handle_job, as JobScaler calls it) with its
    two HTTP calls recorded instead of sent: each streamed item, and the job's final result."""

    def __init__(self, monkeypatch, config: dict) -> None:
        from runpod.serverless.modules import rp_job

        self.config, self.rp_job = config, rp_job
        self.streamed, self.sent = [], []
        self.item_streamed = threading.Event()

        async def stream_result(session, output, job):
            self.streamed.append(output["output"])
            self.item_streamed.set()

        async def send_result(session, result, job, is_stream=False):
            self.sent.append((result, is_stream))

        monkeypatch.setattr(rp_job, "stream_result", stream_result)
        monkeypatch.setattr(rp_job, "send_result", send_result)

    def handle(self, job: dict):
        return self.rp_job.handle_job(None, self.config, job)

    def run(self, job: dict) -> dict:
        asyncio.run(self.handle(job))
        [(result, is_stream)] = self.sent
        assert is_stream
        return result


def streaming_config(worker) -> dict:
    import handler

    return handler.handler_config(worker, stream=True, local_test=False)


def test_a_streaming_job_streams_each_clip_then_the_whole_video(worker, portrait_png,
                                                                speech_2s_b64, monkeypatch,
                                                                tmp_path):
    loop = RunPodJobLoop(monkeypatch, streaming_config(worker))
    result = loop.run(job(portrait_png, speech_2s_b64, sample_steps=1, fps=24))
    *clips, final = result["output"]
    assert result["output"] == loop.streamed  # return_aggregate_stream: the items, in order
    assert [(c["clip"], c["clips"]) for c in clips] == [(1, 3), (2, 3), (3, 3)]
    assert final["num_clips"] == 3 and "clip" not in final and final["storage"] == "inline"
    assert sum(c["num_frames"] for c in clips) == final["num_frames"] == 48
    assert [c["start_s"] for c in clips] == [0.0, clips[0]["duration_s"],
                                             clips[0]["duration_s"] + clips[1]["duration_s"]]
    assert clips[-1]["start_s"] + clips[-1]["duration_s"] == pytest.approx(final["duration_s"], abs=0.05)
    for clip in clips:
        assert clip["storage"] == "inline" and clip["fps"] == 24 and "warnings" not in clip
        path = tmp_path / f"clip{clip['clip']}.mp4"
        path.write_bytes(base64.b64decode(clip["video_base64"]))
        assert clip["duration_s"] == pytest.approx(clip["num_frames"] / 24, abs=0.05)
    items_s = [c["timings"]["item_s"] for c in clips]
    assert final["timings"]["items_s"] == items_s == sorted(items_s)
    assert items_s[-1] <= final["timings"]["total_s"]
    assert not list(Path(worker.settings.folders.work_dir).iterdir()), "clip files were left"


def test_a_streaming_job_stopped_by_its_time_limit_fails_and_keeps_the_items_it_sent(
        worker, portrait_png, speech_2s_b64, monkeypatch):
    monkeypatch.setattr(worker.pipeline.denoiser, "speed", DiTSpeed())  # nothing to refuse it by
    loop = RunPodJobLoop(monkeypatch, streaming_config(worker))
    clock = FakeClock()
    worker.clock = clock
    worker.settings = worker.settings.replace(job_timeout_s=60.0)
    send = worker.send_progress

    def progress(job, update):  # the limit passes once clip 1's item is out, in clip 2
        if update.get("clip") == 2:
            assert loop.item_streamed.wait(60)
            clock.now += 120
        send(job, update)

    worker.send_progress = progress
    result = loop.run(job(portrait_png, speech_2s_b64, sample_steps=2))
    assert result == {"error": "the job ran past its time limit of 60 s (JOB_TIMEOUT_S)"}
    assert [item["clip"] for item in loop.streamed] == [1] and "video_base64" in loop.streamed[0]
    assert not list(Path(worker.settings.folders.work_dir).iterdir()), "clip files were left"


def test_runpods_stop_ends_a_streaming_job_within_one_step(worker, portrait_png, speech_2s_b64,
                                                           speech_1s_b64, monkeypatch):
    config = streaming_config(worker)
    loop = RunPodJobLoop(monkeypatch, config)
    running = job(portrait_png, speech_2s_b64, job_id="to-stop", sample_steps=50)

    async def scenario():
        scaler = JobScaler(config)
        task = asyncio.ensure_future(loop.handle(running))
        scaler.jobs_tasks[running["id"]] = task
        while not (loop.streamed and any(u.get("clip") == 2 for _, u in worker.updates)):
            assert not task.done()
            await asyncio.sleep(0.01)
        cancel_time = time.monotonic()
        assert await scaler.stop_job(running["id"])
        with pytest.raises(asyncio.CancelledError):
            await task
        return cancel_time

    cancel_time = asyncio.run(scenario())
    after = [u for t, u in worker.updates if t > cancel_time and u["stage"] == "sampling"]
    assert len(after) <= 1, f"{len(after)} steps ran after the stop"
    assert loop.sent == [] and [item["clip"] for item in loop.streamed] == [1]
    assert_ready_for_the_next_job(worker, portrait_png, speech_1s_b64)


def test_a_streaming_job_that_needs_a_fresh_worker_asks_for_one(worker, portrait_png,
                                                                speech_2s_b64, monkeypatch):
    """The SDK keeps only a yielded error's message: refresh_worker reaches it through the
    handler's config, which it reads after the job (stopPod), as for a returned error."""
    config = streaming_config(worker)
    loop = RunPodJobLoop(monkeypatch, config)

    def failing_generate(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(worker.pipeline, "generate", failing_generate)
    result = loop.run(job(portrait_png, speech_2s_b64, job_id="gpu-bug"))
    assert result == {"error": "internal error (RuntimeError); the worker's logs have the details "
                               "for job gpu-bug", "stopPod": True}
    assert config["refresh_worker"] is True and loop.streamed == []


def test_a_bad_streaming_job_fails_as_today(worker, portrait_png, speech_2s_b64, monkeypatch):
    loop = RunPodJobLoop(monkeypatch, streaming_config(worker))
    result = loop.run(job(portrait_png, speech_2s_b64, resolution="4k"))
    assert result == {"error": "'resolution' must be one of '480p', '720p', got '4k'"}
    assert loop.streamed == []


def test_the_sdks_local_test_mode_gets_the_items_as_one_list(worker, portrait_png, speech_1s_b64):
    """`python handler.py --test_input` never iterates a generator handler (runpod 1.12): there
    the streaming worker's items come back together, as /runsync returns them."""
    import handler
    from runpod.serverless.modules.rp_job import run_job

    config = handler.handler_config(worker, stream=True, local_test=True)
    result = asyncio.run(run_job(config["handler"], job(portrait_png, speech_1s_b64, sample_steps=1)))
    *clips, final = result["output"]
    assert [c["clip"] for c in clips] == [1, 2] and final["num_clips"] == 2
    bad = asyncio.run(run_job(config["handler"], job(portrait_png, speech_1s_b64, resolution="4k")))
    assert bad == {"error": "'resolution' must be one of '480p', '720p', got '4k'"}
    assert handler.sdk_runs_one_local_test(["--test_input", "{}"], on_runpod=True)
    assert handler.sdk_runs_one_local_test([], on_runpod=False)  # test_input.json
    assert not handler.sdk_runs_one_local_test(["--rp_serve_api"], on_runpod=False)
    assert not handler.sdk_runs_one_local_test([], on_runpod=True)
    assert handler.handler_config(worker, stream=False, local_test=True) == {"handler": worker.handle}


def test_a_stop_while_the_sdk_sends_an_item_still_stops_the_job(worker, portrait_png,
                                                                speech_2s_b64, speech_1s_b64,
                                                                monkeypatch):
    """RunPod's stop can land while the SDK is posting an item (the handler is then suspended at
    its `yield`): the SDK drops the generator, whose closing tells the job to stop."""
    config = streaming_config(worker)
    loop = RunPodJobLoop(monkeypatch, config)
    posting = threading.Event()

    async def slow_stream_result(session, output, job):
        posting.set()
        await asyncio.sleep(3600)  # a POST that hangs

    monkeypatch.setattr(loop.rp_job, "stream_result", slow_stream_result)
    running = job(portrait_png, speech_2s_b64, job_id="to-stop", sample_steps=50)

    async def scenario():
        scaler = JobScaler(config)
        task = asyncio.ensure_future(loop.handle(running))
        scaler.jobs_tasks[running["id"]] = task
        while not posting.is_set():
            await asyncio.sleep(0.01)
        cancel_time = time.monotonic()
        assert await scaler.stop_job(running["id"])
        with pytest.raises(asyncio.CancelledError):
            await task
        deadline = time.monotonic() + 120
        while worker._gpu.locked():  # the job ends on its own, with this loop still running
            assert time.monotonic() < deadline, "the job did not stop"
            await asyncio.sleep(0.05)
        return cancel_time

    cancel_time = asyncio.run(scenario())
    after = [u for t, u in worker.updates if t > cancel_time and u["stage"] == "sampling"]
    assert len(after) <= 2, f"{len(after)} steps ran after the stop"
    assert loop.sent == []
    assert_ready_for_the_next_job(worker, portrait_png, speech_1s_b64)
