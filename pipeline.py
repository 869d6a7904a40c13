"""An LLM report generator, built with the Flyte 2 SDK: the tutorial's text.

For each topic a writer drafts a report, a critic scores it (JSON, 1-10) and a
reviser improves it until the score reaches a threshold or the rounds run out;
then the report is written as ``report.md``, ``report.html`` and a summary. Many
topics run at once. Read it top to bottom:

1. prompts and the critique    what we ask, and the typed answer we expect back
2. task environments           where tasks run: image, resources, reuse, secrets, cache
3. the LLM call                one traced function around the real openai client
4. traced steps                draft, critique (validated and repaired), revise, summarise
5. the refinement task         the critique/revise loop, one ``flyte.group`` per round
6. formatters and their task   Markdown with front matter, safe HTML, in parallel
7. the batch driver            every topic at once; one failure never loses the rest
8. run_batch and the CLI       run locally, save ``reports/<run-id>/``

Run it: ``python pipeline.py "Quantum computing" "Why cats purr"``, or
``flyte run --local pipeline.py report_batch_pipeline --topics '["Quantum computing"]'``.
With no configuration a deterministic offline model answers: no account, no
network. What this file uses but does not teach lives in ``machinery/``.
"""

# No ``from __future__ import annotations``: Flyte resolves the annotations of our records on
# every conversion, and string annotations made cached reruns 25% slower (benchmarks/).
import asyncio
import datetime as dt
import hashlib
import html
import re
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import flyte
import flyte.app
import flyte.errors
import yaml
from flyte.io import Dir
from markdown_it import MarkdownIt
from pydantic import ConfigDict, Field, ValidationError

from machinery.cache_policy import CodeAndModelPolicy, code_and_model
from machinery.files import atomic_write_text, slugify, writable_folder
from machinery.html_page import html_page
from machinery.inputs import report_date_or_today, validate_batch, validate_run_id
from machinery.model_client import ReplyCutOff, Usage, check_backend, complete, describe_error, metering
from machinery.progress import StepLines, print_notable
from machinery.records import Record, describe_fields
from machinery.run_output import BatchResult, missing_files, save_run
from machinery.runtime import BackendUnavailable, ProgressListener, runtime


# {{docs-fragment prompts}}
class Critique(Record):
    """What the critic must return. Validation, not hope: a score of 11 is an error."""

    model_config = ConfigDict(extra="ignore")  # a chatty model may add keys; we keep ours

    score: int = Field(ge=1, le=10, description="an integer from 1 to 10, where 8 or more means ready to publish")
    strengths: list[str] = Field(description="a list of strings")
    improvements: list[str] = Field(description="a list of specific, actionable strings, most important first")
    summary: str = Field(description="one sentence")


WRITER_PROMPT = """\
You are a report writer. Write a well-structured report in Markdown about the topic you are given:
a '# ' title, an introduction, three to five '## ' sections with facts and concrete examples,
a short bullet list of key figures, and a conclusion. Aim for 500 to 800 words.
Return only the Markdown."""

# The JSON shape is generated from Critique, so the prompt and the validation never disagree.
CRITIC_PROMPT = f"""\
You are a demanding editor. Judge the report for clarity, structure, depth, accuracy and engagement.
Reply with one JSON object and nothing else, with exactly these keys:
{describe_fields(Critique)}"""

REVISER_PROMPT = """\
You are a report reviser. Rewrite the report so that it addresses every listed improvement,
keeping its voice and its strengths. Return only the revised Markdown."""

SUMMARY_PROMPT = """\
You are an executive summariser. Summarise the report in two or three short paragraphs for a busy
reader: the main points, the key evidence and the recommendation. Return plain text."""
# {{/docs-fragment prompts}}


# {{docs-fragment environments}}
# The container image a cluster runs our tasks in: the packages the pipeline imports, and
# unionai-reuse, the runtime that reusable containers (below) need on a Union backend.
image = flyte.Image.from_debian_base(python_version=(3, 12)).with_pip_packages(
    "openai>=3.50", "httpx2", "pydantic>=2.7", "pyyaml>=6", "markdown-it-py>=3", "unionai-reuse>=0.1.9"
)

