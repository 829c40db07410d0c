"""Helpers of the kernel tests (``test_kernels_triton.py``, ``test_kernels_w8a16.py``): poisoned
outputs, two-poison runs, tolerances. Imported by name (pytest puts tests/ on sys.path); the
``poison`` fixture is imported into each test module."""

from __future__ import annotations

import contextlib

import pytest
import torch

from qgl.kernels import int4_format_triton, int4_triton, int8_triton, w8a16_triton

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
# fp32 matmuls: exact fp32 in the interpreter; tf32 tensor cores on a GPU.
F32_TOL = 3e-3 if CUDA else 1e-5


def poison_triton_outputs(monkeypatch):
    """Garbage-fill every output the Triton modules allocate; the returned state's ``round`` picks
    the garbage (a test module's ``poison`` fixture returns it)."""

    class State:
        round = 0

    def empty(*shape, dtype=None, device=None, **kwargs):
        t = torch.empty(*shape, dtype=dtype, device=device, **kwargs)
        if t.is_floating_point():
            return t.fill_(float("nan") if State.round == 0 else 3.0e4)
        if t.dtype == torch.uint8:
            return t.fill_(0xA5 if State.round == 0 else 0x5A)
        return t.fill_(-77 if State.round == 0 else 93)

    for mod in (int8_triton, int4_format_triton, int4_triton, w8a16_triton):
        monkeypatch.setattr(mod, "_empty", empty)
    return State


def run2(state, fn, *args):
    """``fn(*args)`` with both poisons; the results must be identical. Returns the first."""
    outs = []
    for r in (0, 1):
        state.round = r
        outs.append(fn(*args))
    first, second = (o if isinstance(o, tuple) else (o,) for o in outs)
    for a, b in zip(first, second, strict=True):
        if a is not None:
            assert torch.equal(a, b), "an output element depends on the poison: it was never written"
    return outs[0]


def on_cpu(fn, *args):
    """A reference computed on CPU, result on DEV: exact IEEE division there, while torch on CUDA
    divides by a Python scalar through its reciprocal (scales 1 ulp off at times)."""
    out = fn(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in args))
    back = lambda o: o.to(DEV) if isinstance(o, torch.Tensor) else o
    return tuple(back(o) for o in out) if isinstance(out, tuple) else back(out)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite output"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def randn(*shape, dtype=torch.float32, scale=1.0, shift=0.0):
    return (torch.randn(*shape, device=DEV) * scale + shift).to(dtype)



@contextlib.contextmanager
def skip_if_too_large():
    """A config whose tiles exceed the GPU's shared memory is skipped by the autotuner too."""
    from triton.runtime.errors import OutOfResources

    try:
        yield
    except OutOfResources as err:
        pytest.skip(f"config does not fit this GPU: {err}")
