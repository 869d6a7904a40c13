"""The model client layer: one chat completion, with everything a learner need not read.

``complete(request)`` sends one chat-completion request body through the real
``openai`` client of the running event loop and returns the reply's text. On
the way it

* answers an identical earlier request from the reply cache (no request sent);
* goes at the pace of ``runtime.pace`` (``machinery.pacing``): the client's transport holds each HTTP
  attempt to the window of requests in flight and waits out the server's rate limits, so a 429
  reaches ``complete`` only when the batch's patience has run out; it then becomes a
  ``ServerLimitError`` that Flyte does not retry and that says what to change;
* asks again when the model returns an empty reply (at most twice);
* strips the API key from any error a server sends back;
* adds the tokens spent to the active usage meter (see ``metering``).

It also holds the check made once before a batch (``check_backend``) and the
error wording used in reports (``describe_error``).
"""

# No ``from __future__ import annotations``: Flyte resolves the annotations of ``Usage`` (a field
# of the pipeline's results) on every conversion, and string annotations make that slower.
import contextlib
import contextvars
import os
from collections.abc import Iterator
from typing import Any

import flyte.errors
import openai

from machinery import pacing
from machinery.records import Record
from machinery.reply_cache import CachedReply, request_key
from machinery.runtime import runtime

EMPTY_REPLY_RETRIES = 2


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


@contextlib.contextmanager
def metering() -> Iterator[UsageMeter]:
    """Count the model calls made inside the block, including concurrent ones it starts."""
    meter = UsageMeter()
    token = _active_meter.set(meter)
    try:
        yield meter
    finally:
        _active_meter.reset(token)


def _record(usage: Usage) -> None:
    if (meter := _active_meter.get()) is not None:
        meter.add(usage)


class EmptyReplyError(RuntimeError):
    """The model answered with no text, more than once."""


class ServerLimitError(flyte.errors.NonRecoverableError):
    """The server's rate limit outlasted the batch's patience (code ``RateLimited``), or the account has
    no credit left (``QuotaExceeded``). Retrying the task at once would meet the same limit, so Flyte won't."""

    def __init__(self, message: str, code: str = "RateLimited") -> None:
        super().__init__(message, code=code)


async def complete(request: dict[str, Any]) -> str:
    """Send one chat-completion request body; return the reply's text."""
    cache, key = runtime.reply_cache(), request_key(runtime.settings.endpoint, request)
    if cache is not None and (hit := cache.get(key)) is not None:
        _record(Usage(cache_hits=1))
        return hit.content
    usage = Usage()
    for _ in range(1 + EMPTY_REPLY_RETRIES):
        runtime.requests_sent.add()
        try:
            response = await runtime.client().chat.completions.create(**request)
        except openai.APIStatusError as error:
            if (mark := error.response.headers.get(pacing.MARK)) is not None:  # the pace stopped waiting
                message = runtime.pace.explain(error.response, runtime.settings.endpoint)
                raise ServerLimitError(redact(message), "QuotaExceeded" if mark == "quota" else "RateLimited") from None
            # A server may quote the key it rejected.
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
    _record(usage)
    if cache is not None:
        cache.put(key, CachedReply(text, usage.prompt_tokens, usage.completion_tokens))
    return text


def redact(text: str) -> str:
    """Servers sometimes echo the key they rejected; it must not reach a report, a log or a notebook."""
    key = os.environ.get("OPENAI_API_KEY", "")
    return text.replace(key, "[API key]") if len(key) >= 8 else text


def describe_error(error: BaseException) -> str:
    """'ValueError: message' even when Flyte wrapped the original exception; never contains the API key."""
    kind = getattr(error, "code", None) or type(error).__name__
    return redact(f"{kind}: {error}")


class BackendUnavailable(RuntimeError):
    """The configured model server cannot be used; the message says what to check."""


def check_backend(timeout: float = 10.0) -> None:
    """Before a batch, one cheap request (list models) to a real server: fail once, clearly, not per topic."""
    settings = runtime.settings
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
