"""``aichat-backend db copy``: a populated SQLite file round-trips through PostgreSQL and back unchanged;
a non-empty target is refused without --force; a re-run with --force copies nothing twice."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pytest

from aichat.store import Approval, Attachment, Message, ToolExecution, new_id, utc_now
from aichat.store.copy import CopyError, copy
from aichat.store.sql import SQLStore
from tests.pgcluster import PASSWORD
from tests.support import BIN, daemon_env, inline_pg_store, inline_store
from tests.test_store import run


def populate(store: SQLStore) -> list[tuple[str, str]]:
    """Two users' sessions with tool calls, tool results, executions, attachments and approvals, and the
    tool executions of their chat completions; returns the approvals as (user, id)."""
    approvals = []
    call = {"id": "call_1", "type": "function", "function": {"name": "everything__echo", "arguments": '{"m":1}'}}
    for user in ("1", "2"):
        for index in range(30):
            session = run(store.create_session(user, f"session {user}/{index} ✓"))
            run(store.add_message(Message(
                new_id("user"), session.id, "user", f"hello {index}",
                attachments=tuple(Attachment(new_id(), f"f{j}.txt", "text/plain", 3, "YWJj") for j in range(index % 3)),
            )))
            run(store.add_message(Message(new_id("assistant"), session.id, "assistant", "", tool_calls=[call])))
            run(store.add_message(Message(
                new_id("tool"), session.id, "tool", "1", tool_call_id="call_1",
                tool_executions=[{"id": "call_1", "tool_name": "everything__echo", "result": "1", "duration_ms": 2}],
            )))
            run(store.add_message(Message(new_id("assistant"), session.id, "assistant", f"done {index}")))
            if index % 5 == 0:
                approval = Approval(new_id("approval"), session.id, user, [call], "pending", utc_now(), utc_now())
                run(store.create_approval(approval))
                approvals.append((user, approval.id))
        executions = [
            ToolExecution.of(user, f"chatcmpl_{user}_{n}", {
                "id": f"call_{n}", "tool_name": "everything__echo", "arguments": "{}", "result": f"r{n}",
                "start_time": utc_now(), "end_time": utc_now(), "duration_ms": n,
            })
            for n in range(5)
        ]
        run(store.add_tool_executions(executions))
    return approvals


def snapshot(store: SQLStore, approvals: list[tuple[str, str]]) -> dict[str, object]:
    """Everything each user can read: sessions in order, each with its history, and the approvals."""
    out: dict[str, object] = {}
    for user in ("1", "2"):
        sessions = run(store.list_sessions(user, 100, 0))
        out[user] = [(s, run(store.history(s.id))) for s in sessions]
    out["approvals"] = [run(store.get_approval(user, approval_id)) for user, approval_id in approvals]
    out["executions"] = run(store.list_tool_executions(None, None, 100, 0))
    return out


def test_sqlite_round_trip_through_postgres(tmp_path: Path, pg_url: str) -> None:
    """SQLite -> PostgreSQL -> a new SQLite file: every user sees the same sessions, messages, attachments;
    progress is printed and counts are verified; a second copy needs --force and adds nothing."""
    source = tmp_path / "source.db"
    store = inline_store(str(source))
    approvals = populate(store)
    before = snapshot(store, approvals)
    assert len(approvals) == 12 and all(before["approvals"])  # type: ignore[arg-type]
    run(store.close())

    progress = io.StringIO()
    counts = copy(f"sqlite:{source}", pg_url, out=progress)
    assert counts == {
        "chat_sessions": 60, "chat_messages": 240, "chat_attachments": 60, "tool_approvals": 12, "tool_executions": 10
    }
    assert "60/60 sessions, 240/240 messages" in progress.getvalue()
    assert PASSWORD not in progress.getvalue()
    assert snapshot(inline_pg_store(pg_url, cache_bytes=0), approvals) == before

    with pytest.raises(CopyError, match="already holds 60 session"):
        copy(f"sqlite:{source}", pg_url, out=io.StringIO())
    assert copy(f"sqlite:{source}", pg_url, force=True, out=io.StringIO()) == counts

    back = tmp_path / "back.db"
    assert copy(pg_url, f"sqlite:{back}", out=io.StringIO()) == counts
    assert snapshot(inline_store(str(back), cache_bytes=0), approvals) == before


def test_command_line(tmp_path: Path, pg_url: str) -> None:
    """The real command copies, prints the verified counts with the password masked, and exits 1 on a
    non-empty target without --force."""
    source = tmp_path / "source.db"
    store = inline_store(str(source))
    run(store.create_session("1", "only"))
    run(store.close())
    command = [str(BIN / "aichat-backend"), "db", "copy", "-from", f"sqlite:{source}", "--to", pg_url]
    result = subprocess.run(command, env=daemon_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "copied and verified: 1 sessions, 0 messages" in result.stdout
    assert PASSWORD not in result.stdout + result.stderr
    assert "postgres:***@" in result.stdout
    again = subprocess.run(command, env=daemon_env(), capture_output=True, text=True, timeout=60)
    assert again.returncode == 1
    assert "use --force" in again.stderr
    usage = subprocess.run([*command[:3], "--from", "mysql://x"], env=daemon_env(), capture_output=True, text=True)
    assert usage.returncode == 2
