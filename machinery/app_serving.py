"""Serve the report explorer app on this machine, through Flyte's local serving.

``apps/serve.py`` (what ``make app`` runs) hands ``main`` the app environment that ``pipeline.py``
declares, and ``main`` serves it with ``flyte.with_servecontext(mode="local").serve(...)``: Flyte starts
its command, Voilà, as a subprocess. Here we only adapt the environment to this machine (loopback
and ``APP_PORT`` instead of the cluster's address and port), wait until it listens, and on Ctrl-C,
SIGTERM or SIGHUP stop everything we started, Voilà and the notebook kernels it started, by process id.

This module never imports ``pipeline``: the caller hands it the app environment.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import psutil

from machinery.settings import PROJECT_ROOT

APP_NOTEBOOK = "apps/explorer.ipynb"  # relative to the project: the code bundle keeps that layout on a cluster
TEMPLATES = "apps/jupyter"  # Jupyter's data-folder layout: Voila finds voila/templates/explorer in it
DEFAULT_PORT = 8866  # Voilà's own default; APP_PORT changes it
LOCAL_HOST = "127.0.0.1"  # loopback only: locally the app has no sign-in, so no other machine may reach it


def app_port(environ: Mapping[str, str] = os.environ) -> int:
    """The port from ``APP_PORT`` (default 8866), or a ValueError that names the variable."""
    text = environ.get("APP_PORT", "").strip()
    if not text:
        return DEFAULT_PORT
    if not text.isdigit() or not 1024 <= int(text) <= 65535:
        raise ValueError(f"APP_PORT must be a whole number from 1024 to 65535, not {text!r}")
    return int(text)


def local_args(cluster_args: list[str], notebook: str, port: int, host: str) -> list[str]:
    """The cluster's Voilà command for this machine: ``notebook``, ``port`` and ``host`` in place of the cluster's,
    every other option kept (the page template, kernel culling), and ``port_retries=0``: a busy port is an error,
    never a silent move to a port the printed URL does not name."""
    args = [f"--Voila.ip={host}" if argument.startswith("--Voila.ip=") else argument for argument in cluster_args]
    args[args.index(APP_NOTEBOOK)] = notebook
    args[args.index("--port") + 1] = str(port)
    return [*args, "--Voila.port_retries=0"]


def local_environment(app_env: Any, port: int) -> Any:
    """The app environment as this machine serves it: the same command on loopback and ``port``, with the
    notebook's absolute path (Flyte starts the command in the caller's working folder, which may be any)."""
    notebook = str(PROJECT_ROOT / APP_NOTEBOOK)
    return app_env.clone_with(app_env.name, port=port, args=local_args(list(app_env.args), notebook, port, LOCAL_HOST))


def serve_locally(app_env: Any, port: int, reports_dir: Path, log: Path | None = None) -> Any:
    """Start the app with Flyte's local serving and return its handle (``.deactivate``); returns at once.

    Locally Flyte applies an app's parameters (here ``REPORTS_DIR``, where saved runs are read and new
    ones written) but not its ``env_vars``: so the Run button runs the batch here, not on a cluster.
    ``log``: a file for the server's output instead of this process's (a notebook would show every line).
    """
    import flyte

    point_at_this_python(os.environ)
    values = {app_env.name: {parameter.name: str(reports_dir) for parameter in app_env.parameters
                             if parameter.env_var == "REPORTS_DIR"}}
    with output_to(log):
        return flyte.with_servecontext(mode="local", parameter_values=values).serve(local_environment(app_env, port))


def point_at_this_python(environ: MutableMapping[str, str]) -> None:
    """Make ``environ`` (the one Flyte starts the app's command with) find this interpreter's ``voila``, and its
    kernel first, before any ``python3`` kernel another project installed for the user, even when the venv is not
    activated; and the app's page template (apps/jupyter), which the app environment names relative to the
    project. Idempotent: serving again does not grow PATH or JUPYTER_PATH."""
    bin_folder = str(Path(sys.executable).parent)
    searched = filter(None, environ.get("PATH", "").split(os.pathsep))  # an empty entry means the working folder
    environ["PATH"] = os.pathsep.join(dict.fromkeys([bin_folder, *searched]))
    folders = [str(PROJECT_ROOT / TEMPLATES), str(Path(sys.prefix) / "share" / "jupyter"),
               *environ.get("JUPYTER_PATH", "").split(os.pathsep)]
    environ["JUPYTER_PATH"] = os.pathsep.join(dict.fromkeys(filter(None, folders)))


@contextlib.contextmanager
def output_to(log: Path | None) -> Iterator[None]:
    """Within the block, this process's stdout and stderr (the file descriptors, which a subprocess inherits)
    go to ``log``: Flyte starts the server with ours and takes no other."""
    if log is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(log, "ab") as target:
            os.dup2(target.fileno(), 1)
            os.dup2(target.fileno(), 2)
            yield
    finally:
        for descriptor, copy in zip((1, 2), saved):
            os.dup2(copy, descriptor)
            os.close(copy)


def free_port() -> int:
    """A port nothing on loopback listens on now (the system picks it)."""
    with socket.socket() as probe:
        probe.bind((LOCAL_HOST, 0))
        return probe.getsockname()[1]


def app_url(port: int) -> str:
    return f"http://{LOCAL_HOST}:{port}/"


def accepts_connections(port: int) -> bool:
    """Whether a server listens on ``port``. Not a request for the page: each one starts a kernel that runs
    the whole notebook, for a visitor who would never come."""
    with socket.socket() as probe:
        probe.settimeout(2)
        return probe.connect_ex((LOCAL_HOST, port)) == 0


def wait_until_serving(handle: Any, port: int, timeout: float = 120.0) -> float:
    """Poll until the app's server listens on ``port``; return the seconds it took."""
    started = time.monotonic()
    while not accepts_connections(port):
        if handle.is_deactivated():
            raise RuntimeError(f"the app's server exited before it answered (is port {port} already in use?)")
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{app_url(port)} did not answer within {timeout:.0f} s")
        time.sleep(0.2)
    return time.monotonic() - started


def server_processes(handle: Any) -> list[psutil.Process]:
    """The app's server and every process below it (Voilà's notebook kernels run in sessions of their own,
    so a process group would miss them)."""
    if handle.is_deactivated():
        return []
    try:
        server = psutil.Process(handle._process.pid)  # Flyte's local handle has no public process id
        return [server, *server.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stop(handle: Any, grace: float = 10.0) -> list[int]:
    """Stop the app and everything it started; return the process ids that were stopped.

    Voilà shuts its kernels down on SIGTERM (Flyte's ``deactivate``); whatever is left after ``grace``
    seconds is killed, by process id, never by name.
    """
    processes = server_processes(handle)
    handle.deactivate(wait=True)
    _, alive = psutil.wait_procs(processes, timeout=grace)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=5)
    return [process.pid for process in processes]


# What stops `make app`: Ctrl-C (SIGINT), `kill <pid>` (SIGTERM) and a closed terminal (SIGHUP, which the shell
# passes on to its jobs). Voilà and its kernels run in sessions of their own (Flyte starts Voilà with
# start_new_session=True), so none of these signals reaches them: only our cleanup does.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def main(app_env: Any, reports_dir: Path, environ: Mapping[str, str] = os.environ) -> int:
    """Serve until Ctrl-C, SIGTERM or SIGHUP, then stop everything. What ``make app`` runs."""
    try:
        port = app_port(environ)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if accepts_connections(port):  # checked first: waiting below would take the other server for ours
        print(f"error: port {port} is in use; choose another with APP_PORT", file=sys.stderr)
        return 2
    handle = serve_locally(app_env, port, reports_dir)
    # Flyte's own handlers (SIGINT and SIGTERM only) ask the server to stop and then exit at once, before any
    # cleanup: ours turn every stop signal into KeyboardInterrupt, so `stop` below waits for the kernels too.
    for signum in STOP_SIGNALS:
        signal.signal(signum, _interrupt)
    url = app_url(port)
    try:
        wait_until_serving(handle, port)
        print(f"The report explorer is at {url} (Ctrl-C stops it)", flush=True)
        while not handle.is_deactivated():
            time.sleep(0.5)
        print("error: the app's server stopped by itself (its output above says why)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except (RuntimeError, TimeoutError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the cleanup
        stopped = stop(handle)
        with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone, and the line with it
            print(f"Stopped the app ({len(stopped)} process{'es' * (len(stopped) != 1)}).", flush=True)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