# Tasks that call the model: many at once, each mostly waiting on the network.
llm_env = flyte.TaskEnvironment(
    name="llm-worker",
    image=image,
    # Per container: the work is waiting, not computing.
    resources=flyte.Resources(cpu=1, memory="1Gi"),
    # Warm containers instead of one pod per task: 2 replicas, each running up to 4 tasks at
    # once (which is why the tasks are async). A replica stops after 5 idle minutes; the whole
    # environment after 30. Up to 8 topics refine in parallel on a cluster.
    reusable=flyte.ReusePolicy(
        replicas=2, concurrency=4, scaledown_ttl=timedelta(minutes=5), idle_ttl=timedelta(minutes=30)
    ),
    # The API key from the cluster's secret store, as OPENAI_API_KEY: only with a real model.
    secrets=runtime.openai_secrets(flyte.Secret(key="openai-api-key", as_env_var="OPENAI_API_KEY")),
    # The launching process's REPORT_BACKEND, REPORT_MODEL and OPENAI_BASE_URL.
    env_vars=runtime.task_env_vars,
    # A rerun reuses finished work. The key covers this whole file and the model, not just
    # the task's body, so editing a prompt or switching models never returns a stale report.
    cache=flyte.Cache("auto", policies=[CodeAndModelPolicy()]),
)

# The driver only waits on its children; depends_on deploys llm_env along with it.
driver_env = flyte.TaskEnvironment(
    name="driver",
    image=image,
    resources=flyte.Resources(cpu=1, memory="1Gi"),
    env_vars=runtime.task_env_vars,
    depends_on=[llm_env],
)
# Locally, Flyte ignores image, resources, reuse, secrets and env_vars: tasks run in this process
# and see its environment (the key included). A cluster applies them all. The cache works in both.
# {{/docs-fragment environments}}


# {{docs-fragment app-environment}}
# The report explorer as a web app: Voila runs apps/explorer.ipynb and shows only its widgets.
app_env = flyte.app.AppEnvironment(
    name="report-explorer",
    # The pipeline's image plus what a notebook app needs: Voila, a kernel, the widgets and their chart.
    image=image.with_pip_packages("voila>=0.5.13", "ipykernel>=6.29", "ipywidgets>=8.1", "matplotlib>=3.8"),
    # The command, run where the code bundle is unpacked. 0.0.0.0: the cluster's router must reach it.
    # Culling: every page view starts a kernel (~100 MB) that would otherwise live until the server stops; one
    # idle for 10 minutes with no page connected is shut down (a busy or connected one never is, by default).
    args=["voila", "apps/explorer.ipynb", "--template=explorer", "--port", "8080", "--no-browser",
          "--Voila.ip=0.0.0.0", "--MappingKernelManager.cull_idle_timeout=600",
          "--MappingKernelManager.cull_interval=60"],
    # Where Voila listens: the app's URL is routed to this port.
    port=8080,
    # Each open page runs the notebook in a kernel of its own; the batch itself runs as tasks.
    resources=flyte.Resources(cpu=1, memory="2Gi"),
    # By default a code bundle holds only the Python modules imported: add the app (its notebook and
    # page template) and the views.
    include=["apps", "explorer.py"],
    # REPORTS_DIR: where the app lists saved runs and writes its local ones (relative: to the project). On a
    # cluster it is a folder inside the app's container, empty and temporary: remote runs keep their reports in
    # their outputs, never there. Not a RunOutput: that resolves at deploy time to one str, File or Dir, and
    # report_batch_pipeline returns records. So on a cluster the Run button starts runs and links to them.
    parameters=[flyte.app.Parameter(name="reports_dir", value="reports", env_var="REPORTS_DIR")],
    # REPORT_APP_TARGET: on a cluster, Run starts report_batch_pipeline remotely (locally Flyte ignores
    # env_vars: the batch runs in the app's kernel). JUPYTER_PATH: where Voila finds the page template.
    env_vars={"REPORT_APP_TARGET": "cluster", "JUPYTER_PATH": "apps/jupyter"},
    # Only people signed in to the cluster may open it (the default, stated): Run costs model tokens.
    requires_auth=True,
    # Deploying the app deploys the tasks its Run button starts.
    depends_on=[driver_env],
)
# {{/docs-fragment app-environment}}


