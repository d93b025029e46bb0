"""The job runner: one `Worker` per process, built once, that takes a RunPod job to a result dict.

Stages, in the order a job flows: validate (job.py) -> media intake (media.py) -> plan and estimate
(planning.py, the Denoiser's measured speed) -> the LoRA set (lora.py, merged by the Denoiser) ->
generate (pipeline.py) -> encode the MP4 (video.py) -> deliver it (storage.py). Each stage raises
its own error type with a message that is safe for the client; the runner turns them into
`{"error": ...}` and never lets a traceback reach the client. Errors that leave the GPU in doubt add
`refresh_worker: true`, which makes RunPod replace this worker after the job.

Two RunPod handlers run the same jobs: `Worker.handle` returns the result; `Worker.handle_stream`
(a streaming endpoint, WAN_S2V_STREAM) yields an item for each clip as soon as its MP4 is delivered
(`ClipItems`), then the same result, last.

Just over 500 lines on purpose: the stages of one job read in order here, each a short method;
the stages themselves live in their own modules.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import secrets
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterator

import torch

from .errors import JobError, JobStopped
from .job import SEED_RANGE, JobInputError, JobRequest, parse_job
from .lora import ResolvedLora, resolve_loras
from .media import AudioInput, load_audio, load_image, load_pose_video
from .parallel import RankFailure
from .settings import Settings
from .planning import ClipPlan, plan_clips, video_size
from .read_ahead import ReadAhead
from .storage import ClipDelivery, deliver_video
from .video import ClipEncoding, EncodedVideo, Mp4Stream, VideoEncodingError

if TYPE_CHECKING:  # the pipeline imports the official models: loaded in start(), not for tests
    from .estimate import SamplingEstimate
    from .pipeline import S2VPipeline

logger = logging.getLogger(__name__)

ProgressSender = Callable[[dict, Any], None]  # runpod.serverless.progress_update's signature
ItemSender = Callable[[dict], None]  # a streaming job's clip items, from the job's threads


def exit_through_hooks_on_sigterm() -> None:
    """Make SIGTERM end the process as SIGINT does, through its exit hooks (which stop the rank
    processes), instead of at once. For the moments the SDK's own handler is not installed: the
    start-up, and `--test_input` runs, which never install one. (Ranks also die with this
    process however it ends: ranks.die_with_parent.)"""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


@dataclass(frozen=True)
class JobInputs:
    """The job's media, checked and local, and its plan."""

    image_path: Path
    audio: AudioInput
    pose_video_path: Path | None
    plan: ClipPlan


class ProgressReporter:
    """Sends stage changes at once and sampling steps at most every `interval_s` seconds.

    Once the job's sampling is estimated (`estimate`), the "generate" stage and every sampling
    update carry `eta_s`: the estimated seconds of sampling left."""

    def __init__(self, job: dict, send: ProgressSender | None, interval_s: float) -> None:
        self.job, self.send, self.interval_s = job, send, interval_s
        self.last_sent = float("-inf")
        self.estimate: SamplingEstimate | None = None

    def _emit(self, update: dict) -> None:
        self.last_sent = time.monotonic()
        logger.debug("progress %s", update)
        if self.send is not None:
            self.send(self.job, update)

    def stage(self, name: str) -> None:
        update: dict[str, Any] = {"stage": name}
        if name == "generate" and self.estimate is not None:
            update["eta_s"] = round(self.estimate.seconds, 1)
        self._emit(update)

    def step(self, clip: int, clips: int, step: int, steps: int) -> None:
        last = clip + 1 == clips and step + 1 == steps
        if last or time.monotonic() - self.last_sent >= self.interval_s:
            update: dict[str, Any] = {"stage": "sampling", "clip": clip + 1, "clips": clips,
                                      "step": step + 1, "steps": steps}
            if self.estimate is not None:
                update["eta_s"] = round(self.estimate.remaining_s(clip, clips, step), 1)
            self._emit(update)


