"""batch: run an LLM prompt over every row of a table, checkpointed to Parquet, from the command line
(`python -m batch run job.yaml`) or from Python:

    import batch
    out = batch.run_frame(reviews, template="Sentiment of: {text}", model="glm-4-flash", output="out/reviews.parquet")

The API is what this package exports (see batch.api); the modules under it are private.
"""

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
    "Interrupted", "Job", "JobSpec", "LockedError", "RunResult", "RunStopped", "arun", "arun_frame", "estimate",
    "read_results", "run", "run_frame", "status",
]
