"""One row of `benchmarks/memory.py`: build one (model, method) on the GPU, train a few steps, measure.

Run in its own process (`python benchmarks/memory.py --one --model 7b --method qgl ...`) so that its
peak is its own and an out-of-memory error ends only this row. It prints one line,
`MEMORY_ROW {json}` (see `measure`), also on an out-of-memory error (status "OOM").

Methods, all on bf16 parameters with activation checkpointing, the recipe's lr/betas/weight decay:

- bf16-adamw: `torch.optim.AdamW(fused=True)` (moments in bf16, as torch keeps them in the
  parameters' dtype);
- adamw8bit: `bitsandbytes.optim.AdamW8bit`;
- galore-torch: `galore_torch.GaLoreAdamW8bit`, layer-wise as its README (one optimizer a parameter,
  stepped from its post-accumulate-grad hook; `_public_adapters.public_driver`), the recipe's rank,
  gap and scale on the attention and MLP weights, 8-bit AdamW on the rest;
- qgl / qgl-offload / qgl-paged: `qgl.models.build.build_quantized_llama` (INT8 weights, never the
  float model on the GPU), `make_param_groups` + `QGaLoreAdamW(layerwise=True)` with the recipe's
  Q-GaLore settings; qgl-offload adds `offload="cpu"` (pinned host memory, side-stream copies),
  qgl-paged `offload="paged"` (bitsandbytes paged 8-bit moments in CUDA unified memory, which the
  driver pages in on use; they are outside `max_memory_allocated`, so `offloaded_bytes` reports them);
- qgl-galore: qgl's GaLore (`method=galore`: the float bf16 model, float P, fixed gap, 8-bit moments,
  layer-wise), beside galore-torch on the same weights.

The float models are built on the meta device, then materialised in bf16 (`to_empty` +
`init_weights`): no fp32 copy on the GPU either.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import sys
import time
from typing import Any

import torch

METHODS = ("bf16-adamw", "adamw8bit", "galore-torch", "qgl", "qgl-offload", "qgl-paged", "qgl-galore")
# The qgl rows and their QGaLoreAdamW(offload=...).
OFFLOAD = {"qgl": None, "qgl-offload": "cpu", "qgl-paged": "paged", "qgl-galore": None}
MODELS = ("60m", "130m", "350m", "1b", "7b")
ROW_PREFIX = "MEMORY_ROW "
GIB = 2**30
_GALORE_KEYS = ("update_proj_gap", "scale", "proj_quant", "proj_group_size", "adaptive", "cos_threshold",
                "gamma_proj", "queue_size", "max_gap", "svd_method")
_OOM_MARKERS = ("out of memory", "ALLOC_FAILED")


def recipe(model: str, seq: int, svd: str | None = None, method: str = "qgl") -> Any:
    """The resolved pre-training recipe of `model` (its rank, lr, Q-GaLore settings), block `seq`;
    `svd` ("full" | "randomized") replaces its svd_method; row `method` "qgl-galore" sets method=galore."""
    from qgl.config import load_recipe

    overrides = ["data.source=unused", f"data.block_size={seq}", "model.activation_checkpointing=true",
                 f"method={'galore' if method == 'qgl-galore' else 'qgalore'}"]
    if svd is not None:
        overrides.append(f"qgalore.svd_method={svd}")
    return load_recipe(f"pretrain/llama_{model}", overrides)


def predicted_bytes(model: str, method: str, batch: int, seq: int, svd: str | None = None) -> int | None:
    """`qgl plan`'s predicted peak of max_memory_allocated for the qgl rows (None for the others):
    the recipe's settings at batch x seq, bf16 parameters, checkpointing, layer-wise, accumulate 1."""
    if method not in OFFLOAD:
        return None
    from qgl.plan import PlanSettings, plan_memory

    cfg = recipe(model, seq, svd, method)
    s = PlanSettings.from_recipe(cfg).replace(
        batch_size=batch, seq_len=seq, accumulate=1, checkpointing=True, precision="bf16-true",
        layerwise=True, offload=OFFLOAD[method])
    return plan_memory(cfg, s).total


def _float_model(config: Any, device: torch.device) -> torch.nn.Module:
    from qgl.models.llama import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to(torch.bfloat16).to_empty(device=device)
    model.init_weights()
    return model.train()


