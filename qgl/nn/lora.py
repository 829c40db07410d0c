"""LoRA adapters on frozen linear layers (Hu et al., 2021), and QLoRA's NF4 base (Dettmers et al., 2023).

    apply_lora(model, ["attn", "mlp"], r=16, alpha=32, base="bf16")   # LoRA: bf16 base, frozen
    apply_lora(model, ["attn", "mlp"], r=16, alpha=32, base="nf4")    # QLoRA: NF4 base (bitsandbytes)

`LoRALinear(base, r, alpha, dropout)` computes

    y = base(x) + (alpha / r) * dropout(x) @ A^T @ B^T,   A: fp32 [r, in], B: fp32 [out, r]

A is Kaiming-uniform (as in the paper's reference code and PEFT), B is zero, so a fresh adapter
leaves the model's function exactly as it was. The base is frozen and may be an `nn.Linear` of any
float dtype, a `bitsandbytes.nn.Linear4bit` (NF4) or a `qgl.nn.QLinear` (INT8); the adapters are
fp32 whatever the base's dtype (they are the master weights the optimizer updates).

Why not PEFT: no extra dependency; the layers are chosen by the same name patterns as
`quantize_model` and `make_param_groups` (substrings or "re:<regex>", with `exclude`), where PEFT
matches names by its own rules, so "attn" would name different layers for different methods; the
base may be our `QLinear`, which PEFT's LoRA does not know; and the benchmark needs neither
merging, several adapters nor saving adapters apart, which are most of PEFT's code.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .surgery import _check_patterns, _listing, _matches

__all__ = ["LoRALinear", "apply_lora", "lora_modules", "nf4_linear"]

BASES = ("keep", "bf16", "nf4")


class LoRALinear(nn.Module):
    """A frozen linear `base` ([..., in] -> [..., out]) plus a trainable low-rank update.

    Args:
        base: `nn.Linear` (any float dtype), `bitsandbytes.nn.Linear4bit` or `qgl.nn.QLinear`;
            its parameters are frozen here.
        r: rank of the adapter. alpha: its scale is `alpha / r`.
        dropout: dropout on the adapter's input (not on the base's).

    Without autocast, an input whose dtype differs from a float base weight's (fp32 activations,
    bf16 base) is cast to the weight's dtype for the base and its output cast back; under
    autocast the base runs as it would alone. The output has the base output's dtype.
    """

    def __init__(self, base: nn.Module, r: int = 16, alpha: float = 32.0, dropout: float = 0.0) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {r}")
        self.base = base
        self.in_features: int = base.in_features
        self.out_features: int = base.out_features
        self.r, self.alpha = int(r), float(alpha)
        self.scaling = self.alpha / self.r
        for p in base.parameters():
            p.requires_grad_(False)
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.r, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _base_forward(self, x: Tensor) -> Tensor:
        w = self.base.weight
        if w.is_floating_point() and w.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            return self.base(x.to(w.dtype)).to(x.dtype)
        return self.base(x)

    def forward(self, x: Tensor) -> Tensor:
        """x [..., in] -> [..., out]."""
        y = self._base_forward(x)
        a = self.lora_A
        update = F.linear(F.linear(self.dropout(x).to(a.dtype), a), self.lora_B) * self.scaling
        return y + update.to(y.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}"

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kw: Any) -> None:
        # An NF4 base saves its quantization statistics as "base.weight.<name>" entries, which
        # bitsandbytes' Linear4bit does not load back: put them into the frozen weight's quant state.
        key = prefix + "base.weight."
        stats = {k[len(key):]: state_dict.pop(k) for k in list(state_dict) if k.startswith(key)}
        if stats:
            from bitsandbytes.functional import QuantState

            weight = self.base.weight
            weight.quant_state = QuantState.from_dict(stats, device=weight.device)
            self.base.quant_state = weight.quant_state
        super()._load_from_state_dict(state_dict, prefix, *args, **kw)


def nf4_linear(linear: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16,
               device: torch.device | str | None = None) -> nn.Module:
    """`linear` as a frozen `bitsandbytes.nn.Linear4bit`: NF4 codes (uint8, two a byte), blocks of
    64 with double-quantized absmax (QLoRA's set-up), quantized on `device` (default: the weight's),
    computing in `compute_dtype`."""
    import bitsandbytes as bnb

    device = torch.device(device) if device is not None else linear.weight.device
    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=compute_dtype, quant_type="nf4", device="meta")
    q.weight = bnb.nn.Params4bit(linear.weight.detach(), requires_grad=False, quant_type="nf4",
                                 compress_statistics=True, module=q)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    # bitsandbytes repacks the weight for its CPU inference kernel on the first no-grad eval call and
    # only unpacks it when saving; training alternates with validation, so keep one format.
    q.support_avx512bf16_for_cpu = False
    return q.to(device)  # Params4bit quantizes when moved


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Qualified name -> `LoRALinear` for every adapter in `model` (`named_modules` order)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: nn.Module, target_modules: Sequence[str] = ("attn", "mlp"),
               exclude: Sequence[str] = ("lm_head",), r: int = 16, alpha: float = 32.0, dropout: float = 0.0,
               *, base: str = "keep", trainable: Sequence[str] = (),
               device: torch.device | str | None = None) -> dict[str, LoRALinear]:
    """Wrap, in place, every `nn.Linear` (or `QLinear`) whose qualified name matches `target_modules`
    and not `exclude` (patterns as in `quantize_model`) in a `LoRALinear`, then freeze every
    parameter of `model` except the adapters and those whose name matches `trainable` (the bases
    stay frozen whatever `trainable` says).

    `base`: "keep" (the linear as it is), "bf16" (its weight and bias cast to bfloat16) or "nf4"
    (`nf4_linear`, quantized on `device`, default the weight's). Idempotent: layers already wrapped
    count as matches and are left alone. Linears whose weight is shared with another module (tied)
    are skipped with a warning. Returns the adapters by name; raises ValueError listing the model's
    linear layers when none matches.
    """
    if base not in BASES:
        raise ValueError(f"apply_lora: base must be one of {BASES}, got {base!r}")
    target_modules = _check_patterns("target_modules", target_modules)
    exclude = _check_patterns("exclude", exclude)
    trainable = _check_patterns("trainable", trainable)
    users: dict[int, int] = {}
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            users[id(p)] = users.get(id(p), 0) + 1
    inside = {id(m) for lora in lora_modules(model).values() for m in lora.modules() if m is not lora}
    names, todo = [], []
    for name, mod in model.named_modules():
        if id(mod) in inside or name == "":
            continue
        qlinear = hasattr(getattr(mod, "weight", None), "_qgl_owner")
        if not (isinstance(mod, (nn.Linear, LoRALinear)) or qlinear):
            continue
        names.append(name)
        if not _matches(name, target_modules) or _matches(name, exclude) or isinstance(mod, LoRALinear):
            continue
        if users.get(id(mod.weight), 0) > 1:
            warnings.warn(f"apply_lora: skipping {name!r}: its weight is shared with another module (tied "
                          "weights); add it to `exclude` to silence this", stacklevel=2)
            continue
        todo.append((name, mod))
    if not todo and not lora_modules(model):
        raise ValueError(f"apply_lora: no linear layer matched target_modules={list(target_modules)} "
                         f"(exclude={list(exclude)}). Linear layers in the model: {_listing(names)}")
    for name, mod in todo:
        if base == "nf4" and isinstance(mod, nn.Linear):
            mod = nf4_linear(mod, device=device)
        elif base == "bf16":
            mod = mod.to(torch.bfloat16)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LoRALinear(mod, r, alpha, dropout))
    adapters = lora_modules(model)
    frozen = {id(p) for lora in adapters.values() for p in lora.base.parameters()}
    for name, p in model.named_parameters():
        adapter = name.rsplit(".", 1)[-1] in ("lora_A", "lora_B")
        p.requires_grad_(adapter or (id(p) not in frozen and _matches(name, trainable)))
    from .restore import guard_hf_saves  # restore imports this module

    guard_hf_saves(model)  # save_pretrained writes merged weights, not base/adapter keys
    return adapters
