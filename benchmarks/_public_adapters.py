"""Drive the public GaLore packages on qgl's model, data and schedule: `galore-torch` 1.0
(`GaLoreAdamW8bit`) and `q-galore-torch` 1.0 (`QGaLoreAdamW8bit`), through Lightning as
`PublicGaLoreCallback(package)` (an `OptimizerSwap`: the module's schedule drives their lr).

Both wheels were written for bitsandbytes 0.42-0.43; on bitsandbytes 0.50 they need these adapters,
which restore the arguments they meant to pass and change none of their math:

* Both constructors call `Optimizer2State.__init__(..., min_8bit_size, percentile_clipping,
  block_wise, is_paged=...)` by position; in 0.50 those positions are `max_unorm` and `skip_zeros`, so
  they would ask for update-norm clipping at 100 and for skipping zero gradients. The adapters pass
  `max_unorm=0.0, skip_zeros=False` (what percentile_clipping=100, block_wise=True meant: neither).
* q-galore's `update_step` reads `config["percentile_clipping"]` and `config["block_wise"]`, which
  0.50's `get_config` no longer returns: the adapter returns the constructor's values (only 100
  and True are supported: 0.50 has neither percentile clipping nor non-blockwise 8-bit updates).
* q-galore calls `optimizer_update_8bit_blockwise` / `optimizer_update_32bit` with the old argument
  lists; 0.50 inserted `beta3, alpha` (AdEMAMix's, unused by Adam) after `beta2`. Its module sees a
  `bitsandbytes.functional` whose two functions take the old lists and pass beta3 = alpha = 0.
* Their `step` calls `torch.cuda.synchronize()` unconditionally; off CUDA that call is skipped.

q-galore-torch's INT8-weight linear (`QGaLoreLinear`) is in its source repository, not its wheel:
`_public_int8.py` re-implements that published simulation (uint8 weights, the gradient in
`float_grad`), which `PublicGaLoreCallback("q-galore-torch")` swaps in for the GaLore target linears
(`int8_weights=False`: float weights, as galore-torch's always are). Its optimizer dequantizes,
updates and re-quantizes them (stochastic rounding); INT4 projections, adaptive refresh too.
Layer-wise (`layerwise=True`, as GaLore's `*_per_layer` optimizers): one optimizer per parameter,
stepped from its post-accumulate-grad hook, which frees the gradient; an INT8 weight (no autograd
gradient, so no such hook) is stepped from `weight.backward_hook`, which its linear's backward calls.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import sys
import types
from collections.abc import Iterator
from typing import Any

import torch
from _public_int8 import int8_modules, is_int8_weight, to_int8  # benchmarks/ is on sys.path
from torch.optim import Optimizer

from qgl.callbacks._lightning_private import should_accumulate
from qgl.callbacks.swap import OptimizerSwap
from qgl.optim import make_param_groups

# package -> (import name, module of its 8-bit GaLore AdamW, class there), exported as
# galore_torch.GaLoreAdamW8bit and q_galore_torch.QGaLoreAdamW8bit.
PACKAGES = {"galore-torch": ("galore_torch", "adamw8bit", "AdamW8bit"),
            "q-galore-torch": ("q_galore_torch", "q_galore_adamw8bit", "AdamW8bit")}


def available(package: str) -> bool:
    """True if `package` ("galore-torch" or "q-galore-torch") is installed."""
    return importlib.util.find_spec(PACKAGES[package][0]) is not None


def _optimizer_module(package: str) -> types.ModuleType:
    """The package's optimizer module. galore_torch/__init__ also imports its Adafactor, which needs
    transformers: without it, the module is loaded under a bare package (its __init__ not run)."""
    name, module, _ = PACKAGES[package]
    try:
        return importlib.import_module(f"{name}.{module}")
    except ImportError as err:
        spec = importlib.util.find_spec(name)
        if spec is None or err.name != "transformers":
            raise
        bare = types.ModuleType(name)
        bare.__path__, bare.__spec__ = list(spec.submodule_search_locations or []), spec
        sys.modules[name] = bare
        return importlib.import_module(f"{name}.{module}")


@contextlib.contextmanager
def _cuda_sync_if_any() -> Iterator[None]:
    """`torch.cuda.synchronize()` becomes a no-op while there is no CUDA (it raises there)."""
    if torch.cuda.is_available():
        yield
        return
    real = torch.cuda.synchronize
    torch.cuda.synchronize = lambda *args, **kwargs: None
    try:
        yield
    finally:
        torch.cuda.synchronize = real


def _bnb050_functional() -> types.SimpleNamespace:
    """`bitsandbytes.functional` with the pre-0.45 argument lists of the two Adam updates."""
    import bitsandbytes.functional as F

    def update_8bit_blockwise(name, g, p, state1, state2, beta1, beta2, eps, step, lr, qmap1, qmap2,
                              absmax1, absmax2, weight_decay=0.0, gnorm_scale=1.0, skip_zeros=False):
        F.optimizer_update_8bit_blockwise(name, g, p, state1, state2, beta1, beta2, 0.0, 0.0, eps, step,
                                          lr, qmap1, qmap2, absmax1, absmax2, weight_decay, gnorm_scale,
                                          skip_zeros)

    def update_32bit(name, g, p, state1, beta1, eps, step, lr, state2=None, beta2=0.0, weight_decay=0.0,
                     gnorm_scale=1.0, unorm_vec=None, max_unorm=0.0, skip_zeros=False):
        F.optimizer_update_32bit(name, g, p, state1, beta1, eps, step, lr, state2, beta2, 0.0, 0.0,
                                 weight_decay, gnorm_scale, unorm_vec, max_unorm=max_unorm,
                                 skip_zeros=skip_zeros)

    names = {k: getattr(F, k) for k in dir(F) if not k.startswith("__")}
    names.update(optimizer_update_8bit_blockwise=update_8bit_blockwise, optimizer_update_32bit=update_32bit)
    return types.SimpleNamespace(**names)


def _adapt(package: str) -> type[Optimizer]:
    """The package's 8-bit optimizer class with the bitsandbytes 0.50 adapters (module docstring)."""
    from bitsandbytes.optim.optimizer import Optimizer2State

    module = _optimizer_module(package)
    base = module.AdamW8bit
    if package == "q-galore-torch":
        module.F = _bnb050_functional()

    class Adapted(base):  # type: ignore[misc, valid-type]
        def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                     eps: float = 1e-8, weight_decay: float = 1e-2, min_8bit_size: int = 4096,
                     percentile_clipping: int = 100, block_wise: bool = True, is_paged: bool = False) -> None:
            if percentile_clipping != 100 or not block_wise:
                raise NotImplementedError("bitsandbytes 0.50 has no percentile clipping and no non-blockwise "
                                          "8-bit update: use percentile_clipping=100, block_wise=True")
            # What the package passes, by keyword: 8-bit states; no update-norm clipping, no zero skipping.
            Optimizer2State.__init__(self, "adam", params, lr, betas, eps, weight_decay, optim_bits=8,
                                     min_8bit_size=min_8bit_size, max_unorm=0.0, skip_zeros=False,
                                     is_paged=is_paged)
            self._old_config = {"percentile_clipping": percentile_clipping, "block_wise": block_wise}

        def get_config(self, gindex: int, pindex: int, group: dict[str, Any]) -> dict[str, Any]:
            return {**self._old_config, **super().get_config(gindex, pindex, group)}

        @torch.no_grad()
        def step(self, closure: Any = None) -> Any:
            with _cuda_sync_if_any():
                return super().step(closure)

    Adapted.__name__ = Adapted.__qualname__ = f"Adapted{'QGaLore' if 'q-' in package else 'GaLore'}AdamW8bit"
    return Adapted


