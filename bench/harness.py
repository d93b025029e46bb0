"""Benchmark harness: the official Wan2.2 code path against the worker's, in one process on one GPU.

    python bench/harness.py --sections faithfulness,forward,vae --out $OUT/part-a.json
    python bench/harness.py --sections job --paths official --out $OUT/part-b.json
    python bench/harness.py --sections coldstart --out $OUT/part-c.json
    python bench/harness.py --sections job --paths worker --job-steps 4 --job-guidance 1 \
        --job-lora-rank 64 --out $OUT/part-d.json   # -> job_s.480p_1clip_4steps_lora
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


def _kernel_breakdown(fn) -> dict[str, float]:
    """GPU time of one call by kernel family (torch.profiler), in seconds."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    families = {"attention": ("fmha", "flash", "attention", "sdpa", "cudnn"),
                "gemm": ("gemm", "sm90_xmma", "cutlass", "nvjet", "scaled_mm", "matmul")}
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        name = event.key.lower()
        family = next((f for f, keys in families.items() if any(k in name for k in keys)), "other")
        if family == "other" and name.startswith("triton"):
            family = "triton_fused"
        totals[family] = totals.get(family, 0.0) + event.self_device_time_total / 1e6
    return {k: round(v, 4) for k, v in sorted(totals.items())}


def section_forward(args) -> dict:
    """Seconds per DiT call, and the relative L2 error of every variant against the official call.
    Official: `WanModel_S2V.forward` with the official attention fallback. Worker: `DiTEngine`
    as the pipeline runs it (per-clip state prepared once, blocks compiled; its compilation and
    preparation timed apart); "fast" variants run the named GEMMs in FP8."""
    from faithfulness import rel_l2
    from s2v_worker.dit import DiTEngine

    dit = fullsize.build_dit(DEVICE)
    engine = DiTEngine(dit, compile=True)
    variants = {"worker": (engine, None)}
    if args.static_too:
        variants["worker_static"] = (DiTEngine(dit, compile=True, dynamic_shapes=False), None)
    for layers in args.float8:
        variants[f"worker_fp8_{layers}"] = (engine, layers)
    out = {}
    for resolution in args.resolutions:
        height, width = fullsize.SIZES_16X9[resolution]
        inputs = fullsize.dit_inputs(height, width, DEVICE)
        tokens = {}
        def count_tokens(module, args):  # a pre-hook that returns a value would replace the args
            tokens.setdefault("n", args[0].shape[1])

        hook = dit.blocks[0].register_forward_pre_hook(count_tokens)
        row = {}
        install_attention("official-sdpa")
        torch.cuda.reset_peak_memory_stats()
        result = {}

        def official():
            with torch.no_grad(), torch.amp.autocast("cuda", dtype=torch.bfloat16):
                result["out"] = dit(**inputs)[0]

        seconds, all_times = median_time(official, args.iters)
        expected = result.pop("out")
        row.update(official=round(seconds, 4), official_all_s=[round(t, 4) for t in all_times],
                   official_peak_gb=round(peak_gb(), 2))
        print(f"forward {resolution} official: {seconds:.3f} s", flush=True)
        if args.profile:
            row["official_kernels_s"] = _kernel_breakdown(official)
        hook.remove()
        install_attention("sdpa")
        step_inputs = dict(inputs)
        x, t = step_inputs.pop("x"), step_inputs.pop("t")
        for path, (variant, float8) in variants.items():
            torch.cuda.reset_peak_memory_stats()
            with torch.no_grad(), torch.amp.autocast("cuda", dtype=torch.bfloat16):
                sync()
                start = time.perf_counter()
                conditioning = variant.prepare(**step_inputs)
                sync()
                row[f"{path}_prepare_s"] = round(time.perf_counter() - start, 4)

            def step():
                with torch.no_grad(), torch.amp.autocast("cuda", dtype=torch.bfloat16):
                    result["out"] = variant.forward(x, t, conditioning, float8=float8)[0]

            start = time.perf_counter()
            step()
            sync()
            row[f"{path}_first_call_s"] = round(time.perf_counter() - start, 2)
            row[f"{path}_rel_l2"] = rel_l2(result.pop("out"), expected)
            seconds, all_times = median_time(step, args.iters, warmup=0)
            result.clear()
            row[path] = round(seconds, 4)
            row[f"{path}_all_s"] = [round(t, 4) for t in all_times]
            row[f"{path}_peak_gb"] = round(peak_gb(), 2)
            row[f"{path}_speedup"] = round(row["official"] / seconds, 3)
            if args.profile:
                row[f"{path}_kernels_s"] = _kernel_breakdown(step)
            print(f"forward {resolution} {path}: {seconds:.3f} s (first call "
                  f"{row[f'{path}_first_call_s']} s, x{row[f'{path}_speedup']}, rel_l2 "
                  f"{row[f'{path}_rel_l2']:.2e})", flush=True)
            del conditioning
        del expected
        row["tokens"] = tokens.get("n")
        row["size"] = [height, width]
        out[resolution] = row
    return {"dit_forward_s": out}  # the DiT is freed with this frame


