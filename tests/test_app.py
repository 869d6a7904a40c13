"""The report explorer as a web app: machinery/app_serving.py, the app's views in explorer.py
(ExplorerApp, saved runs, the cluster's Run button, double clicks), pipeline.app_env serialized for a
cluster (an offline dry run), the app notebook under papermill, idle kernels culled, and `make app`
stopped by Ctrl-C, SIGTERM, SIGHUP or `kill` of make. test_app_browser.py opens the served app in Chromium.

No test here reaches a cluster: the cluster's Run button is driven with a substituted runner, which
checks what the app asks for and how it shows the run, not that a cluster accepts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import html
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import nbformat
import psutil
import pytest
from conftest import ROOT, subprocess_env
from hostile import HOSTILE_TOPIC
from scratch_project import make_scratch_project, scratch_environment
from tornado.websocket import websocket_connect

import explorer
import pipeline
from machinery import app_serving
from machinery.inputs import validate_run_id
from machinery.run_output import REPORT_FILES

# Topics no other test file uses: Flyte's task cache is shared by the whole test session.
TOPICS = ["App: saved kelp forests", "App: saved tide tables"]


# ----------------------------------------------------------------------------------------- settings and command


@pytest.mark.parametrize(("value", "port"), [(None, 8866), ("", 8866), ("9123", 9123), (" 8890 ", 8890)])
def test_the_port_comes_from_app_port(value, port):
    assert app_serving.app_port({} if value is None else {"APP_PORT": value}) == port


@pytest.mark.parametrize("value", ["http", "80", "65536", "-1", "8866.0"])
def test_a_bad_app_port_is_an_error_that_names_the_variable(value):
    with pytest.raises(ValueError, match=r"APP_PORT must be a whole number from 1024 to 65535, not '"):
        app_serving.app_port({"APP_PORT": value})


def test_make_app_refuses_a_bad_or_busy_port_before_starting_anything(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(app_serving, "serve_locally", lambda *args: pytest.fail("nothing may be started"))
    assert app_serving.main(pipeline.app_env, tmp_path, {"APP_PORT": "80"}) == 2
    assert "APP_PORT must be a whole number from 1024 to 65535, not '80'" in capsys.readouterr().err
    with socket.socket() as other_server:
        other_server.bind(("127.0.0.1", 0))
        other_server.listen()
        port = other_server.getsockname()[1]
        assert app_serving.main(pipeline.app_env, tmp_path, {"APP_PORT": str(port)}) == 2
    assert f"error: port {port} is in use; choose another with APP_PORT" in capsys.readouterr().err


CULLING = ["--MappingKernelManager.cull_idle_timeout=600", "--MappingKernelManager.cull_interval=60"]


def test_locally_the_same_environment_listens_on_loopback_and_app_port():
    local = app_serving.local_environment(pipeline.app_env, 9123)
    notebook = ROOT / app_serving.APP_NOTEBOOK
    assert local.args == ["voila", str(notebook), "--template=explorer", "--port", "9123", "--no-browser",
                          "--Voila.ip=127.0.0.1", *CULLING, "--Voila.port_retries=0"], "culling too"
    assert (ROOT / app_serving.TEMPLATES / "voila" / "templates" / "explorer" / "index.html.j2").is_file()
    assert notebook.is_file() and local.get_port().port == 9123
    assert local.name == pipeline.app_env.name and local.parameters == pipeline.app_env.parameters
    assert pipeline.app_env.get_port().port == 8080 and "--Voila.ip=0.0.0.0" in pipeline.app_env.args, "unchanged"


def test_the_app_environment_is_the_one_the_cluster_args_name():
    env = pipeline.app_env
    assert env.args[:2] == ["voila", app_serving.APP_NOTEBOOK] and env.args[env.args.index("--port") + 1] == "8080"
    assert "--template=explorer" in env.args and set(env.include) == {"apps", "explorer.py"}
    assert env.args[-2:] == CULLING, "idle kernels of closed pages are shut down"
    assert not [arg for arg in env.args if "cull_busy" in arg or "cull_connected" in arg], "never a busy or open one"
    assert env.depends_on == [pipeline.driver_env] and env.requires_auth
    assert env.env_vars == {"REPORT_APP_TARGET": "cluster", "JUPYTER_PATH": app_serving.TEMPLATES}


@pytest.mark.parametrize(("environ", "target"), [({}, "local"), ({"REPORT_APP_TARGET": ""}, "local"),
                                                 ({"REPORT_APP_TARGET": "local"}, "local"),
                                                 ({"REPORT_APP_TARGET": " Cluster"}, "cluster")])
def test_the_run_target_is_local_unless_the_cluster_says_so(environ, target):
    assert explorer.app_target(environ) == target


def test_an_unknown_run_target_is_an_error_that_names_the_variable():
    with pytest.raises(ValueError, match="REPORT_APP_TARGET must be one of local, cluster, not 'laptop'"):
        explorer.app_target({"REPORT_APP_TARGET": "laptop"})
    with pytest.raises(ValueError, match="target must be one of"):
        explorer.ExplorerApp(ROOT / "no-such-folder", target="laptop")


# ----------------------------------------------------------------------------------------- the app's views


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two saved runs in one reports folder: the first with a topic that fails."""
    reports = tmp_path_factory.mktemp("app-reports")
    first = pipeline.run_batch([TOPICS[0], "App: saved (unreviewable)"], max_iterations=2, output_dir=reports,
                               run_id="first", report_date="2026-11-30")
    second = pipeline.run_batch([TOPICS[1]], max_iterations=3, output_dir=reports, run_id="second",
                                report_date="2026-11-30")
    for batch, age in ((first, 20), (second, 10)):  # written in this order, whatever the clock's grain
        os.utime(batch.summary_path, (time.time() - age, time.time() - age))
    return reports, first, second