# {{docs-fragment llm-call}}
@flyte.trace
async def call_llm(topic: str, step: str, system: str, prompt: str, json_mode: bool = False) -> str:
    """One chat completion for one step of a topic: "draft", "critique", "revision" or "summary".
    Traced: on a cluster, a retried task replays it from its checkpoint."""
    request = {
        "model": runtime.requested_model,  # REPORT_MODEL, or the one model a local server says it serves
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": prompt}],
        "temperature": 0.2,
        # A reply limit per step (REPORT_MAX_TOKENS_*): without one, a small local model writes until its
        # context is full. (max_tokens, not max_completion_tokens: every OpenAI-compatible server takes it.)
        "max_tokens": runtime.settings.reply_limit(step),
        # JSON mode: the server guarantees a JSON object (the critic's reply is still validated).
        **({"response_format": {"type": "json_object"}} if json_mode else {}),
    }
    # Through the real openai client: a cap on requests in flight, the reply cache (locally, it plays
    # the checkpoint's role), retries within one deadline (REPORT_REQUEST_TIMEOUT), token metering and
    # progress events: see machinery/model_client.py. A reply cut off at its limit (finish_reason
    # "length") is unfinished: a text is asked for once more, shorter, then the topic fails with
    # ReplyCutOff, naming the setting to raise; the critic's JSON gets a repair request (below).
    return await complete(request, topic=topic, step=step, retry_shorter=not json_mode)
# {{/docs-fragment llm-call}}


# {{docs-fragment traced-steps}}
# Each step is traced too: Flyte records one action per step with its inputs and output,
# and inside it one action per call_llm. A retried task on a cluster replays both.
@flyte.trace
async def write_draft(topic: str) -> str:
    return await call_llm(topic, "draft", WRITER_PROMPT, f"Topic: {topic}\n\nWrite the report.")


@flyte.trace
async def revise_draft(topic: str, draft: str, improvements: list[str]) -> str:
    todo = "\n".join(f"- {item}" for item in improvements) or "- Tighten the wording."
    prompt = f"Topic: {topic}\n\nImprovements to make:\n{todo}\n\nCurrent report:\n\n{draft}"
    return await call_llm(topic, "revision", REVISER_PROMPT, prompt)


@flyte.trace
async def summarize_report(topic: str, report: str) -> str:
    return await call_llm(topic, "summary", SUMMARY_PROMPT, f"Topic: {topic}\n\nReport to summarize:\n\n{report}")
# {{/docs-fragment traced-steps}}


# {{docs-fragment critique-step}}
class CritiqueError(flyte.errors.NonRecoverableError):
    """The critic's reply was unusable twice; retrying the task would not help, so Flyte won't."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="CritiqueError")


@flyte.trace
async def critique_draft(topic: str, draft: str) -> Critique:
    """Ask for a JSON critique; one repair request, quoting the problem, if the reply is invalid or cut off."""
    prompt = f"Topic: {topic}\n\nReport to review:\n\n{draft}"
    try:
        return Critique.model_validate_json(await call_llm(topic, "critique", CRITIC_PROMPT, prompt, json_mode=True))
    except ValidationError as error:
        problem = validation_summary(error)
    except ReplyCutOff as cut:  # its JSON stops mid-way: as invalid as any other
        problem = f"it was cut off at the limit of {cut.tokens or cut.limit} tokens; keep every string short"
    repair = (
        f"Topic: {topic}\n\nYour previous reply could not be used: {problem}\n"
        f"Reply again with one JSON object with exactly the keys {', '.join(Critique.model_fields)}."
        f"\n\nReport to review:\n\n{draft}"
    )
    try:
        return Critique.model_validate_json(await call_llm(topic, "critique", CRITIC_PROMPT, repair, json_mode=True))
    except ValidationError as error:
        problem = validation_summary(error)
    except ReplyCutOff as cut:
        problem = cut.reason  # the limit to raise, or the model's context that is full
    raise CritiqueError(f"The critic's reply for {topic!r} was invalid twice (after one repair request): {problem}")


def validation_summary(error: ValidationError) -> str:
    """'score: Input should be less than or equal to 10 (got 11)', without pydantic's URLs."""
    parts = []
    for item in error.errors(include_url=False)[:3]:
        where = ".".join(str(p) for p in item["loc"]) or "reply"
        got = "" if item["type"] == "missing" else f" (got {str(item.get('input'))[:60]!r})"
        parts.append(f"{where}: {item['msg']}{got}")
    return "; ".join(parts)
# {{/docs-fragment critique-step}}


# {{docs-fragment refine-task}}
class Round(Critique):
    """One critique round: the critique, and which round it was."""

    iteration: int


