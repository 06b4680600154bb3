"""A spending limit for the whole job (all runs together), kept before money is spent.

Each request reserves the most it can cost before it is sent: its prompt at its token bound
(prompts.prompt_token_bound: UTF-8 bytes plus a per-message overhead, which no byte-level BPE
tokenizer exceeds) and an answer as long as max_tokens allows. A reservation that does not fit beside
the ones in flight waits for them to settle to what they really cost; the limit is reached only when
the next reservation does not fit with nothing in flight. So the limit holds with every request in
flight coming back at its worst, and a job spends up to the last request that could fit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from batch.pricing import CURRENCY, Pricer, money, worst_cost
from batch.records import Record, billed
from batch.wording import counted

if TYPE_CHECKING:
    from batch.plan import BudgetLimits
    from batch.shared.spend import SharedSpend

log = logging.getLogger("batch")

SHARED_POLL_S = 0.05  # how often a hold the shared budget refused asks again (other processes' settles are not told)


@dataclass(frozen=True)
class Hold:
    cost: float
    tokens: int
    key: str | None = None  # with limits.shared: the hold's id in Redis (batch/shared/spend.py)


class Budget:
    """`max_tokens` and `pricer` as the preflight resolved them (it refuses a budget without either)."""

    def __init__(self, limits: BudgetLimits, max_tokens: int, pricer: Pricer | None, spent_cost: float,
                 spent_tokens: int, shared: SharedSpend | None = None) -> None:
        """`shared`: the job's budget as every process running it holds and spends it (limits.shared)."""
        self.max_cost = limits.max_cost
        self.max_tokens_total = limits.max_total_tokens
        self.max_tokens = max_tokens
        self.pricer = pricer  # what a hold is reserved at: a run's online phase after its Batch API one sets it
        self.spent_cost = spent_cost
        self.spent_tokens = spent_tokens
        self.held_cost = 0.0
        self.held_tokens = 0
        # Of what is held: the worst case of the rows in live Batch API batches. Paid for or not, it is the
        # provider's to answer, after this process too: with `shared`, it is told as spent by this checkpoint.
        self.live_cost = 0.0
        self.live_tokens = 0
        self.in_flight = 0
        self.reached = False
        self._settled = asyncio.Event()
        self._waiting: deque[object] = deque()  # the reservations waiting, in the order they asked
        self._warned_usage = False
        self.shared = shared
        if shared is not None:
            shared.publish(self._committed())

    def worst_case(self, prompt_bound: int) -> Hold:
        """The most a request with a prompt of at most `prompt_bound` tokens can cost."""
        cost = worst_cost(self.pricer, prompt_bound, self.max_tokens) if self.pricer is not None else 0.0
        return Hold(cost, prompt_bound + self.max_tokens)

    async def reserve(self, prompt_bound: int) -> Hold | None:
        """Hold a request's worst case, waiting for requests in flight to settle if it does not fit beside
        them; None when it cannot fit even with nothing in flight (the budget is reached).

        Rows reserve in the order they ask (there are more row tasks than requests in flight): a later,
        smaller row does not slip past one that waits, so the rows a budget pays for are the first ones."""
        hold = self.worst_case(prompt_bound)
        if self._waiting or not self._fits(hold) or self.shared is not None:
            turn = object()
            self._waiting.append(turn)
            try:
                while True:
                    if self._waiting[0] is turn and self._fits(hold):
                        if self.shared is None:
                            break
                        mine = (self.spent_cost + self.held_cost, self.spent_tokens + self.held_tokens)
                        verdict, key = await self.shared.hold(hold.cost, hold.tokens, self.max_cost,
                                                              self.max_tokens_total, mine)
                        if verdict.taken:
                            hold = Hold(hold.cost, hold.tokens, key)
                            break
                        if verdict.holds == 0 and self.in_flight == 0:  # no process holds any: nothing will settle
                            self.reached = True
                            return None
                        # Another process's settle is not announced: look again after a while, or at one of ours.
                        self._settled.clear()
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._settled.wait(), SHARED_POLL_S)
                        continue
                    if self._waiting[0] is turn and self.in_flight == 0:
                        self.reached = True
                        return None
                    # No await between the checks above and clear(): a settle cannot slip in between.
                    self._settled.clear()
                    await self._settled.wait()
            finally:
                self._waiting.remove(turn)
                self._settled.set()  # the next in line looks again
        self.held_cost += hold.cost
        self.held_tokens += hold.tokens
        self.in_flight += 1
        return hold

    async def take(self, hold: Hold, file: str) -> bool:
        """Hold `hold` for a row of the Batch API file `file` (its name) now, if it fits beside what is spent and
        held, without waiting for anything to settle (the Batch API reserves a file's rows before submitting it);
        False when it does not. With `shared`, in one hold of the file's in Redis, beside every process's."""
        if not self._fits(hold):
            return False
        if self.shared is not None:
            mine = (self.spent_cost + self.held_cost, self.spent_tokens + self.held_tokens)
            verdict, _ = await self.shared.hold(hold.cost, hold.tokens, self.max_cost, self.max_tokens_total, mine,
                                                growing=file)
            if not verdict.taken:
                return False
        self.held_cost += hold.cost
        self.held_tokens += hold.tokens
        return True

    def submit(self, file: str, hold: Hold) -> None:
        """The Batch API file `file`, holding `hold` (what `take` held for its rows), is in the ledger, to be sent:
        its hold is now a live batch's, which outlives this process (with `shared`, told as this checkpoint's
        spending, and the file's hold in Redis ended)."""
        self.live_cost += hold.cost
        self.live_tokens += hold.tokens
        if self.shared is not None:
            self.shared.settle(self.shared.key_of(file), self._committed())

    def hold_live(self, hold: Hold) -> None:
        """A live batch of an earlier run, holding `hold`: held whether it fits or not (it was sent)."""
        self.held_cost += hold.cost
        self.held_tokens += hold.tokens
        self.live_cost += hold.cost
        self.live_tokens += hold.tokens
        if self.shared is not None:
            self.shared.publish(self._committed())

    def give_back(self, hold: Hold) -> None:
        """Release what a live batch held (its answers are counted one by one, by `count`), once it has ended."""
        self.held_cost -= hold.cost
        self.held_tokens -= hold.tokens
        self.live_cost -= hold.cost
        self.live_tokens -= hold.tokens
        if self.shared is not None:
            self.shared.publish(self._committed())

    def _committed(self) -> tuple[float, int]:
        """What this process has spent, or sent to be answered in live batches: what it tells the shared budget it
        has spent (a live batch's hold is not this run's to renew: it is the provider's until the batch ends)."""
        return self.spent_cost + self.live_cost, self.spent_tokens + self.live_tokens

    def _fits(self, hold: Hold) -> bool:
        if self.max_cost is not None and self.spent_cost + self.held_cost + hold.cost > self.max_cost:
            return False
        return self.max_tokens_total is None or self.spent_tokens + self.held_tokens + hold.tokens <= \
            self.max_tokens_total

    def spend(self, hold: Hold, paid: dict[str, Any]) -> tuple[float, int]:
        """Count at once an answer that came under `hold` but was judged a failure (`paid`: its PAID_FIELDS, a
        count it lacks taken at the hold's worst case), so other rows see it before the row is settled; the cost
        and tokens counted, which `settle` is given back."""
        cost = hold.cost if paid["cost"] is None else paid["cost"]
        tokens = hold.tokens if paid["total_tokens"] is None else paid["total_tokens"]
        self.spent_cost += cost
        self.spent_tokens += tokens
        if self.shared is not None:
            self.shared.publish(self._committed())
        return cost, tokens

    def still_fits(self) -> bool:
        """Whether what is spent and held is within the limits: a request held for may be sent (again)."""
        return (self.max_cost is None or self.spent_cost + self.held_cost <= self.max_cost) and \
            (self.max_tokens_total is None or self.spent_tokens + self.held_tokens <= self.max_tokens_total)

    def settle(self, hold: Hold, record: Record | None, counted: tuple[float, int] = (0.0, 0)) -> None:
        """Release a hold and count what its request really cost: `record` is its answer, or None when no
        answer came (an error answer is not billed). An answer without usage counts as its worst case.
        `counted`: the cost and tokens `spend` counted already, which the record's sums include."""
        self.held_cost -= hold.cost
        self.held_tokens -= hold.tokens
        self.in_flight -= 1
        self._settled.set()
        if record is not None and billed(record):
            cost, tokens = self._cost_of(hold, record)
            cost, tokens = max(cost, counted[0]), max(tokens, counted[1])
            self.spent_cost += cost - counted[0]
            self.spent_tokens += tokens - counted[1]
            _keep_worst_case(record, cost, tokens)
        elif record is not None:  # what `spend` counted stays counted: it was paid
            _keep_worst_case(record, counted[0], counted[1])
        if self.shared is not None and hold.key is not None:
            self.shared.settle(hold.key, self._committed())

    def count(self, worst: Hold, record: Record) -> None:
        """Count what a Batch API answer cost (its batch's hold is given back whole); one without usage counts as
        `worst`, its row's worst case (an error answer is not billed)."""
        if billed(record):
            cost, tokens = self._cost_of(worst, record)
            self.spent_cost += cost
            self.spent_tokens += tokens
            _keep_worst_case(record, cost, tokens)
            if self.shared is not None:
                self.shared.publish(self._committed())

    def _cost_of(self, worst: Hold, record: Record) -> tuple[float, int]:
        """A billed answer's cost and tokens, each it lacks (no usage) at `worst`, with one warning a run."""
        cost, tokens = record["cost"], record["total_tokens"]
        if (tokens is None or (cost is None and self.pricer is not None)) and not self._warned_usage:
            self._warned_usage = True
            log.warning("an answer came without token usage: the budget counts it at its worst case "
                        "(%s, %s %s)", counted(worst.tokens, "token"), money(worst.cost), CURRENCY)
        return (worst.cost if cost is None else cost), (worst.tokens if tokens is None else tokens)

    def describe(self) -> str:
        parts = []
        if self.max_cost is not None:
            parts.append(f"spent {money(self.spent_cost)} of max_cost {money(self.max_cost)} {CURRENCY}")
        if self.max_tokens_total is not None:
            parts.append(f"used {self.spent_tokens} of max_total_tokens {self.max_tokens_total}")
        if self.holds_live():
            held = [f"{money(self.live_cost)} {CURRENCY}" if self.max_cost is not None else "",
                    counted(self.live_tokens, "token") if self.max_tokens_total is not None else ""]
            parts.append(f"live Batch API batches hold {' and '.join(h for h in held if h)} more until they are merged")
        return "budget reached: " + ", ".join(parts) + " (the next request could exceed it)"

    def holds_live(self) -> bool:
        """Whether live Batch API batches hold part of the budget: what they do not spend is free again once they
        end, so a run that has no room beside them waits for them (exit 6), as the Batch API mode does."""
        return self.live_cost > 0 or self.live_tokens > 0


def _keep_worst_case(record: Record, cost: float, tokens: int) -> None:
    """Keep in `record` what the budget counted for it (`cost`, `tokens`) beyond the cost and tokens it knows: the
    worst case of its answers without usage, which the next run's budget then counts as this one did
    (Checkpoint.spent). The record's own cost stays what is known."""
    extra_cost, extra_tokens = cost - (record["cost"] or 0.0), tokens - (record["total_tokens"] or 0)
    record["worst_case_cost"] = extra_cost if extra_cost > 0 else None
    record["worst_case_tokens"] = extra_tokens if extra_tokens > 0 else None
