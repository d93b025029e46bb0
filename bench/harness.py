"""Benchmark harness: the official Wan2.2 code path against the worker's, in one process on one GPU.

    python bench/harness.py --sections faithfulness,forward,vae --out $OUT/part-a.json
    python bench/harness.py --sections job --paths official --out $OUT/part-b.json
    python bench/harness.py --sections coldstart --out $OUT/part-c.json
    python bench/merge.py $OUT/part-*.json   # -> bench/results/<date>-<gpu>.json + README table

"Official" is the official modules with their attention sent to PyTorch SDPA through the official
fallback (`wan.modules.attention.attention`), which is what a FlashAttention-free deployment of the
official code runs. "Worker" is this repository's path. Every figure compares both, measured in the
same process on the same GPU; sections that would not fit one 10-minute device command run in
separate processes, each naming its device. Weights are random, at full size (bench/fullsize.py).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fullsize  # noqa: E402  (puts src/ and builder/ on sys.path)
from s2v_worker.official import install_attention  # noqa: E402

ROOT = fullsize.ROOT
DEVICE = torch.device("cuda")


def sync() -> None:
    torch.cuda.synchronize()


def median_time(fn, iters: int, warmup: int = 1) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 2**30


# --- sections ----------------------------------------------------------------------------------------

def section_env(args) -> dict:
    return {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "date": date.today().isoformat(), "commit": args.commit}


def section_faithfulness(args) -> dict:
    """Runs tests/gpu (the pass/fail record) and keeps the numbers the tests measured."""
    results = Path(tempfile.mkdtemp()) / "faithfulness.json"
    env = {**os.environ, "FAITHFULNESS_RESULTS": str(results)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(ROOT / "tests" / "gpu")], env=env, cwd=ROOT, capture_output=True,
                          text=True)
    print(proc.stdout[-3000:], proc.stderr[-2000:], flush=True)
    measured = json.loads(results.read_text()) if results.is_file() else {}
    return {"pytest_exit_code": proc.returncode, "pytest_summary": proc.stdout.strip().splitlines()[-1:],
            **measured}


def section_forward(args) -> dict:
    dit = fullsize.build_dit(DEVICE)
    out = {}
    for resolution in args.resolutions:
        height, width = fullsize.SIZES_16X9[resolution]
        inputs = fullsize.dit_inputs(height, width, DEVICE)
        tokens = {}
        def count_tokens(module, args):  # a pre-hook that returns a value would replace the args
            tokens.setdefault("n", args[0].shape[1])

        hook = dit.blocks[0].register_forward_pre_hook(count_tokens)
        row = {}
        for path, attention in (("official", "official-sdpa"), ("worker", "sdpa")):
            install_attention(attention)
            torch.cuda.reset_peak_memory_stats()

            def forward():
                with torch.no_grad(), torch.amp.autocast("cuda", dtype=torch.bfloat16):
                    dit(**inputs)

            seconds, all_times = median_time(forward, args.iters)
            row[path] = round(seconds, 4)
            row[f"{path}_all_s"] = [round(t, 4) for t in all_times]
            row[f"{path}_peak_gb"] = round(peak_gb(), 2)
            print(f"forward {resolution} {path}: {seconds:.3f} s", flush=True)
        hook.remove()
        row["tokens"] = tokens.get("n")
        row["size"] = [height, width]
        out[resolution] = row
    return {"dit_forward_s": out}  # the DiT is freed with this frame


def section_vae(args) -> dict:
    from s2v_worker.pipeline import _VideoVAE, _official

    state_path = Path(tempfile.mkdtemp()) / "vae.pth"
    torch.save(fullsize.build_vae_state(DEVICE), state_path)
    worker_vae = _VideoVAE(vae_pth=str(state_path), device=DEVICE)
    official_vae = _official.vae.Wan2_1_VAE(vae_pth=str(state_path), device=DEVICE)
    out = {}
    for resolution in args.resolutions:
        height, width = fullsize.SIZES_16X9[resolution]
        g = torch.Generator(device=DEVICE).manual_seed(0)
        # What WanS2V.generate hands the VAE: 73 bf16 motion frames to encode, and one clip's
        # latents to decode (19 motion latents + 20 new ones).
        frames = torch.rand(1, 3, 73, height, width, device=DEVICE, generator=g).mul(2).sub(1)
        frames = frames.to(torch.bfloat16)
        latents = torch.randn(1, 16, 39, height // 8, width // 8, device=DEVICE, generator=g)
        row = {}
        for path, vae in (("official", official_vae), ("worker", worker_vae)):
            with torch.no_grad():
                encode, _ = median_time(lambda: vae.encode(frames), args.vae_iters)
                decode, _ = median_time(lambda: vae.decode(latents), args.vae_iters)
            row[path] = {"encode_73_frames_s": round(encode, 3), "decode_clip_s": round(decode, 3)}
            print(f"vae {resolution} {path}: encode {encode:.2f} s, decode {decode:.2f} s", flush=True)
        out[resolution] = row
    return {"vae_s": out}


def _speech(seconds: float, folder: Path) -> Path:
    import soundfile

    data, rate = soundfile.read(str(ROOT / "tests" / "fixtures" / "speech_7s3.flac"), dtype="float32")
    path = folder / f"speech_{seconds}s.wav"
    soundfile.write(str(path), data[: int(seconds * rate)], rate, subtype="FLOAT")
    return path


def _image_16x9(folder: Path) -> Path:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (1280, 720), (70, 110, 160))
    ImageDraw.Draw(image).ellipse([540, 160, 740, 440], fill=(232, 190, 160))
    path = folder / "portrait_16x9.png"
    image.save(path)
    return path


def _timed_methods(obj, names: list[str], timings: dict[str, float]) -> None:
    """Wrap bound methods of `obj` so their wall time (GPU synced) adds up in `timings`."""
    for name in names:
        original = getattr(obj, name)

        def wrapper(*a, __original=original, __name=name, **k):
            sync()
            start = time.perf_counter()
            try:
                return __original(*a, **k)
            finally:
                sync()
                timings[__name] = timings.get(__name, 0.0) + time.perf_counter() - start
        setattr(obj, name, wrapper)


def _time_forwards(model: torch.nn.Module, timings: dict[str, float]) -> list:
    """Add each forward's wall time (GPU synced) to timings["dit_forwards_s"]."""
    def before(module, inputs):
        sync()
        module._bench_start = time.perf_counter()

    def after(module, inputs, output):
        sync()
        timings["dit_forwards_s"] = timings.get("dit_forwards_s", 0.0) + \
            time.perf_counter() - module._bench_start
    return [model.register_forward_pre_hook(before), model.register_forward_hook(after)]