def section_fastmode(args) -> dict:
    """Fast mode against exact mode over a whole 30-step guided UniPC loop at 480p (random
    weights): wall time of the loop, DiT calls, and the deviation of the final latents; plus the
    deviation of one fast forward from one exact forward. Both through S2VPipeline.denoise."""
    from faithfulness import _scheduler, rel_l2
    from s2v_worker.pipeline import S2VPipeline

    dit = fullsize.build_dit(DEVICE)
    pipeline = S2VPipeline.from_components(None, DEVICE, text_encoder=None, vae=None,
                                           noise_model=dit, audio_encoder=None, attention="sdpa",
                                           compile_dit=True)
    pipeline.fast_mode_float8 = args.fast_float8
    height, width = fullsize.SIZES_16X9["480p"]
    inputs = fullsize.dit_inputs(height, width, DEVICE)
    noise, t = inputs.pop("x")[0], inputs.pop("t")
    arg_c = dict(inputs)
    arg_null = {**inputs, "context": [torch.zeros_like(inputs["context"][0])],
                "audio_input": 0.0 * inputs["audio_input"]}
    out = {"float8": args.fast_float8, "steps": args.job_steps, "guidance_scale": 4.5}
    with torch.no_grad(), torch.amp.autocast("cuda", dtype=torch.bfloat16):
        conditioning = pipeline.dit.prepare(**arg_c)
        exact = pipeline.dit.forward([noise], t, conditioning)[0]
        fast = pipeline.dit.forward([noise], t, conditioning, float8=args.fast_float8)[0]
        out["forward_rel_l2_vs_exact"] = rel_l2(fast, exact)
        del conditioning, exact, fast
    finals = {}
    for name, fast, cache in (("exact", False, False), ("fast", True, True)):
        scheduler = _scheduler(args.job_steps)
        calls = pipeline.dit_calls
        sync()
        start = time.perf_counter()
        finals[name] = pipeline.denoise([noise.clone()], scheduler.timesteps, scheduler,
                                        torch.Generator(device=DEVICE).manual_seed(0), arg_c, arg_null,
                                        4.5, fast=fast, step_cache=cache)[0]
        sync()
        seconds = time.perf_counter() - start
        calls = pipeline.dit_calls - calls
        out[name] = {"loop_s": round(seconds, 2), "dit_calls": calls,
                     "s_per_requested_forward": round(seconds / (2 * args.job_steps), 3),
                     "s_per_dit_call": round(seconds / calls, 3)}
        print(f"fastmode {name}: {out[name]}", flush=True)
    out["final_latents_rel_l2_vs_exact"] = rel_l2(finals["fast"], finals["exact"])
    print(f"fastmode deviation: forward {out['forward_rel_l2_vs_exact']:.3e}, after "
          f"{args.job_steps} steps {out['final_latents_rel_l2_vs_exact']:.3e}", flush=True)
    return {"fast_mode_480p": out}


def section_tinyjob(args) -> dict:
    """The tiny-checkpoint whole job against the official generate, for each worker variant
    (compiled DiT or not, wav2vec2 on the GPU or the CPU): which part moves the pixels."""
    import faithfulness
    from make_tiny_checkpoint import make_tiny_checkpoint

    work = Path(tempfile.mkdtemp())
    checkpoint = make_tiny_checkpoint(work / "Wan2.2-S2V-14B")
    image, audio = _image_16x9(work), _speech(7.3, work)
    expected = faithfulness.official_tiny_video(checkpoint, image, audio)
    out = {}
    for compile_dit in (True, False):
        for on_gpu in (True, False):
            got = faithfulness.worker_tiny_video(checkpoint, image, audio, compile_dit=compile_dit,
                                                 audio_encoder_on_gpu=on_gpu)
            name = f"compile_{compile_dit}_wav2vec2_gpu_{on_gpu}"
            out[name] = faithfulness.compare_videos(got, expected)
            print("tinyjob", name, out[name]["max_abs_diff"], flush=True)
    return {"tiny_job_variants": out}


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


