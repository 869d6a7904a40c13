"""A loopback OpenAI-compatible server that injects faults on a deterministic schedule.

It is the offline model behind real HTTP, plus the failures real APIs produce:
429 with retry-after, 500 and 503, slow replies (``slow_reply`` seconds),
dropped connections, and for the critic malformed or truncated JSON, scores
outside 1..10 and empty content. It records what happened: every request by
its body, the faults it injected, and the peak number of requests in flight.

Which requests fail is decided by a hash of the request body (about
``fault_percent`` of them), and a retry of the same request is counted as a
further attempt of it: a body scheduled for two faults fails twice and then
succeeds. Which fault a failing body gets is chosen in turn, in the order the
bodies first arrive, so every kind is exercised whatever the prompts hash to.
Topics containing ``Doomed`` fail every time (HTTP 503), to exhaust every
retry budget.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter
from typing import Any

from machinery import offline_llm

TRANSPORT_FAULTS = ("429", "500", "503", "timeout", "drop")
CRITIC_FAULTS = ("malformed", "truncated", "score-11", "score-0", "empty")
REPAIR_MARKER = "Your previous reply could not be used"


class FaultyServer(offline_llm.OfflineServer):
    def __init__(self, fault_percent: int = 0, slow_reply: float = 0.8, latency: float = 0.0,
                 echo_key_on_401: str | None = None) -> None:
        """``echo_key_on_401``: "everything" or "completions" rejects those requests, quoting the key."""
        super().__init__(latency=latency)
        self.fault_percent = fault_percent
        self.slow_reply = slow_reply  # seconds a "timeout" fault takes to answer
        self.echo_key_on_401 = echo_key_on_401
        self.httpd.handle_error = lambda request, address: None  # a client that timed out closed its socket
        self._lock = threading.Lock()
        self.attempts: Counter[str] = Counter()  # request body hash -> times received
        self.faults: Counter[str] = Counter()  # fault kind -> times injected
        self.answered: list[str] = []  # body hashes answered with a usable reply, in order
        self.received: list[bytes] = []  # every completion request body, in order
        self.schedule: dict[str, tuple[str | None, int]] = {}  # body hash -> (fault kind, attempts it hits)
        self._turns: Counter[tuple[str, ...]] = Counter()  # faults handed out per list of kinds
        self.in_flight = 0
        self.peak_in_flight = 0

    # ----------------------------------------------------------------- what to break

    def fault_for(self, body_hash: str, attempt: int, request: offline_llm.Request, prompt: str) -> str | None:
        if "Doomed" in request.topic:
            return "503"
        with self._lock:
            if body_hash not in self.schedule:
                self.schedule[body_hash] = self._schedule(body_hash, request, prompt)
            kind, times = self.schedule[body_hash]
        return kind if attempt <= times else None

    def _schedule(self, body_hash: str, request: offline_llm.Request, prompt: str) -> tuple[str | None, int]:
        """(fault kind, how many attempts it hits) for a body seen for the first time; under the lock."""
        number = int(body_hash[:12], 16)
        if number % 100 >= self.fault_percent:
            return None, 0
        if request.role == "critic" and REPAIR_MARKER not in prompt and (number // 100) % 2:
            kinds = CRITIC_FAULTS  # half of the critic's faulty replies are bad content, not bad HTTP
        elif request.role == "critic":
            kinds = TRANSPORT_FAULTS
        else:
            kinds = TRANSPORT_FAULTS + ("empty",)
        kind = kinds[self._turns[kinds] % len(kinds)]
        self._turns[kinds] += 1
        times = 1 if kind in CRITIC_FAULTS else 1 + (number // 10_000) % 2  # within every retry budget
        return kind, times

    # ----------------------------------------------------------------- serving

    def handle(self, handler: Any, method: str, raw_body: bytes) -> None:
        if self.echo_key_on_401 == "everything" or (self.echo_key_on_401 == "completions" and method == "POST"):
            sent = handler.headers.get("Authorization", "")
            handler.reply(401, {"error": {"message": f"Incorrect API key provided: {sent.removeprefix('Bearer ')}",
                                          "type": "invalid_request_error", "code": "invalid_api_key"}})
            return
        if method != "POST":
            return super().handle(handler, method, raw_body)
        with self._lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            self._handle_completion(handler, raw_body)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _handle_completion(self, handler: Any, raw_body: bytes) -> None:
        body = json.loads(raw_body)
        body_hash = hashlib.sha256(raw_body).hexdigest()
        request = offline_llm.parse_request(body)
        prompt = offline_llm._message_text(body["messages"][-1])
        with self._lock:
            self.received.append(raw_body)
            self.attempts[body_hash] += 1
            attempt = self.attempts[body_hash]
        fault = self.fault_for(body_hash, attempt, request, prompt)
        if fault:
            with self._lock:
                self.faults[fault] += 1
        if fault == "drop":
            handler.close_connection = True
            return
        if fault == "timeout":
            time.sleep(self.slow_reply)
        if fault in ("429", "500", "503"):
            headers = {"retry-after-ms": "10"} if fault in ("429", "503") else {}
            handler.reply(int(fault), {"error": {"message": f"injected {fault}", "type": "server_error"}}, headers)
            return
        status, payload = offline_llm.route("POST", handler.path, raw_body)
        if status == 200 and fault in CRITIC_FAULTS:
            payload["choices"][0]["message"]["content"] = broken_content(fault, payload)
        elif status == 200 and fault != "timeout":
            with self._lock:
                self.answered.append(body_hash)
        if self.latency:
            time.sleep(self.latency)
        handler.reply(status, payload)

    # ----------------------------------------------------------------- what happened

    @property
    def requests(self) -> int:
        return sum(self.attempts.values())

    @property
    def retried_requests(self) -> int:
        """Requests that arrived more than once (the client or the pipeline asked again)."""
        return sum(1 for count in self.attempts.values() if count > 1)

    @property
    def fault_rate(self) -> float:
        return sum(self.faults.values()) / max(1, self.requests)


def broken_content(fault: str, payload: dict[str, Any]) -> str:
    good = payload["choices"][0]["message"]["content"]
    if fault == "malformed":
        return "Sure! Here is my critique: " + good
    if fault == "truncated":
        return good[: len(good) // 2]
    if fault == "empty":
        return ""
    critique = json.loads(good)
    critique["score"] = 11 if fault == "score-11" else 0
    return json.dumps(critique)
