"""Where two records of a run disagree: metric histories step by step, environments and configs
key by key, and the table `runner-repro` prints of them."""

import math
from dataclasses import dataclass
from typing import Any

from runner.tracking.provenance import flatten

History = dict[str, list[tuple[int, float]]]


@dataclass(frozen=True)
class Difference:
    metric: str
    step: int
    expected: float | None
    found: float | None


def compare(expected: History, found: History, rtol: float = 0.0, atol: float = 0.0) -> list:
    """The first differing step of each metric; a step or metric on one side only differs too."""
    differences = []
    for metric in sorted(expected.keys() | found.keys()):
        want, got = dict(expected.get(metric, [])), dict(found.get(metric, []))
        for step in sorted(want.keys() | got.keys()):
            a, b = want.get(step), got.get(step)
            if a is None or b is None or not math.isclose(a, b, rel_tol=rtol, abs_tol=atol):
                differences.append(Difference(metric, step, a, b))
                break
    return differences


def environment_differences(expected: dict, found: dict) -> list[tuple[str, Any, Any]]:
    """(key, expected, found) for each dotted key of two nested mappings (environment.json, or
    a config) whose values differ."""
    want, got = dict(flatten(expected)), dict(flatten(found))
    return [
        (key, want.get(key), got.get(key))
        for key in sorted(want.keys() | got.keys())
        if want.get(key) != got.get(key)
    ]


def report(differences: list[Difference], environment: list[tuple[str, Any, Any]]) -> str:
    lines = [f"{'metric':<16} {'first differing step':>20} {'original':>14} {'rerun':>14}"]
    lines += [
        f"{d.metric:<16} {d.step:>20} {_number(d.expected):>14} {_number(d.found):>14}"
        for d in differences
    ]
    return "\n".join([*lines, "", environment_report(environment)])


def environment_report(environment: list[tuple[str, Any, Any]]) -> str:
    """The environment keys that differ, as a table; or a line saying none does."""
    if not environment:
        return "The environments are the same (versions, platform, devices, commit, data)."
    lines = [f"{'environment':<40} {'original':<30} rerun"]
    return "\n".join(lines + [f"{_whose(key):<40} {str(a):<30} {b}" for key, a, b in environment])


def _whose(key: str) -> str:
    """An environment key, saying whose code its git commit or state is: the runner's `git`, or
    `user_code.git`, that of the user's own modules (whose files' SHA-256 rows name them)."""
    if key.startswith("git."):
        return f"{key} (the runner's)"
    if key.startswith("user_code.git."):
        return f"{key} (your code's)"
    return key


def _number(value: float | None) -> str:
    return "missing" if value is None else f"{value:.8g}"
