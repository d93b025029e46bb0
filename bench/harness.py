"""Benchmark harness: the official Wan2.2 code path against the worker's, in one process on one GPU.

    python -m bench.harness --sections faithfulness,forward,vae --out $OUT/part-a.json
    python -m bench.harness --sections job --paths official --out $OUT/part-b.json
    python -m bench.harness --sections coldstart --out $OUT/part-c.json
    python -m bench.harness --sections job --paths worker --job-steps 4 --job-guidance 1 \
        --job-lora-rank 64 --out $OUT/part-d.json   # -> job_s.480p_1clip_4steps_lora
    python bench/merge.py $OUT/part-*.json   # -> bench/results/<date>-<gpu>.json + docs/performance.md

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

from bench import fullsize
from bench.job_media import image_16x9, speech
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
                           str(ROOT / "tests" / "gpu"), *(["-k", args.pytest_k] if args.pytest_k
                                                          else [])],
                          env=env, cwd=ROOT, capture_output=True, text=True)
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
    preparation timed apart), with the attention kernel WAN_S2V_ATTENTION=auto picks here:
    "worker" exact mode, "fast" FP8 GEMMs (fast mode as served), "fastest" FP8 GEMMs and FP8
    self-attention; "worker_sdpa" is exact mode on PyTorch SDPA (cuDNN), the kernel before
    FlashAttention-3; worker_fp8_<set> are --float8 GEMM sets for comparison."""
    from bench.faithfulness import rel_l2
    from s2v_worker import attention
    from s2v_worker.dit import DiTEngine
    from s2v_worker.float8 import FAST_MODE_FLOAT8

    dit = fullsize.build_dit(DEVICE)
    engine = DiTEngine(dit, compile=True)
    served = attention.choose_kernel("auto", DEVICE)
    # name -> (engine, FP8 GEMM set, FP8 attention, attention kernel)
    variants = {"worker": (engine, None, False, served)}
    if served != "sdpa" and args.sdpa_too:
        variants["worker_sdpa"] = (engine, None, False, "sdpa")
    variants["fast"] = (engine, FAST_MODE_FLOAT8, False, served)
    if served == "fa3":
        variants["fastest"] = (engine, FAST_MODE_FLOAT8, True, served)
    if args.static_too:
        variants["worker_static"] = (DiTEngine(dit, compile=True, dynamic_shapes=False), None,
                                     False, served)
    for layers in args.float8:
        variants[f"worker_fp8_{layers}"] = (engine, layers, False, served)
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
        for path, (variant, float8, float8_attention, kernel) in variants.items():
            attention.use_kernel(kernel)
            torch.cuda.reset_peak_memory_stats()
            with torch.no_grad(), torch.amp.autocast("cuda", dtype=torch.bfloat16):
                sync()
                start = time.perf_counter()
                conditioning = variant.prepare(**step_inputs)
                sync()
                row[f"{path}_prepare_s"] = round(time.perf_counter() - start, 4)

            def step():
                with torch.no_grad(), torch.amp.autocast("cuda", dtype=torch.bfloat16):
                    result["out"] = variant.forward(x, t, conditioning, float8=float8,
                                                    float8_attention=float8_attention)[0]

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
        attention.use_kernel(served)
        row["kernel"] = served
        row["tokens"] = tokens.get("n")
        row["size"] = [height, width]
        out[resolution] = row
    return {"dit_forward_s": out}  # the DiT is freed with this frame