class JobControl:
    """Whether a running job should stop: RunPod cancelled it, or it passed JOB_TIMEOUT_S.

    Checked between stages and after every denoising step, so a stop takes effect within one step.
    Once the last step is done (`sampling_done`), only a cancellation stops the job: the time
    limit would throw away finished GPU work, so a video past it is delivered with a warning.
    """

    def __init__(self, timeout_s: float, cancelled: threading.Event | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s, self.clock = timeout_s, clock
        self.deadline = clock() + timeout_s
        self.cancelled = cancelled or threading.Event()
        # Set when the job first changes model state (LoRA merge, then the GPU work): from there an
        # unexpected error may have left the GPU or the resident weights in doubt.
        self.model_work_started = False
        self.sampling_done = False

    @property
    def elapsed_s(self) -> float:
        return self.timeout_s - (self.deadline - self.clock())

    @property
    def overran(self) -> bool:
        return self.clock() > self.deadline

    def check(self) -> None:
        if self.cancelled.is_set():
            raise JobStopped("the job was cancelled")
        if self.overran and not self.sampling_done:
            raise JobStopped(f"the job ran past its time limit of {self.timeout_s:g} s "
                             "(JOB_TIMEOUT_S)")

    def overrun_warning(self) -> str | None:
        """The result's warning for a video delivered although the job ran past its limit."""
        if not self.overran:
            return None
        return (f"the job ran past its time limit of {self.timeout_s:g} s (JOB_TIMEOUT_S) after "
                "its sampling had finished; the video was delivered anyway")


class ClipItems:
    """A streaming job's clip items: each clip's MP4, handed over by the encoder once its frames
    are in (`submit`), is finished, delivered (storage.ClipDelivery) and sent, in clip order, by a
    thread of its own, so that sampling goes on meanwhile. Its file leaves the job's folder once
    delivered. A clip never fails the job: one that cannot be encoded or delivered is an item
    without video whose "warnings" say why (the whole video, sent last, has its frames)."""

    def __init__(self, send: ItemSender, delivery: ClipDelivery, started: float) -> None:
        self.send, self.delivery, self.started = send, delivery, started
        self.items_s: list[float] = []  # seconds from the job's start to each item
        self._clips: queue.Queue[ClipEncoding | None] = queue.Queue()
        self._dropping = threading.Event()
        self._thread = threading.Thread(target=self._send_in_order, name="clip-items",
                                         daemon=True)
        self._thread.start()

    def submit(self, clip: ClipEncoding) -> None:
        """Mp4Stream's on_clip: from the encoder's writer thread, so it only queues."""
        self._clips.put(clip)

    def close(self, drop: bool = False) -> None:
        """Wait until each clip handed over so far is sent; with `drop` (the job is ending
        without its video), only the one being delivered: the others are dropped. Idempotent."""
        if drop:
            self._dropping.set()
        if self._thread.is_alive():
            self._clips.put(None)
            self._thread.join()

    def _send_in_order(self) -> None:
        while (clip := self._clips.get()) is not None:
            try:
                if not self._dropping.is_set():
                    self.send(self._item(clip))
            except Exception:  # a bug: the item is lost, the job and the whole video are not
                logger.exception("clip %d of %d: its item failed", clip.span.index + 1,
                                 clip.span.count)
            finally:
                clip.discard()  # its ffmpeg and its file

    def _item(self, clip: ClipEncoding) -> dict:
        span = clip.span
        name = f"clip {span.index + 1} of {span.count}"
        timings: dict[str, float] = {}
        delivered: dict[str, Any] = {}
        try:
            with _timed(timings, "clip_encoding_s"):  # what its ffmpeg had left to do
                encoded = clip.finish()
        except VideoEncodingError as exc:
            logger.error("%s: encoding its MP4 failed: %s", name, exc)
            delivered["warnings"] = [f"{name}: encoding its MP4 failed (the worker's logs have "
                                     "ffmpeg's message); its frames are in the whole video, "
                                     "which comes last"]
        else:
            if encoded is None:
                delivered["warnings"] = [f"{name} has no frames of its own: at {clip.fps} fps "
                                         "they open the next clip's MP4"]
            else:
                with _timed(timings, "upload_s"):
                    delivered = self.delivery.deliver(encoded.path, name)
        warnings = delivered.pop("warnings", [])
        timings["item_s"] = round(time.perf_counter() - self.started, 3)
        self.items_s.append(timings["item_s"])
        logger.info("%s: item sent %.1f s into the job (%s)", name, timings["item_s"],
                    delivered.get("storage", "no video"))
        return {"clip": span.index + 1, "clips": span.count, **delivered,
                "start_s": span.start_s, "duration_s": span.duration_s,
                "num_frames": span.num_frames, "fps": clip.fps, "width": clip.width,
                "height": clip.height, **({"warnings": warnings} if warnings else {}),
                "timings": timings}


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = round(timings.get(key, 0.0) + time.perf_counter() - start, 3)


class Worker:
    """Holds the resident pipeline and runs jobs on it, one at a time."""

    clock: Callable[[], float] = staticmethod(time.monotonic)  # of JOB_TIMEOUT_S (tests set it)

    def __init__(self, settings: Settings, pipeline: S2VPipeline,
                 send_progress: ProgressSender | None = None) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.send_progress = send_progress
        # One job at a time on the GPU, also when the SDK's local API takes requests concurrently
        # or a cancelled job is still finishing its current step.
        self._gpu = threading.Lock()

    @classmethod
    def start(cls, settings: Settings, send_progress: ProgressSender | None = None,
              imports_s: float | None = None, read_ahead: ReadAhead | None = None) -> "Worker":
        """Load the pipeline onto the device (and, with several GPUs, start the other ranks,
        which load their DiTs meanwhile): once per worker process. imports_s: how long the
        process took to get here, for the start-up's log line; read_ahead: the checkpoint's
        read-ahead started meanwhile, stopped once the worker is loaded."""
        from .loading import start_pipeline  # imports the official models: not for validation

        stages = {} if imports_s is None else {"imports_s": round(imports_s, 1)}
        pipeline = start_pipeline(settings.model, settings.parallel, settings.folders,
                                  settings.logging, stages, read_ahead)
        return cls(settings, pipeline, send_progress)

    async def handle(self, job: dict) -> dict:
        """The RunPod handler. Async so that the SDK's per-job stop, which cancels this task, can
        reach a running job: the job runs in a thread, and on cancellation it is told to stop
        after its current denoising step; the task ends once it has (GPU memory released)."""
        cancelled = threading.Event()
        running = asyncio.ensure_future(asyncio.to_thread(self.run, job, cancelled))
        try:
            return await asyncio.shield(running)
        except asyncio.CancelledError:
            logger.info("job %s: cancel requested", job.get("id", "?") if isinstance(job, dict) else "?")
            cancelled.set()
            await running
            raise

    async def handle_stream(self, job: dict) -> AsyncIterator[dict]:
        """The streaming RunPod handler (WAN_S2V_STREAM): an item for each clip as soon as its MP4
        is delivered, then the job's result (or its {"error": ...}), last. The job runs in a
        thread as in `handle`, so the event loop stays free while it runs. A cancellation while
        waiting for the next item tells the job to stop after its current step and waits for
        it; one that comes while the SDK is sending an item closes this generator, which tells
        the job to stop as well (the SDK then no longer waits for it)."""
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[dict | None] = asyncio.Queue()

        def send(item: dict) -> None:  # from the job's threads
            try:
                loop.call_soon_threadsafe(items.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody reads the items any more
                pass

        cancelled = threading.Event()
        running = asyncio.ensure_future(asyncio.to_thread(self.run, job, cancelled, send))
        # Put after the items, which the job's thread queued before it returned.
        running.add_done_callback(lambda _: items.put_nowait(None))
        try:
            while (item := await items.get()) is not None:
                yield item
            yield running.result()
        except asyncio.CancelledError:
            logger.info("job %s: cancel requested", job.get("id", "?") if isinstance(job, dict) else "?")
            cancelled.set()
            await running
            raise
        finally:
            cancelled.set()  # a no-op once the job is done; else it stops after this step

    def run(self, job: dict, cancelled: threading.Event | None = None,
            send_item: ItemSender | None = None) -> dict:
        """Run one RunPod job; always returns a dict (the result, or {"error": ...}). With
        `send_item` (a streaming endpoint), each clip's item goes to it first, in order."""
        with self._gpu:
            return self._run_guarded(job, JobControl(self.settings.limits.job_timeout_s,
                                                     cancelled, self.clock), send_item)

    def _run_guarded(self, job: dict, control: JobControl,
                     send_item: ItemSender | None = None) -> dict:
        started = time.perf_counter()
        job_id = job.get("id", "?") if isinstance(job, dict) else "?"
        try:
            self.pipeline.denoiser.check_ranks()
            request = parse_job(job)
            with tempfile.TemporaryDirectory(prefix="wan-s2v-",
                                             dir=self.settings.folders.work_dir) as tmp:
                clip_items = (None if send_item is None else ClipItems(send_item, ClipDelivery(
                    request.storage, self.settings.storage, self.settings.network,
                    self.settings.folders), started))
                try:
                    output = self._run(job, request, Path(tmp), control, clip_items)
                finally:  # before the job's folder goes: the clips' files are in it
                    if clip_items is not None:
                        clip_items.close(drop=True)
            output["timings"]["total_s"] = round(time.perf_counter() - started, 3)
            logger.info("job %s done in %.1f s", job_id, output["timings"]["total_s"])
            return output
        except JobError as exc:  # the input, a stop, or (refresh_worker) the GPU group
            log = logger.error if exc.refresh_worker else logger.info
            log("job %s ended: %s", job_id, exc)
            if control.model_work_started:
                self._release_gpu_memory()
            return exc.result()
        except VideoEncodingError:
            logger.exception("job %s: video encoding failed", job_id)
            return {"error": "encoding the video failed; the worker's logs have ffmpeg's message "
                             f"for job {job_id}"}
        except torch.OutOfMemoryError:
            logger.exception("job %s ran out of GPU memory", job_id)
            self._release_gpu_memory()
            return {"error": "the GPU ran out of memory for this job; try 480p, fewer frames per "
                             "clip, or a GPU with more memory", "refresh_worker": True}
        except Exception as exc:  # a bug or a broken GPU: log it whole, tell the client little
            logger.exception("job %s failed", job_id)
            self._release_gpu_memory()
            error = {"error": f"internal error ({type(exc).__name__}); the worker's logs have the "
                              f"details for job {job_id}"}
            # Before any model work nothing on the GPU or in the resident weights was touched, so
            # a fresh worker would fix nothing; asking for one would let any caller who finds such
            # a bug force cold starts at will.
            if control.model_work_started:
                error["refresh_worker"] = True
            return error

    def _run(self, job: dict, request: JobRequest, work_dir: Path, control: JobControl,
             clip_items: ClipItems | None = None) -> dict:
        """The job's stages, in order; each `stage` checks for a stop before it starts."""
        settings, denoiser = self.settings, self.pipeline.denoiser
        generation = request.generation
        progress = ProgressReporter(job, self.send_progress, settings.limits.progress_interval_s)
        timings: dict[str, float] = {}

        def stage(name: str) -> None:
            control.check()
            progress.stage(name)

        if reason := denoiser.speed_unavailable(generation.speed):
            raise JobInputError(reason)

        stage("download")
        with _timed(timings, "download_s"):
            inputs = self._intake(request, work_dir)
        memory = self.pipeline.memory
        if memory is not None and (reason := memory.refusal(inputs.plan.dit_tokens,
                                                             generation.resolution)):
            raise JobInputError(reason)

        estimate = denoiser.estimate(inputs.plan.dit_tokens, inputs.plan.num_clips,
                                     generation.sample_steps, generation.guidance_scale > 1,
                                     generation.step_cache)
        if estimate is not None:
            self._check_estimate(estimate, control, timings)
            progress.estimate = estimate

        with _timed(timings, "lora_s"):
            loras = self._set_loras(request, control)
        # Keys for layers this model lacks (an I2V LoRA's image branch) were skipped: say so.
        warnings = list(denoiser.lora_warnings)

        stage("generate")
        seed = generation.seed if generation.seed is not None else secrets.randbelow(SEED_RANGE)
        video = self._generate(request, inputs, seed, work_dir, control, progress, timings, stage,
                               clip_items)
        if clip_items is not None:  # every clip's item is sent before the whole video's
            clip_items.close()
            timings["items_s"] = clip_items.items_s

        stage("upload")
        with _timed(timings, "upload_s"):
            delivered = deliver_video(video.path, request.storage, settings.storage,
                                      settings.network, settings.folders)
        warnings += delivered.pop("warnings", [])
        if overrun := control.overrun_warning():
            logger.warning("job %s: %s", request.job_id, overrun)
            warnings.append(overrun)
        return {
            **delivered,
            **({"warnings": warnings} if warnings else {}),
            "seed": seed,
            "width": video.width,
            "height": video.height,
            "fps": video.fps,
            "num_frames": video.num_frames,
            "duration_s": round(video.duration_s, 3),
            "num_clips": inputs.plan.num_clips,
            "parallel": denoiser.layout(generation.guidance_scale > 1).as_dict(),
            "weights": denoiser.weights,
            "settings": {**generation.as_dict(), "seed": seed,
                         "audio_start_s": round(inputs.audio.start_s, 6),
                         "audio_duration_s": round(inputs.audio.duration_s, 6),
                         "loras": [{"sha256": lora.identity, "strength": lora.strength}
                                   for lora in loras]},
            "timings": timings,
        }

    def _intake(self, request: JobRequest, work_dir: Path) -> JobInputs:
        """The job's media as checked local files, and its plan (the video's size from the
        image's header, the clips from the audio's length)."""
        media, network = self.settings.media, self.settings.network
        generation = request.generation
        image = load_image(request.image, work_dir, media, network)
        # Before the other downloads: an image the model cannot size fails at once.
        size = video_size(image.width, image.height,
                          self.pipeline.checkpoint.max_area[generation.resolution],
                          generation.resolution, request.image.field)
        audio = load_audio(request.audio, work_dir, media, network, request.audio_slice)
        pose_video = (load_pose_video(request.pose_video, work_dir, media, network)
                      if request.pose_video else None)
        return JobInputs(image.path, audio, pose_video, plan_clips(size, audio.duration_s, generation))

    def _set_loras(self, request: JobRequest, control: JobControl) -> list[ResolvedLora]:
        """Every job sets the LoRA set, the empty one included: a job without LoRAs must run on
        the base weights whatever the previous job merged. The set is checked before the first
        weight changes (from there the job's model work has started)."""
        settings, denoiser = self.settings, self.pipeline.denoiser
        loras = resolve_loras(request.loras, settings.media, settings.network, settings.folders)
        lora_set = denoiser.load_loras(loras)
        control.model_work_started = True
        denoiser.merge_loras(lora_set)
        return loras

    def _generate(self, request: JobRequest, inputs: JobInputs, seed: int, work_dir: Path,
                  control: JobControl, progress: ProgressReporter, timings: dict[str, float],
                  stage: Callable[[str], None], clip_items: ClipItems | None) -> EncodedVideo:
        """The clips sampled and decoded into an MP4 that is encoded meanwhile: each clip's
        frames go to ffmpeg as soon as they are decoded, so what is left after the last one is
        a second or two. A streaming job's clips get MP4s of their own too, from the same
        frames, each handed to `clip_items` as soon as its frames are in."""
        generation, plan = request.generation, inputs.plan
        logger.info("job %s: %dx%d, %d clip(s) of %d frames, %d steps, seed %d", request.job_id,
                    plan.width, plan.height, plan.num_clips, plan.frames_per_clip,
                    generation.sample_steps, seed)

        def on_step(clip: int, clips: int, step: int, steps: int) -> None:
            progress.step(clip, clips, step, steps)
            if clip + 1 == clips and step + 1 == steps:
                control.sampling_done = True  # what is left (decode, encode, upload) is kept
            control.check()

        compiled_before = self.pipeline.denoiser.compiled_graphs
        with Mp4Stream(plan.width, plan.height, plan.native_fps, generation.fps,
                       plan.native_frames, inputs.audio.original_path, plan.video_seconds,
                       work_dir / "video.mp4", self.settings.video,
                       audio_start_s=inputs.audio.start_s,
                       clip_ends=plan.native_clip_ends if clip_items is not None else None,
                       on_clip=clip_items.submit if clip_items is not None else None) as stream:
            generated = self.pipeline.generate(
                inputs.image_path, inputs.audio.model_path, plan, generation, seed,
                on_frames=stream.add, pose_video_path=inputs.pose_video_path, on_step=on_step,
                pose_video_field=request.pose_video.field if request.pose_video else "pose_video")
            timings.update({k: round(v, 3) for k, v in generated.items()})
            if compiled := self.pipeline.denoiser.compiled_graphs - compiled_before:
                # One-time work the start-up's warm-up did not do (a layout or speed it did not
                # run): the first such job pays it, and says so.
                timings["compiled_graphs"] = compiled
            stage("encode")
            with _timed(timings, "encoding_s"):  # after the last frame
                return stream.finish()

    def _check_estimate(self, estimate: SamplingEstimate, control: JobControl,
                        timings: dict[str, float]) -> None:
        """Refuse, before any model work, a job that would run past JOB_TIMEOUT_S: the client learns
        it now rather than after the time limit has cut the job short."""
        total = control.elapsed_s + estimate.seconds
        timings["estimated_sampling_s"] = round(estimate.seconds, 1)
        timings["estimated_s"] = round(total, 1)
        logger.info("estimate: %d DiT calls of %d tokens at %.3f s and %.2f s per clip: %.1f s "
                    "of sampling, %.1f s in all", estimate.calls, estimate.tokens,
                    estimate.seconds_per_call, estimate.overhead_per_clip_s, estimate.seconds, total)
        if total > control.timeout_s:
            raise JobInputError(
                f"the job would take about {total:.0f} s ({estimate.calls} DiT calls at "
                f"{estimate.seconds_per_call:.2f} s each and {estimate.overhead_per_clip_s:.2f} s "
                f"of preparation for each of {estimate.clips} clip(s), as measured on this "
                f"worker), more than its time limit of {control.timeout_s:g} s (JOB_TIMEOUT_S); "
                "use fewer sample_steps, a shorter audio or max_clips, or 480p")

    def _release_gpu_memory(self) -> None:
        try:
            self.pipeline.denoiser.release()
        except RankFailure:  # logged; the next job reports the broken group
            pass
