"""Merge harness parts into one result file and write docs/performance.md's measurements from it.

    python bench/merge.py bench/results/2026-11-27-nvidia-h100-80gb-hbm3.json PART.json [PART.json ...]
    python bench/merge.py --page-only bench/results/<file>.json

Every part must come from the same device model; each section keeps the commit it was measured at.
The section of docs/performance.md between the `bench:start` and `bench:end` markers is replaced.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PERFORMANCE_PAGE = ROOT / "docs" / "performance.md"  # its measurements section is generated
SECTION_KEYS = ("faithfulness", "dit_forward_s", "vae_s", "job_s", "cold_start_s", "fast_mode_480p")
FAITHFULNESS_KEYS = ("tiny_whole_job", "fullsize_forward_480p", "fullsize_forward_720p",
                     "fullsize_three_steps_480p")
COLD_START_RUNS = ("official", "worker", "worker_cached_compile", "worker_fp8",
                   "worker_fp8_empty_compile_cache", "worker_comfyui_fp8_22GiB")


def merge(parts: list[dict]) -> dict:
    devices = {part["env"]["device"] for part in parts}
    if len(devices) != 1:
        raise SystemExit(f"parts come from different devices: {sorted(devices)}")
    first = parts[0]["env"]
    merged = {"device": first["device"], "torch": first["torch"],
              "date": ", ".join(sorted({part["env"]["date"] for part in parts})),
              "commits": sorted({part["env"]["commit"] for part in parts})}
    for part in parts:  # in file order: a later part's check or row replaces an earlier one
        commit = part["env"]["commit"]
        for key in FAITHFULNESS_KEYS:
            if key in part:
                merged.setdefault("faithfulness", {})[key] = {
                    **part[key], "commit": commit, "pytest_summary": part.get("pytest_summary")}
        for key in ("dit_forward_s", "vae_s"):
            if key in part:
                merged[key] = {**merged.get(key, {}), **part[key], "commit": commit}
        if "fast_mode_480p" in part:
            merged["fast_mode_480p"] = {**part["fast_mode_480p"], "commit": commit}
        for key in ("attention_kernels", "parallel"):
            if key in part:
                merged[key] = {**part[key], "commit": commit}
        for path, row in part.get("cold_start_s", {}).items():
            cold = merged.setdefault("cold_start_s", {})
            if path in COLD_START_RUNS and "ready_s" in row:
                cold[path] = row["ready_s"]
                cold[f"{path}_detail"] = {**row, "commit": commit}
            elif path.startswith(("checkpoint_", "comfyui_fp8_", "disk_read_floor")) \
                    or path == "first_job_ratio":
                cold[path] = {**row, "commit": commit} if isinstance(row, dict) else row
        if "stream" in part:
            merged["stream"] = {**part["stream"], "commit": commit}
        if "memory_tiers" in part:
            merged["memory_tiers"] = _merge_tiers(merged.get("memory_tiers", {}),
                                                  part["memory_tiers"], commit)
        if "fp8_weights_deviation" in part.get("memory_tiers", {}):
            merged["fp8_weights_deviation"] = {**part["memory_tiers"]["fp8_weights_deviation"],
                                               "commit": commit}
        if "job_s" in part:  # official and worker ran as separate processes on the same machine
            job = merged.setdefault("job_s", {})
            for name, row in part["job_s"].items():
                entry = job.setdefault(name, {})
                if "guidance_scale" in row:
                    entry["guidance_scale"] = row["guidance_scale"]
                for path in ("official", "worker", "worker_second_job"):
                    if path in row:
                        # To the delivered MP4 where the run measured it (job_s), else generate.
                        entry[path] = row[path].get("job_s", row[path].get("generate_s"))
                        entry[f"{path}_detail"] = {**row[path], "commit": commit}
    return merged


def _merge_tiers(merged: dict, part: dict, commit: str) -> dict:
    """Memory tiers measured over several runs (a run measures what one device command holds: the
    720p jobs in one, the 480p ones in another): a tier's rows are kept per resolution, each with
    the commit that measured it, its ratio against the uncapped job of its own run."""
    out = {**merged, **{k: v for k, v in part.items() if not _is_tier(v)}, "commit": commit}
    for cap, row in part.items():
        if _is_tier(row):
            rows = {r: {**job, "commit": commit} for r, job in row.items() if r in ("480p", "720p")}
            out[cap] = {**merged.get(cap, {}), **row, **rows}
    return out


def _is_tier(row) -> bool:
    return isinstance(row, dict) and "plan" in row


def _ratio(official: float, worker: float) -> str:
    return f"{official / worker:.2f}x"


def _speed(row: dict, key: str) -> str:
    """'2.28 s (1.61x, 4.8e-02)': seconds, ratio to the official call, rel. L2 to it."""
    if key not in row:
        return "-"
    return (f"{row[key]:.2f} s ({_ratio(row['official'], row[key])}, "
            f"{row[f'{key}_rel_l2']:.1e})")


def measurements_section(result: dict, result_path: Path) -> str:
    f = result.get("faithfulness", {})
    lines = [
        f"Measured on one **{result['device']}** (torch {result['torch']}), {result['date']}, at "
        f"commit(s) {', '.join(result['commits'])}, random weights at full size; file: "
        f"`{result_path.relative_to(ROOT)}`. \"Official\" is the official Wan2.2 modules with their "
        "attention sent to PyTorch SDPA (what the official code runs without flash_attn); "
        "\"worker\" is this repository's path in exact mode, \"fast\" and \"fastest\" its fast "
        "speeds. Ratio = official / worker (higher is better); after it, the relative L2 "
        "distance of one forward from the official one.",
        "",
        "| what | official | worker (exact) | fast | fastest |",
        "| --- | --- | --- | --- | --- |",
    ]
    for res, row in result.get("dit_forward_s", {}).items():
        if isinstance(row, dict):
            kernel = f", attention {row['kernel']}" if "kernel" in row else ""
            fast = row.get("fast", row.get("worker_fp8_all_tensorwise"))
            fast_key = "fast" if "fast" in row else "worker_fp8_all_tensorwise"
            lines.append(f"| DiT call, {res} ({row['size'][0]}x{row['size'][1]}, {row['tokens']:,} "
                         f"tokens{kernel}) | {row['official']:.2f} s | {_speed(row, 'worker')} | "
                         f"{_speed(row, fast_key) if fast is not None else '-'} | "
                         f"{_speed(row, 'fastest')} |")
    for res, row in result.get("attention_kernels", {}).items():
        if isinstance(row, dict):
            lines.append(f"| self-attention alone, {res}, 40 calls: SDPA (cuDNN) / FlashAttention-3 "
                         f"/ FA3 in FP8 | {row['sdpa']['s_per_40_calls']:.2f} s | "
                         f"{row['fa3']['s_per_40_calls']:.2f} s | - | "
                         f"{row['fa3_float8']['s_per_40_calls']:.2f} s |")
    for res, row in result.get("parallel", {}).items():
        if isinstance(row, dict) and "1" in row:
            per_call = row["1"]["step_s"] / 2
            forward = result.get("dit_forward_s", {}).get(res, {}).get("worker")
            versus = f" ({per_call / forward - 1:+.1%} per call against the forward above)" \
                if forward else ""
            lines.append(f"| one guided step at {res}, one GPU (two DiT calls and the solver) | - | "
                         f"{row['1']['step_s']:.2f} s{versus} | - | - |")
    for res, row in result.get("vae_s", {}).items():
        if isinstance(row, dict):
            o, w = row["official"], row["worker"]
            lines.append(f"| VAE {res}: encode 73 frames / decode one clip | "
                         f"{o['encode_73_frames_s']:.2f} / {o['decode_clip_s']:.2f} s | "
                         f"{w['encode_73_frames_s']:.2f} / {w['decode_clip_s']:.2f} s | - | - |")
    fast_loop = result.get("fast_mode_480p", {})
    if "exact" in fast_loop:
        e = fast_loop["exact"]
        q = fast_loop.get("fast", {})
        fast = (f"{q['loop_s']:.1f} s / {q['dit_calls']} / {q['s_per_requested_forward']:.2f} s "
                f"(FP8 set `{fast_loop['float8']}`)" if "loop_s" in q else "-")
        lines.append(f"| 30 guided steps at 480p (the DiT loop): wall time / DiT calls / per "
                     f"requested forward | - | {e['loop_s']:.1f} s / {e['dit_calls']} / "
                     f"{e['s_per_requested_forward']:.2f} s | {fast} | - |")
    for name, row in result.get("job_s", {}).items():
        worker = row.get("worker_detail", {})
        if "worker" not in row:
            continue
        to_mp4 = "job_s" in worker
        what = (f"to the delivered MP4 (after the last frame: "
                f"{worker['mp4_ready_after_last_frame_s']:.1f} s)" if to_mp4 else "generate")
        second = (f"; the next job {row['worker_second_job']:.1f} s"
                  if "worker_second_job" in row else "")
        official = "-"
        if "official" in row:
            official_what = "to the MP4" if "job_s" in row["official_detail"] else "generate only"
            official = f"{row['official']:.1f} s ({official_what})"
        ratio = f", {_ratio(row['official'], row['worker'])}" if "official" in row else ""
        lines.append(f"| whole job `{name}` (4.5 s speech, guidance {row.get('guidance_scale', 4.5)})"
                     f" | {official} | {row['worker']:.1f} s {what}{ratio}{second} | - | - |")
    cold = result.get("cold_start_s", {})
    if "official" in cold and "worker" in cold:
        dropped = cold["worker_detail"].get("page_cache_dropped")
        cached = (f"; {cold['worker_cached_compile']:.0f} s with the compile cache a first worker "
                  "left" if "worker_cached_compile" in cold else "")
        lines.append(f"| cold start, process start to ready (worker: load + warm-up compilation), "
                     f"full checkpoint on local disk (page cache dropped: {'yes' if dropped else 'no'}) "
                     f"| {cold['official']:.0f} s | {cold['worker']:.0f} s{cached} | - | - |")
    lines += reach_lines(result)
    lines += ["", "Faithfulness (tests/gpu; the bounds are bench/faithfulness.py's):", ""]
    labels = {"tiny_whole_job": "tiny checkpoint, whole job (2 clips, 4 guided steps), official "
                                "generate vs the worker with WAN_S2V_COMPILE=false and "
                                "WAN_S2V_AUDIO_ENCODER_DEVICE=cpu: max |diff| on pixels",
              "fullsize_forward_480p": "full size, one DiT forward at 480p, as served: relative L2",
              "fullsize_forward_720p": "full size, one DiT forward at 720p, as served: relative L2",
              "fullsize_three_steps_480p": "full size, three guided steps at 480p, as served: "
                                           "relative L2 of latents"}
    for key, label in labels.items():
        if key in f:
            row = f[key]
            value = row.get("max_abs_diff", row.get("rel_l2"))
            served = (f"; as served (compiled, wav2vec2 on the GPU): {row['served_max_abs_diff']:.2e}"
                      if "served_max_abs_diff" in row else "")
            lines.append(f"- {label}: {value:.2e} (bound {row['bound']:g}) - "
                         f"{'passed' if row['passed'] else 'FAILED'}{served}")
    for res, row in result.get("dit_forward_s", {}).items():
        if isinstance(row, dict) and "kernel" in row:
            lines.append(f"- full size, one DiT forward at {res}, as served (the table's exact "
                         f"column): {row['worker_rel_l2']:.2e} (bound 1e-2) - "
                         f"{'passed' if row['worker_rel_l2'] <= 1e-2 else 'FAILED'}")
    if "forward_rel_l2_vs_exact" in fast_loop:  # the earlier files' layout
        lines.append(f"- fast mode against exact mode (not bounded; for choosing): one forward "
                     f"{fast_loop['forward_rel_l2_vs_exact']:.2e}, final latents after "
                     f"{fast_loop['steps']} guided steps {fast_loop['final_latents_rel_l2_vs_exact']:.2e} "
                     "(relative L2)")
    for speed in ("fast", "fastest"):
        row = fast_loop.get(speed, {})
        if "forward_rel_l2_vs_exact" in row:
            after = (f", final latents after {fast_loop['steps']} guided steps "
                     f"{row['final_latents_rel_l2_vs_exact']:.2e}"
                     if "final_latents_rel_l2_vs_exact" in row else "")
            lines.append(f"- {speed} against exact mode at 480p (FP8 set `{fast_loop['float8']}`): "
                         f"one forward {row['forward_rel_l2_vs_exact']:.2e}{after} (relative L2)")
    return "\n".join(lines)


def _s(value, digits: int = 1) -> str:
    return f"{value:.{digits}f} s" if isinstance(value, (int, float)) else "-"


def reach_lines(result: dict) -> list[str]:
    """Cold start against the disk, the memory tiers, streaming, FP8 weights (issues 19-21)."""
    lines: list[str] = []
    cold = result.get("cold_start_s", {})
    if "disk_read_floor_s" in cold:
        floor, detail = cold["disk_read_floor"], cold.get("worker_detail", {})
        first = detail.get("first_job", {})
        lines += ["", f"Cold start, process start to ready (Worker.start: load and warm-up), page "
                      f"cache dropped before each, at {detail.get('commit', '?')}; the floor is the "
                      f"same files read whole by {floor['readers']} threads in the same run:", "",
                  "| checkpoint | disk read (floor) | ready, empty compile cache | ready, compile "
                  "cache of a first worker | first job / the next |", "| --- | --- | --- | --- | --- |"]
        ratio = (f"{first['first']['job_s']:.1f} s / {first['warm']['job_s']:.1f} s = "
                 f"{first['first_job_ratio']:.2f}x" if first else "-")
        lines.append(f"| official layout ({floor['gb']:.1f} GB of large files) | "
                     f"{floor['seconds']:.1f} s ({floor['gb_per_s']:.2f} GB/s) | "
                     f"{_s(cold.get('worker'))} | {_s(cold.get('worker_cached_compile'))} | {ratio} |")
        if "disk_read_floor_fp8" in cold:
            fp8 = cold["disk_read_floor_fp8"]
            lines.append(f"| ComfyUI's fp8_scaled files ({fp8['gb']:.1f} GB), WAN_S2V_WEIGHTS=fp8 | "
                         f"{fp8['seconds']:.1f} s ({fp8['gb_per_s']:.2f} GB/s) | "
                         f"{_s(cold.get('worker_fp8_empty_compile_cache'))} | "
                         f"{_s(cold.get('worker_fp8'))} | - |")
        capped = cold.get("worker_comfyui_fp8_22GiB_detail", {})
        if capped:
            job = capped.get("one_job", {})
            lines.append(f"| the same files, WAN_S2V_GPU_MEMORY_GB=22 (a 24 GB card) | - | - | "
                         f"{_s(capped.get('ready_s'))} | one 1-clip 480p job of 4 guided steps: "
                         f"{_s(job.get('job_s'))}, peak {job.get('peak_gb', '-')} GiB |")
    tiers = result.get("memory_tiers", {})
    caps = [cap for cap, row in tiers.items() if isinstance(row, dict) and "plan" in row]
    if caps:
        resolutions = [r for r in ("480p", "720p") if any(r in tiers[c] for c in caps)]
        lines += ["", f"Memory tiers (WAN_S2V_GPU_MEMORY_GB caps the worker's GPU memory as a smaller "
                      f"card's would; 1-clip jobs of {tiers.get('steps', '?')} guided steps through "
                      f"Worker.run, to the delivered MP4; ratio = job time / the uncapped bfloat16 "
                      f"job's), at {tiers.get('commit', '?')}:", "",
                  "| cap | tier | " + " | ".join(f"{r}: job, x uncapped, peak" for r in resolutions)
                  + " |", "| --- | --- |" + " --- |" * len(resolutions)]
        for cap in caps:
            row = tiers[cap]
            cells = []
            for r in resolutions:
                job = row.get(r, {})
                if "job_s" in job:
                    cells.append(f"{job['job_s']:.1f} s, {job.get('ratio_vs_exact', 1.0):.2f}x, "
                                 f"{job['peak_gb']:.1f} GiB")
                else:
                    cells.append(str(job.get("refused", job.get("error", "-")))[:80])
            lines.append(f"| {cap} | {row['plan']} | " + " | ".join(cells) + " |")
    deviation = result.get("fp8_weights_deviation", {})
    if "fp8_gemm" in deviation:
        lines += ["", f"FP8 weights (per-row scales) against the same weights in bfloat16, one 480p "
                      f"DiT forward, relative L2: {deviation['bf16_gemm']:.2e} multiplied in "
                      f"bfloat16 (Ampere), {deviation['fp8_gemm']:.2e} with FP8 GEMMs (Ada, "
                      f"Hopper), at {deviation['commit']}."]
    stream = result.get("stream", {}).get("480p_3clips_4steps")
    if stream:
        lines += ["", f"Streaming (WAN_S2V_STREAM; 480p, 3 clips, 4 steps without guidance, as "
                      f"with a 4-step LoRA): the first clip's item {stream['first_item_s']:.1f} s "
                      f"after the job started, {stream['first_item_s'] / stream['one_clip_job_s']:.2f}x "
                      f"a whole 1-clip job's {stream['one_clip_job_s']:.1f} s; then one every "
                      f"{stream['between_items_s']:.1f} s; the whole 3-clip job "
                      f"{stream['three_clip_job_s']:.1f} s, at {result['stream']['commit']}."]
    return lines


def update_performance_page(result: dict, result_path: Path) -> None:
    text = PERFORMANCE_PAGE.read_text()
    block = f"<!-- bench:start -->\n{measurements_section(result, result_path)}\n<!-- bench:end -->"
    pattern = re.compile(r"<!-- bench:start -->.*?<!-- bench:end -->", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{PERFORMANCE_PAGE.name} has no bench:start/bench:end markers")
    PERFORMANCE_PAGE.write_text(pattern.sub(lambda _: block, text))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("result", type=Path)
    parser.add_argument("parts", type=Path, nargs="*")
    parser.add_argument("--page-only", action="store_true")
    args = parser.parse_args()
    result_path = args.result.resolve()
    if args.page_only:
        result = json.loads(result_path.read_text())
    else:
        result = merge([json.loads(p.read_text()) for p in args.parts])
        result_path.parent.mkdir(parents=True, exist_ok=True)
        result_path.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    update_performance_page(result, result_path)
    print(measurements_section(result, result_path))


if __name__ == "__main__":
    main()
