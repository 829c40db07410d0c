"""LLaMA-1B's unaligned GEMMs, plain against padded to 16 bytes (kernels/aligned.py), on a GPU: one table.

    python benchmarks/aligned_gemm.py [--tokens 4096] [--width 5461]

LLaMA-1B's MLP is 5461 wide: a bf16 row of 10,922 bytes, not a multiple of 16, so cuBLAS runs its
sm75-era fallback GEMM wherever a 5461-wide matrix is an operand or the output (the 2026-12-07
profile: 70% of a 1B step's device time). Rows: the six products of an MLP's forward and backward
at `--tokens` tokens, `a @ b` as torch runs it against `aligned.mm` (its copies included), then a
whole QLinear forward + backward of the up and down projections with the padding off and on. Each
row names the GEMM kernel cuBLAS picked. Times: medians of `kernels._bench.do_bench` (L2 flushed).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import math
import time
from collections.abc import Callable

import torch

# The installed qgl (`pip install -e .`): the checkout's root has no `qgl.kernels` (package-dir mapping).
from qgl.kernels import aligned
from qgl.kernels._bench import do_bench
from qgl.nn import QLinear


def _ms(fn: Callable[[], object], device: str) -> float:
    if device == "cuda":
        return do_bench(fn, quantiles=(0.5,))  # one quantile: one float
    fn()  # CPU (a smoke run of this script): wall time of three calls
    start = time.perf_counter()
    for _ in range(3):
        fn()
    return (time.perf_counter() - start) / 3 * 1e3


def _gemm_kernel(fn: Callable[[], object], device: str) -> str:
    """The name of the longest kernel `fn` launches (the GEMM), shortened; "-" on CPU."""
    if device != "cuda":
        return "-"
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    name = max(kernels, key=lambda e: e.self_device_time_total).key if kernels else "-"
    return name.replace("void ", "")[:48]


def _products(m: int, hidden: int, width: int, device: str) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=torch.bfloat16)

    w_up, w_down = r(width, hidden), r(hidden, width)
    x, h, dy_up, dy_down = r(m, hidden), r(m, width), r(m, width), r(m, hidden)
    return [
        ("up/gate forward: x @ W^T (out unaligned)", x, w_up.t()),
        ("down forward: h @ W^T (k unaligned)", h, w_down.t()),
        ("up/gate dgrad: dy @ W (k unaligned)", dy_up, w_up),
        ("down dgrad: dy @ W (out unaligned)", dy_down, w_down),
        ("up/gate wgrad: dy^T @ x", dy_up.t(), x),
        ("down wgrad: dy^T @ h", dy_down.t(), h),
    ]


def _qlinear_step(layer: QLinear, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        layer.weight.grad = None
        x.grad = None
        layer(x).backward(torch.ones((), device=x.device).expand(*x.shape[:-1], layer.out_features))

    return step


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--width", type=int, default=5461, help="the MLP width (LLaMA-1B: 5461)")
    ap.add_argument("--device", default="cuda", help="cuda; cpu: every row at toy sizes (a smoke run)")
    args = ap.parse_args(argv)
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/aligned_gemm.py needs a CUDA device")
    torch.manual_seed(0)
    m, hidden, width = args.tokens, args.hidden, args.width
    name = torch.cuda.get_device_name() if dev == "cuda" else "CPU (smoke run)"
    print(f"\n{name}, torch {torch.__version__}, {datetime.date.today()}; "
          f"{m} tokens, hidden {hidden}, MLP width {width}, bf16\n")
    print("| product | plain us | padded us | padded / plain | plain TFLOP/s | padded TFLOP/s "
          "| plain kernel | padded kernel |")
    print("|---|---|---|---|---|---|---|---|")
    for name, a, b in _products(m, hidden, width, dev):
        flop = 2 * a.shape[0] * a.shape[1] * b.shape[1]
        plain, fast = functools.partial(torch.mm, a, b), functools.partial(aligned.mm, a, b, force=True)
        t_plain, t_fast = _ms(plain, dev), _ms(fast, dev)
        print(f"| {name} | {t_plain * 1e3:,.0f} | {t_fast * 1e3:,.0f} | {t_fast / t_plain:.2f}x | "
              f"{flop / t_plain / 1e9:,.0f} | {flop / t_fast / 1e9:,.0f} | {_gemm_kernel(plain, dev)} | "
              f"{_gemm_kernel(fast, dev)} |")
    saved = aligned.ALIGN_MIN_FLOPS
    for fin, fout, what in [(hidden, width, "up/gate"), (width, hidden, "down")]:
        layer = QLinear.from_linear(torch.nn.Linear(fin, fout, bias=False).to(dev)).to(torch.bfloat16)
        x = torch.randn(m, fin, device=dev, dtype=torch.bfloat16, requires_grad=True)
        step = _qlinear_step(layer, x)
        try:
            aligned.ALIGN_MIN_FLOPS = math.inf  # padding off: the plain products
            t_plain = _ms(step, dev)
        finally:
            aligned.ALIGN_MIN_FLOPS = saved
        t_fast = _ms(step, dev)
        print(f"| QLinear {what} ({fin} -> {fout}) forward + backward | {t_plain * 1e3:,.0f} | "
              f"{t_fast * 1e3:,.0f} | {t_fast / t_plain:.2f}x | | | | |")


if __name__ == "__main__":
    main()
