"""machinery/reply_cache.py: a content-addressed SQLite store of model replies, safe under concurrent writers."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
from pathlib import Path

import pytest

from machinery.reply_cache import CachedReply, ReplyCache, request_key

REQUEST = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.2}


def test_the_key_covers_everything_that_changes_the_reply():
    base = request_key("offline", REQUEST)
    variants = [
        request_key("http://other/v1", REQUEST),
        request_key("offline", {**REQUEST, "model": "m2"}),
        request_key("offline", {**REQUEST, "messages": [{"role": "user", "content": "hi!"}]}),
        request_key("offline", {**REQUEST, "messages": [{"role": "system", "content": "hi"}]}),
        request_key("offline", {**REQUEST, "temperature": 0.7}),
        request_key("offline", {**REQUEST, "response_format": {"type": "json_object"}}),
    ]
    assert len({base, *variants}) == 7
    assert request_key("offline", dict(reversed(list(REQUEST.items())))) == base, "key order does not matter"
    assert len(base) == 64 and int(base, 16) >= 0, "a SHA-256 hex digest"


def test_non_ascii_requests_have_stable_keys():
    topic = {**REQUEST, "messages": [{"role": "user", "content": "日本の茶道 🍵"}]}
    assert request_key("offline", topic) == request_key("offline", dict(topic))
    assert request_key("offline", topic) != request_key("offline", REQUEST)


def test_put_then_get_and_a_miss_is_none(tmp_path):
    cache = ReplyCache(tmp_path / "nested" / "folder" / "replies.sqlite3")
    assert cache.get("missing") is None
    cache.put("k", CachedReply("日本の茶道 🍵 reply", 12, 34))
    assert cache.get("k") == CachedReply("日本の茶道 🍵 reply", 12, 34)
    assert cache.path == tmp_path / "nested" / "folder" / "replies.sqlite3"


def test_the_first_reply_stored_for_a_key_wins(tmp_path):
    cache = ReplyCache(tmp_path / "replies.sqlite3")
    cache.put("k", CachedReply("first", 1, 1))
    cache.put("k", CachedReply("second", 2, 2))
    assert cache.get("k") == CachedReply("first", 1, 1)


def test_replies_survive_a_new_process_view_of_the_file(tmp_path):
    path = tmp_path / "replies.sqlite3"
    ReplyCache(path).put("k", CachedReply("kept", 1, 2))
    assert ReplyCache(path).get("k") == CachedReply("kept", 1, 2)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_each_thread_uses_its_own_connection(tmp_path):
    cache = ReplyCache(tmp_path / "replies.sqlite3")
    cache.put("main", CachedReply("from main", 0, 0))
    seen = []
    thread = threading.Thread(target=lambda: seen.append(cache.get("main")))
    thread.start()
    thread.join(10)
    assert seen == [CachedReply("from main", 0, 0)]


def _write_many(path: str, worker: int, rows: int = 150) -> None:
    cache = ReplyCache(Path(path))
    for i in range(rows):
        cache.put(f"shared-{i}", CachedReply(f"reply {i}", 1, 2))  # every worker writes these
        cache.put(f"own-{worker}-{i}", CachedReply(f"w{worker} {i}", 1, 2))


def stored_keys(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {row[0] for row in db.execute("SELECT key FROM replies")}


def check_workers(path: str, workers: range, rows: int = 150) -> None:
    assert ReplyCache(Path(path)).get("shared-7") == CachedReply("reply 7", 1, 2)
    assert stored_keys(Path(path)) == {f"shared-{i}" for i in range(rows)} | {
        f"own-{w}-{i}" for w in workers for i in range(rows)}
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_concurrent_writers_in_threads(tmp_path):
    """Each round opens a new file from six threads at once: SQLite refuses a second connection's switch
    to WAL without waiting, which the cache must absorb (without that, one round in ten or so failed)."""
    failures: list[BaseException] = []

    def worker(path: str, number: int) -> None:
        try:
            _write_many(path, number, rows=10)
        except BaseException as error:  # a thread's exception would otherwise only be printed
            failures.append(error)

    for round_number in range(40):
        path = str(tmp_path / f"replies-{round_number}.sqlite3")
        threads = [threading.Thread(target=worker, args=(path, w)) for w in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert failures == []
        check_workers(path, range(6), rows=10)


@pytest.mark.slow
def test_concurrent_writers_in_processes_and_threads(tmp_path):
    path = str(tmp_path / "replies.sqlite3")
    ReplyCache(Path(path))
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_write_many, args=(path, w)) for w in range(3)]
    threads = [threading.Thread(target=_write_many, args=(path, w)) for w in range(3, 5)]
    for worker in (*processes, *threads):
        worker.start()
    for worker in (*processes, *threads):
        worker.join(120)
    assert all(p.exitcode == 0 for p in processes)
    check_workers(path, range(5))