def test_saved_runs_are_listed_newest_first(saved, tmp_path):
    reports, _, _ = saved
    assert [run.name for run in explorer.saved_runs(reports)] == ["second", "first"]
    (reports / ".work").mkdir(exist_ok=True)  # the tasks' work folders are not runs
    assert [run.name for run in explorer.saved_runs(reports)] == ["second", "first"]
    assert explorer.saved_runs(tmp_path / "missing") == []


def test_a_saved_run_reads_back_as_the_run_made_it(saved):
    reports, first, _ = saved
    loaded = explorer.load_run(reports / "first")
    assert [report.topic for report, _, _ in loaded] == [report.topic for report in first.reports]
    for (report, folder, row), made, made_row in zip(loaded, first.reports, first.rows()):
        assert folder == first.run_dir and row == json.loads(json.dumps(made_row))
        assert report.ok == made.ok and report.error == made.error and report.slug == made.slug
        if made.ok:
            assert report.result.markdown.strip() == made.result.markdown.strip()
            assert [(r.score, r.improvements) for r in report.result.history] == \
                   [(r.score, r.improvements) for r in made.result.history]
    assert not loaded[1][0].ok and "CritiqueError" in loaded[1][0].error


def test_open_shows_a_saved_run_in_the_explorer(saved):
    reports, first, _ = saved
    app = explorer.ExplorerApp(reports)
    assert [label for label, _ in app.runs.options] == ["second", "first"]
    assert app.runs.value == reports / "second", "the newest is selected, so Open works at once"
    app.runs.value = reports / "first"
    app.open_button.click()
    ui = app.explorer
    assert list(ui.choice.options) == [report.topic for report in first.reports]
    assert TOPICS[0] in ui.results_table.value and "first" in ui.results_table.value
    assert "Showing saved run first (2 topics)." in ui.results_note.value
    assert "<h1>" in ui.report_view.value and "score per round" in ui.history_view.value
    ui.choice.value = "App: saved (unreviewable)"
    assert "This topic failed" in ui.summary_view.value
    app.open_run(reports / "second")
    assert "with results of other runs" in ui.results_note.value and len(ui.results) == 3


def test_a_local_run_joins_the_saved_runs(saved):
    reports, _, _ = saved
    started = []
    app = explorer.ExplorerApp(reports, run_id="app-local", start_run=lambda *args: started.append(args))
    app.explorer.topics_box.value = "App: a fresh local topic"
    app.explorer.run_button.click()
    assert started == [], "locally, Run runs the batch here"
    assert "Finished: 1 of 1 topics succeeded" in app.explorer.message.value
    assert [label for label, _ in app.runs.options][0] == "app-local"
    assert app.runs.value == reports / "second", "what was selected stays selected"


