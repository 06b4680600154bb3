"""A spending limit for the whole job (all runs together), kept before money is spent.

Each request reserves its worst case (estimated prompt, answer as long as max_tokens allows)
before it is sent; when the next reservation would cross the limit, the run stops taking rows.
So the limit holds even with every request in flight coming back at its worst.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from batch.config import BudgetSpec
from batch.pricing import Pricer, worst_cost


@dataclass(frozen=True)
class Hold:
    cost: float
    tokens: int


class Budget:
    """`max_tokens` and `pricer` as the preflight resolved them (it refuses a budget without either)."""

    def __init__(self, limits: BudgetSpec, max_tokens: int, pricer: Pricer | None, spent_cost: float,
                 spent_tokens: int) -> None:
        self.max_cost = limits.max_cost
        self.max_tokens_total = limits.max_total_tokens
        self.max_tokens = max_tokens
        self.pricer = pricer
        self.spent_cost = spent_cost
        self.spent_tokens = spent_tokens
        self.held_cost = 0.0
        self.held_tokens = 0

    def reserve(self, prompt_tokens: int) -> Hold | None:
        """Hold a request's worst case, or None when it could push the job over its budget."""
        tokens = prompt_tokens + self.max_tokens
        cost = worst_cost(self.pricer, prompt_tokens, self.max_tokens) if self.pricer is not None else 0.0
        if self.max_cost is not None and self.spent_cost + self.held_cost + cost > self.max_cost:
            return None
        if self.max_tokens_total is not None and self.spent_tokens + self.held_tokens + tokens > self.max_tokens_total:
            return None
        self.held_cost += cost
        self.held_tokens += tokens
        return Hold(cost, tokens)

    def settle(self, hold: Hold, record: dict[str, Any] | None) -> None:
        """Release a hold; count what the request really cost (None: it was never answered)."""
        self.held_cost -= hold.cost
        self.held_tokens -= hold.tokens
        if record is not None:
            self.spent_cost += record["cost"] or 0.0
            self.spent_tokens += record["total_tokens"] or 0

    def describe(self) -> str:
        parts = []
        if self.max_cost is not None:
            parts.append(f"spent {self.spent_cost:.6f} of max_cost {self.max_cost:g} CNY")
        if self.max_tokens_total is not None:
            parts.append(f"used {self.spent_tokens} of max_total_tokens {self.max_tokens_total}")
        return "budget reached: " + ", ".join(parts) + " (the next request could exceed it)"
