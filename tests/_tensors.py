"""Test inputs shared by the format tests (imported by name: pytest puts tests/ on sys.path)."""

import torch


def nonzero_randn(*shape, dtype=torch.float32):
    """Normal samples pushed away from 0 by 0.05, so no element is (near) zero."""
    x = torch.randn(*shape)
    return torch.where(x >= 0, x + 0.05, x - 0.05).to(dtype)


def per_element(stat, group_size, shape):
    """A per-group statistic [n_groups] broadcast to every element of `shape`."""
    numel = torch.Size(shape).numel()
    return stat.repeat_interleave(group_size)[:numel].view(shape)
