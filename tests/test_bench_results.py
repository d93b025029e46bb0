"""The committed GPU results stay consistent: the result file is the merge of its raw parts, and
the README's performance section is generated from it (bench/merge.py)."""
import json

from conftest import ROOT

from bench import merge

RESULTS = ROOT / "bench" / "results"


def test_each_result_file_is_the_merge_of_its_raw_parts():
    for result_path in RESULTS.glob("*.json"):
        raw = RESULTS / "raw" / (result_path.stem.split("-nvidia")[0] + "-h100")
        # part-*.json are merged in name order; experiment-*.json are kept as the record of
        # measurements that decided something (README cites them) and are not merged.
        parts = [json.loads(p.read_text()) for p in sorted(raw.glob("part-*.json"))]
        assert parts, f"no raw parts for {result_path.name}"
        assert merge.merge(parts) == json.loads(result_path.read_text())


def test_readme_performance_section_comes_from_the_newest_result():
    newest = sorted(RESULTS.glob("*.json"))[-1]
    section = merge.readme_section(json.loads(newest.read_text()), newest)
    assert section in (ROOT / "README.md").read_text()


def test_committed_result_has_what_the_harness_promises():
    result = json.loads(sorted(RESULTS.glob("*.json"))[-1].read_text())
    for key in ("device", "torch", "date", "commits", "dit_forward_s", "job_s", "cold_start_s",
                "faithfulness", "fast_mode_480p"):
        assert key in result
    for resolution in ("480p", "720p"):
        assert {"official", "worker", "worker_fp8_all_tensorwise"} <= set(result["dit_forward_s"][resolution])
        assert result["dit_forward_s"][resolution]["worker_rel_l2"] <= 1e-2
    assert {"official", "worker"} <= set(result["job_s"]["480p_1clip_30steps"])
    assert {"official", "worker", "worker_cached_compile"} <= set(result["cold_start_s"])
    assert all(result["faithfulness"][k]["passed"] for k in merge.FAITHFULNESS_KEYS)


def test_vae_timings_are_on_record():
    """The VAE path did not change after the first result; its timings stay in that file."""
    assert any("vae_s" in json.loads(p.read_text()) for p in RESULTS.glob("*.json"))
