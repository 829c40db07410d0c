"""q-galore-torch's INT8-weight simulation, re-implemented (not copied) from its published description.

q-galore-torch 1.0's wheel holds only the optimizer (`QGaLoreAdamW8bit`); the linear layer it trains
(`QGaLoreLinear`) is in its source repository. This module rebuilds that layer's contract so that the
wheel's optimizer can run on INT8 weights here:

* the weight is an `nn.Parameter` of dtype uint8, `requires_grad=False`, shape (out, in), carrying
  Python attributes `scales`, `zeros` ([numel // group_size, 1], the float weight's dtype),
  `group_size`, `saved_data_dtype` (torch.uint8), `stochastic_round` and `float_grad`;
* asymmetric unsigned 8-bit quantization per group of `group_size` consecutive elements of the
  flattened weight (`quantize_uint8`);
* forward dequantizes the whole weight in the activation dtype (the autocast dtype under autocast);
  backward returns the input's and bias's gradients and accumulates the weight's into
  `weight.float_grad` (a uint8 tensor cannot have a `.grad`), then calls `weight.backward_hook(weight)`
  if set: that is how a layer-wise optimizer steps, since post-accumulate-grad hooks never fire here.

`QGaLoreAdamW8bit.step` recognises such a parameter by `hasattr(p, "float_grad")`: it dequantizes
`p.data`, runs its GaLore 8-bit Adam update on `float_grad` and re-quantizes (stochastic rounding when
`p.stochastic_round`), replacing `p.data`, `p.scales` and `p.zeros`; its `zero_grad` sets
`float_grad = None`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from qgl.optim import make_param_groups

GROUP_SIZE = 256  # q-galore-torch's default for the weights


def quantize_uint8(w: Tensor, group_size: int = GROUP_SIZE) -> tuple[Tensor, Tensor, Tensor]:
    """(q, scales, zeros) of `w` (any shape, floating): q uint8 of `w`'s shape; scales and zeros
    [numel // group_size, 1] in `w`'s dtype, per group of `group_size` consecutive elements of the
    flattened `w`, with w ~ (q - zeros) * scales. Round to nearest; zeros clamped to [0, 255], so a
    group of one sign loses its far end (as published). ValueError if numel % group_size != 0."""
    if group_size <= 0 or w.numel() % group_size:
        raise ValueError(
            f"INT8 weights: numel {w.numel()} (shape {tuple(w.shape)}) is not divisible by "
            f"group_size {group_size}"
        )
    g = w.detach().reshape(-1, group_size)
    hi, lo = g.amax(dim=1, keepdim=True), g.amin(dim=1, keepdim=True)
    scales = (hi - lo).clamp(min=1e-5) / 255
    zeros = (-torch.round(lo / scales)).clamp(0, 255)
    q = torch.clamp(torch.round(g / scales) + zeros, 0, 255).to(torch.uint8)
    return q.reshape(w.shape), scales, zeros


def dequantize_uint8(q: Tensor, scales: Tensor, zeros: Tensor, group_size: int, dtype: torch.dtype) -> Tensor:
    """(q - zeros) * scales in `dtype`, of `q`'s shape (q uint8; scales, zeros [numel // group_size, 1])."""
    g = q.to(dtype).reshape(-1, group_size)
    return ((g - zeros.to(dtype)) * scales.to(dtype)).reshape(q.shape)


class _Int8Linear(torch.autograd.Function):
    """y = x W^T (+ b) with W the dequantized uint8 weight; W's gradient goes to `weight.float_grad`."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, scales: Tensor, zeros: Tensor
    ) -> Tensor:
        # Custom Functions are not autocast-aware: take the autocast dtype ourselves.
        kind = x.device.type
        dt = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
        xc = x.to(dt)
        w = dequantize_uint8(weight, scales, zeros, weight.group_size, dt)
        y = xc @ w.t()
        if bias is not None:
            y = y + bias.to(dt)
        # Saved for backward (recomputed there under activation checkpointing): the parameter itself,
        # not a copy, since its data changes only in its own step, after its backward. Its attributes
        # are read from `ctx.param`, the original object, whatever saved-tensor hooks return.
        ctx.save_for_backward(xc, weight, scales, zeros)
        ctx.param, ctx.group_size = weight, weight.group_size
        ctx.x_dtype, ctx.has_bias = x.dtype, bias is not None
        if bias is not None:
            ctx.bias_dtype = bias.dtype
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        xc, q, scales, zeros = ctx.saved_tensors
        weight = ctx.param
        out_f, in_f = q.shape
        dy = dy.to(xc.dtype)
        w = dequantize_uint8(q, scales, zeros, ctx.group_size, xc.dtype)
        grad_x = (dy @ w).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        grad_b = dy.reshape(-1, out_f).sum(0).to(ctx.bias_dtype) if ctx.has_bias else None
        g = dy.reshape(-1, out_f).t() @ xc.reshape(-1, in_f)  # (out, in), activation dtype
        if torch.is_tensor(weight.float_grad):
            weight.float_grad += g  # micro-batches of an accumulation window
        else:
            weight.float_grad = g
        hook = getattr(weight, "backward_hook", None)
        if hook is not None:  # after grad_x: the hook may step (re-quantize) this weight
            hook(weight)
        return grad_x, None, grad_b, None, None


class Int8SimLinear(nn.Module):
    """A linear layer on a uint8 weight (module docstring): input (..., in_features) -> output
    (..., out_features) in the activation dtype. `weight`: uint8 (out, in), frozen for autograd,
    with `scales`, `zeros`, `group_size`, `saved_data_dtype`, `stochastic_round`, `float_grad`;
    `bias`: float, trainable. The weight's gradient reaches `float_grad` only when the output
    requires grad (the input or the bias does), as with any autograd Function."""

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None = None,
        group_size: int = GROUP_SIZE,
        stochastic_round: bool = True,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        q, scales, zeros = quantize_uint8(weight, group_size)
        self.weight = nn.Parameter(q, requires_grad=False)
        self.weight.scales, self.weight.zeros = scales, zeros
        self.weight.group_size, self.weight.saved_data_dtype = group_size, torch.uint8
        self.weight.stochastic_round = stochastic_round
        self.weight.float_grad = None  # their optimizer takes the float_grad path by hasattr
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, group_size: int = GROUP_SIZE, stochastic_round: bool = True
    ) -> Int8SimLinear:
        """Quantize `linear.weight` (its dtype and device); `linear.bias` is kept as is (same Parameter)."""
        return cls(linear.weight.detach(), linear.bias, group_size, stochastic_round)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        return _Int8Linear.apply(x, w, self.bias, w.scales, w.zeros)

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight as (out, in) floats of `dtype`."""
        w = self.weight
        return dequantize_uint8(w.data, w.scales, w.zeros, w.group_size, dtype)

    def nbytes(self) -> dict[str, int]:
        """Bytes of the uint8 codes and of their scales and zeros."""
        w = self.weight
        return {"codes": w.nbytes, "scales_zeros": w.scales.nbytes + w.zeros.nbytes}

    def _apply(self, fn: Any, recurse: bool = True) -> Int8SimLinear:
        # scales/zeros/float_grad are plain attributes of the weight, which nn.Module would neither
        # move nor carry over to a new Parameter: re-attach them and apply `fn` (device, float dtype).
        attrs = dict(self.weight.__dict__)
        super()._apply(fn, recurse)
        for name in ("scales", "zeros", "float_grad"):
            if torch.is_tensor(attrs.get(name)):
                attrs[name] = fn(attrs[name])
        self.weight.__dict__.update(attrs)
        return self

    def get_extra_state(self) -> dict[str, Tensor]:
        # The uint8 codes are the state_dict's `weight`; their scales and zeros ride along here.
        return {"scales": self.weight.scales, "zeros": self.weight.zeros}

    def set_extra_state(self, state: dict[str, Tensor]) -> None:
        self.weight.scales, self.weight.zeros = state["scales"], state["zeros"]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, group_size={self.weight.group_size}, "
            f"stochastic_round={self.weight.stochastic_round}"
        )


