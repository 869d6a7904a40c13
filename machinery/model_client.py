"""The model client layer: one chat completion, with everything a learner need not read.

``complete(request, topic=..., step=...)`` sends one chat-completion request body through the real
``openai`` client of the running event loop and returns the reply's text. On the way it

* answers an identical earlier request from the reply cache (no request sent), and knows a request
  whose reply was cut off before (it goes straight to the shorter one);
* goes at the pace of ``runtime.pace`` (``machinery.pacing``): the client's transport holds each HTTP
  attempt to the window of requests in flight and waits out the server's rate limits, so a 429
  reaches ``complete`` only when the batch's patience has run out; it then becomes a
  ``ServerLimitError`` that Flyte does not retry and that says what to change;
* retries, itself (the ``openai`` client is made with ``max_retries=0``): a dropped connection, an
  HTTP 408, 409 or 5xx, or an empty reply, at most ``REPORT_CLIENT_RETRIES`` times, after a growing
  backoff (or the wait the server names; an empty reply at once);
* gives every attempt of the call one shared deadline: the server may take ``REPORT_REQUEST_TIMEOUT``
  seconds over them all, counted from the first attempt's send less the time attempts wait in the
  project's own pace (``pacing.queue_time``), which is not the server's; each attempt's timeout is the
  time left. A call out of time is a ``ModelTimeout`` that says what to change and that Flyte does not
  retry: a slow model never costs attempts x retries x the timeout;
* handles a reply that stopped at the request's ``max_tokens`` (``finish_reason`` ``"length"``): it is
  never stored in the cache (a marker is, so a rerun skips the request); with ``retry_shorter`` the
  request is sent once more with ``SHORTER`` added to its instructions; then it raises ``ReplyCutOff``,
  naming the setting that raises the limit. A reply that stopped so, but after fewer tokens than
  ``max_tokens``, filled the model's context (prompt plus reply; a small local model's): the shorter
  request asks for what the context left room for, its ``ReplyCutOff`` says that a larger context, not a
  higher limit, helps, and no marker is kept (a larger context behind the same URL must be tried);
* fails at once, with ``RequestRejected`` that Flyte does not retry, on an HTTP 400: the same request
  would be rejected again. A prompt too long for the model's context (``ContextExceeded``) says what to
  change; any other (``BadRequest``) quotes the server;
* names the server and ``OPENAI_BASE_URL`` in the error of a call that could not reach it;
* tells progress listeners, naming the topic and the step, when it retries, when a call has waited
  ``STILL_WAITING_AFTER`` seconds, when it times out, when a reply is cut off and when it gives up on a
  failure that Flyte's task retry may still get past (``runtime.emit``); and notes a reply that names
  another model than the one recorded (``runtime.note_reported_model``);
* strips the API key from any error a server sends back, and any user or password from the server's
  URL in messages;
* adds what the call cost, failed attempts included, to the active usage meter (see ``metering``)
  and to the batch's counts (``runtime.batch_usage``).

It also holds the check made once before a batch (``check_backend``) and the error wording used in
reports (``describe_error``).
"""

# No ``from __future__ import annotations``: Flyte resolves the annotations of ``Usage`` (a field
# of the pipeline's results) on every conversion, and string annotations make that slower.
import asyncio
import contextlib
import contextvars
import functools
import os
import random
import re
import time
from typing import Any

import flyte.errors
import openai

from machinery import pacing
from machinery.concurrency import bound
from machinery.records import Record
from machinery.reply_cache import CachedReply, request_key
from machinery.runtime import BackendUnavailable, runtime

STILL_WAITING_AFTER = 10.0  # seconds a call waits before listeners hear it is still waiting (tests shorten it)
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 8.0  # seconds before a retry, doubling per attempt (the openai client's own)
RETRIED_STATUSES = (408, 409)  # and every 5xx: the openai client's own choice
# Added to the instructions of a text asked for again after a cut-off reply: it overrides the length the
# prompt asks for. About 0.75 words a token: half the limit in words leaves room.
SHORTER = ("\nYour previous reply was cut off at the limit of {limit} tokens. This time the whole reply must fit "
           "in {limit} tokens: at most {words} words, fewer than asked above if need be.")
