"""INT8 weight format: kernels/int8_ref.py, kernels/w8a16_ref.py, the dispatch, qgl.quant.Int8Tensor."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from _tensors import nonzero_randn, per_element

import qgl.kernels as K
from qgl.kernels import _dispatch
from qgl.kernels.int8_ref import (
    dequantize_int8_ref,
    int8_update_ref,
    quantize_int8_ref,
    stochastic_round_ref,
)
from qgl.kernels.w8a16_ref import w8a16_grad_input_ref, w8a16_linear_ref
from qgl.quant import Int8Tensor

SHAPES = [(3, 5), (7, 300), (257, 129), (1, 1), (1000,)]
GROUPS = [32, 64, 256, 100]


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_within_half_a_step(poison, shape, group_size, symmetric):
    w = nonzero_randn(*shape) * torch.rand(shape).add(0.5)
    q, scale, zero = quantize_int8_ref(w, group_size, symmetric)
    n_groups = -(-w.numel() // group_size)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == (n_groups,) and bool((scale > 0).all())
    assert (zero is None) == symmetric
    if symmetric:
        assert int(q.min()) >= -127
    else:
        assert zero.dtype == torch.float32 and zero.shape == (n_groups,)
    err = (w - dequantize_int8_ref(q, scale, zero, group_size)).abs()
    assert bool((err <= per_element(scale, group_size, shape) * (0.5 + 1e-4)).all())


def test_low_precision_input_is_quantized_in_fp32():
    w = nonzero_randn(7, 300, dtype=torch.bfloat16)
    for symmetric in (True, False):
        got = quantize_int8_ref(w, 64, symmetric)
        want = quantize_int8_ref(w.float(), 64, symmetric)
        for a, b in zip(got, want, strict=True):
            assert (a is None and b is None) or torch.equal(a, b)
    q, scale, _ = got
    assert dequantize_int8_ref(q, scale, got[2], 64, torch.bfloat16).dtype == torch.bfloat16


def test_zero_and_constant_groups_are_exact():
    w = torch.cat([torch.zeros(64), torch.full((64,), 5.25), torch.full((10,), -3.0)])
    q, scale, _ = quantize_int8_ref(w, 64, symmetric=True)
    assert scale[0] == 1 and bool((q[:64] == 0).all())
    for symmetric in (True, False):
        q, scale, zero = quantize_int8_ref(w, 64, symmetric)
        assert torch.equal(dequantize_int8_ref(q, scale, zero, 64), w)


def test_asymmetric_group_of_one_sign_is_not_clipped():
    w = torch.rand(4, 64) + 5.0  # every group in [5, 6]
    q, scale, zero = quantize_int8_ref(w, 64, symmetric=False)
    ours = (w - dequantize_int8_ref(q, scale, zero, 64)).abs()
    assert bool((ours <= per_element(scale, 64, w.shape) * (0.5 + 1e-4)).all())
    # The public Q-GaLore code: uint8 codes with a rounded zero point clamped to [0, 255]. For a
    # group in [5, 6] the zero point (-1275) clamps to 0 and every code saturates at 255.
    g = w.view(-1, 64)
    mn, mx = g.amin(1, keepdim=True), g.amax(1, keepdim=True)
    s = (mx - mn).clamp(min=1e-5) / 255
    z = (-torch.round(mn / s)).clamp(0, 255)
    public = (torch.clamp(torch.round(g / s) + z, 0, 255) - z) * s
    assert float((g - public).abs().min()) > 3.5  # values of 5..6 decode to 1.0: clipped
    assert float(ours.max()) < 0.01


# --- stochastic rounding -------------------------------------------------------------------------


def _mean_shift_in_steps(update, q0, scale0, zero0, gs, delta, seeds):
    """Mean over elements and seeds of (dequant after update - before) / step, and its std error."""
    before = dequantize_int8_ref(q0, scale0, zero0, gs)
    step = per_element(scale0, gs, q0.shape)
    shifts = []
    for seed in seeds:
        after = update(q0.clone(), scale0.clone(), None if zero0 is None else zero0.clone(), delta, seed)
        shifts.append((after - before) / step)
    shifts = torch.stack(shifts)
    return float(shifts.mean()), float(shifts.std() / shifts.numel() ** 0.5)


def _fp32_update(gs):
    def update(q, scale, zero, delta, seed):
        int8_update_ref(q, scale, zero, delta, 1.0, gs, seed)
        return dequantize_int8_ref(q, scale, zero, gs)

    return update


@pytest.mark.parametrize("symmetric", [True, False])
def test_update_of_a_hundredth_step_is_unbiased(symmetric):
    w = 0.75 + 0.25 * torch.rand(2000)  # values around 1.0
    q0, scale0, zero0 = quantize_int8_ref(w, 256, symmetric)
    delta = 0.01 * per_element(scale0, 256, w.shape)
    mean, se = _mean_shift_in_steps(_fp32_update(256), q0, scale0, zero0, 256, delta, range(200))
    assert se < 0.0025  # the test can tell 0.01 from 0
    assert abs(mean - 0.01) < 4 * se


def test_bf16_update_as_in_public_code_is_biased():
    # Grid chosen so that bf16 represents every weight exactly (scale 2**-7, codes 64..127 with
    # 127 in every group): any bias below comes from the update's arithmetic, not the start.
    gs = 256
    q0 = torch.randint(64, 128, (2000,), dtype=torch.int8)
    q0[::gs] = 127
    scale0 = torch.full((8,), 2.0**-7)
    delta = torch.full((2000,), 0.01 * 2.0**-7)

    def bf16_update(q, scale, zero, delta, seed):  # dequantize, add, divide in bf16
        w = q.to(torch.bfloat16) * per_element(scale, gs, q.shape).to(torch.bfloat16)
        w = w + delta.to(torch.bfloat16)
        new_scale = torch.cat([g.abs().amax().view(1) / 127 for g in w.split(gs)])
        x = (w / per_element(new_scale, gs, q.shape)).float()
        u = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed))
        return (x + u).floor().clamp(-127, 127) * per_element(new_scale.float(), gs, q.shape)

    mean32, se = _mean_shift_in_steps(_fp32_update(gs), q0, scale0, None, gs, delta, range(200))
    mean16, _ = _mean_shift_in_steps(bf16_update, q0, scale0, None, gs, delta, range(200))
    assert abs(mean32 - 0.01) < 4 * se
    assert abs(mean16 - 0.01) > 4 * se  # the update is lost: 0.01 step is below half a bf16 ulp


@pytest.mark.parametrize("symmetric", [True, False])
def test_update_bits_depend_on_seed_and_stay_next_to_the_exact_value(poison, symmetric):
    gs, decay = 64, 0.9
    w = nonzero_randn(7, 300)
    q0, scale0, zero0 = quantize_int8_ref(w, gs, symmetric)
    delta = 0.3 * nonzero_randn(7, 300) * per_element(scale0, gs, w.shape)

    def run(seed):
        q, s, z = q0.clone(), scale0.clone(), None if zero0 is None else zero0.clone()
        int8_update_ref(q, s, z, delta, decay, gs, seed)
        return q, s, z

    q1, s1, z1 = run(5)
    q2, s2, z2 = run(5)
    assert torch.equal(q1, q2) and torch.equal(s1, s2) and (symmetric or torch.equal(z1, z2))
    assert not torch.equal(q1, run(6)[0])
    # Independent fp32 computation of the exact grid value x = w' / scale + zero.
    new = dequantize_int8_ref(q0, scale0, zero0, gs) * decay + delta
    groups = new.flatten().split(gs)
    mn, mx = torch.stack([g.min() for g in groups]), torch.stack([g.max() for g in groups])
    if symmetric:
        want_scale = torch.maximum(-mn, mx) / 127
        x = new / per_element(want_scale, gs, new.shape)
    else:
        want_scale = (mx - mn) / 255
        want_zero = -128 - mn / want_scale
        torch.testing.assert_close(z1, want_zero)
        x = new / per_element(want_scale, gs, new.shape) + per_element(want_zero, gs, new.shape)
    torch.testing.assert_close(s1, want_scale)
    q1 = q1.float()
    assert bool(((q1 >= torch.floor(x - 1e-3)) & (q1 <= torch.ceil(x + 1e-3))).all())


def test_stochastic_round_ref_floor_or_ceil_and_clamp():
    x = torch.tensor([-130.5, 127.7, 3.0, -2.25, 0.5] * 100)
    r = stochastic_round_ref(x, 1, -127, 127)
    assert bool((r >= -127).all() and (r <= 127).all())
    inside = x.clamp(-127, 127)
    assert bool(((r == torch.floor(inside)) | (r == torch.ceil(inside))).all())
    assert bool((r[2::5] == 3).all()) and torch.equal(r, stochastic_round_ref(x, 1, -127, 127))
    assert 0.3 < float(r[4::5].mean()) < 0.7


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [0, -4, 2.5, True])
def test_bad_group_size_is_named(group_size):
    # Checked once, by the public entry points of qgl.kernels (the references trust them).
    q, scale, _ = quantize_int8_ref(nonzero_randn(4, 8), 8)
    with pytest.raises(ValueError, match="group_size"):
        K.quantize_int8(nonzero_randn(4, 8), group_size)
    with pytest.raises(ValueError, match="group_size"):
        K.dequantize_int8(q, scale, None, group_size)
    with pytest.raises(ValueError, match="group_size"):
        K.int8_update_(q, scale, None, torch.zeros(4, 8), 1.0, group_size, 0)


def test_bad_dtypes_and_shapes_are_explained():
    q, scale, _ = quantize_int8_ref(nonzero_randn(4, 8), 8)
    with pytest.raises(TypeError, match="w must be a floating-point"):
        K.quantize_int8(torch.ones(4, 8, dtype=torch.int32))
    with pytest.raises(TypeError, match="q must have dtype torch.int8"):
        K.dequantize_int8(q.to(torch.uint8), scale, None, 8)
    with pytest.raises(TypeError, match="scale must have dtype torch.float32"):
        K.dequantize_int8(q, scale.bfloat16(), None, 8)
    with pytest.raises(ValueError, match="scale must be 1-D with one value per group"):
        K.dequantize_int8(q, scale[:3], None, 8)
    with pytest.raises(ValueError, match="delta must have q's shape"):
        K.int8_update_(q, scale, None, torch.zeros(8, 4), 1.0, 8, 0)
    with pytest.raises(ValueError, match="contiguous"):
        K.int8_update_(q.t(), scale, None, torch.zeros(8, 4), 1.0, 8, 0)


# --- w8a16 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_w8a16_refs_equal_linear_with_dequantized_weight(poison, dtype, symmetric):
    q, scale, zero = quantize_int8_ref(nonzero_randn(17, 300), 64, symmetric)
    x, bias = nonzero_randn(2, 3, 300, dtype=dtype), nonzero_randn(17)
    w = dequantize_int8_ref(q, scale, zero, 64, dtype)
    torch.testing.assert_close(w8a16_linear_ref(x, q, scale, zero, 64, bias), F.linear(x, w, bias.to(dtype)))
    assert w8a16_linear_ref(x, q, scale, zero, 64, None).shape == (2, 3, 17)
    dy = nonzero_randn(2, 3, 17, dtype=dtype)
    torch.testing.assert_close(w8a16_grad_input_ref(dy, q, scale, zero, 64), dy @ w)
    with pytest.raises(ValueError, match="in-features"):  # checked once, by the entry point
        K.w8a16_linear(x[..., :10], q, scale, zero, 64, None)


# --- dispatch and Int8Tensor --------------------------------------------------------------------


def test_dispatch_uses_reference_on_cpu_and_matches_it(monkeypatch):
    w = nonzero_randn(7, 300)
    assert not _dispatch.use_triton(w)
    q, scale, zero = K.quantize_int8(w, 64, False)
    assert torch.equal(q, quantize_int8_ref(w, 64, False)[0])
    assert torch.equal(K.dequantize_int8(q, scale, zero, 64), dequantize_int8_ref(q, scale, zero, 64))
    q2, s2, z2 = q.clone(), scale.clone(), zero.clone()
    K.int8_update_(q, scale, zero, torch.ones_like(w) * 1e-3, 1.0, 64, 7)
    int8_update_ref(q2, s2, z2, torch.ones_like(w) * 1e-3, 1.0, 64, 7)
    assert torch.equal(q, q2) and torch.equal(scale, s2) and torch.equal(zero, z2)
    assert set(K.__all__) >= {"quantize_int8", "w8a16_linear", "int4_project_back", "use_triton"}
    monkeypatch.setenv("QGL_DISABLE_TRITON", "1")
    assert not _dispatch.use_triton(w)


def test_entry_points_import_their_triton_function_by_name():
    """Dispatch is by direct import inside the ``use_triton`` branch (no name built from strings):
    grepping a Triton function's name finds its caller in qgl.kernels."""
    import inspect

    src = inspect.getsource(K)
    for name in ("quantize_int8", "dequantize_int8", "int8_update"):
        assert f"from .int8_triton import {name}_triton" in src, name
    assert not hasattr(_dispatch, "pick")


def test_package_import_does_not_import_triton_modules():
    code = "import sys, qgl.kernels; print([m for m in sys.modules if m.endswith('_triton')])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_int8_tensor_container():
    w = nonzero_randn(7, 300)
    t = Int8Tensor.from_float(w, group_size=64, symmetric=False)
    assert t.shape == (7, 300) and not t.symmetric and "Int8Tensor(shape=(7, 300)" in repr(t)
    assert t.nbytes == 2100 + 2 * 4 * 33
    assert Int8Tensor.from_float(w, 64).nbytes == 2100 + 4 * 33
    torch.testing.assert_close(t.dequantize(), w, atol=float(t.scale.max()) / 2, rtol=0)
    assert t.add_(torch.zeros_like(w), seed=3) is t
    with pytest.raises(TypeError, match="q must have dtype"):
        Int8Tensor(t.q.float(), t.scale, t.zero, 64)
    with pytest.raises(ValueError, match="zero must be 1-D"):
        Int8Tensor(t.q, t.scale, t.zero[:-1], 64)
