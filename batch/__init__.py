"""batch: run an LLM prompt over every row of a table, checkpointed to Parquet, from the command line
(`python -m batch run job.yaml`) or from Python:

    import batch
    out = batch.run_frame(reviews, template="Sentiment of: {text}", model="glm-4-flash", output="out/reviews.parquet")

The API is what this package exports (see batch.api); the modules under it are private. They are imported on
first use (PEP 562): `import batch` alone costs nothing, so `python -m batch` can set up its signal handling
(batch/__main__.py) before the ~0.6 s of imports that pyarrow, pandas and aiohttp take.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from batch.api import (
        ApiRefusedError,
        BatchError,
        BatchesLive,
        BudgetExceededError,
        CheckpointWriteError,
        ConfigError,
        Interrupted,
        Job,
        JobSpec,
        LockedError,
        RunInterrupted,
        RunResult,
        RunStopped,
        arun,
        arun_frame,
        estimate,
        read_results,
        run,
        run_frame,
        status,
    )

__all__ = [
    "ApiRefusedError", "BatchError", "BatchesLive", "BudgetExceededError", "CheckpointWriteError", "ConfigError",
    "Interrupted", "Job", "JobSpec", "LockedError", "RunInterrupted", "RunResult", "RunStopped", "arun", "arun_frame",
    "estimate", "read_results", "run", "run_frame", "status",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from batch import api

        return getattr(api, name)
    raise AttributeError(f"module 'batch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})  # the API's names, imported on first use, for completion in notebooks
