"""The public API is what `batch` exports, pinned (as httpx's test_exported_members.py does): a name added to or
dropped from `batch.__all__` is a decision, made here too. The modules below the package are private."""

import batch

PUBLIC = {
    # running a job
    "run", "arun", "run_frame", "arun_frame", "Job", "JobSpec",
    # reading one
    "status", "estimate", "read_results", "RunResult",
    # what a run can raise
    "BatchError", "ConfigError", "LockedError", "ApiRefusedError", "BudgetExceededError", "CheckpointWriteError",
    "RunStopped", "BatchesLive", "Interrupted", "RunInterrupted",
}


def test_the_exported_names_are_the_public_api():
    assert set(batch.__all__) == PUBLIC
    assert len(batch.__all__) == len(PUBLIC)  # each once


def test_every_exported_name_is_there_and_documented():
    for name in batch.__all__:
        member = getattr(batch, name)
        if callable(member):  # `Job` is a type alias: the types it joins are documented
            assert member.__doc__, f"batch.{name} has no docstring"
    assert set(batch.__all__) <= set(dir(batch))  # completion in a notebook shows them before their first use


def test_a_name_that_is_not_exported_is_an_attribute_error():
    try:
        batch.no_such_name  # noqa: B018
    except AttributeError as error:
        assert "no_such_name" in str(error)
    else:
        raise AssertionError("batch.no_such_name did not raise")
