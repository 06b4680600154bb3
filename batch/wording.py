"""How counts read in the lines people see (summary, status, estimate, merge, log lines, errors): a counted
noun agrees with its number, "1 row", "2 rows", "1 batch", "0 batches"; and how those lines name a job."""

from __future__ import annotations

_SIBILANT = ("s", "x", "z", "ch", "sh")


def plural(noun: str) -> str:
    """The English plural of a regular noun: rows, batches, entries (an irregular one is passed to `counted`)."""
    if noun.endswith(_SIBILANT):
        return noun + "es"
    if noun.endswith("y") and noun[-2:-1] not in ("", *"aeiou"):
        return noun[:-1] + "ies"
    return noun + "s"


def counted(number: int, noun: str, plural_form: str | None = None) -> str:
    """`number` and `noun`, singular for exactly one: counted(1, "row") is "1 row", counted(3, "batch") "3
    batches"; `plural_form` for a noun whose plural is not regular."""
    return f"{number} {noun if number == 1 else plural_form or plural(noun)}"


def job_named(name: str, shard: str | None = None) -> str:
    """A job as the first line of a summary, status or estimate names it: "job NAME", or, for one shard's part of
    it, "job NAME, shard 2/4" (`shard`: Shard.label, as the shard's log lines name it)."""
    return f"job {name}, {shard}" if shard else f"job {name}"
