"""machinery/run_output.py: the run folder, its index.html and summary.json, built aside and moved into place.

Built here from hand-made results (no model, no Flyte run); the same files from a real batch
are checked in test_pipeline_batch.py.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from flyte.io import Dir

from machinery.model_client import Usage
from machinery.pacing import PaceStats
from machinery.run_output import (
    REPORT_FILES,
    BatchResult,
    format_index_html,
    missing_files,
    save_run,
    summary_document,
)
from pipeline import RefineResult, ReportFiles, Round, TopicReport

HOSTILE = '<img src=x onerror="alert(1)"> & "quotes"'


def finished(topic: str, work: Path, scores: tuple[int, ...] = (6, 9), usage: Usage | None = None) -> TopicReport:
    """A topic that succeeded, its files written to ``work/<topic>``."""
    from machinery.files import slugify

    folder = work / slugify(topic)
    folder.mkdir(parents=True)
    for name in REPORT_FILES:
        (folder / name).write_text(f"{name} of {topic}\n", encoding="utf-8")
    history = [Round(iteration=i, score=s, strengths=[], improvements=[f"fix {i}"], summary="ok")
               for i, s in enumerate(scores, start=1)]
    result = RefineResult(topic=topic, markdown=f"# {topic}\n", history=history, model="m",
                          usage=usage or Usage(requests=4, prompt_tokens=100, completion_tokens=50))
    files = ReportFiles(folder=Dir(path=str(folder)), usage=Usage(requests=1, prompt_tokens=10, completion_tokens=5))
    return TopicReport(topic=topic, slug=slugify(topic), result=result, files=files)


def failed(topic: str, error: str = "CritiqueError: invalid twice") -> TopicReport:
    from machinery.files import slugify

    return TopicReport(topic=topic, slug=slugify(topic), error=error)


@pytest.fixture
def batch(tmp_path) -> BatchResult:
    work = tmp_path / "work"
    reports = [finished("Cats", work), failed("Doomed"), finished(HOSTILE, work, scores=(10,))]
    return BatchResult(run_id="r1", run_dir=tmp_path / "out" / "r1", report_date="2026-11-29", model="m",
                       reports=reports, llm_usage=Usage(requests=7, prompt_tokens=110, completion_tokens=55, retries=1,
                                                        timed_out=1, cut_off=1),
                       cached_topics=[HOSTILE],
                       pacing=PaceStats(rate_limited=2, pauses=1, paused_seconds=1.5, peak_in_flight=3, window=4,
                                        ceiling=64))


def test_rows_describe_every_topic(batch):
    cats, doomed, hostile = batch.rows()
    assert cats == {
        "topic": "Cats", "slug": batch.reports[0].slug, "status": "ok", "iterations": 2, "final_score": 9,
        "score_history": [6, 9], "improvements_history": [["fix 1"], ["fix 2"]], "cached": False,
        "usage": {"requests": 5, "cache_hits": 0, "prompt_tokens": 110, "completion_tokens": 55, "retries": 0,
                  "timed_out": 0, "cut_off": 0, "total_tokens": 165},
        "files": {name: f"{batch.reports[0].slug}/{name}" for name in REPORT_FILES}, "error": None,
    }
    assert doomed["status"] == "error" and doomed["files"] == {} and doomed["final_score"] is None
    assert doomed["iterations"] == 0 and doomed["error"] == "CritiqueError: invalid twice"
    assert doomed["usage"]["total_tokens"] == 0
    assert hostile["cached"] is True and hostile["final_score"] == 10


def test_summary_document_counts_and_holds_no_absolute_path(batch):
    summary = summary_document(batch)
    assert summary["totals"] == {"topics": 3, "succeeded": 2, "failed": 1, "cached": 1,
                                 "llm_usage": {"requests": 7, "cache_hits": 0, "prompt_tokens": 110,
                                               "completion_tokens": 55, "retries": 1, "timed_out": 1, "cut_off": 1,
                                               "total_tokens": 165},
                                 "pacing": {"rate_limited": 2, "unavailable": 0, "gave_up": 0, "pauses": 1,
                                            "paused_seconds": 1.5, "peak_in_flight": 3, "window": 4,
                                            "ceiling": 64}}
    assert [row["topic"] for row in summary["topics"]] == ["Cats", "Doomed", HOSTILE]
    assert str(batch.run_dir.parent.parent) not in json.dumps(summary)


def test_the_index_links_finished_topics_and_escapes_everything(batch):
    index = format_index_html(batch)
    assert f'href="{batch.reports[0].slug}/report.html"' in index
    assert f'href="{batch.reports[1].slug}/report.html"' not in index, "no link to a topic without files"
    assert '<img src=x' not in index and "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in index
    assert "<bdi>" in index, "a right-to-left topic cannot reorder its row"
    assert "2 of 3 topics succeeded" in index and "CritiqueError: invalid twice" in index
    assert "<title>Reports: run r1</title>" in index


def test_save_run_writes_every_file_and_the_index(batch):
    saved = save_run(batch)
    assert saved is batch
    assert sorted(p.name for p in batch.run_dir.iterdir()) == sorted(
        [batch.reports[0].slug, batch.reports[2].slug, "index.html", "summary.json"])
    for report in (batch.reports[0], batch.reports[2]):
        for name in REPORT_FILES:
            assert (batch.folder(report.topic) / name).read_text(encoding="utf-8") == f"{name} of {report.topic}\n"
    assert json.loads(batch.summary_path.read_text(encoding="utf-8")) == summary_document(batch)
    assert batch.index_path.read_text(encoding="utf-8") == format_index_html(batch)
    assert [p.name for p in batch.run_dir.parent.iterdir()] == ["r1"], "no staging folder left behind"


def test_summary_json_is_byte_identical_for_the_same_inputs(batch, tmp_path):
    save_run(batch)
    first = batch.summary_path.read_bytes()
    again = BatchResult(**{**batch.__dict__, "run_dir": tmp_path / "elsewhere" / "r1"})
    save_run(again)
    assert again.summary_path.read_bytes() == first
    assert again.index_path.read_bytes() == batch.index_path.read_bytes()
    assert first.endswith(b"\n")


def test_a_second_save_replaces_the_run_folder(batch):
    save_run(batch)
    smaller = BatchResult(**{**batch.__dict__, "reports": batch.reports[1:2], "cached_topics": []})
    save_run(smaller)
    assert sorted(p.name for p in batch.run_dir.iterdir()) == ["index.html", "summary.json"]
    assert [p.name for p in batch.run_dir.parent.iterdir()] == ["r1"], "no staging or retired folders left behind"


def test_a_run_that_may_not_replace_takes_the_next_free_name(batch):
    """Two runs named by the time in the same second: the second is saved as r1-2 (then r1-3), the first is kept."""
    save_run(batch, replace=False)
    first = batch.summary_path.read_bytes()
    second = save_run(BatchResult(**{**batch.__dict__, "reports": batch.reports[1:2]}), replace=False)
    third = save_run(BatchResult(**{**batch.__dict__, "reports": batch.reports[1:2]}), replace=False)
    assert (second.run_id, third.run_id) == ("r1-2", "r1-3") and second.run_dir == batch.run_dir.parent / "r1-2"
    assert batch.summary_path.read_bytes() == first, "the first run is untouched"
    assert json.loads(second.summary_path.read_text(encoding="utf-8"))["run_id"] == "r1-2"
    assert sorted(p.name for p in batch.run_dir.parent.iterdir()) == ["r1", "r1-2", "r1-3"]


def test_a_failed_save_that_may_not_replace_leaves_no_folder(batch, tmp_path):
    vanished = ReportFiles(folder=Dir(path=str(tmp_path / "does-not-exist")), usage=Usage())
    bad = BatchResult(**{**batch.__dict__, "reports": [batch.reports[0].model_copy(update={"files": vanished})]})
    with pytest.raises(Exception):  # noqa: B017 - whatever the copy raises, nothing is left behind
        save_run(bad, replace=False)
    assert list(batch.run_dir.parent.iterdir()) == []


def test_a_run_named_so_that_moves_in_first_keeps_its_folder(batch, monkeypatch):
    """Between claiming r1 and moving in, a run saved with the explicit id r1 took it: that run is kept, and this
    one is written again as r1-2 (its summary says so), not put in its place."""
    import machinery.run_output as run_output

    claim = run_output.claim_free_dir

    def claim_then_lose(wanted):
        claimed = claim(wanted)
        if claimed.name == "r1":  # another process saves a run it named r1, now
            save_run(BatchResult(**{**batch.__dict__, "reports": batch.reports[1:2], "cached_topics": []}))
        return claimed

    monkeypatch.setattr(run_output, "claim_free_dir", claim_then_lose)
    saved = save_run(batch, replace=False)
    assert saved.run_id == "r1-2" and json.loads(saved.summary_path.read_text(encoding="utf-8"))["run_id"] == "r1-2"
    assert len(json.loads(batch.summary_path.read_text(encoding="utf-8"))["topics"]) == 1, "the other run, kept"
    assert sorted(p.name for p in batch.run_dir.parent.iterdir()) == ["r1", "r1-2"]


def test_a_save_that_fails_before_its_staging_folder_leaves_no_claimed_folder(batch, monkeypatch):
    import machinery.run_output as run_output

    def no_space(final):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_output, "staging_dir_for", no_space)
    with pytest.raises(OSError, match="No space"):
        save_run(batch, replace=False)
    assert list(batch.run_dir.parent.iterdir()) == []


def test_a_failed_save_leaves_the_previous_run_and_no_staging_folder(batch, tmp_path):
    save_run(batch)
    before = batch.summary_path.read_bytes()
    vanished = ReportFiles(folder=Dir(path=str(tmp_path / "does-not-exist")), usage=Usage())
    bad = BatchResult(**{**batch.__dict__, "reports": [batch.reports[0].model_copy(update={"files": vanished})]})
    with pytest.raises(Exception):  # noqa: B017 - whatever the copy raises, the old run must survive
        save_run(bad)
    assert batch.summary_path.read_bytes() == before
    assert [p.name for p in batch.run_dir.parent.iterdir()] == ["r1"]


def test_saving_a_run_leaves_no_temporary_folder_per_topic(batch, tmp_path, monkeypatch):
    """Dir.download_sync() without a destination makes an empty flyte-tmp-* folder per call (Flyte 2.12)."""
    scratch_tmp = tmp_path / "tmp"
    scratch_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch_tmp))
    save_run(batch)
    assert (batch.folder("Cats") / "report.md").exists()
    assert list(scratch_tmp.iterdir()) == []


def test_missing_files_gives_the_reports_whose_folder_is_gone(batch):
    assert missing_files(batch.reports) == []
    gone = Path(batch.reports[0].files.folder.path)
    for child in gone.iterdir():
        child.unlink()
    gone.rmdir()
    assert missing_files(batch.reports) == [batch.reports[0]]


def test_paths_of_a_batch(batch):
    assert batch.index_path == batch.run_dir / "index.html"
    assert batch.summary_path == batch.run_dir / "summary.json"
    assert batch.folder("Cats") == batch.run_dir / batch.reports[0].slug
