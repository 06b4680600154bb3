"""The simulator's settings (`SimConfig`): latency, limits, faults, and the Batch API's `batch_*` knobs."""

from __future__ import annotations

import dataclasses
from typing import Any


def _option(default: Any, meaning: str) -> Any:
    """A setting with its meaning: the --help of its command-line option (server.build_parser), and the docs'."""
    return dataclasses.field(default=default, metadata={"help": meaning})


@dataclasses.dataclass
class SimConfig:
    latency_ms: float = _option(0, "the delay of each answer, in milliseconds")
    latency_dist: str = _option("fixed", "fixed, or lognormal: --latency-ms is then the median delay")
    latency_sigma: float = _option(0.5, "the sigma of the lognormal delay")
    max_concurrency: int | None = _option(None, "with more than this many requests in flight, answer 429 with code "
                                                "1302")
    rpm: int | None = _option(None, "over this many requests per minute (a sixtieth of it per second), answer 429 "
                                    "with code 1302")
    retry_after: float | None = _option(None, "send Retry-After with this many seconds with the 429s of codes 1302, "
                                              "1303 and 1305")
    p_500: float = _option(0.0, "the chance that a request is answered 500 with code 1200")
    p_503: float = _option(0.0, "the chance that a request is answered 503 with code 1305")
    p_reset: float = _option(0.0, "the chance that a request's connection is reset")
    p_malformed: float = _option(0.0, "the chance that a request is answered a 200 of truncated JSON")
    p_hang: float = _option(0.0, "the chance that a request is not answered for --hang-s seconds")
    hang_s: float = _option(3600, "how long a hang lasts, in seconds")
    fail_after: int | None = _option(None, "after this many answers, fail every request with --fail-status and "
                                           "--fail-code")
    fail_status: int = _option(429, "the HTTP status of --fail-after's failures")
    fail_code: str = _option("1113", "the business code of --fail-after's failures (1113: arrears)")
    down_for_requests: int = _option(0, "an outage that ends: the first N requests get --down-as, later ones are "
                                        "answered")
    down_as: str = _option("503", "503 (JSON, code 1305) or html (a proxy's 502 page)")
    # keep it out of reprs/logs
    api_key: str | None = dataclasses.field(default=None, repr=False, metadata={"help": "the key every request must "
                                                                                        "carry"})
    keep_bodies: bool = _option(False, "keep every request body parsed (SimulatorThread.bodies()), for tests")
    openai_strict: bool = _option(False, "answer a strict json_schema response_format outside OpenAI's subset with "
                                         "OpenAI's 400, as OpenAI does")
    echo_key: bool = _option(False, "quote the request's Authorization header in every error message and reply, as "
                                    "a careless server might")
    history: bool = _option(False, "record every request (prompt, when it arrived and was answered, status) in "
                                   "/_stats's history")
    ttft_ms: float = _option(0, "a streamed answer's wait before its first chunk, once its headers are sent, in "
                                "milliseconds")
    chunk_interval_ms: float = _option(0, "a streamed answer's wait between its chunks, in milliseconds")
    seed: int = _option(0, "the seed of the random faults and delays, and of the Batch API's line order and poll "
                           "faults")
    # The Batch API (batch/simulator/batches.py); times are seconds of the simulator's batch clock.
    batch_speed: float = _option(1.0, "Batch API: simulated seconds per real second; 0 stops the clock, so only "
                                      "POST /_batches/advance moves it")
    batch_rate: float = _option(1000.0, "Batch API: lines a batch answers per simulated second")
    batch_validating_s: float = _option(1.0, "Batch API: how long a batch is validating")
    batch_finalizing_s: float = _option(1.0, "Batch API: how long a batch is finalizing")
    batch_cancelling_s: float = _option(1.0, "Batch API: how long a cancelled batch is cancelling; its lines keep "
                                             "being answered meanwhile")
    batch_expire_s: float = _option(86400.0, "Batch API: a batch not finished this long after its creation expires")
    batch_max_files: int = _option(1000, "Batch API: files kept at once (uploads and outputs); an upload past it "
                                         "gets 400 with code 1210")
    batch_max_lines: int = _option(50000, "Batch API: lines per input file; a create naming a longer one gets 400 "
                                          "with code 1210")
    batch_max_bytes: int = _option(100_000_000, "Batch API: bytes per input file; a create naming a larger one gets "
                                                "400 with code 1210")
    batch_p_poll_500: float = _option(0.0, "Batch API: the chance that a retrieve, list or file download answers 500 "
                                           "(code 1200)")
    batch_p_poll_503: float = _option(0.0, "Batch API: the chance that a retrieve, list or file download answers 503 "
                                           "(code 1305)")
    batch_arrears_after: int | None = _option(None, "Batch API: once this many batches were created, a create "
                                                    "answers 429 with code 1113 (arrears); 0: from the first")
    batch_down_for_calls: int = _option(0, "Batch API: the first N calls (any route) answer 503 with code 1305")
    batch_short_downloads: int = _option(0, "Batch API: the first N downloads of result files end after half their "
                                            "lines")
    batch_torn_downloads: int = _option(0, "Batch API: the N downloads after those end in the middle of a line (a "
                                           "connection cut the server did not notice)")
    batch_hide_output_polls: int = _option(0, "Batch API: the first N polls of an ended batch name no output_file_id "
                                              "(an anomaly)")
    batch_upload_delay_ms: float = _option(0.0, "Batch API: how long an upload's answer waits once its file is stored "
                                                "(a test pauses the client in the middle of the call)")
    batch_no_metadata: bool = _option(False, "Batch API: batch objects leave metadata out (null), as a provider may")
    batch_limits_at_validation: bool = _option(False, "Batch API: a file over the line or byte limit fails "
                                                      "validation (too_many_lines, too_many_bytes) instead of being "
                                                      "refused at create")
    batch_fail_validations: int = _option(0, "Batch API: the first N files made batches fail validation (code "
                                             "simulated_refusal)")

    def __post_init__(self) -> None:
        if self.batch_rate <= 0 or self.batch_speed < 0:
            raise ValueError("batch_rate must be above 0 and batch_speed at least 0")
        if self.latency_dist not in ("fixed", "lognormal"):
            raise ValueError(f"latency_dist must be 'fixed' or 'lognormal', not {self.latency_dist!r}")
        if self.down_as not in ("503", "html"):
            raise ValueError(f"down_as must be '503' or 'html', not {self.down_as!r}")
