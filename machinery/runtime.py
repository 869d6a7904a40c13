"""The one owner of a process's runtime state: ``runtime``.

It holds the settings in force and everything made from them: the pace of
model requests (``runtime.pace``: the window of requests in flight, at most
``max_concurrency``, and pauses when the server rate-limits; see
``machinery.pacing``), one model client per event loop, the reply cache, the
count of requests sent and the progress listeners. Nothing else in the project
keeps state at module level.

* ``runtime.configure(**changes)`` changes settings from now on (a notebook cell,
  the CLI's ``--no-cache``).
* ``with runtime.configured(**changes):`` changes them for a block and restores
  them after it, whatever happens inside (tests, the benchmark, timing demos).
* ``with runtime.use_transport(transport):`` routes every model client made in
  the block through an ``httpx2`` transport: the seam tests and the benchmark
  use to put a scripted or logging model behind the real ``openai`` client.
  ``with runtime.use_client(client):`` replaces the client itself (the
  benchmark measures the pipeline without the HTTP client layer this way).
* ``runtime.task_env_vars`` and ``runtime.openai_secrets(...)`` are the live
  values the task environments are declared with: they follow ``configure``,
  so a run or deploy ships the settings in force when it is made.
* ``runtime.model_name`` is the model that writes the reports, recorded in every result and part of
  every cache key. ``runtime.resolve_model()`` names it, and ``model_client.check_backend`` calls it at
  the start of every batch, so a model swapped behind the same URL is seen by the next batch: offline,
  the built-in model; OpenAI's API, ``REPORT_MODEL`` or ``gpt-4o-mini`` (no listing needed); any other
  server is asked (``GET /models``): when it lists exactly one model, that one writes (llama.cpp
  answers with the model it serves whatever a request names; ``model_note`` then says that
  ``REPORT_MODEL`` names another), else ``REPORT_MODEL`` must name it (several, or no listing, without
  it is a ``BackendUnavailable``). ``runtime.requested_model`` is what requests send: ``REPORT_MODEL``,
  the user's choice, or else ``model_name``. A reply that names yet another model (a proxy renaming it)
  is kept in ``reported_models()`` for summary.json, with one ``other-model`` event per batch.
* ``runtime.start_batch()`` starts a batch's counts: ``runtime.batch_usage`` (every model call's
  requests, retries, timeouts, cut-offs, tokens and cache hits, whichever topic made it) and the pace's
  counters and patience; ``runtime.pace.stats()`` reads the latter (``PaceStats``). ``runtime.limit`` is the
  pace's window (an ``InflightLimit``: ``.limit``, ``.peak``, ``.in_flight``).
  Every model client sends through the pace (``pacing.PacedTransport`` around
  the real transport, the offline model or the transport of ``use_transport``);
  ``use_client`` bypasses it, HTTP and all.

Progress events (``listening``) are dicts. A topic's: ``{"topic": "Cats", "step":
"draft"}`` and the other steps pipeline.py emits. The batch's, when the server's
rate limit pauses every request for more than a second (at most one per pause):
``{"topic": None, "step": "rate-limited", "seconds": 2.0, "reason": "HTTP 429 from
the server, retry after 2.0 s"}``; ``seconds`` is how long new requests will wait
(rounded to 0.1 s) and ``reason`` says why, in words (a 429 or 503 and its
retry-after, or the server's ``x-ratelimit-*`` budget being spent).

``model_client.complete`` adds the events of one model call that a person waiting should see, each
naming the topic and the step the call serves (``call``: "draft", "critique", "revision" or
"summary"): ``{"step": "retrying", "call": "draft", "attempt": 2, "attempts": 4, "reason": "HTTP 503
from the server"}`` (the attempt about to be made, of at most ``attempts``), ``{"step":
"still-waiting", "call": "draft", "seconds": 10.0}`` (once per call), ``{"step": "timed-out", "call":
"draft", "seconds": 120.0}``, ``{"step": "cut-off", "call": "draft", "limit": 1500, "shorter": False}``
(``shorter``: the cut-off reply was already the shorter retry) and ``{"step": "gave-up", "call": "draft",
"attempts": 4, "reason": "HTTP 500 from the server", "task_attempt": 0}`` (a recoverable failure left to
Flyte's task retry; ``task_attempt``: Flyte's attempt number, 0 for the first). The batch's
``{"topic": None, "step": "other-model", "reported": "x", "recorded": "y"}``: a reply named a model
other than the one recorded.
``machinery.progress`` words them for a console.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import flyte
import httpx2
import openai
from openai import AsyncOpenAI

from machinery import offline_llm
from machinery.concurrency import InflightLimit, Tally
from machinery.pacing import Pace, PacedHttpClient, PacedTransport
from machinery.reply_cache import ReplyCache
from machinery.settings import OPENAI_URL, Settings

logger = logging.getLogger("pipeline")

ProgressListener = Callable[[dict[str, Any]], None]
SHOWN_MODELS = 10  # names an error lists of a server's models; the rest are counted


class BackendUnavailable(RuntimeError):
    """The configured model server cannot be used; the message says what to check."""


class Counts:
    """Named running counts, added to from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def add(self, numbers: dict[str, int]) -> None:
        with self._lock:
            for name, number in numbers.items():
                self._counts[name] = self._counts.get(name, 0) + number

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.requests_sent = Tally()  # chat completions this process asked a model for
        self.batch_usage = Counts()  # every model call's Usage fields since start_batch (model_client adds)
        self._model_lock = threading.RLock()  # tasks run on Flyte's loop, in another thread
        self.task_env_vars: dict[str, str] = {}  # given to the task environments; kept in sync
        self._secret_lists: list[tuple[list[flyte.Secret], tuple[flyte.Secret, ...]]] = []
        self._listeners: list[ProgressListener] = []
        self._transport: httpx2.AsyncBaseTransport | None = None
        self._client_override: Any = None
        self._announced: str | None = None  # the last announcement printed
        self._reported_models: set[str] = set()  # other models replies named in this batch
        self._flyte_run_history: bool | None = None  # what Flyte was initialised with; None: not yet
        self._reply_cache: ReplyCache | None = None
        self._apply(settings)

    def __reduce__(self) -> str:
        # Pickled (Flyte pickles task functions, and what they use, to version a deployment) as a
        # reference to the one runtime of the process that loads it: state never travels.
        return "runtime"

    # ------------------------------------------------------------------ settings

    @property
    def settings(self) -> Settings:
        return self._settings

    def configure(self, **changes: Any) -> Settings:
        """Change settings from now on, e.g. ``runtime.configure(offline_latency=0.2)``.

        Checked first, with the rules of the environment variables (``Settings.changed``): a bad value is a
        ``ValueError`` naming the field and its variable, an unknown name a ``TypeError``, and either
        leaves everything as it was."""
        self._apply(self._settings.changed(**changes))
        return self._settings

    @contextlib.contextmanager
    def configured(self, **changes: Any) -> Iterator[Settings]:
        """Change settings for the ``with`` block only (checked as ``configure`` checks them, before it)."""
        settings = self._settings.changed(**changes)  # a bad change fails here, before anything changes
        before = self._settings
        self._apply(settings)
        try:
            yield settings
        finally:
            self._apply(before)

    def _apply(self, settings: Settings) -> None:
        # What could fail comes first, so a failure leaves the runtime as it was.
        # New settings, a new pace (as new clients): its window starts again below the new ceiling.
        pace = Pace(settings.max_concurrency, settings.rate_limit_patience, on_pause=self._paused)
        task_env_vars = settings.task_env_vars()
        self._settings = settings
        self.pace = pace
        # New settings, new clients (made on first use in each event loop).
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncOpenAI] = (
            weakref.WeakKeyDictionary()
        )
        with self._model_lock:
            self._model: str | None = None  # the model name, once known (model_name)
            self.model_note: str | None = None  # when REPORT_MODEL names another than the one served
        self.task_env_vars.clear()
        self.task_env_vars.update(task_env_vars)
        for live, secrets in self._secret_lists:
            live[:] = secrets if settings.backend == "openai" else []

    def openai_secrets(self, *secrets: flyte.Secret) -> list[flyte.Secret]:
        """A list holding ``secrets`` while the ``openai`` backend is selected, and empty otherwise."""
        live: list[flyte.Secret] = []
        self._secret_lists.append((live, secrets))
        live[:] = secrets if self._settings.backend == "openai" else []
        return live

    # ------------------------------------------------------------------ which model writes

    @property
    def model_name(self) -> str:
        """The model that writes the reports (``resolve_model``, if not named since the settings changed).
        Named here, outside a batch (a deploy, a step awaited in a notebook), ``REPORT_MODEL`` stands when the
        server cannot be asked: a deploy prepares tasks for a server this machine may not reach."""
        with self._model_lock:
            return self._model if self._model is not None else self.resolve_model(server_required=False)

    @property
    def known_model(self) -> str | None:
        """The model named since the settings changed, if any (``model_name`` without asking anyone)."""
        with self._model_lock:
            return self._model

    @property
    def requested_model(self) -> str:
        """The name requests send: ``REPORT_MODEL``, the user's choice, or else the model that writes."""
        return self._settings.model_name or self.model_name

    def resolve_model(self, timeout: float = 10.0, *, server_required: bool = True) -> str:
        """Name the model that writes the reports now, asking the server when it is not OpenAI's (see the
        module's docstring). Raises ``BackendUnavailable``, or the ``openai`` client's errors for
        ``GET /models`` (``check_backend`` words them); with ``server_required=False``, a server that cannot
        be asked leaves ``REPORT_MODEL``, when set, as the model."""
        settings = self._settings
        with self._model_lock:
            if settings.backend == "offline" or settings.endpoint == OPENAI_URL:
                model, note = settings.model_name, None
            else:
                try:
                    model, note = self._served_model(self._list_models(timeout))
                except openai.OpenAIError:  # unreachable, or no key here (a deploy's key is the cluster's secret)
                    if server_required or not settings.model:
                        raise
                    model, note = settings.model, None
            self._model, self.model_note = model, note
            if settings.backend == "openai" and not settings.model:  # a cluster's containers use the same model
                self.task_env_vars["REPORT_MODEL"] = model
            return model

    def _list_models(self, timeout: float) -> tuple[str, ...]:
        """What ``GET /models`` lists; nothing when the server has no such route."""
        try:
            with openai.OpenAI(base_url=self._settings.base_url, timeout=timeout, max_retries=0) as client:
                return tuple(model.id for model in client.models.list())
        except openai.NotFoundError:
            return ()  # some OpenAI-compatible servers do not list models

    def _served_model(self, listed: tuple[str, ...]) -> tuple[str, str | None]:
        """The model that writes, and a note when ``REPORT_MODEL`` names another."""
        where, chosen = self._settings.shown_endpoint, self._settings.model
        if len(listed) == 1:
            served = listed[0]
            note = None if chosen in (None, served) else (
                f"REPORT_MODEL={chosen} is not the model the server lists: it serves {served} whatever a request "
                f"names, so {served} is recorded as the model.")
            return served, note
        if chosen:
            return chosen, None
        if listed:
            shown = ", ".join(listed[:SHOWN_MODELS]) + (
                f" and {len(listed) - SHOWN_MODELS} more" if len(listed) > SHOWN_MODELS else "")
            raise BackendUnavailable(
                f"The server at {where} serves {len(listed)} models ({shown}): set REPORT_MODEL to the one that "
                "should write the reports.")
        raise BackendUnavailable(
            f"The server at {where} does not list the model it serves (GET /models): set REPORT_MODEL to the "
            "model's name.")

    def note_reported_model(self, reported: str | None) -> None:
        """A reply named ``reported``. Another model than the one recorded (not merely a dated version of it,
        as OpenAI answers "gpt-4o-mini-2024-07-18" to "gpt-4o-mini") is kept for summary.json and, the first
        time in a batch, told to listeners. Never fails: proxies rename models."""
        recorded = self.model_name
        if not reported or reported == recorded or reported.startswith(f"{recorded}-"):
            return
        with self._model_lock:
            first = not self._reported_models
            self._reported_models.add(reported)
        if first:
            self.emit(None, "other-model", reported=reported, recorded=recorded)

    def reported_models(self) -> list[str]:
        """The other models replies named since ``start_batch`` (``note_reported_model``), sorted."""
        with self._model_lock:
            return sorted(self._reported_models)

    # ------------------------------------------------------------------ the model client layer

    def client(self) -> AsyncOpenAI:
        """The client for the running event loop.

        A notebook awaits on the kernel's loop while Flyte runs tasks on a loop of its
        own, and an AsyncOpenAI client (its connection pool) must never be shared
        between two loops.
        """
        if self._client_override is not None:
            return self._client_override
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = self._clients[loop] = self._make_client()
        return client

    @property
    def limit(self) -> InflightLimit:
        """The cap on model requests in flight, across event loops: the pace's current window."""
        return self.pace.limit

    def _make_client(self) -> AsyncOpenAI:
        settings = self._settings
        # max_retries=0: model_client.complete retries, within one deadline for all of a call's attempts.
        common: dict[str, Any] = {"timeout": settings.request_timeout, "max_retries": 0}
        if self._transport is not None:
            return offline_llm.openai_client(PacedTransport(self._transport, self.pace), **common)
        if settings.backend == "offline":
            transport = offline_llm.OfflineTransport(settings.offline_latency, settings.offline_latency_per_token)
            return offline_llm.openai_client(PacedTransport(transport, self.pace), **common)
        # The client reads OPENAI_API_KEY itself; base_url None means api.openai.com.
        return AsyncOpenAI(base_url=settings.base_url, http_client=PacedHttpClient(self.pace), **common)

    @contextlib.contextmanager
    def use_transport(self, transport: httpx2.AsyncBaseTransport) -> Iterator[None]:
        """Answer every model request made in the block with ``transport`` (a test double, a logger)."""
        before = self._transport
        self._transport = transport
        self._clients = weakref.WeakKeyDictionary()
        try:
            yield
        finally:
            self._transport = before
            self._clients = weakref.WeakKeyDictionary()

    @contextlib.contextmanager
    def use_client(self, client: Any) -> Iterator[None]:
        """Use ``client`` (anything with ``chat.completions.create``) for every model request in the block."""
        before = self._client_override
        self._client_override = client
        try:
            yield
        finally:
            self._client_override = before

    def reply_cache(self) -> ReplyCache | None:
        """The reply cache at ``settings.reply_cache`` (opened once per path), or None when it is off."""
        path = self._settings.reply_cache
        if path is None:
            return None
        if self._reply_cache is None or self._reply_cache.path != path:
            self._reply_cache = ReplyCache(path)
        return self._reply_cache

    # ------------------------------------------------------------------ progress events

    @contextlib.contextmanager
    def listening(self, listener: ProgressListener | None) -> Iterator[None]:
        """Send the progress events of the block to ``listener`` (a widget, a test, a log)."""
        if listener is None:
            yield
            return
        self._listeners.append(listener)
        try:
            yield
        finally:
            self._listeners.remove(listener)

    def emit(self, topic: str | None, step: str, **details: Any) -> None:
        """Tell listeners where a topic is (``topic=None``: the whole batch). Never prints."""
        event = {"topic": topic, "step": step, **details}
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # a broken view must never break the pipeline
                logger.exception("progress listener failed on %s", event)

    def start_batch(self) -> None:
        """Count from now: ``batch_usage`` and the pace's counters; the pace's patience starts now."""
        self.batch_usage.reset()
        self.pace.start_batch()
        with self._model_lock:
            self._reported_models = set()

    def _paused(self, seconds: float, reason: str) -> None:
        self.emit(None, "rate-limited", seconds=round(seconds, 1), reason=reason)

    # ------------------------------------------------------------------ Flyte and the console

    def init_flyte(self) -> None:
        """Local mode. Flyte finds the project's .flyte/config.yaml, so its task cache (and the run
        history, when ``settings.run_history`` is on) live in .flyte/local-cache/."""
        if self._flyte_run_history != self._settings.run_history:
            flyte.init(local_persistence=self._settings.run_history)
            logging.getLogger("flyte").setLevel(logging.CRITICAL)  # failures are reported per topic instead
            self._flyte_run_history = self._settings.run_history

    def describe(self) -> str:
        """Which model writes the reports, where, in one line (asks the server for its model if need be)."""
        return self._settings.describe(self.model_name)

    def announce_backend(self) -> None:
        """Say which model writes the reports (never the key): once per process, and again when it changes."""
        line = f"Reports are written by the {self.describe()}."
        if self.model_note:
            line += f"\nNote: {self.model_note}"
        if line != self._announced:
            print(line, flush=True)
            self._announced = line


runtime = Runtime(Settings.from_env())
