"""Durable run output: ``<reports>/<run-id>/`` with a folder per topic, ``index.html`` and ``summary.json``.

``save_run`` builds the run folder beside its final name and moves it into
place at the end, so a crash leaves either the previous folder or the complete
new one. ``summary.json`` is deterministic for the same inputs: no clock, no
absolute paths; except ``totals.pacing``, which records how the server paced
this run (429s, seconds paused, the most requests in flight).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import html
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from machinery.files import atomic_write_text, claim_free_dir, replace_dir, slugify, staging_dir_for
from machinery.html_page import html_page
from machinery.model_client import Usage
from machinery.pacing import PaceStats

REPORT_FILES = ("report.md", "report.html", "summary.txt")


@dataclasses.dataclass
class BatchResult:
    """What a run produced, as data: widgets, tests and papermill all read this."""

    run_id: str
    run_dir: Path
    report_date: str
    model: str
    reports: list[Any]  # pipeline.TopicReport, one per topic, in the order given
    # Every model call this run made, a failed topic's and a failed attempt's too: requests sent, retries,
    # timeouts, cut-off replies, tokens, reply-cache hits. A Flyte cache hit makes no call.
    llm_usage: Usage
    cached_topics: list[str]
    flyte_run_name: str = ""  # where Flyte's local run history keeps this run
    pacing: PaceStats = dataclasses.field(default_factory=PaceStats)  # 429s, pauses, peak in flight
    # Models replies named other than ``model`` (a proxy renaming it, a server swapped mid-batch): usually none.
    reported_models: list[str] = dataclasses.field(default_factory=list)

    @property
    def index_path(self) -> Path:
        return self.run_dir / "index.html"

    @property
    def summary_path(self) -> Path:
        return self.run_dir / "summary.json"

    def folder(self, topic: str) -> Path:
        return self.run_dir / slugify(topic)

    def rows(self) -> list[dict[str, Any]]:
        """One plain dict per topic: topic, iterations, final score, tokens, error."""
        return [_summary_row(report, report.topic in self.cached_topics) for report in self.reports]


def _summary_row(report: Any, cached: bool) -> dict[str, Any]:
    result = report.result
    usage = (result.usage if result else Usage()) + (report.files.usage if report.files else Usage())
    return {
        "topic": report.topic,
        "slug": report.slug,
        "status": "ok" if report.ok else "error",
        "iterations": result.iterations if result else 0,
        "final_score": result.final_score if result else None,
        "score_history": [r.score for r in result.history] if result else [],
        "improvements_history": [r.improvements for r in result.history] if result else [],
        "cached": cached,
        "usage": usage.model_dump() | {"total_tokens": usage.total_tokens},
        "files": {name: f"{report.slug}/{name}" for name in REPORT_FILES} if report.files else {},
        "error": report.error,
    }


def format_index_html(batch: BatchResult) -> str:
    rows = []
    for row in batch.rows():
        topic = f"<bdi>{html.escape(row['topic'])}</bdi>"
        link = f'<a href="{html.escape(row["slug"])}/report.html">{topic}</a>' if row["files"] else topic
        score = "" if row["final_score"] is None else f"{row['final_score']}/10"
        error = html.escape(row["error"] or "")
        rows.append(
            f"<tr><td>{link}</td><td>{score}</td><td>{row['iterations']}</td>"
            f"<td>{row['usage']['total_tokens']}</td><td>{error}</td></tr>"
        )
    ok = sum(1 for report in batch.reports if report.ok)
    body = (
        f"<header>\n<h1>Reports: run {html.escape(batch.run_id)}</h1>\n"
        f"<p>{html.escape(batch.report_date)} · {html.escape(batch.model)} · "
        f"{ok} of {len(batch.reports)} topics succeeded</p>\n</header>\n<main>\n<table>\n"
        "<thead><tr><th>Topic</th><th>Score</th><th>Rounds</th><th>Tokens</th><th>Error</th></tr></thead>\n"
        f"<tbody>\n{chr(10).join(rows)}\n</tbody>\n</table>\n</main>\n"
    )
    return html_page(f"Reports: run {batch.run_id}", body)


def summary_document(batch: BatchResult) -> dict[str, Any]:
    """summary.json: deterministic for the same inputs (no clock, no absolute paths), but for ``totals.pacing``."""
    return {
        "run_id": batch.run_id,
        "report_date": batch.report_date,
        "model": batch.model,
        "reported_models": batch.reported_models,
        "topics": batch.rows(),
        "totals": {
            "topics": len(batch.reports),
            "succeeded": sum(1 for r in batch.reports if r.ok),
            "failed": sum(1 for r in batch.reports if not r.ok),
            "cached": len(batch.cached_topics),
            "llm_usage": batch.llm_usage.model_dump() | {"total_tokens": batch.llm_usage.total_tokens},
            "pacing": batch.pacing.as_dict(),
        },
    }


def missing_files(reports: Sequence[Any]) -> list[Any]:
    """The reports whose files folder is gone: a cache hit can name a folder deleted since it was written."""
    return [r for r in reports if r.files is not None and not Path(r.files.folder.path).is_dir()]


def save_run(batch: BatchResult, replace: bool = True) -> BatchResult:
    """Copy every report into ``<run_dir>/<slug>/`` with an index, atomically; return the batch as saved.

    ``replace=False`` (a run named by the time): an existing ``run_dir`` is another run's, started in the same
    second, and is kept; this one is saved as ``<run_id>-2`` (``-3``...), the first name free.
    """
    if replace:
        _write(batch, replace_dir)
        return batch
    while True:
        claimed = claim_free_dir(batch.run_dir)
        saved = dataclasses.replace(batch, run_id=claimed.name, run_dir=claimed)
        try:
            _write(saved, _move_into_claim)
            return saved
        except _Taken:  # a run named like this one (--run-id) moved in first: it stays, this one takes the next name
            continue
        finally:
            with contextlib.suppress(OSError):  # only while empty: never a saved run's folder
                os.rmdir(claimed)


class _Taken(Exception):
    """The folder claimed for a run was filled by another run before this one moved in."""


def _move_into_claim(staging: Path, claimed: Path) -> None:
    try:
        os.replace(staging, claimed)  # onto the empty folder claimed, in one step
    except OSError as error:
        if error.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise _Taken from error
        raise


def _write(batch: BatchResult, move: Callable[[Path, Path], None]) -> None:
    """Build the run folder aside, then ``move`` it to ``batch.run_dir``; a failure leaves no staging folder."""
    staging = None
    try:
        staging = staging_dir_for(batch.run_dir)
        for report in batch.reports:
            if report.files is None:
                continue
            # A copy here; a download on a cluster. With no destination, Flyte 2.12 would leave an
            # empty temporary folder behind per call.
            report.files.folder.download_sync(staging / report.slug)
        atomic_write_text(staging / "index.html", format_index_html(batch))
        atomic_write_text(
            staging / "summary.json", json.dumps(summary_document(batch), indent=2, ensure_ascii=False) + "\n"
        )
        move(staging, batch.run_dir)
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise
