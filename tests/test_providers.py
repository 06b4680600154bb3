"""Each provider's rules, as a job sees them: its endpoint and key, its parameter ranges, its Batch API's file
limits and dialect. (Its stream, schema and business-code rules: test_streaming, test_json_schema,
test_openai_strict, test_failures.)"""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import pytest

from batch.errors import EXIT_BATCHES_LIVE

ROWS = [{"review_id": f"r{i}", "text": f"review {i}"} for i in range(3)]
KEY_VARIABLES = ("ZHIPU_API_KEY", "OPENAI_API_KEY", "LOCAL_API_KEY")


@pytest.fixture
def no_keys(monkeypatch, tmp_path):
    """No key in the environment nor in a .env of the working directory."""
    for name in KEY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize(("provider", "base_url", "key"), [
    ("zhipu", "https://open.bigmodel.cn/api/paas/v4/", "ZHIPU_API_KEY"),
    ("openai", "https://api.openai.com/v1", "OPENAI_API_KEY"),
    ("local", "http://127.0.0.1:8080/v1", None),
])
def test_a_provider_gives_the_endpoint_and_key_variable_a_job_leaves_out(provider, base_url, key, no_keys,
                                                                          make_job, run_cli, monkeypatch):
    job = make_job(None, rows=ROWS, model={"provider": provider, "base_url": None})
    code, out, err = run_cli("validate", job)
    if key is not None:  # required: refused without it, naming the variable
        assert code == 2 and f"the API key variable {key} is not set" in err
        monkeypatch.setenv(key, "sk-provider-test-0123456789")
        code, out, err = run_cli("validate", job)
    assert code == 0, err
    assert out.strip().endswith(f"model glm-4-flash at {base_url}")


@pytest.mark.parametrize(("provider", "refused"), [("zhipu", True), ("openai", False), ("local", False)])
def test_zhipus_parameter_ranges_bind_zhipu_only(provider, refused, make_job, run_cli, monkeypatch):
    monkeypatch.setenv("ZHIPU_API_KEY", "sk-provider-test-0123456789")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-provider-test-0123456789")
    job = make_job(None, rows=ROWS, model={"provider": provider, "params": {"temperature": 1.5}})
    code, _, err = run_cli("validate", job)
    assert (code, "outside Zhipu's range" in err) == ((2, True) if refused else (0, False)), err


@pytest.mark.parametrize(("provider", "size", "most"), [
    ("zhipu", 150_000_000, 100_000_000), ("openai", 150_000_000, None), ("local", 200_000_000, None),
    ("openai", 200_000_001, 200_000_000), ("local", 200_000_001, 200_000_000),
])
def test_a_batch_file_is_at_most_the_providers_limit(provider, size, most, make_job, run_cli, monkeypatch):
    monkeypatch.setenv("ZHIPU_API_KEY", "sk-provider-test-0123456789")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-provider-test-0123456789")
    job = make_job(None, rows=ROWS, model={"provider": provider}, mode="batch_api",
                   batch_api={"max_bytes_per_file": size})
    code, _, err = run_cli("validate", job)
    if most is None:
        assert code == 0, err
    else:
        assert code == 2 and "batch_api.max_bytes_per_file" in err and str(most) in err, err


def files_kept(sim) -> set[str]:
    with urllib.request.urlopen(sim.url + "/files") as answer:
        return {stored["id"] for stored in json.loads(answer.read())["data"]}


def batches(sim) -> list[dict[str, Any]]:
    with urllib.request.urlopen(sim.url + "/batches?limit=100") as answer:
        return json.loads(answer.read())["data"]


@pytest.mark.parametrize(("provider", "path", "zhipu_dialect"), [
    ("zhipu", "/v1", True),  # the provider's own dialect, whatever its base URL
    ("local", "/api/paas/v4", True),  # a base URL ending /paas/v4 speaks Zhipu's, whatever the provider
    ("openai", "/api/paas/v4", True),
    ("local", "/v1", False),
    ("openai", "/v1", False),
])
def test_the_batch_api_dialect_follows_the_provider_or_a_zhipu_base_url(provider, path, zhipu_dialect, start_sim,
                                                                        make_job, run_cli, monkeypatch):
    """Zhipu's dialect: each line and the batch name /v4/chat/completions, and the batch asks for its input file to
    be deleted once read (auto_delete_input_file, which the simulator's /v1 path does not assume)."""
    monkeypatch.setenv("ZHIPU_API_KEY", "sk-provider-test-0123456789")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-provider-test-0123456789")
    sim = start_sim(batch_speed=0)
    job = make_job(sim, rows=ROWS, mode="batch_api",
                   model={"provider": provider, "base_url": sim.url.removesuffix("/v1") + path})
    assert run_cli("run", job)[0] == EXIT_BATCHES_LIVE
    (made,) = batches(sim)
    endpoint = "/v4/chat/completions" if zhipu_dialect else "/v1/chat/completions"
    assert made["endpoint"] == endpoint
    with urllib.request.urlopen(f"{sim.url}/files/{made['input_file_id']}/content") as answer:
        assert {json.loads(line)["url"] for line in answer.read().splitlines()} == {endpoint}
    sim.advance(3600)
    assert batches(sim)[0]["status"] == "completed"
    assert (made["input_file_id"] in files_kept(sim)) == (not zhipu_dialect and path == "/v1")
    assert run_cli("run", job)[0] == 0
