"""Data-parallel QGaLoreAdamW: layer-wise updates with gradients reduced across processes.

    optimizer = QGaLoreAdamW(...)
    optimizer.distribute(shard=True)   # -> optimizer.distributed, a DistributedLayerwise

Every trainable parameter's gradient is averaged over the ranks from its post-accumulate-grad
hook, before its update, so layer-wise updates stay layer-wise and no full-model gradient is
held (DDP's own reducer, which writes averaged gradients only at the end of backward, must not
see these parameters: `ddp_ignored_names`). Communication is asynchronous and overlapped with
the rest of backward: the hook of parameter k issues its reduction and then finishes parameter
k-1 (waits, updates, frees), so at most two reduced gradients are alive besides the one
autograd is writing; the last is finished by a callback queued at the end of backward.

`shard=False`: all-reduce; every rank holds every state and runs every update (identical, the
stochastic rounding being seeded by (seed, parameter, step)). `shard=True` (ZeRO-1 in spirit):
each parameter has one owner rank (`assign_owners`, size-balanced); its gradient is reduced to
the owner only, the owner alone holds its state (moments, projector, INT4 P, refresh queue) and
runs its update (SVD included), then broadcasts the new weight: INT8 codes + scales (+ zeros) of
a `QLinear`, the float tensor otherwise. Updates are the unsharded ones, bit for bit.

The gradient is divided by the world size before the sum: with N a power of two that is exact,
so the averaged gradient has the bits of the single-process sum of the N micro-batch gradients
of loss/N (gradient accumulation over the same global batch).

The optimizer consults its `distributed` explicitly: `QGaLoreAdamW.step` calls `step` here (the
non-finite check made collective: under sharding only an owner sees its reduced gradient; sharded
and not layer-wise, the weights broadcast from their owners), `subspace_stats` calls `gather_stats`.
Checkpoints: `QGaLoreAdamW.consolidate_state_dict()` (Lightning calls it before `state_dict()` on
every rank, as for `ZeroRedundancyOptimizer`) calls `consolidate_state_dict` here, which gathers
the owners' states to rank 0, so the checkpoint holds the single-process optimizer state and loads
on any world size; `QGaLoreAdamW.load_state_dict` keeps the states this rank owns (`owned_state`).
"""

from __future__ import annotations

import heapq
from collections import deque
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from qgl.quant import storage_of

if TYPE_CHECKING:
    from qgl.optim.qgalore_adamw import QGaLoreAdamW


def state_cost(p: Tensor, group: dict[str, Any]) -> int:
    """Estimated optimizer-state bytes of `p` in `group` (moments at 1 byte per element each in
    8 bits, 4 in fp32; the projection r x n or m x r at 1/2 byte in INT4, 4 in fp32)."""
    if group.get("rank") is None or p.ndim != 2:
        n = p.numel()
        per = 2 if group.get("optim_bits", 8) == 8 and n >= group.get("min_8bit_size", 4096) else 8
        return n * per
    m, n = p.shape
    r = group["rank"]
    low = r * n if m >= n else m * r
    per = 2 if group.get("optim_bits", 8) == 8 and low >= group.get("min_8bit_size", 4096) else 8
    proj = low // 2 if group.get("proj_quant", True) else low * 4
    return low * per + proj


def balance(costs: list[tuple[int, bool]], world_size: int) -> list[int]:
    """Owner rank of each (cost, projected) item: greedy largest-first onto the least-loaded rank
    (ties: lowest rank, then item order): the projected matrices first, so that their SVDs spread
    evenly, then the plain parameters onto the same loads, so that the bytes do too. Deterministic:
    every rank computes the same map."""
    owners = [0] * len(costs)
    loads = [(0, r) for r in range(world_size)]
    for projected in (True, False):
        items = sorted((-c, i) for i, (c, pr) in enumerate(costs) if pr == projected)
        for neg, i in items:
            load, r = heapq.heappop(loads)
            owners[i] = r
            heapq.heappush(loads, (load - neg, r))
    return owners