# Where a small local model's context is set: what to change when prompt and reply do not fit in it.
LARGER_CONTEXT = "llama.cpp: -c, Ollama: num_ctx"
# An HTTP 400 for a prompt longer than the model's context: llama.cpp's error type, OpenAI's (and vLLM's) code,
# or words to that effect from other servers.
CONTEXT_ERRORS = ("exceed_context_size_error", "context_length_exceeded")
CONTEXT_WORDS = re.compile(r"context (size|length|window)|maximum context", re.IGNORECASE)


class Usage(Record):
    """What model calls cost: requests sent (every attempt), replies reused from the cache, tokens spent,
    and the attempts that went wrong. Adds up across calls, topics and runs."""

    requests: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0  # attempts after a call's first (a dropped connection, 408/409/5xx, an empty reply)
    timed_out: int = 0  # calls that got no reply within REPORT_REQUEST_TIMEOUT
    cut_off: int = 0  # replies that stopped at the reply limit (finish_reason "length")

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(**{name: getattr(self, name) + getattr(other, name) for name in Usage.model_fields})


# Usage travels beside the replies, not inside them: traced functions return plain text,
# which is what Flyte records cheapest, and each task reads its own meter at the end.
# A context variable, so concurrent topics never mix their counts.
class UsageMeter:
    """Adds up the usage of every model call made while it is active (see ``metering``)."""

    def __init__(self) -> None:
        self.total = Usage()

    def add(self, usage: Usage) -> None:
        self.total += usage


_active_meter: contextvars.ContextVar[UsageMeter | None] = contextvars.ContextVar("usage_meter", default=None)


def metering() -> contextlib.AbstractContextManager[UsageMeter]:
    """Count the model calls made inside the block, including concurrent ones it starts."""
    return bound(_active_meter, UsageMeter())


def _record(usage: Usage) -> None:
    runtime.batch_usage.add(usage.model_dump())
    if (meter := _active_meter.get()) is not None:
        meter.add(usage)


class EmptyReplyError(RuntimeError):
    """The model answered with no text, on every attempt."""


class ServerLimitError(flyte.errors.NonRecoverableError):
    """The server's rate limit outlasted the batch's patience (code ``RateLimited``), or the account has
    no credit left (``QuotaExceeded``). Retrying the task at once would meet the same limit, so Flyte won't."""

    def __init__(self, message: str, code: str = "RateLimited") -> None:
        super().__init__(message, code=code)


class ModelTimeout(flyte.errors.NonRecoverableError):
    """A model call got no reply within REPORT_REQUEST_TIMEOUT, all attempts together. A task retry would
    wait as long again, so Flyte won't; the message says which setting to change."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="ModelTimeout")


class ReplyCutOff(flyte.errors.NonRecoverableError):
    """The reply stopped before it was done (``finish_reason`` "length"): an unfinished text. At the request's
    reply limit, ``limit``; or, ``tokens`` (its length) short of it, where the model's context (prompt plus
    reply) was full, which a higher limit would not change. Asking the same again gets the same, so Flyte
    won't; the steps decide (pipeline.py)."""

    def __init__(self, topic: str, step: str, limit: int, setting: str, shorter: bool = False,
                 tokens: int | None = None) -> None:
        self.topic, self.step, self.limit, self.setting, self.shorter = topic, step, limit, setting, shorter
        self.tokens = tokens if tokens is not None and tokens < limit else None  # None: it reached the limit
        asked = ", even though a shorter reply was asked for" if shorter else ""
        if self.tokens is None:
            message = (f"{topic}: the {step} hit the reply limit of {limit} tokens and was cut off "
                       f"(finish_reason \"length\"){asked}. Raise {setting} for longer replies.")
        else:
            message = (f"{topic}: the {step} stopped after {tokens} tokens, before the reply limit of {limit} tokens "
                       f"(finish_reason \"length\"){asked}: the model's context (prompt plus reply) is probably full. "
                       f"Use a server or model with a larger context window ({LARGER_CONTEXT}) or shorter prompts; "
                       f"raising {setting} will not help.")
        super().__init__(message, code="ReplyCutOff")

    @property
    def reason(self) -> str:
        """Why the reply is unfinished and what would help, in a few words for a larger message."""
        if self.tokens is None:
            return f"the reply hit the limit of {self.limit} tokens (raise {self.setting} for longer replies)"
        return (f"the reply stopped after {self.tokens} tokens, before the limit of {self.limit}: the model's context "
                f"is full (use a larger context window: {LARGER_CONTEXT})")

    def __reduce__(self) -> tuple[Any, ...]:  # pickled with its fields, not only its message
        return ReplyCutOff, (self.topic, self.step, self.limit, self.setting, self.shorter, self.tokens)


