"""An LLM report generator, built with the Flyte 2 SDK.

For each topic the pipeline writes a draft, has a critic score it (structured
JSON, 1-10), revises until the score reaches a threshold or the iterations run
out, then writes ``report.md``, ``report.html`` and an executive summary, for
many topics at once.

It reads top to bottom like the tutorial:

1. settings            where the model lives, how hard we may call it
2. prompts and models  what we ask, and the typed critique we expect back
3. the LLM call        one traced function through the official openai client
4. traced steps        draft, critique (validated and repaired), revise, summary
5. refinement task     the critique/revise loop, one ``flyte.group`` per round
6. formatters          Markdown with front matter, safe HTML, in parallel
7. batch driver        many topics at once; one failure never loses the rest
8. durable outputs     ``reports/<run-id>/`` with an index and ``summary.json``

Run it:

    python pipeline.py "Quantum computing" "Why cats purr"
    flyte run --local pipeline.py report_batch_pipeline --topics '["Quantum computing"]'

With no configuration it uses a deterministic offline model, so it needs no
account and no network. Set ``OPENAI_API_KEY`` (and ``OPENAI_BASE_URL`` for
Ollama, vLLM or llama.cpp) to use a real model; see the README.
"""

# No ``from __future__ import annotations`` here: Flyte's type engine resolves the annotations of
# our pydantic records on every conversion, and string annotations made cached reruns 25% slower.
import asyncio
import contextlib
import contextvars
import dataclasses
import datetime as dt
import functools
import hashlib
import html
import inspect
import json
import logging
import os
import re
import shutil
import sys
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Self

import flyte
import flyte.errors
import openai
import yaml
from flyte.io import Dir
from markdown_it import MarkdownIt
from openai import AsyncOpenAI
from pydantic import ConfigDict, Field, ValidationError

import offline_llm
from llm_cache import CachedReply, ResponseCache, request_key
from plumbing import InflightLimit, Record, Tally, atomic_write_text, replace_dir, slugify, staging_dir_for

PROJECT_ROOT = Path(__file__).resolve().parent
logger = logging.getLogger("pipeline")

# {{docs-fragment settings}}
BACKENDS = ("offline", "openai")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Where the model lives and how hard we may call it. Read from the environment."""

    backend: str = "offline"  # "offline" or "openai" (any OpenAI-compatible server)
    model: str = "gpt-4o-mini"
    base_url: str | None = None  # None: the client's default, https://api.openai.com/v1
    max_concurrency: int = 8  # in-flight LLM requests, process-wide
    reports_dir: Path = PROJECT_ROOT / "reports"
    request_timeout: float = 120.0  # seconds per HTTP request; CPU-hosted models are slow
    client_retries: int = 3  # the openai client's own retries: 408, 409, 429, 5xx, timeouts
    offline_latency: float = 0.0  # seconds the offline model waits per reply, to mimic a real API
    offline_latency_per_token: float = 0.0  # and per generated token (e.g. 0.01 for ~100 tokens/s)
    llm_cache: Path | None = PROJECT_ROOT / ".llm-cache" / "replies.sqlite3"  # None: every call goes to the model
    run_history: bool = False  # Flyte's local run history (for `flyte start tui`); costs ~3 ms per traced call

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Self:
        env = dict(os.environ if environ is None else environ)
        has_openai = bool(env.get("OPENAI_API_KEY") or env.get("OPENAI_BASE_URL"))
        backend = (env.get("REPORT_BACKEND") or ("openai" if has_openai else "offline")).strip().lower()
        if backend not in BACKENDS:
            raise ValueError(
                f"REPORT_BACKEND={backend!r} is not a known backend: use 'offline' (built-in model, no network) "
                "or 'openai' (OpenAI or any OpenAI-compatible server such as Ollama, vLLM or llama.cpp)."
            )
        reports_dir = Path(env["REPORTS_DIR"]).expanduser().resolve() if env.get("REPORTS_DIR") else cls.reports_dir
        cache_setting = (env.get("REPORT_LLM_CACHE") or "").strip()
        if cache_setting.lower() in ("off", "0", "false", "no", "none"):
            llm_cache = None
        else:
            llm_cache = Path(cache_setting).expanduser().resolve() if cache_setting else cls.llm_cache
        return cls(
            backend=backend,
            model=env.get("REPORT_MODEL") or cls.model,
            base_url=env.get("OPENAI_BASE_URL") or None,
            max_concurrency=_positive_int(env, "REPORT_MAX_CONCURRENCY", cls.max_concurrency),
            reports_dir=reports_dir,
            request_timeout=_positive_float(env, "REPORT_REQUEST_TIMEOUT", cls.request_timeout),
            client_retries=_positive_int(env, "REPORT_CLIENT_RETRIES", cls.client_retries, minimum=0),
            offline_latency=_positive_float(env, "REPORT_OFFLINE_LATENCY", cls.offline_latency, minimum=0.0),
            offline_latency_per_token=_positive_float(
                env, "REPORT_OFFLINE_LATENCY_PER_TOKEN", cls.offline_latency_per_token, minimum=0.0),
            llm_cache=llm_cache,
            run_history=_switch(env, "REPORT_RUN_HISTORY", cls.run_history),
        )

    @property
    def endpoint(self) -> str:
        """Which server answers: part of every cached reply's key."""
        return "offline" if self.backend == "offline" else self.base_url or "https://api.openai.com/v1"

    @property
    def model_name(self) -> str:
        """The model that writes the reports, as recorded in every report."""
        return offline_llm.MODEL_VERSION if self.backend == "offline" else self.model

    def describe(self) -> str:
        """One line for people; never contains the API key."""
        if self.backend == "offline":
            return f"offline model {self.model_name} (built in, deterministic, no network)"
        return f"model {self.model} at {self.base_url or 'https://api.openai.com/v1'} (OpenAI-compatible)"

    def check_ready(self) -> None:
        """Fail before any work if the chosen backend cannot work."""
        if self.backend == "openai" and not os.environ.get("OPENAI_API_KEY"):
            raise ValueError(
                "REPORT_BACKEND=openai needs OPENAI_API_KEY. Export your key, or any non-empty value "
                "(for example OPENAI_API_KEY=local) for servers that do not check it, such as Ollama."
            )

    def task_env_vars(self) -> dict[str, str]:
        """The settings a remote task container needs to behave like this process."""
        # On a cluster, Flyte checkpoints traced calls; the local reply cache is not needed there.
        env = {"REPORT_BACKEND": self.backend, "REPORT_MODEL": self.model, "REPORT_LLM_CACHE": "off"}
        if self.base_url:
            env["OPENAI_BASE_URL"] = self.base_url
        return env