def assign_owners(optimizer: QGaLoreAdamW, world_size: int) -> dict[Tensor, int]:
    """Owner rank of every parameter of `optimizer` (`balance` of their `state_cost`)."""
    params = [(p, g) for g in optimizer.param_groups for p in g["params"]]
    costs = [(state_cost(p, g), g.get("rank") is not None and p.ndim == 2) for p, g in params]
    return {p: r for (p, _), r in zip(params, balance(costs, world_size), strict=True)}


def weight_tensors(p: Tensor) -> list[Tensor]:
    """The tensors that hold `p`'s value: a carrier's INT8 codes, scales (and zeros) (its
    `qgl.quant.Int8Tensor`, a view of the QLinear's buffers), else `p` itself."""
    storage = storage_of(p)
    if storage is None:
        return [p.data]
    return [t for t in (storage.q, storage.scale, storage.zero) if t is not None]


def broadcast_weights(params: list[Tensor], src: int = 0, group: Any = None) -> None:
    """Make every rank's weights of `params` those of rank `src` (the INT8 buffers of carriers)."""
    works = [dist.broadcast(t, src, group=group, async_op=True) for p in params for t in weight_tensors(p)]
    for w in works:
        w.wait()


class DistributedLayerwise:
    """Reduce-then-update hooks in place of the optimizer's layer-wise ones (see the module docstring).
    Made by `QGaLoreAdamW.distribute()`, which keeps it as `optimizer.distributed`.

    Without `layerwise` the hooks only reduce (the owner keeps the averaged gradient, a non-owner
    frees it) and the optimizer's `step` updates the owned parameters, then broadcasts every weight
    from its owner; `defer` (set by the caller from the accumulation schedule) skips the hooks.

    Args:
        optimizer: a `QGaLoreAdamW`; with `layerwise=True` its driver keeps the rules
            (accumulation `defer`, finite check, per-parameter clipping) and does each update.
        shard: own each parameter's state on one rank (reduce + broadcast) instead of all-reduce.
        group: the process group (default: the world).
    """

    def __init__(self, optimizer: QGaLoreAdamW, shard: bool = True, group: Any = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("DistributedLayerwise needs an initialized torch.distributed process group")
        self.optimizer, self.shard, self.group = optimizer, shard, group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.owners = assign_owners(optimizer, self.world_size) if shard else {}
        self._global = {r: (r if group is None else dist.get_global_rank(group, r))
                        for r in range(self.world_size)}
        self._pending: deque[tuple[Tensor, Any]] = deque()
        self._broadcasts: list[Any] = []
        self._queued = False
        self._consolidated: dict[str, Any] | None = None
        self.driver = optimizer.layerwise
        self.defer = False  # without a layer-wise driver: skip the hooks (accumulating micro-batches)
        if self.driver is not None:
            self.driver.remove()  # our hooks call the driver's update after the reduction
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params
                         if p.requires_grad]

    def owns(self, p: Tensor) -> bool:
        """Whether this rank holds `p`'s state and runs its update."""
        return not self.shard or self.owners[p] == self.rank

    # ------------------------------------------------------------------ backward

    @torch.no_grad()
    def _on_grad(self, p: Tensor) -> None:
        if (self.driver.defer if self.driver is not None else self.defer):
            return  # accumulating micro-batches: no communication (as DDP's no_sync)
        if not self._queued:
            torch.autograd.Variable._execution_engine.queue_callback(self.flush)
            self._queued = True
        grad = p.grad
        grad.div_(self.world_size)  # exact for a power-of-two world size
        if self.shard:
            work = dist.reduce(grad, self._global[self.owners[p]], group=self.group, async_op=True)
        else:
            work = dist.all_reduce(grad, group=self.group, async_op=True)
        self._pending.append((p, work))
        while len(self._pending) > 1:  # finish the previous parameter while this one travels
            self._finish(*self._pending.popleft())

    def _finish(self, p: Tensor, work: Any) -> None:
        work.wait()
        if not self.owns(p):
            p.grad = None
        elif self.driver is not None:
            self.driver.update_from_grad(p)  # finite check, clip, update, free the gradient
        if self.shard and self.driver is not None:
            src = self._global[self.owners[p]]
            self._broadcasts += [dist.broadcast(t, src, group=self.group, async_op=True)
                                 for t in weight_tensors(p)]

    @torch.no_grad()
    def flush(self) -> None:
        """Finish every pending reduction and weight broadcast (queued at the end of each backward)."""
        self._queued = False
        while self._pending:
            self._finish(*self._pending.popleft())
        for work in self._broadcasts:
            work.wait()
        self._broadcasts = []

    def remove(self, finish: bool = True) -> None:
        """Detach the hooks; `finish=False` (after an exception) does not wait for pending communication."""
        if finish:
            self.flush()
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ------------------------------------------------------------------ state: bytes, checkpoints, stats

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """`QGaLoreAdamW.step` under DDP: its `local_step` (the closure's backward reduced the
        gradients); under sharding a non-finite gradient met by any owner raises on every rank, and
        without a layer-wise driver every weight is then broadcast from its owner."""
        if not self.shard:  # every rank holds the same gradients: the local check agrees everywhere
            return self.optimizer.local_step(closure)
        message = None
        try:
            loss = self.optimizer.local_step(closure)
        except FloatingPointError as err:
            loss, message = None, str(err)
        self.raise_if_any_nonfinite(message)
        if self.driver is None:  # the layer-wise hooks broadcast each weight after its update
            works = [dist.broadcast(t, self._global[self.owners[p]], group=self.group, async_op=True)
                     for p in self.params for t in weight_tensors(p)]
            for work in works:
                work.wait()
        return loss

    def raise_if_any_nonfinite(self, message: str | None) -> None:
        """Collective: raise FloatingPointError on every rank if any rank's `message` (its local
        non-finite error, None if none) is set (one all-reduce of a flag a step; the messages are
        gathered only then)."""
        device = self.params[0].device if self.params[0].device.type != "cpu" else torch.device("cpu")
        flag = torch.tensor([0 if message is None else 1], device=device)
        dist.all_reduce(flag, group=self.group)
        if int(flag.item()):
            messages: list[Any] = [None] * self.world_size
            dist.all_gather_object(messages, message, group=self.group)
            raise FloatingPointError("; ".join(f"rank {r}: {m}" for r, m in enumerate(messages) if m))

    def local_state_dict(self) -> dict[str, Any]:
        """This rank's `state_dict()` (the states it owns)."""
        return self.optimizer.local_state_dict()

    def consolidate_state_dict(self, to: int = 0) -> None:
        """Collective: gather every owner's states into rank `to`'s next `state_dict()`."""
        self.flush()
        local = self.local_state_dict()
        if not self.shard:
            self._consolidated = local
            return
        gathered: list[Any] | None = [None] * self.world_size if self.rank == to else None
        dist.gather_object(local["state"], gathered, dst=self._global[to], group=self.group)
        if gathered is not None:
            state: dict[int, Any] = {}
            for part in gathered:
                state.update(part)
            self._consolidated = {**local, "state": dict(sorted(state.items()))}

    def state_dict(self) -> dict[str, Any]:
        """The consolidated state after `consolidate_state_dict()` (once), else this rank's own."""
        out, self._consolidated = self._consolidated, None
        return out if out is not None else self.local_state_dict()

    def owned_state(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """A single-process (consolidated) state dict with only the states this rank owns (what
        `QGaLoreAdamW.load_state_dict` loads)."""
        keep = {i for i, p in enumerate(self.params) if self.owns(p)}
        state = {k: v for k, v in state_dict["state"].items() if int(k) in keep}
        return {**state_dict, "state": state}

    def gather_stats(self, local: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Collective under sharding: every owner's `local_subspace_stats()`, merged on every rank."""
        if not self.shard:
            return local
        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, local, group=self.group)
        merged: dict[str, dict[str, Any]] = {}
        for part in parts:
            merged.update(part)
        return {name: merged[name] for name in sorted(merged, key=self._order)}

    def _order(self, name: str) -> int:
        names = getattr(self, "_names", None)
        if names is None:
            names = self._names = {self.optimizer.param_name(p): i for i, p in enumerate(self.params)}
        return names.get(name, len(names))
