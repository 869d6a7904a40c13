"""The served report explorer app in a real browser: headless Chromium driven by Playwright.

The app is served the way `make app` serves it (apps/serve.py: Flyte's local serving of
pipeline.app_env, Voila on loopback) from a fresh project copy, its kernels reaching a hostile model
over loopback (tests/hostile.py). The page opens with no console error; two topics typed in and Run
show both results; a hostile topic and hostile model text never run as script; a saved run opens
from the list; a double-click on Run runs the batch once. The server is stopped by its process and
every process below it is checked gone, by process id.

Chromium comes from Debian (`apt-get install chromium`, done by .ci/run); a missing browser fails
these tests rather than skipping them. Screenshots are saved in build/screenshots/.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import SCREENSHOTS
from hostile import HOSTILE_TOPIC, HostileServer
from scratch_project import make_scratch_project, scratch_environment
from test_browser import WatchedPage, browse_hostile_report

from machinery import app_serving

pytestmark = pytest.mark.slow  # a browser, and the app's server


@pytest.fixture(scope="module")
def served_app(tmp_path_factory):
    """apps/serve.py in a process group of its own, as `make app` runs it; yields the URL, the server's process,
    the project and the reports folder.
    Afterwards: stopped with SIGINT, as Ctrl-C stops it, and every process it started is checked gone."""
    base = tmp_path_factory.mktemp("app")
    project = make_scratch_project(base / "project")
    reports = base / "reports"
    port = app_serving.free_port()
    with contextlib.ExitStack() as cleanup:
        model = cleanup.enter_context(HostileServer())
        env = scratch_environment(project, OPENAI_BASE_URL=model.base_url, OPENAI_API_KEY="sk-test-app",
                                  APP_PORT=str(port), REPORTS_DIR=str(reports),
                                  JUPYTER_CONFIG_DIR=str(base / "jupyter-config"),
                                  JUPYTER_DATA_DIR=str(base / "jupyter-data"),
                                  JUPYTER_RUNTIME_DIR=str(base / "jupyter-runtime"), IPYTHONDIR=str(base / "ipython"))
        env.pop("REPORT_BACKEND")  # chosen from OPENAI_BASE_URL, as for a user
        log = cleanup.enter_context(open(base / "app.log", "w+"))
        server = subprocess.Popen([sys.executable, "apps/serve.py"], cwd=project, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        cleanup.callback(kill_what_is_left, server)  # after a failure too; a no-op after a clean stop
        started = time.monotonic()
        while "The report explorer is at" not in Path(log.name).read_text():
            assert server.poll() is None, Path(log.name).read_text()[-3000:]
            assert time.monotonic() - started < 120, "the app did not start in 120 s"
            time.sleep(0.2)
        url = f"http://127.0.0.1:{port}/"
        assert f"The report explorer is at {url}" in Path(log.name).read_text()
        yield url, server, project, reports
        everything = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
            raise
        _, alive = psutil.wait_procs(everything, timeout=10)
        assert alive == [], f"left running: {[(p.pid, p.cmdline()[:3]) for p in alive]}"
        assert len(everything) >= 3, "the server, Voila and at least one kernel were stopped"
        assert "Stopped the app" in Path(log.name).read_text()


def kill_what_is_left(server: subprocess.Popen) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):
        for process in [*psutil.Process(server.pid).children(recursive=True), psutil.Process(server.pid)]:
            process.kill()


def test_the_served_app_runs_topics_and_stays_inert(browser, served_app):
    url, server, project, _ = served_app
    watched = WatchedPage(browser, viewport=(1280, 1000))
    page = watched.page
    try:
        started = time.monotonic()
        page.goto(url)
        app = page.locator(".widget-vbox", has=page.locator(".widget-tab")).first
        app.locator("textarea").wait_for()
        opened = time.monotonic() - started
        for title in ("Summary", "Report", "HTML preview", "Critique history", "Files"):
            app.locator(".lm-TabBar-tab", has_text=title).wait_for()
        assert app.locator("select").first.locator("option").count() == 0, "no saved run yet"

        # A visitor types two topics and presses Run.
        app.locator("textarea").fill("Rust\nWebAssembly")
        app.locator("button", has_text="Run").click()
        app.locator(".widget-html-content", has_text="Finished: 2 of 2 topics succeeded").wait_for()
        results = app.locator(".widget-html-content table").nth(1)
        for topic in ("Rust", "WebAssembly"):
            results.locator("td", has_text=topic).first.wait_for()

        # A hostile topic, and every reply of the model hostile too.
        app.locator("textarea").fill(HOSTILE_TOPIC)
        app.locator("button", has_text="Run").click()
        app.locator(".widget-html-content", has_text="Finished: 1 of 1 topics succeeded").wait_for()
        results.locator("td", has_text=HOSTILE_TOPIC).first.wait_for()
        report = app.locator("select").nth(1)
        browse_hostile_report(app, page, report)

        # Both runs are saved: the list offers them, and one opens.
        saved = app.locator("select").first
        assert saved.locator("option").count() == 2
        saved.select_option(index=1)  # the older run: Rust and WebAssembly
        app.locator("button", has_text="Open").click()
        app.locator(".widget-html-content", has_text="Showing saved run").wait_for()
        report.select_option(label="Rust")
        app.locator(".lm-TabBar-tab", has_text="Report").click()
        app.locator(".widget-tab h1", has_text="Rust").first.wait_for()
        app.locator(".lm-TabBar-tab", has_text="Critique history").click()
        page.screenshot(path=str(SCREENSHOTS / "app-page.png"), full_page=True, animations="disabled")

        assert watched.hits() == [], f"script ran in the app's page: {watched.hits()}"
        assert watched.dialogs == []
        assert watched.remote_requests == [], watched.remote_requests
        assert watched.console_errors == [], watched.console_errors
        assert opened < 60, f"the page took {opened:.1f} s to show the explorer"
    except BaseException:
        page.screenshot(path=str(SCREENSHOTS / "app-FAILED.png"), full_page=True)
        raise
    finally:
        watched.close()


def run_folders(reports: Path) -> set[Path]:
    return {summary.parent for summary in reports.glob("*/summary.json")}


def test_a_double_click_on_run_runs_the_batch_once(browser, served_app):
    """Both clicks reach the kernel before the disabled button reaches the browser: the second waits in the kernel's
    queue until the first run ends, and is then dropped (explorer.QUEUED_CLICK_SECONDS)."""
    url, _, _, reports = served_app
    before = run_folders(reports)
    watched = WatchedPage(browser, viewport=(1280, 1000))
    page = watched.page
    try:
        page.goto(url)
        app = page.locator(".widget-vbox", has=page.locator(".widget-tab")).first
        app.locator("textarea").wait_for()
        app.locator("textarea").fill("Tea")
        app.locator("button", has_text="Run").dblclick()
        app.locator(".widget-html-content", has_text="Finished: 1 of 1 topics succeeded").wait_for()
        # The kernel handles messages in order: once this Open is shown, every click sent before it was handled.
        app.locator("button", has_text="Open").click()
        app.locator(".widget-html-content", has_text="Showing saved run").wait_for()
        new = run_folders(reports) - before
        assert len(new) == 1, sorted(folder.name for folder in new)
        assert watched.console_errors == [], watched.console_errors
    except BaseException:
        page.screenshot(path=str(SCREENSHOTS / "app-double-click-FAILED.png"), full_page=True)
        raise
    finally:
        watched.close()
