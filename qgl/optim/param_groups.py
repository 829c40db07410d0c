"""Split a model's parameters into GaLore and plain AdamW groups by module name."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from torch import nn

from qgl.optim.qgalore_adamw import GALORE_DEFAULTS
from qgl.optim.settings import QGALORE
from qgl.quant import storage_of

NO_DECAY = ("bias", "norm")


def _matches(name: str, patterns: Sequence[str]) -> bool:
    # "re:<regex>" patterns are searched; the others are substrings of the qualified name.
    return any(re.search(p[3:], name) if p.startswith("re:") else p in name for p in patterns)


def _is_linear(module: nn.Module) -> bool:
    # QLinear is recognised by the INT8 storage attached to its gradient carrier (qgl.quant, above
    # this layer), so this layer needs no import of qgl.nn.
    return isinstance(module, nn.Linear) or storage_of(getattr(module, "weight", None)) is not None


def make_param_groups(
    model: nn.Module,
    rank: int | None = QGALORE["rank"],
    target_modules: Sequence[str] = QGALORE["target_modules"],
    exclude: Sequence[str] = (),
    weight_decay: float = 0.0,
    no_decay: Sequence[str] = NO_DECAY,
    **galore: Any,
) -> list[dict[str, Any]]:
    """Param groups for `QGaLoreAdamW`.

    The weights of the linear modules whose qualified name matches `target_modules` and not
    `exclude` (substrings, or "re:<regex>", as in `quantize_model`) go to a GaLore group of
    `rank` (with `galore` options such as `update_proj_gap`, `scale`, `proj_quant`); every
    other trainable parameter to plain groups, with `weight_decay` except for names
    containing one of `no_decay`.
    Each group carries the parameter names under `names`, for monitoring."""
    unknown = (
        set(galore)
        - set(GALORE_DEFAULTS)
        - {"optim_bits", "min_8bit_size", "seed", "stochastic_rounding", "lr", "betas", "eps"}
    )
    if unknown:
        raise TypeError(f"unknown GaLore options {sorted(unknown)}; known: {sorted(GALORE_DEFAULTS)}")
    galore_weights = set()
    if rank is not None:
        for module_name, module in model.named_modules():
            if (
                _is_linear(module)
                and _matches(module_name, target_modules)
                and not _matches(module_name, exclude)
            ):
                galore_weights.add(f"{module_name}.weight" if module_name else "weight")
    buckets: dict[str, list[tuple[str, nn.Parameter]]] = {"galore": [], "decay": [], "no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in galore_weights:
            buckets["galore"].append((name, p))
        elif p.ndim < 2 or _matches(name, no_decay):
            buckets["no_decay"].append((name, p))
        else:
            buckets["decay"].append((name, p))
    if rank is not None and not buckets["galore"]:
        linears = [n for n, m in model.named_modules() if _is_linear(m)]
        raise ValueError(
            f"no linear module matches target_modules={list(target_modules)}; linear modules are: {linears}"
        )
    options = {
        "galore": dict(rank=rank, weight_decay=weight_decay, **galore),
        "decay": dict(rank=None, weight_decay=weight_decay),
        "no_decay": dict(rank=None, weight_decay=0.0),
    }
    return [
        dict(params=[p for _, p in items], names=[n for n, _ in items], **options[kind])
        for kind, items in buckets.items()
        if items
    ]
