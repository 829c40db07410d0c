"""Command-line pieces shared by the benchmark scripts."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Sequence

_LABEL = re.compile(r"[A-Za-z0-9_-]+")
LABEL_RULE = "LABEL of letters, digits, '_' and '-'"  # of a variant's name, for error and help texts


def variant_base(name: str, choices: Sequence[str]) -> str | None:
    """The choice that `name` runs: `name` itself when it is one of `choices`, BASE for a labelled
    variant `BASE.LABEL` (BASE one of `choices`, LABEL of [A-Za-z0-9_-]); None when it is neither."""
    if name in choices:
        return name
    base, dot, label = name.partition(".")
    return base if dot and base in choices and _LABEL.fullmatch(label) else None


def choice_list(choices: Sequence[str], what: str = "choices",
                variants: bool = False) -> Callable[[str], list[str]]:
    """An argparse `type` for a comma-separated, non-empty list drawn from `choices` (order kept).

    `variants=True` also takes labelled variants `BASE.LABEL` of a choice (`variant_base`), each a row
    of its own, so that no name may then appear twice.
    """

    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        unknown = [t for t in items if (variant_base(t, choices) is None if variants else t not in choices)]
        if unknown or not items:
            known = ",".join(choices)
            also = f"; or a labelled variant BASE.LABEL of one of them, {LABEL_RULE}" if variants else ""
            raise argparse.ArgumentTypeError(f"unknown {what} {unknown or text!r}; known: {known}{also}")
        twice = sorted({t for t in items if items.count(t) > 1})
        if variants and twice:
            raise argparse.ArgumentTypeError(
                f"{what} {','.join(twice)} listed more than once: each is one row, named by it; label a "
                f"second configuration as a variant ({twice[0].partition('.')[0]}.v2)")
        return items

    return parse
