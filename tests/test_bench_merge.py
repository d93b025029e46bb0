"""bench/merge.py on a small synthetic result: parts merge into one result, and docs/performance.md's
performance section is written from it between its markers. (Whether the committed GPU records
agree with each other and with docs/performance.md is `python -m bench.check_results`, run after a merge.)"""
import pytest

from bench import merge


def part(commit: str, **sections) -> dict:
    return {"env": {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "date": "2030-01-02",
                    "commit": commit}, "pytest_summary": [f"summary at {commit}"], **sections}


FIRST = part("bbb2222",
             tiny_whole_job={"passed": False, "max_abs_diff": 1e-2, "bound": 1e-3},
             dit_forward_s={"480p": {"official": 4.0, "worker": 2.5, "worker_rel_l2": 5e-3,
                                     "fast": 2.0, "fast_rel_l2": 5e-2, "size": [448, 832],
                                     "tokens": 29120}},
             job_s={"480p_1clip_30steps": {"official": {"generate_s": 120.0}}},
             cold_start_s={"official": {"ready_s": 300.0}})
SECOND = part("aaa1111",  # measured later: its tiny-job check replaces the first part's
              tiny_whole_job={"passed": True, "max_abs_diff": 0.0, "bound": 1e-3},
              job_s={"480p_1clip_30steps": {"worker": {"generate_s": 60.0}}},
              cold_start_s={"worker": {"ready_s": 150.0, "page_cache_dropped": True},
                            "unknown_run": {"ready_s": 1.0}})


def test_parts_merge_section_by_section_and_the_later_check_wins():
    result = merge.merge([FIRST, SECOND])
    assert (result["device"], result["commits"]) == ("NVIDIA H100 80GB HBM3", ["aaa1111", "bbb2222"])
    assert result["faithfulness"]["tiny_whole_job"] == {
        "passed": True, "max_abs_diff": 0.0, "bound": 1e-3, "commit": "aaa1111",
        "pytest_summary": ["summary at aaa1111"]}
    assert result["dit_forward_s"]["480p"]["worker"] == 2.5
    assert result["dit_forward_s"]["commit"] == "bbb2222"
    # official and worker ran as separate processes, so in separate parts: one row
    job = result["job_s"]["480p_1clip_30steps"]
    assert (job["official"], job["worker"]) == (120.0, 60.0)
    assert job["worker_detail"] == {"generate_s": 60.0, "commit": "aaa1111"}
    assert {k: v for k, v in result["cold_start_s"].items() if not k.endswith("_detail")} == {
        "official": 300.0, "worker": 150.0}  # runs the page does not know are left out


def test_parts_from_two_device_models_are_refused():
    other = {**SECOND, "env": {**SECOND["env"], "device": "NVIDIA H200"}}
    with pytest.raises(SystemExit, match="different devices"):
        merge.merge([FIRST, other])


def test_the_measurements_are_written_between_the_markers_from_the_result(tmp_path, monkeypatch):
    result = merge.merge([FIRST, SECOND])
    result_path = merge.ROOT / "bench" / "results" / "2030-01-02-nvidia-h100-80gb-hbm3.json"
    section = merge.measurements_section(result, result_path)
    assert "`bench/results/2030-01-02-nvidia-h100-80gb-hbm3.json`" in section
    assert ("| DiT call, 480p (448x832, 29,120 tokens) | 4.00 s | 2.50 s (1.60x, 5.0e-03) | "
            "2.00 s (2.00x, 5.0e-02) | - |") in section
    assert ("| whole job `480p_1clip_30steps` (4.5 s speech, guidance 4.5) | 120.0 s (generate only) "
            "| 60.0 s generate, 2.00x | - | - |") in section
    assert "(page cache dropped: yes) | 300 s | 150 s | - | - |" in section
    assert "max |diff| on pixels: 0.00e+00 (bound 0.001) - passed" in section

    page = tmp_path / "performance.md"
    page.write_text("# Title\n\n<!-- bench:start -->\nold table\n<!-- bench:end -->\n\n## Next\n")
    monkeypatch.setattr(merge, "PERFORMANCE_PAGE", page)
    merge.update_performance_page(result, result_path)
    written = page.read_text()
    assert written == f"# Title\n\n<!-- bench:start -->\n{section}\n<!-- bench:end -->\n\n## Next\n"
    merge.update_performance_page(result, result_path)  # again: the same file
    assert page.read_text() == written
    page.write_text("# no markers\n")
    with pytest.raises(SystemExit, match="no bench:start/bench:end markers"):
        merge.update_performance_page(result, result_path)


