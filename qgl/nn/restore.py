"""Undo qgl's surgery: plain float weights out of `QLinear` and `LoRALinear`, in place or as a state dict.

    dequantize_model(model)           # QLinear -> nn.Linear, LoRALinear -> nn.Linear (merged), in place
    plain_state_dict(model, dtype)    # the state dict of that model, the model left as it is

A `QLinear`'s weight is its INT8 codes times their group scales (`QLinear.dequantize_weight`); a
`LoRALinear`'s is the base's (dequantized when it is a QLinear or bitsandbytes' NF4 `Linear4bit`)
plus `alpha / r * B @ A`, computed in fp32. A QLinear made from a Hugging Face `Conv1D` (GPT-2) goes
back to the transposed `[in, out]` layout of that class. The keys are those of the model before the
surgery (`<layer>.weight`, `<layer>.bias`), so a Hugging Face model's `from_pretrained` loads them.

`guard_hf_saves(model)` (run by `quantize_model` and `apply_lora`) gives each Hugging Face model
inside `model` a `save_pretrained` that writes `plain_state_dict` instead of the INT8 buffers and
adapter tensors, which `from_pretrained` would report as unexpected and replace by random weights.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from .lora import LoRALinear
from .qlinear import QLinear

__all__ = ["dequantize_model", "guard_hf_saves", "is_hf_model", "plain_state_dict", "plain_weight"]


def _base_weight(base: nn.Module) -> Tensor:
    """The float weight ``[out, in]`` (fp32) of a LoRA base: nn.Linear, QLinear or NF4 Linear4bit."""
    if isinstance(base, QLinear):
        return base.dequantize_weight(torch.float32)
    w = base.weight
    if getattr(w, "quant_state", None) is not None:  # bitsandbytes Params4bit (QLoRA's NF4 base)
        import bitsandbytes.functional as bnbf

        w = bnbf.dequantize_4bit(w.data, w.quant_state)
        return w.float().reshape(base.out_features, base.in_features)
    return w.detach().float()


@torch.no_grad()
def plain_weight(module: nn.Module) -> tuple[Tensor, Tensor | None, bool]:
    """(weight ``[out, in]`` fp32, bias or None, came from a Conv1D) of a QLinear or LoRALinear.

    The weight is a new tensor (the module is not changed); the bias is the module's own Parameter.
    """
    if isinstance(module, QLinear):
        conv = bool(getattr(module, "_qgl_conv1d", False))
        return module.dequantize_weight(torch.float32), module.bias, conv
    if isinstance(module, LoRALinear):
        base = module.base
        w = _base_weight(base)
        w.addmm_(module.lora_B.float(), module.lora_A.float(), alpha=module.scaling)
        return w, base.bias, bool(getattr(base, "_qgl_conv1d", False))
    raise TypeError(f"plain_weight expects a QLinear or LoRALinear, got {type(module).__name__}")


def _compute_dtype(module: nn.Module) -> torch.dtype:
    """The float dtype a restored QLinear / LoRALinear weight takes: its layer's (fp32 for an NF4 base,
    whose storage is uint8)."""
    dtype = module.base.weight.dtype if isinstance(module, LoRALinear) else module.weight.dtype
    return dtype if dtype.is_floating_point else torch.float32


def is_hf_model(module: nn.Module) -> bool:
    """A Hugging Face model: its class has `save_pretrained` and it holds a `config`."""
    return callable(getattr(type(module), "save_pretrained", None)) and hasattr(module, "config")


def _replaced(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> QLinear / LoRALinear to undo (outermost only: not a LoRALinear's base)."""
    found: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        if name and isinstance(mod, QLinear | LoRALinear) and not any(
                name.startswith(f"{p}.") for p in found):
            found[name] = mod
    return found


def _float(t: Tensor, dtype: torch.dtype | None, device: torch.device | str | None = None) -> Tensor:
    return t.detach().to(device=device, dtype=dtype if t.is_floating_point() else None)


