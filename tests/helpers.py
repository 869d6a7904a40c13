"""Test doubles that still run the real openai client end to end."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx2

from machinery import offline_llm

# (role, topic, reply content) -> new reply content, or None to keep it
Rewrite = Callable[[str, str, str], str | None]


class ScriptedTransport(offline_llm.OfflineTransport):
    """The offline model, with a hook that rewrites chosen replies and a log of every request."""

    def __init__(self, rewrite: Rewrite | None = None) -> None:
        super().__init__()
        self.rewrite = rewrite
        self.log: list[tuple[str, str]] = []  # (role, topic) per completion request

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await super().handle_async_request(request)
        if not request.url.path.endswith("/chat/completions") or response.status_code != 200:
            return response
        body = json.loads(request.content)
        parsed = offline_llm.parse_request(body)
        self.log.append((parsed.role, parsed.topic))
        payload: dict[str, Any] = json.loads(response.content)
        if self.rewrite is not None:
            content = payload["choices"][0]["message"]["content"]
            replaced = self.rewrite(parsed.role, parsed.topic, content)
            if replaced is not None:
                payload["choices"][0]["message"]["content"] = replaced
        return httpx2.Response(200, json=payload)

    def count(self, role: str | None = None, topic: str | None = None) -> int:
        return sum(1 for r, t in self.log if (role is None or r == role) and (topic is None or t == topic))
