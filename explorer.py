"""Views for the notebooks: source slices, tables, charts, safe HTML previews, the
interactive ``ReportExplorer`` and ``run_tree`` (a run's tasks, groups and traced calls,
from Flyte's local run history); and ``ExplorerApp``, the explorer as a web app (apps/).

Nothing here computes a result: every function takes what ``pipeline`` returned
and shows it. All text that came from a model or a user is escaped before it
reaches HTML, because live JupyterLab runs event handlers in HTML outputs, and
every topic shown in HTML sits in ``<bdi>``, so a right-to-left topic keeps its order.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import dataclasses
import datetime as dt
import html
import io
import json
import os
import re
import sqlite3
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pipeline
from machinery.inputs import coerce_topics, validate_batch
from machinery.model_client import BackendUnavailable, Usage
from machinery.run_output import REPORT_FILES
from machinery.settings import PROJECT_ROOT

# --------------------------------------------------------------------------- source slices

_FRAGMENT = r"# \{{\{{docs-fragment {name}\}}\}}\n(.*?)# \{{\{{/docs-fragment {name}\}}\}}"


def fragment(name: str) -> str:
    """The exact source between ``# {{docs-fragment name}}`` markers in pipeline.py."""
    source = Path(pipeline.__file__).read_text(encoding="utf-8")
    match = re.search(_FRAGMENT.format(name=re.escape(name)), source, flags=re.DOTALL)
    if match is None:
        raise KeyError(f"no docs-fragment named {name!r} in pipeline.py")
    return match.group(1).strip("\n")


class Source:
    """A code listing that renders as highlighted Markdown in Jupyter and as plain text elsewhere."""

    def __init__(self, code: str, title: str = "") -> None:
        self.code, self.title = code, title

    def _repr_markdown_(self) -> str:
        heading = f"**{self.title}**\n\n" if self.title else ""
        return f"{heading}```python\n{self.code}\n```"

    def __repr__(self) -> str:
        return f"{self.title}\n{self.code}" if self.title else self.code


def show_source(name: str) -> Source:
    """``show_source("formatters")``: the ``formatters`` fragment of pipeline.py."""
    return Source(fragment(name), f"pipeline.py, fragment `{name}`")


# --------------------------------------------------------------------------- tables