def section_job(args) -> dict:
    """A whole 1-clip 480p job, 30 guided steps, 4.5 s of speech, full-size random weights."""
    from s2v_worker.job import parse_job
    from s2v_worker.video import encode_mp4
    from s2v_worker.settings import Settings

    work = Path(tempfile.mkdtemp())
    start = time.perf_counter()
    pipeline = fullsize.build_pipeline(DEVICE, work / "components")
    build_s = time.perf_counter() - start
    image, audio = _image_16x9(work), _speech(4.5, work)
    steps, guidance, seed = args.job_steps, 4.5, 42
    key = f"480p_1clip_{steps}steps"
    out = {"build_components_s": round(build_s, 1)}
    if "official" in args.paths:
        official = fullsize.official_view(pipeline)
        install_attention("official-sdpa")
        stages: dict[str, float] = {}
        _timed_methods(official, ["encode_audio", "load_pose_cond"], stages)
        _timed_methods(official.vae, ["encode", "decode"], stages)
        hooks = _time_forwards(official.noise_model, stages)
        torch.cuda.reset_peak_memory_stats()
        sync()
        start = time.perf_counter()
        video = official.generate(
            input_prompt="a person talks", ref_image_path=str(image), audio_path=str(audio),
            enable_tts=False, tts_prompt_audio=None, tts_prompt_text=None, tts_text=None,
            num_repeat=1, pose_video=None, max_area=832 * 480, infer_frames=80, shift=3.0,
            sample_solver="unipc", sampling_steps=steps, guide_scale=guidance, n_prompt="",
            seed=seed, offload_model=False, init_first_frame=False)
        sync()
        total = time.perf_counter() - start
        for hook in hooks:
            hook.remove()
        out["official"] = {"generate_s": round(total, 2), "peak_gb": round(peak_gb(), 2),
                           "video_shape": list(video.shape),
                           "stages_s": {k: round(v, 2) for k, v in stages.items()},
                           "note": "official WanS2V.generate; its own CLI then saves the MP4 "
                                   "(not timed here)"}
        print("job official", out["official"], flush=True)
    if "worker" in args.paths:
        settings = parse_job({"input": {"image_url": "https://x/i", "audio_url": "https://x/a",
                                        "prompt": "a person talks", "resolution": "480p",
                                        "sample_steps": steps, "guidance_scale": guidance,
                                        "seed": seed}}).generation
        torch.cuda.reset_peak_memory_stats()
        sync()
        start = time.perf_counter()
        plan = pipeline.plan(image, 4.5, settings)
        result = pipeline.generate(image, audio, plan, settings, seed=seed)
        sync()
        generate_s = time.perf_counter() - start
        row = {"generate_s": round(generate_s, 2), "peak_gb": round(peak_gb(), 2),
               "video_shape": list(result.video.shape), "num_clips": plan.num_clips,
               "stages_s": {k: round(v, 2) for k, v in result.timings.items()}}
        try:
            start = time.perf_counter()
            encode_mp4(result.video, native_fps=16, output_fps=24, audio_path=audio,
                       duration_s=plan.video_seconds, out_path=work / "job.mp4",
                       settings=Settings.from_env({}))
            row["stages_s"]["encoding_s"] = round(time.perf_counter() - start, 2)
        except Exception as exc:  # no ffmpeg on the device image: say so, keep the GPU figures
            row["encoding_error"] = f"{type(exc).__name__}: {exc}"[:300]
        row["job_s_without_upload"] = round(generate_s + row["stages_s"].get("encoding_s", 0.0), 2)
        out["worker"] = row
        print("job worker", row, flush=True)
    return {"job_s": {key: out}}


