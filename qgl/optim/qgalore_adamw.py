"""QGaLoreAdamW: AdamW with GaLore low-rank projection, 8-bit moments and INT8-weight updates.

Each parameter group is either a *GaLore group* (`rank` set: 2-D weights whose gradient is
projected into a rank-r subspace, Adam runs there, the update is projected back and scaled)
or a *plain group* (`rank=None`: ordinary AdamW on the full gradient). In both, moments are
kept in 8 bits (`optim_bits=8`, bitsandbytes' blockwise format) or fp32 (`optim_bits=32`).

The update of one parameter is `qgl.optim.update.apply_update`, a pure function of (gradient,
state, group settings, weight storage). The storage of a parameter that is the gradient carrier of
a `qgl.nn.QLinear` is its `qgl.quant.Int8Tensor` (`qgl.quant.storage_of`): W_int8 <- SR(decay *
dequant(W) + delta) with stochastic rounding; other parameters are updated in place.

This class owns the per-parameter state (`self.state`), the settings (`param_groups`) and the
order of work: `update_param` looks them up and calls `apply_update` once, inside the offloader's
`resident` context when states are offloaded. With `layerwise=True` a `LayerwiseDriver` calls
`update_param` from every trainable parameter's post-accumulate-grad hook and frees the gradient,
so no full-model gradient exists (see `qgl/optim/layerwise.py` for the rules on accumulation and
clipping).

Data-parallel training: `distribute(shard=..., group=...)` attaches a
`qgl.optim.distributed.DistributedLayerwise` (`self.distributed`), which reduces each gradient
before its update; `step`, `state_dict`, `load_state_dict`, `consolidate_state_dict` and
`subspace_stats` then consult it (each says how). Without it they are the single-process ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from qgl.optim.adam import init_moments, moments_nbytes
from qgl.optim.finite import NonFiniteFlags
from qgl.optim.graphed import GraphedUpdates
from qgl.optim.layerwise import LayerwiseDriver
from qgl.optim.offload import make_offloader, offloaded_nbytes
from qgl.optim.projector import GaLoreProjector
from qgl.optim.refresh import AdaptiveRefresh
from qgl.optim.settings import GALORE, QGALORE, GaLoreSettings, OptimizerSettings, check_value, rank_fits
from qgl.optim.update import apply_update
from qgl.quant import storage_of

if TYPE_CHECKING:
    from qgl.optim.distributed import DistributedLayerwise

# GaLore group keys and their defaults: `qgl.optim.settings.GaLoreSettings`' fields; rank None: plain AdamW.
GALORE_DEFAULTS: dict[str, Any] = {**GALORE, "rank": None}


class QGaLoreAdamW(torch.optim.Optimizer):
    """AdamW with GaLore projection, INT4 projections, 8-bit moments and INT8 weights.

    Args:
        params: parameters or param groups (see `qgl.optim.make_param_groups`). Group keys
            beyond AdamW's: `rank` (None: plain AdamW), `update_proj_gap`, `scale`, `proj_quant`
            (store P in INT4), `proj_group_size`, `adaptive` (layer-adaptive refresh),
            `cos_threshold`, `gamma_proj`, `queue_size`, `max_gap`, `svd_method`
            ("full" | "randomized"), `refresh_metric` ("leading" | "subspace", `qgl.optim.refresh`),
            `optim_bits` (8 | 32), `min_8bit_size` (smaller tensors keep
            fp32 moments), `seed` and `stochastic_rounding` (False: round INT8 updates to nearest, an
            ablation), `names` (for monitoring).
        layerwise: step each parameter in backward from its post-accumulate-grad hook.
        layerwise_clip_norm: with `layerwise`, clip each parameter's gradient to this norm
            (global clipping needs every gradient at once, which layer-wise updates never hold).
        check_finite: raise `FloatingPointError` on a non-finite gradient (one device sync per
            step, none inside the per-parameter loop).
        offload: keep every parameter's optimizer state (moments, P) in host memory between its
            updates: True or "cpu" (pinned CPU memory, prefetched on a side stream,
            `qgl.optim.offload.StateOffloader`), "paged" (bitsandbytes' unified-memory codes, CUDA
            only), False (off). Updates are identical with and without it.
        cuda_graphs: replay the update of each CUDA GaLore matrix with 8-bit moments as a CUDA graph
            between its refreshes (`qgl.optim.graphed`; off with offload and after `distribute()`).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        optim_bits: int = QGALORE["optim_bits"],
        min_8bit_size: int = QGALORE["min_8bit_size"],
        seed: int = 0,
        stochastic_rounding: bool = True,
        layerwise: bool = False,
        layerwise_clip_norm: float | None = None,
        check_finite: bool = True,
        offload: bool | str | None = False,
        cuda_graphs: bool = QGALORE["cuda_graphs"],
        **galore: Any,
    ):
        unknown = set(galore) - set(GALORE_DEFAULTS)
        if unknown:
            raise TypeError(
                f"QGaLoreAdamW got unknown arguments {sorted(unknown)}; "
                f"GaLore options are {sorted(GALORE_DEFAULTS)}"
            )
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0 (got {lr}, {eps}, {weight_decay})")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        check_value(OptimizerSettings, "optim_bits", optim_bits)
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            optim_bits=optim_bits,
            min_8bit_size=min_8bit_size,
            seed=seed,
            stochastic_rounding=stochastic_rounding,
            **{**GALORE_DEFAULTS, **galore},
        )
        super().__init__(params, defaults)
        self.check_finite = check_finite
        self.finite_flags = NonFiniteFlags([p for g in self.param_groups for p in g["params"]])
        self._index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        self._group_of = {p: g for g in self.param_groups for p in g["params"]}
        self._name = {
            p: name
            for g in self.param_groups
            for p, name in zip(g["params"], g.get("names") or [], strict=False)
        }
        for group in self.param_groups:
            self._validate_group(group)
        # What the update of each parameter needs besides its gradient and state, looked up once: its
        # group (settings; the live dict, which LR schedulers write), its index (keys the stochastic
        # rounding) and its weight storage (the INT8 weight of a QLinear carrier, else the Parameter).
        self._slot = {p: (self._group_of[p], i, storage_of(p) or p) for p, i in self._index.items()}
        self.offloader = make_offloader(offload)
        # States that move between host and device change addresses: graphs only without offload.
        self.graphs = GraphedUpdates() if cuda_graphs and self.offloader is None else None
        self.layerwise = (
            LayerwiseDriver(
                [p for g in self.param_groups for p in g["params"]],
                self.update_param,
                self.param_name,
                check_finite=check_finite,
                clip_norm=layerwise_clip_norm,
            )
            if layerwise
            else None
        )
        self.distributed: DistributedLayerwise | None = None  # set by `distribute()`
        if layerwise_clip_norm is not None and not layerwise:
            raise ValueError(
                "layerwise_clip_norm needs layerwise=True; without it, clip with "
                "torch.nn.utils.clip_grad_norm_ over all parameters (INT8 weights included)"
            )

    # ----------------------------------------------------------------- set-up and names

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_value(OptimizerSettings, "optim_bits", group["optim_bits"])
        check_value(OptimizerSettings, "min_8bit_size", group["min_8bit_size"])
        rank = group["rank"]
        if rank is None:
            return
        # Every GaLore option, checked once here, at construction (not in the first backward hook).
        GaLoreSettings(**{k: group[k] for k in GALORE_DEFAULTS})
        for p in group["params"]:
            name = self.param_name(p)
            if p.ndim != 2:
                raise ValueError(
                    f"GaLore group parameter {name} has shape {tuple(p.shape)}: only 2-D weights "
                    "can be projected; put it in a group with rank=None"
                )
            rank_fits(rank, tuple(p.shape), name)

    def param_name(self, p: Tensor) -> str:
        """The name given in the group's `names`, else `param<index>`."""
        return self._name.get(p, f"param{self._index[p]}")

    def _new_projector(self, p: Tensor, group: dict[str, Any]) -> GaLoreProjector:
        refresh = AdaptiveRefresh(
            update_proj_gap=group["update_proj_gap"],
            adaptive=group["adaptive"],
            cos_threshold=group["cos_threshold"],
            gamma_proj=group["gamma_proj"],
            queue_size=group["queue_size"],
            max_gap=group["max_gap"],
            metric=group["refresh_metric"],
        )
        return GaLoreProjector(
            tuple(p.shape),
            group["rank"],
            scale=group["scale"],
            quantize=group["proj_quant"],
            group_size=group["proj_group_size"],
            svd_method=group["svd_method"],
            refresh=refresh,
            name=self.param_name(p),
        )

    def _init_state(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        state["step"] = 0
        if group["rank"] is None:
            state.update(init_moments(tuple(p.shape), p.device, group["optim_bits"], group["min_8bit_size"]))
            return
        projector = self._new_projector(p, group)
        state["projector"] = projector
        state.update(init_moments(projector.low_shape, p.device, group["optim_bits"], group["min_8bit_size"]))

    def distribute(self, shard: bool = True, group: Any = None) -> DistributedLayerwise:
        """Make this optimizer data-parallel over `group` (default: the world; torch.distributed
        must be initialized): a `qgl.optim.distributed.DistributedLayerwise` takes over the
        layer-wise hooks (reduce, then update) and is kept as `self.distributed`.

        Args:
            shard: each parameter's state on one owner rank (reduce + weight broadcast), else
                all-reduce and every rank holds every state.
            group: the process group.
        """
        from qgl.optim.distributed import DistributedLayerwise

        if self.distributed is not None:
            raise RuntimeError("QGaLoreAdamW.distribute() was already called on this optimizer")
        self.distributed = DistributedLayerwise(self, shard=shard, group=group)
        self.graphs = None  # updates on owner ranks after a reduce: kept eager (not measured with graphs)
        return self.distributed

    # ----------------------------------------------------------------- the update

    def update_param(self, p: Tensor) -> None:
        """Apply one AdamW step to `p` from `p.grad` (does not free the gradient), under
        `torch.no_grad()`: entered only when grad mode is on (as `LayerwiseDriver.update_from_grad`,
        which calls it once per matrix from the backward hooks, where grad mode is off)."""
        if torch.is_grad_enabled():
            with torch.no_grad():
                return self.update_param(p)
        if self.offloader is None:
            return self._update_param(p)
        with self.offloader.resident(p, self.state[p]):
            self._update_param(p)

    def _update_param(self, p: Tensor) -> None:
        group, index, weight = self._slot[p]
        state = self.state[p]
        if not state:
            self._init_state(p, group, state)
        graphs, grad = self.graphs, p.grad
        if graphs is None or not graphs.serves(weight, grad, state, group):
            apply_update(weight, grad, state, group, index)
        elif not graphs.replay(p, grad, state, group):
            # A refresh step runs eagerly with the device scalars, the step after it is captured (and
            # replayed): `qgl.optim.graphed`.
            with graphs.recording(p, grad, state, group) as run:
                apply_update(weight, run.grad, state, group, index, run.scalars)
            if run.failed:  # the capture failed (warned once): this update, and the later ones, eagerly
                apply_update(weight, grad, state, group, index)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """Step every parameter that holds a gradient (with `layerwise`, those the hooks deferred),
        then raise on the non-finite gradients the hooks met. After `distribute()`: its `step`, which
        runs `local_step` on every rank and makes the non-finite check (and, sharded without
        `layerwise`, the weights) agree across ranks."""
        if self.distributed is not None:
            return self.distributed.step(closure)
        return self.local_step(closure)

    @torch.no_grad()
    def local_step(self, closure: Callable[[], Any] | None = None) -> Any:
        """`step` on this process's gradients and states only."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pending = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if self.check_finite and pending:
            self._raise_if_nonfinite(pending, [p.grad for p in pending])
        for p in pending:
            self.update_param(p)
            if self.layerwise is not None:
                p.grad = None
        if self.offloader is not None:
            self.offloader.end_step()
        if self.layerwise is not None:
            self.layerwise.raise_if_nonfinite()
        return loss

    def _raise_if_nonfinite(self, params: list[Tensor], grads: list[Tensor]) -> None:
        for p, g in zip(params, grads, strict=True):
            self.finite_flags.check_(p, g)
        flagged = self.finite_flags.pop_flagged()  # the one device sync of the step
        if flagged:
            bad = [self.param_name(p) for p in flagged]
            raise FloatingPointError(f"non-finite gradient in {bad}; no parameter was updated this step")

    # ----------------------------------------------------------------- monitoring

    def subspace_stats(self) -> dict[str, dict[str, Any]]:
        """Per GaLore parameter: SVD count and seconds, current gap, last cosine, frozen flag.
        After `distribute(shard=True)` a collective (every rank calls it): every owner's, merged."""
        local = self.local_subspace_stats()
        return local if self.distributed is None else self.distributed.gather_stats(local)

    def local_subspace_stats(self) -> dict[str, dict[str, Any]]:
        """`subspace_stats` of the parameters whose state this process holds."""
        stats = {}
        for group in self.param_groups:
            for p in group["params"]:
                projector = self.state[p].get("projector") if p in self.state else None
                if projector is None:
                    continue
                r = projector.refresh
                stats[self.param_name(p)] = dict(
                    step=self.state[p]["step"],
                    svd_count=r.svd_count,
                    svd_seconds=r.svd_seconds,
                    gap=r.gap,
                    last_cos=r.last_cos,
                    frozen=r.frozen,
                    refresh_steps=list(r.refresh_steps),
                    galore_svds=r.galore_svds(self.state[p]["step"]),
                )
        return stats

    def state_nbytes(self) -> dict[str, int]:
        """Bytes held by the optimizer: Adam moments and projection matrices. With `offload`, those
        on the device; the ones in host (or unified) memory under `offloaded_moments|projections`."""
        if self.offloader is not None:
            return offloaded_nbytes(self.offloader, self.state.values())
        moments = projections = 0
        for state in self.state.values():
            moments += moments_nbytes(state)
            if "projector" in state:
                projections += state["projector"].nbytes
        return {"moments": moments, "projections": projections}

    # ----------------------------------------------------------------- checkpointing

    def consolidate_state_dict(self, to: int = 0) -> None:
        """Lightning's sharded-optimizer protocol (as `ZeroRedundancyOptimizer`'s; its strategies call
        it on every rank before `state_dict()` when the method exists). After `distribute(shard=True)`
        a collective: the next `state_dict()` of rank `to` holds every owner's states. Else nothing
        to gather."""
        if self.distributed is not None:
            self.distributed.consolidate_state_dict(to)

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state (projectors as their own state dicts). After `distribute()`: the
        consolidated one once after `consolidate_state_dict()`, else this rank's own."""
        if self.distributed is not None:
            return self.distributed.state_dict()
        return self.local_state_dict()

    def local_state_dict(self) -> dict[str, Any]:
        """`state_dict` of the states this process holds."""
        if self.offloader is not None:
            self.offloader.synchronize()  # host copies of the last updates may still be in flight
        sd = super().state_dict()
        # super() shares the live per-parameter dicts: copy them before swapping projectors out.
        sd["state"] = {
            k: {key: (v.state_dict() if isinstance(v, GaLoreProjector) else v) for key, v in st.items()}
            for k, st in sd["state"].items()
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a `state_dict()`; tensors keep their saved dtype (torch's default would cast
        fp32 moment scales to a bf16 parameter's dtype). After `distribute()` the single-process
        (consolidated) one, of which each rank keeps the states it owns."""
        if self.distributed is not None:
            state_dict = self.distributed.owned_state(state_dict)
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(saved_groups)} param groups, the optimizer {len(self.param_groups)}"
            )
        id_to_param = {}
        for saved, group in zip(saved_groups, self.param_groups, strict=True):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError("state_dict's param groups do not match the optimizer's (different sizes)")
            id_to_param.update(zip(saved["params"], group["params"], strict=True))
        for saved, group in zip(saved_groups, self.param_groups, strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})
        self.state.clear()
        if self.graphs is not None:
            self.graphs.forget()  # the graphs read the replaced states' tensors
        for key, saved_state in state_dict["state"].items():
            p = id_to_param[key]
            # Offloaded states load straight into host memory: the device never holds them all.
            device = torch.device("cpu") if getattr(self.offloader, "mode", None) == "cpu" else p.device
            state = {k: _to_device(v, device) for k, v in saved_state.items() if k != "projector"}
            if "projector" in saved_state:
                projector = self._new_projector(p, self._group_of[p])
                projector.load_state_dict(_to_device(saved_state["projector"], device))
                state["projector"] = projector
            self.state[p] = state
            if self.offloader is not None:
                self.offloader.adopt(p, state)


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    return value
