"""8-bit blockwise optimizer state (bitsandbytes' dynamic format): qgl/quant/blockwise8.py."""

import pytest
import torch

from qgl.quant import blockwise8
from qgl.quant.blockwise8 import dequantize_blockwise, dynamic_map, quantize_blockwise

SIZES = [1, 255, 256, 257, 1000, 3 * 256 + 1]
# bitsandbytes' import (first done by a test here) trips a torch.jit deprecation warning.
bnb_import = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def sample(n, signed):
    x = torch.randn(n)
    x = torch.where(x >= 0, x + 0.01, x - 0.01)
    return x if signed else x.square()  # second moments are non-negative


def per_element(absmax, n, block=256):
    return absmax.repeat_interleave(block)[:n]


@bnb_import
@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_equals_bitsandbytes(signed):
    from bitsandbytes.functional import create_dynamic_map  # here: bnb logs a warning on import

    qmap = dynamic_map(signed)
    assert qmap.dtype == torch.float32 and qmap.shape == (256,)
    assert torch.equal(qmap, create_dynamic_map(signed))
    assert bool((qmap[1:] >= qmap[:-1]).all()) and float(qmap.max()) == 1.0


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("n", SIZES)
def test_quantization_picks_the_nearest_entry(poison, n, signed):
    qmap = dynamic_map(signed)
    x = sample(n, signed)
    codes, absmax = quantize_blockwise(x, qmap)
    assert codes.dtype == torch.uint8 and codes.shape == (n,)
    assert absmax.dtype == torch.float32 and absmax.shape == (-(-n // 256),)
    want_absmax = torch.stack([b.abs().max() for b in x.split(256)])
    assert torch.equal(absmax, want_absmax)
    xn = x / per_element(absmax, n)
    dist = (xn - qmap[codes.long()]).abs()
    best = (xn[:, None] - qmap[None, :]).abs().amin(1)
    assert bool((dist <= best + 1e-7).all())
    # Within half the gap between the two map entries around each value.
    hi = torch.searchsorted(qmap, xn).clamp(1, 255)
    half_gap = (qmap[hi] - qmap[hi - 1]) / 2
    assert bool((dist <= half_gap + 1e-7).all())


@pytest.mark.parametrize("n", SIZES)
def test_dequantize_round_trip(poison, n):
    qmap = dynamic_map(True)
    x = sample(n, True).view(1, n)
    codes, absmax = quantize_blockwise(x, qmap)
    deq = dequantize_blockwise(codes, absmax, qmap, x.shape)
    assert deq.dtype == torch.float32 and deq.shape == x.shape
    assert torch.equal(deq.flatten(), qmap[codes.long()] * per_element(absmax, n))
    # The largest gap of the signed map is between 0.9930 and 1.0 (about 0.07 of absmax / 2).
    assert bool(((deq - x).abs().flatten() <= 0.036 * per_element(absmax, n)).all())


def test_zero_block_and_low_precision_input():
    qmap = dynamic_map(True)
    x = torch.cat([torch.zeros(256), sample(100, True)]).bfloat16()
    codes, absmax = quantize_blockwise(x, qmap)
    assert float(absmax[0]) == 0.0
    assert bool((dequantize_blockwise(codes, absmax, qmap, (356,))[:256] == 0).all())
    assert torch.equal(codes, quantize_blockwise(x.float(), qmap)[0])


def test_chunked_work_equals_one_chunk(monkeypatch):
    qmap = dynamic_map(False)
    x = sample(5 * 256 + 77, False)
    whole = quantize_blockwise(x, qmap, 64)
    monkeypatch.setattr(blockwise8, "_CHUNK", 200)  # rounds up to whole blocks of 64
    chunked = quantize_blockwise(x, qmap, 64)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])
    deq = dequantize_blockwise(*chunked, qmap, x.shape, 64)
    monkeypatch.setattr(blockwise8, "_CHUNK", 1 << 22)
    assert torch.equal(deq, dequantize_blockwise(*whole, qmap, x.shape, 64))


