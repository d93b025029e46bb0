"""Benchmark section "memory" (issue 19): whole 1-clip jobs in each memory tier, on one GPU, with the
worker's GPU memory capped as a smaller card's would be (WAN_S2V_GPU_MEMORY_GB), against the
uncapped bfloat16 exact job in the same run; and the deviation of one forward on FP8 weights.

One full-size random pipeline is built once and moved down the tiers in place, so every tier
serves the same weights: "none" (bfloat16, everything resident, no cap), then "44GiB" (a 48 GB
card: the tier memory.plan_memory picks, FP8 weights quantized from the same bfloat16 ones), then
"22GiB" (a 24 GB card: FP8, T5 and DiT blocks streamed from pinned host memory). Each job runs
through Worker.run as RunPod hands it over: media in base64, MP4 to the network volume folder.

    python -m bench.harness --sections memory --tier-steps 10 --out $OUT/memory.json
"""
from __future__ import annotations

import base64
import gc
import time
from pathlib import Path

import torch

from bench import fullsize
from bench.job_media import image_16x9, speech

GiB = 2**30
CAPS = {"none": None, "44GiB": 44, "22GiB": 22}


def _peaks() -> dict:
    return {"peak_gb": round(torch.cuda.max_memory_allocated() / GiB, 2),
            "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / GiB, 2)}


def _job(worker, image: Path, audio: Path, resolution: str, steps: int) -> dict:
    job = {"id": f"tier-{resolution}", "input": {
        "image_base64": base64.b64encode(image.read_bytes()).decode(),
        "audio_base64": base64.b64encode(audio.read_bytes()).decode(),
        "prompt": "a person talks", "resolution": resolution, "sample_steps": steps,
        "guidance_scale": 4.5, "seed": 42, "max_clips": 1}}
    torch.cuda.reset_peak_memory_stats()
    result = worker.run(job)
    if "error" in result:
        return {"error": result["error"]}
    return {"job_s": result["timings"]["total_s"], **_peaks(), "weights": result["weights"],
            "sampling_s": result["timings"]["sampling_s"],
            "text_encoding_s": result["timings"]["text_encoding_s"],
            "size": [result["height"], result["width"]]}


def _model_bytes(pipeline):
    """memory.ModelBytes of the built components, counted as model_bytes counts a checkpoint."""
    from s2v_worker.memory import count_model_bytes
    from s2v_worker.weights import ComponentShapes

    def shapes(module):
        return {name: tuple(t.shape) for name, t in module.state_dict().items()}

    return count_model_bytes(ComponentShapes(
        dit=shapes(pipeline.denoiser.model), t5=shapes(pipeline.text_encoder.model),
        vae_values=sum(t.numel() for t in pipeline.vae.model.state_dict().values()),
        wav2vec_values=sum(t.numel() for t in pipeline.audio_encoder.model.state_dict().values())))


# Variants of the FP8 weights, for the deviation only (--fp8-variants): which Linears stay in
# bfloat16 ("bf16") or multiply after dequantizing although the others run FP8 GEMMs ("upcast").
# The text (cross_attn k/v) and audio (injector k/v) projections see few tokens: their GEMMs cost
# next to nothing whichever way they run.
_CROSS_KV = r"^blocks\.\d+\.cross_attn\.(k|v)$"
_INJECTOR = r"^audio_injector\."
_INJECTOR_KV = r"^audio_injector\.injector\.\d+\.(k|v)$"
FP8_VARIANTS = {
    "context_upcast": {"upcast": (_CROSS_KV, _INJECTOR_KV)},
    "cross_kv_bf16": {"bf16": (_CROSS_KV,)},
    "injector_bf16": {"bf16": (_INJECTOR,)},
    "cross_kv_injector_bf16": {"bf16": (_CROSS_KV, _INJECTOR)},
}


def _apply_variant(fp8: torch.nn.Module, dit: torch.nn.Module, variant: dict) -> None:
    import re

    from s2v_worker.float8 import Float8Linear

    for name, module in list(fp8.named_modules()):
        if not isinstance(module, Float8Linear):
            continue
        if any(re.search(p, name) for p in variant.get("upcast", ())):
            module.gemm = "upcast"
        if any(re.search(p, name) for p in variant.get("bf16", ())):
            parent, _, child = name.rpartition(".")
            setattr(fp8.get_submodule(parent), child, dit.get_submodule(name))


def _fp8_deviation(dit: torch.nn.Module, device: torch.device, variants=()) -> dict:
    """One 480p forward's relative L2 deviation from the bfloat16 one, for the same weights in FP8
    (per-row scales): dequantized for a bfloat16 GEMM (the Ampere path), FP8 GEMMs (Hopper); and
    for each of `variants` (FP8_VARIANTS), under "<variant>.<gemm>"."""
    from bench.faithfulness import rel_l2
    from s2v_worker.dit import DiTEngine
    from s2v_worker.weights import Float8Recipe, build_dit

    height, width = fullsize.SIZES_16X9["480p"]
    inputs = fullsize.dit_inputs(height, width, device)
    x, t = inputs.pop("x"), inputs.pop("t")
    config = dict(dit.config)
    out = {}
    runs = [(name, gemm, None) for name, gemm in (("bf16_gemm", "upcast"), ("fp8_gemm", "fp8"))]
    runs += [(f"{v}.{name}", gemm, FP8_VARIANTS[v]) for v in variants
             for name, gemm in (("bf16_gemm", "upcast"), ("fp8_gemm", "fp8"))
             if not (gemm == "upcast" and "upcast" in FP8_VARIANTS[v])]
    with torch.no_grad(), torch.amp.autocast("cuda", dtype=torch.bfloat16):
        engine = DiTEngine(dit)
        exact = engine.forward(x, t, engine.prepare(**inputs))[0]
        for name, gemm, variant in runs:
            tensors = ((n, p.detach(), None) for n, p in dit.state_dict().items())
            fp8 = build_dit(config, tensors, torch.bfloat16, Float8Recipe(rowwise=True, gemm=gemm))
            if variant is not None:
                _apply_variant(fp8, dit, variant)
            engine = DiTEngine(fp8)
            out[name] = rel_l2(engine.forward(x, t, engine.prepare(**inputs))[0], exact)
            print(f"memory: fp8 weights, {name}: rel_l2 {out[name]:.3e}", flush=True)
            del fp8, engine
            torch.cuda.empty_cache()
    return out


def _to_tier(pipeline, plan, device: torch.device) -> None:
    """Move the pipeline's weights where `plan` says: the DiT's large Linears quantized in place
    to FP8 (the bfloat16 ones freed as each goes), T5 to pinned host memory and streamed, the DiT's
    last blocks streamed."""
    from s2v_worker.denoiser import Denoiser, float8_gemm
    from s2v_worker.float8 import Float8Linear, Float8Weight
    from s2v_worker.loading import stream_t5
    from s2v_worker.weights import keeps_float8

    model = pipeline.denoiser.model
    if plan.weights == "fp8" and pipeline.denoiser.weights != "fp8":
        gemm = float8_gemm(device)
        for name, module in list(model.named_modules()):
            if isinstance(module, torch.nn.Linear) and not isinstance(module, Float8Linear) \
                    and keeps_float8(name):
                parent, _, child = name.rpartition(".")
                stored = Float8Weight.quantize(module.weight.data, rowwise=True)
                setattr(model.get_submodule(parent), child,
                        Float8Linear(stored, module.bias.data if module.bias is not None else None,
                                     gemm))
                del module
        gc.collect()
        torch.cuda.empty_cache()
    if plan.t5_streamed and not getattr(pipeline, "_t5_streamed", False):
        stream_t5(pipeline.text_encoder.model, device)
        pipeline._t5_streamed = True
    denoiser = Denoiser(model, device, compile=True, weights=plan.weights, memory=plan)
    if plan.streamed_blocks:
        count = len(model.blocks)
        denoiser.engine.stream_blocks(list(range(count - plan.streamed_blocks, count)), device)
    pipeline.denoiser, pipeline.memory = denoiser, plan
    pipeline._text_cache.clear()
    gc.collect()
    torch.cuda.empty_cache()


def section_memory(args) -> dict:
    from s2v_worker.memory import plan_memory
    from s2v_worker.pipeline import warm_up_dit, warm_up_speech
    from s2v_worker.runner import Worker
    from s2v_worker.settings import Settings

    device = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(device).total_memory
    work = Path(args.work_dir)
    pipeline = fullsize.build_pipeline(device, work / "components")
    pipeline.audio_encoder.model.to(device)  # as load_pipeline places it
    warm_up_speech(pipeline.audio_encoder)
    image, audio = image_16x9(work), speech(4.5, work)
    settings = Settings.from_env({}).replace(network_volume_dir=str(work),
                                             max_inline_video_bytes=1)
    sizes = _model_bytes(pipeline)
    out: dict = {"steps": args.tier_steps}
    try:
        out["fp8_weights_deviation"] = _fp8_deviation(pipeline.denoiser.model, device,
                                                        args.fp8_variants)
    except Exception as exc:  # the tiers are measured anyway
        out["fp8_weights_deviation_error"] = f"{type(exc).__name__}: {exc}"[:500]
    for cap, gib in CAPS.items():
        if cap not in args.tiers:
            continue
        start = time.perf_counter()
        if gib is None:
            plan = plan_memory(total - GiB, sizes, "bf16")  # the uncapped worker's own plan
            torch.cuda.set_per_process_memory_fraction(1.0, device)
        else:
            plan = plan_memory(gib * GiB, sizes, "auto")
            _to_tier(pipeline, plan, device)
            torch.cuda.set_per_process_memory_fraction(gib * GiB / total, device)
        row = {"plan": plan.describe(), "weights": plan.weights,
               "resident_gb": round(torch.cuda.memory_allocated() / GiB, 2)}
        warm = warm_up_dit(pipeline.denoiser, ("480p",), pipeline.checkpoint.max_area)
        row["warm_up_s"] = {k: round(v, 1) for k, v in warm.items()}
        row["tier_set_up_s"] = round(time.perf_counter() - start, 1)
        worker = Worker(settings, pipeline)
        for resolution in args.resolutions:
            if resolution not in plan.resolutions:
                row[resolution] = {"refused": plan.refusal(10**6, resolution) or "not served"}
                continue
            row[resolution] = _job(worker, image, audio, resolution, args.tier_steps)
            exact = out.get("none", {}).get(resolution, {}).get("job_s")
            if exact and "job_s" in row[resolution]:
                row[resolution]["ratio_vs_exact"] = round(row[resolution]["job_s"] / exact, 3)
            print(f"memory {cap} {resolution}: {row[resolution]}", flush=True)
        out[cap] = row
    torch.cuda.set_per_process_memory_fraction(1.0, device)
    return {"memory_tiers": out}
