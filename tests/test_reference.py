"""The reference documents are what the code makes of itself: schema/job.schema.json and the job
table of docs/job.md from the job models, the settings table of docs/settings.md from the
settings' declarations. A failure names the file: run `python -m s2v_worker.reference`."""
import pytest

from conftest import ROOT
from s2v_worker import reference


@pytest.mark.parametrize("path", sorted(reference.documents(ROOT)), ids=lambda p: str(p.relative_to(ROOT)))
def test_each_generated_document_is_up_to_date(path):
    expected = reference.documents(ROOT)[path]
    assert path.read_text(encoding="utf-8") == expected, (
        f"{path.relative_to(ROOT)} is out of date: run python -m s2v_worker.reference")


def test_the_tables_are_between_their_markers():
    job_page = (ROOT / reference.JOB_PAGE).read_text(encoding="utf-8")
    settings_page = (ROOT / reference.SETTINGS_PAGE).read_text(encoding="utf-8")
    assert reference.between_markers(job_page, reference.JOB_MARKER) == reference.job_table_markdown()
    assert reference.between_markers(settings_page, reference.SETTINGS_MARKER) == \
        reference.settings_table_markdown()
    for setting in ("WAN_S2V_CKPT_DIR", "BUCKET_NAME", "JOB_TIMEOUT_S", "LOG_LEVEL"):
        assert f"| `{setting}` |" in settings_page


def test_check_mode_fails_on_a_stale_document(tmp_path, monkeypatch, capsys):
    for relative in (reference.SCHEMA_PATH, reference.JOB_PAGE, reference.SETTINGS_PAGE):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text((ROOT / relative).read_text(encoding="utf-8"),
                                         encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert reference.main(["--check"]) == 0
    stale = (tmp_path / reference.JOB_PAGE).read_text().replace("| `prompt` |", "| `prompt2` |")
    (tmp_path / reference.JOB_PAGE).write_text(stale)
    assert reference.main(["--check"]) == 1
    assert "docs/job.md" in capsys.readouterr().out
    assert reference.main([]) == 0 and reference.main(["--check"]) == 0  # written back
