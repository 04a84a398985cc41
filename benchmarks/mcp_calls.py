"""Benchmark: ``tools/call`` of server-everything's ``echo`` through our MCP client, next to a bare client.

Run ``python -m benchmarks.mcp_calls`` from the repository root after ``npm ci``. In one run it measures
sequential calls and calls with 100 in flight, through :class:`aichat.mcp.MCPHost` and through a bare
blocking client (pipes, ``json``, nothing else) on its own instance of the same server (sequential calls of
both clients interleave in blocks of 100, so both see the same machine load), then the time from
``startService`` to all three npm servers ready. Targets: sequential within 1.3x of the bare client, at
least 3000 calls/s with 100 in flight, all-ready within 0.6 s.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred, gatherResults

from aichat.mcp import MCPHost, ServerConfig

ROOT = Path(__file__).resolve().parent.parent
MODULES = ROOT / "node_modules" / "@modelcontextprotocol"
ECHO = {"message": "hello"}


def npm_servers(tmp: str) -> list[ServerConfig]:
    """The three pinned npm servers, as the tests start them."""
    return [
        ServerConfig("everything", command="node", args=(str(MODULES / "server-everything/dist/index.js"), "stdio")),
        ServerConfig("filesystem", command="node", args=(str(MODULES / "server-filesystem/dist/index.js"), tmp)),
        ServerConfig(
            "memory",
            command="node",
            args=(str(MODULES / "server-memory/dist/index.js"),),
            env={"MEMORY_FILE_PATH": os.path.join(tmp, "memory.jsonl")},
        ),
    ]


class BareClient:
    """The floor: blocking pipes and ``json``, one request at a time or pipelined."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            ["node", str(MODULES / "server-everything/dist/index.js"), "stdio"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self._id = 0
        self.request("initialize", {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "b"}})
        self._send({"jsonrpc": "2.0", "method": "notifications/initialized"})

    def _send(self, message: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(message).encode() + b"\n")
        self.process.stdin.flush()

    def _read_response(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        while True:
            message: dict[str, Any] = json.loads(self.process.stdout.readline())
            if "id" in message and "method" not in message:
                return message

    def request(self, method: str, params: Any) -> dict[str, Any]:
        """One request, waiting for its response."""
        self._id += 1
        self._send({"jsonrpc": "2.0", "id": self._id, "method": method, "params": params})
        return self._read_response()

    def pipelined(self, total: int, window: int) -> list[float]:
        """``total`` echo calls with ``window`` in flight; returns per-call latencies."""
        started: dict[int, float] = {}
        latencies: list[float] = []
        sent = 0
        while len(latencies) < total:
            while sent < total and len(started) < window:
                self._id += 1
                started[self._id] = time.perf_counter()
                self._send(
                    {"jsonrpc": "2.0", "id": self._id, "method": "tools/call",
                     "params": {"name": "echo", "arguments": ECHO}}
                )
                sent += 1
            response = self._read_response()
            latencies.append(time.perf_counter() - started.pop(response["id"]))
        return latencies

    def close(self) -> None:
        """Close stdin and wait for the server to exit."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def summary(label: str, latencies: list[float], elapsed: float) -> dict[str, Any]:
    """Calls/s, p50 and p99 of one series."""
    ordered = sorted(latencies)
    return {
        "label": label,
        "calls_per_s": len(latencies) / elapsed,
        "p50_ms": statistics.median(ordered) * 1000,
        "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
    }


def bare_parallel(calls: int, window: int) -> dict[str, Any]:
    """Pipelined echo calls through the bare client."""
    client = BareClient()
    try:
        client.pipelined(500, window)
        start = time.perf_counter()
        latencies = client.pipelined(calls, window)
        return summary(f"bare {window} in flight", latencies, time.perf_counter() - start)
    finally:
        client.close()


async def sequential(host: MCPHost, calls: int, block: int = 100) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sequential echo calls, bare client and ours interleaved in blocks so both see the same machine load."""
    client = BareClient()
    try:
        for _ in range(200):
            client.request("tools/call", {"name": "echo", "arguments": ECHO})
            await host.call_tool("everything__echo", ECHO)
        bare: list[float] = []
        ours: list[float] = []
        bare_time = ours_time = 0.0
        while len(bare) < calls:
            start = time.perf_counter()
            for _ in range(block):
                t = time.perf_counter()
                client.request("tools/call", {"name": "echo", "arguments": ECHO})
                bare.append(time.perf_counter() - t)
            bare_time += time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(block):
                t = time.perf_counter()
                await host.call_tool("everything__echo", ECHO)
                ours.append(time.perf_counter() - t)
            ours_time += time.perf_counter() - start
        return summary("bare sequential", bare, bare_time), summary("aichat sequential", ours, ours_time)
    finally:
        client.close()


async def ours_parallel(host: MCPHost, calls: int, window: int) -> dict[str, Any]:
    """``window`` workers calling echo until ``calls`` calls are done."""
    latencies: list[float] = []
    remaining = [calls]

    async def worker() -> None:
        while remaining[0] > 0:
            remaining[0] -= 1
            t = time.perf_counter()
            await host.call_tool("everything__echo", ECHO)
            latencies.append(time.perf_counter() - t)

    async def run(total: int) -> float:
        remaining[0] = total
        latencies.clear()
        start = time.perf_counter()
        await gatherResults([Deferred.fromCoroutine(worker()) for _ in range(window)])
        return time.perf_counter() - start

    await run(500)
    elapsed = await run(calls)
    return summary(f"aichat {window} in flight", latencies, elapsed)


async def all_ready(reactor: Any, tmp: str, rounds: int) -> list[float]:
    """Seconds from startService to all three npm servers ready, per round."""
    times = []
    for _ in range(rounds):
        host = MCPHost(reactor, npm_servers(tmp))
        start = time.perf_counter()
        host.startService()
        await host.wait_ready(30)
        times.append(time.perf_counter() - start)
        assert all(s["state"] == "ready" for s in host.status()), host.status()
        await host.stopService()
    return times


def bare_all_ready(tmp: str, rounds: int) -> list[float]:
    """The floor for all-ready: the same three servers, raw pipes, initialize + tools/list written at once."""
    times = []
    handshake = b"".join(
        json.dumps(m).encode() + b"\n"
        for m in (
            {"jsonrpc": "2.0", "id": 1, "method": "initialize",
             "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "b"}}},
            {"jsonrpc": "2.0", "method": "notifications/initialized"},
            {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
        )
    )
    for _ in range(rounds):
        start = time.perf_counter()
        processes = []
        for config in npm_servers(tmp):
            env = {"PATH": os.environ.get("PATH", ""), **config.env}
            process = subprocess.Popen(
                ["node", *config.args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                env=env,
            )
            assert process.stdin is not None
            process.stdin.write(handshake)
            process.stdin.flush()
            processes.append(process)
        with selectors.DefaultSelector() as selector:
            for process in processes:
                assert process.stdout is not None
                selector.register(process.stdout, selectors.EVENT_READ)
            waiting = len(processes)
            while waiting:
                for key, _ in selector.select():
                    line = key.fileobj.readline()  # type: ignore[union-attr]
                    if line and json.loads(line).get("id") == 2:
                        selector.unregister(key.fileobj)
                        waiting -= 1
        times.append(time.perf_counter() - start)
        for process in processes:
            process.kill()
            process.wait()
    return times


def table(rows: list[dict[str, Any]], bare: dict[str, dict[str, Any]]) -> str:
    """Rows with calls/s, p50, p99 and the p50 ratio to the bare client of the same kind."""
    lines = [f"{'client':<26}{'calls/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'ratio':>8}"]
    for row in rows:
        kind = "sequential" if "sequential" in row["label"] else "parallel"
        ratio = bare[kind]["calls_per_s"] / row["calls_per_s"]
        lines.append(
            f"{row['label']:<26}{row['calls_per_s']:>10.0f}{row['p50_ms']:>9.3f}{row['p99_ms']:>9.3f}{ratio:>7.2f}x"
        )
    return "\n".join(lines)


async def main(reactor: Any, args: argparse.Namespace) -> None:
    """Run every measurement and print the table."""
    with tempfile.TemporaryDirectory() as tmp:
        host = MCPHost(reactor, npm_servers(tmp)[:1])
        host.startService()
        await host.wait_ready(30)
        try:
            bare_seq, seq = await sequential(host, args.calls)
            bare = {"sequential": bare_seq, "parallel": bare_parallel(args.calls, args.window)}
            par = await ours_parallel(host, args.calls, args.window)
        finally:
            await host.stopService()
        ready = await all_ready(reactor, tmp, args.rounds)
        bare_ready = bare_all_ready(tmp, args.rounds)
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} (other work on the machine skews every row)")
    print(table([bare["sequential"], seq, bare["parallel"], par], bare))
    print("(ratio: bare calls/s over this row's calls/s; 1.00x is the bare client's speed)")
    print(
        f"start to all-ready, 3 npm servers: median {statistics.median(ready):.3f} s, "
        f"max {max(ready):.3f} s over {len(ready)} rounds "
        f"(bare pipes, same servers: median {statistics.median(bare_ready):.3f} s)"
    )
    seq_ratio = bare["sequential"]["calls_per_s"] / seq["calls_per_s"]
    checks: list[tuple[str, Callable[[], bool]]] = [
        ("sequential <= 1.3x bare", lambda: seq_ratio <= 1.3),
        (f"{args.window} in flight >= 3000 calls/s", lambda: par["calls_per_s"] >= 3000),
        ("all-ready <= 0.6 s", lambda: statistics.median(ready) <= 0.6),
    ]
    for label, check in checks:
        print(f"{'PASS' if check() else 'MISS'}  {label}")


def run() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--window", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if not MODULES.is_dir():
        sys.exit(f"{MODULES} is missing: run `npm ci` in {ROOT}")
    task.react(lambda reactor: Deferred.fromCoroutine(main(reactor, args)))


if __name__ == "__main__":
    run()
