"""Benchmark: streaming chat turns through the daemon next to the same upstream called directly.

Run ``python -m benchmarks.chat_stream`` from the repository root (``--levels 1 100 1000`` by default). For
each concurrency level it starts the scripted OpenAI upstream (``python -m tests.upstream --chunks N --delay
S``: every answer is N text deltas S seconds apart, the first at once; N and S per level in ``LEVELS``) and a
fresh daemon (``aichat-backend``, OpenAI provider pointed at that upstream, no MCP servers, no title
generation, SQLite in a temporary folder, or with ``--engines postgres`` a new database in a throwaway
PostgreSQL cluster started for the run with its default durability) as child processes with a raised
open-files limit, then measures, in the same run:

- direct: the level's streams as ``POST /v1/chat/completions`` (``stream: true``) straight to the upstream;
- daemon: the same number of one-request turns ``GET /v1/chat/stream?session_id=&message=`` read as SSE (each
  stream continues its own session: the user message is stored, the history read back, the model
  streamed, the answer stored).

Each stream runs turns back to back (one warm-up, then the measured ones) over a persistent HTTP/1.1
connection opened beforehand, so connection set-up is not in the figures; their starts are spread over one
answer's length so turns begin all the time instead of in one burst. The client is raw asyncio. Time to first
token (TTFT) runs from writing the request to the first line carrying text; inter-chunk gaps are between
successive text lines. The table shows the daemon's added TTFT (median and p99 of the daemon's minus the
direct ones), the added p99 inter-chunk gap, errors (non-200, ``error`` events, missing or extra chunks,
broken connections), the daemon's peak RSS (``VmHWM``) and the CPU use of the daemon, the upstream and this
client while the daemon streamed (100%: one core; all three share the machine).
Targets (2 cores): added TTFT median <= 1 ms and p99 <= 5 ms at 100; at 1000, 0 errors, added inter-chunk p99
<= 50 ms, RSS <= 300 MB; with both engines, PostgreSQL's added TTFT median at 100 within 1.3x of SQLite's
and 0 errors; each is printed as PASS or MISS (``--strict``: exit status 1 on a miss). Everything
listens on 127.0.0.1; every wait has a deadline. ``AICHAT_BENCH_DAEMON`` and ``AICHAT_BENCH_UPSTREAM`` replace
the daemon's and the upstream's commands (their arguments are appended), to run them under a profiler.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
OPEN_FILES = 65536
DEADLINE = 120.0


@dataclass
class Sample:
    """One streamed answer as the client saw it."""

    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    chunks: int = 0
    error: str | None = None


@dataclass
class Target:
    """Where and how to start a streamed answer, and how to read its lines."""

    port: int
    request: bytes
    is_text: Callable[[bytes], bool]
    is_end: Callable[[bytes], bool]
    is_error: Callable[[bytes], bool]
    #: PostgreSQL's daemon merges deltas that come within a few ms (every character still arrives).
    may_coalesce: bool = False


def direct_target(port: int) -> Target:
    """The upstream's Chat Completions endpoint."""
    body = json.dumps(
        {"model": "test-model", "stream": True, "messages": [{"role": "user", "content": "bench"}]}
    ).encode()
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {HOST}:{port}\r\nAuthorization: Bearer sk-bench\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    return Target(
        port,
        request,
        # the role chunk carries "content":"" and is not text
        is_text=lambda line: b'"content":"' in line and b'"content":""' not in line,
        is_end=lambda line: line.startswith(b"data: [DONE]"),
        is_error=lambda line: b'"error"' in line,
    )


def daemon_target(port: int, user: int, session_id: str) -> Target:
    """The daemon's one-request streaming turn in the session ``session_id``."""
    request = (
        f"GET /v1/chat/stream?session_id={session_id}&message=bench HTTP/1.1\r\n"
        f"Host: {HOST}:{port}\r\nX-User-ID: {user}\r\nAccept: text/event-stream\r\n\r\n"
    ).encode()
    return Target(
        port,
        request,
        is_text=lambda line: b'"type":"message"' in line and b'"content":' in line,
        is_end=lambda line: b'"type":"done"' in line,
        is_error=lambda line: b'"type":"error"' in line,
    )