class RequestRejected(flyte.errors.NonRecoverableError):
    """The server answered HTTP 400: this request is wrong for it, and would be rejected again, so neither
    ``complete`` nor Flyte retries it. Code ``ContextExceeded``: the prompt does not fit in the model's context
    window; ``BadRequest``: anything else, in the server's words."""

    def __init__(self, message: str, code: str = "BadRequest") -> None:
        super().__init__(message, code=code)


async def complete(request: dict[str, Any], *, topic: str, step: str, retry_shorter: bool = False) -> str:
    """Send one chat-completion request body for ``step`` ("draft", ...) of ``topic``; return the reply's text.

    ``retry_shorter``: after a reply cut off at its limit, ask once more, for a shorter one (a text; the
    critic's JSON is repaired by the pipeline instead)."""
    try:
        return await _complete(request, topic, step)
    except ReplyCutOff as cut:
        if not retry_shorter:
            raise
        system, *rest = request["messages"]
        room = cut.limit if cut.tokens is None else cut.tokens  # a full context left room for only so many
        shorter = {**system, "content": system["content"] + SHORTER.format(limit=room, words=room // 2)}
        return await _complete({**request, "messages": [shorter, *rest]}, topic, step, shorter=True)


async def _complete(request: dict[str, Any], topic: str, step: str, shorter: bool = False) -> str:
    # The model that writes is part of the key when requests name another (llama.cpp serves its one model
    # whatever they name): a model swapped behind the same URL never answers from the old one's replies.
    source, writer = runtime.settings.endpoint, runtime.model_name
    source = source if request.get("model") == writer else f"{source} serving {writer}"
    cache, key = runtime.reply_cache(), request_key(source, request)
    # A separate key for "this request's reply was cut off": cut-off replies are never stored, and without
    # it every rerun would send the request again only to be cut off again.
    cut_off_key = request_key(f"cut off at {source}", request)
    if cache is not None and (hit := cache.get(key)) is not None:
        _record(Usage(cache_hits=1))
        return hit.content
    if cache is not None and (marker := cache.get(cut_off_key)) is not None:
        _record(Usage(cache_hits=1))
        raise ReplyCutOff(topic, step, marker.completion_tokens, runtime.settings.reply_limit_variable(step), shorter)
    usage = Usage()
    # One event per call, however many attempts it takes, if the wait gets long enough to wonder about.
    still_waiting = asyncio.get_running_loop().call_later(
        STILL_WAITING_AFTER,
        functools.partial(runtime.emit, topic, "still-waiting", call=step, seconds=STILL_WAITING_AFTER))
    try:
        with pacing.queue_time() as queued:  # the deadline is the server's time: the pace's queue is left out
            text = await _attempts(request, topic, step, usage, shorter, queued)
    except ReplyCutOff as cut:
        # A marker, never the cut-off text, and only for the limit, which is in the request: a full context is
        # fixed by a larger one behind the same URL, which the cache's key would not see.
        if cache is not None and cut.tokens is None:
            cache.put(cut_off_key, CachedReply("", usage.prompt_tokens, cut.limit))
        raise
    finally:  # failed calls count too: summary.json's totals say what a batch really sent
        still_waiting.cancel()
        _record(usage)
    if cache is not None:
        cache.put(key, CachedReply(text, usage.prompt_tokens, usage.completion_tokens))
    return text


async def _attempts(request: dict[str, Any], topic: str, step: str, usage: Usage, shorter: bool,
                    queued: pacing.QueueTime) -> str:
    """Send ``request`` until a usable reply, within one deadline and ``client_retries`` retries; count into
    ``usage`` (changed in place) as it goes. ``shorter``: the request is the shorter retry of a cut-off one."""
    settings = runtime.settings
    timeout, attempts = settings.request_timeout, 1 + settings.client_retries
    # The deadline moves on by the time attempts wait in the pace (queued.seconds): it is the server's time.
    deadline, attempt = time.monotonic() + timeout, 0
    while True:  # each pass is one attempt: it returns the text, raises, or sleeps before the next
        attempt += 1
        left = deadline + queued.seconds - time.monotonic()
        if left <= 0:
            raise _timed_out(topic, step, usage)
        runtime.requests_sent.add()
        usage.requests += 1
        wait: float | None = None  # the server's own retry-after, if it names one
        try:
            response = await runtime.client().chat.completions.create(**request, timeout=left)
        except openai.APITimeoutError:
            raise _timed_out(topic, step, usage) from None
        except openai.APIStatusError as error:
            if (mark := error.response.headers.get(pacing.MARK)) is not None:  # the pace stopped waiting
                message = runtime.pace.explain(error.response, runtime.settings.shown_endpoint)
                raise ServerLimitError(redact(message), "QuotaExceeded" if mark == "quota" else "RateLimited") from None
            if error.status_code == 400:  # the same request gets the same answer: no retry helps
                raise _rejected(topic, step, error) from None
            # A server may quote the key it rejected.
            failure: Exception = type(error)(redact(error.message), response=error.response, body=None)
            if error.status_code not in RETRIED_STATUSES and error.status_code < 500:
                raise failure from None
            reason, wait = f"HTTP {error.status_code} from the server", pacing.parse_retry_after(error.response.headers)
        except openai.APIConnectionError as error:
            failure, reason = _unreachable(topic, step, error, attempt), "the connection failed"
        else:
            tokens = response.usage
            usage.prompt_tokens += tokens.prompt_tokens if tokens else 0
            usage.completion_tokens += tokens.completion_tokens if tokens else 0
            choice = response.choices[0]
            # getattr: a stand-in client of runtime.use_client (the benchmark's) may not say why it stopped,
            # nor which model answered.
            runtime.note_reported_model(getattr(response, "model", None))
            if getattr(choice, "finish_reason", None) == "length":
                usage.cut_off += 1
                limit = request.get("max_tokens") or 0
                # Fewer tokens than the limit: the model's context (prompt plus reply) was full first.
                written = getattr(tokens, "completion_tokens", None)
                early = {"tokens": written} if isinstance(written, int) and written < limit else {}
                runtime.emit(topic, "cut-off", call=step, limit=limit, shorter=shorter, **early)
                raise ReplyCutOff(topic, step, limit, settings.reply_limit_variable(step), shorter, **early)
            text = choice.message.content or ""
            if text.strip():
                return text
            failure = EmptyReplyError(f"the model returned an empty reply {attempt} times in a row")
            reason, wait = "an empty reply", 0.0  # not a busy server: ask again at once
        pause = wait if wait is not None and wait <= 60 else _backoff(attempt)
        if attempt == attempts or time.monotonic() + pause >= deadline + queued.seconds:
            # Recoverable: Flyte's task retry may still succeed, and the cache keeps the rest. Said aloud, as
            # the task starts again from the top.
            runtime.emit(topic, "gave-up", call=step, attempts=attempt, reason=reason, task_attempt=_task_attempt())
            raise failure from None
        usage.retries += 1
        runtime.emit(topic, "retrying", call=step, attempt=attempt + 1, attempts=attempts, reason=reason)
        await asyncio.sleep(pause)


def _task_attempt() -> int:
    """Flyte's attempt number of the task making the call: 0 for the first, or outside a task (and in a local
    run, where Flyte retries a task in the same process without counting: only a cluster's containers say)."""
    context = flyte.ctx()
    return context.attempt_number if context else 0


def _backoff(attempt: int) -> float:
    """Seconds before the attempt after ``attempt``: 0.5, 1, 2, ... at most 8, less up to a quarter (jitter)."""
    return min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (attempt - 1)) * random.uniform(0.75, 1.0)


def _timed_out(topic: str, step: str, usage: Usage) -> ModelTimeout:
    settings = runtime.settings
    timeout = settings.request_timeout
    usage.timed_out += 1
    runtime.emit(topic, "timed-out", call=step, seconds=timeout)
    return ModelTimeout(
        f"{topic}: the {step} got no reply within {timeout:g} s (REPORT_REQUEST_TIMEOUT={timeout:g}). A model on a "
        f"CPU may need longer: raise REPORT_REQUEST_TIMEOUT. (A lower {settings.reply_limit_variable(step)} does "
        "not make the model write less: it cuts its replies off.)")


def _rejected(topic: str, step: str, error: openai.APIStatusError) -> RequestRejected:
    """The error for an HTTP 400, in the server's words (without the key): what does not fit, or what it refused."""
    body = error.body if isinstance(error.body, dict) else {}
    said = redact(str(body.get("message") or error.message))
    server, limit = runtime.settings.shown_endpoint, runtime.settings.reply_limit_variable(step)
    if {body.get("type"), body.get("code")} & set(CONTEXT_ERRORS) or CONTEXT_WORDS.search(said):
        return RequestRejected(
            f"{topic}: the {step}'s request does not fit in the model's context window: the server at {server} "
            f"answered HTTP 400 ({said}). Use a server or model with a larger context window ({LARGER_CONTEXT}), a "
            f"lower {limit} (servers like vLLM and OpenAI's count the reply's limit in) or shorter prompts. A retry "
            "would be rejected the same way, so neither the client nor Flyte retries it.",
            "ContextExceeded")
    return RequestRejected(
        f"{topic}: the server at {server} rejected the {step}'s request (HTTP 400: {said}). A retry would be "
        "rejected the same way, so neither the client nor Flyte retries it: the server's message says what it did "
        f"not accept (a REPORT_MODEL or {limit} value this model does not take, say).", "BadRequest")


def _unreachable(topic: str, step: str, error: openai.APIConnectionError, attempts: int) -> openai.APIConnectionError:
    """The connection error a call gives up with, naming the server and the setting that points at it. Still an
    ``APIConnectionError``, which Flyte retries: a server restarting may be back by then."""
    cause = error.__cause__
    why = f" ({redact(str(cause) or type(cause).__name__)})" if cause is not None else ""
    return openai.APIConnectionError(
        message=f"{topic}: the {step} could not reach the model server at {runtime.settings.shown_endpoint} after "
                f"{attempts} attempt(s){why}. Is it still running? Check OPENAI_BASE_URL, or unset it and "
                "OPENAI_API_KEY to use the offline model.",
        request=error.request)


def redact(text: str) -> str:
    """Servers sometimes echo the key they rejected; it must not reach a report, a log or a notebook."""
    key = os.environ.get("OPENAI_API_KEY", "")
    return text.replace(key, "[API key]") if len(key) >= 8 else text


def describe_error(error: BaseException) -> str:
    """'ValueError: message' even when Flyte wrapped the original exception; never contains the API key."""
    kind = getattr(error, "code", None) or type(error).__name__
    return redact(f"{kind}: {error}")


def check_backend(timeout: float = 10.0, *, fresh: bool = True) -> str:
    """Before a batch, one cheap request (list models) to a real server: fail once, clearly, not per topic.
    Returns the model that will write the reports (``runtime.resolve_model``: asked anew, so a model swapped
    behind the same URL is seen). ``fresh=False`` keeps a model already named since the settings changed."""
    settings = runtime.settings
    settings.check_ready()
    where = runtime.settings.shown_endpoint
    try:
        return runtime.known_model if not fresh and runtime.known_model else runtime.resolve_model(timeout)
    except openai.AuthenticationError as error:
        raise BackendUnavailable(
            f"The server at {where} rejected the API key (HTTP {error.status_code}): check OPENAI_API_KEY."
        ) from None
    except openai.APIStatusError as error:
        raise BackendUnavailable(
            f"The server at {where} answered HTTP {error.status_code} to GET /models: is it still loading the "
            "model? Wait for it to finish (its log says when), then run again."
        ) from None
    except openai.APIConnectionError as error:
        raise BackendUnavailable(
            f"Cannot reach the model server at {where} ({redact(str(error.__cause__ or error))}). "
            "Is it running? Check OPENAI_BASE_URL, or unset it and OPENAI_API_KEY to use the offline model."
        ) from None
