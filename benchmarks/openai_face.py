"""Benchmark: ``/v1/chat/completions`` through the daemon (no tools) next to the reference route and to the
same upstream called directly.

Run ``python -m benchmarks.openai_face`` from the repository root (``--levels 1 100`` by default). For each
level it starts the scripted upstream and a fresh daemon as :mod:`benchmarks.chat_stream` does (its helpers,
its ``LEVELS``: the same answers, the same spread starts over persistent connections), then measures in one
run, one side after the other:

- direct: ``POST /v1/chat/completions`` (``stream: true``) straight to the upstream;
- reference: the daemon's ``GET /v1/chat/stream?session_id=&message=`` turns (stored session, SSE events);
- face: the daemon's ``POST /v1/chat/completions`` (``stream: true``, no MCP servers, so no tools): stateless,
  nothing stored, the upstream's chunks re-framed as OpenAI's.

The table shows each side's median time to first token, what the daemon adds to it (median and p99 over the
direct figures), the added p99 inter-chunk gap, errors, and the daemon's CPU use while that side streamed
(100%: one core). No targets: these are figures to compare, printed as measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from benchmarks.chat_stream import (
    HOST,
    LEVELS,
    Level,
    Measured,
    Target,
    cpu_seconds,
    create_sessions,
    daemon_target,
    direct_target,
    level_of,
    measure_side,
    ms,
    open_pool,
    quantile,
    raise_open_files,
    start_daemon,
    start_upstream,
    stop,
)


def face_target(port: int, user: int, model: str) -> Target:
    """The daemon's streamed chat completion for ``user`` (``X-User-ID`` from loopback, a trusted proxy)."""
    body = json.dumps({"model": model, "stream": True, "messages": [{"role": "user", "content": "bench"}]}).encode()
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {HOST}:{port}\r\nX-User-ID: {user}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    return Target(
        port,
        request,
        is_text=lambda line: b'"content":"' in line and b'"content":""' not in line,
        is_end=lambda line: line.startswith(b"data: [DONE]"),
        is_error=lambda line: b'"error"' in line,
    )


def model_of(port: int) -> str:
    with urllib.request.urlopen(
        urllib.request.Request(f"http://{HOST}:{port}/v1/models", headers={"X-User-ID": "1"}), timeout=10
    ) as response:
        model: str = json.loads(response.read())["data"][0]["id"]
        return model


async def side(port: int, targets: list[Target], level: Level, pid: int) -> tuple[Measured, float]:
    """One side's streams at ``level``, and the daemon's CPU use (cores) while they ran."""
    pool = await open_pool(port, level.streams)
    before, wall = cpu_seconds(pid), time.monotonic()
    try:
        measured = await measure_side(pool, targets, level.chunks, level.turns, level.chunks * level.delay)
    finally:
        for connection in pool:
            connection.close()
    return measured, (cpu_seconds(pid) - before) / (time.monotonic() - wall)


@dataclass
class Row:
    """One level's figures: the direct side, then each route through the daemon with its CPU use."""

    level: Level
    direct: Measured
    routes: list[tuple[str, Measured, float]]


async def measure(level: Level) -> Row:
    upstream, upstream_port = start_upstream(level.chunks, level.delay)
    try:
        with tempfile.TemporaryDirectory(prefix="aichat-bench-") as tmp:
            daemon, port = start_daemon(Path(tmp), upstream_port)
            try:
                model = await asyncio.to_thread(model_of, port)
                sessions = await asyncio.to_thread(create_sessions, port, level.streams)
                direct_targets = [direct_target(upstream_port)] * level.streams
                direct, _ = await side(upstream_port, direct_targets, level, upstream.pid)
                reference_targets = [daemon_target(port, n % 50 + 1, s) for n, s in enumerate(sessions)]
                reference, reference_cpu = await side(port, reference_targets, level, daemon.pid)
                face_targets = [face_target(port, n % 50 + 1, model) for n in range(level.streams)]
                face, face_cpu = await side(port, face_targets, level, daemon.pid)
                if daemon.poll() is not None:
                    raise SystemExit(f"the daemon exited with {daemon.returncode} at {level.streams} streams")
            finally:
                stop(daemon)
    finally:
        stop(upstream)
    for label, measured in (("direct", direct), ("reference", reference), ("face", face)):
        for error in measured.first_errors:
            print(f"  {label} error at {level.streams} streams: {error}", file=sys.stderr)
    return Row(level, direct, [("reference", reference, reference_cpu), ("face", face, face_cpu)])


def table(rows: list[Row]) -> str:
    lines = [
        "/v1/chat/completions (no tools) vs the reference route vs the upstream directly "
        "(times in ms; 'added' = through the daemon - direct)",
        f"{'streams':>8}{'turns':>7}{'route':>12}{'TTFT p50':>10}{'added p50':>10}{'added p99':>10}"
        f"{'added gap p99':>14}{'errors':>7}{'daemon CPU':>11}",
    ]
    for row in rows:
        level, direct = row.level, row.direct
        turns = level.turns * level.streams
        lines.append(
            f"{level.streams:>8}{turns:>7}{'direct':>12}{ms(statistics.median(direct.ttft)):>10}"
            f"{'':>10}{'':>10}{'':>14}{direct.errors:>7}{'':>11}"
        )
        for name, measured, cpu in row.routes:
            lines.append(
                f"{level.streams:>8}{turns:>7}{name:>12}{ms(statistics.median(measured.ttft)):>10}"
                f"{ms(statistics.median(measured.ttft) - statistics.median(direct.ttft)):>10}"
                f"{ms(quantile(measured.ttft, 0.99) - quantile(direct.ttft, 0.99)):>10}"
                f"{ms(quantile(measured.gaps, 0.99) - quantile(direct.gaps, 0.99)):>14}"
                f"{measured.errors:>7}{cpu:>11.0%}"
            )
    return "\n".join(lines)


async def run_all(levels: list[Level]) -> None:
    rows = [await measure(level) for level in levels]
    print(table(rows))


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 100], help="concurrent streams")
    args = parser.parse_args()
    raise_open_files()
    asyncio.run(run_all([LEVELS.get(n) or level_of(n) for n in args.levels]))


if __name__ == "__main__":
    run()