def section_coldstart(args) -> dict:
    """Process start to ready, loading a full-size random checkpoint from local disk."""
    folder = Path(args.ckpt_dir)
    out = {}
    if not (folder / "config.json").is_file():
        start = time.perf_counter()
        sizes = fullsize.write_checkpoint(folder, DEVICE)
        out["checkpoint_written_s"] = round(time.perf_counter() - start, 1)
        out["checkpoint_gb"] = round(sum(sizes.values()), 2)
        torch.cuda.empty_cache()
    for path in args.paths:
        dropped = _drop_page_cache()
        start = time.time()
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / "coldstart_child.py"), path,
                               str(folder), str(start)], capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
        if proc.returncode != 0 or not lines:
            out[path] = {"error": (proc.stdout + proc.stderr)[-1500:]}
        else:
            out[path] = {**json.loads(lines[-1]), "page_cache_dropped": dropped}
        print("coldstart", path, out[path], flush=True)
    return {"cold_start_s": out}


def _drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


SECTIONS = {"env": section_env, "faithfulness": section_faithfulness, "forward": section_forward,
            "vae": section_vae, "job": section_job, "coldstart": section_coldstart}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default="env,faithfulness,forward,vae")
    parser.add_argument("--paths", default="official,worker")
    parser.add_argument("--resolutions", default="480p,720p")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--vae-iters", type=int, default=2)
    parser.add_argument("--job-steps", type=int, default=30)
    parser.add_argument("--ckpt-dir", default="/root/wan-s2v-fullsize")
    parser.add_argument("--commit", default=os.environ.get("COMMIT", "unknown"))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    args.paths = args.paths.split(",")
    args.resolutions = args.resolutions.split(",")

    result = {"env": section_env(args)}
    for name in args.sections.split(","):
        if name == "env":
            continue
        start = time.perf_counter()
        try:
            result.update(SECTIONS[name](args))
        except Exception as exc:  # keep what the other sections measured
            import traceback
            traceback.print_exc()
            result[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:1000]
        print(f"section {name}: {time.perf_counter() - start:.0f} s", flush=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
