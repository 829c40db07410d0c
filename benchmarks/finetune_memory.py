"""Fine-tuning memory and speed at 7B/8B shapes: LoRA (r 16, 64), QLoRA, GaLore, Q-GaLore.

    python benchmarks/finetune_memory.py                                   # llama2-7b and llama3-8b, all rows
    python benchmarks/finetune_memory.py --shapes llama2-7b --batch 4 --seq 512
    python benchmarks/finetune_memory.py --tiny                            # CPU smoke run, tiny shape

Q-GaLore's paper claims fine-tuning at about half the memory of LoRA and GaLore. Each (shape, method)
row runs in its own process (`--one`): a clean `torch.cuda.max_memory_allocated`, and an out-of-memory
error ends one row ("OOM"), not the table. Models are qgl's LLaMA with the checkpoint's shape (LLaMA-2-7B:
hidden 4096, MLP 11008, 32 layers, 32 heads, vocab 32000; Llama-3-8B: MLP 14336, 8 kv heads (grouped-query
attention), vocab 128256), random weights, bf16 parameters, activation checkpointing, random tokens,
`--steps` steps of batch x seq; tokens/s over the steps after the first (which runs the SVDs).

| row | trained | frozen / stored | optimizer |
|---|---|---|---|
| lora-r16, lora-r64 | fp32 adapters (alpha 2r) on attention + MLP | bf16 base | torch AdamW |
| qlora | fp32 adapters, r 16 | NF4 base (bitsandbytes) | paged 8-bit AdamW |
| galore | every weight (bf16); attention/MLP projected, float P, fixed gap | | QGaLoreAdamW 8-bit |
| qgalore | every weight; attention/MLP INT8 (SR), INT4 P, adaptive gap | | QGaLoreAdamW 8-bit |
(QGaLoreAdamW: 8-bit moments, layer-wise updates in backward.)

GaLore and Q-GaLore train every parameter (embeddings and head too, with 8-bit Adam); LoRA trains only
its adapters. The planner's prediction (`qgl.plan.plan_memory`, same settings) stands beside the
galore/qgalore rows. Every base weight is materialised on the device one layer at a time (quantized at
once for qlora and qgalore), so no row holds the float model it does not train with.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROW_PREFIX = "FINETUNE_ROW "
GIB = 2**30
METHODS = ("lora-r16", "lora-r64", "qlora", "galore", "qgalore")
SHAPES = ("llama2-7b", "llama3-8b")


def shape_config(name: str) -> Any:
    """qgl `LlamaConfig` of a checkpoint's shape (activation checkpointing on)."""
    from qgl.models.llama import LlamaConfig

    if name == "llama2-7b":
        return LlamaConfig(32000, 4096, 11008, 32, 32, max_seq_len=4096, activation_checkpointing=True)
    if name == "llama3-8b":
        return LlamaConfig(128256, 4096, 14336, 32, 32, max_seq_len=8192, rope_theta=500000.0,
                           num_kv_heads=8, activation_checkpointing=True)
    if name == "tiny":
        return LlamaConfig(320, 128, 344, 2, 4, max_seq_len=512, num_kv_heads=2,
                           activation_checkpointing=True)
    raise ValueError(f"unknown shape {name!r}; known: {', '.join((*SHAPES, 'tiny'))}")


def plan_settings(method: str, ns: argparse.Namespace) -> Any:
    from qgl.plan import PlanSettings

    return PlanSettings(batch_size=ns.batch, seq_len=ns.seq, checkpointing=True, precision="bf16-true",
                        rank=ns.rank, svd_method=ns.svd, quantize_weights=method == "qgalore",
                        proj_quant=method == "qgalore")


def predicted_bytes(shape: str, method: str, ns: argparse.Namespace) -> int | None:
    """The planner's peak for the galore / qgalore rows (None for LoRA: not plannable yet)."""
    if method not in ("galore", "qgalore"):
        return None
    from qgl.plan import plan_memory

    return plan_memory(shape_config(shape), plan_settings(method, ns)).total