class PublicDriver(Optimizer):
    """What Lightning steps: the package's optimizer(s) over GaLore-style groups.

    `layerwise=False`: one package optimizer over all groups, stepped after the closure.
    `layerwise=True`: one per parameter, stepped from its post-accumulate-grad hook (skipped while
    `defer` is set: micro-batches of an accumulation window), with the lr of this driver's group;
    for an INT8 weight (`_public_int8`: uint8, gradient in `float_grad`) the same hook is its
    `backward_hook` attribute, which its linear's backward calls.
    """

    def __init__(self, groups: list[dict[str, Any]], cls: type[Optimizer], layerwise: bool,
                 lr: float = 1e-3) -> None:
        super().__init__(groups, {"lr": lr})  # lr: for groups that do not set theirs
        self.layerwise, self.defer = layerwise, False
        self.inner: list[Optimizer] = []
        self._hooks = []
        self.int8 = [p for group in self.param_groups for p in group["params"] if is_int8_weight(p)]
        if not layerwise:
            self.inner.append(cls(self.param_groups))
            return
        for group in self.param_groups:
            for p in group["params"]:
                opt = cls([{**{k: v for k, v in group.items() if k != "params"}, "params": [p]}])
                self.inner.append(opt)
                if is_int8_weight(p):  # uint8: post-accumulate-grad hooks never fire on it
                    p.backward_hook = self._hook(opt, group)
                else:
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._hook(opt, group)))

    def _hook(self, opt: Optimizer, group: dict[str, Any]) -> Any:
        def hook(p: torch.Tensor) -> None:
            if self.defer:
                return
            opt.param_groups[0]["lr"] = group["lr"]
            opt.step()
            opt.zero_grad(set_to_none=True)

        return hook

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()  # backward: the layer-wise hooks step here
        if not self.layerwise:
            self.inner[0].step()  # INT8 weights: dequantize, update from float_grad, re-quantize
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Gradients and the INT8 weights' `float_grad`, which would otherwise keep accumulating."""
        super().zero_grad(set_to_none)
        for p in self.int8:
            if torch.is_tensor(p.float_grad):
                p.float_grad = None if set_to_none else p.float_grad.zero_()

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        for p in self.int8:
            p.__dict__.pop("backward_hook", None)

    def _states(self) -> Iterator[dict[str, Any]]:
        for opt in self.inner:
            yield from opt.state.values()

    def state_nbytes(self) -> dict[str, int]:
        """Bytes of the 8-bit/32-bit moments (with their absmax) and of the projections (MemoryMonitor
        reads these two); of the INT8 weights' uint8 codes (parameters: in MemoryMonitor's `params`)
        and of their scales and zeros (attributes of the weights: counted nowhere else)."""
        moments = projections = 0
        for state in self._states():
            moments += sum(v.nbytes for k, v in state.items()
                           if k in ("state1", "state2", "absmax1", "absmax2") and torch.is_tensor(v))
            proj = state.get("projector")
            for name in ("ortho_matrix", "ortho_matrix_scales", "ortho_matrix_zeros"):
                t = getattr(proj, name, None)
                projections += t.nbytes if torch.is_tensor(t) else 0
        return {"moments": moments, "projections": projections,
                "int8_codes": sum(p.nbytes for p in self.int8),  # uint8 between steps
                "int8_scales_zeros": sum(p.scales.nbytes + p.zeros.nbytes for p in self.int8)}

    def svd_count(self) -> int:
        """SVDs run: q-galore-torch counts them; galore-torch refreshes at a fixed gap from step 0."""
        total = 0
        for state in self._states():
            proj = state.get("projector")
            if proj is not None:
                total += getattr(proj, "svd_count", None) or math.ceil(state["step"] / proj.update_proj_gap)
        return total


