"""The pipeline's benchmark: fan-out efficiency, orchestration overhead, cached reruns, scaling, formatting.

    make bench                                  # the full run (a few minutes on 2 cores)
    python benchmarks/bench.py --quick --out DIR  # a tiny configuration, used by the tests

Every figure is measured in this one run, side by side, because shared
machines are noisy; the conclusions are ratios. The offline model stands in for
a remote one with a simulated latency (see machinery.offline_llm.simulated_latency).
Writes results.json, results.md (the table) and results.png (the plot) to the
output folder, and prints the table.

Runs in a scratch folder with a copy of the project's Flyte config, so it
never touches the project's caches.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import multiprocessing
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Timings compared with each other are taken in turns, `repeats` times, and the best of each kept:
# on a shared machine a single run can be 30% slow for reasons that have nothing to do with it.
FULL = {"fanout": [1, 20, 100], "overhead": 200, "scaling": [1, 10, 50, 100, 200, 500], "latency": 0.2,
        "rss_topics": 500, "rerun": 50, "repeats": 3}
QUICK = {"fanout": [1, 3], "overhead": 5, "scaling": [1, 3], "latency": 0.05, "rss_topics": 5, "rerun": 3,
         "repeats": 1}
TARGETS = {"efficiency_20": 0.95, "efficiency_100": 0.90, "overhead_ratio": 2.0, "rerun_speedup": 50.0,
           "rss_mb_500": 400.0, "served_unlimited_efficiency": 0.8, "served_300rpm_vs_budget": 1.25,
           "served_300rpm_share_429": 0.10}
# Against the offline model's loopback HTTP server, default settings (issue 13): (name, topics, requests per
# minute or None, seconds per reply, lognormal jitter of the reply time).
SERVED = {"full": [("unlimited", 60, None, 1.0, 0.3), ("300rpm", 30, 300, 0.2, 0.3), ("12rpm", 1, 12, 0.2, 0.0)],
          "quick": [("unlimited", 3, None, 0.05, 0.3), ("300rpm", 3, 300, 0.05, 0.0)]}
DATE = "2026-11-29"


def enter_scratch_project() -> Path:
    """Before flyte is imported: a working folder whose .flyte/config.yaml keeps caches out of the project."""
    scratch = Path(tempfile.mkdtemp(prefix="report-bench-"))
    (scratch / ".flyte").mkdir()
    shutil.copy2(ROOT / ".flyte" / "config.yaml", scratch / ".flyte" / "config.yaml")
    os.chdir(scratch)
    os.environ.update(REPORT_BACKEND="offline", REPORT_REPLY_CACHE="off", REPORTS_DIR=str(scratch / "reports"),
                      DO_NOT_TRACK="1")
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
        os.environ.pop(name, None)
    sys.path.insert(0, str(ROOT))
    return scratch


# ----------------------------------------------------------------------------------------- instruments


class CallLog:
    """Every model call: which topic, when it started and ended (filled by the transports below)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float, float]] = []  # (topic, role, start, end)

    def critical_path(self, latency: float) -> float:
        """The DAG's longest chain: the longest topic's refine calls, then (after the barrier) its summary."""
        refine: dict[str, int] = {}
        summary: dict[str, int] = {}
        for topic, role, _, _ in self.calls:
            target = summary if role == "summarizer" else refine
            target[topic] = target.get(topic, 0) + 1
        return (max(refine.values(), default=0) + max(summary.values(), default=0)) * latency


def logging_transport(log: CallLog, latency: float):
    from machinery import offline_llm

    class LoggingTransport(offline_llm.OfflineTransport):
        async def handle_async_request(self, request):
            start = time.perf_counter()
            response = await super().handle_async_request(request)
            if request.url.path.endswith("/chat/completions"):
                parsed = offline_llm.parse_request(json.loads(request.content))
                log.calls.append((parsed.topic, parsed.role, start, time.perf_counter()))
            return response

    return LoggingTransport(latency=latency)


class DirectClient:
    """The same model calls without the HTTP client layer: the offline model called as a function."""

    def __init__(self, log: CallLog, latency: float) -> None:
        self.log, self.latency = log, latency
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self.create))

    async def create(self, **request: Any) -> Any:
        from machinery import offline_llm

        start = time.perf_counter()
        reply = offline_llm.complete(request)
        if self.latency:
            await asyncio.sleep(self.latency)
        parsed = offline_llm.parse_request(request)
        self.log.calls.append((parsed.topic, parsed.role, start, time.perf_counter()))
        return SimpleNamespace(
            choices=[SimpleNamespace(message=SimpleNamespace(content=reply["choices"][0]["message"]["content"]))],
            usage=SimpleNamespace(**{k: reply["usage"][k] for k in ("prompt_tokens", "completion_tokens")}),
        )