# ------------------------------------------------------------------ one row (child process)
@torch.no_grad()
def _materialise(model: torch.nn.Module, device: torch.device, convert: Any) -> None:
    """Module by module on `device` in bf16 (normal(0, init_std) weights, norms at one); each targeted
    linear (`convert(name, linear)` not None) is replaced by what `convert` makes of it at once."""
    from qgl.models.llama import RMSNorm, build_rope_cache

    # Names, not modules, are listed before the swaps (so no wrapper's children are visited): a list of
    # the modules would keep every replaced bf16 linear alive to the end, and the qlora row's build
    # then peaked at the whole float model (15.8 GiB at 7B, measured 2026-12-06) over its 3.8 GiB.
    for name in [name for name, _ in model.named_modules()]:
        module = model.get_submodule(name)
        if isinstance(module, torch.nn.Linear) and convert(name, None):
            module.to_empty(device=device)
            torch.nn.init.normal_(module.weight, std=model.init_std(name))
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, convert(name, module))
            continue
        module.to_empty(device=device, recurse=False)
        if isinstance(module, torch.nn.Linear | torch.nn.Embedding):
            torch.nn.init.normal_(module.weight, std=model.init_std(name))
        elif isinstance(module, RMSNorm):
            module.reset_parameters()
    cos, sin = build_rope_cache(model.config.max_seq_len, model.config.head_dim, model.config.rope_theta,
                                device=device)
    model.rope_cos.copy_(cos)
    model.rope_sin.copy_(sin)



def build(shape: str, method: str, ns: argparse.Namespace, device: torch.device) -> tuple[Any, Any]:
    """(model, optimizer) of one row (see the module docstring)."""
    from qgl.callbacks.methods import GALORE
    from qgl.models.build import build_quantized_llama
    from qgl.models.llama import LlamaForCausalLM
    from qgl.nn import LoRALinear
    from qgl.nn.lora import nf4_linear
    from qgl.nn.surgery import _matches
    from qgl.optim import QGaLoreAdamW, make_param_groups

    config = shape_config(shape)
    target = lambda name: _matches(name, ("attn", "mlp"))
    if method == "qgalore":
        model = build_quantized_llama(config, device, torch.bfloat16).train()
    else:
        with torch.device("meta"):
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        if method.startswith("lora"):
            r = int(method.split("-r")[1])
            convert = lambda name, lin: target(name) and (lin is None or LoRALinear(lin, r, 2.0 * r))
        elif method == "qlora":
            convert = lambda name, lin: target(name) and (
                lin is None or LoRALinear(nf4_linear(lin, torch.bfloat16, device), 16, 32.0))
        else:
            convert = lambda name, lin: False
        _materialise(model, device, convert)
        model.train()
    if method in ("galore", "qgalore"):
        galore = dict(update_proj_gap=200, scale=0.25, svd_method=ns.svd)
        if method == "galore":
            galore.update((k, v) for k, v in GALORE.items() if k != "quantize_weights")
            galore["svd_method"] = ns.svd  # GALORE's exact SVD takes minutes at 7B; --svd full restores it
        groups = make_param_groups(model, ns.rank, ("attn", "mlp"), ("lm_head",), **galore)
        return model, QGaLoreAdamW(groups, lr=1e-5, layerwise=True)
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(("lora_A", "lora_B")))
    adapters = [p for p in model.parameters() if p.requires_grad]
    if method == "qlora":
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if device.type == "cuda" else bnb.optim.AdamW8bit
        return model, cls(adapters, lr=1e-4)
    return model, torch.optim.AdamW(adapters, lr=1e-4)