def _positive_int(env: dict[str, str], name: str, default: int, minimum: int = 1) -> int:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} must be a whole number of at least {minimum}") from None
    if value < minimum:
        raise ValueError(f"{name}={raw!r} must be a whole number of at least {minimum}")
    return value


def _switch(env: dict[str, str], name: str, default: bool) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw in ("on", "1", "true", "yes"):
        return True
    if raw in ("off", "0", "false", "no"):
        return False
    raise ValueError(f"{name}={raw!r} must be 'on' or 'off'")


def _positive_float(env: dict[str, str], name: str, default: float, minimum: float = 0.001) -> float:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} must be a number of seconds, at least {minimum}") from None
    if not value >= minimum:
        raise ValueError(f"{name}={raw!r} must be a number of seconds, at least {minimum}")
    return value


settings = Settings.from_env()


def configure(**changes: Any) -> None:
    """Change settings for this process, e.g. ``configure(offline_latency=0.2)``.

    New LLM clients are made on the next call. Cached task results stay valid:
    the cache key covers the model (see ``ReportConfigPolicy``).
    """
    global settings, _limit
    settings = dataclasses.replace(settings, **changes)
    _limit = InflightLimit(settings.max_concurrency)
    _clients.clear()


# {{/docs-fragment settings}}

# {{docs-fragment prompts}}
WRITER_PROMPT = """\
You are a report writer. Write a well-structured report in Markdown about the topic you are given:
a '# ' title, an introduction, three to five '## ' sections with facts and concrete examples,
a short bullet list of key figures, and a conclusion. Aim for 500 to 800 words.
Return only the Markdown."""

CRITIC_PROMPT = """\
You are a demanding editor. Judge the report for clarity, structure, depth, accuracy and engagement.
Reply with one JSON object and nothing else, with exactly these keys:
"score": an integer from 1 to 10, where 8 or more means ready to publish;
"strengths": a list of strings;
"improvements": a list of specific, actionable strings, most important first;
"summary": one sentence."""

REVISER_PROMPT = """\
You are a report reviser. Rewrite the report so that it addresses every listed improvement,
keeping its voice and its strengths. Return only the revised Markdown."""

SUMMARY_PROMPT = """\
You are an executive summariser. Summarise the report in two or three short paragraphs for a busy
reader: the main points, the key evidence and the recommendation. Return plain text."""


# Record is a pydantic BaseModel that builds its JSON schema once (Flyte asks for it on every traced call).
class Critique(Record):
    """What the critic must return. Validation, not hope: a score of 11 is an error."""

    model_config = ConfigDict(extra="ignore")

    score: int = Field(ge=1, le=10)
    strengths: list[str]
    improvements: list[str]
    summary: str


class Usage(Record):
    """Requests sent, replies reused from the cache, tokens spent; adds up across calls, topics and runs."""

    requests: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(
            requests=self.requests + other.requests,
            cache_hits=self.cache_hits + other.cache_hits,
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
        )


