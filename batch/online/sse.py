"""Server-sent events out of a byte stream that arrives in pieces, parsed as the WHATWG HTML spec says
(https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation).

Lines end with CRLF, LF or a bare CR, in any mix. A piece may end anywhere: inside a multi-byte UTF-8
character (lines are split as bytes: no byte of a multi-byte character is CR or LF) or between the CR and
the LF of one CRLF (remembered until the next piece). A byte order mark may open the stream. A line
starting with a colon is a comment (a keep-alive); `data:` lines are an event's data, several joined by
newlines; an empty line ends the event; `event:`, `id:`, `retry:` and unknown fields say nothing about
an answer and are skipped.

Where batch parts from the spec: an event whose lines all came but whose closing empty line did not,
because the stream ended, is still dispatched (the spec drops it): a server that closes the connection
right after its last event's line loses nothing by it. A line cut short by the end stays unread.

Why not the openai SDK's SSEDecoder: it lives in a private module (openai._streaming), importing openai
costs an online run about 0.8 s of CPU at start (batch/online/client.py), and it dispatches events that carry no
data (an `event:` or `id:` line alone), which the spec does not.
"""

from __future__ import annotations

import re

_LINE_END = re.compile(rb"[\r\n]")
_BOM = b"\xef\xbb\xbf"


class EventStream:
    """`feed` it the stream's pieces as they come, then call `end`: each returns the data of the events it
    completed, in order, as bytes (UTF-8, as the stream sent it)."""

    def __init__(self) -> None:
        self._line = bytearray()  # the line being read: the part of it that came so far
        self._after_cr = False  # the last piece ended with a CR: an LF opening the next one ends no new line
        self._first_line = True
        self._data: list[bytes] = []  # the data lines of the event being read

    def feed(self, piece: bytes) -> list[bytes]:
        events: list[bytes] = []
        start = 0
        for match in _LINE_END.finditer(piece):
            end = match.start()
            is_cr = piece[end] == 0x0D
            if self._after_cr and end == start and not is_cr:  # the LF of a CRLF split between two pieces
                self._after_cr = False
                start = end + 1
                continue
            self._line += piece[start:end]
            self._take_line(bytes(self._line), events)
            self._line.clear()
            self._after_cr = is_cr
            start = end + 1
        if start < len(piece):
            self._after_cr = False
            self._line += piece[start:]
        return events

    def end(self) -> list[bytes]:
        """The stream ended: the event whose lines all came, if any (a line cut short is dropped)."""
        self._line.clear()
        events: list[bytes] = []
        self._take_line(b"", events)
        return events

    def _take_line(self, line: bytes, events: list[bytes]) -> None:
        if self._first_line:
            self._first_line = False
            line = line.removeprefix(_BOM)
        if not line:
            if self._data:
                events.append(b"\n".join(self._data))
                self._data = []
            return
        field, _, value = line.partition(b":")
        if field == b"data":
            self._data.append(value[1:] if value.startswith(b" ") else value)
        # A comment (an empty field name), event:, id:, retry: and unknown fields are skipped.
