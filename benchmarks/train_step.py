"""Training-step throughput and peak memory: qgl Q-GaLore against bf16 AdamW, one run, one table.

    python benchmarks/train_step.py --model 60m --batch 16 --seq 256 --steps 30
    python benchmarks/train_step.py --model 1b --checkpointing --rank 512 --methods bf16-adamw,qgalore,galore

A plain loop, no Lightning: what the optimizer and the INT8 layers cost by themselves. Methods:
`bf16-adamw` (torch, fused), `qgalore` (INT8 weights, INT4 P, 8-bit moments, layer-wise) and `galore`
(the same optimizer on the bf16 weights with float P: the INT8/INT4 path's cost is the difference).
`--check-finite` adds the non-finite gradient check that `qgl train` runs.

Random tokens (throughput and memory do not depend on the data). Each method builds the model
afresh; the first steps (SVDs of every matrix, allocator warm-up) are excluded from tokens/s.
Peak memory is `torch.cuda.max_memory_allocated` over the whole run, the model included.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import sys
import time
from pathlib import Path

import torch

from qgl.callbacks.methods import GALORE
from qgl.models.llama import LlamaForCausalLM
from qgl.nn import quantize_model
from qgl.optim import QGaLoreAdamW, make_param_groups

sys.path.insert(0, str(Path(__file__).resolve().parent))  # only benchmarks/ (see methods.py)
from _cli import choice_list  # noqa: E402

METHODS = ("bf16-adamw", "qgalore", "galore")


def _build(name: str, method: str, rank: int, checkpointing: bool, check_finite: bool = False):
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_name(name, activation_checkpointing=checkpointing).cuda()
    if method == "bf16-adamw":
        model = model.bfloat16()
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    if method == "qgalore":
        quantize_model(model)
    model = model.bfloat16()
    # galore: qgl's `galore` method (float P, fixed gap) on the float weights.
    galore = {} if method == "qgalore" else {k: v for k, v in GALORE.items() if k != "quantize_weights"}
    groups = make_param_groups(model, rank=rank, update_proj_gap=200, scale=0.25, **galore)
    return model, QGaLoreAdamW(groups, lr=1e-3, layerwise=True, check_finite=check_finite)


def _profile(model, opt, data, steps: int = 3) -> None:
    """Print where a training step's time goes: the top ops by device time and by host time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            model(data[:, :-1], labels=data[:, 1:]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    averages = prof.key_averages()
    # Kernel time against wall time: a step whose device is busy most of its wall time is bound by the
    # device; one with the device idle half of it is bound by the host (Python, launches).
    # Kernel events only: the profiler also credits each kernel's time to the aten op that launched it
    # (the tables' "Self CUDA time total" sums the same events).
    kernels = (e for e in averages if e.device_type == DeviceType.CUDA)
    busy = sum(e.self_device_time_total for e in kernels) / 1e3 / steps  # us -> ms a step
    print(f"device busy {busy:.1f} ms a step of {wall / steps * 1e3:.1f} ms wall (under the profiler): "
          f"{busy / (wall / steps * 1e3):.0%}")
    print(averages.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60))
    print(averages.table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))


def measure(
    name: str,
    method: str,
    batch: int,
    seq: int,
    steps: int,
    warmup: int,
    rank: int,
    checkpointing: bool,
    profile: bool = False,
    check_finite: bool = False,
) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model, opt = _build(name, method, rank, checkpointing, check_finite)
    vocab = model.config.vocab_size
    data = torch.randint(0, vocab, (batch, seq + 1), device="cuda")
    for step in range(steps):
        if step == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        loss = model(data[:, :-1], labels=data[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if profile:
        print(f"--- profile of {method}, 3 steps")
        _profile(model, opt, data)
    svds = 0
    if isinstance(opt, QGaLoreAdamW):
        svds = sum(s["svd_count"] for s in opt.subspace_stats().values())
    result = dict(
        method=method,
        peak_gib=torch.cuda.max_memory_allocated() / 2**30,
        tokens_per_s=batch * seq * (steps - warmup) / seconds,
        loss=loss.item(),
        svds=svds,
    )
    del model, opt
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="60m")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--profile", action="store_true", help="also print torch.profiler tables (after timing)")
    ap.add_argument("--methods", default="bf16-adamw,qgalore", type=choice_list(METHODS, "methods"),
                    help=f"comma-separated, the first is the baseline: {','.join(METHODS)}")
    ap.add_argument("--check-finite", action="store_true", help="the non-finite gradient check of qgl train")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/train_step.py needs a CUDA device")
    rows = [
        measure(args.model, m, args.batch, args.seq, args.steps, args.warmup, args.rank, args.checkpointing,
                args.profile, args.check_finite)
        for m in args.methods
    ]
    base = rows[0]
    print(
        f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, {datetime.date.today()}; "
        f"LLaMA-{args.model}, batch {args.batch} x {args.seq} tokens, rank {args.rank}, "
        f"checkpointing {args.checkpointing}, check_finite {args.check_finite}\n"
    )
    print(f"| method | peak GiB | vs {base['method']} | tokens/s | vs {base['method']} | SVDs | last loss |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['peak_gib']:.2f} | {r['peak_gib'] / base['peak_gib']:.2f}x | "
            f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x | {r['svds']} | "
            f"{r['loss']:.3f} |"
        )


if __name__ == "__main__":
    main()