# {{/docs-fragment prompts}}

# {{docs-fragment llm-call}}
# One client per event loop: a notebook awaits on the kernel's loop while Flyte
# runs tasks on a loop of its own, and an AsyncOpenAI client (its connection
# pool) must never be shared between two loops.
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncOpenAI] = weakref.WeakKeyDictionary()
_limit = InflightLimit(settings.max_concurrency)
_reply_cache: ResponseCache | None = None
requests_sent = Tally()  # chat completions this process asked a model for


# Usage travels beside the replies, not inside them: traced functions return plain text,
# which is what Flyte records cheapest, and each task reads its own meter at the end. (On a
# cluster, a call replayed from its checkpoint costs nothing now, so it is not counted.)
class UsageMeter:
    """Adds up the usage of every model call made while it is active (see ``metering``)."""

    def __init__(self) -> None:
        self.total = Usage()

    def add(self, usage: Usage) -> None:
        self.total += usage


_meter: contextvars.ContextVar[UsageMeter | None] = contextvars.ContextVar("usage_meter", default=None)


@contextlib.contextmanager
def metering() -> Iterator[UsageMeter]:
    """Count the model calls made inside the block, including concurrent ones it starts."""
    meter = UsageMeter()
    token = _meter.set(meter)
    try:
        yield meter
    finally:
        _meter.reset(token)


def record_usage(usage: Usage) -> None:
    if (meter := _meter.get()) is not None:
        meter.add(usage)


def get_client() -> AsyncOpenAI:
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None:
        client = _clients[loop] = make_client(settings)
    return client


def make_client(config: Settings) -> AsyncOpenAI:
    common = {"timeout": config.request_timeout, "max_retries": config.client_retries}
    if config.backend == "offline":
        transport = offline_llm.OfflineTransport(config.offline_latency, config.offline_latency_per_token)
        return offline_llm.openai_client(transport, **common)
    # The client reads OPENAI_API_KEY itself; base_url None means api.openai.com.
    return AsyncOpenAI(base_url=config.base_url, **common)


def reply_cache() -> ResponseCache | None:
    """The reply cache at ``settings.llm_cache`` (opened once per path), or None when it is off."""
    global _reply_cache
    if settings.llm_cache is None:
        return None
    if _reply_cache is None or _reply_cache.path != settings.llm_cache:
        _reply_cache = ResponseCache(settings.llm_cache)
    return _reply_cache


class EmptyReplyError(RuntimeError):
    """The model answered with no text, more than once."""


EMPTY_REPLY_RETRIES = 2


@flyte.trace
async def call_llm(system: str, prompt: str, json_mode: bool = False) -> str:
    """One chat completion. Traced: on a cluster a retried task replays it from its checkpoint.

    Locally, the reply cache plays that role: an identical request is answered from disk.
    """
    request = {
        "model": settings.model_name,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": prompt}],
        "temperature": 0.2,
        **({"response_format": {"type": "json_object"}} if json_mode else {}),
    }
    cache, key = reply_cache(), request_key(settings.endpoint, request)
    if cache is not None and (hit := cache.get(key)) is not None:
        record_usage(Usage(cache_hits=1))
        return hit.content
    usage = Usage()
    async with _limit:
        for _ in range(1 + EMPTY_REPLY_RETRIES):
            requests_sent.add()
            try:
                response = await get_client().chat.completions.create(**request)
            except openai.APIStatusError as error:  # a server may quote the key it rejected
                raise type(error)(redact(error.message), response=error.response, body=None) from None
            tokens = response.usage
            usage += Usage(
                requests=1,
                prompt_tokens=tokens.prompt_tokens if tokens else 0,
                completion_tokens=tokens.completion_tokens if tokens else 0,
            )
            text = response.choices[0].message.content or ""
            if text.strip():
                break
        else:
            raise EmptyReplyError(f"the model returned an empty reply {usage.requests} times in a row")
    record_usage(usage)
    if cache is not None:
        cache.put(key, CachedReply(text, usage.prompt_tokens, usage.completion_tokens))
    return text


# {{/docs-fragment llm-call}}

# {{docs-fragment progress-events}}
ProgressListener = Callable[[dict[str, Any]], None]
_listeners: list[ProgressListener] = []


def emit(topic: str, step: str, **details: Any) -> None:
    """Tell listeners (a widget, a test, a log) where a topic is. Never prints."""
    event = {"topic": topic, "step": step, **details}
    for listener in list(_listeners):
        try:
            listener(event)
        except Exception:  # a broken view must never break the pipeline
            logger.exception("progress listener failed on %s", event)


# {{/docs-fragment progress-events}}

