"""The simulator's Batch API over real HTTP: the openai SDK on /v1, plain aiohttp on Zhipu's /api/paas/v4.

The batch clock is stopped (batch_speed=0) unless a test says otherwise: only POST /_batches/advance moves
it, so each state is observed deterministically.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai
import pytest

from batch.simulator import SimConfig, Simulator, SimulatorThread, completion_for, main

MODEL = "glm-4-flash"


@dataclass
class Served:
    sim: Simulator
    url: str  # .../v1
    root: str  # http://host:port
    client: openai.AsyncOpenAI
    http: aiohttp.ClientSession

    async def advance(self, seconds: float) -> dict[str, Any]:
        async with self.http.post(self.root + "/_batches/advance", json={"seconds": seconds}) as resp:
            assert resp.status == 200
            return await resp.json()

    async def stats(self) -> dict[str, Any]:
        async with self.http.get(self.root + "/_stats") as resp:
            return (await resp.json())["batch_api"]


@contextlib.asynccontextmanager
async def serve(**config: Any) -> AsyncIterator[Served]:
    sim = Simulator(SimConfig(**{"batch_speed": 0, **config}))
    url = await sim.start()
    try:
        async with aiohttp.ClientSession() as http, openai.AsyncOpenAI(
                base_url=url, api_key="test-key", max_retries=0) as client:
            yield Served(sim, url, url.removesuffix("/v1"), client, http)
    finally:
        await sim.stop()


def line(custom_id: str, prompt: str, url: str = "/v1/chat/completions", model: str = MODEL,
         **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url,
            "body": {"model": model, "messages": [{"role": "user", "content": prompt}], **body}}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines).encode()


def parse_jsonl(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(x) for x in data.decode().splitlines()]


async def submit(s: Served, lines: list[dict[str, Any]], **create: Any) -> Any:
    uploaded = await s.client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    return await s.client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                         completion_window="24h", **create)


@pytest.mark.asyncio
async def test_upload_create_retrieve_download_cycle_with_the_openai_sdk() -> None:
    lines = [line(f"row-{i:04d}", f"review number {i}", max_tokens=64) for i in range(20)]
    async with serve(batch_rate=10, batch_validating_s=2, batch_finalizing_s=3) as s:
        uploaded = await s.client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
        assert uploaded.id.startswith("file-") and uploaded.purpose == "batch"
        assert uploaded.bytes == len(jsonl(lines)) and uploaded.filename == "in.jsonl"
        assert (await s.client.files.retrieve(uploaded.id)).bytes == uploaded.bytes
        assert (await s.client.files.content(uploaded.id)).content == jsonl(lines)

        batch = await s.client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                              completion_window="24h", metadata={"job": "abc", "file": "1"})
        assert batch.id.startswith("batch_") and batch.status == "validating"
        assert batch.metadata == {"job": "abc", "file": "1"} and batch.input_file_id == uploaded.id
        assert batch.expires_at == batch.created_at + 86400

        await s.advance(1.9)
        assert (await s.client.batches.retrieve(batch.id)).status == "validating"
        await s.advance(0.1 + 0.5)  # validated at 2 s, then 5 lines at 10 per second
        batch = await s.client.batches.retrieve(batch.id)
        assert batch.status == "in_progress" and batch.in_progress_at is not None
        assert batch.request_counts.model_dump() == {"total": 20, "completed": 5, "failed": 0}
        assert batch.output_file_id is None

        await s.advance(1.5)  # all 20 answered at 4 s after in_progress: finalizing until +3 s
        batch = await s.client.batches.retrieve(batch.id)
        assert batch.status == "finalizing" and batch.request_counts.completed == 20
        await s.advance(3)
        batch = await s.client.batches.retrieve(batch.id)
        assert batch.status == "completed" and batch.error_file_id is None
        assert batch.created_at <= batch.in_progress_at <= batch.finalizing_at <= batch.completed_at

        output = parse_jsonl((await s.client.files.content(batch.output_file_id)).content)
        assert sorted(o["custom_id"] for o in output) == [x["custom_id"] for x in lines]
        by_id = {x["custom_id"]: x for x in lines}
        for out in output:
            assert out["id"].startswith("batch_req_") and out["error"] is None
            response = out["response"]
            assert response["status_code"] == 200 and response["request_id"] == response["body"]["id"]
            body = by_id[out["custom_id"]]["body"]
            expected = completion_for(MODEL, body["messages"], 64)
            assert response["body"]["choices"][0]["message"]["content"] == expected["content"]
            assert response["body"]["usage"]["prompt_tokens"] == expected["prompt_tokens"]
            assert response["body"]["object"] == "chat.completion"

        deleted = await s.client.files.delete(batch.output_file_id)
        assert deleted.deleted and deleted.id == batch.output_file_id
        with pytest.raises(openai.NotFoundError):
            await s.client.files.content(batch.output_file_id)
        stats = await s.stats()
        assert stats["custom_ids"] == {x["custom_id"]: 1 for x in lines}
        assert stats["custom_ids_submitted_twice"] == [] and stats["by_state"] == {"completed": 1}


async def zhipu_upload(s: Served, data: bytes, purpose: str = "batch") -> tuple[int, dict[str, Any]]:
    form = aiohttp.FormData()
    form.add_field("purpose", purpose)
    form.add_field("file", data, filename="zhipu.jsonl", content_type="application/jsonl")
    async with s.http.post(s.root + "/api/paas/v4/files", data=form) as resp:
        return resp.status, await resp.json()


async def zhipu(s: Served, method: str, path: str, **kw: Any) -> tuple[int, Any]:
    async with s.http.request(method, s.root + "/api/paas/v4" + path, **kw) as resp:
        if resp.content_type == "application/json":
            return resp.status, await resp.json()
        return resp.status, await resp.read()


@pytest.mark.asyncio
async def test_zhipu_dialect_with_plain_http_deletes_the_input_file_by_default() -> None:
    lines = [line(f"zhipu-{i}", f"你好 {i}", url="/v4/chat/completions") for i in range(3)]
    async with serve(batch_rate=100) as s:
        status, uploaded = await zhipu_upload(s, jsonl(lines))
        assert status == 200 and uploaded["object"] == "file" and uploaded["bytes"] == len(jsonl(lines))
        status, batch = await zhipu(s, "POST", "/batches", json={
            "input_file_id": uploaded["id"], "endpoint": "/v4/chat/completions", "completion_window": "24h",
            "metadata": {"job": "j1"}})
        assert status == 200 and batch["status"] == "validating" and batch["request_counts"]["total"] == 3
        await s.advance(1)
        status, batch = await zhipu(s, "GET", f"/batches/{batch['id']}")
        assert batch["status"] == "in_progress" and batch["request_counts"]["completed"] == 0
        await s.advance(10)
        status, batch = await zhipu(s, "GET", f"/batches/{batch['id']}")
        assert status == 200 and batch["status"] == "completed"
        status, content = await zhipu(s, "GET", f"/files/{batch['output_file_id']}/content")
        assert status == 200
        assert sorted(o["custom_id"] for o in parse_jsonl(content)) == ["zhipu-0", "zhipu-1", "zhipu-2"]
        # auto_delete_input_file defaults to true on Zhipu's path (as Zhipu documents) ...
        status, body = await zhipu(s, "GET", f"/files/{uploaded['id']}")
        assert status == 404 and body["error"]["code"] == "1210"
        # ... and is taken when sent
        _, kept = await zhipu_upload(s, jsonl(lines))
        _, batch = await zhipu(s, "POST", "/batches", json={
            "input_file_id": kept["id"], "endpoint": "/v4/chat/completions", "completion_window": "24h",
            "auto_delete_input_file": False})
        await s.advance(10)
        assert (await zhipu(s, "GET", f"/batches/{batch['id']}"))[1]["status"] == "completed"
        assert (await zhipu(s, "GET", f"/files/{kept['id']}"))[0] == 200
        status, body = await zhipu(s, "DELETE", f"/files/{kept['id']}")
        assert status == 200 and body == {"id": kept["id"], "object": "file", "deleted": True}
        # the same three custom_ids went into two batches: the counters show it
        assert (await s.stats())["custom_ids_submitted_twice"] == ["zhipu-0", "zhipu-1", "zhipu-2"]


@pytest.mark.asyncio
async def test_output_lines_come_in_a_seeded_shuffled_order() -> None:
    lines = [line(f"row-{i:04d}", f"prompt {i}") for i in range(50)]

    async def order(seed: int) -> list[str]:
        async with serve(seed=seed) as s:
            batch = await submit(s, lines)
            await s.advance(100)
            batch = await s.client.batches.retrieve(batch.id)
            return [o["custom_id"] for o in parse_jsonl((await s.client.files.content(batch.output_file_id)).content)]

    first, again, other = await order(1), await order(1), await order(2)
    assert sorted(first) == [x["custom_id"] for x in lines]
    assert first != sorted(first)  # not the input order
    assert first == again and first != other


@pytest.mark.asyncio
async def test_markers_shape_each_line_as_online_and_failures_go_to_the_error_file() -> None:
    lines = [
        line("ok-line", "plain"),
        line("unsafe-line", "bad [[error:400:1301]]"),
        line("server-line", "oops [[error:503:1305]]"),
        line("gateway-line", "odd [[error:200:1113]]"),
        line("think-line", "deep [[think]]"),
        line("set-line", 'tokens [[set:usage.prompt_tokens="3"]]'),
        line("json-line", "label me", response_format={"type": "json_object"}),
        line("badjson-line", "label me [[badjson]]", response_format={"type": "json_object"}),
        line("flaky-line", "once [[flaky:1]]"),
        line("nochoice-line", "empty [[nochoices]]"),
        line("malformed-line", "cut [[malformed]]"),
    ]
    async with serve() as s:
        batch = await submit(s, lines)
        await s.advance(100)
        batch = await s.client.batches.retrieve(batch.id)
        assert batch.status == "completed"
        assert batch.request_counts.model_dump() == {"total": 11, "completed": 8, "failed": 3}
        output = {o["custom_id"]: o for o in parse_jsonl((await s.client.files.content(batch.output_file_id)).content)}
        errors = {o["custom_id"]: o for o in parse_jsonl((await s.client.files.content(batch.error_file_id)).content)}
    assert set(errors) == {"unsafe-line", "server-line", "flaky-line"}
    unsafe = errors["unsafe-line"]
    assert unsafe["error"] is None and unsafe["response"]["status_code"] == 400
    assert unsafe["response"]["body"]["error"]["code"] == "1301" and unsafe["response"]["request_id"]
    assert errors["server-line"]["response"]["status_code"] == 503
    assert errors["flaky-line"]["response"]["body"]["error"]["code"] == "1200"
    assert output["gateway-line"]["response"]["body"]["error"]["code"] == "1113"  # an error body in a 200
    assert output["think-line"]["response"]["body"]["choices"][0]["message"]["reasoning_content"]
    assert output["set-line"]["response"]["body"]["usage"]["prompt_tokens"] == "3"
    assert set(json.loads(output["json-line"]["response"]["body"]["choices"][0]["message"]["content"])) == {
        "label", "reply"}
    assert output["badjson-line"]["response"]["body"]["choices"][0]["message"]["content"].startswith("[glm-4-flash]")
    assert output["nochoice-line"]["response"]["body"]["choices"] == []
    assert isinstance(output["malformed-line"]["response"]["body"], str)
    assert output["ok-line"]["response"]["body"]["usage"]["total_tokens"] > 0


@pytest.mark.asyncio
async def test_flaky_line_succeeds_when_resubmitted() -> None:
    async with serve() as s:
        first = await submit(s, [line("flaky-row", "again [[flaky:1]]")])
        await s.advance(10)
        first = await s.client.batches.retrieve(first.id)
        assert first.error_file_id and first.output_file_id is None
        second = await submit(s, [line("flaky-row", "again [[flaky:1]]")])
        await s.advance(10)
        second = await s.client.batches.retrieve(second.id)
        assert second.output_file_id and second.error_file_id is None
        assert (await s.stats())["custom_ids"] == {"flaky-row": 2}


@pytest.mark.asyncio
async def test_expiry_keeps_partial_output_and_lists_the_rest_as_batch_expired() -> None:
    lines = [line(f"row-{i:04d}", f"prompt {i}") for i in range(20)]
    lines.append(line("hung-line", "never [[hang]]"))
    async with serve(batch_rate=1, batch_validating_s=1, batch_expire_s=10) as s:
        batch = await submit(s, lines)
        await s.advance(9.5)  # in progress since 1 s: 8 lines answered
        batch = await s.client.batches.retrieve(batch.id)
        assert batch.status == "in_progress" and batch.request_counts.completed + batch.request_counts.failed <= 8
        await s.advance(0.5)
        batch = await s.client.batches.retrieve(batch.id)
        assert batch.status == "expired" and batch.expired_at == batch.expires_at
        output = parse_jsonl((await s.client.files.content(batch.output_file_id)).content)
        errors = parse_jsonl((await s.client.files.content(batch.error_file_id)).content)
    assert len(output) == batch.request_counts.completed and batch.request_counts.failed == 0
    assert len(output) in (8, 9)  # 9 positions done; one of them may be the hung line
    assert all(e["response"] is None and e["error"]["code"] == "batch_expired" for e in errors)
    assert "hung-line" in {e["custom_id"] for e in errors}
    assert sorted([o["custom_id"] for o in output] + [e["custom_id"] for e in errors]) == sorted(
        x["custom_id"] for x in lines)


@pytest.mark.asyncio
async def test_a_hung_line_keeps_the_batch_in_progress_until_it_expires() -> None:
    async with serve(batch_expire_s=100) as s:
        batch = await submit(s, [line("fine-line", "fine"), line("hung-line", "never [[hang]]")])
        await s.advance(99)
        assert (await s.client.batches.retrieve(batch.id)).status == "in_progress"
        await s.advance(1)
        batch = await s.client.batches.retrieve(batch.id)
        assert batch.status == "expired" and batch.request_counts.completed == 1
        errors = parse_jsonl((await s.client.files.content(batch.error_file_id)).content)
        assert [e["custom_id"] for e in errors] == ["hung-line"]


@pytest.mark.asyncio
async def test_cancel_finishes_the_in_flight_lines_and_keeps_partial_output() -> None:
    lines = [line(f"row-{i:04d}", f"prompt {i}") for i in range(20)]
    async with serve(batch_rate=1, batch_validating_s=1, batch_cancelling_s=2) as s:
        batch = await submit(s, lines)
        await s.advance(6)  # 5 lines answered
        batch = await s.client.batches.cancel(batch.id)
        assert batch.status == "cancelling" and batch.cancelling_at is not None
        assert batch.request_counts.completed == 5
        assert (await s.client.batches.cancel(batch.id)).status == "cancelling"  # a second cancel is harmless
        await s.advance(1)
        batch = await s.client.batches.retrieve(batch.id)
        assert batch.status == "cancelling" and batch.request_counts.completed == 6
        await s.advance(1)
        batch = await s.client.batches.retrieve(batch.id)
        assert batch.status == "cancelled" and batch.cancelled_at is not None
        assert batch.request_counts.completed == 7 and batch.error_file_id is None
        output = parse_jsonl((await s.client.files.content(batch.output_file_id)).content)
        assert len(output) == 7
        await s.advance(100)  # nothing more happens to a cancelled batch
        assert (await s.client.batches.retrieve(batch.id)).request_counts.completed == 7
        with pytest.raises(openai.BadRequestError, match="cancelled"):
            await s.client.batches.cancel(batch.id)


@pytest.mark.asyncio
async def test_cancel_while_validating_answers_nothing() -> None:
    async with serve() as s:
        batch = await submit(s, [line("row-0001", "a")])
        batch = await s.client.batches.cancel(batch.id)
        assert batch.status == "cancelling"
        await s.advance(5)
        batch = await s.client.batches.retrieve(batch.id)
        assert batch.status == "cancelled" and batch.in_progress_at is None
        assert batch.output_file_id is None and batch.error_file_id is None
        assert batch.request_counts.completed == 0


@pytest.mark.parametrize(("bad", "code"), [
    ({"custom_id": "row-0001"}, "duplicate_custom_id"),
    ({"custom_id": "r1"}, "invalid_custom_id"),
    ({"body": {"model": "glm-4-plus", "messages": [{"role": "user", "content": "x"}]}}, "mismatched_model"),
    ({"url": "/v4/chat/completions"}, "mismatched_endpoint"),
    ({"method": "GET"}, "invalid_method"),
    ({"body": {"model": MODEL}}, "invalid_request"),
])
@pytest.mark.asyncio
async def test_a_bad_file_fails_the_batch_with_errors_naming_the_line(bad: dict[str, Any], code: str) -> None:
    lines = [line("row-0001", "a"), line("row-0002", "b")]
    lines[1].update(bad)
    async with serve(batch_validating_s=3) as s:
        batch = await submit(s, lines)
        assert batch.status == "validating"
        await s.advance(3)
        batch = await s.client.batches.retrieve(batch.id)
        assert batch.status == "failed" and batch.failed_at is not None and batch.output_file_id is None
        assert [(e.code, e.line) for e in batch.errors.data] == [(code, 2)]
        assert (await s.stats())["custom_ids"] == {}  # nothing of a failed file was submitted


@pytest.mark.asyncio
async def test_a_line_that_is_not_json_and_an_empty_file_fail_the_batch() -> None:
    async with serve() as s:
        uploaded = await s.client.files.create(file=("in.jsonl", jsonl([line("row-0001", "a")]) + b"{oops\n"),
                                               purpose="batch")
        broken = await s.client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                               completion_window="24h")
        empty = await s.client.files.create(file=("in.jsonl", b"\n"), purpose="batch")
        nothing = await s.client.batches.create(input_file_id=empty.id, endpoint="/v1/chat/completions",
                                                completion_window="24h")
        await s.advance(5)
        broken = await s.client.batches.retrieve(broken.id)
        assert broken.status == "failed"
        assert [(e.code, e.line) for e in broken.errors.data] == [("invalid_json_line", 2)]
        nothing = await s.client.batches.retrieve(nothing.id)
        assert nothing.status == "failed" and nothing.errors.data[0].code == "empty_file"


@pytest.mark.asyncio
async def test_create_refuses_bad_parameters_and_oversized_files() -> None:
    async with serve(batch_max_lines=3, batch_max_bytes=2000) as s:
        small = await s.client.files.create(file=("in.jsonl", jsonl([line("row-0001", "a")])), purpose="batch")
        refusals = [
            dict(input_file_id=small.id, endpoint="/v1/embeddings", completion_window="24h"),
            dict(input_file_id=small.id, endpoint="/v1/chat/completions", completion_window="48h"),
            dict(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h"),
            dict(input_file_id=small.id, endpoint="/v1/chat/completions", completion_window="24h",
                 metadata={f"k{i}": "v" for i in range(17)}),
        ]
        for params in refusals:
            with pytest.raises(openai.BadRequestError) as caught:
                await s.client.batches.create(**params)
            assert caught.value.body["code"] == "1210"
        four = await s.client.files.create(
            file=("in.jsonl", jsonl([line(f"row-000{i}", "a") for i in range(4)])), purpose="batch")
        with pytest.raises(openai.BadRequestError, match="4 lines; at most 3"):
            await s.client.batches.create(input_file_id=four.id, endpoint="/v1/chat/completions",
                                          completion_window="24h")
        big = await s.client.files.create(file=("in.jsonl", jsonl([line("row-0001", "x" * 3000)])), purpose="batch")
        with pytest.raises(openai.BadRequestError, match="at most 2000 per batch"):
            await s.client.batches.create(input_file_id=big.id, endpoint="/v1/chat/completions",
                                          completion_window="24h")
        assert (await s.stats())["batches_created"] == 0


@pytest.mark.asyncio
async def test_the_file_cap_refuses_uploads_until_files_are_deleted() -> None:
    async with serve(batch_max_files=2) as s:
        first = await s.client.files.create(file=("a.jsonl", jsonl([line("row-0001", "a")])), purpose="batch")
        await s.client.files.create(file=("b.jsonl", jsonl([line("row-0001", "a")])), purpose="batch")
        with pytest.raises(openai.BadRequestError, match="at most 2 files") as caught:
            await s.client.files.create(file=("c.jsonl", jsonl([line("row-0001", "a")])), purpose="batch")
        assert caught.value.body["code"] == "1210"
        await s.client.files.delete(first.id)
        await s.client.files.create(file=("c.jsonl", jsonl([line("row-0001", "a")])), purpose="batch")
        assert len((await s.client.files.list()).data) == 2
        status, body = await zhipu_upload(s, b"", purpose="fine-tune")
        assert status == 400 and body["error"]["code"] == "1210"


@pytest.mark.asyncio
async def test_concurrent_uploads_cannot_overshoot_the_file_cap() -> None:
    async with serve(batch_max_files=2) as s:
        data = jsonl([line(f"row-{i:04d}", "x" * 200) for i in range(2000)])  # big enough to arrive in chunks
        results = await asyncio.gather(*(zhipu_upload(s, data) for _ in range(5)))
        assert sorted(status for status, _ in results) == [200, 200, 400, 400, 400]
        assert (await s.stats())["files_kept"] == 2


@pytest.mark.asyncio
async def test_arrears_refuse_create_with_1113() -> None:
    async with serve(batch_arrears_after=1) as s:
        await submit(s, [line("row-0001", "a")])
        with pytest.raises(openai.RateLimitError) as caught:
            await submit(s, [line("row-0002", "b")])
        assert caught.value.status_code == 429 and caught.value.body["code"] == "1113"
        assert (await s.stats())["custom_ids"] == {"row-0001": 1}


@pytest.mark.asyncio
async def test_poll_faults_hit_retrieve_list_and_download_but_not_create() -> None:
    async with serve(batch_p_poll_500=1.0) as s:
        batch = await submit(s, [line("row-0001", "a")])
        with pytest.raises(openai.InternalServerError) as caught:
            await s.client.batches.retrieve(batch.id)
        assert caught.value.body["code"] == "1200"
        with pytest.raises(openai.InternalServerError):
            await s.client.batches.list()
        with pytest.raises(openai.InternalServerError):
            await s.client.files.content(batch.input_file_id)
        assert (await s.stats())["poll_faults"] == 3
    async with serve(batch_p_poll_503=0.5, seed=3) as s:
        batch = await submit(s, [line("row-0001", "a")])
        outcomes = []
        for _ in range(40):
            try:
                await s.client.batches.retrieve(batch.id)
                outcomes.append(200)
            except openai.InternalServerError as exc:
                assert exc.status_code == 503 and exc.body["code"] == "1305"
                outcomes.append(503)
        assert 200 in outcomes and 503 in outcomes


@pytest.mark.asyncio
async def test_list_is_newest_first_and_pages_with_after() -> None:
    async with serve() as s:
        ids = [(await submit(s, [line(f"row-000{i}", "a")], metadata={"n": str(i)})).id for i in range(5)]
        page = await s.client.batches.list(limit=2)
        assert [b.id for b in page.data] == ids[::-1][:2] and page.has_more
        async with s.http.get(s.url + "/batches", params={"limit": "2", "after": ids[3]}) as resp:
            body = await resp.json()
        assert [b["id"] for b in body["data"]] == [ids[2], ids[1]]
        assert body["first_id"] == ids[2] and body["last_id"] == ids[1] and body["has_more"] is True
        assert [b.id async for b in s.client.batches.list(limit=2)] == ids[::-1]  # the SDK's own paging
        async with s.http.get(s.url + "/batches", params={"limit": "500"}) as resp:
            assert resp.status == 400


@pytest.mark.asyncio
async def test_deleting_the_input_file_mid_batch_does_not_break_it() -> None:
    async with serve(batch_rate=1) as s:
        batch = await submit(s, [line(f"row-000{i}", "a") for i in range(4)])
        await s.advance(2)
        await s.client.files.delete(batch.input_file_id)
        await s.advance(10)
        batch = await s.client.batches.retrieve(batch.id)
        assert batch.status == "completed" and batch.request_counts.completed == 4


@pytest.mark.asyncio
async def test_forgotten_files_and_batches_answer_404_and_a_restart_forgets_everything() -> None:
    async with serve(batch_rate=1) as s:
        first = await submit(s, [line("row-0001", "a")])
        second = await submit(s, [line("row-0002", "b")])
        await s.advance(5)
        async with s.http.post(s.root + "/_batches/forget", json={"ids": [first.id]}) as resp:
            assert resp.status == 200 and (await resp.json())["forgotten"] == [first.id]
        with pytest.raises(openai.NotFoundError):
            await s.client.batches.retrieve(first.id)
        done = await s.client.batches.retrieve(second.id)
        assert done.status == "completed"
        async with s.http.post(s.root + "/_batches/forget", json={"ids": [done.output_file_id]}) as resp:
            assert resp.status == 200
        with pytest.raises(openai.NotFoundError):
            await s.client.files.content(done.output_file_id)
        async with s.http.post(s.root + "/_batches/forget") as resp:  # no body: a restart that lost its state
            assert resp.status == 200
        assert [b async for b in s.client.batches.list()] == [] and (await s.stats())["files_kept"] == 0
        async with s.http.post(s.root + "/_batches/forget", json={"ids": "all"}) as resp:
            assert resp.status == 400


@pytest.mark.asyncio
async def test_result_downloads_cut_short_or_torn_then_whole_and_an_output_file_hidden_from_polls() -> None:
    async with serve(batch_short_downloads=1, batch_torn_downloads=1, batch_hide_output_polls=1) as s:
        batch = await submit(s, [line(f"row-{i:04d}", f"review {i}") for i in range(6)])
        await s.advance(60)
        hidden = await s.client.batches.retrieve(batch.id)
        assert hidden.status == "completed" and hidden.request_counts.completed == 6 and hidden.output_file_id is None
        done = await s.client.batches.retrieve(batch.id)
        whole = (await s.client.files.retrieve(done.output_file_id)).bytes
        short = (await s.client.files.content(done.output_file_id)).content
        torn = (await s.client.files.content(done.output_file_id)).content
        full = (await s.client.files.content(done.output_file_id)).content
        assert len(full) == whole and len(parse_jsonl(full)) == 6
        assert short.endswith(b"\n") and len(parse_jsonl(short)) == 3 and full.startswith(short)
        assert not torn.endswith(b"\n") and torn.startswith(short) and len(short) < len(torn) < len(full)
        stats = await s.stats()
        assert (stats["cut_downloads"], stats["hidden_outputs"]) == (2, 1)
        assert (await s.client.files.content(batch.input_file_id)).content.count(b"\n") == 6  # inputs never cut


@pytest.mark.asyncio
async def test_batch_objects_without_metadata() -> None:
    async with serve(batch_no_metadata=True) as s:
        made = await submit(s, [line("row-0001", "a")], metadata={"job": "abc"})
        assert made.metadata is None and made.input_file_id is not None
        assert [b.metadata async for b in s.client.batches.list()] == [None]


@pytest.mark.asyncio
async def test_a_key_is_required_when_configured() -> None:
    async with serve(api_key="right-key") as s:
        with pytest.raises(openai.AuthenticationError):
            await s.client.batches.list()
        status, body = await zhipu(s, "GET", "/batches", headers={"Authorization": "Bearer right-key"})
        assert status == 200 and body["data"] == []


@pytest.mark.asyncio
async def test_the_clock_also_runs_with_real_time() -> None:
    async with serve(batch_speed=1000, batch_validating_s=1, batch_finalizing_s=1) as s:
        batch = await submit(s, [line("row-0001", "a")])
        for _ in range(10_000):  # polls until done: about 2 ms of real time at this speed
            batch = await s.client.batches.retrieve(batch.id)
            if batch.status == "completed":
                break
        assert batch.status == "completed"


@pytest.mark.asyncio
async def test_advance_rejects_a_negative_step() -> None:
    async with serve() as s, s.http.post(s.root + "/_batches/advance", json={"seconds": -1}) as resp:
        assert resp.status == 400


def test_the_command_line_takes_the_batch_settings(capsys: pytest.CaptureFixture[str]) -> None:
    script = f"""
