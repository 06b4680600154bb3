"""Each provider's rules, as a job sees them: its endpoint and key, its parameter ranges, its Batch API's file
limits and dialect (its stream, schema and business-code rules: test_streaming, test_json_schema,
test_openai_strict, test_failures). And a provider added as one more value of the registry, batch.providers.PROVIDERS,
and nothing else: a job naming it validates and runs by its rules."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from batch.config import BatchApiSpec, ModelSpec, load_job
from batch.errors import EXIT_BATCHES_LIVE
from batch.preflight import preflight
from batch.providers import PROVIDERS, BatchDialect, BusinessCodes, Provider

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


@given(st.one_of(st.text(), st.integers(), st.booleans(), st.none(), st.lists(st.text(max_size=3), max_size=2)))
def test_a_provider_is_a_name_in_the_registry(name):
    if isinstance(name, str) and name in PROVIDERS:
        assert ModelSpec.model_validate({"provider": name, "name": "m"}).provider_rules is PROVIDERS[name]
        return
    with pytest.raises(ValidationError) as refused:
        ModelSpec.model_validate({"provider": name, "name": "m"})
    (error,) = refused.value.errors()
    assert error["loc"] == ("provider",) and error["msg"] == "Input should be 'zhipu', 'openai' or 'local'"


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


def sim_read(sim, path: str, key: str = "any") -> bytes:
    request = urllib.request.Request(sim.url + path, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request) as answer:
        return answer.read()


def sim_get(sim, path: str, key: str = "any") -> Any:
    return json.loads(sim_read(sim, path, key))


def files_kept(sim, key: str = "any") -> set[str]:
    return {stored["id"] for stored in sim_get(sim, "/files", key)["data"]}


def batches(sim, key: str = "any") -> list[dict[str, Any]]:
    return sim_get(sim, "/batches?limit=100", key)["data"]


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
    lines = sim_read(sim, f"/files/{made['input_file_id']}/content").splitlines()
    assert {json.loads(line)["url"] for line in lines} == {endpoint}
    sim.advance(3600)
    assert batches(sim)[0]["status"] == "completed"
    assert (made["input_file_id"] in files_kept(sim)) == (not zhipu_dialect and path == "/v1")
    assert run_cli("run", job)[0] == 0


# -- a provider added as one value --------------------------------------------------------------------------------

ACME_KEY = "sk-acme-0123456789abcdef"


def acme_at(sim) -> Provider:
    """A provider unlike the built-in ones in every rule: its own codes, ranges, schema default and Batch API."""
    return Provider(
        name="acme", label="Acme", base_url=sim.url, api_key_env="ACME_API_KEY", key_required=True,
        stream_usage_unasked=False, schema_via="prompt", strict_schema=False,
        batch_dialect=BatchDialect("/v1/chat/completions", auto_delete_input_file=True),
        batch_max_requests=4, batch_max_bytes=1_000_000,
        # Its 1302 says the model is overloaded for every caller (Zhipu's speaks of our own concurrency).
        codes=BusinessCodes(rate_limited=frozenset({1302}), overloaded=frozenset({1302}),
                            server_error=frozenset({5030}), row={4001: "content_filter"},
                            job=((range(4010, 4020), "account"),)),
        param_ranges={"temperature": (0.0, 0.5)},
    )


@pytest.fixture
def acme(start_sim, monkeypatch, tmp_path):
    """The simulator, and the provider acme at it, added to the registry for this test only (the setitem is undone
    after it): adding a provider is adding this one value."""
    sim = start_sim(api_key=ACME_KEY, keep_bodies=True, batch_speed=0)
    monkeypatch.setitem(PROVIDERS, "acme", acme_at(sim))
    monkeypatch.delenv("ACME_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    return sim


def acme_job(make_job, sim, rows=ROWS, **overrides: Any):
    model = {"provider": "acme", "base_url": None, **overrides.pop("model", {})}
    return make_job(sim, rows=rows, model=model, **overrides)


def test_a_provider_added_to_the_registry_is_checked_by_its_rules(acme, make_job, run_cli, monkeypatch):
    job = acme_job(make_job, acme)
    code, _, err = run_cli("validate", job)
    assert code == 2 and "the API key variable ACME_API_KEY is not set" in err  # its key, required
    monkeypatch.setenv("ACME_API_KEY", ACME_KEY)
    code, out, err = run_cli("validate", job)
    assert code == 0 and out.strip().endswith(f"at {acme.url}"), err  # its endpoint
    hot = acme_job(make_job, acme, model={"params": {"temperature": 0.7}})
    code, _, err = run_cli("validate", hot)
    assert code == 2 and "params.temperature 0.7 is outside Acme's range [0.0, 0.5]" in err
    big = acme_job(make_job, acme, mode="batch_api", batch_api={"max_requests_per_file": 5})
    code, _, err = run_cli("validate", big)
    assert code == 2 and "batch_api.max_requests_per_file: 5 is above the acme Batch API's limit of 4" in err
    typo = acme_job(make_job, acme, model={"provider": "acmee"})
    code, _, err = run_cli("validate", typo)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "model.provider: Input should be 'zhipu', 'openai', 'local' or 'acme' (got 'acmee')" in err


def test_a_provider_added_to_the_registry_runs_online_by_its_rules(acme, make_job, run_cli, monkeypatch):
    monkeypatch.setenv("ACME_API_KEY", ACME_KEY)
    rows = [{"review_id": "ok", "text": "fine"},
            {"review_id": "its_code", "text": "flagged [[error:400:4001]]"},  # acme's content filter
            {"review_id": "zhipus_code", "text": "flagged [[error:400:1301]]"}]  # Zhipu's, not acme's: a bad request
    schema = {"type": "object", "properties": {"score": {"type": "integer"}}, "required": ["score"]}
    job = acme_job(make_job, acme, rows=rows, output={"json_schema": schema})
    code, _, err = run_cli("run", job)
    assert code == 1, err  # rows failed, none stopped the job
    result = pd.read_parquet(job.parent / "out" / "result.parquet").set_index("review_id")
    assert result.loc["ok", "status"] == "ok" and result.loc["ok", "score"] is not None
    assert result.loc["its_code", "error_class"] == "content_filter"
    assert result.loc["zhipus_code", "error_class"] == "bad_request"
    body = acme.bodies()[0]  # the schema asked for as acme takes it: in the system prompt
    assert body["response_format"] == {"type": "json_object"}
    assert body["messages"][0]["role"] == "system" and "JSON Schema" in body["messages"][0]["content"]
    account = acme_job(make_job, acme, rows=[{"review_id": "a", "text": "[[error:429:4011]]"}],
                       output={"path": "account/result.parquet"})
    code, _, err = run_cli("run", account)
    assert code == 3 and "account" in err  # acme's job code stops the run, though it came as a 429


def test_a_provider_added_to_the_registry_pauses_every_request_on_its_overloaded_code(acme, make_job, run_cli,
                                                                                     monkeypatch):
    """With a local provider, a 1302's Retry-After delays only its own row (test_failures); acme says its 1302 is for
    every caller: nothing is sent until the pause is over."""
    monkeypatch.setenv("ACME_API_KEY", ACME_KEY)
    acme.reconfigure(retry_after=0.3, history=True)
    rows = [{"review_id": f"r{i}", "text": f"review {i}" + (" [[error:429:1302]]" if i == 0 else "")} for i in range(6)]
    job = acme_job(make_job, acme, rows=rows, limits={"concurrency": 1}, retry={"max_attempts": 2})
    code, _, err = run_cli("run", job)
    assert code == 1, err  # the marked row is refused every time, and fails as rate_limited
    history = acme.stats()["history"]
    refused = [h for h in history if h["status"] == 429]
    assert len(refused) == 2 and len(history) == len(rows) + 1
    paused = refused[0]["answered"]
    assert all(h["arrived"] >= paused + 0.3 - 0.005 for h in history if h["arrived"] > paused)


def test_a_provider_added_to_the_registry_runs_its_batch_api(acme, make_job, run_cli, monkeypatch):
    monkeypatch.setenv("ACME_API_KEY", ACME_KEY)
    rows = [{"review_id": f"r{i}", "text": f"review {i}"} for i in range(10)]
    rows[9]["text"] += " [[error:400:4001]]"  # a result line with acme's content-filter code
    job = acme_job(make_job, acme, rows=rows, mode="batch_api")
    assert run_cli("run", job)[0] == EXIT_BATCHES_LIVE
    made = batches(acme, ACME_KEY)
    assert len(made) == 3 and {batch["endpoint"] for batch in made} == {"/v1/chat/completions"}  # 4 lines a file
    inputs = {batch["input_file_id"] for batch in made}
    acme.advance(3600)
    assert {batch["status"] for batch in batches(acme, ACME_KEY)} == {"completed"}
    assert not inputs & files_kept(acme, ACME_KEY)  # auto_delete_input_file asked, on the /v1 path too
    assert run_cli("run", job)[0] == 1
    result = pd.read_parquet(job.parent / "out" / "result.parquet")
    assert list(result["status"]) == ["ok"] * 9 + ["failed"]
    assert result["error_class"].iloc[9] == "content_filter"


def test_a_providers_batch_file_limits_are_resolved_into_the_plan_not_written_into_the_job(acme, make_job,
                                                                                          monkeypatch):
    """A file size the job leaves out is the provider's limit where that is lower than the default: a value of the
    Plan, made by the preflight; the job file's values stay as written."""
    monkeypatch.setenv("ACME_API_KEY", ACME_KEY)
    spec = load_job(acme_job(make_job, acme, mode="batch_api", batch_api={"max_bytes_per_file": 500_000}))
    plan = preflight(spec)
    assert (plan.batch_api.max_requests_per_file, plan.batch_api.max_bytes_per_file) == (4, 500_000)
    assert spec.batch_api == BatchApiSpec(max_bytes_per_file=500_000) and plan.spec is spec


def test_a_provider_added_to_the_registry_judges_its_batch_calls_by_its_codes(acme, make_job, run_cli, monkeypatch):
    """A batch create refused with Zhipu's 1113 (arrears, an account code to Zhipu's table) as a 429: acme's table
    does not know 1113, so acme's job is stopped by the status alone (a 429 without a rate-limit code: quota)."""
    monkeypatch.setenv("ACME_API_KEY", ACME_KEY)
    acme.reconfigure(batch_arrears_after=0)
    job = acme_job(make_job, acme, mode="batch_api")
    code, _, err = run_cli("run", job)
    assert code == 3 and "quota: HTTP 429 code 1113" in err, err