def topics_for(count: int, prefix: str) -> list[str]:
    return [f"{prefix} topic {i:03d}" for i in range(count)]


# ----------------------------------------------------------------------------------------- the ways to run


def run_with_flyte(topics: list[str], flyte_cache: bool = False) -> float:
    import flyte

    import pipeline

    pipeline.runtime.init_flyte()
    start = time.perf_counter()
    run = flyte.with_runcontext(mode="local", disable_run_cache=not flyte_cache).run(
        pipeline.report_batch_pipeline, topics=topics, max_iterations=3, quality_threshold=8, report_date=DATE)
    reports = run.outputs()[0]
    elapsed = time.perf_counter() - start
    assert all(report.ok for report in reports), [r.error for r in reports if not r.ok]
    cleanup(reports)
    return elapsed


def run_plain_asyncio(topics: list[str]) -> float:
    """Exactly the same task functions and calls, awaited as plain coroutines: no Flyte run."""
    import pipeline

    async def batch():
        refined = await asyncio.gather(*(pipeline.refine_report(topic, 3, 8) for topic in topics))
        files = await asyncio.gather(*(pipeline.format_outputs(result, DATE) for result in refined))
        return files

    start = time.perf_counter()
    files = asyncio.run(batch())
    elapsed = time.perf_counter() - start
    for item in files:
        shutil.rmtree(item.folder.path, ignore_errors=True)
    return elapsed


def cleanup(reports) -> None:
    for report in reports:
        if report.files is not None:
            shutil.rmtree(report.files.folder.path, ignore_errors=True)


# ----------------------------------------------------------------------------------------- measurements


def fan_out_efficiency(config: dict) -> list[dict]:
    """Flyte's local run, and beside it the same calls awaited as plain coroutines: the ceiling of one event loop."""
    from machinery.runtime import runtime

    rows = []
    for count in config["fanout"]:
        row: dict[str, Any] = {"topics": count, "latency_s": config["latency"]}
        for _ in range(config["repeats"]):
            for label, runner in (("", run_with_flyte), ("asyncio_", run_plain_asyncio)):
                log = CallLog()
                with runtime.configured(max_concurrency=max(8, count), reply_cache=None), \
                        runtime.use_transport(logging_transport(log, config["latency"])):
                    wall = runner(topics_for(count, f"Fan-out {count}"))
                if wall < row.get(f"{label}wall_s", float("inf")):
                    critical = log.critical_path(config["latency"])
                    row.update({f"{label}calls": len(log.calls), f"{label}critical_path_s": round(critical, 3),
                                f"{label}wall_s": round(wall, 3), f"{label}efficiency": round(critical / wall, 3)})
        rows.append(row)
    return rows


def orchestration_overhead(config: dict) -> dict:
    from machinery.runtime import runtime

    count = config["overhead"]
    timings: dict[str, dict] = {}
    for round_number in range(config["repeats"]):
        for label, runner, transport in (
            ("flyte_and_client", run_with_flyte, True),
            ("flyte_and_client_with_run_history", run_with_flyte, True),
            ("asyncio_and_client", run_plain_asyncio, True),
            ("asyncio_without_client", run_plain_asyncio, False),
        ):
            log = CallLog()
            model = (runtime.use_transport(logging_transport(log, 0.0)) if transport
                     else runtime.use_client(DirectClient(log, 0.0)))
            with runtime.configured(max_concurrency=max(8, count), reply_cache=None,
                                    run_history=label.endswith("run_history")), model:
                if round_number == 0:
                    runner(topics_for(2, f"Warm-up {label}"))  # imports, first-run costs
                    log.calls.clear()
                wall = runner(topics_for(count, "Overhead"))  # the same topics, so exactly the same calls
            if wall < timings.get(label, {}).get("wall_s", float("inf")):
                timings[label] = {"wall_s": round(wall, 3), "per_topic_ms": round(1000 * wall / count, 2),
                                  "calls": len(log.calls)}
    per_topic = {k: v["per_topic_ms"] for k, v in timings.items()}
    # Per topic, Flyte runs two tasks and two traced functions per model call (the step and call_llm).
    actions_per_topic = 2 + 2 * timings["flyte_and_client"]["calls"] / count
    return {
        "topics": count,
        "runs": timings,
        "flyte_actions_per_topic": round(actions_per_topic, 1),
        "flyte_ms_per_action": round((per_topic["flyte_and_client"] - per_topic["asyncio_and_client"])
                                     / actions_per_topic, 2),
        "flyte_vs_asyncio": round(per_topic["flyte_and_client"] / per_topic["asyncio_and_client"], 2),
        "client_vs_no_client": round(per_topic["asyncio_and_client"] / per_topic["asyncio_without_client"], 2),
        "flyte_vs_bare": round(per_topic["flyte_and_client"] / per_topic["asyncio_without_client"], 2),
        "run_history_vs_none": round(per_topic["flyte_and_client_with_run_history"] / per_topic["flyte_and_client"], 2),
    }


