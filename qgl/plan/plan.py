"""`plan_memory`: the peak GPU memory of a training step and its parts, before anything is built.

    plan = plan_memory(load_recipe("pretrain/llama_7b", ["data.source=x"]))
    print(plan.table())           # parts in bytes: plan.parts, plan.total
    plan.fit(16 * 2**30)          # offload / checkpointing / micro-batch settings that fit 16 GiB

`total` predicts `torch.cuda.max_memory_allocated` over a step on the CUDA path (bitsandbytes'
fused 8-bit Adam, Triton INT8/INT4 kernels, flash or memory-efficient SDPA). Each part is that
part's own maximum; the parts that peak at different moments do not add up: the loss's logits
(12 V bytes a token) are freed before the first layer update, whose gradient and temporaries are
freed before the next. So `total` is the largest *phase* (`phases`, see `_phases`): the persistent
parts (weights, buffers, optimizer state, autocast's weight copies, workspace) + what is alive
together in the loss's backward, in the layer updates of the backward, or in a separate optimizer
step. Not counted: the CUDA context and kernels (outside the allocator, about 0.5 GiB; `fit`
reserves `CUDA_CONTEXT_BYTES` for them), allocator fragmentation (reserved - allocated),
data-loader batches and Lightning's small tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from qgl.config import RecipeConfig
from qgl.models.llama import LLAMA_CONFIGS, LlamaConfig
from qgl.optim.adam import plain_chunk
from qgl.optim.distributed import balance
from qgl.optim.offload import PAGED_MIN_NUMEL
from qgl.plan.activations import activation_bytes, block_bytes_per_token
from qgl.plan.inventory import (
    Inventory,
    ParamInfo,
    grad_nbytes,
    int8_nbytes,
    inventory,
    state_nbytes,
    step_temp_nbytes,
)
from qgl.plan.settings import PlanError, PlanSettings, model_config

MIB, GIB = 2**20, 2**30
WORKSPACE_BYTES = 128 * MIB
"""cuBLAS/cuBLASLt workspaces (torch's default on Hopper, 32 MiB per stream: the compute stream and
the offload copy stream) and 64 MiB for the allocator's rounding and small tensors."""
CUDA_CONTEXT_BYTES = 512 * MIB
"""CUDA context and loaded kernels: device memory outside the caching allocator, reserved by `fit`."""
MONITOR_PARTS = ("int8_weights", "params", "buffers", "optimizer_moments", "projections")
PERSISTENT = (*MONITOR_PARTS, "weight_copies", "graph_buffers", "workspace")


class Fit(NamedTuple):
    settings: PlanSettings
    total: int


