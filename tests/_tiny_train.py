"""A tiny LLaMA trained with the full Q-GaLore configuration on the embedded corpus, on any device.

Full configuration: INT8 weights (group 256: the Triton W8A16 matmul path, not the small-group
fallback) updated with stochastic rounding, INT4 projections (group 256), adaptive refresh, 8-bit
moments everywhere (`min_8bit_size=0`), layer-wise updates in backward; bf16 autocast on CUDA.
Batches are drawn on the CPU from a seeded generator, so every run on every device sees the same
ones. Used by the CUDA kernels on/off comparison (`test_cuda.py`) and its CPU smoke test.
"""

from __future__ import annotations

import sys
from collections import Counter

import numpy as np
import torch
from torch import Tensor

from qgl.data.dataset import load_tokens
from qgl.models.llama import LlamaForCausalLM
from qgl.nn import quantize_model
from qgl.optim import QGaLoreAdamW, make_param_groups


def corpus_tokens(cache_dir, n: int = 300_000) -> Tensor:
    """The first `n` byte tokens of the embedded corpus (int64, CPU)."""
    stream = load_tokens("corpus", cache_dir=cache_dir)
    return torch.from_numpy(np.asarray(stream[:n]).astype(np.int64))


def batches(tokens: Tensor, n: int, batch: int = 16, seq: int = 64, seed: int = 0):
    """`n` (inputs, labels) pairs of `batch` random windows of `seq` tokens (CPU)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        starts = torch.randint(0, len(tokens) - seq - 1, (batch,), generator=g).tolist()
        windows = torch.stack([tokens[s : s + seq + 1] for s in starts])
        yield windows[:, :-1], windows[:, 1:]


def train_qgalore(tokens: Tensor, steps: int, device: str | torch.device = "cuda", *, batch: int = 16,
                  seq: int = 128, hidden: int = 256, lr: float = 1e-2, seed: int = 0,
                  sr_seed: int | None = None, bf16: bool | None = None) -> list[float]:
    """Losses of `steps` steps of the full Q-GaLore configuration (module docstring) from seed `seed`
    (initial weights, batches; and the stochastic rounding's, unless `sr_seed` is given).

    `bf16`: autocast to bfloat16 (default: on CUDA only). The dispatch of every kernel call follows
    `QGL_DISABLE_TRITON` at the time of the call.
    """
    device = torch.device(device)
    bf16 = device.type == "cuda" if bf16 is None else bf16
    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_name("tiny", hidden_size=hidden, intermediate_size=hidden * 43 // 16,
                                       num_layers=2, num_heads=4, max_seq_len=seq).to(device)
    quantize_model(model, group_size=256)
    groups = make_param_groups(model, rank=32, update_proj_gap=50, scale=0.25, proj_group_size=256)
    opt = QGaLoreAdamW(groups, lr=lr, min_8bit_size=0, layerwise=True,
                       seed=seed if sr_seed is None else sr_seed)
    losses = []
    for x, y in batches(tokens, steps, batch, seq, seed):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(x, labels=y)
        loss.backward()  # layer-wise: each parameter steps from its hook here
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def curve_stats(a: list[float], b: list[float], window: int = 10) -> dict[str, float]:
    """Means of the first 10 and last 20 losses of both curves, and the largest absolute difference
    of their `window`-step moving averages."""
    window = max(1, min(window, len(a), len(b)))
    ma = lambda c: np.convolve(np.asarray(c, dtype=np.float64), np.ones(window) / window, mode="valid")
    return {"first10_a": float(np.mean(a[:10])), "first10_b": float(np.mean(b[:10])),
            "last20_a": float(np.mean(a[-20:])), "last20_b": float(np.mean(b[-20:])),
            "max_ma_diff": float(np.max(np.abs(ma(a) - ma(b))))}


def train_with_kernels(monkeypatch, tokens: Tensor, steps: int, device: str | torch.device, enabled: bool,
                       **kw) -> tuple[list[float], Counter]:
    """`train_qgalore` with the Triton kernels on (`QGL_DISABLE_TRITON` unset) or off (set to "1"),
    and how many kernel calls the dispatch sent to Triton and to the references: in all ("triton",
    "reference") and by function ("triton:int8_update", ...)."""
    import qgl.kernels as K

    if enabled:
        monkeypatch.delenv("QGL_DISABLE_TRITON", raising=False)
    else:
        monkeypatch.setenv("QGL_DISABLE_TRITON", "1")
    calls: Counter = Counter()
    real = K.use_triton

    def counting(t: Tensor) -> bool:
        # Every public kernel entry asks use_triton once and runs Triton iff it answers True; the
        # entry's name is its caller's frame ("int8_update_" -> "int8_update", as the kernels name it).
        on = real(t)
        kind = "triton" if on else "reference"
        name = sys._getframe(1).f_code.co_name.rstrip("_")
        calls[kind] += 1
        calls[f"{kind}:{name}"] += 1
        return on

    monkeypatch.setattr(K, "use_triton", counting)
    try:
        return train_qgalore(tokens, steps, device, **kw), calls
    finally:
        monkeypatch.setattr(K, "use_triton", real)
        monkeypatch.delenv("QGL_DISABLE_TRITON", raising=False)


def kernels_on_off(monkeypatch, tokens: Tensor, steps: int, device: str | torch.device, **kw) -> dict:
    """The same training (same seed, initial weights, batches) with the kernels on, then off: both
    curves, both call counts, `curve_stats(on, off)` and a printable summary of it."""
    on, on_calls = train_with_kernels(monkeypatch, tokens, steps, device, True, **kw)
    off, off_calls = train_with_kernels(monkeypatch, tokens, steps, device, False, **kw)
    stats = curve_stats(on, off)
    summary = (f"kernels on/off, {steps} steps on {device}: first-10 mean {stats['first10_a']:.4f} / "
               f"{stats['first10_b']:.4f}, last-20 mean {stats['last20_a']:.4f} / {stats['last20_b']:.4f}, "
               f"max |diff| of 10-step moving averages {stats['max_ma_diff']:.4f}; kernel calls on: "
               f"{dict(on_calls)}, off: {dict(off_calls)}")
    return {"on": on, "off": off, "on_calls": on_calls, "off_calls": off_calls, "stats": stats,
            "summary": summary}
