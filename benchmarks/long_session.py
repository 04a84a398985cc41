"""Benchmark: the daemon's memory over a long session, turn after turn in one conversation.

Run ``python -m benchmarks.long_session`` from the repository root (``--turns 10000 --every 1000`` by
default). It starts the scripted OpenAI upstream (``python -m tests.upstream``, a short echo per answer) and,
one after the other, two fresh daemons on SQLite in a temporary folder: one with the history cache off
(``database.history_cache_mb: 0``: every turn reads its history's tail from the database) and one with the
default cache. Each runs ``--turns`` non-streaming turns in a single session over one keep-alive connection,
and its RSS (``VmRSS``) is read every ``--every`` turns. The table shows RSS at each sample, the growth per
1000 turns over the second half of the run (after warm-up: the statement cache, the allocator's arenas), the
growth over the first and over the last 1000 turns, and the time per turn. A turn reads only the tail of its
session that the context budget needs (``chat.history_budget_chars``, 100,000 characters by default: some
2,000 turns of this benchmark's short messages), so memory may grow until the tail is full, and a daemon
whose memory grows with the session's length shows a growth that does not fall to about 0 however long the
run. Target: growth per 1000 turns <= 1 MiB with the cache off (the history cache's own budget bounds it with
the cache on). Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.chat_stream import HOST, memory_kib, start_daemon, start_upstream, stop

TARGET_MIB_PER_1000 = 1.0


def run(turns: int, every: int, cache_mb: int, upstream_port: int) -> tuple[list[tuple[int, float]], float]:
    """``turns`` turns in one session; RSS samples (turns done, MiB) and the mean seconds per turn."""
    with tempfile.TemporaryDirectory(prefix="aichat-long-") as folder:
        process, port = start_daemon(Path(folder), upstream_port, database=f"  history_cache_mb: {cache_mb}\n")
        try:
            connection = http.client.HTTPConnection(HOST, port, timeout=60)
            connection.connect()
            # http.client writes the head and the body apart: without this, Nagle and delayed ACKs add 40 ms.
            connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            headers = {"X-User-ID": "1", "Content-Type": "application/json"}
            connection.request("POST", "/v1/chat/sessions", b'{"title": "long"}', headers)
            session_id = json.loads(connection.getresponse().read())["id"]
            samples = [(0, memory_kib(process.pid, "VmRSS") / 1024)]
            began = time.monotonic()
            for turn in range(1, turns + 1):
                body = json.dumps({"message": f"turn {turn}", "session_id": session_id}).encode()
                connection.request("POST", "/v1/chat/send", body, headers)
                response = connection.getresponse()
                answer = response.read()
                if response.status != 200:
                    raise SystemExit(f"turn {turn} failed: {response.status} {answer[:300]!r}")
                if turn % every == 0:
                    samples.append((turn, memory_kib(process.pid, "VmRSS") / 1024))
            per_turn = (time.monotonic() - began) / turns
            connection.close()
            return samples, per_turn
        finally:
            stop(process)


def growth_per_1000(samples: list[tuple[int, float]]) -> float:
    """MiB per 1000 turns over the second half of the samples (least squares)."""
    half = samples[len(samples) // 2:]
    if len(half) < 2:
        half = samples
    xs = [turn for turn, _ in half]
    ys = [rss for _, rss in half]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    if not spread:
        return 0.0
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread
    return slope * 1000


def growth_over(samples: list[tuple[int, float]], first: int, last: int) -> float | None:
    """MiB gained from turn ``first`` to turn ``last``, when both were sampled."""
    rss = dict(samples)
    if first not in rss or last not in rss:
        return None
    return rss[last] - rss[first]


def cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.2f} MiB"


def main(argv: list[str] | None = None) -> int:
    """Run both daemons and print the table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.long_session", description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=10_000)
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--strict", action="store_true", help="exit 1 when the target is missed")
    args = parser.parse_args(argv)
    upstream, upstream_port = start_upstream(chunks=4, delay=0.0)
    results = {}
    try:
        for cache_mb in (0, 64):
            results[cache_mb] = run(args.turns, args.every, cache_mb, upstream_port)
    finally:
        stop(upstream)
    turns_done = [turn for turn, _ in results[0][0]]
    print(f"RSS (MiB) of one daemon over {args.turns} turns in one session (SQLite)")
    print(
        "| turns | " + " | ".join(str(t) for t in turns_done)
        + " | growth / 1000 turns | first 1000 | last 1000 | ms / turn |"
    )
    print("|---|" + "---|" * (len(turns_done) + 4))
    for cache_mb, (samples, per_turn) in results.items():
        label = "history cache off" if cache_mb == 0 else f"history cache {cache_mb} MB"
        cells = " | ".join(f"{rss:.1f}" for _, rss in samples)
        first, last = growth_over(samples, 0, 1000), growth_over(samples, args.turns - 1000, args.turns)
        print(
            f"| {label} | {cells} | {growth_per_1000(samples):+.2f} MiB | {cell(first)} | {cell(last)} "
            f"| {per_turn * 1000:.2f} |"
        )
    growth = growth_per_1000(results[0][0])
    verdict = "PASS" if growth <= TARGET_MIB_PER_1000 else "MISS"
    print(f"target: growth <= {TARGET_MIB_PER_1000} MiB per 1000 turns with the cache off: {verdict} ({growth:+.2f})")
    return 1 if args.strict and verdict == "MISS" else 0


if __name__ == "__main__":
    sys.exit(main())