import os, openai
client = openai.OpenAI(base_url=os.environ["BATCH_SIMULATOR_URL"], api_key="k", max_retries=0)
uploaded = client.files.create(file=("a.jsonl", {jsonl([line("row-0001", "a")])!r}), purpose="batch")
try:
    client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
except openai.RateLimitError as exc:
    raise SystemExit(0 if exc.body["code"] == "1113" else 1)
raise SystemExit(2)
"""
    assert main(["--port", "0", "--batch-speed", "0", "--batch-arrears-after", "0",
                 "--", sys.executable, "-c", script]) == 0


@pytest.mark.asyncio
async def test_the_openai_sdk_speaks_the_zhipu_prefix_with_extra_body() -> None:
    async with serve() as s, openai.AsyncOpenAI(base_url=s.root + "/api/paas/v4", api_key="k", max_retries=0) as zai:
        uploaded = await zai.files.create(file=("in.jsonl", jsonl([line("row-0001", "a", url="/v4/chat/completions")])),
                                          purpose="batch")
        batch = await zai.batches.create(input_file_id=uploaded.id, endpoint="/v4/chat/completions",  # type: ignore[arg-type]
                                         completion_window="24h", extra_body={"auto_delete_input_file": False})
        await s.advance(10)
        batch = await zai.batches.retrieve(batch.id)
        assert batch.status == "completed" and batch.endpoint == "/v4/chat/completions"
        assert (await zai.files.retrieve(uploaded.id)).id == uploaded.id  # kept, as asked
        assert [b.id async for b in zai.batches.list()] == [batch.id]


def test_a_new_batch_speed_applies_from_then_on_and_never_moves_the_past() -> None:
    with SimulatorThread(SimConfig(batch_speed=1000)) as sim:
        client = openai.OpenAI(base_url=sim.url, api_key="k", max_retries=0)
        uploaded = client.files.create(file=("in.jsonl", jsonl([line("row-0001", "a")])), purpose="batch")
        first = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        for _ in range(10_000):  # about 2 ms of real time at this speed
            first = client.batches.retrieve(first.id)
            if first.status == "completed":
                break
        assert first.status == "completed"
        sim.reconfigure(batch_speed=0)  # the clock stops where it is ...
        uploaded = client.files.create(file=("in.jsonl", jsonl([line("row-0002", "a")])), purpose="batch")
        second = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                       completion_window="24h")
        assert second.created_at >= first.completed_at  # ... rather than jumping back to its origin
        sim.advance(0.5)
        assert client.batches.retrieve(second.id).status == "validating"  # stopped: only advance moves it
        sim.advance(0.5)
        assert client.batches.retrieve(second.id).status == "in_progress"