# {{docs-fragment traced-steps}}
class CritiqueError(flyte.errors.NonRecoverableError):
    """The critic's reply was unusable twice; retrying the task would not help."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="CritiqueError")


@flyte.trace
async def write_draft(topic: str) -> str:
    return await call_llm(WRITER_PROMPT, f"Topic: {topic}\n\nWrite the report.")


@flyte.trace
async def critique_draft(topic: str, draft: str) -> Critique:
    """Ask for a JSON critique; one bounded repair request if the reply does not validate."""
    prompt = f"Topic: {topic}\n\nReport to review:\n\n{draft}"
    reply = await call_llm(CRITIC_PROMPT, prompt, json_mode=True)
    try:
        return Critique.model_validate_json(reply)
    except ValidationError as error:
        problem = _validation_summary(error)
    repair = (
        f"Topic: {topic}\n\nYour previous reply could not be used: {problem}\n"
        "Reply again with one JSON object with the keys score (integer 1-10), strengths, improvements "
        f"and summary.\n\nReport to review:\n\n{draft}"
    )
    retry = await call_llm(CRITIC_PROMPT, repair, json_mode=True)
    try:
        return Critique.model_validate_json(retry)
    except ValidationError as error:
        raise CritiqueError(
            f"The critic's reply for {topic!r} was invalid twice (after one repair request): "
            f"{_validation_summary(error)}"
        ) from None


def _validation_summary(error: ValidationError) -> str:
    """'score: Input should be less than or equal to 10 (got 11)', without pydantic's URLs."""
    parts = []
    for item in error.errors(include_url=False)[:3]:
        where = ".".join(str(p) for p in item["loc"]) or "reply"
        got = "" if item["type"] == "missing" else f" (got {str(item.get('input'))[:60]!r})"
        parts.append(f"{where}: {item['msg']}{got}")
    return "; ".join(parts)


@flyte.trace
async def revise_draft(topic: str, draft: str, improvements: list[str]) -> str:
    todo = "\n".join(f"- {item}" for item in improvements) or "- Tighten the wording."
    prompt = f"Topic: {topic}\n\nImprovements to make:\n{todo}\n\nCurrent report:\n\n{draft}"
    return await call_llm(REVISER_PROMPT, prompt)


@flyte.trace
async def summarize_report(topic: str, report: str) -> str:
    return await call_llm(SUMMARY_PROMPT, f"Topic: {topic}\n\nReport to summarize:\n\n{report}")


# {{/docs-fragment traced-steps}}

# {{docs-fragment environments}}
# A cache key that cannot go stale. Flyte's default policy hashes only the task
# function's own source, so editing a prompt, a traced helper or the model name
# would silently return old reports. This policy hashes the task's source too,
# and everything else its result depends on.
class ReportConfigPolicy:
    def get_version(self, salt: str, params: Any) -> str:
        task_source = source_hash(params.func) if params.func is not None else ""
        return hashlib.sha256(f"{salt}:{task_source}:{config_fingerprint()}".encode()).hexdigest()


def config_fingerprint() -> str:
    """Everything besides a task's inputs and body that changes what it returns."""
    parts = [
        WRITER_PROMPT,
        CRITIC_PROMPT,
        REVISER_PROMPT,
        SUMMARY_PROMPT,
        critique_schema(),
        settings.backend,
        settings.model_name,
        settings.base_url or "",
        offline_llm.MODEL_VERSION,
        *(source_hash(step) for step in (call_llm, write_draft, critique_draft, revise_draft, summarize_report)),
    ]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


@functools.cache  # asked for on every cache lookup; the class cannot change while the process runs
def critique_schema() -> str:
    return json.dumps(Critique.model_json_schema(), sort_keys=True)


@functools.cache  # source does not change while the process runs, and reading it is slow
def source_hash(function: Callable[..., Any]) -> str:
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()


image = flyte.Image.from_debian_base(python_version=(3, 12)).with_pip_packages(
    "openai>=3.50", "httpx2", "pydantic>=2.7", "pyyaml>=6", "markdown-it-py>=3"
)

llm_env = flyte.TaskEnvironment(
    name="llm-worker",
    image=image,
    resources=flyte.Resources(cpu=1, memory="1Gi"),
    # Warm containers: each replica runs up to 4 topics at once, its LLM calls mostly waiting.
    reusable=flyte.ReusePolicy(replicas=2, concurrency=4, scaledown_ttl=300, idle_ttl=1800),
    secrets=[flyte.Secret(key="openai-api-key", as_env_var="OPENAI_API_KEY")] if settings.backend == "openai" else [],
    env_vars=settings.task_env_vars(),
    cache=flyte.Cache("auto", policies=[ReportConfigPolicy()]),
)

