"""``make fuzz``: schemathesis attacks a live daemon from its own OpenAPI document.

The daemon runs with the offline mock model, SQLite in a temporary folder and the real server-everything
from node_modules; schemathesis reads ``/openapi.json`` from it and runs its default checks (no server
errors, responses and status codes as documented, bodies that break the schemas refused, ...) on every
operation, then the stateful phase along the document's links (create a session, then read, rename, list
its messages, delete it). The run is bounded (``--max-examples``, ``--max-time``); any failure fails it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.support import free_port
from tests.test_daemon import BIN, start, write_daemon_config

MODULES = Path(__file__).resolve().parent.parent / "node_modules" / "@modelcontextprotocol"
#: Examples per operation and the budget of the whole run (seconds).
MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "25"))
MAX_TIME = int(os.environ.get("FUZZ_MAX_SECONDS", "240"))


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="aichat-fuzz-") as name:
        folder = Path(name)
        port = free_port()
        config = write_daemon_config(
            folder, port, "chat:\n  approval:\n    policy: never\n  title_generation: false\n"
        )
        everything = str(MODULES / "server-everything/dist/index.js")
        servers = {"everything": {"command": "node", "args": [everything, "stdio"]}}
        (folder / "mcp-servers.json").write_text(json.dumps({"mcpServers": servers}))
        daemon = start(folder, [str(BIN / "aichat-backend"), "-config", str(config)], port)
        try:
            common = [
                str(BIN / "schemathesis"), "run", f"{daemon.base}/openapi.json",
                "--header", "X-User-ID: 1",
                "--max-examples", str(MAX_EXAMPLES),
                "--request-timeout", "30",
                "--generation-deterministic",
                # Text no database can store (NUL, lone surrogates) is refused with a 400, as documented.
                "--generation-allow-x00", "false",
                "--generation-codec", "utf-8",
            ]
            # DELETE .../messages clears a session's messages (the list is then empty, as the reference has
            # it): it deletes no resource, which is what use_after_free would expect of it.
            runs = [
                [*common, "--phases", "examples,coverage,fuzzing", "--max-time", str(MAX_TIME * 3 // 5),
                 "--exclude-checks", "use_after_free"],
                # In the stateful phase negative_data_rejection flags requests that schemathesis itself reports
                # as "Invalid component: positive test case" (its issue #2983), so it runs in the phases above.
                [*common, "--phases", "stateful", "--max-time", str(MAX_TIME * 2 // 5),
                 "--exclude-checks", "use_after_free,negative_data_rejection"],
            ]
            status = 0
            for command in runs:
                print("$", " ".join(command), flush=True)
                status = subprocess.call(command, cwd=folder) or status
            return status
        finally:
            daemon.stop()


if __name__ == "__main__":
    sys.exit(main())