def section_kernels(args) -> dict:
    """The DiT's self-attention alone at each resolution's token count (40 heads of 128, random
    bfloat16 q/k/v, as many calls as the DiT has blocks): seconds per forward's worth for each
    kernel of attention.py, and each kernel's relative L2 error against SDPA's result."""
    from bench.faithfulness import rel_l2
    from s2v_worker import attention

    kernels = {"sdpa": attention.sdpa_token_major}
    if attention.fa3_unavailable(DEVICE) is None:
        kernels.update(fa3=attention.fa3_token_major, fa3_float8=attention.fa3_float8)
    out: dict = {}
    for resolution in args.resolutions:
        height, width = fullsize.SIZES_16X9[resolution]
        # 20 noisy frames + the reference frame + 1.5 frames' worth of frame-packed motion tokens
        tokens = (height // 16) * (width // 16) * 45 // 2  # 480p: 32,760; 720p: 61,200
        g = torch.Generator(device=DEVICE).manual_seed(0)
        q, k, v = (torch.randn(1, tokens, 40, 128, device=DEVICE, dtype=torch.bfloat16,
                               generator=g) for _ in range(3))
        reference = attention.sdpa_token_major(q, k, v)
        row = out.setdefault(resolution, {"tokens": tokens})
        for name, kernel in kernels.items():
            seconds, _ = median_time(lambda: kernel(q, k, v), args.iters)
            row[name] = {"s_per_40_calls": round(40 * seconds, 4),
                         "rel_l2_vs_sdpa": rel_l2(kernel(q, k, v), reference)}
            print(f"kernels {resolution} {name}: {row[name]}", flush=True)
    return {"attention_kernels": out}


def section_fastmode(args) -> dict:
    """The fast speeds against exact mode over a whole 30-step guided UniPC loop at 480p (random
    weights), each as served ("fast": FP8 GEMMs + step reuse; "fastest": also FP8 self-attention):
    wall time of the loop, DiT calls, the deviation of one forward and of the final latents
    from exact mode's. Through the pipeline's ClipSampler.sample, attention as WAN_S2V_ATTENTION=auto picks."""
    from bench.faithfulness import rel_l2
    from s2v_worker import attention
    from s2v_worker.sampling import ClipRequest

    denoiser = fullsize.build_denoiser(DEVICE)
    denoiser.sampler.fast_float8 = args.fast_float8
    height, width = fullsize.SIZES_16X9["480p"]
    inputs = fullsize.dit_inputs(height, width, DEVICE)
    noise, t = inputs.pop("x")[0], inputs.pop("t")
    arg_c = dict(inputs)
    arg_null = {**inputs, "context": [torch.zeros_like(inputs["context"][0])],
                "audio_input": 0.0 * inputs["audio_input"]}
    out = {"float8": args.fast_float8, "steps": args.loop_steps, "guidance_scale": 4.5,
           "kernel": attention.ATTENTION.name}
    # speed -> (FP8 GEMMs, step reuse, FP8 attention)
    speeds = {"exact": (False, False, False), "fast": (True, True, False)}
    if attention.ATTENTION.name == "fa3" and "fastest" in args.loop_speeds:
        speeds["fastest"] = (True, True, True)
    with torch.no_grad(), torch.amp.autocast("cuda", dtype=torch.bfloat16):
        conditioning = denoiser.engine.prepare(**arg_c)
        exact = denoiser.engine.forward([noise], t, conditioning)[0]
        forward_speeds = {"fast": False, "fastest": True} if attention.ATTENTION.name == "fa3" \
            else {"fast": False}
        for name, float8_attention in forward_speeds.items():
            got = denoiser.engine.forward([noise], t, conditioning, float8=args.fast_float8,
                                          float8_attention=float8_attention)[0]
            out.setdefault(name, {})["forward_rel_l2_vs_exact"] = rel_l2(got, exact)
        del conditioning, exact
    finals = {}
    for name, (fast, cache, float8_attention) in speeds.items():
        request = ClipRequest(latents=noise.clone(),
                              generator_state=torch.Generator(device=DEVICE).get_state(),
                              solver="unipc", steps=args.loop_steps, shift=3.0, guidance_scale=4.5,
                              cond=arg_c, uncond=arg_null, fast=fast, step_cache=cache,
                              float8_attention=float8_attention)
        calls = denoiser.dit_calls
        sync()
        start = time.perf_counter()
        finals[name] = denoiser.sample(request)
        sync()
        seconds = time.perf_counter() - start
        calls = denoiser.dit_calls - calls
        out.setdefault(name, {}).update(
            loop_s=round(seconds, 2), dit_calls=calls,
            s_per_requested_forward=round(seconds / (2 * args.loop_steps), 3),
            s_per_dit_call=round(seconds / calls, 3))
        if name != "exact":
            out[name]["final_latents_rel_l2_vs_exact"] = rel_l2(finals[name], finals["exact"])
        print(f"fastmode {name}: {out[name]}", flush=True)
    return {"fast_mode_480p": out}


def section_tinyjob(args) -> dict:
    """The tiny-checkpoint whole job against the official generate, for each worker variant
    (compiled DiT or not, wav2vec2 on the GPU or the CPU): which part moves the pixels."""
    from bench import faithfulness
    from builder.make_tiny_checkpoint import make_tiny_checkpoint

    work = Path(tempfile.mkdtemp())
    checkpoint = make_tiny_checkpoint(work / "Wan2.2-S2V-14B")
    image, audio = image_16x9(work), speech(7.3, work)
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
    from s2v_worker.vae import VideoVAE

    state_path = Path(tempfile.mkdtemp()) / "vae.pth"
    torch.save(fullsize.build_vae_state(DEVICE), state_path)
    worker_vae = VideoVAE(vae_pth=str(state_path), device=DEVICE)
    official_vae = fullsize._official.vae.Wan2_1_VAE(vae_pth=str(state_path), device=DEVICE)
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
    """The benchmark job as the worker parses it (fields only; the media are placeholders)."""
    from s2v_worker.job import parse_job

    return parse_job({"input": _job_fields(steps, guidance, seed, lora_path,
                                           image_url="https://x/i", audio_url="https://x/a")})


def _job_fields(steps: int, guidance: float, seed: int, lora_path: str | None = None,
                **media: str) -> dict:
    fields = {**media, "prompt": "a person talks", "resolution": "480p", "sample_steps": steps,
              "guidance_scale": guidance, "seed": seed}
    if lora_path:
        fields["loras"] = [{"path": lora_path}]
    return fields


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


def _worker_job(worker, lora_parts: dict[str, float], job: dict) -> dict:
    """One job exactly as RunPod hands it to the worker (Worker.run: media from base64, the LoRA
    set, generation with the MP4 encoded as the clips are decoded, delivery to the network
    volume); its own timings, to the delivered MP4, with the LoRA parse and merge apart."""
    torch.cuda.reset_peak_memory_stats()
    lora_parts.clear()
    result = worker.run(job)
    if "error" in result:
        raise RuntimeError(f"the benchmark job failed: {result['error']}")
    timings = result["timings"]
    return {"job_s": timings["total_s"], "peak_gb": round(peak_gb(), 2),
            "num_frames": result["num_frames"], "num_clips": result["num_clips"],
            "size": [result["height"], result["width"]], "storage": result["storage"],
            "stages_s": {**timings, "lora_parse_s": round(lora_parts.get("_parse", 0.0), 3),
                         "lora_merge_s": round(lora_parts.get("_merge", 0.0), 3)},
            "mp4_ready_after_last_frame_s": timings.get("encoding_s")}


def section_job(args) -> dict:
    """A whole 1-clip 480p job on 4.5 s of speech, full-size random weights: --job-steps steps at
    --job-guidance (30 guided steps by default). With --job-lora-rank R the worker's job merges a
    random rank-R LoRA in LightX2V's layout first, through the worker's LoRA path (a file on the
    job's network volume), and runs twice: the first job merges it, the second finds it merged."""
    from s2v_worker.settings import Settings

    if args.job_lora_rank and "official" in args.paths:
        raise ValueError("--job-lora-rank times the worker's path only: give --paths worker")
    work = Path(tempfile.mkdtemp())
    start = time.perf_counter()
    pipeline = fullsize.build_pipeline(DEVICE, work / "components")
    build_s = time.perf_counter() - start
    image, audio = image_16x9(work), speech(4.5, work)
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
                           "note": "official WanS2V.generate, then the MP4 as its CLI saves it "
                                   "(16 fps, wan.utils.utils save_video + merge_video_audio)"}
        try:  # generate.py's own two steps for s2v: the frames with imageio, then the audio
            from wan.utils.utils import merge_video_audio, save_video

            start = time.perf_counter()
            save_video(tensor=video[None], save_file=str(work / "official.mp4"),
                       fps=fullsize.OFFICIAL_CONFIG.sample_fps, nrow=1, normalize=True,
                       value_range=(-1, 1))
            merge_video_audio(video_path=str(work / "official.mp4"), audio_path=str(audio))
            save_s = time.perf_counter() - start
            out["official"].update(save_mp4_s=round(save_s, 2), job_s=round(total + save_s, 2))
        except Exception as exc:  # no ffmpeg or imageio there: keep the generate figure
            out["official"]["save_error"] = f"{type(exc).__name__}: {exc}"[:300]
        print("job official", out["official"], flush=True)
    if "worker" in args.paths:
        import base64

        from s2v_worker.runner import Worker

        # As load_pipeline places it: wav2vec2 on the GPU (the official view above ran it on
        # the CPU, as upstream does).
        pipeline.audio_encoder.model.to(DEVICE)
        # Worker start-up does this before it takes jobs (counted in the cold start).
        out["worker_warm_up_s"] = {k: round(v, 1) for k, v in pipeline.warm_up(("480p",)).items()}
        settings = Settings.from_env({}).replace(network_volume_dir=str(work),
                                                 max_inline_video_bytes=1)
        worker = Worker(settings, pipeline)
        lora_path = None
        if args.job_lora_rank:
            lora_path, out["lora"] = _write_job_lora(pipeline.denoiser.model, args.job_lora_rank,
                                                     work)
        media = {f"{name}_base64": base64.b64encode(path.read_bytes()).decode()
                 for name, path in (("image", image), ("audio", audio))}
        job = {"id": "bench", "input": _job_fields(steps, guidance, seed, lora_path, **media)}
        # The Denoiser's LoRA manager, its parse and merge timed apart.
        lora_parts: dict[str, float] = {}
        _timed_methods(pipeline.denoiser.loras, ["_parse", "_merge"], lora_parts)
        runs = ("worker", "worker_second_job") if args.job_lora_rank else ("worker",)
        for run in runs:
            out[run] = _worker_job(worker, lora_parts, job)
            print("job", run, out[run], flush=True)
        pipeline.denoiser.loras.restore()
    return {"job_s": {key: out}}


