"""Chat turns through the real OpenAI client against the scripted upstream, shaped like llama.cpp: the
upstream refuses what real servers refuse (:func:`tests.upstream.strict_server`), sends the broken empty
stream, cuts streams after ``[DONE]`` and repeats tool-call ids and names in every delta. The chat layer
runs in this process on the real reactor, over the real SQLite store and fake tools."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from aichat.chat.streams import StreamRegistry
from aichat.chat.turn import ChatService, Turn
from aichat.config import ApprovalSettings, ChatSettings
from aichat.llm.openai import OpenAIProvider
from aichat.store import Message
from aichat.store.sqlite import SQLiteStore
from tests.support import inline_store
from tests.test_chat import FakeTools
from tests.upstream import Drop, Script, SendHeaders, Upstream, strict_server, text_stream, tool_stream

reactor: Any = global_reactor
FORCED = {"type": "function", "function": {"name": "everything__echo"}}


class LlamaShapedTests(TestCase):
    """One strict upstream, one client and one chat service per test."""

    timeout = 30

    def setUp(self) -> None:
        self.upstream = Upstream(reactor, rejects=strict_server)
        self.upstream.listen()
        self.addCleanup(lambda: Deferred.fromCoroutine(self.upstream.stop()))
        self.store: SQLiteStore = inline_store(str(Path(self.mktemp() + ".db")))

    def service(self, options: dict[str, Any] | None = None, **chat: Any) -> ChatService:
        """A chat service using the OpenAI client on the upstream; no retries unless asked."""
        provider = OpenAIProvider(
            reactor=reactor,
            model="smollm2",
            base_url=self.upstream.base_url,
            extra_body=options,
            max_attempts=chat.pop("max_attempts", 1),
            backoff_initial=0.01,
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(provider.close()))
        settings = ChatSettings(approval=ApprovalSettings(policy="never"), **chat)
        service = ChatService(reactor, self.store, provider, FakeTools(), settings, "You help.",
                              StreamRegistry(reactor, 60))
        self.addCleanup(lambda: Deferred.fromCoroutine(service.stop()))
        return service

    async def turn(self, service: ChatService, session_id: str, text: str) -> Turn:
        """One turn to its end, then any title work it started."""
        session, history = await service.resume("1", session_id)
        turn = service.start_message("1", session, text, history=history)
        await service.wait(turn)
        while service._background:
            await gatherResults(list(service._background), consumeErrors=True)
        return turn

    async def history(self, session_id: str) -> list[tuple[str, str]]:
        return [(m.role, m.content) for m in await self.store.history(session_id)]

    async def test_empty_stream_is_an_error_and_the_next_turn_works(self) -> None:
        """llama.cpp's empty 200 stream ends the turn with an error event and stores no answer; the next turn
        in the session is accepted by a server that refuses ``content: null`` and answers."""
        service = self.service(title_generation=False)
        session_id = service.new_session("1").id
        self.upstream.push(Script([SendHeaders()]))
        first = await self.turn(service, session_id, "hello")
        self.assertEqual([e.type for e in first.stream.events], ["error"])
        self.assertIn("the model returned an empty answer", first.result.error or "")
        self.assertEqual(await self.history(session_id), [("user", "hello")])
        second = await self.turn(service, session_id, "hello again")
        self.assertEqual([e.type for e in second.stream.events][-1], "done")
        self.assertEqual("".join(second.result.text), "Echo: hello again")

    async def test_session_poisoned_by_a_stored_empty_answer_works_again(self) -> None:
        """A session that an older version left holding ``""`` as an answer is not stuck on a strict server."""
        service = self.service(title_generation=False)
        session_id = service.new_session("1").id
        await self.store.add_message(Message("u1", session_id, "user", "hello"))
        await self.store.add_message(Message("a1", session_id, "assistant", ""))
        record = await self.turn(service, session_id, "anyone?")
        self.assertIsNone(record.result.error)
        self.assertEqual("".join(record.result.text), "Echo: anyone?")

    async def test_tool_rounds_after_the_first_are_accepted(self) -> None:
        """Tool calls streamed llama.cpp's way (id and name in every delta), run, and the follow-up request
        with the assistant's tool calls is accepted by a server that answers 500 to ``content: null``."""
        service = self.service(title_generation=False)
        session_id = service.new_session("1").id
        self.upstream.push(tool_stream([("call_0", "everything__echo", '{"message": "hi"}')],
                                       repeat_id_and_name=True))
        record = await self.turn(service, session_id, "echo hi")
        self.assertIsNone(record.result.error, record.result.error)
        self.assertEqual([e.to_json()["result"] for e in record.result.executions], ['echo {"message": "hi"}'])
        follow_up = self.upstream.requests[1].body["messages"]
        self.assertEqual([m["role"] for m in follow_up[-3:]], ["user", "assistant", "tool"])
        self.assertEqual(follow_up[-2]["content"], "")

    async def test_forced_tool_choice_stays_off_the_title_request(self) -> None:
        """With a forced ``tool_choice`` in llm.options, turns carry it and the title request (no tools) does
        not, so a server that refuses it there still writes the title."""
        service = self.service({"tool_choice": FORCED, "parallel_tool_calls": False})
        session = service.new_session("1")
        await self.turn(service, session.id, "hello there")
        turn, title = (r.body for r in self.upstream.requests)
        self.assertEqual((turn["tool_choice"], turn["parallel_tool_calls"]), (FORCED, False))
        self.assertNotIn("tools", title)
        self.assertNotIn("tool_choice", title)
        titled = await self.store.get_session("1", session.id)
        assert titled is not None
        self.assertTrue(titled.title.startswith("Echo: Based on this conversation"), titled.title)

    async def test_upstream_error_reaches_the_user_short_and_clean(self) -> None:
        """llama.cpp's 500 with its traceback line reaches the user as the status and a short reason, with no
        file of the server in it."""
        service = self.service(title_generation=False)
        session_id = service.new_session("1").id
        await self.store.add_message(Message("u1", session_id, "user", "hello"))
        await self.store.add_message(Message("a1", session_id, "assistant", "", tool_calls=[
            {"id": "c", "type": "function", "function": {"name": "everything__echo", "arguments": "{}"}}]))
        self.upstream.rejects = lambda body: strict_server({"messages": [{"role": "assistant", "content": None}]})
        record = await self.turn(service, session_id, "x")
        error = record.result.error or ""
        self.assertTrue(error.startswith("Failed to process message: the model's server answered HTTP 500: "), error)
        self.assertNotIn("site-packages", error)
        self.assertNotIn("File ", error)
        self.assertLess(len(error), 300)

    async def test_concurrent_turns_on_streams_cut_after_done(self) -> None:
        """Ten turns at once on a server that ends every stream with ``[DONE]`` and a close without the last
        chunk (llama.cpp's default ``interrupt_requests``): every turn completes, none is retried."""
        service = self.service(max_attempts=3)
        self.upstream.responder = lambda body: text_stream(["Fine", " thanks"], delay=0.01).plus(Drop())
        sessions = [service.new_session("1").id for _ in range(10)]
        records = await gatherResults(
            [Deferred.fromCoroutine(self.turn(service, s, f"turn {n}")) for n, s in enumerate(sessions)]
        )
        self.assertEqual([r.result.error for r in records], [None] * 10)
        self.assertEqual({"".join(r.result.text) for r in records}, {"Fine thanks"})
        await deferLater(reactor, 0.05)
        self.assertEqual(len(self.upstream.requests), 20)  # ten turns and ten titles, no retries
