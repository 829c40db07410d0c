"""The Q-GaLore settings, defined once: fields, defaults, help lines, ranges and choices.

Every user of a setting reads it from here: the recipe section `qgalore` (`qgl.config`), the
keyword arguments of `QGaLoreCallback`, the param-group defaults of `QGaLoreAdamW`
(`GALORE_DEFAULTS`), the constructors of `GaLoreProjector` and `AdaptiveRefresh`, and the
planner's `PlanSettings`. This module imports neither torch, Lightning nor OmegaConf.

Each field carries its help line (`qgl train --help`) and its check in its metadata; a dataclass
checks every field and its combinations in `__post_init__` and raises `SettingError`, a one-line
`ValueError` naming the field and the value. The concerns:

- `GaLoreSettings`: the projection of one layer's gradient and its refresh schedule;
- `WeightSettings`: which linears are trained with Q-GaLore and how their weights are stored;
- `OptimizerSettings`: Adam's moments and how the updates run (layer-wise, offloaded);
- `QGaLoreSettings`: all three, the arguments of `QGaLoreCallback` and the recipe section.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

SVD_METHODS = ("full", "randomized")
REFRESH_METRICS = ("leading", "subspace")
OFFLOAD_MODES = (None, "cpu", "paged")
OPTIM_BITS = (8, 32)

# check(name, value) -> None when valid, else the one-line message naming both.
Check = Callable[[str, Any], "str | None"]


class SettingError(ValueError):
    """A setting out of its range or choices; `str(error)` is one line naming the field and the value.
    `field`: the field's name; `owner`: the settings class that refused it (None: a single check)."""

    def __init__(self, message: str, field: str, owner: type | None = None) -> None:
        super().__init__(message)
        self.field, self.owner = field, owner


def _shown(choices: Sequence[Any]) -> str:
    return ", ".join("null" if c is None else str(c) for c in choices)


def integer(low: int | None = None, *, optional: bool = False) -> Check:
    """An int (not a bool) >= `low`; None too if `optional`."""

    def check(name: str, value: Any) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            return f"{name} must be an integer{' or null' if optional else ''}, got {value!r}"
        if low is not None and value < low:
            return f"{name} must be >= {low}, got {value!r}"
        return None

    return check


def real(low: float | None = None, high: float | None = None, *, low_open: bool = False,
         high_open: bool = False, optional: bool = False) -> Check:
    """A finite real number in [low, high] (an end open where `low_open`/`high_open`); None too if
    `optional`."""

    def check(name: str, value: Any) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
            return f"{name} must be a finite number{' or null' if optional else ''}, got {value!r}"
        below = low is not None and (value <= low if low_open else value < low)
        above = high is not None and (value >= high if high_open else value > high)
        if below or above:
            if high is None:
                want = f"{'>' if low_open else '>='} {low:g}"
            elif low is None:
                want = f"{'<' if high_open else '<='} {high:g}"
            else:
                want = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            return f"{name} must be {want}, got {value!r}"
        return None

    return check


def one_of(choices: Sequence[Any]) -> Check:
    """One of `choices` (None among them: null allowed)."""

    def check(name: str, value: Any) -> str | None:
        ok = not isinstance(value, bool) and value in choices  # True == 1 must not pass for 1
        return None if ok else f"unknown {name} {value!r}; choose one of: {_shown(choices)}"

    return check


def strings(name: str, value: Any) -> str | None:
    """A list (or tuple) of strings."""
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return None
    return f"{name} must be a list of strings, got {value!r}"


def setting(default: Any, help: str, check: Check | None = None) -> Any:
    """A dataclass field with a help line (`qgl train --help`) and a check; lists get a default_factory."""
    metadata = {"help": help, "check": check}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def check_fields(obj: Any, names: Sequence[str] | None = None) -> None:
    """Run the checks of `obj`'s fields (`names`: only those); raise the first `SettingError`."""
    for f in dataclasses.fields(obj):
        check = f.metadata.get("check")
        if check is not None and (names is None or f.name in names):
            message = check(f.name, getattr(obj, f.name))
            if message:
                raise SettingError(message, f.name, type(obj))


def check_value(schema: type, name: str, value: Any, label: str | None = None) -> None:
    """Check one value against the field `name` of `schema` (`label`: the name to show, if another)."""
    check = {f.name: f for f in dataclasses.fields(schema)}[name].metadata.get("check")
    message = check(label or name, value) if check is not None else None
    if message:
        raise SettingError(message, name)


def rank_fits(rank: int, shape: Sequence[int], name: str = "") -> None:
    """A GaLore rank must fit the matrix it projects: rank <= min(m, n)."""
    m, n = shape
    if rank > min(m, n):
        raise SettingError(f"rank {rank} is larger than the matrix {name + ' ' if name else ''}({m} x {n})",
                           "rank")


