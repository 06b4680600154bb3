"""What a request cost, in CNY, from the model's price per million tokens.

Prices from open.bigmodel.cn's published pricing as collected in ../shared/zhipu-api-notes.md
(checked 2026-11-22). A model not listed costs None ("unknown"), never a silent 0.
The tiered glm-4.5/4.6 family is not here yet: its price depends on prompt and output length.
"""

from __future__ import annotations

PRICES_AS_OF = "2026-11-22"
CURRENCY = "CNY"

# model -> (input, output) per million tokens
PRICES: dict[str, tuple[float, float]] = {
    "glm-4-flash": (0.0, 0.0),
    "glm-4-flash-250414": (0.0, 0.0),
    "glm-4.5-flash": (0.0, 0.0),
    "glm-4-flashx": (0.1, 0.1),
    "glm-4-flashx-250414": (0.1, 0.1),
    "glm-4-air": (0.5, 0.5),
    "glm-4-air-250414": (0.5, 0.5),
    "glm-4-long": (1.0, 1.0),
    "glm-4-airx": (10.0, 10.0),
    "glm-4-plus": (5.0, 5.0),
}


def cost_of(model: str, prompt_tokens: int | None, completion_tokens: int | None) -> float | None:
    price = PRICES.get(model)
    if price is None or prompt_tokens is None or completion_tokens is None:
        return None
    return (prompt_tokens * price[0] + completion_tokens * price[1]) / 1_000_000
