"""Triton kernels against their plain-torch references: INT8 and INT4 formats, the fused INT8 update,
INT4 projections, dispatch (the W8A16 matmuls: test_kernels_w8a16.py).

On CPU the kernels run under ``TRITON_INTERPRET=1`` (set by conftest.py) on small shapes, several
not divisible by the block or group size; on a GPU the same tests run compiled, plus the
``cuda``-marked ones (dispatch, LLaMA-size shapes, bf16 tensor cores). Every output allocation of
the Triton modules is poisoned (NaN, or garbage) and each kernel runs twice with two different
poisons: an element a kernel forgot to write differs between the runs or from the reference.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from _kernel_checks import (  # noqa: E402
    CUDA,
    DEV,
    F32_TOL,
    on_cpu,
    poison_triton_outputs,
    randn,
    rel_err,
    run2,
    skip_if_too_large,
)

from qgl.kernels import (  # noqa: E402
    int4_ref,
    int4_triton,
    int8_ref,
    int8_triton,
    w8a16_triton,
)


@pytest.fixture
def poison(monkeypatch):
    """Poisoned outputs of the Triton modules (``_kernel_checks.poison_triton_outputs``)."""
    return poison_triton_outputs(monkeypatch)


SHAPES_GS = [((3, 5), 64), ((17, 300), 64), ((17, 300), 100), ((64, 257), 256), ((2, 3, 40), 7)]


# --- INT8 format ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,gs", SHAPES_GS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_dequantize_int8_exact(poison, shape, gs, symmetric):
    w = randn(*shape, scale=2.0, shift=0.0 if symmetric else 0.7)
    q, s, z = run2(poison, int8_triton.quantize_int8_triton, w, gs, symmetric)
    q_r, s_r, z_r = on_cpu(int8_ref.quantize_int8_ref, w, gs, symmetric)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert torch.equal(q, q_r) and torch.equal(s, s_r)
    assert (z is None) == symmetric and (symmetric or torch.equal(z, z_r))
    d = run2(poison, int8_triton.dequantize_int8_triton, q, s, z, gs, torch.float32)
    assert torch.equal(d, on_cpu(int8_ref.dequantize_int8_ref, q, s, z, gs))
    d16 = run2(poison, int8_triton.dequantize_int8_triton, q, s, z, gs, torch.float16)
    assert torch.equal(d16, on_cpu(int8_ref.dequantize_int8_ref, q, s, z, gs, torch.float16))


@pytest.mark.parametrize("in_dtype", [torch.float16, torch.bfloat16])
def test_int8_low_precision_io(poison, in_dtype):
    w = randn(9, 70, dtype=in_dtype)
    q, s, _ = run2(poison, int8_triton.quantize_int8_triton, w, 64, True)
    q_r, s_r, _ = on_cpu(int8_ref.quantize_int8_ref, w, 64, True)
    assert torch.equal(q, q_r) and torch.equal(s, s_r)
    d = run2(poison, int8_triton.dequantize_int8_triton, q, s, None, 64, torch.bfloat16)
    d_r = on_cpu(int8_ref.dequantize_int8_ref, q, s, None, 64, torch.bfloat16)
    if CUDA:
        assert torch.equal(d, d_r)
    else:  # the interpreter truncates fp32 -> bf16 where a GPU rounds to nearest even
        torch.testing.assert_close(d, d_r, rtol=2**-7, atol=0)


def _exact_grid(q0, s0, z0, delta, decay, gs, s_new, z_new):
    """fp64 ``x = w' / scale' + zero'`` per element (w' from the old state), flat."""
    w = int8_ref.dequantize_int8_ref(q0, s0, z0, gs, torch.float64).reshape(-1) * decay
    w = w + delta.reshape(-1).double()
    idx = torch.arange(w.numel(), device=w.device) // gs
    x = w / s_new.double()[idx]
    return (x + z_new.double()[idx]) if z_new is not None else x, w, idx


@pytest.mark.parametrize("shape,gs", SHAPES_GS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("decay", [1.0, 0.9])
def test_int8_update_floor_or_ceil(shape, gs, symmetric, decay):
    q0, s0, z0 = int8_ref.quantize_int8_ref(randn(*shape, shift=0.0 if symmetric else 0.5), gs, symmetric)
    step = s0[torch.arange(q0.numel(), device=DEV) // gs].reshape(shape)
    delta = torch.rand(shape, device=DEV).sub(0.5) * 6 * step  # up to 3 steps either way
    q, s, z = q0.clone(), s0.clone(), None if symmetric else z0.clone()
    int8_triton.int8_update_triton(q, s, z, delta, decay, gs, seed=1234)
    q_r, s_r, z_r = q0.clone(), s0.clone(), None if symmetric else z0.clone()
    int8_ref.int8_update_ref(q_r, s_r, z_r, delta, decay, gs, seed=1234)
    torch.testing.assert_close(s, s_r, rtol=1e-6, atol=0)
    if not symmetric:
        torch.testing.assert_close(z, z_r, rtol=1e-6, atol=1e-4)
    x, _, _ = _exact_grid(q0, s0, z0, delta, decay, gs, s, z)
    lo = -127 if symmetric else -128
    got = q.reshape(-1).double()
    assert ((got >= (x - 1e-4).floor().clamp(lo, 127)) & (got <= (x + 1e-4).ceil().clamp(lo, 127))).all()


@pytest.mark.parametrize("symmetric", [True, False])
def test_int8_update_writes_everything(symmetric):
    """decay = 0: w' = delta whatever the old state, so a garbage old state must vanish entirely."""
    shape, gs = (17, 300), 100
    delta = randn(*shape, shift=0.0 if symmetric else 0.3)
    g = -(-delta.numel() // gs)
    q = torch.full(shape, -128 if symmetric else 127, dtype=torch.int8, device=DEV)
    s = torch.full((g,), 1e3, device=DEV)
    z = None if symmetric else torch.full((g,), -1e3, device=DEV)
    int8_triton.int8_update_triton(q, s, z, delta, 0.0, gs, seed=7)
    _, s_r, z_r = int8_ref.quantize_int8_ref(delta, gs, symmetric)
    torch.testing.assert_close(s, s_r, rtol=1e-6, atol=0)
    if not symmetric:
        torch.testing.assert_close(z, z_r, rtol=1e-6, atol=1e-4)
    idx = torch.arange(delta.numel(), device=DEV) // gs
    x = delta.reshape(-1).double() / s.double()[idx]
    if not symmetric:
        x = x + z.double()[idx]
    got = q.reshape(-1).double()
    assert ((got >= (x - 1e-4).floor()) & (got <= (x + 1e-4).ceil())).all()


@pytest.mark.parametrize("symmetric", [True, False])
def test_int8_update_unbiased(symmetric):
    """An update of ~0.01 of a step survives in expectation (round-to-nearest would drop it)."""
    shape, gs, n_seeds = (4, 96), 64, 200 if not CUDA else 2000
    q0, s0, z0 = int8_ref.quantize_int8_ref(randn(*shape, shift=0.0 if symmetric else 0.4), gs, symmetric)
    step = s0[torch.arange(q0.numel(), device=DEV) // gs].reshape(shape)
    # One sign everywhere (round-to-nearest would be off by -0.01 step on average), random sizes
    # (a uniform shift would only move the zero point of an asymmetric group).
    delta = 0.01 * step * (1.0 + torch.rand(shape, device=DEV))
    total = torch.zeros(q0.numel(), dtype=torch.float64, device=DEV)
    for seed in range(n_seeds):
        q, s, z = q0.clone(), s0.clone(), None if symmetric else z0.clone()
        int8_triton.int8_update_triton(q, s, z, delta, 1.0, gs, seed)
        total += int8_ref.dequantize_int8_ref(q, s, z, gs, torch.float64).reshape(-1)
    x, w_exact, idx = _exact_grid(q0, s0, z0, delta, 1.0, gs, s, z)  # s, z: same for every seed
    frac = x - x.floor()
    var = frac * (1 - frac)  # per draw, in steps^2
    err = (total / n_seeds - w_exact) / s.double()[idx]  # mean error in steps
    # Per element within 4 standard errors, + 2 draws of slack for the discreteness of the count
    # (frac(x) ~ 1e-4 gives 2 ceils in 200 draws once in ~5000 elements) ...
    assert (err.abs() <= 4 * (var / n_seeds).sqrt() + 2.0 / n_seeds).all()
    # ... and the mean over all elements within 4 of its standard errors (here ~0.0014 step, while
    # round-to-nearest would give about -0.015).
    assert abs(err.mean().item()) <= 4 * math.sqrt(var.sum().item() / n_seeds) / err.numel() + 1e-6


def test_int8_update_seeds():
    shape, gs = (8, 128), 64
    q0, s0, _ = int8_ref.quantize_int8_ref(randn(*shape), gs, True)
    delta = torch.rand(shape, device=DEV).sub(0.5) * 2 * s0.repeat_interleave(gs).reshape(shape)
    outs = {}
    for key, seed in (("a", 11), ("a2", 11), ("b", 12), ("big", 2**40 + 11)):
        q, s = q0.clone(), s0.clone()
        int8_triton.int8_update_triton(q, s, None, delta, 1.0, gs, seed)
        outs[key] = q
    assert torch.equal(outs["a"], outs["a2"])
    assert not torch.equal(outs["a"], outs["b"])
    assert not torch.equal(outs["a"], outs["big"])


# --- INT4 format and projections ---------------------------------------------------------------------


@pytest.mark.parametrize("shape,gs", SHAPES_GS + [((7,), 3)])
def test_int4_formats_exact(poison, shape, gs):
    p = randn(*shape)
    packed, s, z = run2(poison, int4_triton.quantize_int4_triton, p, gs)
    ref = on_cpu(int4_ref.quantize_int4_ref, p, gs)
    assert torch.equal(packed, ref[0]) and torch.equal(s, ref[1]) and torch.equal(z, ref[2])
    d = run2(poison, int4_triton.dequantize_int4_triton, packed, s, z, shape, gs, torch.float32)
    assert torch.equal(d, on_cpu(int4_ref.dequantize_int4_ref, packed, s, z, shape, gs))
    codes = torch.randint(0, 16, shape, dtype=torch.uint8, device=DEV)
    pk = run2(poison, int4_triton.pack_int4_triton, codes)
    assert torch.equal(pk, int4_ref.pack_int4_ref(codes))
    un = run2(poison, int4_triton.unpack_int4_triton, pk, codes.numel())
    assert torch.equal(un, codes.reshape(-1))


def test_pack_int4_rejects_wide_codes():
    import qgl.kernels as K

    with pytest.raises(ValueError, match="0..15"):  # checked once, by the entry point
        K.pack_int4(torch.tensor([3, 16], dtype=torch.uint8, device=DEV))


# (m, n, rank, group): fast paths (row length % group == 0), general, odd row lengths, tiny group.
I4_SHAPES = [(17, 300, 5, 64), (40, 33, 16, 256), (64, 257, 24, 100), (33, 64, 32, 32), (20, 31, 7, 3)]


@pytest.mark.parametrize("m,n,r,gs", I4_SHAPES)
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("path", ["fused", "dense"])
def test_int4_projections_fp32(poison, m, n, r, gs, side, path):
    # The dense path rounds fp32 operands to bf16 (as the fused kernel does on a GPU).
    tol = 1e-2 if path == "dense" and gs >= w8a16_triton.MIN_KERNEL_GROUP else F32_TOL
    p_shape = (r, n) if side == "right" else (m, r)
    packed, s, z = int4_ref.quantize_int4_ref(randn(*p_shape), gs)
    g = randn(m, n)
    low = run2(poison, int4_triton.int4_project_triton, g, packed, s, z, p_shape, gs, side, path)
    low_r = int4_ref.int4_project_ref(g, packed, s, z, p_shape, gs, side)
    assert low.dtype == torch.float32 and low.shape == low_r.shape
    assert rel_err(low, low_r) < tol
    low_in = randn(*low_r.shape)
    back = int4_triton.int4_project_back_triton
    full = run2(poison, back, low_in, packed, s, z, p_shape, gs, side, torch.float32, path)
    assert full.shape == (m, n) and full.dtype == torch.float32
    full_r = int4_ref.int4_project_back_ref(low_in, packed, s, z, p_shape, gs, side)
    assert rel_err(full, full_r) < tol
    # 16-bit output (what the optimizer asks for INT8 weights): fp32 accumulation, one rounding.
    # fp16 here: the interpreter has no bf16 arithmetic; CUDA tests cover bf16.
    half = run2(poison, back, low_in, packed, s, z, p_shape, gs, side, torch.float16, path)
    assert half.dtype == torch.float16
    assert rel_err(half, full_r) < max(tol, 2e-3)


def test_int4_projection_path_choice(monkeypatch):
    """"auto" is the fused kernel on CPU (the interpreter) and dense on CUDA; the env var forces one."""
    dev = torch.device(DEV)
    assert int4_triton._use_dense("auto", dev) == (CUDA and int4_triton.mm_fp32_out(dev))
    assert int4_triton._use_dense("dense", dev) and not int4_triton._use_dense("fused", dev)
    monkeypatch.setenv("QGL_INT4_PROJECTION", "dense")
    assert int4_triton._use_dense("auto", dev)
    monkeypatch.setenv("QGL_INT4_PROJECTION", "fused")
    assert not int4_triton._use_dense("auto", dev)
    with pytest.raises(ValueError, match="path must be one of"):
        int4_triton._use_dense("cublas", dev)


@pytest.mark.parametrize("side", ["right", "left"])
def test_int4_project_fp16_strided(poison, side):
    m, n, r, gs = 48, 64, 16, 64
    p_shape = (r, n) if side == "right" else (m, r)
    packed, s, z = int4_ref.quantize_int4_ref(randn(*p_shape), gs)
    g = randn(n, m, dtype=torch.float16).t()  # non-contiguous gradient
    low = run2(poison, int4_triton.int4_project_triton, g, packed, s, z, p_shape, gs, side)
    assert rel_err(low, int4_ref.int4_project_ref(g, packed, s, z, p_shape, gs, side)) < 3e-3


# --- dispatch and GPU-only checks -------------------------------------------------------------------

_PUBLIC = {
    "int8": ["quantize_int8", "dequantize_int8", "int8_update"],
    "int4": [
        "quantize_int4",
        "dequantize_int4",
        "pack_int4",
        "unpack_int4",
        "int4_project",
        "int4_project_back",
    ],
    "w8a16": ["w8a16_linear", "w8a16_grad_input"],
}


@pytest.mark.parametrize("family", sorted(_PUBLIC))
def test_every_dispatch_name_has_a_triton_kernel(family):
    import importlib
    import inspect

    import qgl.kernels as K

    src = inspect.getsource(K)
    for name in _PUBLIC[family]:
        # The entry point imports `<name>_triton` by name from a Triton module that defines it.
        lines = [ln.strip() for ln in src.splitlines() if ln.strip().endswith(f" import {name}_triton")]
        line = lines[0] if lines else None
        assert line is not None, name
        module = importlib.import_module("qgl.kernels" + line.split()[1])
        assert callable(getattr(module, f"{name}_triton", None)), name


@pytest.mark.cuda
def test_dispatch_selects_triton_on_cuda(monkeypatch):
    import qgl.kernels as K

    monkeypatch.delenv("QGL_DISABLE_TRITON", raising=False)
    called = []
    for module, name in ((int8_triton, "int8_update_triton"), (w8a16_triton, "w8a16_linear_triton"),
                         (int4_triton, "int4_project_triton")):
        real = getattr(module, name)
        spy = lambda *a, _real=real, _name=name, **k: called.append(_name) or _real(*a, **k)  # noqa: E731
        monkeypatch.setattr(module, name, spy)
    q, s, _ = K.quantize_int8(torch.randn(8, 64, device="cuda"), 64)
    K.int8_update_(q, s, None, torch.zeros(8, 64, device="cuda"), 1.0, 64, 0)
    K.w8a16_linear(torch.randn(2, 64, device="cuda", dtype=torch.bfloat16), q, s, None, 64)
    packed, ps, pz = K.quantize_int4(torch.randn(4, 64, device="cuda"), 64)
    K.int4_project(torch.randn(8, 64, device="cuda"), packed, ps, pz, (4, 64), 64, "right")
    assert called == ["int8_update_triton", "w8a16_linear_triton", "int4_project_triton"]


@pytest.mark.cuda
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("path", ["fused", "dense"])
def test_int4_projection_large_cuda(poison, side, dtype, path):
    m, n, r, gs = 1024, 2752, 256, 256
    p_shape = (r, n) if side == "right" else (m, r)
    packed, s, z = int4_ref.quantize_int4_ref(randn(*p_shape), gs)
    g = randn(m, n, dtype=dtype)
    low = run2(poison, int4_triton.int4_project_triton, g, packed, s, z, p_shape, gs, side, path)
    tol = 1e-2 if dtype == torch.bfloat16 else 3e-3
    assert rel_err(low, int4_ref.int4_project_ref(g, packed, s, z, p_shape, gs, side)) < tol
    back = int4_triton.int4_project_back_triton
    full = run2(poison, back, low, packed, s, z, p_shape, gs, side, torch.float32, path)
    full_r = int4_ref.int4_project_back_ref(low, packed, s, z, p_shape, gs, side)
    assert rel_err(full, full_r) < 3e-3
    full16 = run2(poison, back, low, packed, s, z, p_shape, gs, side, torch.bfloat16, path)
    assert full16.dtype == torch.bfloat16 and rel_err(full16, full_r) < 6e-3


@pytest.mark.cuda
def test_int8_large_cuda(poison):
    w = randn(2048, 5504)
    q, s, z = run2(poison, int8_triton.quantize_int8_triton, w, 256, False)
    ref = on_cpu(int8_ref.quantize_int8_ref, w, 256, False)
    assert torch.equal(q, ref[0]) and torch.equal(s, ref[1]) and torch.equal(z, ref[2])
    delta = randn(2048, 5504, scale=1e-3)
    q2, s2, z2 = q.clone(), s.clone(), z.clone()
    int8_triton.int8_update_triton(q2, s2, z2, delta, 0.999, 256, seed=3)
    x, _, _ = _exact_grid(q, s, z, delta, 0.999, 256, s2, z2)
    got = q2.reshape(-1).double()
    assert ((got >= (x - 1e-4).floor()) & (got <= (x + 1e-4).ceil())).all()




@pytest.mark.cuda
@pytest.mark.parametrize("idx", range(len(int4_triton._CONFIGS)))
def test_int4_every_config_cuda(monkeypatch, idx):
    monkeypatch.setenv("QGL_TRITON_AUTOTUNE", "0")
    monkeypatch.setattr(int4_triton, "_CONFIGS", [int4_triton._CONFIGS[idx]])
    # fast paths; general paths with an even and an odd row length of P
    for m, n, r, gs in [(512, 768, 256, 256), (300, 390, 101, 64)]:
        for side in ("right", "left"):
            p_shape = (r, n) if side == "right" else (m, r)
            packed, s, z = int4_ref.quantize_int4_ref(randn(*p_shape), gs)
            g = randn(m, n, dtype=torch.bfloat16)
            with skip_if_too_large():
                low = int4_triton.int4_project_triton(g, packed, s, z, p_shape, gs, side, "fused")
                full = int4_triton.int4_project_back_triton(low, packed, s, z, p_shape, gs, side,
                                                            path="fused")
            assert rel_err(low, int4_ref.int4_project_ref(g, packed, s, z, p_shape, gs, side)) < 1e-2
            assert rel_err(full, int4_ref.int4_project_back_ref(low, packed, s, z, p_shape, gs, side)) < 3e-3