def cached_rerun(config: dict, scratch: Path) -> dict:
    import pipeline
    from machinery.runtime import runtime

    count = config["rerun"]
    timings: dict[str, list[float]] = {"first": [], "second": []}
    requests = {"first": 0, "second": 0}
    cached = []
    with runtime.configured(max_concurrency=max(8, count), reply_cache=scratch / "bench-replies.sqlite3"), \
            runtime.use_transport(logging_transport(CallLog(), config["latency"])):
        for round_number in range(config["repeats"]):
            topics = topics_for(count, f"Rerun {round_number}")  # new topics: a real first run each round
            for run in ("first", "second"):
                before = runtime.requests_sent.value
                start = time.perf_counter()
                batch = pipeline.run_batch(topics, report_date=DATE, output_dir=scratch / "reports",
                                           run_id=f"{run}-{round_number}")
                timings[run].append(time.perf_counter() - start)
                requests[run] += runtime.requests_sent.value - before
                assert all(report.ok for report in batch.reports)
            cached.append(len(batch.cached_topics))
    first, second = min(timings["first"]), min(timings["second"])
    return {"topics": count, "latency_s": config["latency"], "rounds": config["repeats"],
            "first_s": round(first, 3), "second_s": round(second, 3), "speedup": round(first / second, 1),
            "first_requests": requests["first"], "second_requests": requests["second"],
            "cached_topics": min(cached)}


def scaling(config: dict) -> list[dict]:
    from machinery.runtime import runtime

    rows = []
    for count in config["scaling"]:
        with runtime.configured(max_concurrency=max(8, count), reply_cache=None), \
                runtime.use_transport(logging_transport(CallLog(), 0.0)):
            wall = min(run_with_flyte(topics_for(count, f"Scale {count}")) for _ in range(config["repeats"]))
        rows.append({"topics": count, "wall_s": round(wall, 3), "per_topic_ms": round(1000 * wall / count, 2)})
    return rows


def peak_rss_mb(topics: int) -> float:
    """Peak resident memory of a fresh process that runs ``topics`` topics (Linux reports KiB)."""
    done = subprocess.run([sys.executable, __file__, "--rss-probe", str(topics)], capture_output=True, text=True,
                          timeout=1800, check=True)
    return round(int(done.stdout.strip().splitlines()[-1]) / 1024, 1)


def formatting_fan_out(config: dict) -> dict:
    import flyte

    import pipeline
    from machinery.runtime import runtime

    runtime.configure(reply_cache=None)  # the rest of this process runs without the reply cache
    runtime.init_flyte()
    with runtime.use_transport(logging_transport(CallLog(), 0.0)):
        result = flyte.with_runcontext(mode="local", disable_run_cache=True).run(
            pipeline.refine_report, topic="Formatting benchmark").outputs()[0]

    async def sequential():
        pipeline.format_as_markdown(result, DATE)
        pipeline.format_as_html(result, DATE)
        await pipeline.summarize_report(result.topic, result.markdown)

    async def gathered():
        await asyncio.gather(asyncio.to_thread(pipeline.format_as_markdown, result, DATE),
                             asyncio.to_thread(pipeline.format_as_html, result, DATE),
                             pipeline.summarize_report(result.topic, result.markdown))

    def timed(make) -> float:
        start = time.perf_counter()
        asyncio.run(make())
        return time.perf_counter() - start

    with runtime.use_transport(logging_transport(CallLog(), config["latency"])):
        timed(sequential)  # warm-up
        seq = min(timed(sequential) for _ in range(3))
        par = min(timed(gathered) for _ in range(3))
    return {"latency_s": config["latency"], "sequential_s": round(seq, 4), "gathered_s": round(par, 4),
            "speedup": round(seq / par, 2)}


