"""Test doubles that still run the real openai client end to end, and ways to put them in place.

* ``ScriptedTransport``: the offline model with a hook that rewrites chosen replies and a log
  of every request; ``with scripted_model(rewrite) as transport:`` answers every model call of
  the block with it (``runtime.use_transport``), and restores the real model after it.
* ``with served_by(server, **settings):``: the ``openai`` backend at a loopback server (an
  ``OfflineServer`` or a ``FaultyServer``) for the block; needs OPENAI_API_KEY (``api_key`` fixture).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx2

from machinery import offline_llm
from machinery.runtime import runtime

# (role, topic, reply content) -> new reply content, or None to keep it
Rewrite = Callable[[str, str, str], str | None]


class ScriptedTransport(offline_llm.OfflineTransport):
    """The offline model, with a hook that rewrites chosen replies and a log of every request."""

    def __init__(self, rewrite: Rewrite | None = None) -> None:
        super().__init__()
        self.rewrite = rewrite
        self.log: list[tuple[str, str]] = []  # (role, topic) per completion request
        self.bodies: list[dict[str, Any]] = []  # the request body of each completion request

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await super().handle_async_request(request)
        if not request.url.path.endswith("/chat/completions") or response.status_code != 200:
            return response
        body = json.loads(request.content)
        parsed = offline_llm.parse_request(body)
        self.log.append((parsed.role, parsed.topic))
        self.bodies.append(body)
        payload: dict[str, Any] = json.loads(response.content)
        if self.rewrite is not None:
            content = payload["choices"][0]["message"]["content"]
            replaced = self.rewrite(parsed.role, parsed.topic, content)
            if replaced is not None:
                payload["choices"][0]["message"]["content"] = replaced
        return httpx2.Response(200, json=payload)

    def count(self, role: str | None = None, topic: str | None = None) -> int:
        return sum(1 for r, t in self.log if (role is None or r == role) and (topic is None or t == topic))

    def prompts(self, role: str) -> list[str]:
        """The user message of every request made in ``role``, in order."""
        return [body["messages"][-1]["content"] for body, (r, _) in zip(self.bodies, self.log) if r == role]


@contextlib.contextmanager
def scripted_model(rewrite: Rewrite | None = None) -> Iterator[ScriptedTransport]:
    """Every model client made in the block answers through a new ``ScriptedTransport``."""
    transport = ScriptedTransport(rewrite)
    with runtime.use_transport(transport):
        yield transport


def replies_in_turn(role: str, *replies: str) -> Rewrite:
    """A rewrite hook that answers the next requests in ``role`` with ``replies``, then lets the model answer."""
    queue = list(replies)

    def rewrite(asked_role: str, topic: str, content: str) -> str | None:
        return queue.pop(0) if asked_role == role and queue else None

    return rewrite


@contextlib.contextmanager
def served_by(server: offline_llm.OfflineServer, **settings: Any) -> Iterator[None]:
    """The openai backend at ``server`` for the block (the client's defaults otherwise)."""
    with runtime.configured(backend="openai", base_url=server.base_url, **settings):
        yield
