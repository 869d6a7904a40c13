"""The reply cache: a durable, content-addressed store of model replies, in one SQLite file.

Flyte checkpoints traced calls on a cluster, so a retried task does not pay
for completed model calls again. Flyte's local mode does not: a retry, or a
rerun after a crash, repeats every call. This cache closes that gap for local
runs: a reply is stored the moment it arrives, keyed by everything that
determines it (endpoint, model, messages, parameters), and any later identical
request is answered from disk.

* Safe under concurrent writers: WAL journal, one connection per thread, and
  ``INSERT OR IGNORE`` (two writers of one key store the same reply).
* Survives a killed process: a reply is committed before it is used.
* Never stores API keys: they travel in HTTP headers, which are not part of
  the key or the stored row.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS replies (
    key TEXT PRIMARY KEY,
    content TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    stored_at REAL NOT NULL
)
"""


def request_key(endpoint: str, request: dict[str, Any]) -> str:
    """SHA-256 of the endpoint and the canonical JSON of the request body."""
    canonical = json.dumps({"endpoint": endpoint, "request": request}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CachedReply:
    content: str
    prompt_tokens: int
    completion_tokens: int


def _switch_to_wal(connection: sqlite3.Connection, patience_s: float = 30.0) -> None:
    """Put the file in WAL mode. SQLite answers "database is locked" at once, without waiting, when
    another connection converts the same new file at that moment, so wait here."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class ReplyCache:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._connection() as connection:
            connection.execute(SCHEMA)

    def _connection(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=True)
            _switch_to_wal(connection)
            connection.execute("PRAGMA synchronous=NORMAL")  # with WAL: durable when the process dies
            self._local.connection = connection
        return connection

    def get(self, key: str) -> CachedReply | None:
        row = self._connection().execute(
            "SELECT content, prompt_tokens, completion_tokens FROM replies WHERE key = ?", (key,)
        ).fetchone()
        return CachedReply(*row) if row else None

    def put(self, key: str, reply: CachedReply) -> None:
        self._connection().execute(
            "INSERT OR IGNORE INTO replies VALUES (?, ?, ?, ?, ?)",
            (key, reply.content, reply.prompt_tokens, reply.completion_tokens, time.time()),
        )