def measure(shape: str, method: str, ns: argparse.Namespace) -> dict[str, Any]:
    """Build the row on cuda:0 (CPU with --tiny) and train `ns.steps` steps on random tokens."""
    cuda = torch.cuda.is_available() and not ns.tiny
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    row: dict[str, Any] = dict(shape=shape, method=method, batch=ns.batch, seq=ns.seq, steps=ns.steps,
                               device=torch.cuda.get_device_name(0) if cuda else "cpu", status="ok")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    phase = "build"
    try:
        model, opt = build(shape, method, ns, device)
        if cuda:
            torch.cuda.synchronize()
            row["resident_bytes"] = torch.cuda.memory_allocated()
            row["build_peak_bytes"] = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        gen = torch.Generator(device=device).manual_seed(0)
        data = torch.randint(0, model.config.vocab_size, (ns.batch, ns.seq + 1), device=device, generator=gen)
        start = None
        for step in range(ns.steps):
            phase = f"step {step + 1}"
            if step == 1:
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
            loss = model(data[:, :-1], labels=data[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
            row["train_peak_bytes"] = torch.cuda.max_memory_allocated()
        row["loss"] = float(loss)
        if start is not None:
            row["tokens_per_s"] = ns.batch * ns.seq * (ns.steps - 1) / (time.perf_counter() - start)
    except torch.cuda.OutOfMemoryError as err:
        row.update(status="OOM", at=phase, error=str(err).splitlines()[0][:200])
    if cuda:
        row["peak_bytes"] = max(row.get("build_peak_bytes", 0), row.get("train_peak_bytes", 0),
                                torch.cuda.max_memory_allocated())
    return row


# ------------------------------------------------------------------ parent
def run_row(shape: str, method: str, ns: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", shape, method, "--batch", str(ns.batch),
           "--seq", str(ns.seq), "--steps", str(ns.steps), "--rank", str(ns.rank), "--svd", ns.svd]
    cmd += ["--tiny"] if ns.tiny else []
    print(f"[finetune_memory] {shape} {method} ...", file=sys.stderr, flush=True)
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=ns.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"shape": shape, "method": method, "status": "timeout"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(ROW_PREFIX):
            return json.loads(line[len(ROW_PREFIX):])
    last = ([ln for ln in proc.stderr.splitlines() if ln.strip()] or [f"exit {proc.returncode}"])[-1]
    status = "OOM" if "out of memory" in last.lower() else "error"
    return {"shape": shape, "method": method, "status": status, "error": last[:300]}


def _gib(value: int | None) -> str:
    return "-" if not value else f"{value / GIB:.2f}"


def table(rows: list[dict[str, Any]]) -> str:
    """Peak (GiB), planner, tokens/s, and peak relative to the shape's lora-r16 and galore rows."""
    lines = [f"{'shape':<10} {'method':<9} {'status':<7} {'peak GiB':>9} {'plan GiB':>9} {'resident':>9} "
             f"{'tokens/s':>9} {'vs lora16':>9} {'vs galore':>9}"]
    ref = {(r["shape"], r["method"]): r.get("peak_bytes") for r in rows}

    def rel(peak: int | None, shape: str, method: str) -> str:
        base = ref.get((shape, method))
        return "-" if not peak or not base else f"{peak / base:.2f}x"

    errors = []
    for r in rows:
        peak, tps, shape = r.get("peak_bytes"), r.get("tokens_per_s"), r["shape"]
        lines.append(f"{shape:<10} {r['method']:<9} {r['status']:<7} {_gib(peak):>9} "
                     f"{_gib(r.get('predicted_bytes')):>9} {_gib(r.get('resident_bytes')):>9} "
                     f"{'-' if tps is None else f'{tps:,.0f}':>9} {rel(peak, shape, 'lora-r16'):>9} "
                     f"{rel(peak, shape, 'galore'):>9}")
        if r.get("error"):
            errors.append(f"  {shape} {r['method']}: {r['error']}")
    return "\n".join(lines + errors)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated: {', '.join(SHAPES)}")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated: {', '.join(METHODS)}")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3, help="steps per row (tokens/s from the second on)")
    ap.add_argument("--rank", type=int, default=64, help="GaLore / Q-GaLore rank")
    ap.add_argument("--svd", choices=("full", "randomized"), default="randomized",
                    help="SVD of both galore and qgalore rows (full: GaLore's exact one, minutes at 7B)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per row")
    ap.add_argument("--tiny", action="store_true", help="the tiny shape on the CPU (a smoke run)")
    ap.add_argument("--out", type=Path, help="also write the rows as JSON here")
    ap.add_argument("--one", nargs=2, metavar=("SHAPE", "METHOD"), help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)
    ns.shapes = ["tiny"] if ns.tiny else [s for s in ns.shapes.split(",") if s]
    ns.methods = [m for m in ns.methods.split(",") if m]
    bad = [s for s in ns.shapes if s not in (*SHAPES, "tiny")] + [m for m in ns.methods if m not in METHODS]
    if bad or ns.steps < 2 or ns.batch < 1 or ns.seq < 1:
        ap.error(f"unknown {bad}" if bad else "need --steps >= 2, --batch and --seq >= 1")
    return ns


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    if ns.one:
        print(ROW_PREFIX + json.dumps(measure(ns.one[0], ns.one[1], ns)), flush=True)
        return 0
    rows = []
    for shape in ns.shapes:
        for method in ns.methods:
            row = {**run_row(shape, method, ns), "predicted_bytes": predicted_bytes(shape, method, ns)}
            rows.append(row)
    print(f"fine-tuning: batch {ns.batch} x {ns.seq} tokens, bf16 parameters, activation checkpointing, "
          f"{ns.steps} steps; GaLore/Q-GaLore rank {ns.rank} ({ns.svd} SVD); peak = max_memory_allocated")
    print(table(rows))
    if ns.out is not None:
        ns.out.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