@torch.no_grad()
def plain_state_dict(model: nn.Module, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None) -> dict[str, Tensor]:
    """``model.state_dict()`` as it would be without qgl's surgery, the model left unchanged.

    Each QLinear / LoRALinear at ``<name>`` contributes ``<name>.weight`` (dequantized, LoRA merged;
    ``[out, in]``, or ``[in, out]`` for a former Conv1D) and ``<name>.bias`` instead of its buffers
    and adapters. Floating tensors are cast to ``dtype`` (None: each keeps its dtype; a restored
    weight takes its layer's compute dtype). ``device``: where the tensors go (None: where they are;
    "cpu" for an export from the GPU: each restored weight leaves the GPU as soon as it is made).
    Tensors shared under several keys (tied embeddings) stay one tensor.
    """
    replaced = _replaced(model)
    prefixes = tuple(f"{n}." for n in replaced)
    cast: dict[int, Tensor] = {}  # id -> cast tensor, so that tied weights stay tied
    out: dict[str, Tensor] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if key.startswith(prefixes):
            continue
        if id(t) not in cast:
            cast[id(t)] = _float(t, dtype, device)
        out[key] = cast[id(t)]
    for name, mod in replaced.items():
        w, bias, conv = plain_weight(mod)
        w = w.to(device=device, dtype=dtype or _compute_dtype(mod))
        out[f"{name}.weight"] = w.t().contiguous() if conv else w
        if bias is not None:
            out[f"{name}.bias"] = _float(bias, dtype, device)
    return out


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Undo ``quantize_model`` and ``apply_lora`` in place: every QLinear becomes an ``nn.Linear``
    (a Hugging Face ``Conv1D`` where it was one) holding its dequantized weight, every LoRALinear an
    ``nn.Linear`` with the adapters merged in. ``dtype``: of the new weights (None: the layer's
    compute dtype). The weights are trainable (``requires_grad=True``) and on the layer's device; a
    stock optimizer can train the result. The ``save_pretrained`` guard is removed. Returns ``model``.
    """
    replaced = _replaced(model)
    for mod in replaced.values():
        w, bias, conv = plain_weight(mod)
        w = w.to(dtype or _compute_dtype(mod))
        if conv:
            from qgl._hf import transformers

            new: nn.Module = transformers().pytorch_utils.Conv1D(w.shape[0], w.shape[1])
            new.to(device=w.device, dtype=w.dtype)
            new.weight = nn.Parameter(w.t().contiguous())
        else:
            new = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta", dtype=w.dtype)
            new.weight = nn.Parameter(w)
        if bias is not None:
            new.bias = nn.Parameter(bias.detach().to(w.dtype).clone())
        elif conv:
            new.bias = None
        new.train(mod.training)
        for path in [n for n, m in model.named_modules(remove_duplicate=False) if m is mod]:
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
    for m in model.modules():
        if isinstance(m.__dict__.get("save_pretrained"), _PlainSave):
            del m.__dict__["save_pretrained"]
    return model


class _PlainSave:
    """``save_pretrained`` of a Hugging Face model holding qgl layers: the class's own method, given
    ``plain_state_dict(model)`` as its ``state_dict`` unless the caller gives one. An object, not a
    closure, so that the model still pickles and deep-copies."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        model = self.model
        if kwargs.get("state_dict") is None and _replaced(model):
            warnings.warn("save_pretrained: this model holds qgl layers (INT8 QLinear / LoRA adapters); "
                          "writing their dequantized, merged float weights under the original `weight` "
                          "keys (as `qgl.export` does), so that from_pretrained loads them",
                          stacklevel=2)
            kwargs["state_dict"] = plain_state_dict(model)
        return type(model).save_pretrained(model, save_directory, *args, **kwargs)


def guard_hf_saves(model: nn.Module) -> None:
    """Give every Hugging Face model in ``model`` (a module with ``save_pretrained`` and ``config``,
    the root included) the dequantizing ``save_pretrained`` of this module's docstring."""
    for m in model.modules():
        if is_hf_model(m) and not isinstance(m.__dict__.get("save_pretrained"), _PlainSave):
            m.__dict__["save_pretrained"] = _PlainSave(m)