def section_coldstart(args) -> dict:
    """Process start to ready on one GPU, page cache dropped before each start, from a full-size
    random checkpoint on local disk, against the disk's own time to read the same files (the
    floor). The worker starts as handler.py starts it (Worker.start: load, warm-up compilation).

    1. The official layout: the worker with an empty compile cache (then its first job against a
       warm one, and a streaming 3-clip job: bench/coldstart_child.py), again with the cache the
       first start left; the official loader with --paths official.
    2. The same checkpoint rewritten as ComfyUI's fp8_scaled files (fullsize.convert_to_comfy_fp8,
       which deletes the official files as it goes: the disk holds one of them): the worker with
       WAN_S2V_WEIGHTS=fp8, with an empty compile cache and with the one it left, then capped at
       22 GiB as a 24 GB card (its tier: T5 and DiT blocks streamed) with one job.
    --coldstart-parts 1,2 picks the parts (a run of the whole may not fit one device command).
    Every run's figures are also written to <out>.partial as they come."""
    folder = Path(args.ckpt_dir)
    comfy_folder = folder.parent / (folder.name + "-comfyui-fp8")
    media = Path(tempfile.mkdtemp(prefix="coldstart-media-"))
    image_16x9(media)
    speech(4.5, media)
    speech(14.0, media)
    out: dict = {}
    partial = Path(args.out + ".partial")

    def start(name: str, checkpoint: Path, cache: Path, env: tuple[str, ...] = (),
              jobs: tuple[str, ...] = (), path: str = "worker") -> None:
        dropped = _drop_page_cache()
        began = time.time()
        command = [sys.executable, "-m", "bench.coldstart_child", path, str(checkpoint),
                   str(began), str(cache), "--media-dir", str(media)]
        command += [f"--env={item}" for item in env] + (["--jobs", *jobs] if jobs else [])
        proc = subprocess.run(command, capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
        row = json.loads(lines[-1]) if lines else {}
        # The worker's own account of its start-up: one log line with each stage's seconds.
        row["log"] = [l[-600:] for l in proc.stderr.splitlines()
                      if "worker ready in" in l or "memory plan" in l or "warm-up at" in l]
        if proc.returncode != 0 or not lines:
            row["error"] = (proc.stdout + proc.stderr)[-2000:]
        out[name] = {**row, "page_cache_dropped": dropped, "env": list(env)}
        print("coldstart", name, out[name], flush=True)
        partial.write_text(json.dumps({"cold_start_s": out}, indent=1))

    if "1" in args.coldstart_parts:
        if not (folder / "config.json").is_file():
            began = time.perf_counter()
            sizes = fullsize.write_checkpoint(folder, DEVICE)
            out["checkpoint_written_s"] = round(time.perf_counter() - began, 1)
            torch.cuda.empty_cache()
        out["disk_read_floor"] = _read_floor(_large_files(folder))
        out["disk_read_floor_s"] = out["disk_read_floor"]["seconds"]
        cache = Path(tempfile.mkdtemp(prefix="compile-cache-"))
        if "official" in args.paths:
            start("official", folder, cache, path="official")
        start("worker", folder, cache, jobs=tuple(args.coldstart_jobs))
        start("worker_cached_compile", folder, cache)
        first = out["worker"].get("first_job", {})
        if first:
            out["first_job_ratio"] = first["first_job_ratio"]
    if "2" in args.coldstart_parts:
        if not comfy_folder.is_dir():
            if not (folder / "config.json").is_file():
                fullsize.write_checkpoint(folder, DEVICE)
                torch.cuda.empty_cache()
            began = time.perf_counter()
            sizes = fullsize.convert_to_comfy_fp8(folder, comfy_folder)
            out["comfyui_fp8_written_s"] = round(time.perf_counter() - began, 1)
            out["comfyui_fp8_files_gib"] = {k: round(v, 2) for k, v in sizes.items()}
        out["disk_read_floor_fp8"] = _read_floor(_large_files(comfy_folder))
        out["disk_read_floor_fp8_s"] = out["disk_read_floor_fp8"]["seconds"]
        cache = Path(tempfile.mkdtemp(prefix="compile-cache-fp8-"))
        fp8 = ("WAN_S2V_WEIGHTS=fp8",)
        start("worker_fp8_empty_compile_cache", comfy_folder, cache, env=fp8)
        start("worker_fp8", comfy_folder, cache, env=fp8)
        start("worker_comfyui_fp8_22GiB", comfy_folder, cache, env=("WAN_S2V_GPU_MEMORY_GB=22",),
              jobs=("one_job",))
    result = {"cold_start_s": out}
    stream = out.get("worker", {}).pop("stream", None)
    if stream:
        result["stream"] = {"480p_3clips_4steps": stream}
    return result


def _large_files(folder: Path) -> list[Path]:
    """The checkpoint's files of 100 MB or more: what a cold start reads."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.stat().st_size >= 100 * 2**20)


def _read_floor(files: list[Path], readers: int = 8) -> dict:
    """The seconds the disk takes to give back `files` whole (page cache dropped first), read by
    `readers` threads at once in 64 MiB pieces: the floor under any loader's time."""
    from concurrent.futures import ThreadPoolExecutor

    pieces = [(path, offset) for path in files
              for offset in range(0, path.stat().st_size, 64 * 2**20)]

    def read(assigned: list) -> int:
        buffer = bytearray(64 * 2**20)
        done = 0
        for path, offset in assigned:
            with open(path, "rb", buffering=0) as f:
                f.seek(offset)
                done += f.readinto(buffer)
        return done

    dropped = _drop_page_cache()
    began = time.perf_counter()
    with ThreadPoolExecutor(readers) as pool:
        total = sum(pool.map(read, [pieces[i::readers] for i in range(readers)]))
    seconds = time.perf_counter() - began
    return {"seconds": round(seconds, 1), "gb": round(total / 1e9, 2),
            "gb_per_s": round(total / 1e9 / seconds, 2), "readers": readers, "files": len(files),
            "page_cache_dropped": dropped}


def _drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _clip_request(height: int, width: int, steps: int, seed: int = 0):
    """One guided clip at a 16:9 size, as the pipeline hands it to the sampler (random inputs)."""
    from s2v_worker.sampling import ClipRequest

    inputs = fullsize.dit_inputs(height, width, DEVICE, seed)
    noise = inputs.pop("x")[0]
    inputs.pop("t")
    uncond = {**inputs, "context": [torch.zeros_like(inputs["context"][0])],
              "audio_input": 0.0 * inputs["audio_input"]}
    return ClipRequest(latents=noise, generator_state=torch.Generator(device=DEVICE).get_state(),
                       solver="unipc", steps=steps, shift=3.0, guidance_scale=4.5, cond=inputs,
                       uncond=uncond)


def _world_sizes(args) -> list[int]:
    available = torch.cuda.device_count()
    return [n for n in args.world_sizes if n <= available and 40 % n == 0]


def section_parallel(args) -> dict:
    """One guided sampling step at 480p and 720p, and the 1-clip 480p job, at each world size the
    machine has (1, 2, 4, 8), with the speed-up against world size 1 in the same run. A step is
    timed as (3 steps - 1 step) / 2 of whole clip samplings, so per-clip preparation cancels out.
    World size N starts N-1 rank processes (parallel.py) whose DiTs are the same random full-size
    weights (fullsize.bench_rank_main)."""
    from s2v_worker.parallel import ParallelGroup
    from s2v_worker.planning import plan_clips
    from s2v_worker.settings import LogLevel, ModelSettings, ParallelSettings

    work = Path(tempfile.mkdtemp())
    pipeline = fullsize.build_pipeline(DEVICE, work / "components")
    pipeline.audio_encoder.model.to(DEVICE)
    image, audio = image_16x9(work), speech(4.5, work)
    request = _job_request(args.job_steps, 4.5, 42)
    out: dict = {}
    for world_size in _world_sizes(args):
        group = None
        if world_size > 1:
            start = time.perf_counter()
            group = ParallelGroup.launch(pipeline.checkpoint, world_size, DEVICE, ModelSettings(),
                                         ParallelSettings(world_size=world_size,
                                                          rank_timeout_s=900.0),
                                         LogLevel.INFO, entry=fullsize.bench_rank_main)
            group.wait_ready()
            pipeline.denoiser.attach(group)
            out.setdefault("start_s", {})[world_size] = round(time.perf_counter() - start, 1)
        try:
            for resolution in args.resolutions:
                height, width = fullsize.SIZES_16X9[resolution]
                pipeline.denoiser.sample(_clip_request(height, width, 1))  # compile, pick kernels
                seconds = {}
                for steps in (1, 3):
                    sync()
                    start = time.perf_counter()
                    pipeline.denoiser.sample(_clip_request(height, width, steps))
                    sync()
                    seconds[steps] = time.perf_counter() - start
                row = out.setdefault(resolution, {}).setdefault(world_size, {})
                row["step_s"] = round((seconds[3] - seconds[1]) / 2, 4)
                row["layout"] = pipeline.denoiser.layout(True).as_dict()
                print(f"parallel {resolution} world {world_size}: step {row['step_s']:.3f} s",
                      flush=True)
            if "job" in args.parallel_parts:
                sync()
                start = time.perf_counter()
                size = fullsize.SIZES_16X9["480p"]
                plan = plan_clips(size, 4.5, request.generation)
                pipeline.generate(image, audio, plan, request.generation, 42,
                                  on_frames=lambda frames: None)
                sync()
                job = out.setdefault("480p_1clip_job", {}).setdefault(world_size, {})
                job["generate_s"] = round(time.perf_counter() - start, 2)
                print(f"parallel job world {world_size}: {job['generate_s']} s", flush=True)
        finally:
            pipeline.denoiser.group = None
            if group is not None:
                group.close()
    for part, metric in [*((r, "step_s") for r in args.resolutions),
                         ("480p_1clip_job", "generate_s")]:
        rows = out.get(part, {})
        for row in rows.values() if 1 in rows else ():
            row["speedup"] = round(rows[1][metric] / row[metric], 3)
    return {"parallel": out}


SECTIONS = {"env": section_env, "faithfulness": section_faithfulness, "forward": section_forward,
            "vae": section_vae, "fastmode": section_fastmode, "job": section_job,
            "tinyjob": section_tinyjob,
            "coldstart": section_coldstart, "parallel": section_parallel,
            "kernels": section_kernels, "memory": lambda args: _memory(args)}


def _memory(args) -> dict:
    from bench.memory_tiers import section_memory

    return section_memory(args)


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
    parser.add_argument("--fast-float8", default="all_tensorwise",
                        help="fastmode: the FP8 layer set of the loop (dit.FLOAT8_LAYER_SETS); the "
                             "default is fast mode's as served (float8.FAST_MODE_FLOAT8)")
    parser.add_argument("--static-too", action="store_true",
                        help="forward: also time the engine compiled for static shapes")
    parser.add_argument("--sdpa-too", action="store_true",
                        help="forward: also time exact mode on PyTorch SDPA (cuDNN) where "
                             "FlashAttention-3 is served")
    parser.add_argument("--loop-steps", type=int, default=30,
                        help="fastmode: steps of the guided loop")
    parser.add_argument("--loop-speeds", default="fast,fastest",
                        help="fastmode: the speeds run over the whole loop besides exact")
    parser.add_argument("--pytest-k", default="",
                        help="faithfulness: only the GPU tests matching this -k expression")
    parser.add_argument("--world-sizes", default="1,2,4,8",
                        help="parallel: world sizes to measure (those the machine has)")
    parser.add_argument("--parallel-parts", default="step,job",
                        help="parallel: 'step' (one guided step per resolution) and/or 'job'")
    parser.add_argument("--tiers", default="none,44GiB,22GiB",
                        help="memory: the tiers to measure, in this order (none first: the "
                             "ratios are against it)")
    parser.add_argument("--tier-steps", type=int, default=10,
                        help="memory: guided steps of each tier's 1-clip jobs")
    parser.add_argument("--fp8-variants", default="",
                        help="memory: also the deviation of these FP8 weight variants "
                             "(memory_tiers.FP8_VARIANTS)")
    parser.add_argument("--coldstart-jobs", default="first_job,stream",
                        help="coldstart: the jobs the first worker of part 1 runs once ready "
                             "(bench/coldstart_child.py --jobs)")
    parser.add_argument("--coldstart-parts", default="1,2",
                        help="coldstart: 1 (the official layout), 2 (ComfyUI's FP8 files)")
    parser.add_argument("--work-dir", default=tempfile.mkdtemp(prefix="bench-"))
    parser.add_argument("--ckpt-dir", default="/root/wan-s2v-fullsize")
    parser.add_argument("--commit", default=os.environ.get("COMMIT", "unknown"))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    args.paths = args.paths.split(",")
    args.resolutions = args.resolutions.split(",")
    args.float8 = [s for s in args.float8.split(",") if s]
    args.world_sizes = [int(n) for n in args.world_sizes.split(",") if n]
    args.parallel_parts = args.parallel_parts.split(",")
    args.tiers = args.tiers.split(",")
    args.coldstart_parts = args.coldstart_parts.split(",")
    args.fp8_variants = [v for v in args.fp8_variants.split(",") if v]
    args.coldstart_jobs = [j for j in args.coldstart_jobs.split(",") if j]

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