REACH = part("ccc3333",
             memory_tiers={"steps": 3, "fp8_weights_deviation": {"bf16_gemm": 1e-2, "fp8_gemm": 3e-2},
                           "none": {"plan": "bf16, everything resident", "480p": {
                               "job_s": 20.0, "peak_gb": 50.0}},
                           "22GiB": {"plan": "fp8, T5 streamed, 20 of 40 blocks streamed", "480p": {
                               "job_s": 30.0, "peak_gb": 21.0, "ratio_vs_exact": 1.5},
                               "720p": {"refused": "this job needs about 30 GiB"}}},
             cold_start_s={"disk_read_floor": {"seconds": 25.0, "gb": 45.7, "gb_per_s": 1.83,
                                               "readers": 8},
                           "disk_read_floor_s": 25.0, "first_job_ratio": 1.04,
                           "worker": {"ready_s": 34.0, "first_job": {
                               "first": {"job_s": 26.0}, "warm": {"job_s": 25.0},
                               "first_job_ratio": 1.04}},
                           "worker_cached_compile": {"ready_s": 28.0},
                           "disk_read_floor_fp8": {"seconds": 13.0, "gb": 23.0, "gb_per_s": 1.77,
                                                   "readers": 8},
                           "worker_fp8": {"ready_s": 18.0},
                           "worker_fp8_empty_compile_cache": {"ready_s": 40.0}},
             stream={"480p_3clips_4steps": {"first_item_s": 22.0, "between_items_s": 15.0,
                                            "one_clip_job_s": 20.0, "three_clip_job_s": 55.0}})


def test_the_reach_sections_merge_with_their_commit_and_reach_the_page():
    result = merge.merge([FIRST, SECOND, REACH])
    assert result["fp8_weights_deviation"] == {"bf16_gemm": 1e-2, "fp8_gemm": 3e-2, "commit": "ccc3333"}
    assert result["memory_tiers"]["commit"] == result["stream"]["commit"] == "ccc3333"
    cold = result["cold_start_s"]
    assert (cold["worker"], cold["worker_fp8"], cold["disk_read_floor_s"], cold["first_job_ratio"]) \
        == (34.0, 18.0, 25.0, 1.04)
    section = merge.measurements_section(result, merge.ROOT / "bench" / "results" / "x-nvidia-h100.json")
    assert ("| official layout (45.7 GB of large files) | 25.0 s (1.83 GB/s) | 34.0 s | 28.0 s | "
            "26.0 s / 25.0 s = 1.04x |") in section
    assert "| ComfyUI's fp8_scaled files (23.0 GB), WAN_S2V_WEIGHTS=fp8 | 13.0 s (1.77 GB/s) | 40.0 s | 18.0 s | - |" in section
    assert ("| 22GiB | fp8, T5 streamed, 20 of 40 blocks streamed | 30.0 s, 1.50x, 21.0 GiB | "
            "this job needs about 30 GiB |") in section
    assert "1-clip jobs of 3 guided steps" in section
    assert "the first clip's item 22.0 s after the job started, 1.10x a whole 1-clip job's 20.0 s" in section
    assert "relative L2: 1.00e-02 multiplied in bfloat16 (Ampere), 3.00e-02 with FP8 GEMMs" in section


def test_a_tiers_rows_from_two_runs_are_kept_each_with_its_commit():
    """The 720p jobs of the tiers and the 480p ones take a device command each: the merge keeps
    both runs' rows of a tier, each naming its run's commit, the later run's plan and steps."""
    at_720p = part("ddd4444", memory_tiers={
        "steps": 10, "fp8_weights_deviation": {"bf16_gemm": 4e-2, "fp8_gemm": 5e-2},
        "none": {"plan": "bf16", "720p": {"job_s": 140.0, "peak_gb": 57.0}},
        "44GiB": {"plan": "fp8", "720p": {"job_s": 124.0, "peak_gb": 37.0, "ratio_vs_exact": 0.88}}})
    at_480p = part("eee5555", memory_tiers={
        "steps": 10, "fp8_weights_deviation": {"bf16_gemm": 4e-2, "fp8_gemm": 5e-2},
        "none": {"plan": "bf16", "480p": {"job_s": 55.0, "peak_gb": 50.0}},
        "44GiB": {"plan": "fp8", "480p": {"job_s": 47.0, "peak_gb": 30.0, "ratio_vs_exact": 0.84}},
        "22GiB": {"plan": "fp8, 27 of 40 blocks streamed",
                  "480p": {"job_s": 48.0, "peak_gb": 21.0, "ratio_vs_exact": 0.87}}})
    tiers = merge.merge([at_720p, at_480p])["memory_tiers"]
    assert tiers["44GiB"]["720p"] == {"job_s": 124.0, "peak_gb": 37.0, "ratio_vs_exact": 0.88,
                                      "commit": "ddd4444"}
    assert tiers["44GiB"]["480p"]["commit"] == "eee5555" and tiers["none"]["720p"]["job_s"] == 140.0
    assert set(tiers["22GiB"]) == {"plan", "480p"} and tiers["commit"] == "eee5555"
    section = merge.measurements_section(merge.merge([at_720p, at_480p]),
                                         merge.ROOT / "bench" / "results" / "x-nvidia-h200.json")
    assert "| 44GiB | fp8 | 47.0 s, 0.84x, 30.0 GiB | 124.0 s, 0.88x, 37.0 GiB |" in section
