"""Resilience end to end: faults injected over real HTTP, a killed batch resumed, a canary key that never leaks.

The pieces are unit-tested beside their modules (the reply cache in test_reply_cache.py, redaction
and retries of empty replies in test_model_client.py); here the whole pipeline meets a hostile world.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, subprocess_env
from fault_server import FaultyServer
from helpers import served_by
from scratch_project import make_scratch_project, scratch_environment

import pipeline
from machinery import offline_llm
from machinery.reply_cache import request_key
from machinery.run_output import REPORT_FILES


def stored_keys(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {row[0] for row in db.execute("SELECT key FROM replies")}


# ----------------------------------------------------------------------------------------- faults over HTTP

TWENTY = [f"Resilience topic {i:02d}" for i in range(20)]


def run_against(server: FaultyServer, topics: list[str], out: Path, run_id: str, **configuration):
    # A "timeout" fault is a reply 0.8 s late, within the call's deadline: a reply past the deadline ends
    # its topic (ModelTimeout, test_local_model.py), so here every fault is one the retries can ride out.
    with served_by(server, model="gpt-4o-mini", request_timeout=3.0, client_retries=3,
                   reply_cache=out / f"{run_id}-replies.sqlite3", **configuration):
        return pipeline.run_batch(topics, max_iterations=3, quality_threshold=9, report_date="2026-11-29",
                                  output_dir=out, run_id=run_id, flyte_cache=False)


@pytest.mark.slow  # a whole batch through a fault server's retries: seconds, not milliseconds
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
        for name in REPORT_FILES:
            assert (stormy.folder(topic) / name).read_bytes() == (reference.folder(topic) / name).read_bytes()
    assert [row["score_history"] for row in stormy.rows()] == [row["score_history"] for row in reference.rows()]


@pytest.mark.slow  # a whole batch through a fault server's retries: seconds, not milliseconds
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
    # complete() tried 4 times per task attempt (a 503 is retried), and Flyte attempted the task 4 times
    assert server.faults["503"] == 4 * 4
    assert "Doomed topic" in batch.index_path.read_text(encoding="utf-8")


def test_the_concurrency_cap_holds_at_the_server(tmp_path, api_key):
    with FaultyServer(latency=0.03) as server:
        batch = run_against(server, [f"Cap {i}" for i in range(10)], tmp_path, "cap", max_concurrency=3)
    print(f"\nconcurrency cap 3: peak in flight at the server {server.peak_in_flight}")
    assert all(r.ok for r in batch.reports)
    assert server.peak_in_flight == 3


# ----------------------------------------------------------------------------------------- kill and resume


@pytest.mark.slow
def test_a_killed_batch_resumes_without_repeating_completed_calls(tmp_path):
    topics = [f"Resume topic {i}" for i in range(12)]
    cache_path = tmp_path / "replies.sqlite3"
    out = tmp_path / "out"
    with FaultyServer(latency=0.02) as server:
        env = subprocess_env(OPENAI_BASE_URL=server.base_url, OPENAI_API_KEY="sk-test-resume", REPORT_BACKEND="",
                             REPORT_REPLY_CACHE=str(cache_path), REPORT_MAX_CONCURRENCY="4")
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


@pytest.mark.slow
def test_a_canary_key_never_leaves_the_process(tmp_path):
    project = make_scratch_project(tmp_path / "project")
    with FaultyServer(fault_percent=30) as server:
        env = scratch_environment(project, OPENAI_BASE_URL=server.base_url, OPENAI_API_KEY=CANARY,
                                  REPORT_REQUEST_TIMEOUT="3", LOG_LEVEL="debug")
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


# ----------------------------------------------------------------------------------------- rate limits over HTTP

FOUR = [f"Rate-limited topic {i}" for i in range(4)]


@pytest.mark.slow  # real waits for a server's budget
@pytest.mark.parametrize("headers", [True, False], ids=["x-ratelimit-headers", "only-429s"])
def test_a_batch_against_a_budgeted_server_writes_every_topic_with_few_429s(tmp_path, api_key, headers):
    # 600 requests a minute with a burst of 5: the batch's ~20 calls need about 1.5 s of the server's budget.
    server = offline_llm.OfflineServer(requests_per_minute=600, burst=5, ratelimit_headers=headers, latency=0.01)
    with server, served_by(server, model="gpt-4o-mini", reply_cache=None):
        batch = pipeline.run_batch(FOUR, max_iterations=2, report_date="2026-11-29", output_dir=tmp_path,
                                   run_id="budget", flyte_cache=False)
    stats = server.stats()
    assert [report.ok for report in batch.reports] == [True] * 4, [report.error for report in batch.reports]
    if headers:
        # None at all: the pace copies the server's bucket, and takes off what was in flight when a reply's
        # request went out (four requests sent at once reach the server in any order).
        assert stats.rate_limited == 0, "the headers let the pace space requests before a 429"
    else:
        # Without the headers the pace learns the limit from 429s alone: about one per completed call here,
        # where the fixed cap of 8 and the client's retries got four per completed call (494 for 125).
        assert stats.rate_limited <= 2 * stats.completions, "one 429 pauses everyone: no herd of retries"
    assert batch.pacing.rate_limited == stats.rate_limited and batch.pacing.paused_seconds > 0
    summary = json.loads(batch.summary_path.read_text(encoding="utf-8"))
    assert summary["totals"]["pacing"]["rate_limited"] == stats.rate_limited


@pytest.mark.slow
def test_the_ceiling_holds_at_the_server(tmp_path, api_key):
    server = offline_llm.OfflineServer(latency=0.05)
    with server, served_by(server, model="gpt-4o-mini", reply_cache=None, max_concurrency=3):
        batch = pipeline.run_batch(FOUR, max_iterations=2, output_dir=tmp_path, run_id="ceiling", flyte_cache=False)
    assert all(report.ok for report in batch.reports)
    assert 1 <= server.stats().peak_in_flight <= 3 and batch.pacing.peak_in_flight <= 3


@pytest.mark.slow
def test_a_budget_too_small_for_the_patience_fails_clearly_and_keeps_every_completed_call(tmp_path, api_key):
    # Six requests a minute with a burst of 2: after two calls the server asks for a wait of about 10 s,
    # longer than a patience of 1 s, so the waiting topics fail at once with a message that says what to do.
    server = offline_llm.OfflineServer(requests_per_minute=6, burst=2)
    cache = tmp_path / "replies.sqlite3"
    with server, served_by(server, model="gpt-4o-mini", reply_cache=cache, rate_limit_patience=1.0):
        batch = pipeline.run_batch(FOUR[:2], max_iterations=2, output_dir=tmp_path, run_id="impatient",
                                   flyte_cache=False)
    errors = [report.error for report in batch.reports if report.error]
    assert errors and all(error.startswith("RateLimited: ") for error in errors), errors
    assert all("REPORT_RATE_LIMIT_PATIENCE" in error for error in errors)
    completed = server.stats().completions
    assert completed >= 2 and len(stored_keys(cache)) == completed, "every completed call is in the reply cache"
