"""Compact JSON as the daemon writes it: no spaces after separators, non-ASCII text kept as UTF-8.

One encoder serves every caller: ``json.dumps`` with options builds a new encoder on each call, and some
callers (SSE events, MCP messages) are on the per-chunk path.
"""

from __future__ import annotations

import json

compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
