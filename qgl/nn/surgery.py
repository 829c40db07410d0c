"""Model surgery: swap the targeted ``nn.Linear`` layers of a model for ``QLinear`` in place."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence

from torch import nn

from .qlinear import QLinear

__all__ = ["check_rank", "is_conv1d", "quantize_model", "quantized_modules"]

# Modules that read their Linear children's `.weight` directly instead of calling them (MHA always;
# TransformerEncoderLayer on its inference fast path): on a QLinear that is the zero-valued carrier.
_READS_WEIGHTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    """True iff ``name`` contains one of ``patterns``; ``"re:<regex>"`` patterns use ``re.search``."""
    for p in patterns:
        if p.startswith("re:"):
            if re.search(p[3:], name):
                return True
        elif p in name:
            return True
    return False


def is_conv1d(module: nn.Module) -> bool:
    """True for Hugging Face's ``Conv1D`` (GPT-2 family): a linear layer whose weight is stored
    transposed, ``[in, out]``, computing ``x @ weight + bias`` (checked by name: no transformers import)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def _as_linear(conv: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` computing what HF ``Conv1D`` computes (weight transposed to ``[out, in]``;
    one float copy of this layer)."""
    w = conv.weight
    linear = nn.Linear(w.shape[0], w.shape[1], bias=conv.bias is not None, device="meta", dtype=w.dtype)
    linear.weight = nn.Parameter(w.detach().t().contiguous(), w.requires_grad)
    if conv.bias is not None:
        linear.bias = conv.bias
    return linear


def _check_patterns(kind: str, patterns: Sequence[str]) -> tuple[str, ...]:
    if isinstance(patterns, str):  # ("attn") is a str, not a tuple: a classic slip
        patterns = (patterns,)
    for p in patterns:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as err:
                raise ValueError(f"{kind} pattern {p!r} is not a valid regex: {err}") from None
    return tuple(patterns)


def _listing(names: list[str], limit: int = 50) -> str:
    shown = ", ".join(names[:limit]) or "(none)"
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def quantize_model(
    model: nn.Module,
    target_modules: Sequence[str] = ("attn", "mlp"),
    exclude: Sequence[str] = ("lm_head",),
    group_size: int = 256,
    symmetric: bool = True,
) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` whose qualified name matches ``target_modules``.

    A name matches a pattern if it contains it as a substring, or, for a pattern ``"re:<regex>"``,
    if ``re.search(regex, name)`` finds it. Layers matching any ``exclude`` pattern are kept.
    Each layer is quantized on its own device (``QLinear.from_linear``, compute dtype = the weight's
    dtype) and its float weight and bias are released right after the swap (the old ``nn.Linear``
    objects are left with ``weight = bias = None``), so peak memory is the quantized model plus one
    float layer. A Linear reachable under several names is swapped under all of them.

    Not swapped, with a warning: Linear layers inside ``nn.MultiheadAttention`` or
    ``nn.TransformerEncoderLayer`` (they read ``.weight`` directly, which on a QLinear is the
    zero-valued gradient carrier) and Linear layers whose weight Parameter is shared with another
    module (tied weights). Other code that reads ``.weight`` of a targeted layer must be excluded.

    Hugging Face ``Conv1D`` layers (GPT-2 family: weight ``[in, out]``) are targeted like linears and
    become QLinears of the transposed weight (``dequantize_model`` and ``qgl.export`` transpose back).
    A Hugging Face model in ``model`` gets a ``save_pretrained`` that writes the dequantized weights
    under their ``weight`` keys (``qgl.nn.guard_hf_saves``), so it never saves INT8 buffers that
    ``from_pretrained`` would drop.

    Idempotent: already-quantized layers count as matches. Returns ``model``.
    Raises ValueError listing the model's Linear names when no layer matches.
    """
    target_modules = _check_patterns("target_modules", target_modules)
    exclude = _check_patterns("exclude", exclude)

    # Every path to every module (a shared module has several), and who uses which Parameter.
    paths: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    param_users: dict[int, set[int]] = {}
    direct_readers: dict[int, str] = {}  # id of a Linear inside a _READS_WEIGHTS module -> its type
    for name, mod in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(mod), []).append(name)
        modules[id(mod)] = mod
        for p in mod.parameters(recurse=False):
            param_users.setdefault(id(p), set()).add(id(mod))
        if isinstance(mod, _READS_WEIGHTS):
            direct_readers.update((id(c), type(mod).__name__) for c in mod.modules() if c is not mod)

    linear_names: list[str] = []
    todo: list[nn.Linear] = []
    already = 0
    for key, names in paths.items():
        mod, name = modules[key], names[0]
        if not (isinstance(mod, nn.Linear | QLinear) or is_conv1d(mod)) or name == "":  # root: not in place
            continue
        linear_names.append(name)
        if not _matches(name, target_modules) or _matches(name, exclude):
            continue
        if isinstance(mod, QLinear):
            already += 1
        elif key in direct_readers:
            warnings.warn(
                f"quantize_model: skipping {name!r}: nn.{direct_readers[key]} reads its weight "
                "directly, bypassing QLinear.forward",
                stacklevel=2,
            )
        elif len(param_users.get(id(mod.weight), ())) > 1:
            warnings.warn(
                f"quantize_model: skipping {name!r}: its weight is shared with another module "
                "(tied weights); add it to `exclude` to silence this",
                stacklevel=2,
            )
        else:
            todo.append(mod)

    if not todo and not already:
        raise ValueError(
            f"quantize_model: no nn.Linear matched target_modules={list(target_modules)} "
            f"(exclude={list(exclude)}). Linear layers in the model: {_listing(linear_names)}"
        )

    for lin in todo:
        conv = is_conv1d(lin)
        q = QLinear.from_linear(_as_linear(lin) if conv else lin, group_size=group_size, symmetric=symmetric)
        if conv:
            q._qgl_conv1d = True  # the export writes the weight back as [in, out]
        for path in paths[id(lin)]:
            parent_name, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_name), child, q)
        # Release the float weight now, not when the loop ends: peak = quantized model + one layer.
        lin.weight = None
        if lin.bias is not None:
            lin.bias = None
        del q
    from .restore import guard_hf_saves  # restore imports lora, which imports this module

    guard_hf_saves(model)
    return model


def quantized_modules(model: nn.Module) -> dict[str, QLinear]:
    """Qualified name -> ``QLinear`` for every QLinear in ``model`` (``named_modules`` order)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QLinear)}


def check_rank(model: nn.Module, rank: int, target_modules: Sequence[str] = ("attn", "mlp"),
               exclude: Sequence[str] = ("lm_head",)) -> None:
    """Raise ValueError, before any surgery, when ``rank`` exceeds ``min(out, in)`` of a targeted
    linear (nn.Linear, QLinear or HF Conv1D), naming ``rank=`` and the largest rank that fits."""
    target_modules = _check_patterns("target_modules", target_modules)
    exclude = _check_patterns("exclude", exclude)
    small = [(min(m.weight.shape), name) for name, m in model.named_modules()
             if name and (isinstance(m, nn.Linear | QLinear) or is_conv1d(m))
             and _matches(name, target_modules) and not _matches(name, exclude)
             and getattr(m, "weight", None) is not None and m.weight.requires_grad  # frozen: not projected
             and min(m.weight.shape) < rank]
    if small:
        fits, name = min(small)
        raise ValueError(f"rank={rank} is larger than {len(small)} targeted layer(s), e.g. {name!r} "
                         f"(smallest side {fits}); set rank<={fits} (qgalore.rank), or exclude those layers")
