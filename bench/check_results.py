"""Check the committed GPU records: run by hand after `bench/merge.py` wrote a result.

    python -m bench.check_results

Each result file must be the merge of its raw parts, docs/performance.md's measurements must be the
one the newest result gives, and the newest result must hold what the harness promises. These are
checks of committed data, not of code, so they are not in the unit suite (tests/test_bench_merge.py
checks merge.py itself on a synthetic result). Exits 1 and lists the problems when one fails.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from bench import merge

RESULTS = merge.ROOT / "bench" / "results"


def raw_folder(result_path: Path) -> Path:
    """bench/results/<date>[-name]-nvidia-<gpu>-....json has its parts in raw/<date>[-name]-<gpu>."""
    stem, _, device = result_path.stem.partition("-nvidia-")
    return RESULTS / "raw" / f"{stem}-{device.split('-')[0]}"


def result_files() -> list[Path]:
    return sorted(RESULTS.glob("*.json"))


def merged_from_parts(result_path: Path) -> list[str]:
    # part-*.json are merged in name order; experiment-*.json are kept as the record of
    # measurements that decided something (docs cite them) and are not merged.
    parts = [json.loads(p.read_text()) for p in sorted(raw_folder(result_path).glob("part-*.json"))]
    if not parts:
        return [f"{result_path.name}: no raw parts in {raw_folder(result_path)}"]
    if merge.merge(parts) != json.loads(result_path.read_text()):
        return [f"{result_path.name} is not the merge of its raw parts (run bench/merge.py again)"]
    return []


def page_from_newest(newest: Path) -> list[str]:
    section = merge.measurements_section(json.loads(newest.read_text()), newest)
    if section not in merge.PERFORMANCE_PAGE.read_text():
        return [f"docs/performance.md's measurements are not the ones {newest.name} gives "
                f"(python bench/merge.py --page-only {newest.relative_to(merge.ROOT)})"]
    return []


def harness_promises(newest: Path) -> list[str]:
    """The newest result holds a DiT-call row per resolution (official, exact within its bound,
    fast), the 30-step job for both paths, a passing full-size check, and the reach figures:
    each memory tier's jobs, FP8 weights' deviation, the cold starts with their floor and the
    first job's ratio, and the streaming job's items."""
    result, problems = json.loads(newest.read_text()), []
    for key in ("device", "torch", "date", "commits", "dit_forward_s", "job_s", "faithfulness"):
        if key not in result:
            problems.append(f"{newest.name}: no {key}")
    for resolution in ("480p", "720p"):
        row = result.get("dit_forward_s", {}).get(resolution, {})
        missing = {"official", "worker", "worker_rel_l2", "fast"} - set(row)
        if missing:
            problems.append(f"{newest.name}: dit_forward_s {resolution} lacks {sorted(missing)}")
        if row.get("worker_rel_l2", 1.0) > 1e-2:
            problems.append(f"{newest.name}: dit_forward_s {resolution} worker_rel_l2 over 1e-2")
    if not {"official", "worker"} <= set(result.get("job_s", {}).get("480p_1clip_30steps", {})):
        problems.append(f"{newest.name}: job_s 480p_1clip_30steps lacks official or worker")
    # The reach issues (19-21): tiers, FP8 weights, cold start against the disk, streaming.
    tiers = result.get("memory_tiers", {})
    # A 24 GB card serves 480p only (its tier refuses 720p up front).
    for cap, resolutions in (("none", ("480p", "720p")), ("44GiB", ("480p", "720p")),
                             ("22GiB", ("480p",))):
        for resolution in resolutions:
            if "job_s" not in tiers.get(cap, {}).get(resolution, {}):
                problems.append(f"{newest.name}: memory_tiers {cap} {resolution} has no job_s")
    if not {"bf16_gemm", "fp8_gemm"} <= set(result.get("fp8_weights_deviation", {})):
        problems.append(f"{newest.name}: no fp8_weights_deviation")
    cold = result.get("cold_start_s", {})
    for key in ("worker", "worker_cached_compile", "worker_fp8", "disk_read_floor_s",
                "first_job_ratio"):
        if key not in cold:
            problems.append(f"{newest.name}: cold_start_s has no {key}")
    stream = result.get("stream", {}).get("480p_3clips_4steps", {})
    if not {"first_item_s", "between_items_s", "one_clip_job_s"} <= set(stream):
        problems.append(f"{newest.name}: no stream 480p_3clips_4steps")
    checks = result.get("faithfulness", {})
    if not checks or not all(check.get("passed") for check in checks.values()):
        problems.append(f"{newest.name}: a faithfulness check is missing or did not pass")
    return problems


def on_record(files: list[Path]) -> list[str]:
    # Sections whose code path did not change after they were measured stay in the file that
    # measured them (the VAE timings, the cold start, the tiny whole-job check): some file has them.
    results = [json.loads(p.read_text()) for p in files]
    wanted = {"vae_s": lambda r: "vae_s" in r,
              "cold_start_s": lambda r: {"official", "worker"} <= set(r.get("cold_start_s", {})),
              "faithfulness tiny_whole_job": lambda r: r.get("faithfulness", {}).get(
                  "tiny_whole_job", {}).get("passed", False)}
    return [f"no result file has {name}" for name, has in wanted.items()
            if not any(has(r) for r in results)]


def problems() -> list[str]:
    files = result_files()
    if not files:
        return [f"no result files in {RESULTS}"]
    found = [problem for path in files for problem in merged_from_parts(path)]
    return (found + page_from_newest(files[-1]) + harness_promises(files[-1])
            + on_record(files))


def main() -> int:
    found = problems()
    for problem in found:
        print(problem, file=sys.stderr)
    print(f"{len(result_files())} result files checked: "
          + ("ok" if not found else f"{len(found)} problem(s)"))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
