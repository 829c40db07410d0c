"""Benchmark of the Triton kernels on a CUDA GPU against the device's measured ceilings.

    python benchmarks/kernels_bench.py [--out results.json] [--quick]

Prints one markdown table (device, torch/triton versions, date):

- ceilings: a large bf16 cuBLAS matmul (TFLOP/s) and a large device-to-device copy (GB/s,
  bytes read + written);
- W8A16 forward and grad-input, fused kernel and dense path (dequantize, then cuBLAS; "auto"
  marks the one the dispatcher takes), vs a bf16 cuBLAS matmul of the same shape (goal: >= 0.8x its
  speed), for LLaMA-1B (hidden 2048, intermediate 5504: 5461 rounded up to a multiple of 128) and
  LLaMA-7B (4096, 11008) layer shapes, at M = 16 * 256 tokens (training) and M = 16 (decode);
- fused INT8 update, INT8/INT4 quantize and dequantize in GB/s vs the copy (goal: >= 70%);
- INT4 projections of a 4096 x 11008 gradient (and its transpose) at rank 256 and 1024, fused
  kernel and dense path, vs a bf16 matmul of the same shape (goal: within 1.5x).

Times are medians of ``triton.testing.do_bench`` (CUDA events, L2 flushed before each run), after
one untimed call that also autotunes. Every matmul (W8A16, INT4, ours and cuBLAS alike) is replayed
from a CUDA graph, so the table holds GPU time, not Python's launch path: the wrappers' checks and
a Triton launch cost tens of microseconds of host time, as much as a whole 1B-sized product, and a
plain ``do_bench`` of ops that short times the host (on one machine it doubled some rows). Decode-
like (M = 16) graphs cycle through enough distinct weights to overflow L2 (no L2 hits). Inputs are
random, never zeros.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

GB = 1e9


def _bench(fn) -> float:
    """Median milliseconds of ``fn`` (after one untimed call: compilation, autotuning)."""
    import triton

    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _bench_graph(fns) -> float:
    """Median ms per call of ``fns`` (one call each, distinct buffers) replayed from a CUDA graph.

    For small kernels: the graph removes the Python launch overhead that plain ``do_bench`` would
    time, and cycling through enough distinct weights (> L2) keeps them from being L2 hits.
    """
    import triton

    for f in fns:  # compile, autotune, allocate outside the capture
        f()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(stream)
    return triton.testing.do_bench(graph.replay, warmup=25, rep=100, return_mode="median") / len(fns)


def _copies(nbytes: int) -> int:
    """How many distinct weight sets to cycle through so that they exceed a 50 MB L2 twice over."""
    return max(2, -(-120_000_000 // nbytes))


def _rand(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, device="cuda").to(dtype)


class Table:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, group: str, name: str, shape: str, ms: float, base_ms: float | None, rate: float,
            unit: str, ceiling: float, goal: str, ok: bool | None, note: str = "") -> None:  # fmt: skip
        row = dict(group=group, kernel=name, shape=shape, ms=ms, baseline_ms=base_ms, rate=rate, unit=unit,
                   pct_of_ceiling=100 * rate / ceiling, goal=goal, meets_goal=ok, note=note)  # fmt: skip
        self.rows.append(row)
        base = f"{base_ms:.4f}" if base_ms is not None else "-"
        print(f"  {name:<30} {shape:<28} {ms:9.4f} ms  base {base:>9}  {rate:8.1f} {unit}  {note}")

    def markdown(self) -> str:
        head = "| kernel | shape | ms | baseline ms | speed vs baseline | rate | % of ceiling | goal | met |"
        lines = [head, "|" + "---|" * 9]
        for r in self.rows:
            ratio = f"{r['baseline_ms'] / r['ms']:.2f}x" if r["baseline_ms"] else "-"
            met = {True: "yes", False: "NO", None: "-"}[r["meets_goal"]]
            base = "-" if r["baseline_ms"] is None else f"{r['baseline_ms']:.4f}"
            lines.append(
                f"| {r['kernel']} | {r['shape']} | {r['ms']:.4f} | {base} | {ratio} | "
                f"{r['rate']:.1f} {r['unit']} | {r['pct_of_ceiling']:.0f}% | {r['goal']} | {met} |"
            )
        return "\n".join(lines)


def ceilings() -> tuple[float, float]:
    """Measured bf16 matmul TFLOP/s (8192^3) and copy GB/s (1 GiB, read + write)."""
    a, b = _rand(8192, 8192), _rand(8192, 8192)
    tflops = 2 * 8192**3 / (_bench(lambda: a @ b) * 1e-3) / 1e12
    src = torch.randn(2**28, device="cuda")  # 1 GiB fp32
    dst = torch.empty_like(src)
    gbs = 2 * src.numel() * 4 / (_bench(lambda: dst.copy_(src)) * 1e-3) / GB
    return tflops, gbs


def _note(tuned) -> str:
    """The config the autotuner picked for the last call (for the lead's review)."""
    cfg = getattr(tuned, "best_config", None)
    return "" if cfg is None else str(cfg.kwargs | {"warps": cfg.num_warps, "stages": cfg.num_stages})


def _w8a16_case(t: Table, model: str, n: int, k: int, m: int, peak: float) -> None:
    from qgl.kernels import int8_ref
    from qgl.kernels import w8a16_triton as wt

    reps = _copies(n * k) if m <= 64 else 1  # decode-like: graph over distinct weights
    ws = []
    for _ in range(reps):
        q, s, _ = int8_ref.quantize_int8_ref(_rand(n, k, dtype=torch.float32), 256, True)
        ws.append((q, s, int8_ref.dequantize_int8_ref(q, s, None, 256, torch.bfloat16)))
    x, dy = _rand(m, k), _rand(m, n)
    bench = _bench_graph
    flop, shape, goal = 2 * m * n * k, f"{model} M={m} out={n} in={k}", ">= 0.8x cuBLAS bf16"
    auto = "dense" if m >= wt.dense_min_m() else "fused"
    fwd = lambda q, s, path: wt.w8a16_linear_triton(x, q, s, None, 256, None, path)
    grad_input = lambda q, s, path: wt.w8a16_grad_input_triton(dy, q, s, None, 256, path)
    cases = [  # (name, ours for the INT8 weight (q, s), the cuBLAS baseline for its dequantized w, tuner)
        ("fwd", fwd, lambda w: x @ w.T, wt._fwd_tuned),
        ("grad_input", grad_input, lambda w: dy @ w, wt._bwd_tuned),
    ]
    for name, ours, base, tuned in cases:
        base_ms = bench([functools.partial(base, w) for _, _, w in ws])
        for path in ("fused", "dense"):
            ms = bench([functools.partial(ours, q, s, path) for q, s, _ in ws])
            tag = f"{path}, auto" if path == auto else path
            note = _note(tuned) if path == "fused" else ""
            t.add("w8a16", f"w8a16 {name} ({tag})", shape, ms, base_ms, flop / ms / 1e9, "TFLOP/s", peak,
                  goal, base_ms / ms >= 0.8, note)  # fmt: skip


def bench_w8a16(t: Table, quick: bool, peak: float) -> None:
    layers = {
        "1B": [(2048, 2048), (5504, 2048), (2048, 5504)],  # (out, in): q/k/v/o, gate/up, down
        "7B": [(4096, 4096), (11008, 4096), (4096, 11008)],
    }
    for model, shapes in layers.items():
        for n, k in shapes[:1] if quick else shapes:
            for m in (16 * 256, 16):
                _w8a16_case(t, model, n, k, m, peak)


def _memory_case(t: Table, rows: int, cols: int, symmetric: bool, copy_gbs: float) -> None:
    from qgl.kernels import int8_triton as it

    numel, tag, shape = rows * cols, "sym" if symmetric else "asym", f"{rows}x{cols} g256"
    stat = numel // 256 * 4 * (1 if symmetric else 2)
    w = _rand(rows, cols, dtype=torch.float32)
    q, s, z = it.quantize_int8_triton(w, 256, symmetric)
    delta = _rand(rows, cols, dtype=torch.float32) * 1e-3
    cases = [  # (name, fn, bytes moved: each input read once, each output written once)
        (f"int8 quantize ({tag})", lambda: it.quantize_int8_triton(w, 256, symmetric), numel * 5 + stat),
        (f"int8 dequantize->bf16 ({tag})", lambda: it.dequantize_int8_triton(q, s, z, 256, torch.bfloat16),
         numel * 3 + stat),
        (f"int8 fused update ({tag})", lambda: it.int8_update_triton(q, s, z, delta, 0.9999, 256, 1),
         numel * 6 + 2 * stat),  # read q + fp32 delta, write q
    ]  # fmt: skip
    for name, fn, nbytes in cases:
        ms = _bench(fn)
        gbs = nbytes / ms / 1e6
        t.add("memory", name, shape, ms, None, gbs, "GB/s", copy_gbs, ">= 70% of copy", gbs >= 0.7 * copy_gbs)


def _int4_format_case(t: Table, rows: int, cols: int, copy_gbs: float) -> None:
    from qgl.kernels import int4_triton as i4

    numel, shape, stat = rows * cols, f"{rows}x{cols} g256", rows * cols // 256 * 8
    w = _rand(rows, cols, dtype=torch.float32)
    packed, s, z = i4.quantize_int4_triton(w, 256)
    # INT4 quantize is two passes by design (P is refreshed rarely and fits in L2): no goal.
    ms = _bench(lambda: i4.quantize_int4_triton(w, 256))
    nbytes = numel * 4.5 + stat
    gbs = nbytes / ms / 1e6
    t.add("memory", "int4 quantize", shape, ms, None, gbs, "GB/s", copy_gbs, "- (2 passes)", None)
    ms = _bench(lambda: i4.dequantize_int4_triton(packed, s, z, (rows, cols), 256, torch.float32))
    gbs = (numel * 4.5 + stat) / ms / 1e6
    t.add("memory", "int4 dequantize->fp32", shape, ms, None, gbs, "GB/s", copy_gbs, ">= 70% of copy",
          gbs >= 0.7 * copy_gbs)  # fmt: skip


def bench_elementwise(t: Table, quick: bool, copy_gbs: float) -> None:
    for rows, cols in [(2048, 5504)] if quick else [(2048, 5504), (4096, 11008)]:
        for symmetric in (True, False):
            _memory_case(t, rows, cols, symmetric, copy_gbs)
        _int4_format_case(t, rows, cols, copy_gbs)


def _int4_case(t: Table, m: int, n: int, r: int, peak: float) -> None:
    from qgl.kernels import int4_ref
    from qgl.kernels import int4_triton as i4

    side = "right" if m >= n else "left"  # GaLore's rule
    p_shape = (r, n) if side == "right" else (m, r)
    packed, s, z = int4_ref.quantize_int4_ref(_rand(*p_shape, dtype=torch.float32), 256)
    p16 = int4_ref.dequantize_int4_ref(packed, s, z, p_shape, 256, torch.bfloat16)
    g = _rand(m, n)
    low_shape = (m, r) if side == "right" else (r, n)
    low, low16 = _rand(*low_shape, dtype=torch.float32), _rand(*low_shape)
    flop, shape, goal = 2 * m * n * r, f"G {m}x{n} r={r} {side}", "<= 1.5x bf16 time"
    if side == "right":
        proj_base, back_base = (lambda: g @ p16.T), (lambda: low16 @ p16)
    else:
        proj_base, back_base = (lambda: p16.T @ g), (lambda: p16 @ low16)
    auto = "dense" if i4._use_dense("auto", g.device) else "fused"
    cases = [
        ("project, bf16 G", functools.partial(i4.int4_project_triton, g), proj_base),
        ("project_back, fp32 low", functools.partial(i4.int4_project_back_triton, low), back_base),
        # What QGaLoreAdamW asks for INT8 weights: a bf16 update, half the bytes written.
        ("project_back, fp32 low, bf16 out",
         functools.partial(i4.int4_project_back_triton, low, out_dtype=torch.bfloat16), back_base),
    ]
    for name, ours, base in cases:
        base_ms = _bench_graph([base])
        for path in ("fused", "dense"):
            ms = _bench_graph([functools.partial(ours, packed, s, z, p_shape, 256, side, path=path)])
            tag = f"{path}, auto" if path == auto else path
            t.add("int4", f"int4 {name} ({tag})", shape, ms, base_ms, flop / ms / 1e9, "TFLOP/s", peak, goal,
                  ms <= 1.5 * base_ms, _note(i4._mm_tuned) if path == "fused" else "")  # fmt: skip


def bench_int4_projection(t: Table, quick: bool, peak: float) -> None:
    for m, n in [(4096, 11008), (11008, 4096)]:
        for r in (256,) if quick else (256, 1024):
            _int4_case(t, m, n, r, peak)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="also write the results as JSON to this file")
    ap.add_argument("--quick", action="store_true", help="one shape per group (smoke run)")
    ap.add_argument("--only", choices=["w8a16", "memory", "int4"], action="append", help="only this group")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        msg = "error: benchmarks/kernels_bench.py needs a CUDA GPU; torch.cuda.is_available() is False"
        print(msg, file=sys.stderr)
        return 2
    import triton

    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False  # baselines are bf16; fp32 never silently tf32
    dev = torch.cuda.get_device_name()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"device: {dev}; torch {torch.__version__}; triton {triton.__version__}; {date}", flush=True)
    peak, copy_gbs = ceilings()
    print(f"ceilings: bf16 matmul 8192^3 {peak:.0f} TFLOP/s; copy 1 GiB {copy_gbs:.0f} GB/s", flush=True)
    t = Table()
    groups = args.only or ["w8a16", "memory", "int4"]
    if "w8a16" in groups:
        bench_w8a16(t, args.quick, peak)
    if "memory" in groups:
        bench_elementwise(t, args.quick, copy_gbs)
    if "int4" in groups:
        bench_int4_projection(t, args.quick, peak)
    print()
    print(f"**{dev}**, torch {torch.__version__}, triton {triton.__version__}, {date}  ")
    print(f"Ceilings (measured): bf16 matmul {peak:.0f} TFLOP/s, device copy {copy_gbs:.0f} GB/s  ")
    print()
    print(t.markdown())
    if args.out:
        res = dict(device=dev, torch=torch.__version__, triton=triton.__version__, date=date,
                   ceilings=dict(bf16_matmul_tflops=peak, copy_gbs=copy_gbs), rows=t.rows)  # fmt: skip
        args.out.write_text(json.dumps(res, indent=2))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