class Connection:
    """A persistent HTTP/1.1 connection that reads one streamed response at a time."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(HOST, self.port, limit=1 << 20)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = self.reader = None

    async def stream(self, target: Target, chunks: int) -> Sample:
        """Send ``target.request`` and read the whole answer, timing its text lines."""
        sample = Sample()
        try:
            if self.writer is None:
                await self.open()
            assert self.reader is not None and self.writer is not None
            started = time.perf_counter()
            self.writer.write(target.request)
            await self._read(target, sample, started)
        except (OSError, asyncio.IncompleteReadError, ValueError) as e:
            sample.error = f"{type(e).__name__}: {e}"
            self.close()
        coalesced = target.may_coalesce and 0 < sample.chunks < chunks
        if sample.error is None and sample.chunks != chunks and not coalesced:
            sample.error = f"{sample.chunks} text chunks, expected {chunks}"
        return sample

    async def _read(self, target: Target, sample: Sample, started: float) -> None:
        assert self.reader is not None
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = head.split(b" ", 2)[1]
        headers = head.lower()
        if b"transfer-encoding: chunked" not in headers:
            raise ValueError(f"status {status.decode()}, not a chunked stream")
        pending = b""
        last: float | None = None
        ended = False
        while True:
            size = int((await self.reader.readline()).split(b";")[0], 16)
            if size == 0:
                while (await self.reader.readline()) not in (b"\r\n", b""):
                    pass
                break
            data = await self.reader.readexactly(size + 2)
            now = time.perf_counter()
            pending += data[:-2]
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if not line.startswith(b"data:"):
                    continue
                if target.is_text(line):
                    sample.chunks += 1
                    if last is None:
                        sample.ttft = now - started
                    else:
                        sample.gaps.append(now - last)
                    last = now
                elif target.is_end(line):
                    ended = True
                elif target.is_error(line):
                    sample.error = line.decode(errors="replace")[:200]
        if status != b"200" and sample.error is None:
            sample.error = f"status {status.decode()}"
        elif not ended and sample.error is None:
            sample.error = "stream ended without its end marker"
        if b"connection: close" in headers:
            self.close()


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of ``values``; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


@dataclass
class Measured:
    """Everything gathered for one target at one level."""

    ttft: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    errors: int = 0
    first_errors: list[str] = field(default_factory=list)

    def add(self, samples: list[Sample]) -> None:
        for sample in samples:
            if sample.error is not None:
                self.errors += 1
                if len(self.first_errors) < 3:
                    self.first_errors.append(sample.error)
                continue
            if sample.ttft is not None:
                self.ttft.append(sample.ttft)
            self.gaps.extend(sample.gaps)


async def open_pool(port: int, size: int) -> list[Connection]:
    """``size`` connections, opened a few at a time so the listen backlog never overflows."""
    pool = [Connection(port) for _ in range(size)]
    for start in range(0, size, 50):
        await asyncio.gather(*(c.open() for c in pool[start : start + 50]))
    return pool


async def worker(connection: Connection, target: Target, chunks: int, turns: int, start_after: float) -> list[Sample]:
    """After ``start_after`` seconds, one warm-up answer and then ``turns`` measured ones, back to back."""
    await asyncio.sleep(start_after)
    await connection.stream(target, chunks)
    return [await connection.stream(target, chunks) for _ in range(turns)]


async def measure_side(pool: list[Connection], targets: list[Target], chunks: int, turns: int, span: float) -> Measured:
    """Every connection streams answers back to back; the starts are spread evenly over ``span`` seconds
    (one answer's length), so turns begin all the time rather than in one burst."""
    level = len(pool)
    work = asyncio.gather(
        *(worker(c, t, chunks, turns, span * n / level) for n, (c, t) in enumerate(zip(pool, targets, strict=True)))
    )
    measured = Measured()
    for samples in await asyncio.wait_for(work, DEADLINE):
        measured.add(samples)
    return measured


def create_sessions(port: int, count: int) -> list[str]:
    """One session per daemon connection (user ``n % 50 + 1``), so each turn continues a conversation."""
    ids = []
    for n in range(count):
        request = urllib.request.Request(
            f"http://{HOST}:{port}/v1/chat/sessions",
            data=b'{"title": "bench"}',
            method="POST",
            headers={"X-User-ID": str(n % 50 + 1), "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            ids.append(json.loads(response.read())["id"])
    return ids


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure_level(
    level: int,
    turns: int,
    chunks: int,
    span: float,
    upstream_port: int,
    daemon_port: int,
    pids: tuple[int, int],
    may_coalesce: bool = False,
) -> tuple[Measured, Measured, tuple[float, float, float]]:
    """``level`` concurrent streams straight to the upstream, then the same through the daemon; also the CPU
    use of the daemon, the upstream and this client while the daemon streamed (1.0: one core busy all the
    time; together they share the machine's cores)."""
    sessions = await asyncio.to_thread(create_sessions, daemon_port, level)
    direct_pool = await open_pool(upstream_port, level)
    try:
        direct = await measure_side(direct_pool, [direct_target(upstream_port)] * level, chunks, turns, span)
    finally:
        for connection in direct_pool:
            connection.close()
    daemon_pool = await open_pool(daemon_port, level)
    targets = [
        replace(daemon_target(daemon_port, n % 50 + 1, session), may_coalesce=may_coalesce)
        for n, session in enumerate(sessions)
    ]
    before = [cpu_seconds(pid) for pid in pids] + [time.process_time()]
    wall = time.monotonic()
    try:
        through = await measure_side(daemon_pool, targets, chunks, turns, span)
    finally:
        for connection in daemon_pool:
            connection.close()
    after = [cpu_seconds(pid) for pid in pids] + [time.process_time()]
    elapsed = time.monotonic() - wall
    daemon, upstream, client = ((end - start) / elapsed for start, end in zip(before, after, strict=True))
    return direct, through, (daemon, upstream, client)


def raise_open_files() -> None:
    """In a child before exec: as many open files as allowed, up to OPEN_FILES."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = OPEN_FILES if hard == resource.RLIM_INFINITY else min(OPEN_FILES, hard)
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def upstream_command() -> list[str]:
    """``python -m tests.upstream``, or the command in ``AICHAT_BENCH_UPSTREAM``."""
    return os.environ.get("AICHAT_BENCH_UPSTREAM", "").split() or [sys.executable, "-m", "tests.upstream"]


def start_upstream(chunks: int, delay: float) -> tuple[subprocess.Popen[bytes], int]:
    """``python -m tests.upstream`` on a free port; returns the process and its port."""
    process = subprocess.Popen(
        [*upstream_command(), "--port", "0", "--chunks", str(chunks), "--delay", str(delay)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=raise_open_files,
    )
    assert process.stdout is not None
    line = process.stdout.readline().decode()
    if not line.startswith("listening on "):
        process.kill()
        raise SystemExit(f"the upstream did not start: {line}{process.stdout.read().decode()}")
    return process, int(line.rsplit(":", 1)[1].split("/", 1)[0])


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def daemon_command() -> list[str]:
    """``aichat-backend``, or the command in ``AICHAT_BENCH_DAEMON`` (e.g. the daemon under a profiler)."""
    return os.environ.get("AICHAT_BENCH_DAEMON", "").split() or [str(BIN / "aichat-backend")]


def start_daemon(
    folder: Path, upstream_port: int, *, database: str = "", database_url: str = ""
) -> tuple[subprocess.Popen[bytes], int]:
    """The daemon against the upstream (``database``: more lines of its database section; ``database_url``:
    PostgreSQL instead of SQLite); the process once /health answers, and its port."""
    port = free_port()
    servers = folder / "mcp-servers.json"
    servers.write_text('{"mcpServers": {}}')
    config = folder / "config.yaml"
    config.write_text(
        f"server:\n  host: {HOST}\n  port: {port}\n  shutdown_grace_seconds: 2\n"
        + (f"database:\n  dsn: {database_url}\n" if database_url else f"database:\n  path: {folder / 'aichat.db'}\n")
        + database
        + f"llm:\n  provider: openai\n  base_url: http://{HOST}:{upstream_port}/v1\n  api_key: sk-bench\n"
        "  max_retries: 0\n"
        f"mcp:\n  servers_file: {servers}\n"
        f"logging:\n  file: {folder / 'aichat-backend.log'}\n  level: info\n"
        "chat:\n  title_generation: false\n  stream_keep_seconds: 5\n  legacy_stream_get: true\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AICHAT_") and not k.endswith("_API_KEY")}
    process = subprocess.Popen(
        [*daemon_command(), "-config", str(config)],
        cwd=folder,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=raise_open_files,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=2):
                return process, port
        except OSError:
            time.sleep(0.05)
    process.kill()
    log = (folder / "aichat-backend.log").read_text() if (folder / "aichat-backend.log").exists() else ""
    raise SystemExit(f"the daemon did not start:\n{log[-3000:]}")


def memory_kib(pid: int, field_name: str) -> int:
    """A ``/proc/<pid>/status`` memory field in KiB (``VmHWM``: peak RSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after a grace."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


@dataclass(frozen=True)
class Level:
    """One concurrency level and the answers streamed at it."""

    streams: int
    turns: int
    chunks: int
    delay: float


#: Answers are long enough that turns start at a realistic rate (10 s each at 1000 streams: 100 turns/s),
#: and the total chunk rate (2000/s at 100 and 1000 streams) stays within what the upstream and this
#: client serve on 2 cores (direct gaps stay near ``delay``), so the differences measure the daemon.
LEVELS = {
    1: Level(1, 20, 20, 0.02),
    100: Level(100, 3, 40, 0.05),
    1000: Level(1000, 1, 20, 0.5),
}


def level_of(streams: int) -> Level:
    """The level for ``streams``: one of ``LEVELS`` or, for another count, 20 chunks at <= 5000 chunks/s."""
    return LEVELS.get(streams) or Level(streams, max(2, 200 // streams), 20, max(0.02, streams / 5000))


async def measure(level: Level, database_url: str = "") -> dict[str, Any]:
    """Start an upstream and a daemon for ``level``, measure both sides, stop them; one table row."""
    upstream, upstream_port = start_upstream(level.chunks, level.delay)
    try:
        with tempfile.TemporaryDirectory(prefix="aichat-bench-") as tmp:
            daemon, daemon_port = start_daemon(Path(tmp), upstream_port, database_url=database_url)
            try:
                direct, through, cpu = await measure_level(
                    level.streams,
                    level.turns,
                    level.chunks,
                    level.chunks * level.delay,
                    upstream_port,
                    daemon_port,
                    (daemon.pid, upstream.pid),
                    may_coalesce=bool(database_url),
                )
                if daemon.poll() is not None:
                    raise SystemExit(f"the daemon exited with {daemon.returncode} at {level.streams} streams")
                rss = memory_kib(daemon.pid, "VmHWM") / 1024
            finally:
                stop(daemon)
    finally:
        stop(upstream)
    for label, measured in (("direct", direct), ("daemon", through)):
        for error in measured.first_errors:
            print(f"  {label} error at {level.streams} streams: {error}", file=sys.stderr)
    nan = float("nan")
    return {
        "engine": "postgres" if database_url else "sqlite",
        "streams": level.streams,
        "turns": level.turns * level.streams,
        "chunks": level.chunks,
        "delay": level.delay,
        "direct_ttft": statistics.median(direct.ttft) if direct.ttft else nan,
        "daemon_ttft": statistics.median(through.ttft) if through.ttft else nan,
        "added_median": statistics.median(through.ttft) - statistics.median(direct.ttft)
        if direct.ttft and through.ttft
        else nan,
        "added_p99": quantile(through.ttft, 0.99) - quantile(direct.ttft, 0.99),
        "direct_gap_p99": quantile(direct.gaps, 0.99),
        "added_gap_p99": quantile(through.gaps, 0.99) - quantile(direct.gaps, 0.99),
        "errors": direct.errors + through.errors,
        "rss_mib": rss,
        "cpu": cpu[0],
        "upstream_cpu": cpu[1],
        "client_cpu": cpu[2],
    }


def table(rows: list[dict[str, Any]]) -> str:
    """The figures, one line per level."""
    lines = [
        "chat streaming through the daemon vs straight to the same upstream (times in ms; 'added' = daemon - direct)",
        f"{'engine':>9}{'streams':>8}{'turns':>7}{'chunks':>7}{'every':>7}{'TTFT direct':>12}{'TTFT daemon':>12}"
        f"{'added p50':>10}{'added p99':>10}{'gap p99 direct':>15}{'added gap p99':>14}{'errors':>7}"
        f"{'peak RSS MiB':>13}{'CPU daemon/upstream/client':>28}",
    ]
    for row in rows:
        lines.append(
            f"{row['engine']:>9}{row['streams']:>8.0f}{row['turns']:>7.0f}{row['chunks']:>7.0f}{ms(row['delay']):>7}"
            f"{ms(row['direct_ttft']):>12}{ms(row['daemon_ttft']):>12}{ms(row['added_median']):>10}"
            f"{ms(row['added_p99']):>10}{ms(row['direct_gap_p99']):>15}{ms(row['added_gap_p99']):>14}"
            f"{row['errors']:>7.0f}{row['rss_mib']:>13.1f}"
            f"{row['cpu']:>14.0%} /{row['upstream_cpu']:>4.0%} /{row['client_cpu']:>4.0%}"
        )
    return "\n".join(lines)


def checks(rows: list[dict[str, Any]]) -> list[tuple[str, bool]]:
    """The targets that apply to the levels measured."""
    found: list[tuple[str, bool]] = []
    for engine in ("sqlite", "postgres"):
        by_level = {int(row["streams"]): row for row in rows if row["engine"] == engine}
        if 100 in by_level:
            row = by_level[100]
            found.append((f"{engine}, 100 streams: added TTFT median <= 1 ms", row["added_median"] <= 0.001))
            found.append((f"{engine}, 100 streams: added TTFT p99 <= 5 ms", row["added_p99"] <= 0.005))
        if 1000 in by_level:
            row = by_level[1000]
            found.append((f"{engine}, 1000 streams: 0 errors", row["errors"] == 0))
            found.append((f"{engine}, 1000 streams: added inter-chunk p99 <= 50 ms", row["added_gap_p99"] <= 0.050))
            found.append((f"{engine}, 1000 streams: daemon peak RSS <= 300 MB", row["rss_mib"] * 1024 * 1024 <= 300e6))
    at_100 = {row["engine"]: row for row in rows if int(row["streams"]) == 100}
    if {"sqlite", "postgres"} <= set(at_100):
        sqlite, postgres = at_100["sqlite"], at_100["postgres"]
        ratio = postgres["added_median"] / sqlite["added_median"] if sqlite["added_median"] > 0 else float("inf")
        found.append((f"100 streams: PostgreSQL added TTFT median within 1.3x of SQLite's ({ratio:.2f}x)",
                      postgres["added_median"] <= 1.3 * max(sqlite["added_median"], 0.0)))
        found.append(("100 streams: PostgreSQL 0 errors", postgres["errors"] == 0))
    return found


async def run_all(levels: list[Level], strict: bool, engines: list[str]) -> int:
    """Measure each level on each engine, print the table and the targets; 1 if ``strict`` and a target is
    missed."""
    load = os.getloadavg()
    rows = []
    cluster = None
    try:
        for engine in engines:
            url = ""
            if engine == "postgres" and cluster is None:
                sys.path.insert(0, str(ROOT))
                from tests.pgcluster import Cluster

                cluster = Cluster(settings=())
            for level in levels:
                if cluster is not None and engine == "postgres":
                    url = cluster.create_database("bench")
                rows.append(await measure(level, url))
    finally:
        if cluster is not None:
            cluster.stop()
    print(table(rows))
    print(
        f"{os.cpu_count()} CPUs; load average {load[0]:.2f} before, {os.getloadavg()[0]:.2f} after "
        "(other processes on the machine skew every figure)"
    )
    results = checks(rows)
    for label, ok in results:
        print(f"{'PASS' if ok else 'MISS'}  {label}")
    return 1 if strict and not all(ok for _, ok in results) else 0


def run() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--levels", type=int, nargs="+", default=sorted(LEVELS), help="concurrent streams")
    parser.add_argument("--turns", type=int, default=0, help="measured turns per stream (default: per level)")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when a target is missed")
    parser.add_argument(
        "--engines", nargs="+", default=["sqlite", "postgres"], choices=["sqlite", "postgres"], help="store engines"
    )
    args = parser.parse_args()
    levels = [level_of(n) for n in args.levels]
    if args.turns > 0:
        levels = [Level(lv.streams, args.turns, lv.chunks, lv.delay) for lv in levels]
    raise_open_files()
    sys.exit(asyncio.run(run_all(levels, args.strict, args.engines)))


if __name__ == "__main__":
    run()
