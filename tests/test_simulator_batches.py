"""The simulator's Batch API over real HTTP: the openai SDK on /v1, plain aiohttp on Zhipu's /api/paas/v4.

The batch clock is stopped (batch_speed=0) in every test: only POST /_batches/advance moves it, so each
state is observed deterministically.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai
import pytest

from batch.simulator import SimConfig, Simulator, completion_for

MODEL = "glm-4-flash"
pytestmark = pytest.mark.asyncio


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
