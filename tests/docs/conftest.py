"""The documentation's tests: docs/generate.py importable as `generate`, as cog imports it for the pages."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "docs"))

import generate  # noqa: E402


@pytest.fixture(scope="session")
def examples() -> dict[str, dict[str, str]]:
    """The example commands' outputs, run once per test process (the slow part: seven commands, a simulator)."""
    return generate.run_examples()
