"""ChatService.stop on a Clock: it cancels the live turns and waits for them, up to STOP_SECONDS."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock, deferLater
from twisted.logger import globalLogPublisher

from aichat.chat.streams import StreamRegistry
from aichat.chat.turn import SHUTTING_DOWN, STOP_SECONDS, ChatService
from aichat.config import ChatSettings
from aichat.llm.provider import Completion
from aichat.llm.tools import ToolSpec
from tests.mcp.test_stdio_protocol import Collector
from tests.support import inline_store
from tests.test_chat import NOW, FakeTools


class HangingModel:
    """A model that streams ``Partial`` and then never answers; on cancellation it takes ``cleanup`` seconds
    to let go (None: it never lets go)."""

    name = "hanging"
    model = "hanging-1"

    def __init__(self, clock: Clock, cleanup: float | None) -> None:
        self.clock = clock
        self.cleanup = cleanup
        self.calls = 0
        self.cleaned_up = 0

    async def complete(
        self,
        messages: list[dict[str, Any]],
        tools: Sequence[ToolSpec] | None = None,
        *,
        on_text: Callable[[str], None] | None = None,
    ) -> Completion:
        self.calls += 1
        if on_text is not None:
            on_text("Partial")
        try:
            await Deferred()
        except CancelledError:
            if self.cleanup is None:
                await Deferred()
            else:
                await deferLater(self.clock, self.cleanup, lambda: None)
            self.cleaned_up += 1
            raise
        raise AssertionError("never answers")

    async def close(self) -> None:
        """Nothing to close."""


def service(tmp_path: Path, cleanup: float | None) -> tuple[ChatService, Clock, HangingModel]:
    """A chat service over an inline store with a hanging model."""
    clock = Clock()
    clock.advance(NOW.timestamp())
    model = HangingModel(clock, cleanup)
    chat = ChatService(clock, inline_store(str(tmp_path / "chat.db")), model, FakeTools(),
                       ChatSettings(title_generation=False), "You help.", StreamRegistry(clock, 60), now=lambda: NOW)
    return chat, clock, model


def result_of(d: Deferred[Any]) -> list[Any]:
    """The results ``d`` has had so far (empty while it has none)."""
    out: list[Any] = []
    d.addBoth(out.append)
    return out


def test_stop_waits_for_the_turns_it_cancels(tmp_path: Path) -> None:
    """stop() returns only once each cancelled turn has ended: its clean-up ran, its error event is out and
    the partial reply is stored."""
    chat, clock, model = service(tmp_path, cleanup=2.0)
    session = chat.new_session("1")
    turn = chat.start_message("1", session, "Hello")
    assert model.calls == 1
    stopped = result_of(Deferred.fromCoroutine(chat.stop()))
    assert stopped == []
    clock.advance(1.9)
    assert stopped == []
    clock.advance(0.1)
    assert stopped == [None]
    assert model.cleaned_up == 1
    assert turn.stream is not None
    assert [e.type for e in turn.stream.events][-1] == "error"
    assert turn.result.error == SHUTTING_DOWN
    messages = result_of(Deferred.fromCoroutine(chat.store.history(session.id)))[0]
    assert [(m.role, m.content) for m in messages] == [("user", "Hello"), ("assistant", "Partial")]
    assert clock.getDelayedCalls() == []


def test_a_model_that_never_lets_go_is_given_up_on(tmp_path: Path) -> None:
    """A turn that does not end after its cancellation holds stop() for STOP_SECONDS, then is left, warned of."""
    chat, clock, _ = service(tmp_path, cleanup=None)
    chat.start_message("1", chat.new_session("1"), "Hello")
    collector = Collector()
    warnings = collector.events
    globalLogPublisher.addObserver(collector)
    try:
        stopped = result_of(Deferred.fromCoroutine(chat.stop()))
        clock.advance(STOP_SECONDS - 0.5)
        assert stopped == []
        clock.advance(0.5)
        assert stopped == [None]
    finally:
        globalLogPublisher.removeObserver(collector)
    [warning] = [e for e in warnings if "still running after" in e.get("log_format", "")]
    assert warning["count"] == 1
    assert warning["seconds"] == STOP_SECONDS


def test_the_bound_can_be_chosen(tmp_path: Path) -> None:
    """stop(within=...) bounds the wait to that many seconds."""
    chat, clock, _ = service(tmp_path, cleanup=None)
    chat.start_message("1", chat.new_session("1"), "Hello")
    stopped = result_of(Deferred.fromCoroutine(chat.stop(within=1.0)))
    clock.advance(1.0)
    assert stopped == [None]


def test_a_turn_started_while_stopping_is_stopped_too(tmp_path: Path) -> None:
    """A turn begun while stop() waits for others is cancelled as well, and waited for."""
    chat, clock, model = service(tmp_path, cleanup=1.0)
    chat.start_message("1", chat.new_session("1"), "First")
    stopped = result_of(Deferred.fromCoroutine(chat.stop()))
    late = chat.start_message("2", chat.new_session("2"), "Second")
    clock.advance(1.0)
    assert stopped == []
    clock.advance(1.0)
    assert stopped == [None]
    assert model.cleaned_up == 2
    assert late.result.error == SHUTTING_DOWN


def test_stop_service_is_stop(tmp_path: Path) -> None:
    """As the daemon's ``chat`` service, stopService waits the same way."""
    chat, clock, model = service(tmp_path, cleanup=1.0)
    assert chat.name == "chat"
    chat.startService()
    chat.start_message("1", chat.new_session("1"), "Hello")
    stopped = result_of(chat.stopService())
    assert stopped == [] and not chat.running
    clock.advance(1.0)
    assert stopped == [None]
    assert model.cleaned_up == 1


def test_stop_with_nothing_running_is_immediate(tmp_path: Path) -> None:
    """No turns: stop() is done at once and leaves no timer."""
    chat, clock, _ = service(tmp_path, cleanup=1.0)
    assert result_of(Deferred.fromCoroutine(chat.stop())) == [None]
    assert clock.getDelayedCalls() == []
