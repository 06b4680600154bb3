"""The simulator's Batch API: files and batches in OpenAI's shape, which Zhipu follows, under both dialects.

Routes, beside chat completions under ``/v1`` and ``/api/paas/v4``: ``POST /files`` (multipart: ``file``,
``purpose=batch``), ``GET /files``, ``GET /files/{id}``, ``GET /files/{id}/content``, ``DELETE /files/{id}``;
``POST /batches``, ``GET /batches?limit=&after=`` (newest first), ``GET /batches/{id}``,
``POST /batches/{id}/cancel``.  Control: ``POST /_batches/advance {"seconds": S}`` moves the batch clock;
``POST /_batches/forget {"ids": [...]}`` (no body: everything) forgets files and batches, as a restart would.

Time: batches live on the simulator's own clock, which runs at ``batch_speed`` simulated seconds per real
second (0 stops it) plus whatever ``/_batches/advance`` added, so a test moves a batch through its states
without sleeping.  Nothing runs in the background: every request (and ``/_stats``) first brings each batch up
to the clock's present, computing each transition at the simulated instant it happened.

A batch is ``validating`` for ``batch_validating_s``, then ``failed`` (the file broke a rule: ``errors`` says
which lines) or ``in_progress``: lines are answered in a seeded shuffled order at ``batch_rate`` lines per
simulated second, each exactly as the online route would answer it (the same markers apply, see
`BatchService.answer_line`), and appended to the output file (status 200) or the error file (any other status)
in that order.  When every line is answered the batch is ``finalizing`` for ``batch_finalizing_s``, then
``completed``.  A batch unfinished ``batch_expire_s`` after its creation is ``expired``: lines not answered by
then go to the error file as ``batch_expired``.  A cancelled batch is ``cancelling`` for ``batch_cancelling_s``
(its in-flight lines are still answered at the same rate), then ``cancelled``; its unanswered lines appear in
neither file.  Output and error files exist (their ids are set) only once the batch has ended, and only when
they have lines.
"""

from __future__ import annotations

import array
import asyncio
import dataclasses
import json
import math
import os
import random
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from batch.simulator.answers import _MALFORMED_BODY, ChatRequest, markers_of, parse_chat
from batch.simulator.config import SimConfig


class ChatServer(Protocol):
    """What the Batch API uses of the chat server (server.py's `Simulator`), which owns this service: a Batch API
    line is answered as a chat request would be, with the same auth, faults and error bodies."""

    config: SimConfig

    def authorized(self, request: web.Request) -> bool: ...

    def error_body(self, authorization: str, status: int, code: str | None, message: str | None = None
                   ) -> dict[str, Any]: ...

    def flaky_fails(self, prompt: str, markers: dict[str, str]) -> bool: ...

    def chat_completion(self, chat: ChatRequest, markers: dict[str, str], authorization: str,
                        nochoices: bool = False) -> tuple[str, dict[str, Any]]: ...


DIALECTS = ("/v1", "/api/paas/v4")
CHAT_ENDPOINTS = ("/v1/chat/completions", "/v4/chat/completions")
LIVE = ("validating", "in_progress", "finalizing", "cancelling")
_BAD_PARAM = "1210"  # Zhipu's "API 调用参数有误": every refused control-plane call that is the caller's fault
_MAX_LINE_ERRORS = 100  # errors.data lists at most this many bad lines
_MAX_METADATA = 16
_MAX_METADATA_KEY, _MAX_METADATA_VALUE = 64, 512
_CUSTOM_ID_LEN = (6, 64)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _new_id(prefix: str) -> str:
    return prefix + os.urandom(12).hex()


def _dumps(obj: Any) -> str:
    try:
        return json.dumps(obj, ensure_ascii=False)
    except UnicodeEncodeError:  # a lone surrogate set by [[set:...]]: only a \\u escape can carry it
        return json.dumps(obj)


