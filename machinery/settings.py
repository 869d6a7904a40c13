"""Settings: where the model lives and how hard we may call it, read from environment variables.

``Settings.from_env()`` parses and checks them once; a bad value is a ``ValueError`` that names the
variable and what it accepts. ``Settings(...)`` itself checks its values against the same rules (so do
``dataclasses.replace`` and ``runtime.configure``, which use it): a bad one is a ``ValueError`` that names
the field, its variable and what it accepts. The live settings of a process belong to ``machinery.runtime``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

from machinery import offline_llm

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("offline", "openai")
OPENAI_URL = "https://api.openai.com/v1"
OFF = ("off", "0", "false", "no", "none")
DEFAULT_OPENAI_MODEL = "gpt-4o-mini"  # at OpenAI's own API when REPORT_MODEL is not set
# The setting that limits each step's reply: a report (its draft and revisions), a critique, a summary.
REPLY_LIMITS = {"draft": "max_tokens_report", "revision": "max_tokens_report", "critique": "max_tokens_critique",
                "summary": "max_tokens_summary"}
REPLY_LIMIT_SETTINGS = tuple(dict.fromkeys(REPLY_LIMITS.values()))  # each Settings field once
ON = ("on", "1", "true", "yes")
# The numeric settings and their one set of rules, for both ways in (Settings.from_env reads text,
# Settings(...) checks values): field -> (environment variable, int or float, the least value allowed).
NUMBERS: dict[str, tuple[str, type, int | float]] = {
    "max_concurrency": ("REPORT_MAX_CONCURRENCY", int, 1),
    "request_timeout": ("REPORT_REQUEST_TIMEOUT", float, 0.001),
    "client_retries": ("REPORT_CLIENT_RETRIES", int, 0),
    "max_tokens_report": ("REPORT_MAX_TOKENS_REPORT", int, 1),
    "max_tokens_critique": ("REPORT_MAX_TOKENS_CRITIQUE", int, 1),
    "max_tokens_summary": ("REPORT_MAX_TOKENS_SUMMARY", int, 1),
    "rate_limit_patience": ("REPORT_RATE_LIMIT_PATIENCE", float, 0.0),
    "offline_latency": ("REPORT_OFFLINE_LATENCY", float, 0.0),
    "offline_latency_per_token": ("REPORT_OFFLINE_LATENCY_PER_TOKEN", float, 0.0),
}
MEANINGS = {int: "a whole number of", float: "a number of seconds,"}  # "must be <meaning> at least <minimum>"
# Every field's environment variable, for messages that say what to change.
VARIABLES = {
    "backend": "REPORT_BACKEND", "model": "REPORT_MODEL", "base_url": "OPENAI_BASE_URL", "reports_dir": "REPORTS_DIR",
    "reply_cache": "REPORT_REPLY_CACHE", "run_history": "REPORT_RUN_HISTORY",
    **{field: variable for field, (variable, _, _) in NUMBERS.items()},
}
BACKEND_CHOICES = ("use 'offline' (built-in model, no network) or 'openai' (OpenAI or any OpenAI-compatible server "
                   "such as Ollama, vLLM or llama.cpp).")


@dataclasses.dataclass(frozen=True)
class Settings:
    backend: str = "offline"  # "offline" or "openai" (any OpenAI-compatible server)
    # REPORT_MODEL, the name requests send. None: OpenAI's API uses DEFAULT_OPENAI_MODEL. Any other server
    # is asked which model it serves at every batch (runtime.resolve_model), so reports and cache keys name
    # the model that really wrote them, even where REPORT_MODEL names another (llama.cpp ignores it).
    model: str | None = None
    base_url: str | None = None  # None: the client's default, OPENAI_URL
    # The most HTTP requests to the model in flight at once, process-wide: a ceiling, not a target.
    # Below it an adaptive window (machinery/pacing.py) starts at 8 and finds what the server accepts:
    # it halves on a 429, a 503 or a timeout and grows while replies succeed. The window protects
    # rate-limited APIs; the ceiling protects sockets and servers that never push back. 64 keeps every
    # request on one of the openai client's 100 kept-alive connections, lets a batching server (vLLM)
    # fill its batches, and is more topics refining at once than a batch usually has. A slow local
    # server that queues instead of refusing (Ollama on a CPU) wants about what it runs at once
    # (OLLAMA_NUM_PARALLEL): its only signal is a timeout, after REPORT_REQUEST_TIMEOUT.
    max_concurrency: int = 64
    reports_dir: Path = PROJECT_ROOT / "reports"
    # Seconds the server may take over one model call, all its attempts together (model_client.complete):
    # a reply that has not arrived by then is a ModelTimeout that nobody retries, so no layer multiplies
    # the wait. Time queued in the project's own pace (REPORT_MAX_CONCURRENCY, a rate-limit pause) is not
    # the server's and does not count. 120 s fits OpenAI's slowest replies and a small model on a GPU; a
    # CPU may need more.
    request_timeout: float = 120.0
    # Attempts after the first, within that one deadline, for a dropped connection, an HTTP 408, 409
    # or 5xx, or an empty reply (model_client.complete; 429s are the pace's, below). The openai client
    # itself never retries.
    client_retries: int = 3
    # The most tokens each step's reply may have (max_tokens in every request). A small local model
    # without a limit writes until its context is full; a reply that reaches it ends with
    # finish_reason "length" and is handled as cut off. The offline model stays below them for any topic
    # (offline_llm.LONGEST_REPLY_TOKENS: at most 1289 tokens for a revision, 130 for a critique or a summary).
    max_tokens_report: int = 1500  # a draft or a revision: the prompt asks for 500-800 words
    max_tokens_critique: int = 500  # the critic's JSON
    max_tokens_summary: int = 400  # two or three short paragraphs
    # Seconds a batch waits on a rate limit without any request succeeding before a 429 becomes a
    # per-topic error that Flyte does not retry (until then the pace waits 429s out; the client never
    # sees them). A 429 means "wait", not "failed", as long as the server keeps serving; 10 minutes
    # rides out several refills of a per-minute budget even at a new key's few requests per minute,
    # while a spent daily quota, or a server asking for an hour, ends the batch within 10 minutes with a
    # message that says so. Progress resets it, so a large batch paced for an hour never runs out.
    # 0: fail on the first 429.
    rate_limit_patience: float = 600.0
    offline_latency: float = 0.0  # seconds the offline model waits per reply, to mimic a real API
    offline_latency_per_token: float = 0.0  # and per generated token (e.g. 0.01 for ~100 tokens/s)
    reply_cache: Path | None = PROJECT_ROOT / ".reply-cache" / "replies.sqlite3"  # None: every call asks the model
    run_history: bool = False  # Flyte's local run history (for `flyte start tui`); costs ~3 ms per traced call

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Self:
        env = dict(os.environ if environ is None else environ)
        if "REPORT_LLM_CACHE" in env:
            raise ValueError("REPORT_LLM_CACHE was renamed: set REPORT_REPLY_CACHE instead (a path, or 'off')")
        has_openai = bool(env.get("OPENAI_API_KEY") or env.get("OPENAI_BASE_URL"))
        backend = (env.get("REPORT_BACKEND") or ("openai" if has_openai else "offline")).strip().lower()
        if backend not in BACKENDS:
            raise ValueError(f"REPORT_BACKEND={backend!r} is not a known backend: {BACKEND_CHOICES}")
        reports_dir = Path(env["REPORTS_DIR"]).expanduser().resolve() if env.get("REPORTS_DIR") else cls.reports_dir
        cache_setting = (env.get("REPORT_REPLY_CACHE") or "").strip()
        if cache_setting.lower() in OFF:
            reply_cache = None
        else:
            reply_cache = Path(cache_setting).expanduser().resolve() if cache_setting else cls.reply_cache
        return cls(
            backend=backend,
            model=env.get("REPORT_MODEL") or None,
            base_url=env.get("OPENAI_BASE_URL") or None,
            reports_dir=reports_dir,
            **{field: _number(env, variable, getattr(cls, field), kind, minimum, MEANINGS[kind])
               for field, (variable, kind, minimum) in NUMBERS.items()},
            reply_cache=reply_cache,
            run_history=_switch(env, "REPORT_RUN_HISTORY", cls.run_history),
        )

    def __post_init__(self) -> None:
        """Check every value with ``from_env``'s rules (``NUMBERS``, ``BACKENDS``), however the settings were
        made; a path given as a string becomes a ``Path``, a whole number of seconds a float."""
        if self.backend not in BACKENDS:
            raise ValueError(f"{self._named('backend')} is not a known backend: {BACKEND_CHOICES}")
        for field, (_, kind, minimum) in NUMBERS.items():
            value = getattr(self, field)
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if kind is int:
                number = number and isinstance(value, int)
            if not number or not value >= minimum:  # `not >=` also rejects nan
                raise ValueError(f"{self._named(field)} must be {MEANINGS[kind]} at least {minimum}")
            object.__setattr__(self, field, kind(value))
        for field, what in (("model", "a model's name"), ("base_url", "a URL")):
            if not isinstance(getattr(self, field), str | None):
                raise ValueError(f"{self._named(field)} must be {what} (a string) or None")
        if not isinstance(self.run_history, bool):
            raise ValueError(f"{self._named('run_history')} must be True or False")
        object.__setattr__(self, "reports_dir", self._path("reports_dir", "must be a path (a Path or a string)"))
        if self.reply_cache is not None:
            off = isinstance(self.reply_cache, str) and self.reply_cache.strip().lower() in OFF
            object.__setattr__(self, "reply_cache", self._path(
                "reply_cache", "must be a path (a Path or a string), or None to switch the reply cache off", off))

    def _named(self, field: str) -> str:
        """``field=value (VARIABLE)``: the start of a message about a bad value."""
        return f"{field}={getattr(self, field)!r} ({VARIABLES[field]})"

    def _path(self, field: str, rule: str, refused: bool = False) -> Path:
        value = getattr(self, field)
        if refused or not isinstance(value, str | os.PathLike) or not str(value).strip():
            raise ValueError(f"{self._named(field)} {rule}")
        return Path(value).expanduser()  # "~/reports" as from_env reads it

    def changed(self, **changes: Any) -> Self:
        """These settings with ``changes`` (field names, as in ``Settings(...)``), checked: a ``TypeError`` for
        a name that is not a setting, a ``ValueError`` naming the field and its variable for a bad value."""
        fields = [field.name for field in dataclasses.fields(self)]
        for name in changes:
            if name not in fields:
                close = difflib.get_close_matches(name, fields, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise TypeError(f"{name!r} is not a setting{hint}: the settings are {', '.join(fields)}")
        return dataclasses.replace(self, **changes)

    @property
    def endpoint(self) -> str:
        """Which server answers: part of every cached reply's key."""
        if self.backend == "offline":
            return "offline"
        return self.base_url.rstrip("/") if self.base_url else OPENAI_URL  # ".../v1/" is the same server

    @property
    def shown_endpoint(self) -> str:
        """``endpoint`` for messages: without a user or password it may carry (``http://user:secret@host``)."""
        return re.sub(r"//[^/@]*@", "//", self.endpoint)

    @property
    def model_name(self) -> str | None:
        """The model requests name, when the settings alone say it; None: ask the server which it serves
        (``runtime.resolve_model``, which also decides the model recorded as writing the reports)."""
        if self.backend == "offline":
            return offline_llm.MODEL_VERSION
        if self.model:
            return self.model
        return DEFAULT_OPENAI_MODEL if self.endpoint == OPENAI_URL else None

    def reply_limit(self, step: str) -> int:
        """The most tokens a reply for ``step`` ("draft", "revision", "critique", "summary") may have."""
        return getattr(self, self._reply_limit(step))

    def reply_limit_variable(self, step: str) -> str:
        """The environment variable that sets ``reply_limit(step)``, for messages that say what to change."""
        return VARIABLES[self._reply_limit(step)]

    @staticmethod
    def _reply_limit(step: str) -> str:
        if step not in REPLY_LIMITS:
            raise ValueError(f"step {step!r} is not one of {', '.join(REPLY_LIMITS)}: each has its own reply limit")
        return REPLY_LIMITS[step]

    def describe(self, model: str | None = None) -> str:
        """One line for people; never contains the API key. ``model``: the name the server gave, if asked."""
        if self.backend == "offline":
            return f"offline model {self.model_name} (built in, deterministic, no network)"
        if name := model or self.model_name:
            return f"model {name} at {self.shown_endpoint} (OpenAI-compatible)"
        return f"model served at {self.shown_endpoint} (OpenAI-compatible)"  # its name not asked for yet

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
        env = {"REPORT_BACKEND": self.backend, "REPORT_REPLY_CACHE": "off"}
        if self.backend == "openai" and self.model_name:  # else runtime adds the name the server gave, once asked
            env["REPORT_MODEL"] = self.model_name
        if self.base_url:
            env["OPENAI_BASE_URL"] = self.base_url
        # A reply limit changes what the model writes, and the cache key: the container must use the same one.
        for field in REPLY_LIMIT_SETTINGS:
            if getattr(self, field) != getattr(Settings, field):
                env[VARIABLES[field]] = str(getattr(self, field))
        return env


def _number(env: dict[str, str], name: str, default: Any, kind: type, minimum: Any, meaning: str) -> Any:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not value >= minimum:  # `not >=` also rejects nan
        raise ValueError(f"{name}={raw!r} must be {meaning} at least {minimum}")
    return value


def _switch(env: dict[str, str], name: str, default: bool) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw in ON:
        return True
    if raw in OFF:
        return False
    raise ValueError(f"{name}={raw!r} must be 'on' or 'off'")