def build(method: str, cfg: Any, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model (bf16, checkpointing) and optimizer of `method` on `device` (see the module docstring)."""
    from qgl.models.llama import LlamaConfig

    config = LlamaConfig.from_name(cfg.model.name, activation_checkpointing=True)
    q, o = cfg.qgalore, cfg.optim
    common = dict(lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    if method in OFFLOAD:
        from qgl.callbacks.methods import GALORE
        from qgl.models.build import build_quantized_llama
        from qgl.optim import QGaLoreAdamW, make_param_groups

        galore = {k: getattr(q, k) for k in _GALORE_KEYS}
        if method == "qgl-galore":
            model = _float_model(config, device)
            galore.update((k, v) for k, v in GALORE.items() if k in galore)  # float P, fixed gap
        else:
            model = build_quantized_llama(config, device, torch.bfloat16, q.target_modules, q.exclude,
                                          q.group_size, q.symmetric)
        groups = make_param_groups(model, q.rank, q.target_modules, q.exclude, weight_decay=o.weight_decay,
                                   **galore)
        return model, QGaLoreAdamW(groups, **common, optim_bits=q.optim_bits, min_8bit_size=q.min_8bit_size,
                                   layerwise=True, layerwise_clip_norm=q.layerwise_clip_norm,
                                   offload=OFFLOAD[method])
    model = _float_model(config, device)
    if method == "bf16-adamw":
        return model, torch.optim.AdamW(model.parameters(), **common, fused=True)
    if method == "adamw8bit":
        import bitsandbytes as bnb

        return model, bnb.optim.AdamW8bit(model.parameters(), **common)
    if method == "galore-torch":
        from _public_adapters import public_driver

        return model, public_driver("galore-torch", model, {**dataclasses.asdict(q), "layerwise": True},
                                    eps=1e-8, **common)
    raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")


def train_step(net: torch.nn.Module, opt: torch.optim.Optimizer, data: torch.Tensor) -> torch.Tensor:
    """One step on `data` [batch, seq + 1] (inputs and the next tokens); the loss (detached)."""
    loss = net(data[:, :-1], labels=data[:, 1:])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


Record = tuple[int, str, int]  # (step index, "start" / "before NAME" / "after NAME" / "end", max allocated)


def trace_updates(opt: torch.optim.Optimizer, records: list[Record], step: list[int]) -> None:
    """Record `torch.cuda.max_memory_allocated` around each layer-wise update of a qgl optimizer
    (`opt.update_param`, which the backward hooks call): where in the step the peak was reached, to
    a pair of consecutive updates. `step[0]` is the current step index (the caller advances it)."""
    real = opt.update_param

    def update_param(p: torch.Tensor) -> None:
        name = opt.param_name(p)
        records.append((step[0], f"before {name}", torch.cuda.max_memory_allocated()))
        real(p)
        records.append((step[0], f"after {name}", torch.cuda.max_memory_allocated()))

    opt.update_param = update_param
    if getattr(opt, "layerwise", None) is not None:
        opt.layerwise.update = update_param  # the hooks call the callable they were given


def locate_peak(records: list[Record], peak: int) -> str | None:
    """Where the running maximum first reached `peak`: "step S: between A and B" for the first record
    B at or above it and the record A before it (`records` as `trace_updates` leaves them, with
    "start"/"end" marks per step; the maximum is reset between some steps, never within one)."""
    prev = None
    for step, label, value in records:
        if value >= peak:
            since = prev[1] if prev is not None and prev[0] == step else "start"
            return f"step {step + 1}: between {since} and {label}"
        prev = (step, label, value)
    return None


def _progress(message: str) -> None:
    """A line on stderr: what the parent reports if this process runs out of time."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _versions() -> dict[str, str]:
    out = {"torch": torch.__version__}
    for dist in ("bitsandbytes", "galore-torch"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def is_oom(err: BaseException) -> bool:
    """An allocation failure: torch's OutOfMemoryError, or a library's (cuBLAS, cuSOLVER) alloc error."""
    return isinstance(err, torch.cuda.OutOfMemoryError) or any(m in str(err) for m in _OOM_MARKERS)


def measure(model: str, method: str, batch: int, seq: int, steps: int, warmup: int,
            cap_gib: float | None = None, svd: str | None = None) -> dict[str, Any]:
    """Build `method` at `model` on cuda:0 and run `steps` training steps on random tokens.

    Returns a row: peak_bytes (torch.cuda.max_memory_allocated over build and steps), its parts
    build_peak_bytes / first_step_peak_bytes / later_peak_bytes, peak_reserved_bytes, tokens_per_s
    over the steps from `warmup` on (the first steps run the SVDs), first_step_s, svds, loss; with
    status "ok", or "OOM" (and `error`, `at`: where) when an allocation failed.
    """
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/memory.py --one needs a CUDA device (none is visible here)")
    device = torch.device("cuda", 0)
    total = torch.cuda.get_device_properties(device).total_memory
    if cap_gib is not None:
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GIB / total), device)
    row: dict[str, Any] = dict(model=model, method=method, batch=batch, seq=seq, steps=steps, warmup=warmup,
                               cap_gib=cap_gib, device=torch.cuda.get_device_name(device),
                               date=datetime.date.today().isoformat(),
                               total_memory_bytes=total, **_versions())
    cfg = recipe(model, seq, svd, method)
    row.update(rank=cfg.qgalore.rank, svd_method=cfg.qgalore.svd_method, status="ok")
    peaks: dict[str, int] = {}
    reserved: list[int] = []

    def mark(phase: str) -> None:  # the peaks since the last mark, then a new window
        peaks[f"{phase}_peak_bytes"] = torch.cuda.max_memory_allocated(device)
        reserved.append(torch.cuda.max_memory_reserved(device))
        torch.cuda.reset_peak_memory_stats(device)

    phase = "build"
    torch.cuda.reset_peak_memory_stats(device)
    try:
        t0 = time.perf_counter()
        net, opt = build(method, cfg, device)
        torch.cuda.synchronize(device)
        row["build_s"] = time.perf_counter() - t0
        _progress(f"built in {row['build_s']:.1f} s, {torch.cuda.memory_allocated(device) / GIB:.2f} GiB")
        row["resident_bytes"] = torch.cuda.memory_allocated(device)
        records: list[Record] = []
        step_ref = [0]
        if hasattr(opt, "update_param") and hasattr(opt, "param_name"):
            trace_updates(opt, records, step_ref)
        gen = torch.Generator(device=device).manual_seed(0)
        data = torch.randint(0, net.config.vocab_size, (batch, seq + 1), device=device, generator=gen)
        mark(phase)
        start = None
        for step in range(steps):
            phase = "first_step" if step == 0 else "later_steps"
            if step == warmup:
                torch.cuda.synchronize(device)
                start = time.perf_counter()
            t = time.perf_counter()
            _progress(f"step {step + 1} of {steps} running")
            step_ref[0] = step
            records.append((step, "start", torch.cuda.max_memory_allocated(device)))
            loss = train_step(net, opt, data)
            records.append((step, "end", torch.cuda.max_memory_allocated(device)))
            if step == 0:
                torch.cuda.synchronize(device)
                row["first_step_s"] = time.perf_counter() - t
                mark(phase)
        torch.cuda.synchronize(device)
        if steps > 1:
            mark(phase)
        if start is not None:
            row["tokens_per_s"] = batch * seq * (steps - warmup) / (time.perf_counter() - start)
        row["loss"] = float(loss)
        if hasattr(opt, "subspace_stats"):
            stats = opt.subspace_stats().values()
            row.update(svds=sum(v["svd_count"] for v in stats), svd_s=sum(v["svd_seconds"] for v in stats))
        elif hasattr(opt, "svd_count"):
            row["svds"] = opt.svd_count()
        if getattr(opt, "offloader", None) is not None:  # state held in host / unified memory
            held = opt.state_nbytes()
            row["offloaded_bytes"] = held["offloaded_moments"] + held["offloaded_projections"]
    except Exception as err:
        if not is_oom(err):
            raise
        row.update(status="OOM", at=phase, error=str(err).splitlines()[0][:300])
        mark(phase)
    row.update(peaks)
    row["peak_bytes"] = max(peaks.values())
    if row["status"] == "ok" and phase != "build":
        row["peak_at"] = locate_peak(records, row["peak_bytes"])
    row["peak_reserved_bytes"] = max(reserved)
    return row