# ----------------------------------------------------------------------------------------- report


@contextlib.contextmanager
def api_key(value: str):
    """The openai backend needs a key in the environment; the offline server ignores it."""
    os.environ["OPENAI_API_KEY"] = value
    try:
        yield
    finally:
        os.environ.pop("OPENAI_API_KEY", None)


def serve_in_child(connection, rpm, latency: float, jitter: float) -> None:
    """The offline model's HTTP server in a process of its own (a second core, as a real server would have),
    recording each completion's topic, role and jittered reply time; sends its URL, then, when told to stop,
    its counters and timings."""
    from machinery import offline_llm

    timings: list[tuple[str, str, float]] = []

    class TimedServer(offline_llm.OfflineServer):
        def delay_for(self, raw_body: bytes, payload: dict) -> float:
            delay = super().delay_for(raw_body, payload)
            parsed = offline_llm.parse_request(json.loads(raw_body))
            timings.append((parsed.topic, parsed.role, delay))
            return delay

    with TimedServer(latency=latency, jitter=jitter, requests_per_minute=rpm,
                     ratelimit_headers=rpm is not None) as server:
        connection.send((server.base_url, server.burst))
        connection.recv()  # stop
        connection.send((dataclasses.asdict(server.stats()), timings))


def served(scenarios: list[tuple], scratch: Path) -> list[dict]:
    """A batch against the offline model's HTTP server, rate-limited or not, with default settings: is every
    topic written, how close to what the server allows, how many 429s, how long the batch waited."""
    import pipeline
    from machinery.runtime import runtime

    rows = []
    for name, count, rpm, latency, jitter in scenarios:
        here, there = multiprocessing.Pipe()
        child = multiprocessing.get_context("spawn").Process(target=serve_in_child, args=(there, rpm, latency, jitter))
        child.start()
        base_url, burst = here.recv()
        try:
            with api_key("offline"), runtime.configured(backend="openai", base_url=base_url, model="offline",
                                                        reply_cache=None):
                start = time.perf_counter()
                batch = pipeline.run_batch(topics_for(count, f"Served {name}"), report_date=DATE,
                                           output_dir=scratch / "served", run_id=name, flyte_cache=False)
                wall = time.perf_counter() - start
        finally:
            here.send("stop")
            stats, timings = here.recv()
            child.join(timeout=30)
        # The longest chain: the slowest topic's refinement calls (one after another), then, after every topic
        # is refined, the slowest summary; each at the reply time the server actually waited.
        refine: dict[str, float] = {}
        for topic, role, delay in timings:
            if role != "summarizer":
                refine[topic] = refine.get(topic, 0.0) + delay
        critical = max(refine.values()) + max(delay for _, role, delay in timings if role == "summarizer")
        # With a budget, the batch cannot be faster than the burst plus one request per token after it.
        allowed = max(critical, (stats["completions"] - burst) / (rpm / 60)) if rpm else critical
        rows.append({
            "scenario": name, "topics": count, "rpm": rpm, "latency_s": latency, "jitter": jitter,
            "written": sum(1 for report in batch.reports if report.ok), "wall_s": round(wall, 2),
            "critical_path_s": round(critical, 2), "efficiency": round(critical / wall, 3),
            "allowed_s": round(allowed, 2), "wall_vs_allowed": round(wall / allowed, 2),
            "completions": stats["completions"], "responses_429": stats["rate_limited"],
            "share_429": round(stats["rate_limited"] / max(1, stats["requests"]), 3),
            "peak_in_flight": stats["peak_in_flight"], "paused_s": round(batch.pacing.paused_seconds, 2),
            "errors": sorted({report.error for report in batch.reports if report.error}),
        })
    return rows


def served_goal(row: dict, met: Any) -> tuple[str, str]:
    """The target of a served scenario, and whether it was met ("yes", "**no**", "-")."""
    if row["scenario"] == "unlimited":
        return f"efficiency >= {TARGETS['served_unlimited_efficiency']}", met("served_unlimited_efficiency")
    if row["scenario"] == "300rpm":
        marks = {met("served_300rpm_vs_budget"), met("served_300rpm_share_429")}
        reached = "**no**" if "**no**" in marks else "-" if "-" in marks else "yes"
        return (f"<= {TARGETS['served_300rpm_vs_budget']}x allowed, 429s <= "
                f"{TARGETS['served_300rpm_share_429']:.0%} of calls", reached)
    return "every topic written", "yes" if row["written"] == row["topics"] else "**no**"