class RefineResult(Record):
    topic: str
    markdown: str
    history: list[Round]
    model: str
    usage: Usage  # requests (retries, timeouts, cut-offs), cache hits and tokens this topic's refinement spent
    produced_in_run: str = ""  # the Flyte run that made it: differs from the current one on a cache hit

    @property
    def iterations(self) -> int:
        return len(self.history)

    @property
    def final_score(self) -> int:
        return self.history[-1].score


# retries=3: a task that fails (a 5xx after complete()'s own retries) runs again; a timeout never does.
@llm_env.task(retries=3)
async def refine_report(topic: str, max_iterations: int = 3, quality_threshold: int = 8) -> RefineResult:
    """Draft, then critique and revise until the score reaches the threshold or the rounds run out."""
    with metering() as meter:
        runtime.emit(topic, "draft")
        markdown = await write_draft(topic)
        history = []
        for iteration in range(1, max_iterations + 1):
            # A group gathers this round's traced calls under one name in Flyte's UI.
            with flyte.group(f"refinement_{iteration}"):
                runtime.emit(topic, "critique", iteration=iteration)
                critique = await critique_draft(topic, markdown)
                history.append(Round(iteration=iteration, **critique.model_dump()))
                runtime.emit(topic, "scored", iteration=iteration, score=critique.score)
                # The last round's critique scores the final text, so we never revise after it.
                if critique.score >= quality_threshold or iteration == max_iterations:
                    break
                runtime.emit(topic, "revise", iteration=iteration)
                markdown = await revise_draft(topic, markdown, critique.improvements)
    return RefineResult(topic=topic, markdown=markdown, history=history, model=runtime.model_name,
                        usage=meter.total, produced_in_run=current_run())


def current_run() -> str:
    """The name of the Flyte run executing this task ("" outside a task)."""
    return flyte.ctx().action.run_name if flyte.ctx() else ""
# {{/docs-fragment refine-task}}


# {{docs-fragment markdown-formatter}}
def format_as_markdown(result: RefineResult, report_date: str) -> str:
    """The report with YAML front matter. A YAML library quotes whatever the topic holds."""
    front_matter = {
        "title": result.topic,
        "date": report_date,  # given, not read from the clock: the same inputs give the same file
        "model": result.model,
        "score": result.final_score,
        "iterations": result.iterations,
    }
    header = yaml.safe_dump(front_matter, sort_keys=False, allow_unicode=True, width=1000)
    return f"---\n{header}---\n\n{result.markdown.strip()}\n"


def read_front_matter(markdown: str) -> dict[str, Any]:
    """The inverse of the header written by ``format_as_markdown``."""
    if not markdown.startswith("---\n"):
        raise ValueError("no front matter: the text does not start with a '---' line")
    header, found, _ = markdown[4:].partition("\n---\n")
    if not found:
        raise ValueError("front matter is not closed by a '---' line")
    return yaml.safe_load(header)
# {{/docs-fragment markdown-formatter}}


# {{docs-fragment html-formatter}}
SAFE_LINK_SCHEMES = ("http", "https", "mailto")


def is_safe_link(url: str) -> bool:
    """Relative links and http(s)/mailto only: no javascript:, data:, vbscript: or file: URLs."""
    cleaned = re.sub(r"[\x00-\x20]+", "", url).lower()
    scheme = re.match(r"^([a-z][a-z0-9+.\-]*):", cleaned)
    return scheme is None or scheme.group(1) in SAFE_LINK_SCHEMES


# A real Markdown parser, not regular expressions. html=False: raw HTML in model text is
# shown as text, never parsed as markup.
_markdown = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False}).enable("table")
_markdown.validateLink = is_safe_link


def render_markdown(text: str) -> str:
    """Markdown to an HTML fragment that is safe to embed: raw HTML escaped, unsafe links dropped."""
    return _markdown.render(text)


def format_as_html(result: RefineResult, report_date: str) -> str:
    """The report as a standalone page; ``html_page`` adds a policy that forbids scripts."""
    markdown = result.markdown.strip()
    first_line, _, rest = markdown.partition("\n")
    if first_line.strip() == f"# {result.topic}".strip():
        markdown = rest  # the page header already shows the topic as the title
    meta = f"{report_date} · {result.model} · score {result.final_score}/10 after {result.iterations} round(s)"
    body = (
        f"<header>\n<h1>{html.escape(result.topic)}</h1>\n<p>{html.escape(meta)}</p>\n</header>\n"
        f"<main>\n{render_markdown(markdown)}</main>\n"
    )
    return html_page(result.topic, body)
