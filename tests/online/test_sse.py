"""Reading server-sent events (batch.online.sse, client.StreamedAnswer.feed): any valid stream, framed any way the
WHATWG spec allows and cut into pieces anywhere, is the answer it carries, the same as read in one piece. (The simulator
sends such framings over real HTTP in tests/online/test_streaming.py.)"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batch.online.client import StreamedAnswer
from batch.online.failures import Failure
from batch.online.sse import EventStream

ENDINGS = (b"\n", b"\r\n", b"\r")
# Text as models stream it: CJK, emoji (four UTF-8 bytes), accents, and the characters a stream is framed with.
TEXT = st.text(st.sampled_from(list("ab 中文評論😀é\n\r:{}\"\\")), max_size=8)


@st.composite
def answers(draw: st.DrawFn) -> dict[str, Any]:
    """An answer to stream: 1 or 2 choices of content and maybe reasoning pieces, each with its finish_reason."""
    choices = []
    for index in range(draw(st.integers(1, 2))):
        choices.append({"index": index, "content": draw(st.lists(TEXT, max_size=3)),
                        "reasoning": draw(st.lists(TEXT, max_size=2)),
                        "finish_reason": draw(st.sampled_from(["stop", "length"]))})
    usage = {"prompt_tokens": draw(st.integers(0, 999)), "completion_tokens": draw(st.integers(0, 999))}
    return {"choices": choices, "usage": usage, "done": draw(st.booleans())}


def chunks_of(answer: dict[str, Any], data: st.DataObject) -> list[dict[str, Any]]:
    """The chunks a server streams `answer` in: the choices' deltas interleaved, then each finish_reason (its chunk
    without a delta, sometimes), then usage."""
    head = {"id": "chatcmpl-1", "model": "glm-4-flash", "object": "chat.completion.chunk"}
    deltas = [[{"index": c["index"], "delta": {"reasoning_content": piece}} for piece in c["reasoning"]]
              + [{"index": c["index"], "delta": {"content": piece}} for piece in c["content"]]
              for c in answer["choices"]]
    chunks = []
    while any(deltas):
        mine = data.draw(st.sampled_from([d for d in deltas if d]))
        chunks.append({**head, "choices": [mine.pop(0)]})
    for choice in answer["choices"]:
        finish: dict[str, Any] = {"index": choice["index"], "finish_reason": choice["finish_reason"]}
        if data.draw(st.booleans()):
            finish["delta"] = {}
        chunks.append({**head, "choices": [finish]})
    chunks.append({**head, "choices": [], "usage": answer["usage"]})
    return chunks


def framed(events: list[bytes], data: st.DataObject) -> bytes:
    """The events as one valid stream: each line ended by LF, CRLF or CR, comments, event:/id:/retry: fields, data
    over several lines, a byte order mark."""
    lines: list[bytes] = []
    for number, event in enumerate(events):
        if data.draw(st.booleans()):
            lines.append(b": keep-alive")
        if data.draw(st.booleans()):
            lines += [b"event: message", b"id: %d" % number, b"retry: 3000"]
        if event != b"[DONE]" and data.draw(st.booleans()):  # JSON across lines, as the spec joins them
            event = json.dumps(json.loads(event), indent=1, ensure_ascii=False).encode()
        for part in event.split(b"\n"):
            lines.append(data.draw(st.sampled_from([b"data: ", b"data:"])) + part)
        lines.append(b"")
    stream = bytearray(b"\xef\xbb\xbf" if data.draw(st.booleans()) else b"")
    for line in lines:
        ending = data.draw(st.sampled_from(ENDINGS))
        if not line and ending == b"\n" and stream.endswith(b"\r"):
            ending = b"\r"  # CR, then an empty line's LF, is one CRLF: a stream that means a blank line cannot say so
        stream += line + ending
    return bytes(stream)


def read(pieces: list[bytes]) -> dict[str, Any] | str:
    """The answer the pieces make up, as the client reads them (its verdict, if it is a failure)."""
    stream = StreamedAnswer()
    try:
        if not any(stream.feed(piece) for piece in pieces):
            stream.end()
        return stream.answer()
    except Failure as failure:
        return str(failure)


@given(answers(), st.data())
def test_any_split_of_any_framing_reads_the_same_answer(answer, data):
    events = [json.dumps(chunk, ensure_ascii=False).encode() for chunk in chunks_of(answer, data)]
    if answer["done"]:
        events.append(b"[DONE]")
    stream = framed(events, data)
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(stream) - 1)), max_size=40)))
    pieces = [stream[start:end] for start, end in zip([0, *cuts], [*cuts, len(stream)])]

    whole = read([stream])
    assert read(pieces) == whole
    assert read([stream[i:i + 1] for i in range(len(stream))]) == whole  # every cut at once
    expected = [{"index": c["index"], "finish_reason": c["finish_reason"],
                 "message": {"role": "assistant", "content": "".join(c["content"]) if c["content"] else None,
                             "reasoning_content": "".join(c["reasoning"]) if c["reasoning"] else None,
                             "tool_calls": None}}
                for c in answer["choices"]]
    assert isinstance(whole, dict) and whole["choices"] == expected and whole["usage"] == answer["usage"]


@pytest.mark.parametrize(("stream", "events"), [
    (b"data: a\r\rdata: b\n\ndata: c\r\n\r\n", [b"a", b"b", b"c"]),
    (b"data: a\rdata: b\r\r", [b"a\nb"]),  # one event, two data lines
    (b"data\n\ndata:x\n\n", [b"", b"x"]),  # a field without a colon is a field of empty value
    (b": comment\nevent: e\nid: 1\n\n", []),  # no data: no event
    (b"data: one\n", [b"one"]),  # ended before its empty line: all its lines came, so it counts
    (b"data: one\n\ndata: cut sh", [b"one"]),  # a line cut short by the end is dropped
    (b"\xef\xbb\xbfdata: x\n\n", [b"x"]),
])
def test_event_stream_cases(stream, events):
    reader = EventStream()
    assert reader.feed(stream) + reader.end() == events


def test_done_with_blanks_around_it_ends_the_answer():
    stream = StreamedAnswer()
    chunk = {"choices": [{"index": 0, "delta": {"content": "hi"}}]}
    assert not stream.feed(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    assert stream.feed(b"data:  [DONE] \r\n\r\n")
    with pytest.raises(Failure, match="without a finish_reason"):  # [DONE] came, but no finish_reason did
        stream.answer()


@given(st.integers(1, 4), st.data())
def test_a_stream_without_done_is_whole_only_with_every_choice_the_request_asked_for(asked, data):
    """`n` choices asked for: a stream that ends without [DONE] after some of them, each with its finish_reason, is
    cut short unless all `n` came (in any order)."""
    came = data.draw(st.lists(st.integers(0, asked - 1), unique=True, min_size=1, max_size=asked))
    stream = StreamedAnswer(asked=asked)
    for index in came:
        stream.take(json.dumps({"choices": [{"index": index, "delta": {"content": f"answer {index}"},
                                             "finish_reason": "stop"}]}).encode())
    stream.end()
    assert stream.whole == (len(came) == asked)
    if stream.whole:
        assert [choice["message"]["content"] for choice in stream.answer()["choices"]] == \
               [f"answer {index}" for index in range(asked)]
    else:
        with pytest.raises(Failure, match=f"without \\[DONE\\] or all {asked} choices asked for"):
            stream.answer()