def checks(results: dict, quick: bool) -> dict[str, dict]:
    efficiency = {row["topics"]: row["efficiency"] for row in results["fan_out"]}
    served = {row["scenario"]: row for row in results["served"]}
    found = {
        "efficiency_20": efficiency.get(20),
        "efficiency_100": efficiency.get(100),
        "overhead_ratio": results["overhead"]["flyte_vs_asyncio"],
        "rerun_speedup": results["cached_rerun"]["speedup"],
        "rss_mb_500": results["peak_rss_mb"],
        "served_unlimited_efficiency": served["unlimited"]["efficiency"],
        "served_300rpm_vs_budget": served["300rpm"]["wall_vs_allowed"],
        "served_300rpm_share_429": served["300rpm"]["share_429"],
    }
    out = {}
    for name, target in TARGETS.items():
        value = found[name]
        higher_is_better = name.startswith(("efficiency", "rerun")) or name.endswith("efficiency")
        met = None if value is None or quick else (value >= target if higher_is_better else value <= target)
        out[name] = {"value": value, "target": target, "met": met}
    out["served_every_topic_written"] = {
        "value": sum(row["written"] for row in results["served"]),
        "target": sum(row["topics"] for row in results["served"]),
        "met": all(row["written"] == row["topics"] for row in results["served"]),
    }
    out["rerun_makes_no_calls"] = {"value": results["cached_rerun"]["second_requests"], "target": 0,
                                   "met": results["cached_rerun"]["second_requests"] == 0}
    return out