@pytest.mark.parametrize(("damage", "error"), [
    ("summary.txt", "first/{slug}/ has no summary.txt"),
    ("report.md", "first/{slug}/ has no report.md"),
    ("front matter", "first/{slug}/report.md has no front matter: not this pipeline's"),
    ("foreign summary", "first/summary.json is not a run summary of this pipeline (KeyError: 'topics')"),
    ("not json", "first/summary.json is not a run summary of this pipeline (JSONDecodeError: Expecting value"),
])
def test_a_run_that_cannot_be_opened_is_said_in_the_message_line(saved, tmp_path, damage, error):
    reports, first, _ = saved
    copy = shutil.copytree(reports / "first", tmp_path / "first")
    slug = first.reports[0].slug  # the topic that succeeded: its files are read
    if damage in REPORT_FILES:
        (copy / slug / damage).unlink()
    elif damage == "front matter":
        (copy / slug / "report.md").write_text("# A report from elsewhere\n", encoding="utf-8")
    else:
        (copy / "summary.json").write_text('{"runs": []}' if damage == "foreign summary" else "<html>",
                                           encoding="utf-8")
    shutil.copytree(reports / "second", tmp_path / "second")
    app = explorer.ExplorerApp(tmp_path)
    app.runs.value = copy
    app.open_button.click()  # a click: shown, not raised into the kernel's log
    message = app.explorer.message.value
    assert message.startswith('<span style="color:#cf222e">Could not open saved run first: ')
    assert html.escape(error.format(slug=slug)) in message, message
    assert app.explorer.results == {} and list(app.explorer.choice.options) == [], "nothing half-shown"
    with pytest.raises((OSError, ValueError)):
        app.open_run(copy)  # a cell's call: raised
    app.runs.value = tmp_path / "second"
    app.open_button.click()
    assert app.explorer.message.value == "" and TOPICS[1] in app.explorer.results, "the next Open clears the error"


def test_a_page_s_run_id_names_when_it_opened_and_its_kernel():
    opened = dt.datetime(2026, 11, 30, 9, 5, 7)
    assert explorer.app_run_id(opened, 4242) == "app-20261130-090507-4242"
    assert explorer.app_run_id(opened, 4243) != explorer.app_run_id(opened, 4242), "two pages in the same second"
    assert validate_run_id(explorer.app_run_id(opened, 4194304) + "-10"), "a valid folder name, also the tenth run"


def test_a_click_within_half_a_second_of_the_end_of_a_run_with_its_inputs_was_sent_during_it():
    ui = explorer.ReportExplorer(["Rust"])
    assert not explorer.queued_click(ui, now=0.0), "before any run, no click is queued"
    ui._click_run = (100.0, explorer.click_inputs(ui))  # a run a click started ended at 100 s
    assert explorer.queued_click(ui, now=100.0) and explorer.queued_click(ui, now=100.49)
    assert not explorer.queued_click(ui, now=100.5) and not explorer.queued_click(ui, now=160.0)
    ui.threshold.value = 7  # sent by the browser before the click: a new request, however fast
    assert not explorer.queued_click(ui, now=100.1)
    ui.threshold.value, ui.topics_box.value = 8, "Rust\nGo"
    assert not explorer.queued_click(ui, now=100.1)


def test_a_double_click_on_run_runs_the_batch_once(tmp_path):
    app = explorer.ExplorerApp(tmp_path, run_id="app-double")
    ui = app.explorer
    ui.topics_box.value = "App: a double click"
    ui.run_button.click()
    ui.run_button.click()  # handled the moment the first run ended, as a double-click's second click is
    assert [run.name for run in explorer.saved_runs(tmp_path)] == ["app-double"]
    ended, inputs = ui._click_run
    ui._click_run = (ended - 1, inputs)  # a second later: a click of its own
    ui.run_button.click()
    assert sorted(run.name for run in explorer.saved_runs(tmp_path)) == ["app-double", "app-double-2"]


def test_on_a_cluster_a_double_click_starts_one_run_with_run_disabled_meanwhile(tmp_path):
    disabled_while_starting = []

    class WatchedCluster(FakeCluster):
        def __call__(self, task_name, inputs):
            disabled_while_starting.append(app.explorer.run_button.disabled)
            return super().__call__(task_name, inputs)

    cluster = WatchedCluster()
    app = explorer.ExplorerApp(tmp_path, target="cluster", start_run=cluster)
    app.explorer.topics_box.value = "Rust"
    app.explorer.run_button.click()
    app.explorer.run_button.click()
    assert len(cluster.started) == 1 and disabled_while_starting == [True]
    assert not app.explorer.run_button.disabled, "enabled again once the run has started"
    app.explorer.topics_box.value = "Go"  # other topics, at once: a request of its own
    app.explorer.run_button.click()
    assert [inputs["topics"] for _, inputs in cluster.started] == [["Rust"], ["Go"]]


