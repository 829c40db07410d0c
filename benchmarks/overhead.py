"""Host (CPU) time per call of the per-layer pieces of a training step, on CUDA: one table.

    python benchmarks/overhead.py
    python benchmarks/overhead.py --shape 2048x5461 --rank 512 --tokens 4096 --profile

A layer-wise optimizer runs Python for every matrix of the model in every step (the hook, the
projections, the 8-bit Adam, the INT8 update), and an INT8 linear runs Python in its forward and
backward. When that host time exceeds the GPU time of the same layer, the GPU waits: the step is
bound by the CPU. This script times each piece on its own, as host microseconds per call (the
Python and launch cost: calls are queued without synchronizing) beside device microseconds per call
(CUDA events around the same calls), so that the two can be compared. The default shape is small
so that the device time is negligible and the host time is what is left; `--profile` adds a
cProfile listing of the layer-wise qgalore update (where its host time goes, by Python function).
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import pstats
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from qgl.callbacks.methods import GALORE
from qgl.nn import QLinear
from qgl.optim import QGaLoreAdamW, make_param_groups
from qgl.optim.finite import NonFiniteFlags, all_finite


def _time(fn: Callable[[], object], calls: int) -> tuple[float, float]:
    """(host us, wall us) per call: host time to queue `calls` calls; wall time by CUDA events."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    return 1e6 * host / calls, 1e3 * start.elapsed_time(end) / calls


def _layerwise(method: str, m: int, n: int, rank: int, check_finite: bool, graphs: bool = False):
    """The layer-wise update of a one-matrix model under QGaLoreAdamW (eager, or replayed as a CUDA
    graph: `cuda_graphs`), from a bf16 gradient."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"mlp": nn.Linear(n, m, bias=False)}).cuda()
    if method == "qgalore":
        model["mlp"] = QLinear.from_linear(model["mlp"])
    model = model.bfloat16()
    galore = {} if method == "qgalore" else {k: v for k, v in GALORE.items() if k != "quantize_weights"}
    groups = make_param_groups(model, rank=rank, update_proj_gap=10**6, **galore)
    opt = QGaLoreAdamW(groups, lr=1e-5, layerwise=True, check_finite=check_finite, svd_method="randomized",
                       cuda_graphs=graphs)
    p = model["mlp"].weight
    grad = torch.randn(m, n, device="cuda", dtype=torch.bfloat16) * 1e-3

    def update() -> None:
        p.grad = grad
        opt.layerwise.update_from_grad(p)  # its finite flag is read by step(), never called here

    update()  # the first update computes P (an SVD), the second captures the graph: not timed
    update()
    return update


def _linear(kind: str, m: int, n: int, tokens: int, backward: bool, weight_grad: bool = True):
    torch.manual_seed(0)
    layer = nn.Linear(n, m, bias=False).cuda()
    if kind == "int8":
        layer = QLinear.from_linear(layer)
    layer = layer.bfloat16().requires_grad_(weight_grad)
    x = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16, requires_grad=backward)

    def call() -> None:
        y = layer(x)
        if backward:
            y.backward(torch.ones_like(y))
            layer.weight.grad = x.grad = None

    return call


class _PythonLinear(torch.autograd.Function):
    """nn.Linear's math in a Python autograd Function: what the Function machinery alone costs."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ w.T

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        return dy @ w, dy.t() @ x


