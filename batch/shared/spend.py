"""The budget's holds and spending shared by every process of one job (`limits.shared`), as counters in Redis.

A process holds a request's worst case before sending it (batch/money/budget.py). With limits.shared the hold is
taken in Redis too, by one Lua script (atomic there) that drops the expired holds, adds up what every process of
the job has spent and holds, and adds the new hold only if it fits under `budget.max_cost` and
`budget.max_total_tokens`: the processes never together cross the budget. What a process has spent is one field
per checkpoint, written whole (its checkpoint's spend plus this run's), so a process started again replaces its
number instead of adding it twice. A hold expires unless renewed (with the leases, every third of
`limits.shared_lease_s`): a process killed gives its holds back. A Batch API file holds its rows in one hold that
grows row by row (HOLD takes a hold's whole, so a renewed or lost one is set right); once the file is in the ledger,
its hold ends and its worst case is told as the checkpoint's spending until its batch is merged (money/budget.py), so
a batch still live after its process exits keeps its part of the budget.

An outage (batch/shared/connection.py's Link): a process keeps to its part of what was left at Redis's last
answer: what it had spent and held then, plus the budget left for everyone then over N processes. So the
processes together stay under the budget while Redis is away too. Back on the link, a process gives Redis its
spending and its holds before it holds more.

What a Redis that lost its data (restarted without persistence) cannot get back is the spending of a process that
has ended: run the Redis of a shared budget with persistence (its default RDB snapshots, or AOF).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass

from batch.shared.connection import LUA_NOW, REDIS_ERRORS, Link

# The scripts' head: `now`, and sum(key), the total of a hash's values.
_HEAD = LUA_NOW + """
local function sum(key)
  local total = 0
  for _, value in ipairs(redis.call('HVALS', key)) do total = total + tonumber(value) end
  return total
end
"""

# KEYS: holds (id -> expiry), hold cost, hold tokens, spent cost, spent tokens (by checkpoint).
# ARGV: now ms (negative: Redis's clock), TTL ms, the hold's id, its cost, its tokens, max cost, max tokens (negative:
# no limit). The cost and tokens are the hold's whole, after it grows: a hold of an id held already grows to them (a
# Batch API file's one hold grows row by row), by what they add to what Redis holds for it (none, if it lost it).
# Returns {taken (1 or 0), holds after, cost spent and held, tokens spent and held} (numbers as text: Redis would
# cut a Lua number to an integer).
HOLD = _HEAD + """
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
  redis.call('HDEL', KEYS[2], id)
  redis.call('HDEL', KEYS[3], id)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local cost, tokens = sum(KEYS[2]) + sum(KEYS[4]), sum(KEYS[3]) + sum(KEYS[5])
local add_cost = tonumber(ARGV[4]) - tonumber(redis.call('HGET', KEYS[2], ARGV[3]) or '0')
local add_tokens = tonumber(ARGV[5]) - tonumber(redis.call('HGET', KEYS[3], ARGV[3]) or '0')
local max_cost, max_tokens = tonumber(ARGV[6]), tonumber(ARGV[7])
if (max_cost >= 0 and cost + add_cost > max_cost) or (max_tokens >= 0 and tokens + add_tokens > max_tokens) then
  return {0, redis.call('ZCARD', KEYS[1]), string.format('%.17g', cost), string.format('%.17g', tokens)}
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
redis.call('HSET', KEYS[3], ARGV[3], ARGV[5])
return {1, redis.call('ZCARD', KEYS[1]), string.format('%.17g', cost + add_cost),
        string.format('%.17g', tokens + add_tokens)}
"""

# KEYS: as HOLD's. ARGV: now ms, TTL ms, the checkpoint, its cost spent, its tokens spent, then the holds ended
# (ids), "--", then the holds still held (id, cost, tokens each: renewed, or added back to a Redis that lost them).
SETTLE = _HEAD + """
redis.call('HSET', KEYS[4], ARGV[3], ARGV[4])
redis.call('HSET', KEYS[5], ARGV[3], ARGV[5])
local i = 6
while ARGV[i] ~= '--' do
  redis.call('ZREM', KEYS[1], ARGV[i])
  redis.call('HDEL', KEYS[2], ARGV[i])
  redis.call('HDEL', KEYS[3], ARGV[i])
  i = i + 1
end
i = i + 1
while i + 2 <= #ARGV do
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[i])
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 2])
  i = i + 3
