"""Command-line pieces shared by the benchmark scripts."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence


def choice_list(choices: Sequence[str], what: str = "choices") -> Callable[[str], list[str]]:
    """An argparse `type` for a comma-separated, non-empty list drawn from `choices` (order kept)."""

    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        unknown = [t for t in items if t not in choices]
        if unknown or not items:
            known = ",".join(choices)
            raise argparse.ArgumentTypeError(f"unknown {what} {unknown or text!r}; known: {known}")
        return items

    return parse
