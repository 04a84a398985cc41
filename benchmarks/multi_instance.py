"""Benchmark: one and two daemons on one PostgreSQL at 100 streams, and cross-instance event delivery.

Run ``python -m benchmarks.multi_instance`` from the repository root. It starts a throwaway PostgreSQL
cluster (default durability), the scripted upstream (``tests.upstream``: 40 deltas 50 ms apart, the level
100 answers of ``benchmarks.chat_stream``) and the daemons as child processes, and measures in one run:

- turns: 100 concurrent streams of back-to-back one-request turns (``chat_stream``'s client and its
  legacy ``GET /v1/chat/stream?message=`` turn), on one SQLite daemon (the baseline), one PostgreSQL
  daemon, and two PostgreSQL daemons sharing the database with the streams spread over both: throughput
  (turns per second), TTFT added to the upstream's own (median and p99), errors;
- delivery: 1, then 100 turns started at once on instance A (``POST /v1/chat/send?streaming=true``, answers streaming
  at once), each stream read at the same time on A (where it runs: events arrive as they happen) and on B
  (events come through the database: written, ``NOTIFY``, read back); the delay is B's arrival time of
  each event minus A's, matched by SSE ``id``: median and p99. Beside it, the floor: the same traffic
  through the database alone, no daemon and no HTTP (:mod:`benchmarks.bus_floor`: group-committed rows
  and ``NOTIFY``, ``LISTEN``, read back), read-back time minus production time.

Targets (2 cores): delivery p50 <= 5 ms and p99 <= 50 ms; 0 errors; printed as PASS or MISS
(``--strict``: exit status 1 on a miss).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.bus_floor import delivery_floor
from benchmarks.chat_stream import (
    HOST,
    ROOT,
    Connection,
    Level,
    Measured,
    daemon_target,
    direct_target,
    measure_side,
    open_pool,
    quantile,
    raise_open_files,
    start_daemon,
    start_upstream,
    stop,
)

LEVEL = Level(100, 3, 40, 0.05)
DELIVERY_TURNS = 100
DEADLINE = 120.0


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def create_session(port: int, user: int) -> str:
    """A new session of ``user`` on the daemon at ``port``."""
    request = urllib.request.Request(
        f"http://{HOST}:{port}/v1/chat/sessions",
        data=b'{"title": "bench"}',
        method="POST",
        headers={"X-User-ID": str(user), "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(json.loads(response.read())["id"])


async def streams_on(ports: list[int], direct: Measured, label: str, coalescing: bool) -> dict[str, Any]:
    """``LEVEL.streams`` streams of turns, stream ``n`` on the daemon ``ports[n % len(ports)]``; a table row."""
    count = LEVEL.streams
    coalescing_ports = set(ports) if coalescing else set()
    placed = [(ports[n % len(ports)], n % 50 + 1) for n in range(count)]
    sessions = [await asyncio.to_thread(create_session, port, user) for port, user in placed]
    connections = [Connection(port) for port, _ in placed]
    for first in range(0, count, 50):
        await asyncio.gather(*(c.open() for c in connections[first : first + 50]))
    pool = connections
    targets = [
        replace(daemon_target(port, user, session), may_coalesce=port in coalescing_ports)
        for (port, user), session in zip(placed, sessions, strict=True)
    ]
    started = time.monotonic()
    try:
        through = await measure_side(connections, targets, LEVEL.chunks, LEVEL.turns, LEVEL.chunks * LEVEL.delay)
    finally:
        for connection in pool:
            connection.close()
    elapsed = time.monotonic() - started
    for error in through.first_errors:
        print(f"  {label} error: {error}", file=sys.stderr)
    # Warm-up turns run too: every connection ran turns + 1.
    turns = count * (LEVEL.turns + 1)
    return {
        "label": label,
        "turns": turns,
        "throughput": turns / elapsed,
        "added_median": statistics.median(through.ttft) - statistics.median(direct.ttft),
        "added_p99": quantile(through.ttft, 0.99) - quantile(direct.ttft, 0.99),
        "errors": through.errors,
    }


async def read_ids(port: int, stream_url: str, user: str, arrivals: dict[int, float]) -> bool:
    """Read a stream as SSE, noting when each event ``id`` arrived; ``True`` if it ended with ``done``."""
    reader, writer = await asyncio.open_connection(HOST, port, limit=1 << 20)
    try:
        writer.write(
            f"GET {stream_url} HTTP/1.1\r\nHost: {HOST}:{port}\r\nX-User-ID: {user}\r\n"
            "Accept: text/event-stream\r\nConnection: close\r\n\r\n".encode()
        )
        current: int | None = None
        while True:
            line = await reader.readline()
            if not line:
                return False
            if line.startswith(b"id: "):
                current = int(line[4:])
                arrivals[current] = time.perf_counter()
            elif line.startswith(b"data: ") and current is not None:
                if b'"type":"done"' in line:
                    return True
                if b'"type":"error"' in line:
                    return False
    finally:
        writer.close()


def start_turn(port: int, user: str) -> str:
    """``POST /v1/chat/send?streaming=true`` on ``port``; the stream's URL."""
    request = urllib.request.Request(
        f"http://{HOST}:{port}/v1/chat/send?streaming=true",
        data=json.dumps({"message": "deliver"}).encode(),
        method="POST",
        headers={"X-User-ID": user, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(json.loads(response.read())["stream_url"])


async def delivery(owner: int, other: int, turns: int) -> tuple[list[float], int]:
    """Per event of ``turns`` turns at once, its arrival on ``other`` minus its arrival on ``owner`` (where
    the turn runs)."""
    delays: list[float] = []
    errors = 0

    async def one(n: int) -> None:
        nonlocal errors
        user = str(n % 50 + 1)
        await asyncio.sleep(LEVEL.chunks * LEVEL.delay * n / turns)
        url = await asyncio.to_thread(start_turn, owner, user)
        here: dict[int, float] = {}
        there: dict[int, float] = {}
        ended = await asyncio.gather(read_ids(owner, url, user, here), read_ids(other, url, user, there))
        if not all(ended) or set(here) != set(there):
            errors += 1
            return
        delays.extend(there[i] - here[i] for i in here)

    await asyncio.wait_for(asyncio.gather(*(one(n) for n in range(turns))), DEADLINE)
    return delays, errors


async def run_all(strict: bool) -> int:
    sys.path.insert(0, str(ROOT))
    from tests.pgcluster import Cluster

    load = os.getloadavg()
    rows: list[dict[str, Any]] = []
    deliveries: dict[int, tuple[list[float], int]] = {}
    floors: dict[int, list[float]] = {}
    upstream, upstream_port = start_upstream(LEVEL.chunks, LEVEL.delay)
    cluster = Cluster(settings=())
    try:
        pool = await open_pool(upstream_port, LEVEL.streams)
        try:
            direct = await measure_side(
                pool, [direct_target(upstream_port)] * LEVEL.streams, LEVEL.chunks, LEVEL.turns,
                LEVEL.chunks * LEVEL.delay,
            )
        finally:
            for connection in pool:
                connection.close()
        for label, engine, count in (("SQLite, 1 instance", "sqlite", 1), ("PostgreSQL, 1 instance", "postgres", 1),
                                     ("PostgreSQL, 2 instances", "postgres", 2)):
            url = cluster.create_database("bench") if engine == "postgres" else ""
            with tempfile.TemporaryDirectory(prefix="aichat-bench-") as tmp:
                daemons = []
                for n in range(count):
                    folder = Path(tmp) / str(n)
                    folder.mkdir()
                    daemons.append(start_daemon(folder, upstream_port, database_url=url))
                try:
                    rows.append(await streams_on([port for _, port in daemons], direct, label, engine == "postgres"))
                    if count == 2:
                        for turns in (1, DELIVERY_TURNS):
                            deliveries[turns] = await delivery(daemons[0][1], daemons[1][1], turns)
                finally:
                    for process, _ in daemons:
                        stop(process)
        floor_url = cluster.create_database("floor")
        for turns in deliveries:
            floors[turns] = delivery_floor(floor_url, turns, LEVEL.chunks, LEVEL.delay)
    finally:
        cluster.stop()
        stop(upstream)
    print("100 streams of turns on one and two instances (times in ms; 'added' = daemon TTFT - direct TTFT)")
    print(f"{'':>26}{'turns':>7}{'turns/s':>9}{'added p50':>11}{'added p99':>11}{'errors':>8}")
    for row in rows:
        print(f"{row['label']:>26}{row['turns']:>7}{row['throughput']:>9.1f}{ms(row['added_median']):>11}"
              f"{ms(row['added_p99']):>11}{row['errors']:>8}")
    print("\ncross-instance delivery: turns run on A at once, each read on A and B at the same time; B - A per event")
    print(f"{'':>24}{'turns at once':>14}{'events':>8}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'errors':>8}")
    for turns, (delays, errors) in deliveries.items():
        for label, found, failed in (("two daemons", delays, errors), ("floor: database alone", floors[turns], 0)):
            print(f"{label:>24}{turns:>14}{len(found):>8}{ms(quantile(found, 0.5)):>9}{ms(quantile(found, 0.99)):>9}"
                  f"{ms(max(found) if found else float('nan')):>9}{failed:>8}")
    delays = deliveries[DELIVERY_TURNS][0]
    p50, p99 = quantile(delays, 0.5), quantile(delays, 0.99)
    print(f"{os.cpu_count()} CPUs; load average {load[0]:.2f} before, {os.getloadavg()[0]:.2f} after "
          "(other processes on the machine skew every figure)")
    results = [
        (f"cross-instance delivery at {DELIVERY_TURNS} turns: p50 <= 5 ms", p50 <= 0.005),
        (f"cross-instance delivery at {DELIVERY_TURNS} turns: p99 <= 50 ms", p99 <= 0.050),
        ("0 errors", all(e == 0 for _, e in deliveries.values()) and all(row["errors"] == 0 for row in rows)),
    ]
    for label, ok in results:
        print(f"{'PASS' if ok else 'MISS'}  {label}")
    return 1 if strict and not all(ok for _, ok in results) else 0


def run() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when a target is missed")
    args = parser.parse_args()
    raise_open_files()
    sys.exit(asyncio.run(run_all(args.strict)))


if __name__ == "__main__":
    run()