def markdown_table(results: dict) -> str:
    lines = ["| measurement | configuration | result | target | met |", "|---|---|---|---|---|"]
    best = f"best of {results['config']['repeats']}"
    met = lambda name: {True: "yes", False: "**no**", None: "-"}[results["checks"][name]["met"]]  # noqa: E731
    for row in results["fan_out"]:
        name = f"efficiency_{row['topics']}"
        target = f">= {TARGETS[name]}" if name in TARGETS else ""
        lines.append(f"| fan-out efficiency (critical path / wall) | {row['topics']} topics, {row['calls']} calls at "
                     f"{row['latency_s']} s, {best} | {row['efficiency']:.3f} "
                     f"({row['critical_path_s']} s / {row['wall_s']} s) "
                     f"| {target} | {met(name) if name in TARGETS else '-'} |")
        lines.append(f"| same calls, plain asyncio (no Flyte) | {row['topics']} topics | "
                     f"{row['asyncio_efficiency']:.3f} "
                     f"({row['asyncio_critical_path_s']} s / {row['asyncio_wall_s']} s) | | |")
    overhead = results["overhead"]
    runs = overhead["runs"]
    lines.append(f"| per-topic time, Flyte + openai client | {overhead['topics']} topics, zero latency, {best} | "
                 f"{runs['flyte_and_client']['per_topic_ms']} ms | | |")
    lines.append(f"| per-topic time, Flyte + openai client, run history on | same calls | "
                 f"{runs['flyte_and_client_with_run_history']['per_topic_ms']} ms | | |")
    lines.append(f"| per-topic time, plain asyncio + openai client | same calls | "
                 f"{runs['asyncio_and_client']['per_topic_ms']} ms | | |")
    lines.append(f"| per-topic time, plain asyncio, no HTTP client | same calls | "
                 f"{runs['asyncio_without_client']['per_topic_ms']} ms | | |")
    lines.append(f"| Flyte overhead ratio (Flyte / plain asyncio, both with the client) | | "
                 f"{overhead['flyte_vs_asyncio']}x | <= {TARGETS['overhead_ratio']}x | {met('overhead_ratio')} |")
    lines.append(f"| Flyte's cost per action ({overhead['flyte_actions_per_topic']} actions per topic) | | "
                 f"{overhead['flyte_ms_per_action']} ms | | |")
    lines.append(f"| client layer ratio (with / without the openai client) | | "
                 f"{overhead['client_vs_no_client']}x | | |")
    lines.append(f"| run history ratio (Flyte with / without local run history) | | "
                 f"{overhead['run_history_vs_none']}x | | |")
    rerun = results["cached_rerun"]
    lines.append(f"| cached rerun speedup | {rerun['topics']} topics at {rerun['latency_s']} s, {best} | "
                 f"{rerun['speedup']}x "
                 f"({rerun['first_s']} s -> {rerun['second_s']} s) | >= {TARGETS['rerun_speedup']}x | "
                 f"{met('rerun_speedup')} |")
    lines.append(f"| model requests in the reruns | {rerun['rounds']} rounds | {rerun['second_requests']} (first runs: "
                 f"{rerun['first_requests']}) | 0 | {met('rerun_makes_no_calls')} |")
    for row in results["scaling"]:
        lines.append(f"| scaling, zero latency, {best} | {row['topics']} topics | {row['wall_s']} s, "
                     f"{row['per_topic_ms']} ms per topic | | |")
    lines.append(f"| peak memory (RSS) | {results['config']['rss_topics']} topics | {results['peak_rss_mb']} MB | "
                 f"<= {TARGETS['rss_mb_500']:.0f} MB | {met('rss_mb_500')} |")
    for row in results["served"]:
        limit = f"{row['rpm']:g} requests/min" if row["rpm"] else "no limit"
        where = f"{row['topics']} topics, {limit}, {row['latency_s']} s replies (jitter {row['jitter']})"
        goal, reached = served_goal(row, met)
        lines.append(f"| HTTP server, default settings | {where} | {row['written']}/{row['topics']} written in "
                     f"{row['wall_s']} s (chain {row['critical_path_s']} s: {row['efficiency']:.2f}; allowed "
                     f"{row['allowed_s']} s: {row['wall_vs_allowed']}x); {row['responses_429']} x 429 of "
                     f"{row['completions']} calls; waited {row['paused_s']} s; peak {row['peak_in_flight']} in "
                     f"flight | {goal} | {reached} |")
    fmt = results["formatting"]
    lines.append(f"| formatting: sequential vs gathered | one report, {fmt['latency_s']} s per call | "
                 f"{fmt['sequential_s']} s vs {fmt['gathered_s']} s ({fmt['speedup']}x) | | |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
    scale = results["scaling"]
    left.plot([r["topics"] for r in scale], [r["per_topic_ms"] for r in scale], marker="o")
    left.set(xscale="log", xlabel="topics in the batch", ylabel="ms per topic", title="Scaling at zero latency")
    fan = results["fan_out"]
    positions = range(len(fan))
    right.bar([x - 0.2 for x in positions], [r["efficiency"] for r in fan], width=0.4, color="#1f6feb",
              label="Flyte local run")
    right.bar([x + 0.2 for x in positions], [r["asyncio_efficiency"] for r in fan], width=0.4, color="#8c959f",
              label="plain asyncio")
    right.set_xticks(list(positions), [str(r["topics"]) for r in fan])
    right.legend(loc="upper right", fontsize="small")
    right.axhline(1.0, color="grey", linewidth=1)
    right.set(ylim=(0, 1.05), xlabel="topics", ylabel="critical path / wall time",
              title=f"Fan-out efficiency at {fan[0]['latency_s']} s per call")
    figure.tight_layout()
    figure.savefig(path, metadata={"Software": None})
    plt.close(figure)


def machine() -> dict:
    return {"python": platform.python_version(), "platform": platform.platform(terse=True),
            "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny configuration that runs in seconds")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks", help="where to write the results")
    parser.add_argument("--rss-probe", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    scratch = enter_scratch_project()
    from machinery.runtime import runtime

    if args.rss_probe:
        with runtime.configured(max_concurrency=args.rss_probe, reply_cache=None), \
                runtime.use_transport(logging_transport(CallLog(), 0.0)):
            run_with_flyte(topics_for(args.rss_probe, "Memory"))
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        return 0
    config = QUICK if args.quick else FULL
    started = time.perf_counter()
    results: dict[str, Any] = {"config": config, "machine": machine()}
    results["fan_out"] = fan_out_efficiency(config)
    results["overhead"] = orchestration_overhead(config)
    results["cached_rerun"] = cached_rerun(config, scratch)
    results["scaling"] = scaling(config)
    results["peak_rss_mb"] = peak_rss_mb(config["rss_topics"])
    results["formatting"] = formatting_fan_out(config)
    results["served"] = served(SERVED["quick" if args.quick else "full"], scratch)
    results["checks"] = checks(results, args.quick)
    results["seconds"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown_table(results)
    (args.out / "results.md").write_text(table)
    plot(results, args.out / "results.png")
    print(table)
    missed = [name for name, check in results["checks"].items() if check["met"] is False]
    print(f"{len(missed)} target(s) missed: {', '.join(missed)}" if missed else "All targets met.")
    shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
