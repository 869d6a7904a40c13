"""Resilience: the reply cache, faults injected over real HTTP, kill and resume, secrets, paths."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import flyte
import pytest
from conftest import ROOT, subprocess_env
from fault_server import FaultyServer
from scratch_project import make_scratch_project, scratch_environment

import pipeline
from llm_cache import CachedReply, ResponseCache, request_key
from plumbing import slugify

# ----------------------------------------------------------------------------------------- the reply cache

REQUEST = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.2}


def test_the_key_covers_everything_that_changes_the_reply():
    base = request_key("offline", REQUEST)
    variants = [
        request_key("http://other/v1", REQUEST),
        request_key("offline", {**REQUEST, "model": "m2"}),
        request_key("offline", {**REQUEST, "messages": [{"role": "user", "content": "hi!"}]}),
        request_key("offline", {**REQUEST, "temperature": 0.7}),
        request_key("offline", {**REQUEST, "response_format": {"type": "json_object"}}),
    ]
    assert len({base, *variants}) == 6
    assert request_key("offline", dict(reversed(list(REQUEST.items())))) == base, "key order does not matter"


def _write_many(path: str, worker: int) -> None:
    cache = ResponseCache(Path(path))
    for i in range(150):
        cache.put(f"shared-{i}", CachedReply(f"reply {i}", 1, 2))  # every worker writes these
        cache.put(f"own-{worker}-{i}", CachedReply(f"w{worker} {i}", 1, 2))


def test_concurrent_writers_in_processes_and_threads(tmp_path):
    path = str(tmp_path / "replies.sqlite3")
    ResponseCache(Path(path))
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_write_many, args=(path, w)) for w in range(3)]
    threads = [threading.Thread(target=_write_many, args=(path, w)) for w in range(3, 5)]
    for worker in (*processes, *threads):
        worker.start()
    for worker in (*processes, *threads):
        worker.join(120)
    assert all(p.exitcode == 0 for p in processes)
    assert ResponseCache(Path(path)).get("shared-7") == CachedReply("reply 7", 1, 2)
    assert stored_keys(Path(path)) == {f"shared-{i}" for i in range(150)} | {
        f"own-{w}-{i}" for w in range(5) for i in range(150)}
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def stored_keys(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {row[0] for row in db.execute("SELECT key FROM replies")}


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

    pipeline.init_flyte()
    counts = {}
    for label, cache in (("with cache", True), ("without cache", False)):
        if not cache:
            pipeline.configure(llm_cache=None)
        attempts.clear()
        before = pipeline.requests_sent.value
        flyte.run(fails_once_after_two_calls, topic=f"Retry {label}")
        counts[label] = (len(attempts), pipeline.requests_sent.value - before)
    assert counts == {"with cache": (2, 2), "without cache": (2, 4)}


def test_a_rerun_with_the_same_inputs_makes_no_calls(tmp_path):
    first = pipeline.run_batch(["Cats", "Dogs"], max_iterations=3, output_dir=tmp_path, run_id="a", use_cache=False)
    second = pipeline.run_batch(["Cats", "Dogs"], max_iterations=3, output_dir=tmp_path, run_id="b", use_cache=False)
    assert first.llm_usage.requests > 0 and first.llm_usage.cache_hits == 0
    assert second.llm_usage.requests == 0
    assert second.llm_usage.cache_hits == first.llm_usage.requests
    assert second.llm_usage.total_tokens == 0, "a reused reply costs no tokens"
    for topic in ("Cats", "Dogs"):
        assert (second.folder(topic) / "report.md").read_bytes() == (first.folder(topic) / "report.md").read_bytes()


def test_a_changed_model_makes_new_calls(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-model-switch")
    with FaultyServer() as server:
        pipeline.configure(backend="openai", base_url=server.base_url, model="model-a")
        a = pipeline.run_batch(["Cats"], max_iterations=2, output_dir=tmp_path, run_id="a", use_cache=False)
        again = pipeline.run_batch(["Cats"], max_iterations=2, output_dir=tmp_path, run_id="a2", use_cache=False)
        pipeline.configure(model="model-b")
        b = pipeline.run_batch(["Cats"], max_iterations=2, output_dir=tmp_path, run_id="b", use_cache=False)
    pipeline.configure(backend="offline", base_url=None, model=pipeline.Settings.model)
    assert again.llm_usage.requests == 0
    assert b.llm_usage.requests == a.llm_usage.requests > 0 and b.llm_usage.cache_hits == 0


def test_the_cache_file_never_holds_the_api_key(tmp_path, monkeypatch):
    canary = "sk-canary-7f3a9c1e5b2d4680"
    monkeypatch.setenv("OPENAI_API_KEY", canary)
    with FaultyServer() as server:
        pipeline.configure(backend="openai", base_url=server.base_url, llm_cache=tmp_path / "replies.sqlite3")
        pipeline.run_batch(["Cats"], max_iterations=1, output_dir=tmp_path / "out", run_id="k", use_cache=False)
    pipeline.configure(backend="offline", base_url=None)
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("replies.sqlite3*"))
    assert len(stored) > 0 and canary.encode() not in stored


# ----------------------------------------------------------------------------------------- faults over HTTP

TWENTY = [f"Resilience topic {i:02d}" for i in range(20)]


def run_against(server: FaultyServer, topics: list[str], out: Path, run_id: str, **configuration):
    pipeline.configure(backend="openai", base_url=server.base_url, model="gpt-4o-mini", request_timeout=0.5,
                       client_retries=3, llm_cache=out / f"{run_id}-replies.sqlite3", **configuration)
    try:
        return pipeline.run_batch(topics, max_iterations=3, quality_threshold=9, report_date="2026-11-29",
                                  output_dir=out, run_id=run_id, use_cache=False)
    finally:
        pipeline.configure(backend="offline", base_url=None, request_timeout=pipeline.Settings.request_timeout,
                           client_retries=pipeline.Settings.client_retries, max_concurrency=8)


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-fault-injection")


def test_every_report_survives_a_30_percent_fault_rate_unchanged(tmp_path, api_key):
    with FaultyServer() as clean:
        reference = run_against(clean, TWENTY, tmp_path, "clean")
    with FaultyServer(fault_percent=40) as faulty:
        stormy = run_against(faulty, TWENTY, tmp_path, "stormy")
    print(f"\nfault injection: {faulty.requests} requests, {sum(faulty.faults.values())} faults "
          f"({faulty.fault_rate:.0%}): {dict(faulty.faults)}; {faulty.retried_requests} requests retried; "
          f"{sum(r.ok for r in stormy.reports)}/{len(TWENTY)} reports")
    assert faulty.fault_rate >= 0.30
    assert set(faulty.faults) == {"429", "500", "503", "timeout", "drop", "malformed", "truncated", "score-11",
                                  "score-0", "empty"}, "every kind of fault was exercised"
    assert faulty.retried_requests > 0
    assert [r.error for r in stormy.reports] == [None] * 20
    for topic in TWENTY:
        for name in pipeline.REPORT_FILES:
            assert (stormy.folder(topic) / name).read_bytes() == (reference.folder(topic) / name).read_bytes()
    assert [row["score_history"] for row in stormy.rows()] == [row["score_history"] for row in reference.rows()]


def test_a_topic_beyond_every_retry_budget_fails_alone_and_clearly(tmp_path, api_key):
    topics = ["Cats", "Doomed topic", "Dogs"]
    with FaultyServer() as server:
        batch = run_against(server, topics, tmp_path, "doomed")
    summary = json.loads(batch.summary_path.read_text(encoding="utf-8"))
    rows = {row["topic"]: row for row in summary["topics"]}
    assert rows["Cats"]["status"] == rows["Dogs"]["status"] == "ok"
    assert rows["Doomed topic"]["status"] == "error"
    assert rows["Doomed topic"]["error"].startswith("InternalServerError: ")
    assert "injected 503" in rows["Doomed topic"]["error"]
    # the openai client tried 4 times per task attempt, and Flyte attempted the task 4 times
    assert server.faults["503"] == 4 * 4
    assert "Doomed topic" in batch.index_path.read_text(encoding="utf-8")


def test_the_concurrency_cap_holds_at_the_server(tmp_path, api_key):
    with FaultyServer(latency=0.03) as server:
        batch = run_against(server, [f"Cap {i}" for i in range(10)], tmp_path, "cap", max_concurrency=3)
    print(f"\nconcurrency cap 3: peak in flight at the server {server.peak_in_flight}")
    assert all(r.ok for r in batch.reports)
    assert server.peak_in_flight == 3


# ----------------------------------------------------------------------------------------- kill and resume


def test_a_killed_batch_resumes_without_repeating_completed_calls(tmp_path):
    topics = [f"Resume topic {i}" for i in range(12)]
    cache_path = tmp_path / "replies.sqlite3"
    out = tmp_path / "out"
    with FaultyServer(latency=0.02) as server:
        env = subprocess_env(OPENAI_BASE_URL=server.base_url, OPENAI_API_KEY="sk-test-resume", REPORT_BACKEND="",
                             REPORT_LLM_CACHE=str(cache_path), REPORT_MAX_CONCURRENCY="4")
        command = [sys.executable, str(ROOT / "pipeline.py"), *topics, "--out", str(out), "--run-id", "resume",
                   "--date", "2026-11-29", "--max-iterations", "4"]
        victim = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        deadline = time.monotonic() + 60
        while server.requests < 30:
            assert victim.poll() is None, "the batch finished before it could be killed; make it longer"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(10)
        completed = stored_keys(cache_path)
        requests_before = server.requests
        received_before = len(server.received)
        assert not (out / "resume").exists(), "nothing half-written under the run's name"

        rerun = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        rerun_keys = {request_key(server.base_url, json.loads(body)) for body in server.received[received_before:]}
    print(f"\nkill and resume: {requests_before} requests before SIGKILL, {len(completed)} completed calls cached, "
          f"{server.requests - requests_before} requests in the rerun, "
          f"{len(rerun_keys & completed)} completed calls repeated")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert len(completed) >= 10
    assert rerun_keys.isdisjoint(completed)
    summary = json.loads((out / "resume" / "summary.json").read_text(encoding="utf-8"))
    assert summary["totals"]["succeeded"] == 12
    assert summary["totals"]["llm_usage"]["cache_hits"] >= len(completed)
    for path in (out / "resume").rglob("*.md"):
        assert pipeline.read_front_matter(path.read_text(encoding="utf-8"))["date"] == "2026-11-29"
    assert [p.name for p in out.iterdir()] == ["resume"], "no staging folder left behind"
    with sqlite3.connect(cache_path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# ----------------------------------------------------------------------------------------- secrets

CANARY = "sk-canary-0123456789abcdefXYZ"


def test_a_canary_key_never_leaves_the_process(tmp_path):
    project = make_scratch_project(tmp_path / "project")
    with FaultyServer(fault_percent=30) as server:
        env = scratch_environment(project, OPENAI_BASE_URL=server.base_url, OPENAI_API_KEY=CANARY,
                                  REPORT_REQUEST_TIMEOUT="0.5", LOG_LEVEL="debug")
        env.pop("REPORT_BACKEND")
        cli = subprocess.run([sys.executable, "pipeline.py", "Cats", "Doomed topic", "--run-id", "cli",
                              "--date", "2026-11-29"], cwd=project, env=env, capture_output=True, text=True,
                             timeout=300)
        notebook = subprocess.run(
            [sys.executable, "-m", "papermill", "notebooks/05_batch_pipeline.ipynb", "out.ipynb", "-k", "python3",
             "--cwd", "notebooks", "--no-progress-bar", "--log-output", "-y", "topics: [Dogs, Doomed again]",
             "-p", "max_iterations", "2"],
            cwd=project, env=env, capture_output=True, text=True, timeout=600)
    with FaultyServer(echo_key_on_401="everything") as rejecting:
        env["OPENAI_BASE_URL"] = rejecting.base_url
        refused = subprocess.run([sys.executable, "pipeline.py", "Cats"], cwd=project, env=env,
                                 capture_output=True, text=True, timeout=120)
    with FaultyServer(echo_key_on_401="completions") as rejecting:
        env["OPENAI_BASE_URL"] = rejecting.base_url
        echoed = subprocess.run([sys.executable, "pipeline.py", "Cats", "--run-id", "echo"], cwd=project, env=env,
                                capture_output=True, text=True, timeout=120)
    assert cli.returncode == 1, cli.stdout + cli.stderr  # one topic failed, by design
    assert "Doomed topic: InternalServerError" in cli.stdout
    assert notebook.returncode == 0, notebook.stderr[-3000:]
    assert refused.returncode == 2 and "rejected the API key (HTTP 401)" in refused.stderr
    assert echoed.returncode == 1 and "Cats: AuthenticationError" in echoed.stdout
    echoed_error = json.loads((project / "reports" / "echo" / "summary.json").read_text())["topics"][0]["error"]
    assert "Incorrect API key provided: [API key]" in echoed_error
    texts = [cli.stdout, cli.stderr, notebook.stdout, notebook.stderr, refused.stdout, refused.stderr,
             echoed.stdout, echoed.stderr]
    files = [p for p in project.rglob("*") if p.is_file() and ".git" not in p.parts]
    assert any(p.name == "summary.json" for p in files) and any(p.suffix == ".db" for p in files)
    leaks = [str(p) for p in files if CANARY.encode() in p.read_bytes()]
    leaks += [f"output {i}" for i, text in enumerate(texts) if CANARY in text]
    assert leaks == []


def test_error_messages_are_redacted(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", CANARY)
    message = pipeline.describe_error(RuntimeError(f"Incorrect API key provided: {CANARY}."))
    assert CANARY not in message and "[API key]" in message


# ----------------------------------------------------------------------------------------- paths

HOSTILE_TOPICS = ["../../etc/passwd", "..", "CON", "nul", "/absolute/path", "C:\\Windows\\win.ini", "x" * 200,
                  "!!!???...", "???", "~root", ".hidden", "a/b", "a\\b", "Ünïcödé – ελληνικά", "🚀🚀🚀"]


def test_hostile_topics_get_distinct_safe_readable_slugs():
    slugs = [slugify(topic) for topic in HOSTILE_TOPICS]
    assert len(set(slugs)) == len(slugs)
    for slug in slugs:
        assert "/" not in slug and "\\" not in slug and not slug.startswith(".") and ".." not in slug
        assert len(slug) <= 48 + 9
        assert slug.split("-")[0].lower() not in {"con", "nul", "prn", "aux"}
    assert slugify("../../etc/passwd").startswith("etc-passwd-")
    assert slugify("Ünïcödé – ελληνικά").startswith("ünïcödé-ελληνικά-")


def test_hostile_topics_stay_inside_the_run_folder(tmp_path):
    batch = pipeline.run_batch(HOSTILE_TOPICS, max_iterations=1, output_dir=tmp_path / "out", run_id="paths",
                               use_cache=False)
    assert all(report.ok for report in batch.reports)
    written = [p.resolve() for p in (tmp_path).rglob("*") if p.is_file()]
    assert written and all(p.is_relative_to((tmp_path / "out" / "paths").resolve()) for p in written)
    assert len({p.parent for p in written if p.name == "report.md"}) == len(HOSTILE_TOPICS)
