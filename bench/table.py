"""The benchmark's table, as `make bench` printed it and wrote it to bench/results.json (its own last full run).

The docs embed it from here (`load_results`, `markdown_table` in a cog block), so the published figures are the
bench's, never copied by hand. Standard library only: the docs build imports this without the benchmark's
scenarios (which start processes and import pyarrow).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).with_name("results.json")
HEADER = ("metric", "value", "target", "met?")
MET = {None: "", True: "yes", False: "NO"}


def load_results(path: Path = RESULTS) -> dict[str, Any]:
    """What the last full `make bench` wrote: its table, notes, and when, where and on which commit it ran."""
    return json.loads(path.read_text(encoding="utf-8"))


def render(rows: list[dict[str, Any]]) -> str:
    """The table's rows (metric, value, target, met) as a Markdown table padded to read as text too."""
    cells = [list(HEADER)] + [[_cell(r["metric"]), _cell(r["value"]), _cell(r["target"]), MET[r["met"]]]
                              for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def run_line(results: dict[str, Any]) -> str:
    """When, where and how the figures were measured: the date, the commit, the cores and the machine's load."""
    machine = results["machine"]
    before, after = machine["load_before"], machine["load_after"]
    commit = results["commit"] + (" plus uncommitted changes" if results.get("dirty") else "")
    return (f"Measured by `make bench` ({results['mode']} run of {', '.join(results['parts'])}; "
            f"{results['wall_s']:.0f} s) on {results['date']}, commit {commit}, {machine['cores']} cores "
            f"({machine['cpu']}), load average {before[0]:.2f} / {before[1]:.2f} / {before[2]:.2f} (1, 5, 15 min) "
            f"at the start and {after[0]:.2f} / {after[1]:.2f} / {after[2]:.2f} at the end.")


def markdown_table(results: dict[str, Any]) -> str:
    """The results as the docs' performance page shows them: the table, its notes, and the line saying when, where
    and on which commit it was measured."""
    notes = [_cell(note) for note in results["notes"]]
    return "\n\n".join([render(results["table"]), *notes, run_line(results)]) + "\n"


def _cell(text: str) -> str:
    # A '|' inside a cell would end it; a line break would end the table.
    return " ".join(str(text).split()).replace("|", "\\|")