def public_driver(package: str, module: torch.nn.Module, q: dict[str, Any], lr: float,
                  betas: tuple[float, float], eps: float, weight_decay: float) -> PublicDriver:
    """`package`'s 8-bit GaLore AdamW over `module`: the weights of the linears matching
    `q["target_modules"]` and not `q["exclude"]` at `q["rank"]` (GaLore groups: `update_proj_gap`,
    `scale`; q-galore adds INT4 projections of `proj_group_size` when `proj_quant`, and
    `cos_threshold`, `gamma_proj`, `queue_size`), every other trainable parameter in plain 8-bit AdamW
    groups; layer-wise when `q["layerwise"]` (as galore-torch's README: one optimizer a parameter,
    stepped from its post-accumulate-grad hook). `q`: a `qgl.config` qgalore section as a dict.
    If `module` holds `_public_int8.Int8SimLinear`s (`to_int8`: the same target linears), their
    uint8 weights are that GaLore group."""
    galore = dict(rank=q["rank"], update_proj_gap=q["update_proj_gap"], scale=q["scale"], proj_type="std")
    if package == "q-galore-torch":
        galore.update(quant=q["proj_quant"], quant_n_bit=4, quant_group_size=q["proj_group_size"],
                      cos_threshold=q["cos_threshold"], gamma_proj=q["gamma_proj"],
                      queue_size=q["queue_size"])
    common = dict(lr=lr, betas=betas, eps=eps, user_group=0)
    groups = []
    int8 = [m.weight for m in int8_modules(module).values()]
    if int8:
        if package != "q-galore-torch":
            raise ValueError(f"{package} has no INT8-weight mode: only q-galore-torch updates uint8 weights")
        groups.append(dict(params=int8, weight_decay=weight_decay, **common, **galore))
    # make_param_groups skips the uint8 weights (requires_grad=False): with INT8 weights it is asked
    # for plain groups only (rank None), since its GaLore selection would now be empty.
    for ours in make_param_groups(module, None if int8 else q["rank"], q["target_modules"], q["exclude"],
                                  weight_decay=weight_decay):
        extra = galore if ours["rank"] is not None else {}
        groups.append(dict(params=ours["params"], weight_decay=ours["weight_decay"], **common, **extra))
    return PublicDriver(groups, _adapt(package), layerwise=q["layerwise"])