def _job_request(steps: int, guidance: float, seed: int, lora_path: str | None = None):
    """The benchmark job as the worker parses it; with a LoRA on the network volume."""
    from s2v_worker.job import parse_job

    fields = {"image_url": "https://x/i", "audio_url": "https://x/a", "prompt": "a person talks",
              "resolution": "480p", "sample_steps": steps, "guidance_scale": guidance, "seed": seed}
    if lora_path:
        fields["loras"] = [{"path": lora_path}]
    return parse_job({"input": fields})


def _write_job_lora(model: torch.nn.Module, rank: int, volume: Path) -> tuple[str, dict]:
    """A random LoRA in LightX2V's layout (fullsize.lightx2v_lora) written under `volume`, the
    network volume of the benchmark job; its path there, and what the file holds."""
    from safetensors.torch import save_file

    start = time.perf_counter()
    state = fullsize.lightx2v_lora(model, rank)
    path = volume / "loras" / f"lightx2v-layout-rank{rank}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return str(path.relative_to(volume)), {
        "rank": rank, "keys": len(state), "file_mb": round(path.stat().st_size / 2**20, 1),
        "written_s": round(time.perf_counter() - start, 2)}


def _worker_job(pipeline, loras, lora_parts: dict[str, float], request, settings, image: Path,
                audio: Path, out_path: Path) -> dict:
    """One job the worker's way, each stage timed: the LoRA set as the runner sets it
    (resolve_loras, then LoraManager.apply, whose parse and merge add up in `lora_parts`),
    generate (audio, text, VAE encode, sampling, decode) and the MP4 encode; not the upload."""
    from s2v_worker.lora import resolve_loras
    from s2v_worker.video import encode_mp4

    torch.cuda.reset_peak_memory_stats()
    lora_parts.clear()
    sync()
    start = time.perf_counter()
    resolved = resolve_loras(request.loras, settings)
    stages = {"lora_resolve_s": time.perf_counter() - start}
    loras.apply(resolved)
    sync()
    lora_s = time.perf_counter() - start
    stages.update(lora_parse_s=lora_parts.get("_parse", 0.0), lora_merge_s=lora_parts.get("_merge", 0.0))
    start = time.perf_counter()
    plan = pipeline.plan(image, 4.5, request.generation)
    result = pipeline.generate(image, audio, plan, request.generation, seed=request.generation.seed)
    sync()
    generate_s = time.perf_counter() - start
    stages.update(result.timings)
    row = {"lora_s": round(lora_s, 2), "generate_s": round(generate_s, 2),
           "peak_gb": round(peak_gb(), 2), "video_shape": list(result.video.shape),
           "num_clips": plan.num_clips}
    try:
        start = time.perf_counter()
        encode_mp4(result.video, native_fps=16, output_fps=24, audio_path=audio,
                   duration_s=plan.video_seconds, out_path=out_path, settings=settings)
        stages["encoding_s"] = time.perf_counter() - start
    except Exception as exc:  # no ffmpeg on the device image: say so, keep the GPU figures
        row["encoding_error"] = f"{type(exc).__name__}: {exc}"[:300]
    row["stages_s"] = {k: round(v, 2) for k, v in stages.items()}
    row["job_s_without_upload"] = round(lora_s + generate_s + stages.get("encoding_s", 0.0), 2)
    return row


