"""``make fuzz``: schemathesis attacks a live daemon from its own OpenAPI document.

The daemon runs with the offline mock model, SQLite in a temporary folder and the real server-everything
from node_modules; schemathesis reads ``/openapi.json`` from it and runs its default checks (no server
errors, responses and status codes as documented, ...) on every operation, then the stateful phase along
the document's links (create a session, then read, rename, list its messages, delete it). The run is
bounded (``--max-examples``, ``--max-time``); the exit status is schemathesis's, so any failure fails CI.
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
            command = [
                str(BIN / "schemathesis"), "run", f"{daemon.base}/openapi.json",
                "--header", "X-User-ID: 1",
                "--max-examples", str(MAX_EXAMPLES),
                "--max-time", str(MAX_TIME),
                "--request-timeout", "30",
                "--generation-deterministic",
                # Text no database can store (NUL, lone surrogates) is refused with a 400, as documented.
                "--generation-allow-x00", "false",
                "--generation-codec", "utf-8",
                # DELETE .../messages clears a session's messages (the list is then empty, as the reference
                # has it): it deletes no resource, which is what this check would expect of it.
                # negative_data_rejection: in the stateful phase schemathesis counts some multipart uploads it
                # mutated as invalid that the daemon accepts (it takes any extra form parts, as the reference
                # does); every JSON body's types and required fields are refused with 400 by the contract.
                "--exclude-checks", "use_after_free,negative_data_rejection",
            ]
            print("$", " ".join(command), flush=True)
            return subprocess.call(command, cwd=folder)
        finally:
            daemon.stop()


if __name__ == "__main__":
    sys.exit(main())