@dataclass
class MemoryPlan:
    """A plan: `parts` (GPU bytes, each part at its own maximum), `how` (each one's formula),
    `phases` (bytes alive together in each phase of the step; `total` is the largest), `host`
    (bytes kept in host or unified memory by offload), `notes`."""

    name: str
    config: LlamaConfig
    settings: PlanSettings
    parts: dict[str, int]
    how: dict[str, str]
    phases: dict[str, int]
    host: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    _inventory: Inventory | None = field(default=None, repr=False)

    @property
    def total(self) -> int:
        """Predicted peak of `torch.cuda.max_memory_allocated`, bytes: the largest phase."""
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.__getitem__)

    def monitor_parts(self) -> dict[str, int]:
        """The plan in `qgl.callbacks.MemoryMonitor`'s parts (for its `predicted=`)."""
        out = {k: self.parts[k] for k in MONITOR_PARTS}
        out["activations_other"] = self.total - sum(out.values())
        out["peak"] = self.total
        return out

    def candidates(self) -> list[Fit]:
        """Every setting `fit` considers, with its total: offload off/cpu (Q-GaLore), checkpointing
        off/on, micro-batches 1, 2, 4, ... dividing the global batch (accumulating the rest)."""
        global_batch = self.settings.batch_size * self.settings.accumulate
        micro = {2**k for k in range(global_batch.bit_length()) if global_batch % 2**k == 0}
        return self._grid(micro | {global_batch}, (self.settings.precision,), single_step=False)

    def single_step_candidates(self) -> list[Fit]:
        """Settings without accumulation (the global batch becomes the micro-batch): micro-batches 1, 2,
        4, ... up to the global batch, offload off/cpu, checkpointing off/on, in the recipe's precision
        and, from bf16-mixed, in bf16-true (16-bit parameters: embeddings, norms and head lose their
        fp32 copies). What `fit_table` offers when the global batch fits nowhere, because layer-wise
        updates that accumulate hold a full gradient over the window."""
        s = self.settings
        global_batch = s.batch_size * s.accumulate
        precisions = (s.precision, "bf16-true") if s.precision == "bf16-mixed" else (s.precision,)
        return self._grid({2**k for k in range(global_batch.bit_length())} | {global_batch}, precisions,
                          single_step=True)

    def _grid(self, micro: set[int], precisions: tuple[str, ...], single_step: bool) -> list[Fit]:
        """The plans of every (precision, offload, checkpointing, micro-batch) in that order of loops,
        accumulating to the global batch, or not at all with `single_step`."""
        s = self.settings
        global_batch = s.batch_size * s.accumulate
        out = []
        for precision in precisions:
            for offload in ((None, "cpu") if s.qgalore else (None,)):
                for ckpt in (False, True):
                    for mb in sorted(micro):
                        t = s.replace(precision=precision, offload=offload, checkpointing=ckpt, batch_size=mb,
                                      accumulate=1 if single_step else global_batch // mb)
                        out.append(Fit(t, _plan(self.name, self.config, t, self._inventory).total))
        return out

    def fit(self, budget: int, reserve: int = CUDA_CONTEXT_BYTES) -> list[Fit]:
        """Settings whose total + `reserve` fits `budget` bytes, the fastest first: no offload before
        offload, no checkpointing before checkpointing, then the largest micro-batch."""
        fits = [f for f in self.candidates() if f.total + reserve <= budget]
        return sorted(fits, key=lambda f: (f.settings.offload is not None, f.settings.checkpointing,
                                           -f.settings.batch_size))

    def table(self) -> str:
        """The plan as plain text: a line a part (MiB and formula), the phases, the total."""
        lines = [f"memory plan: {self.name}", f"  {self.settings.describe()}",
                 f"  {'part':<18}{'MiB':>11}  how"]
        lines += [f"  {k:<18}{v / MIB:>11,.1f}  {self.how[k]}" for k, v in self.parts.items()]
        lines.append("  phases (alive together; persistent = weights, buffers, optimizer state, copies, "
                     "workspace):")
        lines += [f"    {k:<16}{v / MIB:>11,.1f}  {_PHASE_HOW[k]}" for k, v in self.phases.items()]
        lines.append(f"  {'total (peak)':<18}{self.total / MIB:>11,.1f}  = {self.total / GIB:.2f} GiB "
                     f"({self.peak_phase}), predicted peak of torch.cuda.max_memory_allocated")
        for part, nbytes in self.host.items():
            lines.append(f"  {'host: ' + part:<18}{nbytes / MIB:>11,.1f}  in host memory (offload)")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def fit_table(self, budget: int, reserve: int = CUDA_CONTEXT_BYTES) -> str:
        """What `fit` finds, as text (or the smallest setting when nothing fits)."""
        head = (f"settings that fit {budget / GIB:.2f} GiB ({reserve / GIB:.2f} GiB kept for the CUDA "
                f"context), "
                f"global batch {self.settings.batch_size * self.settings.accumulate}:")
        base = self.settings
        row = lambda f: f"  {f.total / GIB:6.2f} GiB  {f.settings.describe()}{_overrides(base, f.settings)}"
        fits = self.fit(budget, reserve)
        if fits:
            return "\n".join([head, *map(row, fits)])
        best = min(self.candidates(), key=lambda f: f.total)
        lines = [head, f"  none: the smallest needs {(best.total + reserve) / GIB:.2f} GiB "
                       f"({best.settings.describe()})"]
        single = sorted((f for f in self.single_step_candidates() if f.total + reserve <= budget),
                        key=lambda f: (f.settings.precision != base.precision, f.settings.offload is not None,
                                       f.settings.checkpointing, -f.settings.batch_size))
        if single:
            lines.append("without accumulation (global batch = micro-batch), the recipe's precision first, "
                         "then the fastest; the overrides in brackets:")
            lines += map(row, single[:8])
        return "\n".join(lines)


_RECIPE_KEYS = {"batch_size": "data.batch_size", "accumulate": "trainer.accumulate_grad_batches",
                "precision": "trainer.precision", "checkpointing": "model.activation_checkpointing",
                "offload": "qgalore.offload"}


def _overrides(base: PlanSettings, new: PlanSettings) -> str:
    """The recipe overrides that turn `base` into `new` (`  [key=value ...]`), or "" if none."""
    changed = [f"{key}={_yaml(getattr(new, field))}" for field, key in _RECIPE_KEYS.items()
               if getattr(new, field) != getattr(base, field)]
    return f"  [{' '.join(changed)}]" if changed else ""


def _yaml(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


_PHASE_HOW = {"loss": "persistent + activations (less the recomputed block) + logits",
              "backward": "persistent + activations + gradients + grads_in_flight (+ update temporaries)",
              "step": "persistent + gradients + optimizer_step (activations freed)"}


def plan_memory(model: RecipeConfig | LlamaConfig | str, settings: PlanSettings | None = None,
                **changes: object) -> MemoryPlan:
    """Plan a step of `model`: a resolved recipe (its model, batch, precision and Q-GaLore settings
    are the defaults), a `LlamaConfig`, or a `LLAMA_CONFIGS` name (defaults: `PlanSettings()`).
    `settings` replaces the defaults and `changes` replace single fields, e.g. `checkpointing=True`.
    Raises `PlanError` (one line) for what cannot be planned."""
    if isinstance(model, RecipeConfig):
        name, config = model_config(model)
        base = settings or PlanSettings.from_recipe(model)
    elif isinstance(model, str):
        if model not in LLAMA_CONFIGS:
            raise PlanError(f"unknown LLaMA config {model!r}; known: {', '.join(LLAMA_CONFIGS)}")
        name, config, base = f"LLaMA-{model}", LLAMA_CONFIGS[model], settings or PlanSettings()
    else:
        name, config, base = "LLaMA", model, settings or PlanSettings()
    s = base.replace(**changes) if changes else base
    return _plan(name, config, s, inventory(config, s))


def predicted_parts(cfg: RecipeConfig) -> dict[str, int] | None:
    """`plan_memory(cfg).monitor_parts()`, or None when the recipe cannot be planned."""
    try:
        return plan_memory(cfg).monitor_parts()
    except PlanError:
        return None


def _plan(name: str, config: LlamaConfig, s: PlanSettings, inv: Inventory) -> MemoryPlan:
    parts, how, host = _persistent(config, s, inv)
    pb, cb, autocast = s.dtype_bytes
    params = inv.params
    largest_grad = max(params, key=lambda p: grad_nbytes(p, s))
    layerwise = s.qgalore and s.layerwise
    loss_states = None
    if layerwise and s.accumulate == 1:
        worst, window = _worst_update(inv, s)
        parts["gradients"] = grad_nbytes(worst, s)
        how["gradients"] = f"one at a time (layer-wise), that of the largest update: {worst.name}"
        if s.devices > 1:  # distributed: the previous parameter's reduction is still in flight
            parts["gradients"] += grad_nbytes(largest_grad, s)
            how["gradients"] += f", + one in its reduction across the {s.devices} GPUs"
        if s.offload == "cpu":
            parts["optimizer_moments"] = sum(m for m, _ in window)
            parts["projections"] = sum(pr for _, pr in window)
            how["optimizer_moments"] = how["projections"] = (
                f"states on the device in {worst.name}'s update: its own, the one before (written back), "
                "the one after (prefetched)")
            loss_states = sum(state_nbytes(inv.in_update_order()[0], s))
    else:
        full = pb * sum(p.numel for p in params)
        parts["gradients"] = full + grad_nbytes(largest_grad, s) - pb * largest_grad.numel
        how["gradients"] = f"all of them ({'accumulation' if layerwise else 'not layer-wise'}) x {pb} B"
        worst = max(params, key=lambda p: step_temp_nbytes(p, s))
    if s.qgalore:
        parts["optimizer_step"] = step_temp_nbytes(worst, s)
        how["optimizer_step"] = f"temporaries of {worst.name}'s update: " + (
            "SVD refresh or Adam + P" if worst.rank else f"Adam on one chunk of {plain_chunk():,} elements")
    else:
        parts["optimizer_step"] = pb * sum(p.numel for p in params)
        how["optimizer_step"] = "torch AdamW foreach: sqrt(exp_avg_sq) of every parameter"
    act = activation_bytes(config, s)
    block = block_bytes_per_token(config, cb, autocast)
    parts["activations"] = act.blocks + act.head + act.norm_copies
    how["activations"] = (f"saved for backward, {s.batch_size * s.seq_len} tokens x ("
                          + (f"{config.num_layers} x {pb} h block inputs + one {block} B block"
                             if s.checkpointing else f"{config.num_layers} x {block} B block") + " + head)")
    parts["grads_in_flight"] = act.backward
    how["grads_in_flight"] = "activation gradients in backward: 2 r h + 3 c i B a token (estimate)"
    parts["logits"] = act.logits
    how["logits"] = f"12 V B a token (fp32 log-probs, their and the logits' gradient), V={config.vocab_size}"
    # With checkpointing the recomputed block exists only in backward, after the loss's peak.
    recomputed = block * s.batch_size * s.seq_len if s.checkpointing else 0
    phases = _phases(parts, s, loss_states, recomputed)
    notes = []
    if layerwise and s.accumulate > 1:
        notes.append("layer-wise updates with accumulate > 1 hold a full gradient during the window; "
                     "a larger micro-batch with accumulate 1 avoids it")
    if s.qgalore and s.offload == "paged":
        notes.append("paged codes live outside the caching allocator; the driver pages them in on use")
    return MemoryPlan(name, config, s, parts, how, phases, host, notes, inv)


def _sharded(s: PlanSettings) -> bool:
    return s.devices > 1 and s.qgalore and s.layerwise and s.shard_state


def _graphed_shapes(s: PlanSettings, params: tuple[ParamInfo, ...]) -> list[ParamInfo]:
    """One GaLore matrix per shape whose update `qgl.optim.graphed` replays (8-bit moments, no offload,
    one process: `distribute()` turns graphs off)."""
    if not (s.qgalore and s.cuda_graphs and s.offload is None and s.devices == 1 and s.optim_bits == 8):
        return []
    graphed = [p for p in params if p.rank is not None and math.prod(p.low_shape) >= s.min_8bit_size]
    return list({p.shape: p for p in graphed}.values())


def _kept_copies(copies: list[ParamInfo], checkpointing: bool) -> int:
    """Elements of autocast's 16-bit weight copies that stay alive: those saved for backward.
    Lightning's autocast runs with `cache_enabled=False`, so a copy is made at each use and freed
    after it unless its linear saved it. Without checkpointing every linear does; with it, only
    the linears outside the checkpointed blocks (lm_head), plus, in backward, the recomputed
    block's (one block at a time). (Under a caching autocast every copy would live to the end of
    the forward.)"""
    if not checkpointing:
        return sum(p.numel for p in copies)
    per_block: dict[str, int] = {}
    outside = 0
    for p in copies:
        if p.name.startswith("blocks."):
            block = p.name.split(".")[1]
            per_block[block] = per_block.get(block, 0) + p.numel
        else:
            outside += p.numel
    return outside + max(per_block.values(), default=0)


def _persistent(config: LlamaConfig, s: PlanSettings, inv: Inventory
                ) -> tuple[dict[str, int], dict[str, str], dict[str, int]]:
    """Parts alive through the whole step: weights, buffers, optimizer state (device part),
    autocast's weight copies, workspace; and the bytes offload keeps in host memory."""
    pb, cb, autocast = s.dtype_bytes
    params = inv.params
    int8 = [p for p in params if p.int8]
    other = [p for p in params if not p.int8]
    states = [state_nbytes(p, s) for p in params]
    if _sharded(s):  # distributed: the states of the most loaded rank, owners as qgl.optim.distributed's
        owners = balance([(sum(st), p.rank is not None) for p, st in zip(params, states, strict=True)],
                         s.devices)
        loads = [0] * s.devices
        for st, r in zip(states, owners, strict=True):
            loads[r] += sum(st)
        states = [st for st, r in zip(states, owners, strict=True) if r == loads.index(max(loads))]
    copies = [p for p in other if p.linear] if autocast else []
    kept = _kept_copies(copies, s.checkpointing)
    graphed = _graphed_shapes(s, params)
    parts = {"int8_weights": sum(int8_nbytes(p.numel, s.group_size, s.symmetric) for p in int8),
             "params": pb * (sum(p.numel for p in other) + len(int8)),  # + the carriers' one element
             "buffers": pb * inv.buffer_numel,
             "optimizer_moments": sum(m for m, _ in states), "projections": sum(pr for _, pr in states),
             "weight_copies": cb * kept, "graph_buffers": sum(pb * p.numel for p in graphed),
             "workspace": WORKSPACE_BYTES}
    how = {"int8_weights": f"{len(int8)} INT8 matrices: numel + {4 * (1 if s.symmetric else 2)} ceil(numel/"
                           f"{s.group_size}) B (fp32 scale{'' if s.symmetric else ' and zero'})",
           "params": f"{sum(p.numel for p in other) / 1e6:,.1f}M parameters x {pb} B (embeddings, norms, "
                     "head, non-INT8 linears), + 1 element a carrier",
           "buffers": f"RoPE cos/sin cache ({inv.buffer_numel:,} elements x {pb} B)",
           "optimizer_moments": ("2 moments in the parameters' dtype (torch AdamW)" if not s.qgalore else
                                 f"{s.optim_bits}-bit: 2 (N + 4 ceil(N/256)) for N >= {s.min_8bit_size}, "
                                 "else 8 N (fp32); N = low-rank numel for GaLore"
                                 + (f"; the most loaded of {s.devices} ranks' share" if _sharded(s) else "")),
           "projections": (f"INT4 P: ceil(k/2) + 8 ceil(k/{s.proj_group_size}) + 4 x leading vector"
                           if s.proj_quant else f"float P in the gradients' dtype: {2 if pb == 2 else 4} k "
                           "+ 4 x leading vector"),
           "weight_copies": ((f"autocast's {cb} B copies of {len(copies)} non-INT8 linear weights"
                              + (" past the forward: those outside the checkpointed blocks + one "
                                 "(recomputed) block's" if s.checkpointing else "")) if autocast
                             else "none without autocast"),
           "graph_buffers": (f"the gradient buffers the CUDA-graph updates read: one per matrix shape "
                             f"({len(graphed)}) x {pb} B" if graphed
                             else "none (no CUDA-graph updates)"),
           "workspace": "cuBLAS workspaces (2 streams x 32 MiB) + 64 MiB allocator slack"}
    host: dict[str, int] = {}
    if s.qgalore and s.offload == "cpu":  # resident: the one written back, the one in use, the one prefetched
        window = sorted(states, key=sum, reverse=True)[:3]
        parts["optimizer_moments"] = sum(m for m, _ in window)
        parts["projections"] = sum(pr for _, pr in window)
        how["optimizer_moments"] = how["projections"] = "3 largest states (written back, in use, prefetched)"
        host = {"optimizer_moments": sum(m for m, _ in states), "projections": sum(pr for _, pr in states)}
    elif s.qgalore and s.offload == "paged":
        paged = sum(2 * math.prod(p.low_shape) for p in params if s.optim_bits == 8
                    and math.prod(p.low_shape) >= max(PAGED_MIN_NUMEL, s.min_8bit_size))
        parts["optimizer_moments"] -= paged
        how["optimizer_moments"] += "; the paged codes are in unified memory"
        host = {"optimizer_moments": paged}
    return parts, how, host


def _worst_update(inv: Inventory, s: PlanSettings) -> tuple[ParamInfo, list[tuple[int, int]]]:
    """The layer-wise update (accumulate 1) with the most bytes alive, and the optimizer states on the
    device during it ((moments, projection) each; none listed without offload: they all persist).

    Alive in the update of the i-th parameter in update order: its gradient, its update's temporaries
    and, with CPU offload, the states of parameters i-1 (its copy back to host memory may still run),
    i and i+1 (prefetched). So the largest update is not the largest gradient plus the largest
    temporaries: since plain updates run in chunks, those belong to different parameters."""
    order = inv.in_update_order()
    states = [state_nbytes(p, s) for p in order] if s.offload == "cpu" else [(0, 0)] * len(order)

    def alive(i: int) -> int:
        window = states[max(0, i - 1):i + 2]
        return sum(map(sum, window)) + grad_nbytes(order[i], s) + step_temp_nbytes(order[i], s)

    i = max(range(len(order)), key=alive)
    return order[i], (states[max(0, i - 1):i + 2] if s.offload == "cpu" else [])


def _phases(parts: dict[str, int], s: PlanSettings, loss_states: int | None = None,
            recomputed: int = 0) -> dict[str, int]:
    """Bytes alive together in each phase of a step (P: the persistent parts).

    In the loss, the activations are those saved by the forward: with checkpointing, the blocks'
    inputs but not the block that backward recomputes (`recomputed` bytes, 0 without checkpointing).

    layer-wise, accumulate 1:  loss = P + activations + logits;
        backward = P + activations + grads_in_flight + gradients (one) + optimizer_step.
    accumulate > 1 (the gradients persist over the window):  loss = P + gradients + activations + logits;
        backward = P + gradients + activations + grads_in_flight (+ optimizer_step if layer-wise);
        step (not layer-wise) = P + gradients + optimizer_step.
    not layer-wise, accumulate 1:  loss as above; backward = P + max(activations, gradients) +
        grads_in_flight (activations are freed as gradients appear: the sum is largest at an end);
        step = P + gradients + optimizer_step (activations are gone).
    `loss_states` (layer-wise CPU offload): the states on the device in the loss, in place of those of
    the largest update in P (the first update's, prefetched at the end of the previous step).
    """
    p = sum(parts[k] for k in PERSISTENT)
    a, g, f = parts["activations"], parts["gradients"], parts["grads_in_flight"]
    saved = a - recomputed  # what the loss sees of the activations
    t, lg = parts["optimizer_step"], parts["logits"]
    layerwise = s.qgalore and s.layerwise
    if layerwise and s.accumulate == 1:
        states = parts["optimizer_moments"] + parts["projections"]
        at_loss = p if loss_states is None else p - states + loss_states
        return {"loss": at_loss + saved + lg, "backward": p + a + f + g + t}
    if s.accumulate > 1:
        phases = {"loss": p + g + saved + lg, "backward": p + g + a + f + (t if layerwise else 0)}
        return phases if layerwise else {**phases, "step": p + g + t}
    return {"loss": p + saved + lg, "backward": p + max(a, g) + f, "step": p + g + t}
