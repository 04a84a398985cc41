"""Numbered request load for the log-rotation check of the system test (runs inside the container).

Sends ``GET /health?seq=N`` for N = 1, 2, ... one after the other to the daemon on 127.0.0.1 until
``--seconds`` have passed or ``--max`` requests were sent, and prints one line per answered request
(``N STATUS``). The system test then checks that each of them left exactly one access-log line across
the current and the rotated log files. Standard library only (it runs on the container's python3).
"""

from __future__ import annotations

import argparse
import http.client
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=3001)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--max", type=int, default=5000)
    parser.add_argument("--interval", type=float, default=0.002, help="pause between requests")
    args = parser.parse_args()

    deadline = time.monotonic() + args.seconds
    failures = 0
    for seq in range(1, args.max + 1):
        if time.monotonic() >= deadline:
            break
        conn = http.client.HTTPConnection("127.0.0.1", args.port, timeout=5)
        try:
            conn.request("GET", f"/health?seq={seq}")
            response = conn.getresponse()
            response.read()
            print(seq, response.status, flush=True)
        except OSError as e:
            failures += 1
            print(f"# request {seq} failed: {e}", file=sys.stderr)
        finally:
            conn.close()
        time.sleep(args.interval)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
