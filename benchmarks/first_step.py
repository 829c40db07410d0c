"""Time of the first optimizer step's SVDs (every projected matrix refreshes at once), by method.

    python benchmarks/first_step.py                      # LLaMA-7B shapes, rank 1024, on CUDA
    python benchmarks/first_step.py --model 1b --rank 512
    python benchmarks/first_step.py --device cpu --shapes 96x64:4,64x160:2 --rank 8   # a quick CPU check

At the first step every projected layer computes its basis, so a LLaMA-7B run (224 matrices:
4 x 32 of 4096 x 4096, 2 x 32 of 11008 x 4096, 32 of 4096 x 11008) waits for 224 SVDs before
its first loss. This script times one matrix of each distinct shape (`--repeats` calls, the
fastest kept, after one untimed call) with each method of `qgl.optim.svd.top_singular_vectors`
and scales by the number of matrices of that shape: the table's totals are the SVD time of the
first step, estimated from a sample of one matrix per shape (the rest of the step is not in it).

Methods:
- full:       torch.linalg.svd, exact (qgl's default before issue 20);
- randomized: the randomized range finder from a Gaussian sketch (`POWER_ITERS` iterations), what
              every layer runs at its first refresh when svd_method="randomized";
- warm:       the same, started from the previous basis (`WARM_POWER_ITERS` iterations), what it
              runs at every later refresh;
- stale:      no SVD at all, the previous basis kept: the accuracy that a refresh has to beat.

Matrices are synthetic (no checkpoint is downloaded): G = U diag(s) V^T with random orthonormal
U, V and a power-law spectrum s_k = k^-alpha (alpha 1 is gradient-like; 0.5 is a flat, hard
spectrum). For "warm" and "stale" the previous gradient has the same spectrum, and the
vectors of the projected side moved, V' = orth(V + drift * N / sqrt(n)) (U' likewise for a wide
matrix): the subspace has moved (the "stale" row says by how much).
Accuracy against the full SVD of the same matrix, on the side GaLore projects (the smaller):
- energy: ||G P^T||_F^2 / ||G P_full^T||_F^2, the share of the best rank-r energy the basis keeps;
- overlap: ||P P_full^T||_F^2 / r, the mean squared cosine of the principal angles.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor

from qgl.models.llama import LLAMA_CONFIGS
from qgl.optim.svd import POWER_ITERS, WARM_POWER_ITERS, top_singular_vectors

METHODS = ("full", "randomized", "warm", "stale")


def model_shapes(name: str) -> list[tuple[tuple[int, int], int]]:
    """((out, in), count) of the projected matrices of LLaMA `name`: attention q, k, v, o and MLP
    gate, up (intermediate x hidden) and down (hidden x intermediate), per layer."""
    cfg = LLAMA_CONFIGS[name]
    h, i, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    return [((h, h), 4 * n), ((i, h), 2 * n), ((h, i), n)]


def parse_shapes(text: str) -> list[tuple[tuple[int, int], int]]:
    """'MxN:COUNT,...' -> [((M, N), COUNT), ...]."""
    out = []
    for item in text.split(","):
        try:
            dims, count = item.split(":") if ":" in item else (item, "1")
            m, n = (int(x) for x in dims.lower().split("x"))
            out.append(((m, n), int(count)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad shape {item!r}: expected MxN or MxN:COUNT") from None
    return out


def _orth(x: Tensor) -> Tensor:
    return torch.linalg.qr(x, mode="reduced").Q


def synthetic_pair(m: int, n: int, alpha: float, drift: float, device: str,
                   gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """(previous gradient, gradient), fp32 (m, n): same U and spectrum k^-alpha, right vectors
    moved by `drift` (see the module docstring)."""
    k = min(m, n)
    u = _orth(torch.randn(m, k, device=device, generator=gen))
    v = _orth(torch.randn(n, k, device=device, generator=gen))
    s = torch.arange(1, k + 1, device=device, dtype=torch.float32) ** -alpha
    if m >= n:  # the projected side (right) moves
        v_prev, u_prev = _orth(v + drift * torch.randn(n, k, device=device, generator=gen) / n**0.5), u
    else:
        u_prev, v_prev = _orth(u + drift * torch.randn(m, k, device=device, generator=gen) / m**0.5), v
    return (u_prev * s) @ v_prev.T, (u * s) @ v.T


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def best_time(fn: Callable[[], Tensor], repeats: int, device: str) -> tuple[float, Tensor]:
    """(fastest of `repeats` timed calls in seconds, the last result), after one untimed call."""
    out = fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def accuracy(g: Tensor, p: Tensor, p_full: Tensor, side: str) -> tuple[float, float]:
    """(energy, overlap) of basis `p` against the exact `p_full` on matrix g (see the docstring)."""
    if side == "left":  # one code path: right bases (r, n) of g^T
        g, p, p_full = g.T, p.T, p_full.T
    best = (g @ p_full.T).norm() ** 2
    energy = ((g @ p.T).norm() ** 2 / best).item() if best > 0 else 1.0
    overlap = ((p @ p_full.T).norm() ** 2 / p.shape[0]).item()
    return energy, overlap


def measure(shapes: list[tuple[tuple[int, int], int]], rank: int, alphas: list[float], drift: float,
            repeats: int, device: str, seed: int = 0) -> list[dict]:
    """One row per (shape, method, alpha): seconds per matrix (timed at the first alpha only: the
    time barely depends on the spectrum), the estimated seconds for all matrices of the shape,
    and the accuracy against the full SVD."""
    gen = torch.Generator(device=device).manual_seed(seed)
    rows = []
    for (m, n), count in shapes:
        if rank > min(m, n):
            raise SystemExit(f"rank {rank} is larger than the matrix ({m} x {n})")
        side = "right" if m >= n else "left"  # as GaLoreProjector picks it
        seconds: dict[str, float] = {}
        for ai, alpha in enumerate(alphas):
            g_prev, g = synthetic_pair(m, n, alpha, drift, device, gen)
            p_prev = top_singular_vectors(g_prev, rank, side, "full")

            def run(method: str, g: Tensor = g, side: str = side, p_prev: Tensor = p_prev) -> Tensor:
                if method == "full":
                    return top_singular_vectors(g, rank, side, "full")
                sketch = torch.Generator(device=device).manual_seed(seed + 1)
                init = p_prev if method == "warm" else None
                return top_singular_vectors(g, rank, side, "randomized", generator=sketch, init=init)

            results = {}
            for method in METHODS:
                if method == "stale":
                    results[method], secs = p_prev, 0.0
                elif ai == 0:
                    secs, results[method] = best_time(lambda method=method: run(method), repeats, device)
                else:
                    results[method], secs = run(method), seconds[method]
                seconds[method] = secs
            for method in METHODS:
                energy, overlap = accuracy(g, results[method], results["full"], side)
                rows.append(dict(shape=f"{m}x{n}", count=count, side=side, rank=rank, alpha=alpha,
                                 drift=drift, method=method, seconds_per_matrix=seconds[method],
                                 seconds_all=seconds[method] * count, energy=energy, overlap=overlap))
    return rows


def table(rows: list[dict], device_name: str, total_matrices: int) -> str:
    """Markdown: per shape and method; then the first step's estimated SVD time per method."""
    lines = [f"first-step SVDs on {device_name}: {total_matrices} matrices, rank {rows[0]['rank']}, "
             f"drift {rows[0]['drift']} (one matrix timed per shape, scaled by its count)", "",
             "| shape (count) | alpha | method | s / matrix | s, all of the shape | energy vs full | "
             "overlap vs full |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} ({r['count']}) | {r['alpha']:g} | {r['method']} | "
                     f"{r['seconds_per_matrix']:.4f} | {r['seconds_all']:.2f} | {r['energy']:.6f} | "
                     f"{r['overlap']:.4f} |")
    first_alpha = rows[0]["alpha"]
    lines += ["", "| method | first step's SVDs, s (estimated) | min energy vs full | min overlap vs full |",
              "|---|---|---|---|"]
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        total = sum(r["seconds_all"] for r in mine if r["alpha"] == first_alpha)
        lines.append(f"| {method} | {total:.1f} | {min(r['energy'] for r in mine):.6f} | "
                     f"{min(r['overlap'] for r in mine):.4f} |")
    lines.append(f"\n(randomized: {POWER_ITERS} power iterations from a Gaussian sketch; warm: "
                 f"{WARM_POWER_ITERS} from the previous basis; stale: the previous basis, no SVD)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="7b", choices=sorted(LLAMA_CONFIGS), help="LLaMA shapes to time")
    ap.add_argument("--shapes", type=parse_shapes, default=None,
                    help="instead of --model: MxN:COUNT,... (e.g. 96x64:4,64x160:2)")
    ap.add_argument("--rank", type=int, default=1024, help="GaLore rank (the 7B recipe's: 1024)")
    ap.add_argument("--alpha", default="1.0,0.5", help="power-law exponents of the spectra, comma-separated")
    ap.add_argument("--drift", type=float, default=0.3, help="how far the previous gradient's subspace lies")
    ap.add_argument("--repeats", type=int, default=2, help="timed calls per method and shape (fastest kept)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available (use --device cpu with small --shapes)")
    # The SVDs run in true fp32 in training (nothing in qgl turns TF32 on for them): time them so.
    torch.backends.cuda.matmul.allow_tf32 = False
    shapes = args.shapes or model_shapes(args.model)
    try:
        alphas = [float(a) for a in args.alpha.split(",") if a.strip()]
    except ValueError:
        raise SystemExit(f"--alpha: expected comma-separated numbers, got {args.alpha!r}") from None
    rows = measure(shapes, args.rank, alphas, args.drift, max(1, args.repeats), args.device)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(table(rows, name, sum(c for _, c in shapes)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
