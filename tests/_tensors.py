"""Test helpers shared by several test files (imported by name: pytest puts tests/ on sys.path)."""

import torch


def nonzero_randn(*shape, dtype=torch.float32):
    """Normal samples pushed away from 0 by 0.05, so no element is (near) zero."""
    x = torch.randn(*shape)
    return torch.where(x >= 0, x + 0.05, x - 0.05).to(dtype)


def per_element(stat, group_size, shape):
    """A per-group statistic [n_groups] broadcast to every element of `shape`."""
    numel = torch.Size(shape).numel()
    return stat.repeat_interleave(group_size)[:numel].view(shape)


def peak_cpu_allocated(fn) -> int:
    """Peak bytes allocated on the CPU during `fn()` above what was allocated before (the profiler's
    allocation events, in order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()

    def walk(nodes):
        for n in nodes:
            yield n
            yield from walk(n.children)

    events = [e for e in walk(prof.profiler.kineto_results.experimental_event_tree())
              if type(e.extra_fields).__name__ == "_ExtraFields_Allocation"]
    total = peak = 0
    for e in sorted(events, key=lambda e: e.start_time_ns):
        total += e.extra_fields.alloc_size
        peak = max(peak, total)
    return peak
