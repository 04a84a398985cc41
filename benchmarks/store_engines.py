"""Benchmark: the two store engines doing the same work, through the store's own API on the real reactor.

Run ``python -m benchmarks.store_engines`` from the repository root. For each engine (SQLite in a temporary
file; PostgreSQL in a throwaway cluster started for the run, with its default durability: ``fsync`` and
``synchronous_commit`` on, as SQLite runs with ``synchronous=FULL``) it measures:

- turn writes: ``--writers`` sessions at once, each storing ``--turns`` turns back to back (a turn is a user
  message and an assistant message, each committed before the next starts, as a chat turn stores them);
  turns per second and the latency of one message write (p50, p99);
- history reads: ``--readers`` concurrent readers reading whole histories of 40 messages (one with an
  attachment) of 100 sessions, with the history cache off so every read goes to the database; reads per
  second and latency (p50, p99).

Both engines use their defaults otherwise (PostgreSQL pool of 10 connections). Times are wall-clock on a
shared machine: compare the engines within one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from twisted.internet.defer import Deferred, gatherResults  # noqa: E402

from aichat.store import Attachment, Message, new_id  # noqa: E402
from aichat.store.sql import SQLStore  # noqa: E402


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def turn_writes(store: SQLStore, writers: int, turns: int) -> dict[str, float]:
    sessions = [await store.create_session(str(i % 10), f"bench {i}") for i in range(writers)]
    latencies: list[float] = []

    async def writer(session_id: str) -> None:
        for turn in range(turns):
            for role in ("user", "assistant"):
                started = time.perf_counter()
                await store.add_message(Message(new_id(role), session_id, role, f"{role} says {turn} " * 20))
                latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await gatherResults([Deferred.fromCoroutine(writer(s.id)) for s in sessions])
    elapsed = time.perf_counter() - started
    return {
        "turns_per_s": writers * turns / elapsed,
        "write_p50": statistics.median(latencies),
        "write_p99": quantile(latencies, 0.99),
    }


async def history_reads(store: SQLStore, readers: int, reads: int) -> dict[str, float]:
    sessions = []
    for i in range(100):
        session = await store.create_session(str(i % 10), f"history {i}")
        for index in range(40):
            attachments = (Attachment(new_id(), "a.txt", "text/plain", 600, "YWJj" * 200),) if index == 0 else ()
            role = "user" if index % 2 == 0 else "assistant"
            await store.add_message(
                Message(new_id(role), session.id, role, f"message {index} " * 30, attachments=attachments)
            )
        sessions.append(session.id)
    store.cache.clear()
    latencies: list[float] = []

    async def reader(offset: int) -> None:
        for n in range(reads // readers):
            session_id = sessions[(offset + n * 7) % len(sessions)]
            started = time.perf_counter()
            history = await store.history(session_id)
            latencies.append(time.perf_counter() - started)
            assert len(history) == 40
            store.cache.drop(session_id)

    started = time.perf_counter()
    await gatherResults([Deferred.fromCoroutine(reader(i)) for i in range(readers)])
    elapsed = time.perf_counter() - started
    return {
        "reads_per_s": len(latencies) / elapsed,
        "read_p50": statistics.median(latencies),
        "read_p99": quantile(latencies, 0.99),
    }


async def measure(engine: str, reactor: Any, args: argparse.Namespace, folder: Path, url: str) -> dict[str, Any]:
    from aichat.store.postgres import PostgresStore
    from aichat.store.sqlite import SQLiteStore

    def build() -> SQLStore:
        if engine == "sqlite":
            return SQLiteStore(reactor, str(folder / f"bench-{time.monotonic_ns()}.db"), cache_bytes=0)
        return PostgresStore(reactor, url, cache_bytes=0)

    row: dict[str, Any] = {"engine": engine}
    store = build()
    await store.open()
    try:
        row.update(await turn_writes(store, args.writers, args.turns))
        row.update(await history_reads(store, args.readers, args.reads))
    finally:
        await store.close()
    return row


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    ms = 1000.0
    lines = [
        f"store engines, same work: {args.writers} sessions writing {args.turns} turns each at once; "
        f"{args.readers} concurrent readers of 40-message histories (no cache); times in ms",
        f"{'engine':>10}{'turns/s':>10}{'write p50':>11}{'write p99':>11}{'reads/s':>10}{'read p50':>10}"
        f"{'read p99':>10}",
    ]
    for row in rows:
        lines.append(
            f"{row['engine']:>10}{row['turns_per_s']:>10.0f}{row['write_p50'] * ms:>11.2f}"
            f"{row['write_p99'] * ms:>11.2f}{row['reads_per_s']:>10.0f}{row['read_p50'] * ms:>10.2f}"
            f"{row['read_p99'] * ms:>10.2f}"
        )
    return "\n".join(lines)


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--engines", nargs="+", default=["sqlite", "postgres"], choices=["sqlite", "postgres"])
    parser.add_argument("--writers", type=int, default=32)
    parser.add_argument("--turns", type=int, default=50)
    parser.add_argument("--readers", type=int, default=16)
    parser.add_argument("--reads", type=int, default=2000)
    args = parser.parse_args()

    from twisted.internet import reactor, task

    from tests.pgcluster import Cluster

    cluster = Cluster(settings=()) if "postgres" in args.engines else None
    rows: list[dict[str, Any]] = []

    async def main(_: Any) -> None:
        with tempfile.TemporaryDirectory(prefix="aichat-bench-") as tmp:
            for engine in args.engines:
                url = cluster.create_database("bench") if cluster is not None else ""
                rows.append(await measure(engine, reactor, args, Path(tmp), url))

    try:
        task.react(lambda r: Deferred.fromCoroutine(main(r)), [])
    except SystemExit as e:
        if e.code:
            raise
    finally:
        if cluster is not None:
            cluster.stop()
    print(table(rows, args))


if __name__ == "__main__":
    run()