def test_a_cluster_run_initialises_flyte_once_per_kernel(monkeypatch):
    import flyte
    import flyte.remote

    connected: list[str] = []
    monkeypatch.setattr(flyte, "is_control_plane_available", lambda: bool(connected))
    monkeypatch.setattr(flyte, "init_in_cluster", lambda: connected.append("init_in_cluster"))
    monkeypatch.setattr(flyte.remote.Task, "get", staticmethod(lambda name, auto_version: f"{name}@{auto_version}"))
    monkeypatch.setattr(flyte, "run", lambda task, **inputs: (task, inputs))
    for _ in range(2):
        assert explorer.start_cluster_run("driver.report_batch_pipeline", {"topics": ["Rust"]}) == \
               ("driver.report_batch_pipeline@latest", {"topics": ["Rust"]})
    assert connected == ["init_in_cluster"], "the second run reuses the first's connection"


class FakeCluster:
    """Stands in for a cluster: records what the app asked to start and returns a run like flyte.run's."""

    def __init__(self, url: str = "https://flyte.example.com/v2/runs/project/demo/domain/development/r-7"):
        self.url, self.started = url, []

    def __call__(self, task_name, inputs):
        self.started.append((task_name, inputs))
        return SimpleNamespace(name=f"r-{len(self.started)}", url=self.url)


def test_on_a_cluster_run_starts_the_deployed_task_and_links_to_it(tmp_path):
    cluster = FakeCluster()
    app = explorer.ExplorerApp(tmp_path, target="cluster", start_run=cluster)
    app.explorer.topics_box.value = f"Rust\n{HOSTILE_TOPIC}"
    app.explorer.iterations.value, app.explorer.threshold.value = 4, 7
    app.explorer.run_button.click()
    assert cluster.started == [("driver.report_batch_pipeline",
                                {"topics": ["Rust", HOSTILE_TOPIC], "max_iterations": 4, "quality_threshold": 7})]
    assert app.explorer.message.value == (
        'Started run <a href="https://flyte.example.com/v2/runs/project/demo/domain/development/r-7" '
        'target="_blank" rel="noopener">r-1</a> on the cluster (2 topics): its reports are in the run\'s outputs.')
    assert app.explorer.results == {} and app.explorer.last_batch is None, "nothing ran here"
    assert "on the cluster" in app.explorer.backend.value


def test_on_a_cluster_bad_input_starts_nothing_and_says_why(tmp_path):
    cluster = FakeCluster()
    app = explorer.ExplorerApp(tmp_path, target="cluster", start_run=cluster)
    app.explorer.topics_box.value = ""
    app.explorer.run_button.click()
    assert cluster.started == [] and "topics is empty" in app.explorer.message.value


def test_a_run_link_is_only_ever_a_web_address(tmp_path):
    cluster = FakeCluster(url="javascript:window.__pwned=1")
    app = explorer.ExplorerApp(tmp_path, target="cluster", start_run=cluster)
    app.start_remote(["Rust"])
    assert "<a " not in app.explorer.message.value and "<code>r-1</code>" in app.explorer.message.value


def test_a_cluster_that_refuses_is_shown_not_raised_by_a_click(tmp_path):
    def refuse(task_name, inputs):
        raise RuntimeError("<b>no access</b>")

    app = explorer.ExplorerApp(tmp_path, target="cluster", start_run=refuse)
    app.explorer.topics_box.value = "Rust"
    app.explorer.run_button.click()
    assert app.explorer.message.value == ('<span style="color:#cf222e">The run did not start: '
                                          '&lt;b&gt;no access&lt;/b&gt;</span>')


# ----------------------------------------------------------------------------------------- for a cluster, offline


APP_PACKAGES = ["voila>=0.5.13", "ipykernel>=6.29", "ipywidgets>=8.1", "matplotlib>=3.8"]


