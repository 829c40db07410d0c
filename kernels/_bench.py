"""The autotuners' benchmark: Triton's `do_bench` with an L2 flush buffer of the GPU's L2 size.

`triton.testing.do_bench`, which `triton.autotune` calls by default, zeroes a 256 MiB buffer before
every timed run so that no input sits in L2 (`driver.get_empty_cache_for_benchmark`). That buffer is
allocated through torch's caching allocator each time a kernel meets a new autotuning key, i.e. in
the first training step. On an H100 (LLaMA-130M, 256 tokens: the fused path, offloaded states) the
first step's peak of `max_memory_allocated` was 53 MiB above the later steps'; the same run without
offload peaked exactly the lm_head's and final norm's states higher, so that peak came early in the
backward, before any block's update, with no optimizer state on the device: this transient. Zeroing
a buffer as large as L2 evicts it just as well; on an H100 (50 MiB of L2) the transient is 5x
smaller. Otherwise the same procedure as Triton's: one call, a 5-run estimate, warm-up and timed
runs of about `warmup` and `rep` ms, each timed run after a flush, and the `quantiles` of the times
(the autotuner asks for (0.5, 0.2, 0.8)).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

TRITON_FLUSH_BYTES = 256 * 1024 * 1024
"""Triton's flush buffer, used where the device does not report its L2 size."""


def flush_bytes(device: torch.device | int | None = None) -> int:
    """Bytes of the L2 flush buffer on `device`: its L2 size, else Triton's 256 MiB."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
    return int(l2) if l2 and l2 > 0 else TRITON_FLUSH_BYTES


def do_bench(kernel_call: Callable[[], object], quantiles: Sequence[float] | None = None,
             warmup: float = 25.0, rep: float = 100.0) -> float | list[float]:
    """Milliseconds of `kernel_call` on the current CUDA device: the `quantiles` of the timed runs
    (a list), or their mean. Signature as `triton.autotune(do_bench=...)` calls it."""
    kernel_call()
    torch.cuda.synchronize()
    flush = torch.empty(flush_bytes(torch.cuda.current_device()) // 4, dtype=torch.int32, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush.zero_()
        kernel_call()
    end.record()
    torch.cuda.synchronize()
    estimate_ms = max(start.elapsed_time(end) / 5, 1e-6)
    n_warmup, n_repeat = max(1, int(warmup / estimate_ms)), max(1, int(rep / estimate_ms))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_repeat)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_repeat)]
    for _ in range(n_warmup):
        kernel_call()
    for s, e in zip(starts, ends, strict=True):
        flush.zero_()
        s.record()
        kernel_call()
        e.record()
    torch.cuda.synchronize()
    del flush
    return summarize([s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)], quantiles)


def summarize(times: Sequence[float], quantiles: Sequence[float] | None) -> float | list[float]:
    """The `quantiles` of `times` (one float for one quantile, as Triton returns), else their mean."""
    if quantiles is None:
        return float(sum(times) / len(times))
    out = torch.quantile(torch.tensor(times, dtype=torch.float), torch.tensor(quantiles, dtype=torch.float))
    values = out.tolist()
    return values[0] if len(values) == 1 else values
