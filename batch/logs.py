"""The "batch" logger: text or JSON lines to stderr, optionally to a file, with secrets redacted."""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from batch.errors import ConfigError

log = logging.getLogger("batch")
LOG_NAME = "batch.log"
TEXT_FORMAT = "%(asctime)s batch %(levelname)s %(message)s"
TEXT_DATEFMT = "%Y-%m-%d %H:%M:%S"


# What the run logging now is part of ("shard 2/4"), named in each of its lines; set by run_log, in the run's context.
_RUN_LABEL: ContextVar[str | None] = ContextVar("batch_run_label", default=None)


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT, the message after the run's label ("shard 2/4: ...") when it has one."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        label = _RUN_LABEL.get()
        if label is not None:
            record = logging.makeLogRecord(record.__dict__)
            record.message = f"{label}: {record.message}"
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the run's label ("shard") when it has one, and
    `extra={"fields": {...}}` at top level."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        label = _RUN_LABEL.get()
        if label is not None:
            entry["shard"] = label
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update({str(k): v for k, v in fields.items() if k not in entry})
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False, default=str)


def make_formatter(log_format: Literal["text", "json"]) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return TextFormatter(TEXT_FORMAT, TEXT_DATEFMT)
    raise ValueError(f"log format must be 'text' or 'json', not {log_format!r}")


MIN_SECRET_LENGTH = 6  # a shorter "secret" would mask ordinary words
MASK = "***"
# The value after "Bearer " or after an Authorization header or field name (with its scheme, if any):
# a server or library may repeat a credential batch never registered, e.g. a proxy's.
_CREDENTIAL = re.compile(
    r"""(\bbearer\s+|\bauthorization["']?\s*[:=]\s*["']?(?:(?:bearer|basic|token)\s+)?+)(?!\*\*\*)[^\s"',;}\]]+""",
    re.IGNORECASE)


class Secrets:
    """The secrets to mask (the API key) and the one function that masks them in any text."""

    def __init__(self, secrets: list[str] | None = None) -> None:
        self.secrets: list[str] = []
        self.add(secrets or [])

    def add(self, secrets: list[str]) -> None:
        # Longest first, so a secret that contains another is replaced whole.
        known = {*self.secrets, *(s for s in secrets if s and len(s) >= MIN_SECRET_LENGTH)}
        self.secrets[:] = sorted(known, key=len, reverse=True)

    def hide(self, text: str) -> str:
        """`text` with the known secrets masked: one substring test per secret, cheap enough per answer."""
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text

    def redact(self, text: str) -> str:
        """`text` with the known secrets and any Authorization / Bearer value masked: for what a server or
        library says (errors, logs, the summary), not for model answers, which may rightly show a header."""
        return _CREDENTIAL.sub(lambda match: match.group(1) + MASK, self.hide(text))


# The process's secrets: the API key, from the moment a client or a run has it, until setup_logging().
SECRETS = Secrets()


def keep_secret(secret: str) -> None:
    """Mask `secret` from now on in every log line, failure message, summary and error line."""
    SECRETS.add([secret])


def redact(text: str) -> str:
    """Server or library text with the API key and any Authorization / Bearer value masked."""
    return SECRETS.redact(text)


def hide_secrets(text: str) -> str:
    """Text with the API key masked (and nothing else touched): for model answers."""
    return SECRETS.hide(text)


class RedactSecrets(logging.Filter):
    """Belt and braces: whatever a library logs, the API key is never written out."""

    def __init__(self, secrets: Secrets | list[str]) -> None:
        super().__init__()
        self.known = secrets if isinstance(secrets, Secrets) else Secrets(secrets)

    @property
    def secrets(self) -> list[str]:
        return self.known.secrets

    def redact(self, text: str) -> str:
        return self.known.redact(text)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()  # the final text: %-args included
        except Exception:  # a bad format string: keep its pieces, never the raw args
            message = f"{record.msg} {record.args!r}"
        record.msg, record.args = self.redact(message), None
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            record.fields = json.loads(self.redact(json.dumps(fields, ensure_ascii=False, default=str)))
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


def _guard(handler: logging.Handler) -> logging.Handler:
    """The handler, masking SECRETS: the ones known now and any kept later (the filter reads them live)."""
    if not any(isinstance(f, RedactSecrets) and f.known is SECRETS for f in handler.filters):
        handler.addFilter(RedactSecrets(SECRETS))
    return handler