class PublicGaLoreCallback(OptimizerSwap):
    """Train with a public package's optimizer: `package` "galore-torch" or "q-galore-torch", on the
    weights of the linears matching `target_modules` and not `exclude` at `rank` (GaLore groups:
    `update_proj_gap`, `scale`; q-galore adds INT4 projections of `proj_group_size` when
    `proj_quant`, and `cos_threshold`, `gamma_proj`, `queue_size`); every other trainable parameter
    in plain 8-bit AdamW groups. lr, betas, eps and weight decay: the module optimizer's.

    `int8_weights` (default: True for q-galore-torch; galore-torch has no INT8 mode): in `setup`,
    before Lightning builds the optimizer and moves the model, those linears become
    `_public_int8.Int8SimLinear`s (uint8 weights in groups of the qgalore section's `group_size`,
    stochastic rounding), q-galore-torch's published INT8-weight simulation."""

    def __init__(self, package: str, qgalore: dict[str, Any], int8_weights: bool | None = None) -> None:
        super().__init__(self._build)
        if package not in PACKAGES:
            raise ValueError(f"unknown package {package!r}; known: {', '.join(PACKAGES)}")
        if int8_weights is None:
            int8_weights = package == "q-galore-torch"
        if int8_weights and package != "q-galore-torch":
            raise ValueError(f"{package} has no INT8-weight mode: use int8_weights=False")
        self.package, self.q, self.int8_weights = package, dict(qgalore), int8_weights

    def _build(self, user: Optimizer, device: torch.device) -> Optimizer:
        if len(user.param_groups) != 1:
            raise ValueError("PublicGaLoreCallback needs a module optimizer with one param group")
        g = user.param_groups[0]
        return public_driver(self.package, self._module, self.q, lr=float(g["lr"]), betas=tuple(g["betas"]),
                             eps=g["eps"], weight_decay=g["weight_decay"])

    def setup(self, trainer: Any, pl_module: Any, stage: str = "fit") -> None:
        layerwise = self.q.get("layerwise", True)
        if stage == "fit" and trainer.gradient_clip_val and (layerwise or self.int8_weights):
            why = ("layer-wise public optimizers free each gradient in backward" if layerwise
                   else "gradient clipping never sees the INT8 weights' gradients (float_grad)")
            raise ValueError(f"{why}: set trainer.gradient_clip_val=null")
        if stage == "fit" and self.int8_weights and not int8_modules(pl_module):
            to_int8(pl_module, self.q["target_modules"], self.q["exclude"],
                    group_size=self.q.get("group_size", 256))
        self._module = pl_module
        super().setup(trainer, pl_module, stage)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self.optimizer.defer = should_accumulate(trainer)

    def restore_module(self, pl_module: Any) -> None:  # at teardown and on_exception
        super().restore_module(pl_module)
        if isinstance(self.optimizer, PublicDriver):
            self.optimizer.remove_hooks()
