"""pipeline.py, the command line: ``main`` in-process, then ``python pipeline.py``, ``flyte run --local`` and
``python -m machinery.offline_llm`` as a user runs them (slow: subprocesses)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, subprocess_env
from helpers import scripted_model
from scratch_project import make_scratch_project

import pipeline
from machinery import offline_llm
from machinery.runtime import runtime

# ----------------------------------------------------------------------------------------- main(), in-process


def test_main_writes_the_reports_and_says_where(tmp_path, capsys):
    code = pipeline.main(["Cats", "Dogs", "--out", str(tmp_path), "--run-id", "cli", "--date", "2026-11-29",
                          "--max-iterations", "2", "--quality-threshold", "9"])
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"^  Cats: score \d+/10 after [12] round\(s\)$", out, flags=re.MULTILINE), out
    assert re.search(r"^  Dogs: score \d+/10 after [12] round\(s\)$", out, flags=re.MULTILINE), out
    assert f"2 of 2 reports written; index: {tmp_path / 'cli' / 'index.html'}" in out
    summary = json.loads((tmp_path / "cli" / "summary.json").read_text(encoding="utf-8"))
    assert summary["report_date"] == "2026-11-29"
    assert [row["status"] for row in summary["topics"]] == ["ok", "ok"]
    assert all(1 <= row["iterations"] <= 2 for row in summary["topics"])


def test_main_prints_a_line_per_step_of_each_topic_and_nothing_more(tmp_path, capsys):
    code = pipeline.main(["Cats", "--out", str(tmp_path), "--run-id", "steps", "--max-iterations", "2",
                          "--quality-threshold", "10", "--date", "2026-11-29"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    *progress, closing, written = [line for line in lines if not line.startswith("Reports are written by")]
    first, second = (int(line.rsplit(" ", 1)[1].split("/")[0]) for line in progress if ": score " in line)
    assert progress == ["  Cats: draft", "  Cats: round 1 critique", f"  Cats: score {first}/10",
                        "  Cats: round 1 revision", "  Cats: round 2 critique", f"  Cats: score {second}/10",
                        "  Cats: formatting", "  Cats: done"]
    assert closing == f"  Cats: score {second}/10 after 2 round(s)", "the closing lines stay"
    assert written == f"1 of 1 reports written; index: {tmp_path / 'steps' / 'index.html'}"


def test_main_exits_1_when_a_topic_fails_and_names_it(tmp_path, capsys):
    with scripted_model(lambda role, topic, content: "not JSON" if role == "critic" and topic == "Dogs" else None):
        code = pipeline.main(["Cats", "Dogs", "--out", str(tmp_path), "--run-id", "partial", "--max-iterations", "1"])
    out = capsys.readouterr().out
    assert code == 1
    assert "  Cats: score " in out
    assert "  Dogs: CritiqueError: The critic's reply for 'Dogs' was invalid twice" in out
    assert "1 of 2 reports written" in out


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["Cats", "--max-iterations", "0"], "error: max_iterations must be a whole number from 1 to 10, got 0"),
        (["Cats", "--quality-threshold", "11"], "error: quality_threshold must be a whole number from 1 to 10, got 11"),
        (["Cats", "Cats"], "error: topic #2 'Cats' repeats topic #1: each topic may appear once"),
        (["  "], "error: topic #1 is blank: give it some text or remove it"),
        (["Cats", "--run-id", "../up"], "error: run_id '../up' must be 1-64 letters"),
    ],
)
def test_main_reports_bad_input_in_one_line(arguments, message, tmp_path, capsys):
    with scripted_model() as transport:
        code = pipeline.main([*arguments, "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith(message) and captured.err.count("\n") == 1, captured.err
    assert transport.log == [] and list(tmp_path.iterdir()) == []


def test_main_reports_an_unusable_backend_in_one_line(tmp_path, capsys, api_key):
    with runtime.configured(backend="openai", base_url="http://127.0.0.1:9/v1"):
        code = pipeline.main(["Cats", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: Cannot reach the model server at http://127.0.0.1:9/v1")
    assert api_key not in err


def test_ctrl_c_is_one_line_and_exit_code_130(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_batch", interrupted)
    assert pipeline.main(["Cats", "--out", str(tmp_path)]) == 130
    assert capsys.readouterr().err == "interrupted: a rerun resumes from the reply cache\n"


def test_no_cache_asks_the_model_again(tmp_path, capsys):
    """--no-cache skips Flyte's task cache and the reply cache, for the rest of the process."""
    arguments = ["No-cache topic", "--out", str(tmp_path), "--max-iterations", "1"]
    assert pipeline.main([*arguments, "--run-id", "one"]) == 0
    with scripted_model() as transport:
        assert pipeline.main([*arguments, "--run-id", "two"]) == 0
        assert transport.log == [], "served by Flyte's task cache"
        assert pipeline.main([*arguments, "--run-id", "three", "--no-cache"]) == 0
    assert transport.count(topic="No-cache topic") == 3, "draft, critique and summary asked for again"
    assert runtime.settings.reply_cache is None, "the reply cache stays off (restored after the test)"
    summary = json.loads((tmp_path / "three" / "summary.json").read_text(encoding="utf-8"))
    assert summary["totals"]["cached"] == 0 and summary["totals"]["llm_usage"]["cache_hits"] == 0