# {{/docs-fragment html-formatter}}


# {{docs-fragment format-task}}
class ReportFiles(Record):
    """The folder holding report.md, report.html and summary.txt, plus what the summary cost."""

    folder: Dir  # Flyte's folder type: a local path here, uploaded to blob storage on a cluster
    usage: Usage
    produced_in_run: str = ""


# Cached like refine_report, so a rerun reuses finished reports.
@llm_env.task(retries=2)
async def format_outputs(result: RefineResult, report_date: str) -> ReportFiles:
    runtime.emit(result.topic, "format")
    # The three outputs at once: the summary waits on the model while the formatters run in threads.
    with flyte.group("formatting"), metering() as meter:
        markdown, page, summary = await asyncio.gather(
            asyncio.to_thread(format_as_markdown, result, report_date),
            asyncio.to_thread(format_as_html, result, report_date),
            summarize_report(result.topic, result.markdown),
        )
    folder = work_folder(result, report_date)
    files = {"report.md": markdown, "report.html": page, "summary.txt": summary.strip() + "\n"}
    await asyncio.to_thread(write_files, folder, files)  # fsync blocks; keep it off the event loop
    return ReportFiles(folder=await Dir.from_local(folder), usage=meter.total, produced_in_run=current_run())


def work_folder(result: RefineResult, report_date: str) -> Path:
    """``<reports>/.work/<slug>-<digest>``: locally a Dir is only a path, so not a temp folder that
    disappears while the cache still names it; the digest covers everything the files depend on."""
    report = result.model_dump_json(exclude={"usage", "produced_in_run"})  # what the files show
    inputs = f"{report}\x1f{report_date}\x1f{code_and_model(__file__)}"
    digest = hashlib.sha256(inputs.encode()).hexdigest()[:16]
    return runtime.settings.reports_dir / ".work" / f"{slugify(result.topic)}-{digest}"