@dataclass
class GaLoreSettings:
    """The projection of one layer's gradient and its adaptive refresh (`qgl.optim.refresh`)."""

    rank: int = setting(256, "rank of the gradient subspace", integer(1))
    update_proj_gap: int = setting(200, "steps between subspace refreshes (SVDs), before adaptation",
                                   integer(1))
    scale: float = setting(0.25, "GaLore scale alpha of the projected-back update", real(0.0, low_open=True))
    proj_quant: bool = setting(True, "store projections in INT4")
    proj_group_size: int = setting(256, "INT4 projection quantization group", integer(1))
    adaptive: bool = setting(True, "lengthen a layer's gap while its subspace stays put")
    cos_threshold: float = setting(0.4, "mean cosine similarity that counts as 'stable'", real(0.0, 1.0))
    # Queue 2 and gamma 3 (the paper's code: 5 and 2): over 3000 steps of LLaMA-60M, 54% fewer SVDs than
    # fixed-gap GaLore at 0.5% lower validation loss, where 5 and 2 ran 27% fewer
    # (benchmarks/results/quality_h100_2026-12-07).
    gamma_proj: float = setting(3.0, "factor applied to a stable layer's gap", real(1.0))
    queue_size: int = setting(2, "cosine similarities averaged before deciding", integer(1))
    max_gap: int | None = setting(None, "cap on a layer's gap (null: none)", integer(1, optional=True))
    # randomized: keeps >= 99.98% of the exact rank-r energy on a k^-1 spectrum, less loss than the INT4
    # storage of the exact P (docs/svd.md); full: GaLore's reference numerics.
    svd_method: str = setting("randomized", "how projections are computed: randomized (warm-started from the "
                              "previous P) or full", one_of(SVD_METHODS))
    refresh_metric: str = setting("leading", "what the refresh compares: leading (cosine of the leading "
                                  "singular vectors, the paper's) or subspace (of the whole subspaces)",
                                  one_of(REFRESH_METRICS))

    def __post_init__(self) -> None:
        check_fields(self, [f.name for f in dataclasses.fields(GaLoreSettings)])
        if self.max_gap is not None and self.max_gap < self.update_proj_gap:
            raise SettingError(f"max_gap ({self.max_gap}) must be >= update_proj_gap "
                               f"({self.update_proj_gap})", "max_gap", type(self))


@dataclass
class WeightSettings:
    """Which linears Q-GaLore trains (name patterns: substrings or "re:<regex>") and their INT8 storage."""

    target_modules: list[str] = setting(["attn", "mlp"], "name patterns of the Linear layers Q-GaLore trains",
                                        strings)
    exclude: list[str] = setting(["lm_head"], "name patterns left to plain (8-bit) AdamW", strings)
    quantize_weights: bool = setting(True, "store target weights in INT8 (stochastic-rounding updates)")
    group_size: int = setting(256, "INT8 weight quantization group", integer(1))
    symmetric: bool = setting(True, "symmetric INT8 weight groups")

    def __post_init__(self) -> None:
        check_fields(self, [f.name for f in dataclasses.fields(WeightSettings)])


@dataclass
class OptimizerSettings:
    """Adam's moments and how the updates run."""

    optim_bits: int = setting(8, "bits of the Adam moments (8 or 32)", one_of(OPTIM_BITS))
    min_8bit_size: int = setting(4096, "tensors smaller than this keep 32-bit moments", integer(0))
    layerwise: bool = setting(True, "update each layer during backward (no full gradient in memory)")
    layerwise_clip_norm: float | None = setting(None, "per-layer gradient clipping when layerwise",
                                                real(0.0, low_open=True, optional=True))
    offload: str | None = setting(None, "optimizer states in host memory between layer updates: null (off), "
                                  "cpu (pinned, prefetched), paged (bitsandbytes unified memory, CUDA)",
                                  one_of(OFFLOAD_MODES))
    cuda_graphs: bool = setting(True, "replay each matrix's update as a CUDA graph between its refreshes "
                                "(CUDA, 8-bit moments, no offload; qgl.optim.graphed)")
    shard_state: bool = setting(True, "under DDP: each matrix's optimizer state on one owner rank, which "
                                "updates it and broadcasts the weight (false: all-reduce, every rank holds "
                                "every state); see qgl.optim.distributed")

    def __post_init__(self) -> None:
        if isinstance(self.offload, bool) or self.offload == "none":  # the Python API's aliases
            self.offload = "cpu" if self.offload is True else None
        check_fields(self, [f.name for f in dataclasses.fields(OptimizerSettings)])
        if self.layerwise_clip_norm is not None and not self.layerwise:
            raise SettingError("layerwise_clip_norm needs layerwise=true; without it, clip the global "
                               "gradient norm instead", "layerwise_clip_norm", type(self))


@dataclass
class QGaLoreSettings(OptimizerSettings, WeightSettings, GaLoreSettings):
    """Every setting of Q-GaLore: `QGaLoreCallback`'s arguments (besides seed and subspace_monitor)
    and the recipe section `qgalore`. Fields in order: GaLore's, the weights', the optimizer's."""

    def __post_init__(self) -> None:
        GaLoreSettings.__post_init__(self)
        WeightSettings.__post_init__(self)
        OptimizerSettings.__post_init__(self)


def defaults(schema: type) -> dict[str, Any]:
    """{field: default} of a settings dataclass (lists as tuples: immutable defaults for signatures)."""
    out = {}
    for f in dataclasses.fields(schema):
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        out[f.name] = tuple(value) if isinstance(value, list) else value
    return out


GALORE = defaults(GaLoreSettings)
QGALORE = defaults(QGaLoreSettings)

__all__ = ["GaLoreSettings", "OFFLOAD_MODES", "OPTIM_BITS", "OptimizerSettings", "QGaLoreSettings",
           "REFRESH_METRICS", "SVD_METHODS", "SettingError", "WeightSettings", "check_fields", "check_value",
           "defaults", "rank_fits", "setting"]
