"""What a request costs, in CNY per million tokens, and the worst a request can cost.

Prices of open.bigmodel.cn as collected, with sources, in ../shared/zhipu-api-notes.md section 5
(Zhipu's GLM-4 model page for glm-4-plus; a mirror of bigmodel.cn/pricing in lobehub/lobe-chat's
model bank, snapshot after December 2025, for the rest). Checked on PRICES_AS_OF; check the live
page before trusting a large bill to them. A job's `pricing:` overrides this table. A model not
listed costs None ("unknown"), never a silent 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

PRICES_AS_OF = "2026-11-22"
CURRENCY = "CNY"
# The glm-4.5 family's tiers, as published: prompt [0, 32K] or (32K, 128K], answer [0, 0.2K] or (0.2K, +):
# a prompt of exactly 32,000 tokens and an answer of exactly 200 are in the lower tier.
SHORT_PROMPT_MAX = 32_000
SHORT_ANSWER_MAX = 200


@dataclass(frozen=True)
class Price:
    input: float
    output: float
    cached_input: float | None = None  # for prompt tokens served from Zhipu's context cache

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> float:
        cached = min(cached_tokens, prompt_tokens) if self.cached_input is not None else 0
        fresh = prompt_tokens - cached
        return (fresh * self.input + cached * (self.cached_input or 0.0) + completion_tokens * self.output) / 1e6


Pricer = Callable[[int, int], Price]  # (prompt_tokens, completion_tokens) -> the tier's price


def flat(input_price: float, output_price: float, cached_input: float | None = None) -> Pricer:
    price = Price(input_price, output_price, cached_input)
    return lambda _prompt, _completion: price


def tiered(short: Price, long_answer: Price, long_prompt: Price) -> Pricer:
    def pick(prompt_tokens: int, completion_tokens: int) -> Price:
        if prompt_tokens > SHORT_PROMPT_MAX:
            return long_prompt
        return short if completion_tokens <= SHORT_ANSWER_MAX else long_answer
    return pick


GLM_45 = tiered(Price(2, 8, 0.4), Price(3, 14, 0.6), Price(4, 16, 0.8))
GLM_45_AIR = tiered(Price(0.8, 2, 0.16), Price(0.8, 6, 0.16), Price(1.2, 8, 0.24))  # cached: 1/5 of input

PRICES: dict[str, Pricer] = {
    "glm-4-flash": flat(0, 0), "glm-4-flash-250414": flat(0, 0), "glm-4.5-flash": flat(0, 0),
    "glm-4-flashx": flat(0.1, 0.1), "glm-4-flashx-250414": flat(0.1, 0.1),
    "glm-4-air": flat(0.5, 0.5), "glm-4-air-250414": flat(0.5, 0.5),
    "glm-4-long": flat(1, 1),
    "glm-4-airx": flat(10, 10),
    "glm-4-plus": flat(5, 5),
    "glm-4.5": GLM_45, "glm-4.6": GLM_45, "glm-4.7": GLM_45,
    "glm-4.5-air": GLM_45_AIR,
}


def pricer_for(model: str, override: Price | None = None) -> Pricer | None:
    """The job's own price, or the table's for `model` (named in any case: GLM-4.5 is glm-4.5)."""
    if override is not None:
        return flat(override.input, override.output, override.cached_input)
    return PRICES.get(model.strip().lower())


# Zhipu's Batch API costs half the online price (free models stay free), as OpenAI's does.
BATCH_PRICE_FACTOR = 0.5


def batch_pricer(pricer: Pricer | None) -> Pricer | None:
    """The Batch API's price: the online price (the table's or the job's `pricing:`) times BATCH_PRICE_FACTOR."""
    if pricer is None:
        return None

    def pick(prompt_tokens: int, completion_tokens: int) -> Price:
        online = pricer(prompt_tokens, completion_tokens)
        cached = None if online.cached_input is None else online.cached_input * BATCH_PRICE_FACTOR
        return Price(online.input * BATCH_PRICE_FACTOR, online.output * BATCH_PRICE_FACTOR, cached)
    return pick


def cost_of(pricer: Pricer | None, prompt_tokens: int | None, completion_tokens: int | None,
            cached_tokens: int | None = None) -> float | None:
    if pricer is None or prompt_tokens is None or completion_tokens is None:
        return None
    return pricer(prompt_tokens, completion_tokens).cost(prompt_tokens, completion_tokens, cached_tokens or 0)


def worst_cost(pricer: Pricer, prompt_tokens: int, max_tokens: int) -> float:
    """The most a request can cost: its prompt uncached, its answer as long as max_tokens allows."""
    return max(pricer(prompt_tokens, completion).cost(prompt_tokens, max_tokens) for completion in (0, max_tokens))


def money(amount: float) -> str:
    """An amount for people: six decimals, but never a misleading zero for a tiny amount that is not zero (one that
    six decimals round to zero, 5e-7 included: its binary value is just below it)."""
    fixed = f"{amount:.6f}"
    if amount == 0 or float(fixed) != 0:
        return fixed
    return f"{amount:.2g}"