def is_int8_weight(p: Tensor) -> bool:
    """True for the weight of an `Int8SimLinear` (what their optimizer treats as INT8)."""
    return hasattr(p, "float_grad") and hasattr(p, "scales")


def int8_modules(model: nn.Module) -> dict[str, Int8SimLinear]:
    """Qualified name -> `Int8SimLinear` in `model` (`named_modules` order)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Int8SimLinear)}


def to_int8(
    model: nn.Module,
    target_modules: Sequence[str] = ("attn", "mlp"),
    exclude: Sequence[str] = ("lm_head",),
    group_size: int = GROUP_SIZE,
    stochastic_round: bool = True,
) -> dict[str, Int8SimLinear]:
    """Replace, in place, the linears GaLore projects (the GaLore group of
    `qgl.optim.make_param_groups(model, rank, target_modules, exclude)`: same selection) by
    `Int8SimLinear`s and return them by name. ValueError if one is not an `nn.Linear` (e.g. already
    a qgl QLinear), if its weight is shared (tied) with another module, or if its numel is not
    divisible by `group_size`; make_param_groups' ValueError if none matches."""
    groups = make_param_groups(model, 1, target_modules, exclude)
    names = [n.removesuffix(".weight") for g in groups if g["rank"] is not None for n in g["names"]]
    if "weight" in names:
        raise ValueError("INT8 weights: the root module cannot be swapped in place")
    paths: dict[int, list[str]] = {}
    users: dict[int, int] = {}
    for path, mod in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(mod), []).append(path)
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            users[id(p)] = users.get(id(p), 0) + 1
    converted = {}
    for name in names:
        lin = model.get_submodule(name)
        if type(lin) is not nn.Linear:  # subclasses too: e.g. MultiheadAttention reads out_proj.weight
            raise ValueError(f"INT8 weights: {name} is a {type(lin).__name__}, not a plain nn.Linear")
        if users[id(lin.weight)] > 1:
            raise ValueError(f"INT8 weights: the weight of {name} is shared with another module (tied)")
        new = Int8SimLinear.from_linear(lin, group_size, stochastic_round)
        for path in paths[id(lin)]:  # a module reachable under several names is swapped under all
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
        converted[name] = new
    return converted
