"""The benchmark keeps working: a tiny configuration, checked for shape and for the one fact that is not a timing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, subprocess_env


@pytest.mark.slow
def test_the_benchmark_runs_in_a_tiny_configuration(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=subprocess_env(), cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert [row["topics"] for row in results["fan_out"]] == results["config"]["fanout"]
    for row in results["fan_out"]:
        # per topic: a draft, 1-3 critiques with a revision between them, and a summary
        assert 3 * row["topics"] <= row["calls"] <= 7 * row["topics"]
        assert 3 * row["latency_s"] - 1e-6 <= row["critical_path_s"] <= 7 * row["latency_s"] + 1e-6
        assert 0 < row["efficiency"] <= 1.05
        assert row["asyncio_calls"] == row["calls"], "plain asyncio makes exactly the calls Flyte's run made"
        assert row["asyncio_critical_path_s"] == row["critical_path_s"]
        assert 0 < row["asyncio_efficiency"] <= 1.05
    assert set(results["overhead"]["runs"]) == {"flyte_and_client", "flyte_and_client_with_run_history",
                                                "asyncio_and_client", "asyncio_without_client"}
    calls = {run["calls"] for run in results["overhead"]["runs"].values()}
    assert len(calls) == 1, "every variant makes the same calls"
    assert results["overhead"]["flyte_actions_per_topic"] >= 2 + 2 * 3, "two tasks and two traces per model call"
    rerun = results["cached_rerun"]
    assert rerun["first_requests"] >= 3 * rerun["topics"]
    assert rerun["second_requests"] == 0 and rerun["cached_topics"] == rerun["topics"]
    assert results["checks"]["rerun_makes_no_calls"]["met"] is True
    assert [row["topics"] for row in results["scaling"]] == results["config"]["scaling"]
    assert results["peak_rss_mb"] > 0
    assert results["formatting"]["sequential_s"] > 0 and results["formatting"]["gathered_s"] > 0
    table = (tmp_path / "results.md").read_text()
    assert table.startswith("| measurement |") and table in done.stdout
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
