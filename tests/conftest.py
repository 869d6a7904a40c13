"""Test isolation, set up before anything imports flyte or pipeline; and where each test lives.

* Flyte finds its config (and so its task cache and run history) from the
  working directory: every test session runs in a scratch folder with its own
  ``.flyte/config.yaml``, so no test reads a cache entry left by an earlier
  session or by the learner's own runs.
* The offline model is selected explicitly, and no real API key, base URL or
  other ``REPORT_*`` setting from the developer's shell can leak into a test.
* Every test gets an empty reply cache, and whatever runtime settings it
  changes (``runtime.configure``) are restored after it, pass or fail.
* Tests marked ``slow`` start a subprocess, a kernel, a browser or the
  benchmark; ``make test-fast`` (``pytest -m "not slow"``) skips them.

Tests are organised by the module they test; a new test goes in that module's file:

=============================  =====================================================================
module                         test file
=============================  =====================================================================
machinery/settings.py          test_settings.py
machinery/runtime.py           test_runtime.py (clients per loop, configure/configured, use_transport,
                               listeners, Flyte init, task env vars and secrets, deploy dry run)
machinery/concurrency.py       test_concurrency.py
machinery/pacing.py            test_pacing.py (the window, shared pauses, budgets, patience, counters)
machinery/records.py           test_records.py
machinery/model_client.py      test_model_client.py (complete: cache, empty replies, redaction,
                               metering, a rate limit past patience, retries, one deadline (the
                               server's time, not the pace's queue), timeouts, cut-off replies and
                               their marker, events; describe_error; check_backend and the model a
                               server lists, asked anew per batch)
machinery/progress.py          test_progress.py (events as console lines)
machinery/reply_cache.py       test_reply_cache.py
machinery/cache_policy.py      test_cache_policy.py (keys; the CLI rerun/edit end to end)
machinery/inputs.py            test_inputs.py
machinery/files.py             test_files.py
machinery/html_page.py         test_html_page.py
machinery/run_output.py        test_run_output.py
machinery/offline_llm.py       test_offline_llm.py
pipeline.py: prompts, steps    test_pipeline_steps.py (call_llm, traced steps, critique repair)
pipeline.py: formatters        test_pipeline_formatters.py
pipeline.py: batch             test_pipeline_batch.py (run_batch and the driver in Flyte local mode,
                               output files, partial failure, caches)
pipeline.py: main, CLIs        test_cli.py (main in-process; python pipeline.py, flyte run --local)
faults end to end              test_resilience.py (fault server, kill and resume, the canary key)
a small local model            test_local_model.py (a loopback llama.cpp stand-in: bounded replies,
                               the served model's name everywhere and in cache keys, timeouts,
                               cut-offs, counts, the CLI's waits)
notebooks/                     test_notebooks.py (nbval, papermill)
what a browser shows           test_browser.py (report pages, live JupyterLab and explorer)
project hygiene                test_project.py (dependencies, docs fragments, import layers)
benchmarks/bench.py            test_bench.py
explorer.py                    test_explorer.py (views, the report explorer, run_tree)
machinery/app_serving.py,      test_app.py (APP_PORT, the local command, ExplorerApp: saved runs and the
explorer.py: ExplorerApp       cluster's Run button with a stand-in runner; the app's dry run for a cluster,
                               the app notebook under papermill, `make app` stopped by Ctrl-C, SIGHUP,
                               SIGTERM to make or to the server; idle kernels culled)
the served app in a browser    test_app_browser.py (Chromium: two topics run, a double click runs once,
                               hostile text inert, a saved run opened, every process stopped)
tools/pipeline_diagram.py      test_diagram.py (the diagram matches pipeline.py)
=============================  =====================================================================

Shared test code: ``helpers.py`` (``ScriptedTransport`` and ``scripted_model``: the real openai
client in front of a scripted offline model), ``fault_server.py`` (a loopback server that injects
faults), ``hostile.py`` (hostile model output), ``deploy_dry_run.py`` (run by test_runtime.py),
``app_dry_run.py`` (run by test_app.py).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRATCH = Path(tempfile.mkdtemp(prefix="report-tests-"))
(SCRATCH / ".flyte").mkdir()
(SCRATCH / ".flyte" / "config.yaml").write_text("local:\n  persistence: true\n")

for variable in [name for name in os.environ if name.startswith(("OPENAI_", "REPORT_"))]:
    os.environ.pop(variable)
os.environ["REPORT_BACKEND"] = "offline"
os.environ["REPORTS_DIR"] = str(SCRATCH / "reports")
os.environ["REPORT_REPLY_CACHE"] = str(SCRATCH / "reply-cache" / "replies.sqlite3")
os.environ["DO_NOT_TRACK"] = "1"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tools"))


@pytest.fixture(scope="session", autouse=True)
def run_in_scratch_folder():
    """Flyte discovers its config on first use, which happens inside tests: from here."""
    os.chdir(SCRATCH)
    yield
    os.chdir(ROOT)


@pytest.fixture(autouse=True)
def fresh_reply_cache(tmp_path_factory):
    """Every test starts with an empty reply cache (request counts never depend on test order),
    and whatever settings it changes are restored after it."""
    from machinery.runtime import runtime

    with runtime.configured(reply_cache=tmp_path_factory.mktemp("reply-cache") / "replies.sqlite3"):
        yield


@pytest.fixture
def api_key(monkeypatch):
    """A fake OPENAI_API_KEY for the openai backend (restored after the test); returns it."""
    key = "sk-test-0123456789abcdef"
    monkeypatch.setenv("OPENAI_API_KEY", key)
    return key


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(SCRATCH, ignore_errors=True)


def subprocess_env(**overrides: str) -> dict[str, str]:
    """The environment for a child process: offline, no keys, the project importable, an empty reply cache,
    and the session's reports folder (a CLI's --out moves only the run folder, not the work folders)."""
    from scratch_project import scratch_environment

    fresh_cache = Path(tempfile.mkdtemp(prefix="reply-cache-", dir=SCRATCH)) / "replies.sqlite3"
    defaults = {"REPORT_REPLY_CACHE": str(fresh_cache), "REPORTS_DIR": os.environ["REPORTS_DIR"]}
    return scratch_environment(ROOT, **{**defaults, **overrides})


# The browser tests' Chromium (test_browser.py, test_app_browser.py): Debian's, installed by tools/system_deps.sh.
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = ROOT / "build" / "screenshots"
CHROMIUM_ARGS = ["--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through Playwright; a missing browser fails the test, it never skips it."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium is not installed at {CHROMIUM}: run `apt-get install chromium` (.ci/run does)")
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()