@pytest.mark.slow
def test_the_app_environment_serializes_for_a_cluster():
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "app_dry_run.py"), *APP_PACKAGES],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=subprocess_env())
    assert done.returncode == 0, done.stderr[-3000:]
    app = json.loads(done.stdout.strip().splitlines()[-1])
    assert app["environments"] == ["driver", "llm-worker", "report-explorer"], "the tasks Run starts come along"
    declared = app["declared_image_uris"]
    assert app["image_uri"] == declared["app"] != declared["pipeline"], "the app's own image, serialized"
    assert app["image_uri"] == declared["pipeline_with_packages"], "the pipeline's image plus exactly these packages"
    assert app["ports"] == [8080] and app["entrypoint"] == "fserve"
    assert app["app_args"] == ["voila", "apps/explorer.ipynb", "--template=explorer", "--port", "8080",
                               "--no-browser", "--Voila.ip=0.0.0.0", *CULLING]
    assert app["parameters"] == [{"name": "reports_dir", "value": "reports", "download": False, "type": "string",
                                  "env_var": "REPORTS_DIR", "dest": None, "ignore_patterns": []}]
    assert app["env"]["REPORT_APP_TARGET"] == "cluster" and app["env"]["JUPYTER_PATH"] == "apps/jupyter"
    assert app["requires_auth"] is True
    assert {"apps/explorer.ipynb", "apps/jupyter/voila/templates/explorer/index.html.j2", "explorer.py",
            "pipeline.py", "machinery/runtime.py"} <= set(app["bundled"])


# ----------------------------------------------------------------------------------------- the app notebook


@pytest.mark.slow
@pytest.mark.parametrize("kernel_folder", ["apps", "."], ids=["kernel-in-apps", "kernel-in-the-project"])
def test_the_app_notebook_runs_topics_given_as_parameters(tmp_path, kernel_folder):
    """Voila starts the kernel in apps/, another runner may start it elsewhere: the notebook finds the project
    either way, and a relative REPORTS_DIR is a folder of the project."""
    project = make_scratch_project(tmp_path / "project")
    executed = ROOT / "build" / "papermill" / "app-explorer.ipynb"
    executed.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-m", "papermill", "apps/explorer.ipynb", str(executed), "-k", "python3",
         "--cwd", kernel_folder, "--no-progress-bar", "-y", "topics: [Rust, WebAssembly]"],
        cwd=project, capture_output=True, text=True, timeout=600,
        env=scratch_environment(project, REPORTS_DIR="app-reports"))
    assert done.returncode == 0, done.stderr[-4000:]
    (run,) = explorer.saved_runs(project / "app-reports")
    assert re.fullmatch(r"app-\d{8}-\d{6}-\d+", run.name), run.name
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    assert [row["topic"] for row in summary["topics"]] == ["Rust", "WebAssembly"]
    notebook = nbformat.read(executed, as_version=4)
    assert not [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]


def test_the_app_notebook_is_clean():
    notebook = nbformat.read(ROOT / app_serving.APP_NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code), "saved without outputs"
    assert "parameters" in code[0].metadata.get("tags", [])


# ----------------------------------------------------------------------------------------- idle kernels


@pytest.mark.slow
def test_the_kernel_of_a_page_nobody_has_open_is_culled_and_an_open_one_is_not(tmp_path):
    """The app's culling options, served for real with a 2 s timeout checked every second: two pages fetched
    without a browser each leave a kernel; one is left alone and is culled, the other has a connection (what an
    open page holds) and outlives the timeout, until the connection closes. Checked by process id."""
    quick = [argument.replace("cull_idle_timeout=600", "cull_idle_timeout=2").replace("cull_interval=60",
                                                                                      "cull_interval=1")
             for argument in pipeline.app_env.args]
    assert quick != list(pipeline.app_env.args), "the app's own culling options, shortened"
    port = app_serving.free_port()
    environ = dict(os.environ)  # Flyte's local serving writes REPORTS_DIR and more into this process's environment
    handle = app_serving.serve_locally(pipeline.app_env.clone_with(pipeline.app_env.name, args=quick), port,
                                       tmp_path / "reports", log=tmp_path / "app.log")
    try:
        app_serving.wait_until_serving(handle, port)
        kernel_ids = []
        for _ in range(2):
            with urllib.request.urlopen(app_serving.app_url(port), timeout=120) as page:
                kernel_ids += re.findall(r'"kernelId": "([0-9a-f-]+)"', page.read().decode())
        fetched = time.monotonic()
        assert len(kernel_ids) == 2
        kernels = [process for process in app_serving.server_processes(handle)
                   if "ipykernel_launcher" in process.cmdline()]
        # Each kernel's command names its connection file, kernel-<its id>.json.
        left, held = [next(kernel for kernel in kernels if any(kernel_id in argument for argument in kernel.cmdline()))
                      for kernel_id in kernel_ids]

        async def hold_the_second_page_open() -> None:
            connection = await websocket_connect(f"ws://127.0.0.1:{port}/api/kernels/{kernel_ids[1]}/channels")
            try:
                _, alive = psutil.wait_procs([left], timeout=15)
                assert alive == [], "the kernel of the page nobody holds is culled"
                await asyncio.sleep(max(0.0, fetched + 5 - time.monotonic()))  # idle for over 2 s + 2 checks
                assert held.is_running(), "the kernel of an open page is not culled, however idle"
            finally:
                connection.close()

        asyncio.run(hold_the_second_page_open())
        _, alive = psutil.wait_procs([held], timeout=10)
        assert alive == [], "once its page is closed, it is culled too"
        assert (tmp_path / "app.log").read_text().count("Culling 'idle' kernel") == 2
    finally:
        app_serving.stop(handle)
        os.environ.clear()
        os.environ.update(environ)