def _python_linear(m: int, n: int, tokens: int):
    w = torch.randn(m, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    x = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def call() -> None:
        y = _PythonLinear.apply(x, w)
        y.backward(torch.ones_like(y))
        w.grad = x.grad = None

    return call


class _DecodeIn(torch.autograd.Function):
    """Launches the Triton dequantization in forward (main thread) or backward (autograd's thread)."""

    @staticmethod
    def forward(ctx, x, decode, in_backward):
        ctx.decode, ctx.in_backward = decode, in_backward
        if not in_backward:
            decode()
        return x.clone()

    @staticmethod
    def backward(ctx, dy):
        if ctx.in_backward:
            ctx.decode()
        return dy, None, None


def _thread_rows(m: int, n: int) -> list[tuple[str, Callable[[], object]]]:
    import types

    import qgl.kernels as K
    from qgl.nn.qlinear import _Int8LinearFunction

    q, scale, zero = K.quantize_int8(torch.randn(m, n, device="cuda"), 256)
    x = torch.randn(16, device="cuda", requires_grad=True)

    def decode():
        return K.dequantize_int8(q, scale, zero, 256, torch.bfloat16)

    def via(in_backward: bool):
        def call():
            _DecodeIn.apply(x, decode, in_backward).sum().backward()
            x.grad = None

        return call

    xs = torch.randn(64, n, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(64, m, device="cuda", dtype=torch.bfloat16)
    needs = (True, True) + (False,) * 5
    ctx = types.SimpleNamespace(saved_tensors=(xs, q, scale, zero), needs_input_grad=needs, group_size=256,
                                x_dtype=torch.bfloat16, carrier_dtype=torch.bfloat16, bias_dtype=None)
    return [
        ("Function + backward, Triton launch in forward (main thread)", via(False)),
        ("Function + backward, Triton launch in backward (autograd thread)", via(True)),
        ("QLinear's backward body, called on the main thread", lambda: _Int8LinearFunction.backward(ctx, dy)),
    ]


def _kernel_rows(m: int, n: int, rank: int, tokens: int) -> list[tuple[str, Callable[[], object]]]:
    """One call each of the kernels a QGaLore step launches per matrix, and one aten op to compare."""
    import qgl.kernels as K

    w = torch.randn(m, n, device="cuda")
    q, scale, zero = K.quantize_int8(w, 256)
    delta = torch.randn(m, n, device="cuda", dtype=torch.bfloat16) * 1e-4
    p_shape = (rank, n)
    packed, p_scale, p_zero = K.quantize_int4(torch.randn(p_shape, device="cuda"), 256)
    dy = torch.randn(tokens, m, device="cuda", dtype=torch.bfloat16)
    zero_d = torch.zeros((), device="cuda")
    return [
        ("one aten op (x.add_(0))", lambda: zero_d.add_(0)),
        ("torch.isfinite of a 0-dim tensor", lambda: torch.isfinite(zero_d)),
        ("Triton: dequantize_int8 (W to bf16)",
         lambda: K.dequantize_int8(q, scale, zero, 256, torch.bfloat16)),
        ("Triton: dequantize_int4 (P to bf16)",
         lambda: K.dequantize_int4(packed, p_scale, p_zero, p_shape, 256, torch.bfloat16)),
        ("Triton: int8_update_ (SR)", lambda: K.int8_update_(q, scale, zero, delta, 1.0, 256, 7)),
        ("w8a16_grad_input (dense: decode + mm)", lambda: K.w8a16_grad_input(dy, q, scale, zero, 256)),
    ]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="1024x512", help="the matrix, out x in (default 1024x512)")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=64, help="rows of the linear layers' input")
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--profile", action="store_true", help="cProfile the layer-wise qgalore update")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("overhead.py measures host time around CUDA work: it needs a GPU")
    try:
        m, n = (int(v) for v in args.shape.lower().split("x"))
    except ValueError:
        sys.exit(f"--shape must be OUTxIN, e.g. 1024x512; got {args.shape!r}")
    grad = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    grad_p = nn.Parameter(torch.empty_like(grad))
    flags = NonFiniteFlags([grad_p])
    rows = [
        ("nn.Linear forward", _linear("bf16", m, n, args.tokens, False)),
        ("QLinear forward", _linear("int8", m, n, args.tokens, False)),
        ("nn.Linear forward + backward", _linear("bf16", m, n, args.tokens, True)),
        ("QLinear forward + backward", _linear("int8", m, n, args.tokens, True)),
        ("QLinear forward + backward, input gradient only", _linear("int8", m, n, args.tokens, True, False)),
        ("Python autograd Function (nn.Linear math), forward + backward", _python_linear(m, n, args.tokens)),
        *_kernel_rows(m, n, args.rank, args.tokens),
        *_thread_rows(m, n),
        ("finite check: aminmax + 2 isfinite (all_finite)", lambda: all_finite(grad)),
        ("finite check: one kernel, flag on the device (NonFiniteFlags)", lambda: flags.check_(grad_p, grad)),
        ("finite check + zeroing (the layer-wise hook's)", lambda: flags.check_(grad_p, grad, True)),
        *[(f"layer-wise update, {method}{', finite check' * check}{', CUDA graph' * graphs}",
           _layerwise(method, m, n, args.rank, check, graphs))
          for method in ("galore", "qgalore") for graphs in (False, True) for check in (False, True)],
    ]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {datetime.date.today()}; "
          f"matrix {m} x {n}, rank {args.rank}, {args.tokens} tokens, {args.calls} calls each\n")
    print("| piece | host us / call | wall us / call |\n|---|---|---|")
    host_us = {}
    for name, fn in rows:
        host, device = _time(fn, args.calls)
        host_us[name] = host
        print(f"| {name} | {host:,.0f} | {device:,.0f} |")
    print()
    for method in ("galore", "qgalore"):
        eager = host_us[f"layer-wise update, {method}, finite check"]
        graphed = host_us[f"layer-wise update, {method}, finite check, CUDA graph"]
        print(f"{method} layer-wise update with the finite check: CUDA graph / eager host time = "
              f"{graphed:,.0f} / {eager:,.0f} us = {graphed / eager:.2f}x")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        call = _linear("int8", m, n, args.tokens, True)
        call()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                call()
            torch.cuda.synchronize()
        print("\ntorch.profiler, 10 QLinear forward + backward calls, by host time:")
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        print(table)
        update = _layerwise("qgalore", m, n, args.rank, True, graphs=True)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.calls):
            update()
        prof.disable()
        torch.cuda.synchronize()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
        print(f"\ncProfile of {args.calls} layer-wise qgalore updates (finite check, CUDA graph), "
              "by own time:")
        print(out.getvalue())


if __name__ == "__main__":
    main()