@bnb_import
def test_compatible_with_bitsandbytes_codes():
    import bitsandbytes.functional as bnb_f

    qmap = dynamic_map(True)
    x = sample(3000, True)
    codes, absmax = quantize_blockwise(x, qmap)
    try:
        bnb_codes, state = bnb_f.quantize_blockwise(x, code=qmap, blocksize=256)
    except (RuntimeError, NotImplementedError) as err:  # no CPU kernel in this bnb build
        pytest.skip(f"bitsandbytes cannot quantize on CPU here: {err}")
    assert torch.equal(absmax, state.absmax)
    # bnb's CPU kernel does not always pick the nearest entry; ours is never farther.
    xn = x / per_element(absmax, 3000)
    ours, theirs = (xn - qmap[codes.long()]).abs(), (xn - qmap[bnb_codes.long()]).abs()
    assert bool((ours <= theirs + 1e-7).all()) and float((codes != bnb_codes).float().mean()) < 0.05
    # Our decoder reads bnb's codes as bnb does: the storage format is the same.
    want = bnb_f.dequantize_blockwise(bnb_codes, state)
    torch.testing.assert_close(dequantize_blockwise(bnb_codes, state.absmax, qmap, x.shape), want)


def test_bad_input_is_explained():
    qmap = dynamic_map(True)
    codes, absmax = quantize_blockwise(sample(300, True), qmap)
    with pytest.raises(ValueError, match="block must be a positive int"):
        quantize_blockwise(sample(300, True), qmap, 0)
    with pytest.raises(ValueError, match="block must be a positive int"):
        dequantize_blockwise(codes, absmax, qmap, (300,), -256)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        quantize_blockwise(torch.ones(300, dtype=torch.int32), qmap)
    with pytest.raises(TypeError, match="codes must have dtype torch.uint8"):
        dequantize_blockwise(codes.to(torch.int8), absmax, qmap, (300,))
    with pytest.raises(ValueError, match="sorted"):
        quantize_blockwise(sample(300, True), qmap.flip(0))
    with pytest.raises(ValueError, match="absmax must be 1-D with 2 blocks"):
        dequantize_blockwise(codes, absmax[:1], qmap, (300,))
    with pytest.raises(ValueError, match="codes must be 1-D with 301"):
        dequantize_blockwise(codes, absmax, qmap, (301,))


def test_qmap_order_checked_again_after_an_in_place_write(monkeypatch):
    """A map is checked once, then trusted until written in place: an unsorting write raises at the
    next call, quantize or dequantize, and a map sorted again passes."""
    checks = []
    real = blockwise8.check_dtype
    monkeypatch.setattr(blockwise8, "check_dtype", lambda *a: (checks.append(a[0]), real(*a))[1])
    qmap, x = dynamic_map(True).clone(), sample(300, True)
    codes, absmax = quantize_blockwise(x, qmap)
    dequantize_blockwise(codes, absmax, qmap, x.shape)
    quantize_blockwise(x, qmap)
    assert checks.count("qmap") == 1  # the first call's; the next two found it checked
    qmap[[0, -1]] = qmap[[-1, 0]]  # in place: no longer ascending
    with pytest.raises(ValueError, match="sorted"):
        quantize_blockwise(x, qmap)
    with pytest.raises(ValueError, match="sorted"):  # a failed check is not remembered
        dequantize_blockwise(codes, absmax, qmap, x.shape)
    qmap.copy_(dynamic_map(True))
    torch.testing.assert_close(quantize_blockwise(x, qmap)[0], codes, rtol=0, atol=0)
    n = checks.count("qmap")
    dequantize_blockwise(codes, absmax, qmap, x.shape)
    assert checks.count("qmap") == n


def test_checked_qmaps_are_forgotten_with_their_tensor():
    qmap = dynamic_map(False)
    quantize_blockwise(sample(300, False), qmap)
    key = id(qmap)
    assert key in blockwise8._CHECKED_QMAPS
    del qmap
    assert key not in blockwise8._CHECKED_QMAPS
