"""Packed INT4 projection format: kernels/int4_ref.py, its dispatch, qgl.quant.Int4Tensor."""

import io

import pytest
import torch
from _tensors import nonzero_randn, per_element

import qgl.kernels as K
from qgl.kernels.int4_ref import (
    dequantize_int4_ref,
    int4_project_back_ref,
    int4_project_ref,
    pack_int4_ref,
    quantize_int4_ref,
    unpack_int4_ref,
)
from qgl.quant import Int4Tensor

SHAPES = [(3, 5), (7, 300), (257, 129), (1, 1), (1000,)]
GROUPS = [32, 64, 256, 100]


@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_within_half_a_step(poison, shape, group_size):
    p = nonzero_randn(*shape)
    packed, scale, zero = quantize_int4_ref(p, group_size)
    n_groups = -(-p.numel() // group_size)
    assert packed.dtype == torch.uint8 and packed.shape == ((p.numel() + 1) // 2,)
    assert scale.shape == zero.shape == (n_groups,) and scale.dtype == zero.dtype == torch.float32
    codes = unpack_int4_ref(packed, p.numel())
    assert int(codes.max()) <= 15
    err = (p - dequantize_int4_ref(packed, scale, zero, shape, group_size)).abs()
    assert bool((err <= per_element(scale, group_size, shape) * (0.5 + 1e-4)).all())


def test_one_sign_and_constant_groups():
    p = torch.cat([torch.rand(64) + 5.0, torch.full((64,), -2.5), torch.full((3,), 7.0)])
    packed, scale, zero = quantize_int4_ref(p, 64)
    deq = dequantize_int4_ref(packed, scale, zero, p.shape, 64)
    assert float((p[:64] - deq[:64]).abs().max()) <= float(scale[0]) * (0.5 + 1e-4)
    assert torch.equal(deq[64:], p[64:])
    assert dequantize_int4_ref(packed, scale, zero, p.shape, 64, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("numel", [0, 1, 2, 3, 255, 256, 257, 1001])
def test_pack_unpack_round_trip(poison, numel):
    q = torch.randint(0, 16, (numel,), dtype=torch.uint8)
    packed = pack_int4_ref(q)
    assert packed.shape == ((numel + 1) // 2,)
    assert torch.equal(unpack_int4_ref(packed, numel), q)
    if numel % 2:
        assert int(packed[-1]) >> 4 == 0  # the pad nibble is 0


def test_pack_layout_low_nibble_first_and_any_shape():
    assert pack_int4_ref(torch.tensor([1, 2, 3], dtype=torch.uint8)).tolist() == [0x21, 0x03]
    q = torch.randint(0, 16, (3, 5), dtype=torch.uint8)
    assert torch.equal(unpack_int4_ref(pack_int4_ref(q), 15).view(3, 5), q)


def test_pack_unpack_reject_bad_input():
    with pytest.raises(ValueError, match="0..15"):
        K.pack_int4(torch.tensor([16], dtype=torch.uint8))
    with pytest.raises(TypeError, match="q must have dtype torch.uint8"):
        K.pack_int4(torch.tensor([1, 2], dtype=torch.int8))
    with pytest.raises(ValueError, match="ceil"):
        K.unpack_int4(torch.zeros(3, dtype=torch.uint8), 7)


@pytest.mark.parametrize("g_dtype", [torch.float32, torch.bfloat16])
def test_projections_equal_matmul_with_dequantized_p(poison, g_dtype):
    m, n, r = 40, 24, 8
    g = nonzero_randn(m, n, dtype=g_dtype)
    low_r, low_l = nonzero_randn(m, r), nonzero_randn(r, n)
    for side, p_shape, low in (("right", (r, n), low_r), ("left", (m, r), low_l)):
        pq = quantize_int4_ref(nonzero_randn(*p_shape), 64)
        p = dequantize_int4_ref(*pq, p_shape, 64)
        proj = int4_project_ref(g, *pq, p_shape, 64, side)
        back = int4_project_back_ref(low, *pq, p_shape, 64, side)
        assert proj.dtype == back.dtype == torch.float32 and back.shape == (m, n)
        want = g.float() @ p.T if side == "right" else p.T @ g.float()
        torch.testing.assert_close(proj, want)
        torch.testing.assert_close(back, low @ p if side == "right" else p @ low)
        torch.testing.assert_close(K.int4_project(g, *pq, p_shape, 64, side), proj)
        torch.testing.assert_close(K.int4_project_back(low, *pq, p_shape, 64, side), back)


def test_projection_rejects_bad_side_and_shapes():
    pq = quantize_int4_ref(nonzero_randn(8, 24), 64)
    g = nonzero_randn(40, 24)
    with pytest.raises(ValueError, match="side must be 'right' or 'left'"):
        K.int4_project(g, *pq, (8, 24), 64, "top")
    with pytest.raises(ValueError, match="side='left' needs"):
        K.int4_project(g, *pq, (8, 24), 64, "left")
    with pytest.raises(ValueError, match="side='right' needs"):
        K.int4_project_back(nonzero_randn(40, 5), *pq, (8, 24), 64, "right")
    with pytest.raises(ValueError, match="p_shape must be 2-D"):
        K.int4_project(g, *pq, (192,), 64, "right")


@pytest.mark.parametrize("group_size", [0, -3, 1.5])
def test_bad_group_size_is_named(group_size):
    packed, scale, zero = quantize_int4_ref(nonzero_randn(4, 8), 8)
    with pytest.raises(ValueError, match="group_size"):
        K.quantize_int4(nonzero_randn(4, 8), group_size)
    with pytest.raises(ValueError, match="group_size"):
        K.dequantize_int4(packed, scale, zero, (4, 8), group_size)


def test_bad_dtypes_are_explained():
    packed, scale, zero = quantize_int4_ref(nonzero_randn(4, 8), 8)
    with pytest.raises(TypeError, match="p must be a floating-point"):
        K.quantize_int4(torch.ones(4, 8, dtype=torch.int64))
    with pytest.raises(TypeError, match="zero must have dtype torch.float32"):
        K.dequantize_int4(packed, scale, zero.half(), (4, 8), 8)
    with pytest.raises(TypeError, match="asymmetric"):
        K.dequantize_int4(packed, scale, None, (4, 8), 8)
    with pytest.raises(ValueError, match="scale must be 1-D"):
        K.dequantize_int4(packed, scale, zero, (4, 16), 8)


def test_dispatch_matches_reference_on_cpu():
    p = nonzero_randn(7, 300)
    got, want = K.quantize_int4(p, 100), quantize_int4_ref(p, 100)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert torch.equal(K.dequantize_int4(*got, p.shape, 100), dequantize_int4_ref(*want, p.shape, 100))
    nines = torch.full((5,), 9, dtype=torch.uint8)
    assert torch.equal(K.unpack_int4(K.pack_int4(nines), 5), nines)


def test_int4_tensor_container_and_state_dict():
    p = nonzero_randn(33, 10)
    t = Int4Tensor.from_float(p, group_size=64)
    assert t.shape == (33, 10) and "Int4Tensor(shape=(33, 10)" in repr(t)
    assert t.nbytes == 165 + 2 * 4 * 6
    torch.testing.assert_close(t.dequantize(), p, atol=float(t.scale.max()) / 2 * 1.001, rtol=0)
    g = nonzero_randn(33, 50)
    torch.testing.assert_close(t.project(g, "left"), t.dequantize().T @ g)
    low = nonzero_randn(10, 50)
    torch.testing.assert_close(t.project_back(low, "left"), t.dequantize() @ low)
    buf = io.BytesIO()
    torch.save(t.state_dict(), buf)
    buf.seek(0)
    back = Int4Tensor.from_state_dict(torch.load(buf, weights_only=True))
    assert back.shape == t.shape and back.group_size == 64 and torch.equal(back.dequantize(), t.dequantize())
    with pytest.raises(KeyError, match="zero"):
        Int4Tensor.from_state_dict({k: v for k, v in t.state_dict().items() if k != "zero"})
    with pytest.raises(ValueError, match="packed must be 1-D"):
        Int4Tensor(t.packed[:-1], t.scale, t.zero, t.shape, 64)