def section_job(args) -> dict:
    """A whole 1-clip 480p job on 4.5 s of speech, full-size random weights: --job-steps steps at
    --job-guidance (30 guided steps by default). With --job-lora-rank R the worker's job merges a
    random rank-R LoRA in LightX2V's layout first, through the worker's LoRA path (a file on the
    job's network volume), and runs twice: the first job merges it, the second finds it merged."""
    from s2v_worker.lora import LoraManager
    from s2v_worker.settings import Settings

    if args.job_lora_rank and "official" in args.paths:
        raise ValueError("--job-lora-rank times the worker's path only: give --paths worker")
    work = Path(tempfile.mkdtemp())
    start = time.perf_counter()
    pipeline = fullsize.build_pipeline(DEVICE, work / "components")
    build_s = time.perf_counter() - start
    image, audio = _image_16x9(work), _speech(4.5, work)
    steps, guidance, seed = args.job_steps, args.job_guidance, 42
    key = f"480p_1clip_{steps}steps" + ("_lora" if args.job_lora_rank else "")
    out = {"build_components_s": round(build_s, 1), "guidance_scale": guidance}
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
        # As S2VPipeline.load places it: wav2vec2 on the GPU (the official view above ran it on
        # the CPU, as upstream does).
        pipeline.audio_encoder.model.to(DEVICE)
        # Worker start-up does this before it takes jobs (counted in the cold start).
        out["worker_warm_up_s"] = {k: round(v, 1) for k, v in pipeline.warm_up(("480p",)).items()}
        settings = Settings.from_env({}).replace(network_volume_dir=str(work))
        lora_path = None
        if args.job_lora_rank:
            lora_path, out["lora"] = _write_job_lora(pipeline.noise_model, args.job_lora_rank, work)
        request = _job_request(steps, guidance, seed, lora_path)
        # As the runner makes it (Worker._lora_manager), its parse and merge timed apart.
        loras = LoraManager(pipeline.noise_model, on_change=pipeline.dit.forget_float8)
        lora_parts: dict[str, float] = {}
        _timed_methods(loras, ["_parse", "_merge"], lora_parts)
        runs = ("worker", "worker_second_job") if args.job_lora_rank else ("worker",)
        for run in runs:
            out[run] = _worker_job(pipeline, loras, lora_parts, request, settings, image, audio,
                                   work / "job.mp4")
            print("job", run, out[run], flush=True)
        loras.restore()
    return {"job_s": {key: out}}


def section_coldstart(args) -> dict:
    """Process start to ready, loading a full-size random checkpoint from local disk. The worker
    starts as in production (Worker.start: load, then the warm-up compilation), twice: with an
    empty compile cache (first worker on a volume) and with the cache the first one left."""
    folder = Path(args.ckpt_dir)
    out = {}
    if not (folder / "config.json").is_file():
        start = time.perf_counter()
        sizes = fullsize.write_checkpoint(folder, DEVICE)
        out["checkpoint_written_s"] = round(time.perf_counter() - start, 1)
        out["checkpoint_gb"] = round(sum(sizes.values()), 2)
        torch.cuda.empty_cache()
    cache = Path(tempfile.mkdtemp(prefix="compile-cache-"))
    runs = {"official": "official", "worker": "worker", "worker_cached_compile": "worker"}
    for name, path in runs.items():
        if path not in args.paths:
            continue
        dropped = _drop_page_cache()
        start = time.time()
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / "coldstart_child.py"), path,
                               str(folder), str(start), str(cache)], capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
        if proc.returncode != 0 or not lines:
            out[name] = {"error": (proc.stdout + proc.stderr)[-1500:]}
        else:
            out[name] = {**json.loads(lines[-1]), "page_cache_dropped": dropped}
        print("coldstart", name, out[name], flush=True)
    return {"cold_start_s": out}


def _drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


SECTIONS = {"env": section_env, "faithfulness": section_faithfulness, "forward": section_forward,
            "vae": section_vae, "fastmode": section_fastmode, "job": section_job,
            "tinyjob": section_tinyjob,
            "coldstart": section_coldstart}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default="env,faithfulness,forward,vae")
    parser.add_argument("--paths", default="official,worker")
    parser.add_argument("--resolutions", default="480p,720p")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--vae-iters", type=int, default=2)
    parser.add_argument("--job-steps", type=int, default=30)
    parser.add_argument("--job-guidance", type=float, default=4.5,
                        help="job: guidance_scale (1: no guidance, one DiT call per step)")
    parser.add_argument("--job-lora-rank", type=int, default=0,
                        help="job: merge a random LoRA of this rank in LightX2V's layout first "
                             "(worker path; key 480p_1clip_<steps>steps_lora)")
    parser.add_argument("--float8", default="",
                        help="forward: also time fast mode with these FP8 layer sets (all,ffn)")
    parser.add_argument("--profile", action="store_true",
                        help="forward: GPU time by kernel family (torch.profiler)")
    parser.add_argument("--fast-float8", default="all",
                        help="fastmode: the FP8 layer set fast mode uses (dit.FLOAT8_LAYER_SETS)")
    parser.add_argument("--static-too", action="store_true",
                        help="forward: also time the engine compiled for static shapes")
    parser.add_argument("--ckpt-dir", default="/root/wan-s2v-fullsize")
    parser.add_argument("--commit", default=os.environ.get("COMMIT", "unknown"))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    args.paths = args.paths.split(",")
    args.resolutions = args.resolutions.split(",")
    args.float8 = [s for s in args.float8.split(",") if s]

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