def write_files(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        atomic_write_text(folder / name, text)
# {{/docs-fragment format-task}}


# {{docs-fragment batch-driver}}
class TopicReport(Record):
    """One topic's outcome: its refined report and files, or the error that stopped it."""

    topic: str
    slug: str  # its folder's name in the run output
    result: RefineResult | None = None
    files: ReportFiles | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@driver_env.task
async def report_batch_pipeline(
    topics: list[str], max_iterations: int = 3, quality_threshold: int = 8, report_date: str = ""
) -> list[TopicReport]:
    """Refine every topic concurrently, then format every report concurrently."""
    topics = validate_batch(topics, max_iterations, quality_threshold)  # `flyte run` comes straight here
    report_date = report_date_or_today(report_date)
    check_backend(fresh=False)  # so a server that cannot be used fails here, clearly (run_batch has just asked)

    # return_exceptions=True: a failed topic becomes a value, and its siblings run to completion.
    with flyte.group("refine_all"):
        refined = await asyncio.gather(
            *(refine_report(topic, max_iterations, quality_threshold) for topic in topics), return_exceptions=True
        )
    finished = [result for result in refined if isinstance(result, RefineResult)]
    with flyte.group("format_all"):
        formatted = await asyncio.gather(
            *(format_outputs(result, report_date) for result in finished), return_exceptions=True
        )
    files_by_topic = {result.topic: files for result, files in zip(finished, formatted)}
    return [topic_report(topic, outcome, files_by_topic.get(topic)) for topic, outcome in zip(topics, refined)]


def topic_report(topic: str, refined: Any, formatted: Any) -> TopicReport:
    """What the two stages gave one topic; the first error, if any, is its error."""
    error = next((e for e in (refined, formatted) if isinstance(e, BaseException)), None)
    report = TopicReport(
        topic=topic,
        slug=slugify(topic),
        result=refined if isinstance(refined, RefineResult) else None,
        files=formatted if isinstance(formatted, ReportFiles) else None,
        error=describe_error(error) if error else None,
    )
    if error:
        runtime.emit(topic, "error", error=report.error)
    else:
        runtime.emit(topic, "done", score=report.result.final_score)
    return report
# {{/docs-fragment batch-driver}}


# {{docs-fragment run-batch}}
def run_batch(
    topics: Sequence[str],
    *,
    max_iterations: int = 3,
    quality_threshold: int = 8,
    report_date: str | None = None,
    output_dir: str | Path | None = None,
    run_id: str | None = None,
    on_event: ProgressListener | None = None,
    flyte_cache: bool = True,
) -> BatchResult:
    """Run the batch locally and save it: the one entry point of the CLI, notebooks, widgets and tests.

    ``flyte_cache=False`` skips Flyte's task cache (not the reply cache: ``reply_cache`` setting).
    """
    topics = validate_batch(topics, max_iterations, quality_threshold)  # fail before the backend check
    report_date = report_date_or_today(report_date)
    timed = not run_id  # a run named by the time never replaces another (same second: -2, -3...)
    run_id = validate_run_id(run_id or dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    output_dir = writable_folder(output_dir or runtime.settings.reports_dir)  # now, not after every model call
    check_backend()  # which model the server serves now, in one cheap request: fail once, not once per topic
    runtime.announce_backend()
    runtime.init_flyte()
    runtime.start_batch()  # this batch's requests, tokens, 429s and pauses; its patience starts now
    inputs = dict(topics=topics, max_iterations=max_iterations, quality_threshold=quality_threshold,
                  report_date=report_date)
    # Besides on_event: a console line per wait worth knowing of (retry, slow reply, timeout, cut-off, rate limit).
    with runtime.listening(on_event), runtime.listening(print_notable):
        # mode="local": even if a config with a cluster endpoint is found, this runs here.
        run = flyte.with_runcontext(mode="local", disable_run_cache=not flyte_cache).run(report_batch_pipeline,
                                                                                            **inputs)
        reports: list[TopicReport] = run.outputs()[0]
        these_runs = {"", Path(run.url).name}  # locally, run.url is the run's metadata folder
        for report in missing_files(reports):  # a cache hit named a work folder deleted since: write it again
            remade = flyte.with_runcontext(mode="local", disable_run_cache=True).run(
                format_outputs, result=report.result, report_date=report_date)
            report.files = remade.outputs()[0]
            these_runs.add(Path(remade.url).name)

    def made_now(part: RefineResult | ReportFiles | None) -> bool:  # not served by Flyte's cache
        return part is not None and part.produced_in_run in these_runs

    return save_run(BatchResult(
        run_id=run_id,
        run_dir=output_dir / run_id,
        report_date=report_date,
        model=runtime.model_name,
        reports=reports,
        llm_usage=Usage(**runtime.batch_usage.snapshot()),  # every call made, failed topics' too
        cached_topics=[r.topic for r in reports if r.result and not made_now(r.result)],
        flyte_run_name=Path(run.url).name,
        pacing=runtime.pace.stats(),
        reported_models=runtime.reported_models(),  # other models replies named: a proxy renaming one
    ), replace=not timed)
# {{/docs-fragment run-batch}}


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Generate refined reports for one or more topics, locally.")
    parser.add_argument("topics", nargs="+", help="one or more topics, each in quotes")
    parser.add_argument("--max-iterations", type=int, default=3, help="critique rounds per topic, 1-10 (default 3)")
    parser.add_argument("--quality-threshold", type=int, default=8, help="score that ends refinement, 1-10 (default 8)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output folder (default: REPORTS_DIR or {runtime.settings.reports_dir})")
    parser.add_argument("--run-id", default=None, help="name of the run folder (default: the current time)")
    parser.add_argument("--date", default=None, help="report date for the front matter (default: today)")
    parser.add_argument("--no-cache", action="store_true",
                        help="ask the model again: skip Flyte's task cache and the reply cache")
    args = parser.parse_args(argv)
    if args.no_cache:
        runtime.configure(reply_cache=None)
    try:
        batch = run_batch(args.topics, max_iterations=args.max_iterations, quality_threshold=args.quality_threshold,
                          report_date=args.date, output_dir=args.out, run_id=args.run_id,
                          on_event=StepLines(), flyte_cache=not args.no_cache)  # a line per topic's step
    except (ValueError, BackendUnavailable) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback
        print("interrupted: a rerun resumes from the reply cache", file=sys.stderr)
        return 130
    for row in batch.rows():
        outcome = f"score {row['final_score']}/10 after {row['iterations']} round(s)" if row["status"] == "ok" else ""
        print(f"  {row['topic']}: {outcome or row['error']}")
    failed = sum(1 for r in batch.reports if not r.ok)
    print(f"{len(batch.reports) - failed} of {len(batch.reports)} reports written; index: {batch.index_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
