"""Load a script of benchmarks/ as a module, for the tests of that script."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(file: str, name: str | None = None) -> ModuleType:
    """A fresh module of `benchmarks/<file>` (executing it puts benchmarks/ on sys.path, so the
    scripts' own helpers, e.g. `_cli`, `_quality_report`, import); `name` defaults to bench_<stem>."""
    path = BENCHMARKS / file
    spec = importlib.util.spec_from_file_location(name or f"bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