@dataclasses.dataclass
class StoredFile:
    id: str
    filename: str
    purpose: str
    path: Path
    bytes: int
    lines: int
    created_at: int
    deleted: bool = False
    readers: int = 0  # live batches still reading it: its bytes stay on disk until they end

    def as_object(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed"}


@dataclasses.dataclass
class SimBatch:
    id: str
    endpoint: str
    input_file: StoredFile
    completion_window: str
    metadata: dict[str, str] | None
    auto_delete_input_file: bool
    authorization: str  # of the create request: echo_key quotes it in the lines' answers
    created_at: float  # simulated seconds since the clock's origin, as are all the *_at below
    expires_at: float
    line_errors: list[dict[str, Any]]
    order: array.array  # byte offsets of the input lines, in the (shuffled) order they are answered
    status: str = "validating"
    done: int = 0  # positions of `order` answered (or found hanging)
    hung: list[int] = dataclasses.field(default_factory=list)  # offsets of [[hang]] lines: never answered
    completed: int = 0
    failed: int = 0
    in_progress_at: float | None = None
    finalizing_at: float | None = None
    completed_at: float | None = None
    failed_at: float | None = None
    expired_at: float | None = None
    cancelling_at: float | None = None
    cancelled_at: float | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None


class BatchService:
    """Files, batches and the batch clock of one Simulator; all of it lives on the simulator's event loop."""

    def __init__(self, sim: ChatServer) -> None:
        self.sim = sim
        self.files: dict[str, StoredFile] = {}
        self.batches: dict[str, SimBatch] = {}
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._wall_origin = time.time()
        self._read_at = time.monotonic()
        self._clock = 0.0
        self.reset_counters()

    @property
    def config(self) -> SimConfig:
        return self.sim.config  # SimulatorThread.reconfigure swaps it

    def reset_counters(self) -> None:
        self.calls = 0
        self.uploads = 0
        self.created = 0
        self.lines_answered = 0
        self.poll_faults = 0
        self.cut_downloads = 0
        self.hidden_outputs = 0
        self.refused_files = 0
        self.submitted: dict[str, int] = {}
        self.lines_by_prompt: dict[str, int] = {}  # lines submitted in a created batch, by last user message
        # Separate seeded streams: the shuffle does not move with the poll faults, nor either with online faults.
        self._order_rng = random.Random(self.config.seed + 2)
        self._poll_rng = random.Random(self.config.seed + 3)

    def routes(self, app: web.Application) -> None:
        guarded = self._guarded
        for base in DIALECTS:
            app.router.add_post(base + "/files", guarded(self._upload))
            app.router.add_get(base + "/files", guarded(self._list_files))
            app.router.add_get(base + "/files/{file_id}", guarded(self._get_file))
            app.router.add_get(base + "/files/{file_id}/content", guarded(self._file_content))
            app.router.add_delete(base + "/files/{file_id}", guarded(self._delete_file))
            app.router.add_post(base + "/batches", guarded(self._create))
            app.router.add_get(base + "/batches", guarded(self._list_batches))
            app.router.add_get(base + "/batches/{batch_id}", guarded(self._retrieve))
            app.router.add_post(base + "/batches/{batch_id}/cancel", guarded(self._cancel))
        app.router.add_post("/_batches/advance", self._advance)
        app.router.add_post("/_batches/forget", self._forget)

    def close(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    # -- the clock ------------------------------------------------------------------------------------------

    def now(self) -> float:
        """Simulated seconds since the origin: real time times batch_speed, plus every advance."""
        # Accumulated reading by reading, so a new batch_speed (SimulatorThread.reconfigure) applies from now on
        # and never moves the past.
        read_at = time.monotonic()
        self._clock += (read_at - self._read_at) * self.config.batch_speed
        self._read_at = read_at
        return self._clock

    def advance(self, seconds: float) -> None:
        self._clock += seconds
        self.settle()

    def forget(self, ids: list[str] | None = None) -> list[str]:
        """Drop these files and batches (all of them when `ids` is None: a restart that lost its state, or another
        account's key); every later call naming one answers 404. Returns the ids forgotten."""
        self.settle()
        chosen = set(self.files) | set(self.batches) if ids is None else set(ids)
        for batch_id in chosen & set(self.batches):
            batch = self.batches.pop(batch_id)
            if batch.status in LIVE:
                batch.input_file.readers -= 1
                if batch.input_file.deleted:
                    self._delete(batch.input_file)
        for file_id in chosen & set(self.files):
            self._delete(self.files[file_id])
        return sorted(chosen)

    def _stamp(self, t: float | None) -> int | None:
        return None if t is None else int(self._wall_origin + t)

    # -- stats ----------------------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        self.settle()
        by_state: dict[str, int] = {}
        for batch in self.batches.values():
            by_state[batch.status] = by_state.get(batch.status, 0) + 1
        return {"calls": self.calls, "files_uploaded": self.uploads, "files_kept": len(self.files),
                "batches_created": self.created, "by_state": by_state, "lines_answered": self.lines_answered,
                "poll_faults": self.poll_faults, "cut_downloads": self.cut_downloads,
                "hidden_outputs": self.hidden_outputs, "custom_ids": dict(self.submitted),
                "lines_by_prompt": dict(self.lines_by_prompt),
                "custom_ids_submitted_twice": sorted(c for c, n in self.submitted.items() if n > 1)}

    # -- HTTP helpers ---------------------------------------------------------------------------------------

    def _error(self, request: web.Request, status: int, code: str | None, message: str | None = None
               ) -> web.Response:
        body = self.sim.error_body(request.headers.get("Authorization", ""), status, code, message)
        return self._json(body, status)

    @staticmethod
    def _json(payload: Any, status: int = 200) -> web.Response:
        return web.Response(status=status, text=_dumps(payload), content_type="application/json")

    def _guarded(self, handler: Handler) -> Handler:
        """The handler behind the checks every Batch API call passes: the key, an outage (batch_down_for_calls),
        then the batches brought up to now so the handler sees the present."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            self.calls += 1
            refusal = None
            if not self.sim.authorized(request):
                refusal = self._error(request, 401, "1000")
            elif self.calls <= self.config.batch_down_for_calls:
                refusal = self._error(request, 503, "1305")
            if refusal is not None:
                # Read the body first: a client still sending an upload would see a reset rather than the answer.
                while await request.content.readany():
                    pass
                return refusal
            self.settle()
            return await handler(request)

        return guarded

    def _poll_fault(self, request: web.Request) -> web.Response | None:
        """batch_p_poll_500 / batch_p_poll_503: a retrieve, list or download that fails for no reason of the caller."""
        draw = self._poll_rng.random()
        cfg = self.config
        for status, code, p in ((500, "1200", cfg.batch_p_poll_500), (503, "1305", cfg.batch_p_poll_503)):
            if draw < p:
                self.poll_faults += 1
                return self._error(request, status, code)
            draw -= p
        return None

    def _directory(self) -> Path:
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="batch-sim-")
        return Path(self._dir.name)

    # -- files ----------------------------------------------------------------------------------------------

    async def _upload(self, request: web.Request) -> web.Response:
        if not request.content_type.startswith("multipart/"):
            return self._error(request, 400, "1214",
                               "请求参数非法 / expected a multipart form with 'file' and 'purpose'")
        file_id = _new_id("file-")
        path = self._directory() / file_id
        purpose, filename, size, newlines, last = None, None, 0, 0, b"\n"
        async for part in await request.multipart():
            if part.name == "purpose":
                purpose = (await part.text()).strip()
            elif part.name == "file":
                filename = part.filename or "upload.jsonl"
                with path.open("wb") as sink:  # streamed to disk: a 100 MB upload never sits in memory
                    while chunk := await part.read_chunk():
                        sink.write(chunk)
                        size += len(chunk)
                        newlines += chunk.count(b"\n")
                        last = chunk[-1:]
        if filename is None or purpose != "batch":
            path.unlink(missing_ok=True)
            return self._error(request, 400, _BAD_PARAM,
                               "请求参数非法 / the form needs a 'file' part and purpose 'batch'"
                               f" (purpose was {purpose!r})")
        # Checked once the upload is read (the client must see this answer, not a reset mid-send), and with no
        # await between the check and the insert, so concurrent uploads cannot overshoot the cap.
        if len(self.files) >= self.config.batch_max_files:
            path.unlink(missing_ok=True)
            return self._error(request, 400, _BAD_PARAM,
                               f"文件数量已达上限 / file limit reached: at most {self.config.batch_max_files} files "
                               "are kept; delete some (DELETE /files/{id})")
        stored = StoredFile(id=file_id, filename=filename, purpose="batch", path=path, bytes=size,
                            lines=newlines + (last != b"\n"), created_at=int(self._wall_origin + self.now()))
        self.files[file_id] = stored
        self.uploads += 1
        if self.config.batch_upload_delay_ms > 0:  # stored and counted already: only the answer is late
            await asyncio.sleep(self.config.batch_upload_delay_ms / 1000)
        return self._json(stored.as_object())

    def _file_or_404(self, request: web.Request) -> StoredFile | web.Response:
        file_id = request.match_info["file_id"]
        stored = self.files.get(file_id)
        if stored is None:
            return self._error(request, 404, _BAD_PARAM, f"文件不存在 / no such file: {file_id}")
        return stored

    async def _list_files(self, request: web.Request) -> web.Response:
        purpose = request.query.get("purpose")
        data = [f.as_object() for f in reversed(self.files.values()) if purpose in (None, f.purpose)]
        return self._json({"object": "list", "data": data, "has_more": False})

    async def _get_file(self, request: web.Request) -> web.Response:
        stored = self._file_or_404(request)
        return stored if isinstance(stored, web.Response) else self._json(stored.as_object())

    async def _file_content(self, request: web.Request) -> web.StreamResponse:
        stored = self._file_or_404(request)
        if isinstance(stored, web.Response):
            return stored
        if (fault := self._poll_fault(request)) is not None:
            return fault
        if stored.purpose == "batch_output" and (cut := self._cut_download(stored)) is not None:
            return web.Response(body=cut, content_type="application/jsonl")
        return web.FileResponse(stored.path, headers={"Content-Type": "application/jsonl"})

    def _cut_download(self, stored: StoredFile) -> bytes | None:
        """batch_short_downloads / batch_torn_downloads: a result file's first half of lines, or that and half of
        the next line; None when no cut is due. Reads the file whole: a fault for tests' small files."""
        cfg = self.config
        if self.cut_downloads >= cfg.batch_short_downloads + cfg.batch_torn_downloads:
            return None
        self.cut_downloads += 1
        lines = stored.path.read_bytes().splitlines(keepends=True)
        kept = b"".join(lines[:len(lines) // 2])
        if self.cut_downloads > cfg.batch_short_downloads:  # torn: half of the next line too
            kept += lines[len(lines) // 2][:len(lines[len(lines) // 2]) // 2]
        return kept

    async def _delete_file(self, request: web.Request) -> web.Response:
        stored = self._file_or_404(request)
        if isinstance(stored, web.Response):
            return stored
        self._delete(stored)
        return self._json({"id": stored.id, "object": "file", "deleted": True})

    def _delete(self, stored: StoredFile) -> None:
        self.files.pop(stored.id, None)
        stored.deleted = True
        if stored.readers == 0:
            stored.path.unlink(missing_ok=True)

    def _keep(self, path: Path, filename: str) -> str | None:
        """Register a finished output or error file; None when it has no lines (then it is not created)."""
        size = path.stat().st_size if path.exists() else 0
        if size == 0:
            path.unlink(missing_ok=True)
            return None
        with path.open("rb") as source:
            lines = sum(chunk.count(b"\n") for chunk in iter(lambda: source.read(1 << 20), b""))
        stored = StoredFile(id=_new_id("file-"), filename=filename, purpose="batch_output", path=path, bytes=size,
                            lines=lines, created_at=int(self._wall_origin + self.now()))
        final = path.with_name(stored.id)
        path.rename(final)
        stored.path = final
        self.files[stored.id] = stored  # counts against batch_max_files, as the provider's files do
        return stored.id

    # -- batches: the HTTP side -----------------------------------------------------------------------------

    async def _create(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise TypeError("the body must be a JSON object")
        except (ValueError, TypeError) as exc:
            return self._error(request, 400, "1214", f"请求参数非法 / invalid request: {exc}")
        problem = self._create_problem(body)
        if problem is not None:
            return self._error(request, 400, _BAD_PARAM, problem)
        arrears_after = self.config.batch_arrears_after
        if arrears_after is not None and self.created >= arrears_after:
            return self._error(request, 429, "1113")
        stored = self.files.get(body["input_file_id"])
        if stored is None or stored.purpose != "batch":
            return self._error(request, 400, _BAD_PARAM, f"input_file_id {body['input_file_id']!r}: no such batch file")
        too_big = self._too_big(stored)
        if too_big and not self.config.batch_limits_at_validation:
            return self._error(request, 400, _BAD_PARAM, f"文件超过限制 / {too_big[0]['message']}")
        now = self.now()
        order, line_errors, custom_ids = self._read_input(stored, body["endpoint"])
        if self.refused_files < self.config.batch_fail_validations:
            self.refused_files += 1
            line_errors = [{"code": "simulated_refusal", "line": None, "param": None,
                            "message": "the simulator refused this file (batch_fail_validations)"}, *line_errors]
        line_errors = too_big + line_errors
        if not line_errors:
            self._order_rng.shuffle(order)
            for custom_id in custom_ids:
                self.submitted[custom_id] = self.submitted.get(custom_id, 0) + 1
            self._count_prompts(stored, order)
        auto_delete = body.get("auto_delete_input_file", request.path.startswith("/api/paas/v4"))
        batch = SimBatch(
            id=_new_id("batch_"), endpoint=body["endpoint"], input_file=stored,
            completion_window=body["completion_window"], metadata=body.get("metadata"),
            auto_delete_input_file=bool(auto_delete), authorization=request.headers.get("Authorization", ""),
            created_at=now, expires_at=now + self.config.batch_expire_s, line_errors=line_errors,
            order=order if not line_errors else array.array("q"))
        stored.readers += 1
        self.batches[batch.id] = batch
        self.created += 1
        return self._json(self.as_object(batch))

    def _too_big(self, stored: StoredFile) -> list[dict[str, Any]]:
        """The file's breaches of the line and byte limits, as errors.data entries (none: it fits)."""
        cfg, errors = self.config, []
        if stored.lines > cfg.batch_max_lines:
            errors.append({"code": "too_many_lines", "line": None, "param": None,
                           "message": f"{stored.id} has {stored.lines} lines; at most {cfg.batch_max_lines} per batch"})
        if stored.bytes > cfg.batch_max_bytes:
            errors.append({"code": "too_many_bytes", "line": None, "param": None,
                           "message": f"{stored.id} has {stored.bytes} bytes; at most {cfg.batch_max_bytes} per batch"})
        return errors

    @staticmethod
    def _create_problem(body: dict[str, Any]) -> str | None:
        """What is wrong with a create request's parameters, or None."""
        if not isinstance(body.get("input_file_id"), str):
            return "input_file_id is required"
        if body.get("endpoint") not in CHAT_ENDPOINTS:
            return f"endpoint must be one of {', '.join(CHAT_ENDPOINTS)}, not {body.get('endpoint')!r}"
        if body.get("completion_window") != "24h":
            return f"completion_window must be '24h', not {body.get('completion_window')!r}"
        metadata = body.get("metadata")
        if metadata is not None:
            if not isinstance(metadata, dict) or len(metadata) > _MAX_METADATA:
                return f"metadata must be an object of at most {_MAX_METADATA} pairs"
            for key, value in metadata.items():
                if len(key) > _MAX_METADATA_KEY or not isinstance(value, str) or len(value) > _MAX_METADATA_VALUE:
                    return (f"metadata {key[:64]!r}: keys are at most {_MAX_METADATA_KEY} characters, values "
                            f"strings of at most {_MAX_METADATA_VALUE}")
        if not isinstance(body.get("auto_delete_input_file", False), bool):
            return "auto_delete_input_file must be true or false"
        return None

    def _count_prompts(self, stored: StoredFile, offsets: array.array) -> None:
        """Count the lines of a created batch by prompt (lines_by_prompt): the requests it sends for each."""
        with stored.path.open("rb") as source:
            for offset in offsets:
                source.seek(offset)
                prompt = parse_chat(json.loads(source.readline())["body"]).prompt
                self.lines_by_prompt[prompt] = self.lines_by_prompt.get(prompt, 0) + 1

    def _read_input(self, stored: StoredFile, endpoint: str) -> tuple[array.array, list[dict[str, Any]], list[str]]:
        """The offsets of an input file's lines, the rules they break (errors.data) and their custom_ids."""
        offsets: array.array = array.array("q")
        errors: list[dict[str, Any]] = []
        seen: set[str] = set()
        custom_ids: list[str] = []
        model: str | None = None

        def bad(code: str, line: int | None, message: str, param: str | None = None) -> None:
            if len(errors) < _MAX_LINE_ERRORS:
                errors.append({"code": code, "line": line, "message": message, "param": param})

        position = 0
        with stored.path.open("rb") as source:
            for number, raw in enumerate(source, 1):
                start, position = position, position + len(raw)
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                    if not isinstance(record, dict):
                        raise TypeError("not an object")
                except (ValueError, TypeError):
                    bad("invalid_json_line", number, f"line {number} is not a JSON object")
                    continue
                custom_id = record.get("custom_id")
                if not isinstance(custom_id, str) or not _CUSTOM_ID_LEN[0] <= len(custom_id) <= _CUSTOM_ID_LEN[1]:
                    bad("invalid_custom_id", number, f"custom_id must be a string of {_CUSTOM_ID_LEN[0]} to "
                        f"{_CUSTOM_ID_LEN[1]} characters", "custom_id")
                elif custom_id in seen:
                    bad("duplicate_custom_id", number, f"custom_id {custom_id!r} appears twice in the file",
                        "custom_id")
                else:
                    seen.add(custom_id)
                    custom_ids.append(custom_id)
                if record.get("method") != "POST":
                    bad("invalid_method", number, "method must be POST", "method")
                if record.get("url") != endpoint:
                    bad("mismatched_endpoint", number, f"url must be the batch's endpoint {endpoint}", "url")
                try:
                    chat = parse_chat(record.get("body"))
                except (ValueError, KeyError, TypeError, AttributeError):
                    bad("invalid_request", number, "body is not a chat completions request", "body")
                    continue
                if model is None:
                    model = chat.model
                elif chat.model != model:
                    bad("mismatched_model", number, f"model {chat.model!r} differs from the file's {model!r}: "
                        "one model per file", "body.model")
                offsets.append(start)
        if not offsets and not errors:
            bad("empty_file", None, f"{stored.id} has no requests")
        return offsets, errors, custom_ids

    async def _retrieve(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is None:
            return self._error(request, 404, _BAD_PARAM, f"no such batch: {request.match_info['batch_id']}")
        if (fault := self._poll_fault(request)) is not None:
            return fault
        return self._json(self.as_object(batch))

    async def _cancel(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is None:
            return self._error(request, 404, _BAD_PARAM, f"no such batch: {request.match_info['batch_id']}")
        if batch.status in ("validating", "in_progress"):
            batch.status, batch.cancelling_at = "cancelling", self.now()
            self.settle()
        elif batch.status != "cancelling":
            return self._error(request, 400, _BAD_PARAM,
                               f"batch {batch.id} is {batch.status}: only a validating or in_progress batch can be "
                               "cancelled")
        return self._json(self.as_object(batch))

    async def _list_batches(self, request: web.Request) -> web.Response:
        try:
            limit = int(request.query.get("limit", "20"))
            if not 1 <= limit <= 100:
                raise ValueError
        except ValueError:
            return self._error(request, 400, _BAD_PARAM, "limit must be a whole number from 1 to 100")
        newest_first = list(reversed(self.batches.values()))
        after = request.query.get("after")
        if after is not None:
            index = next((i for i, b in enumerate(newest_first) if b.id == after), None)
            if index is None:
                return self._error(request, 400, _BAD_PARAM, f"after: no such batch {after!r}")
            newest_first = newest_first[index + 1:]
        if (fault := self._poll_fault(request)) is not None:
            return fault
        page = newest_first[:limit]
        return self._json({"object": "list", "data": [self.as_object(b) for b in page],
                           "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None,
                           "has_more": len(newest_first) > limit})

    async def _advance(self, request: web.Request) -> web.Response:
        try:
            seconds = float((await request.json())["seconds"])
            if not math.isfinite(seconds) or seconds < 0:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            return self._error(request, 400, "1214", 'expected {"seconds": S} with S >= 0')
        self.advance(seconds)
        return self._json({"now": self._stamp(self.now()),
                           "batches": {b.id: b.status for b in self.batches.values()}})

    async def _forget(self, request: web.Request) -> web.Response:
        try:
            ids = (await request.json()).get("ids") if request.can_read_body else None
            if ids is not None and not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
                raise ValueError
        except (ValueError, AttributeError):
            return self._error(request, 400, "1214", 'expected {"ids": [ID, ...]} or no body (forget everything)')
        return self._json({"forgotten": self.forget(ids)})

    def as_object(self, batch: SimBatch) -> dict[str, Any]:
        stamp = self._stamp
        return {
            "id": batch.id, "object": "batch", "endpoint": batch.endpoint,
            "errors": {"object": "list", "data": batch.line_errors} if batch.line_errors else None,
            "input_file_id": batch.input_file.id, "completion_window": batch.completion_window,
            "status": batch.status, "output_file_id": self._output_file_id(batch), "error_file_id": batch.error_file_id,
            "created_at": stamp(batch.created_at), "in_progress_at": stamp(batch.in_progress_at),
            "expires_at": stamp(batch.expires_at), "finalizing_at": stamp(batch.finalizing_at),
            "completed_at": stamp(batch.completed_at), "failed_at": stamp(batch.failed_at),
            "expired_at": stamp(batch.expired_at), "cancelling_at": stamp(batch.cancelling_at),
            "cancelled_at": stamp(batch.cancelled_at),
            "request_counts": {"total": len(batch.order), "completed": batch.completed, "failed": batch.failed},
            "metadata": None if self.config.batch_no_metadata else batch.metadata,
        }

    def _output_file_id(self, batch: SimBatch) -> str | None:
        """batch_hide_output_polls: the first N answers naming an ended batch's output file leave it out."""
        if batch.output_file_id is not None and self.hidden_outputs < self.config.batch_hide_output_polls:
            self.hidden_outputs += 1
            return None
        return batch.output_file_id

    # -- batches: the clock side ----------------------------------------------------------------------------

    def settle(self) -> None:
        """Bring every live batch up to the clock's present."""
        now = self.now()
        for batch in self.batches.values():
            if batch.status in LIVE:
                self._settle(batch, now)

    def _settle(self, batch: SimBatch, now: float) -> None:
        cfg = self.config
        if batch.status == "validating":
            validated = batch.created_at + cfg.batch_validating_s
            if batch.expires_at <= min(validated, now):
                self._expire(batch)
                return
            if validated > now:
                return
            if batch.line_errors:
                batch.status, batch.failed_at = "failed", validated
                self._end(batch)
                return
            batch.status, batch.in_progress_at = "in_progress", validated
        if batch.status in ("in_progress", "cancelling"):
            self._work(batch, now)
        if batch.status == "finalizing":
            finished = (batch.finalizing_at or 0) + cfg.batch_finalizing_s
            if finished <= now:
                batch.status, batch.completed_at = "completed", finished
                self._end(batch)

    def _work(self, batch: SimBatch, now: float) -> None:
        """Answer the lines due by now (or by the expiry or the end of cancelling), then change state if it is time."""
        rate = self.config.batch_rate
        started = batch.in_progress_at
        all_answered_at = None if started is None else started + len(batch.order) / rate
        if batch.status == "cancelling":
            assert batch.cancelling_at is not None
            until = batch.cancelling_at + self.config.batch_cancelling_s
            if all_answered_at is not None and not batch.hung:
                until = min(until, max(all_answered_at, batch.cancelling_at))
            if started is not None:
                # 1e-9: a clock advanced by whole seconds must not lose a line to float rounding
                self._answer(batch, math.floor((min(now, until) - started) * rate + 1e-9))
            if now >= until:
                batch.status, batch.cancelled_at = "cancelled", until
                self._end(batch)
            return
        assert started is not None and all_answered_at is not None
        self._answer(batch, math.floor((min(now, batch.expires_at) - started) * rate + 1e-9))
        if batch.done == len(batch.order) and not batch.hung and all_answered_at <= batch.expires_at:
            batch.status, batch.finalizing_at = "finalizing", all_answered_at
        elif now >= batch.expires_at:
            self._expire(batch)

    def _output_paths(self, batch: SimBatch) -> tuple[Path, Path]:
        folder = self._directory()
        return folder / f"{batch.id}.output", folder / f"{batch.id}.errors"

    def _answer(self, batch: SimBatch, target: int) -> None:
        target = min(target, len(batch.order))
        if target <= batch.done:
            return
        output_path, error_path = self._output_paths(batch)
        with (batch.input_file.path.open("rb") as source, output_path.open("a", encoding="utf-8") as output,
              error_path.open("a", encoding="utf-8") as errors):
            for position in range(batch.done, target):
                offset = batch.order[position]
                source.seek(offset)
                record = json.loads(source.readline())
                line = self.answer_line(batch, record)
                if line is None:
                    batch.hung.append(offset)
                    continue
                self.lines_answered += 1
                if line["response"]["status_code"] == 200:
                    batch.completed += 1
                    output.write(_dumps(line) + "\n")
                else:
                    batch.failed += 1
                    errors.write(_dumps(line) + "\n")
        batch.done = target

    def answer_line(self, batch: SimBatch, record: dict[str, Any]) -> dict[str, Any] | None:
        """The output or error line for one input line, as the online route would answer it; None for [[hang]].

        The markers act as online: ``[[error:S:C]]`` answers status S with code C (S 200: an error body in an
        output line), ``[[flaky:N]]`` fails the first N submissions of the prompt (online requests included)
        with 500/1200, ``[[nochoices]]``, ``[[think]]``, ``[[badjson]]``, ``[[set:...]]``, ``[[bigbody:B]]``
        and ``[[bigstream:B]]`` shape the body; ``[[malformed]]`` makes the body a string holding truncated
        JSON; ``[[hang]]`` leaves the line unanswered until the batch expires; ``[[slow:MS]]`` and
        ``[[reset]]`` are transport faults, which a batch line does not have.
        """
        chat: ChatRequest = parse_chat(record["body"])
        markers = markers_of(chat.prompt)
        if "hang" in markers:
            return None
        authorization = batch.authorization
        status, request_id, body = 200, _new_id("req-"), None
        if "error" in markers:
            text, _, code = markers["error"].partition(":")
            status = int(text) if text.isdigit() else 500
            body = self.sim.error_body(authorization, status, code or None)
        elif self.sim.flaky_fails(chat.prompt, markers):
            status, body = 500, self.sim.error_body(authorization, 500, "1200")
        elif "malformed" in markers:
            body = _MALFORMED_BODY.decode()
        else:
            request_id, body = self.sim.chat_completion(chat, markers, authorization,
                                                        nochoices="nochoices" in markers)
        return {"id": _new_id("batch_req_"), "custom_id": record["custom_id"],
                "response": {"status_code": status, "request_id": request_id, "body": body}, "error": None}

    def _expire(self, batch: SimBatch) -> None:
        """Expired: every line not answered goes to the error file as batch_expired."""
        _, error_path = self._output_paths(batch)
        left = [*batch.order[batch.done:], *batch.hung]
        with batch.input_file.path.open("rb") as source, error_path.open("a", encoding="utf-8") as errors:
            for offset in left:
                source.seek(offset)
                custom_id = json.loads(source.readline())["custom_id"]
                errors.write(_dumps({"id": _new_id("batch_req_"), "custom_id": custom_id, "response": None,
                                     "error": {"code": "batch_expired",
                                               "message": "This request could not be executed before the "
                                                          "completion window expired."}}) + "\n")
        batch.status, batch.expired_at = "expired", batch.expires_at
        self._end(batch)

    def _end(self, batch: SimBatch) -> None:
        """The batch reached a final state: its files appear, its input file is released (deleted if asked)."""
        output_path, error_path = self._output_paths(batch)
        batch.output_file_id = self._keep(output_path, f"{batch.id}_output.jsonl")
        batch.error_file_id = self._keep(error_path, f"{batch.id}_error.jsonl")
        stored = batch.input_file
        stored.readers -= 1
        if batch.auto_delete_input_file or stored.deleted:
            self._delete(stored)