end
return 1
"""


OUTAGE = "this process spends only its part of the budget left when Redis last answered"


@dataclass(frozen=True)
class Verdict:
    """What the shared budget said of a hold: taken or not, and how many holds the job has (0 and not taken: the
    budget is reached for every process)."""

    taken: bool
    holds: int


class SharedSpend:
    """One process's side of the job's shared budget (see the module's doc). `hold` takes a hold; `settle` ends
    one and says what this process has spent in all, `publish` says only that (both sent in the background, in
    one call for all that came meanwhile); `renew` gives Redis everything again."""

    def __init__(self, link: Link, prefix: str, checkpoint: str, token: str, ttl_s: float,
                 sharing: Callable[[], int], clock_ms: Callable[[], int] | None = None) -> None:
        self.link = link
        self.keys = [f"{prefix}:{name}" for name in ("holds", "hold_cost", "hold_tokens", "spent_cost",
                                                       "spent_tokens")]
        self.checkpoint = checkpoint
        self.token = token
        self.ttl_ms = max(1, round(ttl_s * 1000))
        self.held: dict[str, tuple[float, int]] = {}
        self.spent: tuple[float, int] = (0.0, 0)  # this process's, all runs of its checkpoint: what Redis is told
        self._sharing = sharing
        self._clock_ms = clock_ms
        self._ids = itertools.count()
        self._ended: list[str] = []
        self._to_send = False
        self._sending: asyncio.Task[None] | None = None
        # At Redis's last answer: the job's cost and tokens spent and held, and this process's part of them.
        self._view: tuple[float, float, float, float] | None = None
        self._allowance: tuple[int, float, float] | None = None  # an outage's: (which outage, cost, tokens)
        self._hold = link.client.register_script(HOLD)
        self._settle = link.client.register_script(SETTLE)
        link.on_back.append(self.renew)

    def _now(self) -> int:
        return -1 if self._clock_ms is None else self._clock_ms()

    def _mine(self) -> tuple[float, float]:
        return (self.spent[0] + sum(cost for cost, _ in self.held.values()),
                self.spent[1] + sum(tokens for _, tokens in self.held.values()))

    async def hold(self, cost: float, tokens: int, max_cost: float | None, max_tokens: int | None,
                   mine: tuple[float, int], growing: str | None = None) -> tuple[Verdict, str]:
        """Hold `cost` and `tokens` for the job if they fit beside everything spent and held; `mine` is what this
        process has spent and holds (its budget's count), which an outage's allowance is checked against. The
        verdict, and the hold's id (to settle it by). `growing`: added to this process's hold of that name (a Batch
        API file's, one hold for all its rows, so the job's holds stay few) instead of a new one."""
        key = self.key_of(growing) if growing is not None else f"{self.token}:{next(self._ids)}"
        before = self.held.get(key, (0.0, 0))
        whole = (before[0] + cost, before[1] + tokens)
        if not self.link.down:
            try:
                taken, holds, all_cost, all_tokens = await self._hold(keys=self.keys, args=[
                    self._now(), self.ttl_ms, key, repr(float(whole[0])), whole[1],
                    -1 if max_cost is None else repr(float(max_cost)), -1 if max_tokens is None else max_tokens])
            except REDIS_ERRORS as exc:
                self.link.lost(exc, OUTAGE)
            else:
                if taken:
                    self.held[key] = whole
                mine_cost, mine_tokens = self._mine()
                self._view = (float(all_cost), float(all_tokens), mine_cost, mine_tokens)
                return Verdict(bool(taken), int(holds)), key
        allowed_cost, allowed_tokens = self._outage_allowance(max_cost, max_tokens)
        fits = mine[0] + cost <= allowed_cost and mine[1] + tokens <= allowed_tokens
        if fits:
            self.held[key] = whole
        return Verdict(fits, len(self.held)), key

    def key_of(self, name: str) -> str:
        """The id of this process's hold named `name` (hold's `growing`)."""
        return f"{self.token}:{name}"

    def _outage_allowance(self, max_cost: float | None, max_tokens: int | None) -> tuple[float, float]:
        """What this process may have spent and held while Redis is away: its part of the job's at Redis's last
        answer, plus the budget left then over the processes sharing it."""
        if self._allowance is None or self._allowance[0] != self.link.outages:
            all_cost, all_tokens, mine_cost, mine_tokens = self._view or (*self._mine(), *self._mine())
            sharing = max(1, self._sharing())
            cost = mine_cost + (max_cost - all_cost) / sharing if max_cost is not None else float("inf")
            tokens = mine_tokens + (max_tokens - all_tokens) / sharing if max_tokens is not None else float("inf")
            self._allowance = (self.link.outages, cost, tokens)
        return self._allowance[1], self._allowance[2]

    def settle(self, key: str, spent: tuple[float, int]) -> None:
        """The hold `key` ended; this process has spent `spent` in all."""
        self.held.pop(key, None)
        self._ended.append(key)
        self.publish(spent)

    def publish(self, spent: tuple[float, int]) -> None:
        """This process has spent `spent` in all (its checkpoint's spend and this run's)."""
        self.spent = spent
        self._to_send = True
        if self._sending is None:
            self._sending = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        """What settled since the last call, in one call (more comes while it is on its way)."""
        try:
            while self._to_send:
                self._to_send = False
                ended, self._ended = self._ended, []
                if self.link.down:  # renew gives Redis the spending once it answers; the ended holds expire
                    continue
                try:
                    await self._settle(keys=self.keys, args=[self._now(), self.ttl_ms, self.checkpoint,
                                                              repr(float(self.spent[0])), self.spent[1], *ended, "--"])
                except REDIS_ERRORS as exc:
                    self.link.lost(exc, OUTAGE)
        finally:
            self._sending = None

    async def renew(self) -> None:
        """Tell Redis this process's spending and every hold it has (renewed, or added back to a Redis that lost
        them)."""
        held = [part for key, (cost, tokens) in self.held.items() for part in (key, repr(float(cost)), tokens)]
        await self._settle(keys=self.keys, args=[self._now(), self.ttl_ms, self.checkpoint,
                                                  repr(float(self.spent[0])), self.spent[1], "--", *held])

    async def close(self) -> None:
        if self._sending is not None:
            await asyncio.gather(self._sending, return_exceptions=True)

