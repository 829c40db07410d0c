"""`QLinear`: a linear layer whose weight is stored INT8 (group-wise, docs/internals.md).

The weight lives in three buffers, ``weight_int8`` (int8 ``[out, in]``), ``weight_scale`` (fp32
``[n_groups]``) and ``weight_zero`` (fp32 ``[n_groups]``, ``None`` when symmetric). ``weight`` is
NOT the weight: it is a *gradient carrier*, a Parameter of shape ``(out, in)`` and the compute dtype
whose strides are ``(0, 0)`` over a single element, so it costs no memory. Autograd still writes a
dense ``dL/dW`` into ``weight.grad``, so gradient accumulation, clipping, ``zero_grad`` and
post-accumulate-grad hooks work as for ``nn.Linear``. The buffers are also a ``qgl.quant.Int8Tensor``
(``QLinear.storage``, a view: no copy) attached to the carrier with ``qgl.quant.attach_storage``; the
optimizer (qgl.optim) finds it with ``qgl.quant.storage_of(weight)`` and updates it with ``add_``.
``weight._qgl_owner`` (the module) only tells model surgery and planning that a Parameter is a carrier.

!!! Reading ``qlinear.weight`` gives zeros, not the weights: use ``dequantize_weight()``. Code that
reads ``.weight`` directly (tied embeddings, ``nn.MultiheadAttention.out_proj``, weight merging)
must not be given a QLinear, and a stock optimizer must not be given the carrier (an in-place
update on a stride-0 tensor raises "more than one element of the written-to tensor ...").
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_pre_hook as _register_optimizer_step_pre_hook

import qgl.kernels as _k
from qgl.kernels import aligned
from qgl.quant import Int8Tensor, attach_storage, storage_of

__all__ = ["QLinear"]

_BUFFERS = ("weight_int8", "weight_scale", "weight_zero")  # q, scale, zero of the Int8Tensor view


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Disable autocast inside the kernels: QLinear.forward already cast x to the autocast dtype."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _carrier(base: Tensor, out_features: int, in_features: int) -> Tensor:
    """Expand a one-element tensor to ``(out, in)`` with strides ``(0, 0)`` (no new memory)."""
    return base.detach().reshape(()).expand(out_features, in_features)


def _carrier_base(w: Tensor) -> Tensor:
    """The 0-d view of the single element under a carrier (``w.to(...)`` itself would densify)."""
    return w.detach().as_strided((), ())


class _CarrierState(NamedTuple):
    """What pickle / deepcopy store in place of the carrier Parameter (see QLinear.__getstate__)."""

    base: Tensor
    requires_grad: bool


class _Int8LinearFunction(torch.autograd.Function):
    """``y = x @ dequant(q).T + bias`` with gradients for x, the carrier and bias.

    Inputs: x ``[..., in]`` (float), carrier ``(out, in)`` stride 0 (only its dtype and
    ``requires_grad`` matter), q int8 ``[out, in]``, scale/zero fp32 ``[n_groups]`` (zero may be
    None), bias ``[out]`` or None, group_size int. Output ``[..., out]`` in x's dtype.
    """

    @staticmethod
    def forward(ctx, x, carrier, q, scale, zero, bias, group_size):
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # Save only what backward uses: x for dW (as nn.Linear does), the INT8 weight for dx.
        # save_for_backward (not ctx attributes) so that an in-place update of the INT8 buffers
        # between this forward and its backward raises instead of silently using new weights.
        ctx.save_for_backward(
            x if need_dw else None,
            q if need_dx else None,
            scale if need_dx else None,
            zero if need_dx else None,
        )
        ctx.group_size = group_size
        ctx.x_dtype = x.dtype
        ctx.carrier_dtype = carrier.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        b = None if bias is None else bias.to(x.dtype)  # as nn.Linear under autocast
        with _no_autocast(x.device.type):
            return _k.w8a16_linear(x, q, scale, zero, group_size, b)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, q, scale, zero = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[5]
        dx = dw = db = None
        # dy of a reduction such as y.sum() arrives expanded (stride 0); kernels want it dense.
        dy = dy.contiguous()
        with _no_autocast(dy.device.type):
            if need_dx:
                dx = _k.w8a16_grad_input(dy, q, scale, zero, ctx.group_size).to(ctx.x_dtype)
            dy2 = dy.reshape(-1, dy.shape[-1])
            if need_dw:
                # [out, in] = dy^T x over all leading dims, in the compute dtype like nn.Linear under
                # autocast, then cast to the carrier's dtype. Contiguous, so AccumulateGrad
                # adopts it as weight.grad without a copy. Padded to 16 bytes: kernels/aligned.py.
                x2 = x.reshape(-1, x.shape[-1]).to(dy2.dtype)
                dw = aligned.mm(dy2.t(), x2).to(ctx.carrier_dtype)
            if need_db:
                db = dy2.sum(0).to(ctx.bias_dtype)
        return dx, dw, None, None, None, db, None


class QLinear(nn.Module):
    """Linear layer with an INT8 group-quantized weight and a zero-memory gradient carrier.

    Args:
        in_features, out_features: as ``nn.Linear``.
        bias: add a trainable bias Parameter ``[out]`` (dtype ``dtype``).
        group_size: elements per quantization group (row-major flattening; last group may be short).
        symmetric: symmetric (``weight_zero`` is None) or asymmetric (fp32 zero point per group).
        device, dtype: device of every tensor; ``dtype`` is the compute dtype of the carrier (and
            bias). On ``device="meta"`` nothing is initialised (use ``to_empty`` + ``reset_parameters``).

    Forward: x ``[..., in]`` -> ``[..., out]`` in x's dtype (under autocast, the autocast dtype).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group_size: int = 256,
        symmetric: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if group_size <= 0:
            raise ValueError(f"group_size must be positive, got {group_size}")
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.symmetric = symmetric
        dtype = dtype or torch.get_default_dtype()
        n_groups = -(-(in_features * out_features) // group_size)
        fp32 = {"device": device, "dtype": torch.float32}
        self.register_buffer(
            "weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("weight_scale", torch.ones(n_groups, **fp32))
        self.register_buffer("weight_zero", None if symmetric else torch.zeros(n_groups, **fp32))
        self._set_carrier(torch.zeros((), device=device, dtype=dtype), requires_grad=True)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        if self.weight_int8.device.type != "meta":
            self.reset_parameters()

    # ----------------------------------------------------------------------------- construction
    def _set_carrier(self, base: Tensor, requires_grad: bool) -> None:
        """Register a fresh carrier Parameter over the one-element ``base``."""
        self.weight = nn.Parameter(_carrier(base, self.out_features, self.in_features), requires_grad)
        self._mark_carrier(self.weight)

    def _mark_carrier(self, p: nn.Parameter) -> None:
        """Attach the INT8 storage (what the optimizer updates) and the owner (what surgery detects)."""
        attach_storage(p, Int8Tensor.view_of(self._buffers, _BUFFERS, self.group_size))
        p._qgl_owner = self

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise like ``nn.Linear`` (Kaiming-uniform weight, uniform bias), then quantize.

        Materialises one fp32 ``[out, in]`` temporary on the buffers' device.
        """
        w = torch.empty(self.out_features, self.in_features, device=self.weight_int8.device)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        self._store(w)
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    def _store(self, w: Tensor) -> None:
        """Quantize float ``w [out, in]`` into the existing buffers (in place)."""
        self.storage.set_(w)

    @property
    def storage(self) -> Int8Tensor:
        """The INT8 weight as a ``qgl.quant.Int8Tensor`` over this module's buffers (the one the
        optimizer updates)."""
        return storage_of(self.weight)  # type: ignore[return-value]

    @classmethod
    @torch.no_grad()
    def from_linear(
        cls,
        linear: nn.Linear,
        group_size: int = 256,
        symmetric: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> QLinear:
        """Quantize ``linear`` on its own device (no other float copy); the linear is left untouched.

        The carrier takes ``compute_dtype`` (default: the linear's weight dtype) and the weight's
        ``requires_grad``; the bias is copied in its own dtype. A meta-device linear gives a meta
        QLinear (materialise it with ``to_empty`` + ``reset_parameters``).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        dtype = compute_dtype or w.dtype
        m = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            group_size,
            symmetric,
            device="meta",
            dtype=dtype,
        )  # meta: no throw-away buffers or init
        if w.device.type != "meta":
            q, scale, zero = _k.quantize_int8(w.detach(), group_size, symmetric)
            m.weight_int8, m.weight_scale, m.weight_zero = q, scale, zero
        m._set_carrier(torch.zeros((), device=w.device, dtype=dtype), requires_grad=w.requires_grad)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone(), linear.bias.requires_grad)
        return m.train(linear.training)

    # ------------------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        """x ``[..., in]`` -> ``[..., out]``; under autocast x is first cast to the autocast dtype."""
        dev = x.device.type
        if torch.is_autocast_enabled(dev) and x.is_floating_point() and x.dtype != torch.float64:
            # Done here, not with custom_fwd(cast_inputs=...): that would also cast the carrier
            # (densifying it) and the fp32 scales.
            x = x.to(torch.get_autocast_dtype(dev))
        return _Int8LinearFunction.apply(
            x, self.weight, self.weight_int8, self.weight_scale, self.weight_zero, self.bias, self.group_size
        )

    # ---------------------------------------------------------------------- optimizer protocol
    @torch.no_grad()
    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight the layer computes with: ``[out, in]`` in ``dtype`` (a new tensor)."""
        return _k.dequantize_int8(
            self.weight_int8, self.weight_scale, self.weight_zero, self.group_size, dtype
        )

    @torch.no_grad()
    def apply_weight_update_(self, delta: Tensor, decay: float, seed: int | None) -> None:
        """``W <- SR(decay * W + delta)`` in place on the INT8 buffers (stochastic rounding).

        delta: ``[out, in]`` on the weight's device, fp32 or 16-bit (added in fp32);
        decay = ``1 - lr * weight_decay``;
        seed: integer keying the random bits (same seed, same result on the same device), or
        None for round-to-nearest, which drops every update smaller than half a step (the
        ablation that shows why stochastic rounding exists).
        """
        self.storage.add_(delta, decay, seed)

    def nbytes(self) -> int:
        """Bytes of weight storage: INT8 codes + fp32 scales (+ zeros); the carrier costs one element."""
        bufs = (self.weight_int8, self.weight_scale, self.weight_zero)
        return sum(t.numel() * t.element_size() for t in bufs if t is not None)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, group_size={self.group_size}, symmetric={self.symmetric}, "
            f"compute_dtype={self.weight.dtype}"
        )

    # ------------------------------------------------------------------ conversion / state
    def _apply(self, fn: Any, recurse: bool = True) -> QLinear:
        """``to``/``cuda``/``half``/``bfloat16``/``to_empty``... without densifying the carrier.

        The carrier: ``fn`` runs on its one element, re-expanded into the SAME Parameter (``.data``)
        so optimizers and hooks holding it stay valid. Buffers keep their format dtypes (int8 codes,
        fp32 scales and zeros) and follow only the device. Other parameters (bias) as nn.Module.
        """
        if recurse:
            for child in self.children():
                child._apply(fn)
        with torch.no_grad():
            for name, p in list(self._parameters.items()):
                if p is None:
                    continue
                base = _carrier_base(p) if name == "weight" else p
                new = fn(base)
                if new is base:
                    continue
                if name == "weight":
                    new = _carrier(new, self.out_features, self.in_features)
                grad = None if p.grad is None else fn(p.grad)  # the grad is dense (also the carrier's)
                if torch._has_compatible_shallow_copy_type(p, new):
                    p.data = new
                    if grad is not None:
                        p.grad = grad
                else:  # e.g. meta -> cpu: as nn.Module, a new Parameter (optimizers must be rebuilt)
                    p = nn.Parameter(new, p.requires_grad)
                    p.grad = grad
                    setattr(self, name, p)
                    if name == "weight":
                        self._mark_carrier(p)
            for name, b in self._buffers.items():
                if b is None:
                    continue
                # Probe fn on one element to learn its target without a dtype-converted copy.
                probe = fn(torch.empty((), dtype=b.dtype, device=b.device))
                self._buffers[name] = fn(b) if probe.dtype == b.dtype else b.to(device=probe.device)
        return self

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        """Buffers and bias; never the carrier (it holds no information)."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(prefix + "weight", None)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        """Copy buffers/bias in place; a float ``weight`` (an ``nn.Linear`` checkpoint) is quantized.

        A state dict holding both ``weight`` and ``weight_int8`` is ambiguous and reported as an error.
        With ``assign=True`` the buffers are the state dict's tensors and, if they moved device
        (meta -> real), the carrier is re-created there (a new Parameter, as ``assign`` implies).
        """
        wkey = prefix + "weight"
        if wkey in state_dict:
            w = state_dict.pop(wkey)  # load_state_dict passes its own shallow copy
            shape = (self.out_features, self.in_features)
            if prefix + "weight_int8" in state_dict:
                error_msgs.append(
                    f"{wkey!r} and {prefix + 'weight_int8'!r} both given: a QLinear loads "
                    "either a float weight (quantized on load) or its INT8 buffers, not both"
                )
            elif not isinstance(w, Tensor) or tuple(w.shape) != shape:
                error_msgs.append(
                    f"size mismatch for {wkey}: float weight of shape "
                    f"{tuple(getattr(w, 'shape', ()))} for a QLinear of shape {shape}"
                )
            else:
                with torch.no_grad():
                    w = w.to(device=self.weight_int8.device, dtype=torch.float32)
                    q, scale, zero = _k.quantize_int8(w, self.group_size, self.symmetric)
                state_dict[prefix + "weight_int8"], state_dict[prefix + "weight_scale"] = q, scale
                if zero is not None:
                    state_dict[prefix + "weight_zero"] = zero
        n_missing = len(missing_keys)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # The default loader reports the carrier as missing: it never is.
        missing_keys[n_missing:] = [k for k in missing_keys[n_missing:] if k != wkey]
        w = self.weight
        if w.device != self.weight_int8.device:  # load_state_dict(assign=True) into a meta module
            self._set_carrier(torch.zeros((), dtype=w.dtype, device=self.weight_int8.device), w.requires_grad)

    def __getstate__(self) -> dict:
        """For pickle/deepcopy: replace the carrier by its one element.

        ``Parameter.__deepcopy__`` clones with ``preserve_format``, which densifies a stride-0
        tensor, and drops ``_qgl_owner``; pickling it would also pickle the owner cycle.
        """
        state = super().__getstate__()
        params = dict(state["_parameters"])
        w = params["weight"]
        params["weight"] = _CarrierState(_carrier_base(w), w.requires_grad)
        state["_parameters"] = params
        return state

    def __setstate__(self, state: dict) -> None:
        params = state["_parameters"]
        cs = params["weight"]
        super().__setstate__(state)
        if isinstance(cs, _CarrierState):
            params["weight"] = None  # replaced (same key, same order) by _set_carrier
            self._set_carrier(cs.base, cs.requires_grad)


def _refuse_stock_optimizers(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Optimizer step pre-hook (every optimizer): a stock optimizer given a QLinear's gradient
    carrier would fail deep inside its update with torch's "more than one element of the written-to
    tensor ... clone()" error (the carrier is a stride-0 view); say what to do instead."""
    if type(optimizer).__module__.startswith("qgl."):  # qgl's optimizers update QLinear's buffers
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            owner = getattr(p, "_qgl_owner", None)
            if owner is not None and p.grad is not None:
                raise TypeError(
                    f"{type(optimizer).__name__} cannot update a QLinear's weight (INT8 buffers; its "
                    "`weight` is a zero-memory gradient carrier): train it with qgl.QGaLoreAdamW / "
                    "QGaLoreCallback, or call qgl.dequantize_model(model) first to turn the QLinear "
                    "layers back into nn.Linear, or freeze them (requires_grad_(False))")


_register_optimizer_step_pre_hook(_refuse_stock_optimizers)