class Table:
    """A small table: escaped HTML in Jupyter, aligned text in plain outputs and tests."""

    def __init__(self, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        self.columns = list(columns)
        self.rows = [["" if cell is None else str(cell) for cell in row] for row in rows]

    CELL = 'style="text-align: left; padding: 0.15em 0.9em 0.15em 0; vertical-align: top"'

    def _repr_html_(self) -> str:
        head = "".join(f"<th {self.CELL}>{html.escape(c)}</th>" for c in self.columns)
        # <bdi>: a right-to-left cell (an Arabic or Hebrew topic) keeps its own direction and order.
        body = "".join(
            "<tr>" + "".join(f"<td {self.CELL}><bdi>{html.escape(cell)}</bdi></td>" for cell in row) + "</tr>"
            for row in self.rows
        )
        return f'<table style="border-collapse: collapse"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'

    def __repr__(self) -> str:
        widths = [max(len(c), *(len(r[i]) for r in self.rows)) if self.rows else len(c)
                  for i, c in enumerate(self.columns)]
        line = lambda cells: "  ".join(cell.ljust(w) for cell, w in zip(cells, widths)).rstrip()  # noqa: E731
        return "\n".join([line(self.columns), line(["-" * w for w in widths]), *map(line, self.rows)])


def results_table(batch: pipeline.BatchResult) -> Table:
    """Topic, rounds, final score, tokens and error for every topic of a batch."""
    return rows_table(batch.rows())


def rows_table(rows: Iterable[dict[str, Any]]) -> Table:
    """The same for rows as ``BatchResult.rows()`` gives them, possibly from several runs."""
    return Table(
        ["topic", "iterations", "final score", "scores", "tokens", "error"],
        [
            [
                row["topic"],
                row["iterations"],
                "" if row["final_score"] is None else f"{row['final_score']}/10",
                " → ".join(map(str, row["score_history"])),
                row["usage"]["total_tokens"],
                row["error"] or "",
            ]
            for row in rows
        ],
    )


# --------------------------------------------------------------------------- HTML previews


class SafeHTML:
    """HTML that we built ourselves around escaped content."""

    def __init__(self, markup: str, text: str) -> None:
        self.markup, self.text = markup, text

    def _repr_html_(self) -> str:
        return self.markup

    def __repr__(self) -> str:
        return self.text


def preview(page: str, height: int = 420, label: str = "HTML preview") -> SafeHTML:
    """Show a generated page in a sandboxed iframe: no script in it can run, whatever it contains."""
    frame = (
        f'<iframe sandbox="" title="{html.escape(label)}" srcdoc="{html.escape(page, quote=True)}" '
        f'style="width: 100%; height: {int(height)}px; border: 1px solid #d0d7de; border-radius: 4px;"></iframe>'
    )
    return SafeHTML(frame, f"[{label}: {len(page)} characters of HTML in a sandboxed iframe]")


# --------------------------------------------------------------------------- paths and charts


def shown_path(path: Path) -> str:
    """A path relative to the project when it is inside it: no machine-specific prefixes in outputs."""
    try:
        return Path(path).resolve().relative_to(PROJECT_ROOT).as_posix()
    except ValueError:
        return str(path)


def jupyter_server() -> dict[str, Any] | None:
    """The root folder and base URL of the Jupyter server that started this kernel, or None.

    A server writes ``jpserver-<pid>.json`` in Jupyter's runtime folder, and a kernel it starts is its
    child: so the file named after our parent process is our server's. Only ``root_dir`` and
    ``base_url`` are read from it. None under nbclient, papermill, VS Code or a plain Python process.
    """
    try:
        from jupyter_core.paths import jupyter_runtime_dir

        info = json.loads((Path(jupyter_runtime_dir()) / f"jpserver-{os.getppid()}.json").read_text(encoding="utf-8"))
        return {"root": Path(info["root_dir"]).expanduser().resolve(), "base_url": str(info.get("base_url") or "/")}
    except (ImportError, OSError, ValueError, KeyError, TypeError):
        return None


def file_href(path: Path, server: dict[str, Any] | None = None) -> str | None:
    """A URL a browser can open ``path`` at from this notebook, or None when there is none.

    Under a Jupyter server (``jupyter_server()``), any file inside its root folder is served at
    ``<base_url>files/<path from the root>``. Elsewhere only what lies below the working directory is
    reachable, by a relative link. A folder outside the server's root is never served, so no link
    to it would work: show where it is instead (``shown_path``).
    """
    path = Path(path).resolve()
    if server is not None:
        if not path.is_relative_to(server["root"]):
            return None
        relative = path.relative_to(server["root"]).as_posix()
        return server["base_url"].rstrip("/") + "/files/" + urllib.parse.quote(relative)
    if not path.is_relative_to(Path.cwd().resolve()):
        return None
    return urllib.parse.quote(path.relative_to(Path.cwd().resolve()).as_posix())


def files_html(files: Sequence[tuple[str, Path]], folder: Path, server: dict[str, Any] | None = None) -> str:
    """A list of links, one per (label, path); where they cannot be opened, ``folder``'s path as text instead."""
    hrefs = [file_href(path, server) for _, path in files]
    if all(hrefs):
        return "<ul>" + "".join(
            f'<li><a href="{html.escape(href)}" target="_blank" rel="noopener">{html.escape(label)}</a></li>'
            for (label, _), href in zip(files, hrefs)
        ) + "</ul>"
    return (f"<p>In <code>{html.escape(shown_path(folder))}</code>, outside the folder Jupyter serves, "
            "so a browser cannot open them from here:</p><ul>"
            + "".join(f"<li><code>{html.escape(label)}</code></li>" for label, _ in files) + "</ul>")


def score_chart(histories: dict[str, list[int]], threshold: int | None = None, title: str = "Score per round"):
    """A line per topic: the critic's score after each round."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 3.6), dpi=100)
    for topic, scores in histories.items():
        label = topic if len(topic) <= 40 else topic[:39] + "…"
        axes.plot(range(1, len(scores) + 1), scores, marker="o", label=label)
    if threshold is not None:
        axes.axhline(threshold, color="grey", linestyle="--", linewidth=1, label=f"threshold {threshold}")
    rounds = max([1, *(len(scores) for scores in histories.values())])
    axes.set(xlabel="round", ylabel="critic score", ylim=(0, 10.5), xlim=(0.5, rounds + 0.5), title=title)
    axes.set_xticks(range(1, rounds + 1))  # whole rounds only, also for a single point
    axes.legend(fontsize="small", loc="lower right")
    figure.tight_layout()
    plt.close(figure)  # returned, not auto-displayed twice
    return figure


# --------------------------------------------------------------------------- the interactive explorer

STEP_LABELS = {
    "waiting": "waiting",
    "draft": "writing the draft",
    "critique": "critique",
    "scored": "scored",
    "revise": "revising",
    "format": "formatting",
    "done": "done",
    "error": "failed",
    # A model call's waits (machinery/model_client.py): shown in the step column until the next step.
    "retrying": "retrying the {call} (attempt {attempt})",
    "still-waiting": "waiting for the model (over {seconds:g} s)",  # sent once per call: "over", not a count
    "timed-out": "the {call} timed out",
    "cut-off": "the {call} was cut off",
    "gave-up": "the {call} failed after {attempts} attempts: Flyte retries the task if it has a retry left",
}


def step_label(event: dict[str, Any]) -> str:
    """What the step column shows for ``event``: its label, filled in from the event."""
    return STEP_LABELS.get(event["step"], event["step"]).format_map(event)


def topic_steps(max_iterations: int) -> int:
    """The steps of one topic the progress bar counts: the draft, a critique per round, a revision
    between rounds, and the formatting: ``2 * max_iterations + 1``."""
    return 2 * max_iterations + 1


def steps_done(event: dict[str, Any], max_iterations: int) -> int | None:
    """How many of a topic's ``topic_steps`` are finished when ``event`` arrives (None: not a step).

    A progress event says what starts: ``critique`` in round i means the draft and the rounds
    before it are finished. A topic that reaches the threshold early skips the rounds it does not
    need, so ``format`` counts every refinement step as done, and ``done``/``error`` all of them.
    """
    step, round_ = event.get("step"), int(event.get("iteration") or 1)
    if step == "draft":
        return 0
    if step == "critique":
        return 2 * round_ - 1
    if step in ("scored", "revise"):
        return 2 * round_
    if step == "format":
        return 2 * max_iterations
    if step in ("done", "error"):
        return topic_steps(max_iterations)
    return None


class ReportExplorer:
    """Type topics, press Run, watch each topic move through the loop, browse the results.

    A view only: ``run`` (what the Run button calls) validates the input, calls
    ``pipeline.run_batch`` with a progress listener, and shows the returned
    ``BatchResult``. A notebook cell can call ``run`` directly and gets the same
    result, so headless runs exercise the same path as a click. The button passes
    the box's text as a list, one topic per line (``box_topics``), so a click is
    ``run(box_topics(ui.topics_box.value), rounds, threshold)``.
    """

    def __init__(self, topics: Sequence[str] = (), max_iterations: int = 3, quality_threshold: int = 8, *,
                 report_date: str | None = None, output_dir: str | Path | None = None,
                 run_id: str = "explorer") -> None:
        import ipywidgets as widgets

        self.report_date, self.output_dir, self.run_id = report_date, output_dir, run_id
        self.server = jupyter_server()  # where file links point; None: relative links below the working folder
        self._runs = 0
        self.last_batch: pipeline.BatchResult | None = None
        self.events: list[dict[str, Any]] = []
        self.progress_rows: dict[str, dict[str, Any]] = {}
        self._rounds = max_iterations  # of the run in progress: the progress bar's scale
        # topic -> its latest outcome, the run folder holding it, and its row of BatchResult.rows()
        self.results: dict[str, tuple[pipeline.TopicReport, Path, dict[str, Any]]] = {}

        self.topics_box = widgets.Textarea(value="\n".join(topics), placeholder="One topic per line",
                                           description="Topics", layout=widgets.Layout(width="32rem", height="7rem"))
        self.iterations = widgets.IntSlider(value=max_iterations, min=1, max=10, description="Max rounds")
        self.threshold = widgets.IntSlider(value=quality_threshold, min=1, max=10, description="Threshold")
        self.backend = widgets.HTML(f"<small>Using the {html.escape(pipeline.runtime.settings.describe())}</small>")
        self.run_button = widgets.Button(description="Run", button_style="primary", icon="play",
                                         tooltip="Generate reports for these topics")
        self.message = widgets.HTML()
        self.progress = widgets.IntProgress(value=0, min=0, max=1, description="0 / 0",
                                            layout=widgets.Layout(width="32rem"))
        self.progress_table = widgets.HTML()
        self.results_note = widgets.HTML()  # which run the results below come from
        self.results_table = widgets.HTML()
        self.choice = widgets.Dropdown(description="Report", options=[], layout=widgets.Layout(width="32rem"))
        self.summary_view, self.report_view = widgets.HTML(), widgets.HTML()
        self.preview_view, self.history_view, self.files_view = widgets.HTML(), widgets.HTML(), widgets.HTML()
        self.tabs = widgets.Tab(
            children=[self.summary_view, self.report_view, self.preview_view, self.history_view, self.files_view],
            titles=("Summary", "Report", "HTML preview", "Critique history", "Files"),
        )
        self.run_button.on_click(self._clicked)
        self.choice.observe(lambda change: self._show(change["new"]), names="value")
        self.widget = widgets.VBox([
            widgets.HTML("<b>Report explorer</b>"),
            self.topics_box,
            widgets.HBox([self.iterations, self.threshold]),
            widgets.HBox([self.run_button, self.backend]),
            self.message,
            self.progress,
            self.progress_table,
            self.results_note,
            self.results_table,
            self.choice,
            self.tabs,
        ])

    # ------------------------------------------------------------------ how it looks where widgets don't run

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        """The widget, plus text and HTML for places that show a saved notebook without running it
        (GitHub, nbviewer, an untrusted notebook): what it was set up with and the last run's results."""
        render = getattr(self.widget, "_repr_mimebundle_", None)
        bundle = dict(render(**kwargs) or {}) if callable(render) else {}
        bundle["text/plain"] = self.__repr__()
        bundle["text/html"] = self._static_html()
        return bundle

    def _setup(self) -> tuple[list[str], str]:
        topics = box_topics(self.topics_box.value)
        return topics, (f"{len(topics)} topic{'s' * (len(topics) != 1)}, up to {self.iterations.value} "
                        f"round{'s' * (self.iterations.value != 1)}, threshold {self.threshold.value}")

    def _last_run(self) -> str:
        batch = self.last_batch
        if batch is None:
            return "No run yet: press Run, or call .run(topics)."
        succeeded = sum(report.ok for report in batch.reports)
        return (f"Last run {batch.run_id}: {succeeded} of {len(batch.reports)} topics succeeded; "
                f"reports in {shown_path(batch.run_dir)}")

    def __repr__(self) -> str:
        topics, setup = self._setup()
        lines = [f"Report explorer (interactive in JupyterLab with a running kernel): {setup}", self._last_run()]
        if self.last_batch is not None:
            lines += ["", repr(results_table(self.last_batch))]
        return "\n".join(lines)

    def _static_html(self) -> str:
        topics, setup = self._setup()
        listed = "".join(f"<li><bdi>{html.escape(topic)}</bdi></li>" for topic in topics)
        table = "" if self.last_batch is None else results_table(self.last_batch)._repr_html_()
        return (f"<p><b>Report explorer</b> (interactive in JupyterLab with a running kernel): "
                f"{html.escape(setup)}</p><ul>{listed}</ul><p>{html.escape(self._last_run())}</p>{table}")

    # ------------------------------------------------------------------ running

    def run(self, topics: Any, max_iterations: int | None = None,
            quality_threshold: int | None = None) -> pipeline.BatchResult:
        """Run the batch with live progress and show the results; raise ValueError on bad input.

        The topics are checked first, with the check ``run_batch`` makes, so the progress bar knows
        every topic before the first event. ``run_batch`` checks the backend; its error is shown here
        too. After any error, the results on screen are marked as an earlier run's.
        """
        max_iterations = self.iterations.value if max_iterations is None else max_iterations
        quality_threshold = self.threshold.value if quality_threshold is None else quality_threshold
        self.message.value = ""
        self.progress_rows = {}
        self._refresh_progress()
        if self.results:
            self._note("Running: the results below are from earlier runs until this one finishes.")
        self.run_button.disabled = True
        try:
            checked = validate_batch(coerce_topics(topics), max_iterations, quality_threshold)
            self._rounds = max_iterations
            self.progress_rows = {topic: {"step": STEP_LABELS["waiting"], "iteration": "", "score": "",
                                          "error": "", "done": 0} for topic in checked}
            self._refresh_progress()
            run_id = self.run_id if self._runs == 0 else f"{self.run_id}-{self._runs + 1}"
            batch = pipeline.run_batch(
                checked, max_iterations=max_iterations, quality_threshold=quality_threshold,
                report_date=self.report_date, output_dir=self.output_dir, run_id=run_id, on_event=self._on_event,
            )
            self._finished(batch)
        except BaseException as error:
            self._failed(error)
            raise
        finally:
            self.run_button.disabled = False  # last, so an enabled button means everything is shown
        return batch

    def _finished(self, batch: pipeline.BatchResult) -> None:
        self._runs += 1
        self.last_batch = batch
        for report, row in zip(batch.reports, batch.rows()):
            self.results[report.topic] = (report, batch.run_dir, row)
            progress = self.progress_rows.setdefault(report.topic, {"iteration": "", "done": 0})
            progress.update(step="done" if report.ok else "failed", error=report.error or "",
                            score=report.result.final_score if report.result else "", done=topic_steps(self._rounds))
        self._refresh_progress()
        self._refresh_results(select=batch.reports[0].topic)
        earlier = len(self.results) - len(batch.reports)
        self._note(f"Results of run {batch.run_id}"
                   + (f", and of {earlier} topic{'s' * (earlier != 1)} from earlier runs" if earlier else "") + ".")
        succeeded = sum(report.ok for report in batch.reports)
        self.message.value = html.escape(
            f"Finished: {succeeded} of {len(batch.reports)} topics succeeded; reports in {shown_path(batch.run_dir)}")

    def _failed(self, error: BaseException) -> None:
        """Say what went wrong, and that nothing on screen comes from this run."""
        expected = isinstance(error, (ValueError, BackendUnavailable))  # bad input, or no model: nothing ran
        shown = str(error) if expected else f"The run failed: {type(error).__name__}: {error}"
        self.message.value = f'<span style="color:#cf222e">{html.escape(shown)}</span>'
        if expected:
            self.progress_rows = {}
            self._refresh_progress()
        if self.results:
            self._note("The last Run failed (see above), so nothing below comes from it: "
                       "these are the results of earlier runs.")

    # The last run a click started: when it ended (time.monotonic()) and what it ran (``click_inputs``). A class
    # default, so that before any run no click counts as queued (``queued_click``; the app's cluster Run uses it too).
    _click_run: tuple[float, tuple[list[str], int, int] | None] = (float("-inf"), None)

    def _clicked(self, _button: Any) -> None:
        if queued_click(self):  # the second click of a double-click: see QUEUED_CLICK_SECONDS
            return
        inputs = click_inputs(self)
        try:
            # A bad input is already shown in the message line, where a person is looking.
            with contextlib.suppress(ValueError, BackendUnavailable):
                self.run(*inputs)
        finally:
            self._click_run = (time.monotonic(), inputs)

    def _on_event(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        if event["topic"] is None and event["step"] == "other-model":  # about the whole batch
            self.message.value = html.escape(
                f"The server answered as model {event['reported']}, not {event['recorded']} (see summary.json)")
            return
        if event["topic"] is None:  # about the whole batch: the server's rate limit holds every request
            self.message.value = html.escape(
                f"Waiting {event.get('seconds', 0):.1f} s for the server's rate limit ({event.get('reason', '')})")
            return
        row = self.progress_rows.setdefault(
            event["topic"], {"step": "", "iteration": "", "score": "", "error": "", "done": 0})
        row["step"] = step_label(event)
        row["iteration"] = event.get("iteration", row["iteration"])
        row["score"] = event.get("score", row["score"])
        row["error"] = event.get("error", row["error"])
        done = steps_done(event, self._rounds)
        if done is not None:
            row["done"] = max(row["done"], done)  # a retried task starts again: the bar never goes back
        self._refresh_progress()

    # ------------------------------------------------------------------ showing

    def _note(self, text: str) -> None:
        self.results_note.value = f"<small><i>{html.escape(text)}</i></small>" if text else ""

    def _refresh_progress(self) -> None:
        rows = self.progress_rows.values()
        finished = sum(1 for row in rows if row["step"] in ("done", "failed"))
        self.progress.max = max(1, len(self.progress_rows) * topic_steps(self._rounds))
        self.progress.value = min(self.progress.max, sum(row["done"] for row in rows))
        self.progress.description = f"{finished} / {len(self.progress_rows)}"
        self.progress_table.value = Table(
            ["topic", "step", "round", "latest score", "error"],
            [[t, r["step"], r["iteration"], r["score"], r["error"]] for t, r in self.progress_rows.items()],
        )._repr_html_()

    def _refresh_results(self, select: str | None = None) -> None:
        table = rows_table(row for _, _, row in self.results.values())
        # Which run each row comes from: the results of several runs are shown together.
        table.columns.insert(1, "run")
        for cells, (_, run_dir, _) in zip(table.rows, self.results.values()):
            cells.insert(1, run_dir.name)
        self.results_table.value = table._repr_html_()
        self.choice.options = list(self.results)
        if select is not None:
            self.choice.value = select
            self._show(select)

    def _show(self, topic: str | None) -> None:
        if not topic or topic not in self.results:
            return
        report, run_dir, _ = self.results[topic]
        folder = run_dir / report.slug
        if not report.ok or report.result is None:
            failure = (f'<p style="color:#cf222e">This topic failed: '
                       f'<bdi>{html.escape(report.error or "")}</bdi></p>')
            self.summary_view.value = self.report_view.value = self.preview_view.value = failure
            self.files_view.value = failure
        else:
            summary = (folder / "summary.txt").read_text(encoding="utf-8")
            self.summary_view.value = "".join(f"<p>{html.escape(p)}</p>" for p in summary.split("\n\n") if p.strip())
            self.report_view.value = pipeline.render_markdown(report.result.markdown)
            self.preview_view.value = preview((folder / "report.html").read_text(encoding="utf-8")).markup
            files = [(name, folder / name) for name in REPORT_FILES] + [("index.html", run_dir / "index.html")]
            self.files_view.value = (f"<p>Run {html.escape(run_dir.name)}, topic <bdi>{html.escape(topic)}</bdi>:</p>"
                                     + files_html(files, run_dir, self.server))
        self.history_view.value = _history_html(report)


def _history_html(report: pipeline.TopicReport) -> str:
    if report.result is None:
        return "<p>No critique was recorded.</p>"
    history = report.result.history
    figure = score_chart({report.topic: [r.score for r in history]}, title="Score per round")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    image = base64.b64encode(buffer.getvalue()).decode()
    rounds = "".join(
        f"<li><b>Round {r.iteration}: {r.score}/10.</b> "
        + (" ".join(html.escape(item) for item in r.improvements) or "No further improvements asked for.")
        + "</li>"
        for r in history
    )
    return f'<img alt="score per round" src="data:image/png;base64,{image}" style="max-width: 100%"><ol>{rounds}</ol>'


# --------------------------------------------------------------------------- the run tree


def run_history_path() -> Path:
    """Flyte's local run history, found as Flyte finds it: ``local-cache/cache.db`` beside the config
    file Flyte discovers (``.flyte/config.yaml`` here or at the git root, ...), else in ``~/.flyte``."""
    import flyte.config

    source = flyte.config.auto().source
    base = Path(source).parent if source else Path("~/.flyte").expanduser()
    return (base / "local-cache" / "cache.db").resolve()


# Flyte 2.12 records the group of a sub-task (refine_all, format_all) but not the group of a traced
# call, so the groups inside a task are put back from pipeline.py: task -> (group name, the traced
# call that opens the next one, the traced calls inside it). tests/test_explorer.py checks these
# against the `with flyte.group(...)` blocks of pipeline.py.
TRACED_GROUPS: dict[str, tuple[str, str, frozenset[str]]] = {
    "refine_report": ("refinement_{n}", "critique_draft", frozenset({"critique_draft", "revise_draft"})),
    "format_outputs": ("formatting", "summarize_report", frozenset({"summarize_report"})),
}

_WORST_FIRST = ("failed", "running", "succeeded")


@dataclasses.dataclass(eq=False)
class Node:
    """One line of a run tree: a task, a group or a traced call."""

    kind: str  # "task", "group" or "trace"
    name: str  # the task's short name, the group's name or the traced function's name
    status: str = ""  # succeeded, failed, running; a group's is its worst member's
    detail: str = ""  # the topic a task works on
    note: str = ""  # "cache hit", "2 attempts", or the error, shortened
    error: str = ""  # the whole error (the HTML shows it on hover)
    number: int = 0  # 1, 2, ... when siblings share a label; 0 otherwise
    children: list[Node] = dataclasses.field(default_factory=list)
    start: float = 0.0  # orders siblings; never shown
    end: float | None = None

    @property
    def label(self) -> str:
        text = self.name + (f": {self.detail}" if self.detail else "") + (f" #{self.number}" if self.number else "")
        return f"{text} (group)" if self.kind == "group" else text

    @property
    def outcome(self) -> str:
        return self.status + (f", {self.note}" if self.note else "")

    def walk(self, depth: int = 0) -> Iterator[tuple[int, Node]]:
        """This node and every node below it, depth first, with its depth."""
        yield depth, self
        for child in self.children:
            yield from child.walk(depth + 1)

    def child(self, label: str) -> Node:
        """The child whose label is ``label``."""
        for child in self.children:
            if child.label == label:
                return child
        raise KeyError(f"{self.label!r} has no child {label!r}; it has {[c.label for c in self.children]}")


class Tree:
    """A run's actions as an indented tree: text in plain outputs and tests, escaped HTML in Jupyter."""

    def __init__(self, root: Node, run_name: str = "") -> None:
        self.root, self.run_name = root, run_name  # the run name is kept, never shown: it differs every run

    def find(self, *labels: str) -> Node:
        """The node reached from the root by these labels, e.g. ``find("refine_all (group)", ...)``."""
        node = self.root
        for label in labels:
            node = node.child(label)
        return node

    def lines(self) -> list[tuple[str, Node]]:
        """(the tree-drawing prefix, the node) for every line, in order."""
        lines: list[tuple[str, Node]] = [("", self.root)]

        def add(node: Node, indent: str) -> None:
            for position, child in enumerate(node.children):
                last = position == len(node.children) - 1
                lines.append((indent + ("└─ " if last else "├─ "), child))
                add(child, indent + ("   " if last else "│  "))

        add(self.root, "")
        return lines

    def __repr__(self) -> str:
        lines = [(prefix + node.label, node.outcome) for prefix, node in self.lines()]
        width = max(len(left) for left, _ in lines) + 2
        return "\n".join((left.ljust(width) + right).rstrip() for left, right in lines)

    COLOURS = {"succeeded": "#1a7f37", "failed": "#cf222e", "running": "#9a6700"}

    def _repr_html_(self) -> str:
        def item(node: Node) -> str:
            name = html.escape(node.name) + (f" #{node.number}" if node.number else "")
            name = f"<i>{name}</i> <small>(group)</small>" if node.kind == "group" else (
                f"<b>{name}</b>" if node.kind == "task" else name)
            detail = f": <bdi>{html.escape(node.detail)}</bdi>" if node.detail else ""
            colour = self.COLOURS.get(node.status, "#59636e")
            title = f' title="{html.escape(node.error)}"' if node.error else ""
            outcome = f' <span style="color:{colour}"{title}>{html.escape(node.outcome)}</span>'
            children = "".join(item(child) for child in node.children)
            nested = f'<ul style="{self.LIST}">{children}</ul>' if children else ""
            return f"<li>{name}{detail}{outcome}{nested}</li>"

        return f'<ul class="run-tree" style="list-style: none; margin: 0; padding: 0">{item(self.root)}</ul>'

    LIST = "list-style: none; margin: 0; padding-left: 1.4em; border-left: 1px solid #d0d7de"


def run_tree(run: Any, database: str | Path | None = None) -> Tree:
    """The actions of one run from Flyte's local run history, as a tree like a cluster's UI shows.

    ``run`` is a ``BatchResult`` (``batch.flyte_run_name``), what ``flyte.run`` returned (its
    ``url`` ends in the run's name) or a run name. The run must have been made with the history
    on (``pipeline.runtime.configure(run_history=True)``). ``database``: Flyte's ``cache.db``,
    found as Flyte finds it when not given (``run_history_path``).

    What Flyte 2.12 records, locally, in the ``runs`` table (one row per action):

    * ``a0``, the run itself (``parent_id`` NULL, ``task_name`` the task that was run), and the
      action that ran that task (``parent_id`` 'a0', the same ``task_name``, ``short_name`` e.g.
      ``report_batch_pipeline``). The tree shows the two as one line.
    * a row per sub-task (``task_name`` 'llm-worker.refine_report', ``short_name`` 'refine_report'),
      its ``group_name`` ('refine_all', 'format_all'), its JSON ``inputs``, ``cache_hit`` and
      ``attempt_count`` (0 on a cache hit). Every sub-task has ``parent_id`` 'a0', whichever task
      called it: locally the driver is the only task that calls tasks, so they go under it.
    * a row per traced call (``task_name`` the function's name, no ``short_name``, no
      ``group_name``), its ``parent_id`` the task it ran in, even when another traced call made it
      (``call_llm`` inside ``critique_draft``): a call is put under the traced call whose start and
      end enclose it. Groups of traced calls are put back from ``TRACED_GROUPS``.
    * ``status`` 'running', 'succeeded' or 'failed', ``error`` for a failure, ``start_time`` and
      ``end_time`` in seconds: they order the tree, and are not shown. Action names are random and
      are never shown either: sub-tasks are named by their topic, and siblings that would share a
      label are numbered in the order they started (``call_llm #1``, ``call_llm #2``).
    """
    name = _run_name(run)
    path = Path(database) if database is not None else run_history_path()
    rows = _read_actions(path, name)
    if not rows:
        raise LookupError(
            f"Flyte's run history at {shown_path(path)} has no run named {name!r}: turn the history on "
            "(pipeline.runtime.configure(run_history=True)) before the run, then run it again")
    return Tree(_build_tree(rows), name)


def _run_name(run: Any) -> str:
    if isinstance(run, str):
        return run
    if isinstance(getattr(run, "flyte_run_name", None), str):
        return run.flyte_run_name
    if isinstance(getattr(run, "url", None), str):
        return Path(run.url).name  # locally, a run's url is its metadata folder, named after the run
    raise TypeError(f"run_tree needs a BatchResult, a flyte.run result or a run name, not {type(run).__name__}")


_COLUMNS = ("action_name", "task_name", "parent_id", "group_name", "short_name", "status", "error", "inputs",
            "cache_hit", "attempt_count", "start_time", "end_time")


def _read_actions(path: Path, run_name: str) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
        try:
            rows = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM runs WHERE run_name = ?", (run_name,)).fetchall()
        except sqlite3.OperationalError:  # no runs table: the history was never on
            return []
    return [dict(zip(_COLUMNS, row)) for row in rows]


def _build_tree(rows: list[dict[str, Any]]) -> Node:
    children: dict[str, list[dict[str, Any]]] = {}
    run = next((row for row in rows if row["parent_id"] is None), None)
    for row in rows:
        if row is not run:
            children.setdefault(row["parent_id"], []).append(row)
    if run is None:  # only possible while Flyte is still writing the run's first rows
        run = min(rows, key=lambda row: row["start_time"] or 0.0)
    own = next((row for row in sorted(children.get(run["action_name"], []), key=_started)
                if row["task_name"] == run["task_name"]), None)
    top = own or run
    kids = [row for row in children.get(run["action_name"], []) if row is not own]
    if own is not None:
        kids += children.get(own["action_name"], [])
    inputs = _inputs(top)
    order = {topic: index for index, topic in enumerate(inputs.get("topics") or []) if isinstance(topic, str)}
    root = _node(top, "task")
    root.children = _children(root.name, kids, children, order)
    _number(root)
    return root


def _started(row: dict[str, Any]) -> float:
    return row["start_time"] or 0.0


def _children(task: str, rows: list[dict[str, Any]], children: dict[str, list[dict[str, Any]]],
              order: dict[str, int]) -> list[Node]:
    """A task's children: its sub-tasks in their groups, and its traced calls nested and grouped."""
    entries: list[Node] = []
    groups: dict[str, Node] = {}
    tasks = [row for row in rows if "." in (row["task_name"] or "")]  # "env.function": traced calls have no env
    for row in sorted(tasks, key=lambda row: (order.get(_topic(_inputs(row)), len(order)), _started(row))):
        node = _node(row, "task")
        node.children = _children(node.name, children.get(row["action_name"], []), children, order)
        if row["group_name"]:
            group = groups.get(row["group_name"])
            if group is None:
                group = groups[row["group_name"]] = Node("group", row["group_name"], start=node.start)
                entries.append(group)
            group.start = min(group.start, node.start)
            group.children.append(node)
        else:
            entries.append(node)
    traces = [_node(row, "trace") for row in rows if "." not in (row["task_name"] or "")]
    entries += _regroup(task, _nest(traces))
    for group in entries:
        if group.kind == "group":
            group.status = _worst(child.status for child in group.children)
    return sorted(entries, key=lambda node: node.start)


def _node(row: dict[str, Any], kind: str) -> Node:
    name = row["short_name"] or (row["task_name"] or "?").rsplit(".", 1)[-1]
    notes = []
    if row["cache_hit"]:
        notes.append("cache hit")
    if (row["attempt_count"] or 0) > 1:
        notes.append(f"{row['attempt_count']} attempts")
    error = row["error"] or ""
    if row["status"] == "failed" and error:
        notes.append(_short_error(error))
    return Node(kind, name, status=row["status"] or "", detail=_topic(_inputs(row)) if kind == "task" else "",
                note=", ".join(notes), error=error, start=_started(row), end=row["end_time"])


def _nest(traces: list[Node]) -> list[Node]:
    """Put each traced call under the traced call that encloses it in time (both ran in one task)."""
    top: list[Node] = []
    open_calls: list[Node] = []
    for node in sorted(traces, key=lambda node: node.start):
        while open_calls and not _encloses(open_calls[-1], node):
            open_calls.pop()
        (open_calls[-1].children if open_calls else top).append(node)
        open_calls.append(node)
    return top


def _encloses(outer: Node, inner: Node) -> bool:
    inner_end = float("inf") if inner.end is None else inner.end
    return outer.start <= inner.start and (outer.end is None or inner_end <= outer.end)


def _regroup(task: str, nodes: list[Node]) -> list[Node]:
    """``TRACED_GROUPS``: each opening call starts the task's next group, which holds it and the
    member calls after it; any other call closes the group."""
    if task not in TRACED_GROUPS:
        return nodes
    pattern, opener, members = TRACED_GROUPS[task]
    grouped: list[Node] = []
    current: Node | None = None
    count = 0
    for node in nodes:
        if node.name == opener:
            count += 1
            current = Node("group", pattern.format(n=count), start=node.start)
            grouped.append(current)
        if current is not None and node.name in members:
            current.children.append(node)
        else:
            current = None
            grouped.append(node)
    return grouped


def _number(node: Node) -> None:
    """Number the children that share a label, in the order they started."""
    seen: dict[str, list[Node]] = {}
    for child in node.children:
        seen.setdefault(child.label, []).append(child)
        _number(child)
    for same in seen.values():
        if len(same) > 1:
            for number, child in enumerate(same, start=1):
                child.number = number


def _worst(statuses: Iterable[str]) -> str:
    present = set(statuses)
    return next((status for status in _WORST_FIRST if status in present), "")


def _inputs(row: dict[str, Any]) -> dict[str, Any]:
    try:
        inputs = json.loads(row["inputs"] or "{}")
    except ValueError:
        return {}
    return inputs if isinstance(inputs, dict) else {}


_RECORD_TOPIC = re.compile(r"""\w+\(topic=('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")""")


def _topic(inputs: dict[str, Any]) -> str:
    """The topic a task works on: its ``topic`` input, or the topic of a record it was given
    (Flyte stores a record input by its repr, ``RefineResult(topic='...', ...)``)."""
    if isinstance(inputs.get("topic"), str):
        return inputs["topic"]
    for value in inputs.values():
        match = _RECORD_TOPIC.match(value) if isinstance(value, str) else None
        if match:
            with contextlib.suppress(ValueError, SyntaxError):
                return str(ast.literal_eval(match.group(1)))
    return ""


def _short_error(error: str, limit: int = 70) -> str:
    """An error in one line: Flyte's ``Error(err=code: "X" message: "...")`` as ``X: ...``."""
    code = re.search(r'code: "([^"]*)"', error)
    message = re.search(r'message: "((?:[^"\\]|\\.)*)"', error)
    if code and message:
        text = f"{code.group(1)}: {message.group(1)}"
        text = text.replace("\\'", "'").replace('\\"', '"')
    else:
        text = error.strip().splitlines()[0] if error.strip() else ""
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------- the app: saved runs, cluster runs


def saved_runs(reports_dir: str | Path) -> list[Path]:
    """The run folders in ``reports_dir`` (those with a ``summary.json``), the most recently written first."""
    folder = Path(reports_dir)
    runs = [path.parent for path in folder.glob("*/summary.json")] if folder.is_dir() else []
    return sorted(runs, key=lambda run: ((run / "summary.json").stat().st_mtime, run.name), reverse=True)


def load_run(run_dir: str | Path) -> list[tuple[pipeline.TopicReport, Path, dict[str, Any]]]:
    """A saved run read back from its folder, as the explorer holds results: (report, run folder, row) per topic.

    ``summary.json`` gives the rows (scores, improvements, tokens, errors) and each ``report.md`` the text.
    A critique's strengths and one-line summary are not saved, so a reloaded history has the scores and the
    improvements asked for, which is what the explorer shows. A folder this pipeline did not write, or one
    with files missing, is an OSError or ValueError that says what is wrong, before anything is shown.
    """
    run_dir = Path(run_dir)
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        return [_saved_topic(run_dir, summary["model"], row) for row in summary["topics"]]
    except (json.JSONDecodeError, KeyError, TypeError) as error:  # not JSON, or a field missing or of another kind
        raise ValueError(f"{run_dir.name}/summary.json is not a run summary of this pipeline "
                         f"({type(error).__name__}: {error})") from error


def _saved_topic(run_dir: Path, model: str, row: dict[str, Any]) -> tuple[pipeline.TopicReport, Path, dict[str, Any]]:
    result = None
    if row["status"] == "ok":
        folder = run_dir / row["slug"]
        missing = [name for name in REPORT_FILES if not (folder / name).is_file()]  # the explorer shows all three
        if missing:
            raise FileNotFoundError(f"{run_dir.name}/{row['slug']}/ has no {' and no '.join(missing)}")
        _, front_matter_end, body = (folder / "report.md").read_text(encoding="utf-8").partition("\n---\n")
        if not front_matter_end:
            raise ValueError(f"{run_dir.name}/{row['slug']}/report.md has no front matter: not this pipeline's")
        history = [pipeline.Round(iteration=number, score=score, improvements=improvements, strengths=[], summary="")
                   for number, (score, improvements)
                   in enumerate(zip(row["score_history"], row["improvements_history"]), start=1)]
        result = pipeline.RefineResult(topic=row["topic"], markdown=body.lstrip("\n"), history=history, model=model,
                                       usage=Usage())
    report = pipeline.TopicReport(topic=row["topic"], slug=row["slug"], result=result, error=row["error"])
    return report, run_dir, row


def app_run_id(opened: dt.datetime, kernel_pid: int) -> str:
    """The run id of an app page: ``app-<when it opened>-<its kernel's process id>``. Each page has a kernel of its
    own, so two pages opened in the same second still get folders of their own (``save_run`` would replace an
    existing one)."""
    return f"app-{opened:%Y%m%d-%H%M%S}-{kernel_pid}"


# The Run buttons run (locally) or start (on a cluster) the batch in the click's handler, and the kernel handles one
# message at a time: the second click of a double-click, sent before the disabled button reached the browser, waits
# in the kernel's queue and is handled the moment the first run ends. A click handled within this many seconds of
# the end of the last run, with the same inputs, was therefore sent while it was going, and is dropped. A person
# pressing Run again after seeing the outcome takes longer; and changed topics or settings, which the browser
# sends before the click, make it a new request however fast it comes.
QUEUED_CLICK_SECONDS = 0.5


def box_topics(text: str) -> list[str]:
    """The topics typed in the explorer's box: one per line, whatever the line holds, stripped; blank lines left out.

    Not ``coerce_topics``: its rules are for the one string papermill's ``-p`` gives, where ``[A, B]`` is a list and
    one line with commas is ambiguous. In the box a line is a topic, ``Salt, fat, acid and heat`` and ``[Draft] Tea``
    too. The list then gets ``validate_batch``'s checks (none, too long, repeated, ...) like any other.
    """
    return [line.strip() for line in text.splitlines() if line.strip()]


def click_inputs(explorer: ReportExplorer) -> tuple[list[str], int, int]:
    """What a click on ``explorer``'s Run button runs: the topics typed (``box_topics``), the rounds and the
    threshold."""
    return box_topics(explorer.topics_box.value), explorer.iterations.value, explorer.threshold.value


def queued_click(explorer: ReportExplorer, now: float | None = None) -> bool:
    """Whether a click on ``explorer``'s Run button, handled ``now`` (default: time.monotonic()), was sent while the
    run the last click started was going: see ``QUEUED_CLICK_SECONDS``."""
    ended, inputs = explorer._click_run
    handled = time.monotonic() if now is None else now
    return inputs == click_inputs(explorer) and handled - ended < QUEUED_CLICK_SECONDS


APP_TARGETS = ("local", "cluster")


def app_target(environ: Any = os.environ) -> str:
    """Where the app's Run button runs the batch: ``local`` (in the app's kernel; the default) or ``cluster`` (a
    remote run of the deployed task), from ``REPORT_APP_TARGET``, which ``pipeline.app_env`` sets on a cluster."""
    target = environ.get("REPORT_APP_TARGET", "").strip().lower() or "local"
    if target not in APP_TARGETS:
        raise ValueError(f"REPORT_APP_TARGET must be one of {', '.join(APP_TARGETS)}, not {target!r}")
    return target


def start_cluster_run(task_name: str, inputs: dict[str, Any]) -> Any:
    """Start the deployed task ``task_name`` on the cluster this app runs on; return the run (``.name``, ``.url``).

    By name, at its latest version: the app environment deploys the pipeline's tasks with it
    (``depends_on``), so nothing is pickled or bundled from the app's kernel. Not exercised by the tests,
    which have no cluster: they substitute a runner of their own.
    """
    import flyte
    import flyte.remote

    # Once per kernel: the credentials and endpoint the cluster gives the app's container. (Importing pipeline may
    # have initialised Flyte for local runs, which has no client, so "initialised" is not the question to ask.)
    if not flyte.is_control_plane_available():
        flyte.init_in_cluster()
    return flyte.run(flyte.remote.Task.get(task_name, auto_version="latest"), **inputs)


class ExplorerApp:
    """The report explorer as an app (``apps/explorer.ipynb``, served by Voilà): the explorer above, plus the
    runs saved in ``reports_dir`` to browse; on a cluster (``target="cluster"``) Run starts a remote run.

    A view only, like the explorer: the Open button calls ``open_run``, a cluster's Run button calls
    ``start_remote``; a notebook cell calling them gets the same result. ``start_run(task_name, inputs)``
    starts a remote run (default ``start_cluster_run``). On a cluster ``reports_dir`` is a folder inside the
    app's container, empty and temporary: the remote runs keep their reports in their outputs, not there.
    """

    def __init__(self, reports_dir: str | Path, target: str = "local", start_run: Any = start_cluster_run,
                 **explorer_options: Any) -> None:
        import ipywidgets as widgets

        if target not in APP_TARGETS:
            raise ValueError(f"target must be one of {', '.join(APP_TARGETS)}, not {target!r}")
        self.reports_dir, self.target, self.start_run = Path(reports_dir), target, start_run
        self.explorer = ReportExplorer(output_dir=self.reports_dir, **explorer_options)
        self.remote_runs: list[Any] = []
        self._open_error = ""  # the message line's text after the last Open that failed
        self.runs = widgets.Dropdown(description="Saved run", layout=widgets.Layout(width="32rem"))
        self.open_button = widgets.Button(description="Open", icon="folder-open",
                                          tooltip="Show this run's reports below")
        self.open_button.on_click(self._open_clicked)
        # When a Run finishes (the explorer enables its button last), its new folder joins the list.
        self.explorer.run_button.observe(lambda change: self.refresh_runs() if not change["new"] else None,
                                         names="disabled")
        if target == "cluster":
            self.explorer.run_button.on_click(self.explorer._clicked, remove=True)
            self.explorer.run_button.on_click(self._clicked_remote)
            self.explorer.backend.value = ("<small>Run starts <code>report_batch_pipeline</code> on the cluster"
                                           "; its link appears below</small>")
        self.refresh_runs()
        self.widget = widgets.VBox([
            widgets.HBox([self.runs, self.open_button]),
            self.explorer.widget,
        ])

    def refresh_runs(self) -> list[Path]:
        """List the saved runs again; the one selected stays selected, else the newest is."""
        runs = saved_runs(self.reports_dir)
        selected = self.runs.value
        self.runs.options = [(run.name, run) for run in runs]
        self.runs.value = selected if selected in runs else (runs[0] if runs else None)
        return runs

    def open_run(self, run_dir: str | Path) -> list[pipeline.TopicReport]:
        """Show a saved run's reports in the explorer, beside the results already there. A run that cannot be read
        (``load_run``'s OSError or ValueError) is said in the message line, and raised; nothing else changes."""
        try:
            loaded = load_run(run_dir)
        except (OSError, ValueError) as error:
            shown = f"Could not open saved run {Path(run_dir).name}: {error}"
            self._open_error = self.explorer.message.value = f'<span style="color:#cf222e">{html.escape(shown)}</span>'
            raise
        if self.explorer.message.value == self._open_error:  # an earlier Open's error no longer applies
            self.explorer.message.value = ""
        for report, folder, row in loaded:
            self.explorer.results[report.topic] = (report, folder, row)
        if loaded:
            self.explorer._refresh_results(select=loaded[0][0].topic)
        self.explorer._note(f"Showing saved run {Path(run_dir).name} ({len(loaded)} topic{'s' * (len(loaded) != 1)})"
                            + (" with results of other runs." if len(self.explorer.results) > len(loaded) else "."))
        return [report for report, _, _ in loaded]

    def start_remote(self, topics: Any, max_iterations: int | None = None,
                     quality_threshold: int | None = None) -> Any:
        """Check the input as a local run would, start the batch on the cluster, and link to the run."""
        max_iterations = self.explorer.iterations.value if max_iterations is None else max_iterations
        quality_threshold = self.explorer.threshold.value if quality_threshold is None else quality_threshold
        message = self.explorer.message
        try:
            checked = validate_batch(coerce_topics(topics), max_iterations, quality_threshold)
            run = self.start_run(pipeline.report_batch_pipeline.name, {
                "topics": checked, "max_iterations": max_iterations, "quality_threshold": quality_threshold})
        except Exception as error:
            shown = str(error) if isinstance(error, ValueError) else f"The run did not start: {error}"
            message.value = f'<span style="color:#cf222e">{html.escape(shown)}</span>'
            raise
        self.remote_runs.append(run)
        count = f"{len(checked)} topic{'s' * (len(checked) != 1)}"
        url = str(getattr(run, "url", ""))
        name = html.escape(str(getattr(run, "name", "")))
        if re.match(r"https?://", url):  # a link only to a web page, never a javascript: or data: URL
            link = f'<a href="{html.escape(url, quote=True)}" target="_blank" rel="noopener">{name}</a>'
        else:
            link = f"<code>{name}</code>"
        message.value = f"Started run {link} on the cluster ({count}): its reports are in the run's outputs."
        return run

    def _open_clicked(self, _button: Any) -> None:
        if self.runs.value is not None:
            with contextlib.suppress(OSError, ValueError):  # shown in the message line by open_run
                self.open_run(self.runs.value)

    def _clicked_remote(self, _button: Any) -> None:
        ui = self.explorer
        if queued_click(ui):  # the second click of a double-click: see QUEUED_CLICK_SECONDS
            return
        inputs = click_inputs(ui)
        # Disabled while the cluster is asked (it can take seconds): a later click is then never sent at all.
        ui.run_button.disabled = True
        try:
            with contextlib.suppress(Exception):  # shown in the message line by start_remote
                self.start_remote(*inputs)
        finally:
            ui._click_run = (time.monotonic(), inputs)
            ui.run_button.disabled = False
