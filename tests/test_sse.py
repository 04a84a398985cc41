"""The event-stream codec: decoding at any chunk boundary and with any line ending, the WHATWG rules we
rely on (comments, one optional space, events without data, a leading BOM), the size limit, and the
encoder's output decoding back to what was encoded."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from aichat.sse import SSEDecoder, SSEEvent, SSETooLargeError, encode_comment, encode_event


def decode(*chunks: bytes, decoder: SSEDecoder | None = None) -> list[SSEEvent]:
    """All events from feeding ``chunks`` in order."""
    decoder = decoder or SSEDecoder()
    return [event for chunk in chunks for event in decoder.feed(chunk)]


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (taken modulo its length + 1)."""
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


line_text = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=30)
events_strategy = st.lists(
    st.tuples(
        st.sampled_from(["", "message", "update", "error"]),
        st.lists(line_text, min_size=1, max_size=4),
        st.one_of(st.none(), st.text(st.characters(codec="utf-8", exclude_characters="\r\n\x00"), max_size=8)),
    ),
    max_size=6,
)


class DecoderTests(SynchronousTestCase):
    """SSEDecoder."""

    def test_fields(self) -> None:
        """event, id, retry and multi-line data make one event; the default name is message."""
        [first, second] = decode(b"event: update\nid: 7\nretry: 1500\ndata: a\ndata: b\n\ndata: c\n\n")
        self.assertEqual(first, SSEEvent("update", "a\nb", "7", 1500))
        self.assertEqual(second, SSEEvent("message", "c", "7", None))

    def test_one_optional_space(self) -> None:
        """``data:x`` and ``data: x`` are the same; only one space is removed; a bare field is empty."""
        self.assertEqual([e.data for e in decode(b"data:x\n\ndata: x\n\ndata:  x\n\ndata\n\n")], ["x", "x", " x", ""])

    def test_comments_kept_aside(self) -> None:
        """Comment lines produce no event and are remembered."""
        decoder = SSEDecoder()
        self.assertEqual(decode(b": ping\n\n:keep\n\n", decoder=decoder), [])
        self.assertEqual(decoder.comments, ["ping", "keep"])

    def test_event_without_data_not_dispatched(self) -> None:
        """An event name with no data line is dropped, and does not name the next event."""
        self.assertEqual(decode(b"event: lonely\n\ndata: x\n\n"), [SSEEvent("message", "x")])

    def test_leading_bom(self) -> None:
        """A byte-order mark before the first line is ignored, even split across chunks."""
        self.assertEqual(decode(b"\xef\xbb", b"\xbfdata: x\n\n"), [SSEEvent("message", "x")])

    def test_crlf_split_between_chunks(self) -> None:
        """A CR at the end of one chunk and LF at the start of the next are one line end."""
        self.assertEqual(decode(b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"), [SSEEvent("message", "a\nb")])

    def test_empty_chunk_between_cr_and_lf(self) -> None:
        """An empty chunk between CR and LF does not turn them into two line ends."""
        self.assertEqual(decode(b"data: a\r", b"", b"\ndata: b\n\n"), [SSEEvent("message", "a\nb")])

    def test_utf8_split_inside_a_character(self) -> None:
        """A multi-byte character cut between chunks is decoded whole."""
        data = "data: né→\n\n".encode()
        for cut in range(len(data) + 1):
            self.assertEqual(decode(data[:cut], data[cut:]), [SSEEvent("message", "né→")])

    def test_line_too_long(self) -> None:
        """A line that never ends past max_event_size raises SSETooLargeError."""
        decoder = SSEDecoder(max_event_size=100)
        decoder.feed(b"data: " + b"x" * 50)
        self.assertRaises(SSETooLargeError, decoder.feed, b"x" * 60)

    def test_event_too_large(self) -> None:
        """Many data lines of one event past max_event_size raise SSETooLargeError."""
        decoder = SSEDecoder(max_event_size=100)
        self.assertRaises(SSETooLargeError, decoder.feed, b"data: 0123456789\n" * 20)

    @settings(max_examples=200, deadline=None)
    @given(
        events=events_strategy,
        newline=st.sampled_from([b"\n", b"\r\n", b"\r"]),
        space=st.booleans(),
        cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=20),
    )
    def test_any_boundaries_and_line_endings(
        self, events: list[tuple[str, list[str], str | None]], newline: bytes, space: bool, cuts: list[int]
    ) -> None:
        """Whatever the chunking and line ending, the decoded events are the ones written."""
        stream = b""
        expected = []
        last_id = None
        for name, lines, event_id in events:
            fields = []
            if name:
                fields.append(f"event:{' ' if space else ''}{name}")
            if event_id is not None:
                fields.append(f"id: {event_id}")
                last_id = event_id
            fields += [f"data:{' ' if space else ''}{line}" for line in lines]
            stream += b"".join(f.encode() + newline for f in fields) + newline
            # Without our space, a value's own leading space is the one optional space and is removed.
            values = lines if space else [line.removeprefix(" ") for line in lines]
            expected.append(SSEEvent(name or "message", "\n".join(values), last_id))
        self.assertEqual(decode(*split(stream, cuts)), expected)


class EncoderTests(SynchronousTestCase):
    """encode_event and encode_comment."""

    @settings(max_examples=100, deadline=None)
    @given(
        name=st.sampled_from(["message", "error", "done"]),
        data=st.one_of(
            st.text(st.characters(codec="utf-8", exclude_characters="\r"), max_size=40),
            st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), st.text(max_size=10)), max_size=3),
        ),
        cuts=st.lists(st.integers(min_value=0, max_value=500), max_size=5),
    )
    def test_round_trip(self, name: str, data: object, cuts: list[int]) -> None:
        """What encode_event writes decodes to the same name and data, however it is cut."""
        import json

        [event] = decode(*split(encode_event(name, data, event_id="9"), cuts))
        self.assertEqual((event.event, event.id), (name, "9"))
        self.assertEqual(event.data if isinstance(data, str) else json.loads(event.data), data)

    def test_comment(self) -> None:
        """A comment frame is a keep-alive: no event, and a blank line after it."""
        self.assertEqual(encode_comment("ping"), b": ping\n\n")
        self.assertEqual(decode(encode_comment("ping")), [])
