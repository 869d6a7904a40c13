"""Hostile model output: markup and links a compromised or confused model might return.

Every vector tries to set ``window.__pwned`` to its own number, so a browser
test that traps every write to that variable can tell which one got through.
``hostile_rewrite`` plugs them into drafts, revisions, critiques and summaries
(for ``ScriptedTransport``); ``HostileServer`` serves them over loopback HTTP
(for a live JupyterLab whose kernel reaches the model through the network).
"""

from __future__ import annotations

import json
from typing import Any

from machinery import offline_llm

VECTORS = [
    "<script>window.__pwned=1</script>",
    '<img src=x onerror="window.__pwned=2">',
    '<svg onload="window.__pwned=3"><circle r="4"/></svg>',
    "[a link](javascript:window.__pwned=4)",
    "[another](&#106;&#97;vascript:window.__pwned=5)",
    "[data link](data:text/html;base64,PHNjcmlwdD53aW5kb3cuX19wd25lZD02PC9zY3JpcHQ+)",
    '<iframe src="javascript:window.__pwned=7"></iframe>',
    "<style>@import 'javascript:window.__pwned=8';</style>",
    "<!-- x --><script>window.__pwned=9</script><!-- y -->",
    "</textarea></title></script><script>window.__pwned=10</script>",
    "![image](javascript:window.__pwned=11)",
    '<a href="javascript:window.__pwned=12">plain anchor</a>',
    '<details open ontoggle="window.__pwned=13">x</details>',
    '"><img src=x onerror=window.__pwned=14>',
    "[x](JaVaScRiPt:window.__pwned=15)",
    '<math><mtext></p><img src=x onerror="window.__pwned=16"></mtext></math>',
]
HOSTILE_TOPIC = '<img src=x onerror="window.__pwned=99"> & "quotes"'

TRAP = """(() => {
  window.__hits = [];
  Object.defineProperty(window, '__pwned', {
    configurable: true,
    get() { return window.__hits.at(-1); },
    set(value) { window.__hits.push(value); },
  });
})()"""


def hostile_rewrite(role: str, topic: str, content: str) -> str | None:
    """Add every vector to a reply, keeping it valid for its role."""
    if role == "critic":
        critique = json.loads(content)
        critique["strengths"] = critique["strengths"] + VECTORS[:4]
        critique["improvements"] = critique["improvements"] + VECTORS[4:8]
        critique["summary"] = critique["summary"] + " " + " ".join(VECTORS[8:])
        return json.dumps(critique)
    return content.rstrip() + "\n\n" + "\n\n".join(VECTORS) + "\n"


class HostileServer(offline_llm.OfflineServer):
    """The offline model over loopback HTTP, with every reply made hostile."""

    def handle(self, handler: Any, method: str, raw_body: bytes) -> None:
        status, payload = offline_llm.route(method, handler.path, raw_body)
        if status == 200 and "choices" in payload:
            request = offline_llm.parse_request(json.loads(raw_body))
            message = payload["choices"][0]["message"]
            message["content"] = hostile_rewrite(request.role, request.topic, message["content"])
        handler.reply(status, payload)
