"""run_frame's DataFrame out: an ordinary frame pandas can write, reply keys named beside the frame's columns,
output settings and the Batch API from Python, and hints in Python's words. Over HTTP to the simulator.
`make test` runs this file under pandas 2 as well (.venv-pandas2)."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
import pytest

import batch
from batch.simulator import SimulatorThread, answer_for


def local_model(sim: SimulatorThread, **params: Any) -> dict[str, Any]:
    return {"provider": "local", "name": "glm-4-flash", "base_url": sim.url, "params": {"max_tokens": 64, **params}}


def frame_of(count: int) -> pd.DataFrame:
    return pd.DataFrame({"text": [f"review {i}" for i in range(count)]},
                        index=pd.Index([f"r{i}" for i in range(count)], name="review_id"))


def expected(text: str) -> str:
    return answer_for("glm-4-flash", [{"role": "user", "content": f"Classify: {text}"}])


def test_the_result_and_any_slice_of_it_write_to_parquet_with_the_runs_summary(sim, tmp_path):
    answered = batch.run_frame(frame_of(3), template="Classify: {text}", model=local_model(sim),
                               output=tmp_path / "o.parquet", progress=False)
    answered.to_parquet(tmp_path / "whole.parquet")
    answered.iloc[1:][["response", "cost"]].to_parquet(tmp_path / "slice.parquet")
    answered.to_json(tmp_path / "whole.json")

    read = pd.read_parquet(tmp_path / "whole.parquet")
    assert read["response"].tolist() == [expected(f"review {i}") for i in range(3)]
    assert read.attrs["batch_summary"] == answered.attrs["batch_summary"]
    assert pd.read_parquet(tmp_path / "slice.parquet").attrs["batch_summary"]["job_totals"]["ok"] == 3
    result = batch.RunResult.from_summary(answered.attrs["batch_summary"])
    assert result.ok == 3 and result.complete and "all runs: ok 3, failed 0, pending 0" in str(result)


def test_reply_keys_named_like_the_frames_columns_get_the_batch_prefix(sim, tmp_path):
    schema = {"type": "object", "required": ["text", "label", "status", "score"],
              "properties": {"text": {"type": "string"}, "label": {"type": "string"},
                             "status": {"type": "string"}, "score": {"type": "integer"}}}
    frame = pd.DataFrame({"text": ["a", "b"], "label": ["x", "y"], "status": ["new", "old"]})
    answered = batch.run_frame(frame, template="Classify: {text}", model=local_model(sim),
                               output=tmp_path / "o.parquet", json_schema=schema, progress=False)

    assert answered[["text", "label", "status"]].equals(frame)  # the frame's own columns, as they were
    assert answered["batch_status"].tolist() == ["ok", "ok"]  # the answer's status: the frame has a status
    replies = [json.loads(r) for r in answered["response"]]
    # A key named like a frame column: batch_KEY; named like an answer column (status): json_KEY, as in the file.
    assert answered["batch_text"].tolist() == [r["text"] for r in replies]
    assert answered["batch_label"].tolist() == [r["label"] for r in replies]
    assert answered["json_status"].tolist() == [r["status"] for r in replies]
    assert answered["score"].tolist() == [r["score"] for r in replies]
    assert "json_text" not in answered and "json_label" not in answered


def test_output_settings_go_into_the_job_files_output_section(sim, tmp_path):
    schema_file = tmp_path / "schema.json"
    schema_file.write_text('{"type": "object", "required": ["label"], "properties": {"label": {"type": "string"}}}')
    answered = batch.run_frame(frame_of(2), template="Classify: {text}", model=local_model(sim),
                               output=tmp_path / "out" / "o.parquet", json_schema=str(schema_file),
                               json_attempts=2, progress=False)
    assert answered["label"].notna().all()
    with pytest.raises(batch.ConfigError, match="output_format"):
        batch.run_frame(frame_of(2), template="Classify: {text}", model=local_model(sim),
                        output=tmp_path / "o2.parquet", output_format="csv")


def test_the_batch_api_from_python_without_wait_raises_batches_live_and_a_later_call_collects(start_sim, tmp_path):
    sim = start_sim(batch_speed=0)  # the provider's clock moves only when the test says
    settings = {"template": "Classify: {text}", "model": local_model(sim), "output": tmp_path / "o.parquet",
                "mode": "batch_api", "batch_api": {"poll_interval_s": 0.05}, "progress": False}
    with pytest.raises(batch.BatchesLive) as stopped:
        batch.run_frame(frame_of(4), **settings)
    message = str(stopped.value)
    assert "1 Batch API batches are still being worked on" in message and "wait=True" in message
    assert "stopped: None" not in message and "--wait" not in message
    assert stopped.value.exit_code == 6 and stopped.value.result.pending == 4
    assert "wait=True" in str(stopped.value.result) and "--wait" not in str(stopped.value.result)

    sim.advance(3600)
    answered = batch.run_frame(frame_of(4), **settings)
    assert answered["response"].tolist() == [expected(f"review {i}") for i in range(4)]


def test_the_batch_api_from_python_with_wait_returns_every_answer(start_sim, tmp_path):
    sim = start_sim(batch_speed=10_000)
    answered = batch.run_frame(frame_of(3), template="Classify: {text}", model=local_model(sim),
                               output=tmp_path / "o.parquet", mode="batch_api", wait=True,
                               batch_api={"poll_interval_s": 0.01}, progress=False)
    assert answered["response"].tolist() == [expected(f"review {i}") for i in range(3)]
    assert sim.stats()["batch_api"]["batches_created"] == 1
    with pytest.raises(batch.ConfigError, match="mode is 'online' or 'batch_api', not 'batch'"):
        batch.run_frame(frame_of(3), template="Classify: {text}", model=local_model(sim),
                        output=tmp_path / "o.parquet", mode="batch")


def test_hints_name_the_keyword_argument_not_the_command_line_option(sim, tmp_path):
    settings = {"template": "Classify: {text}", "output": tmp_path / "o.parquet", "progress": False}
    batch.run_frame(frame_of(2), model=local_model(sim), **settings)
    with pytest.raises(batch.ConfigError, match="run again with force=True to resume anyway") as refused:
        batch.run_frame(frame_of(2), model=local_model(sim, temperature=0.5), **settings)
    assert "--force" not in str(refused.value)
    (tmp_path / "o.checkpoint" / "fingerprint.json").write_text("{damaged")
    with pytest.raises(batch.ConfigError, match="run with force=True to write it again"):
        batch.run_frame(frame_of(2), model=local_model(sim), **settings)