driver_env = flyte.TaskEnvironment(
    name="driver",
    image=image,
    resources=flyte.Resources(cpu=1, memory="1Gi"),
    env_vars=settings.task_env_vars(),
    depends_on=[llm_env],
)
# {{/docs-fragment environments}}


# {{docs-fragment refine-task}}
class Round(Record):
    """One critique: the score it gave and what it asked for."""

    iteration: int
    score: int
    strengths: list[str]
    improvements: list[str]
    summary: str


class RefineResult(Record):
    topic: str
    markdown: str
    history: list[Round]
    model: str
    usage: Usage
    produced_in_run: str = ""  # differs from the current run's name on a cache hit

    @property
    def iterations(self) -> int:
        return len(self.history)

    @property
    def final_score(self) -> int:
        return self.history[-1].score


@llm_env.task(retries=3)
async def refine_report(topic: str, max_iterations: int = 3, quality_threshold: int = 8) -> RefineResult:
    """Draft, then critique and revise until the score reaches the threshold or the rounds run out."""
    with metering() as meter:
        emit(topic, "draft")
        markdown = await write_draft(topic)
        history = []
        for iteration in range(1, max_iterations + 1):
            with flyte.group(f"refinement_{iteration}"):
                emit(topic, "critique", iteration=iteration)
                critique = await critique_draft(topic, markdown)
                history.append(Round(iteration=iteration, **critique.model_dump()))
                emit(topic, "scored", iteration=iteration, score=critique.score)
                # The last round's critique scores the final text, so we never revise after it.
                if critique.score >= quality_threshold or iteration == max_iterations:
                    break
                emit(topic, "revise", iteration=iteration)
                markdown = await revise_draft(topic, markdown, critique.improvements)
    return RefineResult(
        topic=topic,
        markdown=markdown,
        history=history,
        model=settings.model_name,
        usage=meter.total,
        produced_in_run=current_run(),
    )


def current_run() -> str:
    """The name of the Flyte run executing this task ("" outside a task)."""
    return flyte.ctx().action.run_name if flyte.ctx() else ""


# {{/docs-fragment refine-task}}

# {{docs-fragment formatters}}
def format_as_markdown(result: RefineResult, report_date: str) -> str:
    """The report with YAML front matter. A YAML library quotes whatever the topic holds."""
    front_matter = {
        "title": result.topic,
        "date": report_date,
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


SAFE_LINK_SCHEMES = ("http", "https", "mailto")


def is_safe_link(url: str) -> bool:
    """Relative links and http(s)/mailto only: no javascript:, data:, vbscript: or file: URLs."""
    cleaned = re.sub(r"[\x00-\x20]+", "", url).lower()
    scheme = re.match(r"^([a-z][a-z0-9+.\-]*):", cleaned)
    return scheme is None or scheme.group(1) in SAFE_LINK_SCHEMES


# html=False: raw HTML in model text is shown as text, never parsed as markup.
_markdown = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False}).enable("table")
_markdown.validateLink = is_safe_link

def render_markdown(text: str) -> str:
    """Markdown to an HTML fragment that is safe to embed: raw HTML escaped, unsafe links dropped."""
    return _markdown.render(text)


# Defence in depth: even if something slipped through, the page may not run scripts or load anything remote.
CONTENT_SECURITY_POLICY = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"

PAGE_STYLE = """
body { font: 16px/1.6 system-ui, sans-serif; max-width: 46rem; margin: 2rem auto; padding: 0 1rem; color: #1f2328; }
header p { color: #57606a; margin-top: 0; }
h1, h2, h3 { line-height: 1.25; }
table { border-collapse: collapse; } th, td { border: 1px solid #d0d7de; padding: .3rem .6rem; text-align: left; }
code { background: #f6f8fa; padding: .1rem .3rem; }
"""


def html_page(title: str, body: str) -> str:
    """A complete, valid HTML5 document around an already-safe body."""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{PAGE_STYLE}</style>\n</head>\n"
        f"<body>\n{body}</body>\n</html>\n"
    )


def format_as_html(result: RefineResult, report_date: str) -> str:
    """The report as a standalone page: a real Markdown renderer, every piece of model text escaped."""
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


# {{/docs-fragment formatters}}


# {{docs-fragment format-task}}
class ReportFiles(Record):
    """The folder holding report.md, report.html and summary.txt, plus what the summary cost."""

    folder: Dir
    usage: Usage
    produced_in_run: str = ""  # differs from the current run's name on a cache hit


# Cached like refine_report, so a rerun reuses finished reports. In local mode a Dir is just a
# local path, so the files go to a durable folder named by their content (not to /tmp), and the
# driver makes them again if a cached folder was deleted since.
@llm_env.task(retries=2)
async def format_outputs(result: RefineResult, report_date: str) -> ReportFiles:
    emit(result.topic, "format")
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