def test_main_uses_the_date_and_the_reports_folder_setting(tmp_path, capsys):
    with runtime.configured(reports_dir=tmp_path / "reports"):
        assert pipeline.main(["Cats", "--run-id", "where", "--max-iterations", "1", "--date", "2030-01-02"]) == 0
    report = (tmp_path / "reports" / "where").glob("*/report.md")
    assert pipeline.read_front_matter(next(report).read_text(encoding="utf-8"))["date"] == "2030-01-02"


# ----------------------------------------------------------------------------------------- as a user runs them


def run_cli(args, cwd, **env):
    return subprocess.run([sys.executable, str(ROOT / "pipeline.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=subprocess_env(**env))


@pytest.mark.slow
def test_cli_reports_bad_input_without_a_traceback(tmp_path):
    done = run_cli(["Cats", "--max-iterations", "0", "--out", str(tmp_path)], cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: max_iterations must be a whole number from 1 to 10, got 0"


@pytest.mark.slow
def test_ctrl_c_during_a_batch_is_one_line_and_exit_code_130(tmp_path):
    with offline_llm.OfflineServer(latency=30) as server:  # the draft is still on its way when Ctrl-C comes
        cli = subprocess.Popen(
            [sys.executable, str(ROOT / "pipeline.py"), "Cats", "--out", str(tmp_path), "--no-cache"], cwd=tmp_path,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=subprocess_env(REPORT_BACKEND="openai", OPENAI_BASE_URL=server.base_url, OPENAI_API_KEY="sk-local"))
        waited = time.monotonic()
        while server.stats().requests == 0 and time.monotonic() - waited < 60:
            time.sleep(0.05)
        cli.send_signal(signal.SIGINT)
        out, err = cli.communicate(timeout=60)
    assert cli.returncode == 130 and "  Cats: draft" in out
    assert err == "interrupted: a rerun resumes from the reply cache\n", "one line, no traceback"


@pytest.mark.slow
def test_cli_refuses_the_old_cache_variable(tmp_path):
    done = run_cli(["Cats", "--out", str(tmp_path)], cwd=tmp_path, REPORT_LLM_CACHE="off")
    assert done.returncode != 0
    assert "REPORT_LLM_CACHE was renamed: set REPORT_REPLY_CACHE instead" in done.stderr
    assert list(tmp_path.iterdir()) == []


def flyte_run_local(project: Path, *arguments: str, **env: str) -> tuple[subprocess.CompletedProcess, str]:
    """``flyte run --local pipeline.py report_batch_pipeline ...`` (``env``: more environment variables); the result
    and its output without colours."""
    # COLUMNS: Flyte prints the outputs in a box as wide as the terminal; wide, so no value is wrapped.
    done = subprocess.run(
        [str(Path(sys.executable).parent / "flyte"), "run", "--local", "pipeline.py", "report_batch_pipeline",
         *arguments],
        cwd=project, capture_output=True, text=True, timeout=300,
        env=subprocess_env(PYTHONPATH=str(project), REPORTS_DIR=str(project / "reports"), COLUMNS="100000", **env))
    return done, re.sub(r"\x1b\[[0-9;]*m", "", done.stdout + done.stderr)


@pytest.mark.slow
def test_flyte_run_local_works_on_the_module(tmp_path):
    project = make_scratch_project(tmp_path / "project")
    topics = ["Cats", "Dogs", "Why owls hoot"]
    done, output = flyte_run_local(project, "--topics", json.dumps(topics), "--max_iterations", "2",
                                   "--report_date", "2026-11-29")
    assert done.returncode == 0, output[-3000:]
    assert "Success" in output, output[-3000:]
    # One TopicReport per topic, in order, each without an error (not just one error=None somewhere).
    assert re.findall(r"TopicReport\(topic='([^']*)'", output) == topics, output[-3000:]
    assert re.findall(r"error=(None|'[^']*')\)", output) == ["None"] * len(topics), output[-3000:]
    written = sorted((project / "reports" / ".work").glob("*/report.md"))
    metas = [pipeline.read_front_matter(path.read_text(encoding="utf-8")) for path in written]
    assert sorted(meta["title"] for meta in metas) == sorted(topics)
    assert {meta["date"] for meta in metas} == {"2026-11-29"}


@pytest.mark.slow
def test_flyte_run_local_reports_a_bad_topic_list(tmp_path):
    project = make_scratch_project(tmp_path / "project")
    done, output = flyte_run_local(project, "--topics", '["Cats", "Cats"]')
    assert "topic #2 'Cats' repeats topic #1" in output, output[-3000:]
    assert "Success" not in output


@pytest.mark.slow
@pytest.mark.parametrize("server", ["two models", "unreachable"])
def test_flyte_run_local_says_clearly_why_the_server_cannot_be_used(tmp_path, server):
    """`flyte run` goes straight to the driver task: its check, not a cache policy's, must fail first."""
    project = make_scratch_project(tmp_path / "project")
    with offline_llm.OfflineServer(served_model=("qwen-0.5b", "llama-3b")) as two_models:
        base_url = two_models.base_url if server == "two models" else "http://127.0.0.1:9/v1"  # 9: nothing listens
        done, output = flyte_run_local(project, "--topics", '["Cats"]', REPORT_BACKEND="openai",
                                       OPENAI_BASE_URL=base_url, OPENAI_API_KEY="sk-loopback-test")
        completions = two_models.stats().requests
    flat = " ".join(output.split())  # Flyte wraps its box's lines
    expected = {"two models": f"The server at {base_url} serves 2 models (qwen-0.5b, llama-3b): set REPORT_MODEL",
                "unreachable": f"Cannot reach the model server at {base_url}"}[server]
    assert done.returncode != 0 and expected in flat, output[-3000:]
    assert "Failed to generate version for cache policy" not in flat and completions == 0


@pytest.mark.slow
def test_end_to_end_against_a_small_local_model_configured_only_by_environment(tmp_path):
    """The README's llama.cpp row: OPENAI_BASE_URL and OPENAI_API_KEY only; the server names its model."""
    make_scratch_project(tmp_path)  # a Flyte config of its own, so the project's cache is not touched
    served = "qwen2.5-0.5b-instruct-q4_k_m.gguf"
    server = subprocess.Popen([sys.executable, "-m", "machinery.offline_llm", "--port", "0", "--served-model", served,
                               "--ramble", "--latency-per-token", "0.0005"],
                              stdout=subprocess.PIPE, text=True, env=subprocess_env(), cwd=tmp_path)
    try:
        line = server.stdout.readline()
        base_url = re.search(r"listening on (\S+)", line).group(1)
        done = run_cli(["Why cats purr", "Quantum computing", "--max-iterations", "2", "--out", str(tmp_path),
                        "--run-id", "http", "--date", "2026-11-29"],
                       cwd=tmp_path, OPENAI_BASE_URL=base_url, OPENAI_API_KEY="sk-loopback-test",
                       REPORT_BACKEND="")  # chosen from the variables, as for a user
    finally:
        server.terminate()
        server.wait(10)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Reports are written by the model {served} at {base_url} (OpenAI-compatible)." in done.stdout
    assert "  Why cats purr: round 1 critique" in done.stdout, "per-topic progress"
    assert "sk-loopback-test" not in done.stdout + done.stderr
    summary = json.loads((tmp_path / "http" / "summary.json").read_text(encoding="utf-8"))
    assert summary["model"] == served and "gpt-4o-mini" not in (tmp_path / "http" / "index.html").read_text()
    assert summary["totals"]["llm_usage"]["cut_off"] == 0, "every reply ended within its limit"
    report = (tmp_path / "http" / summary["topics"][0]["files"]["report.md"]).read_text(encoding="utf-8")
    expected = offline_llm.write_draft("Why cats purr")
    assert report.split("---\n\n", 1)[1].startswith(expected.split("\n\n")[0])
    assert summary["topics"][0]["usage"]["requests"] >= 4
