"""Merge harness parts into one result file and write the README's performance section from it.

    python bench/merge.py bench/results/2026-11-27-nvidia-h100-80gb-hbm3.json PART.json [PART.json ...]
    python bench/merge.py --readme-only bench/results/<file>.json

Every part must come from the same device model; each section keeps the commit it was measured at.
The README section between the `bench:start` and `bench:end` markers is replaced.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SECTION_KEYS = ("faithfulness", "dit_forward_s", "vae_s", "job_s", "cold_start_s")
FAITHFULNESS_KEYS = ("tiny_whole_job", "fullsize_forward_480p", "fullsize_three_steps_480p")


def merge(parts: list[dict]) -> dict:
    devices = {part["env"]["device"] for part in parts}
    if len(devices) != 1:
        raise SystemExit(f"parts come from different devices: {sorted(devices)}")
    first = parts[0]["env"]
    merged = {"device": first["device"], "torch": first["torch"], "date": first["date"],
              "commits": sorted({part["env"]["commit"] for part in parts})}
    for part in parts:
        commit = part["env"]["commit"]
        if any(key in part for key in FAITHFULNESS_KEYS):
            merged["faithfulness"] = {key: part[key] for key in FAITHFULNESS_KEYS if key in part}
            merged["faithfulness"]["pytest_summary"] = part.get("pytest_summary")
            merged["faithfulness"]["commit"] = commit
        for key in ("dit_forward_s", "vae_s"):
            if key in part:
                merged[key] = {**merged.get(key, {}), **part[key], "commit": commit}
        for path, row in part.get("cold_start_s", {}).items():
            cold = merged.setdefault("cold_start_s", {})
            if path in ("official", "worker") and "ready_s" in row:
                cold[path] = row["ready_s"]
                cold[f"{path}_detail"] = {**row, "commit": commit}
            elif path.startswith("checkpoint_"):
                cold[path] = row
        if "job_s" in part:  # official and worker ran as separate processes on the same machine
            job = merged.setdefault("job_s", {})
            for name, row in part["job_s"].items():
                entry = job.setdefault(name, {})
                for path in ("official", "worker"):
                    if path in row:
                        entry[path] = row[path]["generate_s"]
                        entry[f"{path}_detail"] = {**row[path], "commit": commit}
    return merged


def _ratio(official: float, worker: float) -> str:
    return f"{official / worker:.2f}x"


def readme_section(result: dict, result_path: Path) -> str:
    f = result.get("faithfulness", {})
    lines = [
        f"Measured on one **{result['device']}** (torch {result['torch']}), {result['date']}, at "
        f"commit(s) {', '.join(result['commits'])}, random weights at full size; file: "
        f"`{result_path.relative_to(ROOT)}`. \"Official\" is the official Wan2.2 modules with their "
        "attention sent to PyTorch SDPA (what the official code runs without flash_attn); "
        "\"worker\" is this repository's path. Ratio = official / worker (higher is better).",
        "",
        "| what | official | worker | ratio |",
        "| --- | --- | --- | --- |",
    ]
    for res, row in result.get("dit_forward_s", {}).items():
        if isinstance(row, dict):
            lines.append(f"| DiT forward, {res} ({row['size'][0]}x{row['size'][1]}, {row['tokens']:,} "
                         f"tokens), median of 3 | {row['official']:.2f} s | {row['worker']:.2f} s | "
                         f"{_ratio(row['official'], row['worker'])} |")
    for res, row in result.get("vae_s", {}).items():
        if isinstance(row, dict):
            o, w = row["official"], row["worker"]
            lines.append(f"| VAE {res}: encode 73 frames / decode one clip | "
                         f"{o['encode_73_frames_s']:.2f} / {o['decode_clip_s']:.2f} s | "
                         f"{w['encode_73_frames_s']:.2f} / {w['decode_clip_s']:.2f} s | "
                         f"{_ratio(o['encode_73_frames_s'] + o['decode_clip_s'], w['encode_73_frames_s'] + w['decode_clip_s'])} |")
    for name, row in result.get("job_s", {}).items():
        if "official" in row and "worker" in row:
            lines.append(f"| whole job `{name}` (4.5 s speech, guidance 4.5), generate | "
                         f"{row['official']:.1f} s | {row['worker']:.1f} s | "
                         f"{_ratio(row['official'], row['worker'])} |")
    cold = result.get("cold_start_s", {})
    if "official" in cold and "worker" in cold:
        dropped = cold["worker_detail"].get("page_cache_dropped")
        lines.append(f"| cold start, process start to ready, full checkpoint on local disk (page "
                     f"cache dropped: {'yes' if dropped else 'no'}) | {cold['official']:.0f} s | "
                     f"{cold['worker']:.0f} s | {_ratio(cold['official'], cold['worker'])} |")
    lines += ["", "Faithfulness (tests/gpu, bounds from the issue):", ""]
    labels = {"tiny_whole_job": "tiny checkpoint, whole job (2 clips, 4 guided steps): max |diff| on pixels",
              "fullsize_forward_480p": "full size, one DiT forward at 480p: relative L2",
              "fullsize_three_steps_480p": "full size, three guided steps at 480p: relative L2 of latents"}
    for key, label in labels.items():
        if key in f:
            row = f[key]
            value = row.get("max_abs_diff", row.get("rel_l2"))
            lines.append(f"- {label}: {value:.2e} (bound {row['bound']:g}) - "
                         f"{'passed' if row['passed'] else 'FAILED'}")
    return "\n".join(lines)


def update_readme(result: dict, result_path: Path) -> None:
    text = README.read_text()
    block = f"<!-- bench:start -->\n{readme_section(result, result_path)}\n<!-- bench:end -->"
    pattern = re.compile(r"<!-- bench:start -->.*?<!-- bench:end -->", re.S)
    if not pattern.search(text):
        raise SystemExit("README.md has no bench:start/bench:end markers")
    README.write_text(pattern.sub(lambda _: block, text))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("result", type=Path)
    parser.add_argument("parts", type=Path, nargs="*")
    parser.add_argument("--readme-only", action="store_true")
    args = parser.parse_args()
    result_path = args.result.resolve()
    if args.readme_only:
        result = json.loads(result_path.read_text())
    else:
        result = merge([json.loads(p.read_text()) for p in args.parts])
        result_path.parent.mkdir(parents=True, exist_ok=True)
        result_path.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    update_readme(result, result_path)
    print(readme_section(result, result_path))


if __name__ == "__main__":
    main()
