"""Test isolation, set up before anything imports flyte or pipeline.

* Flyte finds its config (and so its task cache and run history) from the
  working directory: every test session runs in a scratch folder with its own
  ``.flyte/config.yaml``, so no test reads a cache entry left by an earlier
  session or by the learner's own runs.
* The offline model is selected explicitly, and no real API key or base URL
  from the developer's shell can leak into a test.
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

for variable in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "REPORT_MODEL", "REPORT_MAX_CONCURRENCY", "REPORT_OFFLINE_LATENCY"):
    os.environ.pop(variable, None)
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


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(SCRATCH, ignore_errors=True)


def subprocess_env(**overrides: str) -> dict[str, str]:
    """The environment for a child process: offline, no keys, the project importable, an empty reply cache."""
    from scratch_project import scratch_environment

    fresh_cache = Path(tempfile.mkdtemp(prefix="reply-cache-", dir=SCRATCH)) / "replies.sqlite3"
    return scratch_environment(ROOT, **{"REPORT_REPLY_CACHE": str(fresh_cache), **overrides})
