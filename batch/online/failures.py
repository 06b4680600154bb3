"""What went wrong with a request, and what to do about it: retry, fail the row, or stop the job.

Zhipu puts the meaning in a business code inside the body (`{"error": {"code": "1113", ...}}`),
and the HTTP status alone misleads: 1113 (arrears) and 1304 (daily quota) arrive as 429, which
a client that trusts the status would retry forever. So we classify on the code first (by the provider's
table, batch.providers.BusinessCodes), the status second.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from batch.logs import redact
from batch.providers import ZHIPU_CODES, BusinessCodes

Scope = Literal["retry", "row", "job"]


@dataclass
class Failure(Exception):
    scope: Scope
    error_class: str
    message: str
    retry_after: float | None = None
    code: int | None = None  # the server's business code, when it sent one
    usage: dict[str, Any] | None = None  # the usage of an answer this judges, when one came: it was paid for

    def __post_init__(self) -> None:
        # Every failure passes here, and its message may repeat what a server sent: the key (a 401 echoing
        # the Authorization header), masked once before it reaches a record, log or summary; and a lone
        # surrogate (a "\ud800" escape), which no UTF-8 file can hold, replaced.
        self.message = redact(self.message.encode("utf-8", "replace").decode("utf-8"))

    def __str__(self) -> str:
        return f"{self.error_class}: {self.message}"


def classify(exc: BaseException) -> Failure:
    """Any exception from a request as a Failure: the client raises Failures, anything else is unexpected."""
    if isinstance(exc, Failure):
        return exc
    return Failure("retry", "bad_response", f"{type(exc).__name__}: {exc}"[:300])


def classify_status(status: int, code: int | None, message: str, retry_after: float | None = None,
                    codes: BusinessCodes = ZHIPU_CODES) -> Failure:
    """An error answer as a Failure, judged by its business code in the provider's table `codes` first."""
    described = f"HTTP {status}" + (f" code {code}" if code is not None else "") + (f": {message}" if message else "")
    failure = judge_status(status, code, described, retry_after, codes)
    failure.code = code
    return failure


def judge_status(status: int, code: int | None, described: str, retry_after: float | None,
                 codes: BusinessCodes) -> Failure:
    if code is not None:
        for job_codes, error_class in codes.job:
            if code in job_codes:
                return Failure("job", error_class, described)
    if status == 200:
        # A gateway's error body in a 200 (Zhipu's 1113 can come so): only its code says what it is.
        if code in codes.rate_limited:
            return Failure("retry", "rate_limited", described, retry_after)
        if code in codes.row:
            return Failure("row", codes.row[code], described)
        return Failure("retry", "server_error", described, retry_after)
    if status in (401, 403):
        return Failure("job", "auth", described)
    if status == 429:
        if code is None or code in codes.rate_limited:
            return Failure("retry", "rate_limited", described, retry_after)
        return Failure("job", "quota", described)
    if status >= 500 or status == 408 or code in codes.server_error:
        return Failure("retry", "server_error", described, retry_after)
    if status == 404:
        # Every row would hit the same missing endpoint or model.
        return Failure("job", "not_found", described)
    if code in codes.row:
        return Failure("row", codes.row[code], described)
    return Failure("row", "bad_request", described)


def retry_after_seconds(headers: object) -> float | None:
    get = getattr(headers, "get", None)
    if get is None:
        return None
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) * scale)
        except ValueError:
            continue  # An HTTP date: rare from API servers; fall back to our own backoff.
    return None