class _OneLine(logging.Filter):
    """A library's record as one line: its logger's name and its message's first line, without the traceback it may
    carry."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = f"{record.name}: {(record.getMessage().splitlines() or [''])[0]}", None
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def setup_logging(verbose: bool, log_format: Literal["text", "json"] = "text") -> logging.Handler:
    """The "batch" logger to stderr only, replacing (and closing) whatever handlers it had; other libraries' records
    shown under -v only, one line each (see _library_handler)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(log_format))
    for old in log.handlers:
        old.close()
    SECRETS.secrets.clear()
    log.handlers[:] = [_guard(handler)]
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False
    root = logging.getLogger()
    for old in [old for old in root.handlers if getattr(old, "batch_libraries", False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(_library_handler(verbose, log_format))
    return handler


class _StderrNow(logging.StreamHandler):  # type: ignore[type-arg]
    """A handler writing to whatever sys.stderr is when a record comes (a handler on the root logger outlives the
    command that put it there: in a program calling the command line twice, or a test, the first one's stream may
    be closed)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _library_handler(verbose: bool, log_format: Literal["text", "json"]) -> logging.Handler:
    """Where the command line puts what other libraries log. Without a handler of the program's, Python's last
    resort prints their warnings whole on stderr (gcsfs logs each request it gives up on with its traceback, beside
    batch's own line saying the store does not answer): under -v they are shown one line each, masked; else not."""
    handler: logging.Handler = _StderrNow() if verbose else logging.NullHandler()
    handler.setFormatter(make_formatter(log_format))
    handler.addFilter(_OneLine())
    handler.batch_libraries = True  # type: ignore[attr-defined]  # the one setup_logging replaces
    return _guard(handler)


# The batch.log of the run the code at hand works for. run_log sets it in the run's context, which the run's tasks,
# its loop's callbacks and asyncio.to_thread inherit: each of two runs in one process writes its own lines only.
_RUN_LOG: ContextVar[logging.Handler | None] = ContextVar("batch_run_log", default=None)


class _RunLogTap(logging.Filter):
    """On the "batch" logger while runs log: each record goes to the batch.log of the run it comes from, and on to
    the logger's handlers (and the program's, up the hierarchy) only from the level they were set to see.

    A filter, not a handler: the logger's level decides for every handler at once, and a run's file takes INFO
    lines whatever level the program gave the logger (it then is lowered to INFO), while the program keeps seeing
    only the lines it asked for."""

    def __init__(self, passes_from: int) -> None:
        super().__init__()
        self.passes_from = passes_from

    def filter(self, record: logging.LogRecord) -> bool:
        run_file = _RUN_LOG.get()
        if run_file is not None and record.levelno >= run_file.level:
            run_file.handle(record)
        return record.levelno >= self.passes_from


class _RunLogging:
    """The "batch" logger's set-up while at least one run logs: the tap, the level, and a stderr handler when the
    program configured none; put back as it was when the last run ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs = 0
        self._level_before = logging.NOTSET
        self._tap: _RunLogTap | None = None
        self._console: logging.Handler | None = None

    def enter(self) -> int:
        """Count a run in; returns the level its file writes from: INFO, or lower if the logger was set lower."""
        with self._lock:
            if self._runs == 0:
                if not any(isinstance(f, RedactSecrets) and f.known is SECRETS for f in log.filters):
                    log.addFilter(RedactSecrets(SECRETS))  # masked for the program's own handlers too (kept after)
                self._level_before = log.level
                shown_from = log.getEffectiveLevel()
                if not log.hasHandlers():  # a program that configured no logging sees the command line's lines
                    self._console = _guard(logging.StreamHandler(sys.stderr))
                    self._console.setFormatter(make_formatter("text"))
                    log.addHandler(self._console)
                    shown_from = min(shown_from, logging.INFO)
                self._tap = _RunLogTap(shown_from)
                log.addFilter(self._tap)
                log.setLevel(min(shown_from, logging.INFO))
            self._runs += 1
            return log.getEffectiveLevel()

    def leave(self) -> None:
        with self._lock:
            self._runs -= 1
            if self._runs:
                return
            log.removeFilter(self._tap)
            log.setLevel(self._level_before)
            if self._console is not None:
                log.removeHandler(self._console)
                self._console.close()
            self._tap = self._console = None


_RUN_LOGGING = _RunLogging()


@contextmanager
def run_log(folder: Path, log_format: Literal["text", "json"] = "text", label: str | None = None) -> Iterator[None]:
    """This run's lines, and only this run's, also appended to `folder/batch.log` (the job's checkpoint folder,
    created here): every line from INFO up (DEBUG too when the "batch" logger is set to DEBUG), whatever level the
    program's logging shows. A program with no logging configured gets them on stderr, as from the command line.
    `label` (a shard's "shard 2/4") is named in each of the run's lines, on stderr and in the file."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(folder / LOG_NAME, mode="a", encoding="utf-8")
    except OSError as exc:
        why = exc.strerror or exc
        raise ConfigError(f"{folder}: cannot write {LOG_NAME} in the checkpoint folder: {why}") from None
    handler.setFormatter(make_formatter(log_format))
    _guard(handler)
    handler.setLevel(_RUN_LOGGING.enter())
    token = _RUN_LOG.set(handler)
    label_token = _RUN_LABEL.set(label)
    try:
        yield
    finally:
        _RUN_LABEL.reset(label_token)
        _RUN_LOG.reset(token)
        _RUN_LOGGING.leave()
        handler.close()


def redact_everywhere(secrets: list[str]) -> None:
    """Redact `secrets` in every handler of the "batch" logger, and in any handler added later."""
    SECRETS.add(secrets)
    for handler in log.handlers:
        _guard(handler)


def write_traceback(path: Path, exc: BaseException, message: str,
                    log_format: Literal["text", "json"] = "text") -> None:
    """Append `message` and the traceback of `exc` to the log file at `path` (secrets masked), as a log line."""
    handler = _guard(logging.FileHandler(path, mode="a", encoding="utf-8"))
    handler.setFormatter(make_formatter(log_format))
    try:
        record = log.makeRecord(log.name, logging.CRITICAL, __file__, 0, "%s", (message,),
                                (type(exc), exc, exc.__traceback__))
        handler.handle(record)
    finally:
        handler.close()
