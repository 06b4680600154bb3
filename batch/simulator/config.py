"""The simulator's settings (`SimConfig`): latency, limits, faults, and the Batch API's `batch_*` knobs."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class SimConfig:
    latency_ms: float = 0
    latency_dist: str = "fixed"  # "fixed" or "lognormal" (median latency_ms)
    latency_sigma: float = 0.5
    max_concurrency: int | None = None
    rpm: int | None = None
    retry_after: float | None = None
    p_500: float = 0.0
    p_503: float = 0.0
    p_reset: float = 0.0
    p_malformed: float = 0.0
    p_hang: float = 0.0
    hang_s: float = 3600
    fail_after: int | None = None
    fail_status: int = 429
    fail_code: str = "1113"
    down_for_requests: int = 0  # the endpoint is down for the first N requests ...
    down_as: str = "503"  # ... answering "503" (JSON, code 1305) or "html" (a proxy's 502 page)
    api_key: str | None = dataclasses.field(default=None, repr=False)  # keep it out of reprs/logs
    keep_bodies: bool = False  # keep every request body parsed (SimulatorThread.bodies()), for tests
    openai_strict: bool = False  # a strict json_schema response_format outside OpenAI's subset: 400, as OpenAI answers
    echo_key: bool = False  # quote the request's Authorization header in every error message and reply
    history: bool = False  # record every parsed request (prompt, arrived, answered, status) in stats["history"]
    ttft_ms: float = 0  # a streamed answer (stream: true): the wait before its first token, once headers are sent
    chunk_interval_ms: float = 0  # ... and between its chunks
    seed: int = 0
    # The Batch API (batch/simulator/batches.py); times are seconds of the simulator's batch clock.
    batch_speed: float = 1.0  # simulated seconds per real second; 0: only POST /_batches/advance moves the clock
    batch_rate: float = 1000.0  # lines a batch answers per simulated second
    batch_validating_s: float = 1.0
    batch_finalizing_s: float = 1.0
    batch_cancelling_s: float = 1.0  # lines keep being answered this long after a cancel
    batch_expire_s: float = 86400.0  # a batch not finished this long after its creation expires
    batch_max_files: int = 1000  # files kept (uploads and outputs); an upload past it is refused
    batch_max_lines: int = 50000  # per input file, refused at create
    batch_max_bytes: int = 100_000_000  # per input file, refused at create
    batch_p_poll_500: float = 0.0  # the chance that a retrieve, list or file download answers 500 (code 1200) ...
    batch_p_poll_503: float = 0.0  # ... or 503 (code 1305)
    batch_arrears_after: int | None = None  # once N batches were created, create answers 429 with code 1113
    batch_down_for_calls: int = 0  # the first N Batch API calls (any route) answer 503 with code 1305
    batch_short_downloads: int = 0  # the first N downloads of result files end after half their lines ...
    batch_torn_downloads: int = 0  # ... or in the middle of a line (a connection cut the server did not notice)
    batch_hide_output_polls: int = 0  # the first N polls of an ended batch name no output_file_id (an anomaly)
    batch_no_metadata: bool = False  # batch objects leave metadata out (null), as a provider may
    batch_limits_at_validation: bool = False  # a file over the line or byte limit fails validation (too_many_lines,
    # too_many_bytes) instead of being refused at create
    batch_fail_validations: int = 0  # the first N files made batches fail validation (code simulated_refusal)

    def __post_init__(self) -> None:
        if self.batch_rate <= 0 or self.batch_speed < 0:
            raise ValueError("batch_rate must be above 0 and batch_speed at least 0")
        if self.latency_dist not in ("fixed", "lognormal"):
            raise ValueError(f"latency_dist must be 'fixed' or 'lognormal', not {self.latency_dist!r}")
        if self.down_as not in ("503", "html"):
            raise ValueError(f"down_as must be '503' or 'html', not {self.down_as!r}")
