"""limits.shared's budget (batch/shared/spend.py): processes holding and spending one job's budget in a real
redis-server never cross it together, and keep to their part of what was left while Redis is away."""

from __future__ import annotations

import asyncio
import random

import pytest
from helpers import record

from batch.money.budget import Budget
from batch.plan import BudgetLimits
from batch.shared.connection import Link, open_client
from batch.shared.spend import SharedSpend

JOB = "batch:job:test"
WORST, REAL = 60, 40  # a request's worst case (a prompt bound of 10 and max_tokens 50), and what it really uses


def process_budget(url: str, name: str, max_total_tokens: int, spent: int = 0, processes: int = 2) -> Budget:
    spend = SharedSpend(Link(open_client(url), url, probe_s=0.05), JOB, f"{name}.checkpoint", name, 30,
                        lambda: processes)
    return Budget(BudgetLimits(None, max_total_tokens), 50, None, 0.0, spent, shared=spend)


async def send_rows(budget: Budget, rows: int, tasks: int = 8) -> None:
    """`rows` requests through `budget`, `tasks` at a time, each answered with REAL tokens after a moment."""
    queue = list(range(rows))

    async def worker() -> None:
        while queue:
            seq = queue.pop()
            hold = await budget.reserve(10)
            if hold is None:
                return
            await asyncio.sleep(random.uniform(0, 0.01))
            answer = record(seq)
            answer["total_tokens"] = REAL
            budget.settle(hold, answer)

    await asyncio.gather(*(worker() for _ in range(tasks)))
    await budget.shared.close()


@pytest.mark.asyncio
async def test_processes_sharing_a_budget_never_cross_it_together(redis_server):
    budgets = [process_budget(redis_server.url, f"p{k}", 2_000) for k in range(3)]
    await asyncio.gather(*(send_rows(budget, 100) for budget in budgets))
    spent = sum(budget.spent_tokens for budget in budgets)
    assert spent <= 2_000
    assert spent > 2_000 - WORST  # spent up to the last request that could fit
    assert all(budget.reached for budget in budgets)
    redis = redis_server.client()
    assert redis.zcard(f"{JOB}:holds") == 0
    assert sum(map(int, redis.hvals(f"{JOB}:spent_tokens"))) == spent


@pytest.mark.asyncio
async def test_what_a_process_spent_before_counts_for_the_others(redis_server):
    before = process_budget(redis_server.url, "p0", 1_000, spent=900)
    await before.shared.renew()  # what its checkpoint says it spent, told to Redis as its run begins
    other = process_budget(redis_server.url, "p1", 1_000)
    await send_rows(other, 10)
    # 900 + 40 + 40 spent: a third request's worst case of 60 would be over 1,000 (alone, it would have sent 10)
    assert other.spent_tokens == 2 * REAL
    await before.shared.close()


@pytest.mark.asyncio
async def test_while_redis_is_away_a_process_spends_only_its_part_of_what_was_left(redis_server):
    budget = process_budget(redis_server.url, "p0", 1_000)
    other = process_budget(redis_server.url, "p1", 1_000)
    await send_rows(other, 5)  # 200 spent elsewhere
    hold = await budget.reserve(10)  # Redis's last answer: 260 spent and held, 60 of it this process's hold
    redis_server.stop()
    answer = record(0)
    answer["total_tokens"] = REAL
    budget.settle(hold, answer)
    await send_rows(budget, 100)
    assert budget.shared.link.down
    allowance = 60 + (1_000 - 260) / 2  # its part then, and half of what was left for both
    assert budget.spent_tokens <= allowance
    assert budget.spent_tokens > allowance - WORST
    await other.shared.link.close()
    await budget.shared.link.close()