# ----------------------------------------------------------------------------------------- make app


def kernels_of(server: psutil.Process) -> list[psutil.Process]:
    return [p for p in server.children(recursive=True) if "ipykernel_launcher" in " ".join(p.cmdline())]


@pytest.mark.slow
@pytest.mark.parametrize(("stop_with", "sent_to"), [(signal.SIGINT, "group"), (signal.SIGHUP, "group"),
                                                   (signal.SIGTERM, "make"), (signal.SIGTERM, "serve.py")],
                         ids=["ctrl-c", "closed-terminal", "kill-make", "kill-serve"])
def test_make_app_serves_the_page_and_stops_cleanly(stop_with, sent_to, tmp_path):
    """`make app` in a process group of its own, as a terminal runs it. The signal goes to the whole group, as
    Ctrl-C does and a closed terminal's SIGHUP does (the shell passes it on to its jobs), or, as `kill <pid>` does,
    to make alone or to apps/serve.py alone. Afterwards neither Voila nor the kernel that rendered the page is
    running, checked by process id."""
    port = app_serving.free_port()
    env = subprocess_env(APP_PORT=str(port), REPORTS_DIR=str(tmp_path / "reports"))
    started = time.monotonic()
    make = subprocess.Popen(["make", "--no-print-directory", "app"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    started_by_app: list[psutil.Process] = []  # Voila and its kernel run in sessions of their own
    try:
        lines = []
        for line in make.stdout:
            lines.append(line)
            if "The report explorer is at" in line:
                break
        assert lines and lines[-1].startswith(f"The report explorer is at http://127.0.0.1:{port}/"), "".join(lines)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=120) as page:
            assert page.status == 200 and "Report explorer" in page.read().decode()
        answered = time.monotonic() - started
        started_by_app += [p for p in psutil.Process(make.pid).children(recursive=True)
                           if any(Path(argument).name == "voila" for argument in p.cmdline()[:2])]
        assert len(started_by_app) == 1, started_by_app
        deadline = time.monotonic() + 60
        while not kernels_of(started_by_app[0]):
            assert time.monotonic() < deadline, "the page started no kernel"
            time.sleep(0.2)
        started_by_app += kernels_of(started_by_app[0])
        if sent_to == "group":
            os.killpg(make.pid, stop_with)
        elif sent_to == "make":
            os.kill(make.pid, stop_with)
        else:
            (serve,) = [p for p in psutil.Process(make.pid).children() if "apps/serve.py" in p.cmdline()]
            os.kill(serve.pid, stop_with)
        rest = make.communicate(timeout=60)[0]
        assert "Stopped the app" in rest, "".join(lines) + rest
        _, alive = psutil.wait_procs(started_by_app, timeout=10)
        assert alive == [], [p.pid for p in alive]
        assert answered < 120
    finally:  # whatever failed above, nothing of ours keeps running
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
            make.wait()
        for process in started_by_app:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()


def test_serving_points_at_this_python_once_however_often_it_serves():
    environ = {"PATH": os.pathsep.join(["/usr/bin", "/bin"]), "JUPYTER_PATH": "/elsewhere"}
    app_serving.point_at_this_python(environ)
    once = dict(environ)
    app_serving.point_at_this_python(environ)
    assert environ == once, "serving again grows neither PATH nor JUPYTER_PATH"
    assert environ["PATH"].split(os.pathsep) == [str(Path(sys.executable).parent), "/usr/bin", "/bin"]
    folders = environ["JUPYTER_PATH"].split(os.pathsep)
    assert folders[0] == str(app_serving.PROJECT_ROOT / app_serving.TEMPLATES) and folders[-1] == "/elsewhere"
    empty: dict[str, str] = {}
    app_serving.point_at_this_python(empty)
    assert empty["PATH"] == str(Path(sys.executable).parent), "no empty entry: that would search the working folder"