def write_files(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        atomic_write_text(folder / name, text)


def work_folder(result: RefineResult, report_date: str) -> Path:
    """``<reports>/.work/<slug>-<digest of everything the files depend on>``."""
    digest = hashlib.sha256(
        f"{result.model_dump_json()}\x1f{report_date}\x1f{config_fingerprint()}".encode()
    ).hexdigest()[:16]
    return settings.reports_dir / ".work" / f"{slugify(result.topic)}-{digest}"


# {{/docs-fragment format-task}}


# {{docs-fragment batch-driver}}
MAX_TOPICS = 500
MAX_TOPIC_LENGTH = 200


class TopicReport(Record):
    """One topic's outcome: its refined report and files, or the error that stopped it."""

    topic: str
    slug: str
    result: RefineResult | None = None
    files: ReportFiles | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def validate_batch(topics: Any, max_iterations: Any, quality_threshold: Any) -> list[str]:
    """Check the inputs before any LLM call; a ValueError names the parameter, the value and the fix."""
    if isinstance(topics, str) or not isinstance(topics, Sequence):
        raise ValueError(
            f"topics must be a list of strings, got {type(topics).__name__} {topics!r:.80}; "
            'for example topics=["Quantum computing", "Why cats purr"]'
        )
    if not topics:
        raise ValueError("topics is empty: give at least one topic")
    if len(topics) > MAX_TOPICS:
        raise ValueError(f"topics has {len(topics)} entries; at most {MAX_TOPICS} are allowed per batch")
    cleaned: list[str] = []
    first_seen: dict[str, int] = {}
    for position, topic in enumerate(topics, start=1):
        if not isinstance(topic, str):
            raise ValueError(f"topic #{position} must be a string, got {type(topic).__name__} {topic!r:.60}")
        text = topic.strip()
        if not text:
            raise ValueError(f"topic #{position} is blank: give it some text or remove it")
        if len(text) > MAX_TOPIC_LENGTH:
            raise ValueError(
                f"topic #{position} is {len(text)} characters long; at most {MAX_TOPIC_LENGTH} are allowed"
            )
        if any(ch in text for ch in "\r\n\t\x00") or any(ord(ch) < 32 for ch in text):
            raise ValueError(f"topic #{position} {text[:60]!r} contains a line break or control character")
        if text in first_seen:
            raise ValueError(
                f"topic #{position} {text!r} repeats topic #{first_seen[text]}: each topic may appear once"
            )
        first_seen[text] = position
        cleaned.append(text)
    for name, value in (("max_iterations", max_iterations), ("quality_threshold", quality_threshold)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10:
            raise ValueError(f"{name} must be a whole number from 1 to 10, got {value!r}")
    return cleaned


def coerce_topics(value: Any) -> list[str]:
    """Accept topics as a list, or as the text papermill's ``-p`` and text boxes produce.

    A YAML/JSON list in a string (``"[A, B]"``) is parsed; text with one topic
    per line is split; a single line without commas is one topic. A single line
    with commas is ambiguous ("Kubernetes: cost, scale" is one topic), so it is
    rejected with the way to pass a list. The result still goes through
    ``validate_batch``.
    """
    if not isinstance(value, str):
        return value
    text = value.strip()
    if not text:
        return []
    if text.startswith("["):
        try:
            parsed = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(f"topics {text[:80]!r} looks like a list but does not parse: {error}") from None
        if not isinstance(parsed, list):
            raise ValueError(f"topics {text[:80]!r} must be a list like [Topic A, Topic B]")
        return [str(item) if isinstance(item, (int, float)) else item for item in parsed]
    if "\n" in text:
        return [line.strip() for line in text.splitlines() if line.strip()]
    if "," in text:
        raise ValueError(
            f"topics arrived as one string, {text[:80]!r}: is that one topic or several? Pass a list instead: "
            "papermill -y 'topics: [Topic A, Topic B]' (or -f params.yaml), or one topic per line."
        )
    return [text]


def describe_error(error: BaseException) -> str:
    """'ValueError: message' even when Flyte wrapped the original exception; never contains the API key."""
    kind = getattr(error, "code", None) or type(error).__name__
    return redact(f"{kind}: {error}")


def redact(text: str) -> str:
    """Servers sometimes echo the key they rejected; it must not reach a report, a log or a notebook."""
    key = os.environ.get("OPENAI_API_KEY", "")
    return text.replace(key, "[API key]") if len(key) >= 8 else text


@driver_env.task
async def report_batch_pipeline(
    topics: list[str], max_iterations: int = 3, quality_threshold: int = 8, report_date: str = ""
) -> list[TopicReport]:
    """Refine every topic concurrently, then format every report concurrently."""
    topics = validate_batch(topics, max_iterations, quality_threshold)
    report_date = report_date or dt.date.today().isoformat()
    reports = {topic: TopicReport(topic=topic, slug=slugify(topic)) for topic in topics}

    with flyte.group("refine_all"):
        # return_exceptions: a failed topic becomes a value, and its siblings run to completion.
        refined = await asyncio.gather(
            *(refine_report(topic, max_iterations, quality_threshold) for topic in topics),
            return_exceptions=True,
        )
    for topic, outcome in zip(topics, refined):
        if isinstance(outcome, BaseException):
            reports[topic].error = describe_error(outcome)
            emit(topic, "error", error=reports[topic].error)
        else:
            reports[topic].result = outcome

    done = [report for report in reports.values() if report.result is not None]
    with flyte.group("format_all"):
        formatted = await asyncio.gather(
            *(format_outputs(report.result, report_date) for report in done), return_exceptions=True
        )
        # A cache hit names the folder of an earlier run; if it has been deleted since, make it again.
        gone = [i for i, out in enumerate(formatted) if isinstance(out, ReportFiles) and not await out.folder.exists()]
        again = format_outputs.override(cache="disable", retries=2)
        remade = await asyncio.gather(*(again(done[i].result, report_date) for i in gone), return_exceptions=True)
        for i, out in zip(gone, remade):
            formatted[i] = out
    for report, outcome in zip(done, formatted):
        if isinstance(outcome, BaseException):
            report.error = describe_error(outcome)
            emit(report.topic, "error", error=report.error)
        else:
            report.files = outcome
            emit(report.topic, "done", score=report.result.final_score)
    return list(reports.values())


# {{/docs-fragment batch-driver}}


# {{docs-fragment durable-outputs}}
@dataclasses.dataclass
class BatchResult:
    """What a run produced, as data: widgets, tests and papermill all read this."""

    run_id: str
    run_dir: Path
    report_date: str
    model: str
    reports: list[TopicReport]
    llm_usage: Usage  # spent by this run; a cache hit costs nothing
    cached_topics: list[str]
    flyte_run_name: str = ""  # where Flyte's local run history keeps this run

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
        return [_summary_row(report, self) for report in self.reports]


def _summary_row(report: TopicReport, batch: BatchResult) -> dict[str, Any]:
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
        "cached": report.topic in batch.cached_topics,
        "usage": usage.model_dump() | {"total_tokens": usage.total_tokens},
        "files": {name: f"{report.slug}/{name}" for name in REPORT_FILES} if report.files else {},
        "error": report.error,
    }


REPORT_FILES = ("report.md", "report.html", "summary.txt")


def format_index_html(batch: BatchResult) -> str:
    rows = []
    for row in batch.rows():
        topic = html.escape(row["topic"])
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
    """summary.json: deterministic for the same inputs (no clock, no absolute paths)."""
    return {
        "run_id": batch.run_id,
        "report_date": batch.report_date,
        "model": batch.model,
        "topics": batch.rows(),
        "totals": {
            "topics": len(batch.reports),
            "succeeded": sum(1 for r in batch.reports if r.ok),
            "failed": sum(1 for r in batch.reports if not r.ok),
            "cached": len(batch.cached_topics),
            "llm_usage": batch.llm_usage.model_dump() | {"total_tokens": batch.llm_usage.total_tokens},
        },
    }


def save_run(batch: BatchResult) -> BatchResult:
    """Copy every report into ``<run_dir>/<slug>/`` with an index, atomically.

    The run folder is built beside its final name and moved into place at the
    end, so a crash leaves either the previous folder or the complete new one.
    """
    staging = staging_dir_for(batch.run_dir)
    try:
        for report in batch.reports:
            if report.files is None:
                continue
            report.files.folder.download_sync(staging / report.slug)  # a copy here; a download on a cluster
        atomic_write_text(staging / "index.html", format_index_html(batch))
        atomic_write_text(
            staging / "summary.json", json.dumps(summary_document(batch), indent=2, ensure_ascii=False) + "\n"
        )
        replace_dir(staging, batch.run_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return batch


# {{/docs-fragment durable-outputs}}


# {{docs-fragment run-batch}}
_announced = False


def announce_backend() -> None:
    """Say once per process which model writes the reports (never the key)."""
    global _announced
    if not _announced:
        print(f"Reports are written by the {settings.describe()}.", flush=True)
        _announced = True


class BackendUnavailable(RuntimeError):
    """The configured model server cannot be used; the message says what to check."""


def check_backend(timeout: float = 10.0) -> None:
    """Before a batch, one cheap request (list models) to a real server: fail once, clearly, not per topic."""
    settings.check_ready()
    if settings.backend == "offline":
        return
    where = settings.endpoint
    try:
        with openai.OpenAI(base_url=settings.base_url, timeout=timeout, max_retries=0) as client:
            client.models.list()
    except openai.AuthenticationError as error:
        raise BackendUnavailable(
            f"The server at {where} rejected the API key (HTTP {error.status_code}): check OPENAI_API_KEY."
        ) from None
    except openai.NotFoundError:
        pass  # some OpenAI-compatible servers do not list models; the first real call will tell
    except openai.APIConnectionError as error:
        raise BackendUnavailable(
            f"Cannot reach the model server at {where} ({redact(str(error.__cause__ or error))}). "
            "Is it running? Check OPENAI_BASE_URL, or unset it and OPENAI_API_KEY to use the offline model."
        ) from None


_flyte_run_history: bool | None = None  # what Flyte was initialised with, None: not yet


def init_flyte() -> None:
    """Local mode. Flyte finds the project's .flyte/config.yaml, so its task cache (and the run
    history, when ``settings.run_history`` is on) live in .flyte/local-cache/."""
    global _flyte_run_history
    if _flyte_run_history != settings.run_history:
        flyte.init(local_persistence=settings.run_history)
        logging.getLogger("flyte").setLevel(logging.CRITICAL)  # failures are reported per topic instead
        _flyte_run_history = settings.run_history


def run_batch(
    topics: Sequence[str],
    *,
    max_iterations: int = 3,
    quality_threshold: int = 8,
    report_date: str | None = None,
    output_dir: str | Path | None = None,
    run_id: str | None = None,
    on_event: ProgressListener | None = None,
    use_cache: bool = True,
) -> BatchResult:
    """Run the batch locally and save it: the one entry point for the CLI, notebooks, widgets and tests."""
    topics = validate_batch(topics, max_iterations, quality_threshold)
    check_backend()
    report_date = report_date or dt.date.today().isoformat()
    run_id = run_id or dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    if not re.fullmatch(r"[\w.-]{1,64}", run_id) or run_id.startswith("."):
        raise ValueError(f"run_id {run_id!r} must be 1-64 letters, digits, '.', '_' or '-', not starting with '.'")
    announce_backend()
    init_flyte()
    if on_event:
        _listeners.append(on_event)
    try:
        run = flyte.with_runcontext(mode="local", disable_run_cache=not use_cache).run(
            report_batch_pipeline,
            topics=topics,
            max_iterations=max_iterations,
            quality_threshold=quality_threshold,
            report_date=report_date,
        )
        reports: list[TopicReport] = run.outputs()[0]
    finally:
        if on_event:
            _listeners.remove(on_event)
    this_run = Path(run.url).name

    def made_now(part: RefineResult | ReportFiles | None) -> bool:  # not served by Flyte's cache
        return part is not None and part.produced_in_run in ("", this_run)

    cached = [r.topic for r in reports if r.result and not made_now(r.result)]
    # What this run cost: results served by Flyte's cache cost nothing now.
    spent = sum((part.usage for r in reports for part in (r.result, r.files) if made_now(part)), Usage())
    batch = BatchResult(
        run_id=run_id,
        run_dir=Path(output_dir or settings.reports_dir).expanduser().resolve() / run_id,
        report_date=report_date,
        model=settings.model_name,
        reports=reports,
        llm_usage=spent,
        cached_topics=cached,
        flyte_run_name=this_run,
    )
    return save_run(batch)


# {{/docs-fragment run-batch}}


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Generate refined reports for one or more topics, locally.")
    parser.add_argument("topics", nargs="+", help="one or more topics, each in quotes")
    parser.add_argument("--max-iterations", type=int, default=3, help="critique rounds per topic, 1-10 (default 3)")
    parser.add_argument("--quality-threshold", type=int, default=8, help="score that ends refinement, 1-10 (default 8)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output folder (default: REPORTS_DIR or {settings.reports_dir})")
    parser.add_argument("--run-id", default=None, help="name of the run folder (default: the current time)")
    parser.add_argument("--date", default=None, help="report date for the front matter (default: today)")
    parser.add_argument("--no-cache", action="store_true",
                        help="ask the model again: skip Flyte's task cache and the reply cache")
    args = parser.parse_args(argv)
    if args.no_cache:
        configure(llm_cache=None)
    try:
        batch = run_batch(
            args.topics,
            max_iterations=args.max_iterations,
            quality_threshold=args.quality_threshold,
            report_date=args.date,
            output_dir=args.out,
            run_id=args.run_id,
            use_cache=not args.no_cache,
        )
    except (ValueError, BackendUnavailable) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for row in batch.rows():
        if row["status"] == "ok":
            print(f"  {row['topic']}: score {row['final_score']}/10 after {row['iterations']} round(s)")
        else:
            print(f"  {row['topic']}: {row['error']}")
    failed = sum(1 for r in batch.reports if not r.ok)
    print(f"{len(batch.reports) - failed} of {len(batch.reports)} reports written; index: {batch.index_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
