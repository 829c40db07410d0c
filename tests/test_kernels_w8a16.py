"""W8A16 Triton matmuls (forward and input gradient) against their plain-torch reference: the fused
kernel (tile configs, swapped tiles, split-K) and the dense path, with poisoned outputs as in
``test_kernels_triton.py`` (whose docstring says how the poisons catch unwritten elements)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from _kernel_checks import F32_TOL, poison_triton_outputs, randn, rel_err, run2, skip_if_too_large  # noqa: E402

from qgl.kernels import int8_ref, w8a16_ref, w8a16_triton  # noqa: E402


@pytest.fixture
def poison(monkeypatch):
    """Poisoned outputs of the Triton modules (``_kernel_checks.poison_triton_outputs``)."""
    return poison_triton_outputs(monkeypatch)


# --- W8A16 matmuls ------------------------------------------------------------------------------------

# (tokens, out, in, group): group spanning rows (in < group), in not a multiple of the group or
# of the block, the fast path (BLOCK_K divides in and the group), also with groups spanning rows
# (in = 1.5 groups, as LLaMA-1B's 5504 = 21.5 x 256), a tiny group.
W8_SHAPES = [
    (3, 5, 7, 64),
    (17, 33, 300, 64),
    (16, 40, 256, 64),
    (7, 24, 384, 256),
    (5, 12, 96, 64),
    (5, 24, 257, 100),
    (9, 64, 128, 256),
    (4, 6, 9, 4),
]


@pytest.mark.parametrize("m,n,k,gs", W8_SHAPES)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("path", ["fused", "dense"])
def test_w8a16_fp32(poison, m, n, k, gs, symmetric, path):
    q, s, z = int8_ref.quantize_int8_ref(randn(n, k, shift=0.0 if symmetric else 0.3), gs, symmetric)
    x, bias, dy = randn(2, m, k), randn(n), randn(2, m, n)
    y = run2(poison, w8a16_triton.w8a16_linear_triton, x, q, s, z, gs, bias, path)
    assert y.shape == (2, m, n) and y.dtype == x.dtype
    assert rel_err(y, w8a16_ref.w8a16_linear_ref(x, q, s, z, gs, bias)) < F32_TOL
    dx = run2(poison, w8a16_triton.w8a16_grad_input_triton, dy, q, s, z, gs, path)
    assert dx.shape == (2, m, k) and dx.dtype == dy.dtype
    assert rel_err(dx, w8a16_ref.w8a16_grad_input_ref(dy, q, s, z, gs)) < F32_TOL


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("m,n,k,gs", [(17, 33, 300, 64), (16, 40, 256, 64)])
def test_w8a16_fp16_swap(poison, monkeypatch, swap, m, n, k, gs):
    monkeypatch.setitem(w8a16_triton.INTERPRET_CONFIG, "SWAP", swap)
    q, s, z = int8_ref.quantize_int8_ref(randn(n, k), gs, False)
    x, dy = randn(m, k, dtype=torch.float16), randn(m, n, dtype=torch.float16)
    y = run2(poison, w8a16_triton.w8a16_linear_triton, x, q, s, z, gs, None)
    assert y.dtype == torch.float16
    x32 = x.float()
    assert rel_err(y, w8a16_ref.w8a16_linear_ref(x32, q, s, z, gs)) < 3e-3
    dx = run2(poison, w8a16_triton.w8a16_grad_input_triton, dy, q, s, z, gs)
    assert rel_err(dx, w8a16_ref.w8a16_grad_input_ref(dy.float(), q, s, z, gs)) < 3e-3


@pytest.mark.parametrize("split", [2, 3, 8])
@pytest.mark.parametrize("m,n,k,gs", [(3, 5, 7, 64), (17, 33, 300, 64), (16, 40, 256, 64), (5, 24, 257, 100)])
def test_w8a16_split_k(poison, monkeypatch, split, m, n, k, gs):
    """Split-K partials summed by the wrapper: every split's share (empty trailing ones included,
    e.g. 8 splits of a 7-long K) and the bias added once."""
    monkeypatch.setitem(w8a16_triton.INTERPRET_CONFIG, "SPLIT_K", split)
    q, s, z = int8_ref.quantize_int8_ref(randn(n, k, shift=0.3), gs, False)
    x, bias, dy = randn(m, k), randn(n), randn(m, n)
    y = run2(poison, w8a16_triton.w8a16_linear_triton, x, q, s, z, gs, bias, "fused")
    assert rel_err(y, w8a16_ref.w8a16_linear_ref(x, q, s, z, gs, bias)) < F32_TOL
    dx = run2(poison, w8a16_triton.w8a16_grad_input_triton, dy, q, s, z, gs, "fused")
    assert rel_err(dx, w8a16_ref.w8a16_grad_input_ref(dy, q, s, z, gs)) < F32_TOL
    x16 = x.to(torch.float16)  # 16-bit activations: partials stay fp32, one rounding at the end
    y16 = run2(poison, w8a16_triton.w8a16_linear_triton, x16, q, s, z, gs, bias, "fused")
    assert y16.dtype == torch.float16
    assert rel_err(y16, w8a16_ref.w8a16_linear_ref(x16.float(), q, s, z, gs, bias)) < 3e-3


def test_w8a16_auto_path_by_token_count(monkeypatch):
    """"auto" dequantizes W and calls torch's matmul from dense_min_m() tokens on, fuses below."""
    calls = []
    real = w8a16_triton._decode
    monkeypatch.setattr(w8a16_triton, "_decode", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("QGL_W8A16_DENSE_MIN_M", "8")
    q, s, z = int8_ref.quantize_int8_ref(randn(24, 64), 64, True)
    for m, dense in [(7, False), (8, True), (40, True)]:
        calls.clear()
        x, dy = randn(m, 64), randn(m, 24)
        y = w8a16_triton.w8a16_linear_triton(x, q, s, z, 64)
        dx = w8a16_triton.w8a16_grad_input_triton(dy, q, s, z, 64)
        assert len(calls) == (2 if dense else 0), m
        assert rel_err(y, w8a16_ref.w8a16_linear_ref(x, q, s, z, 64)) < F32_TOL
        assert rel_err(dx, w8a16_ref.w8a16_grad_input_ref(dy, q, s, z, 64)) < F32_TOL
    with pytest.raises(ValueError, match="path must be one of"):
        w8a16_triton.w8a16_linear_triton(x, q, s, z, 64, path="cublas")


@pytest.mark.parametrize(
    "shape,gs,symmetric", [((24, 64), 64, True), ((24, 64), 64, False), ((5, 30), 64, True)]
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dense_decode_is_one_op_for_symmetric_whole_groups(monkeypatch, shape, gs, symmetric, dtype):
    """The dense path's decoding of W: one torch op for symmetric W in whole groups (its host cost is
    a fraction of a Triton launch's), the kernel otherwise; the reference's bits."""
    launches = []
    real = w8a16_triton.dequantize_int8_triton
    monkeypatch.setattr(w8a16_triton, "dequantize_int8_triton", lambda *a: launches.append(1) or real(*a))
    q, s, z = int8_ref.quantize_int8_ref(randn(*shape) * 3, gs, symmetric)
    w = w8a16_triton._decode(q, s, z, gs, dtype)
    one_op = symmetric and q.numel() % gs == 0
    assert launches == ([] if one_op else [1])
    if one_op or dtype == torch.float32:  # the interpreter casts to 16 bits by truncation, a GPU to nearest
        assert w.dtype == dtype and torch.equal(w, int8_ref.dequantize_int8_ref(q, s, z, gs, dtype))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dense_decode_is_the_dequantize_kernel_bit_for_bit_on_cuda(dtype):
    q, s, z = int8_ref.quantize_int8_ref(randn(2048, 5461).cuda() * 3, 256, True)
    w = w8a16_triton._decode(q, s, z, 256, dtype)
    assert torch.equal(w, w8a16_triton.dequantize_int8_triton(q, s, z, 256, dtype))



@pytest.mark.cuda
@pytest.mark.parametrize("m", [16, 1000])
@pytest.mark.parametrize(
    "n,k,gs,symmetric", [(2048, 2048, 256, True), (1000, 1536, 128, False), (384, 1000, 256, True)]
)
@pytest.mark.parametrize("path", ["fused", "dense"])
def test_w8a16_bf16_cuda(poison, m, n, k, gs, symmetric, path):
    q, s, z = int8_ref.quantize_int8_ref(randn(n, k), gs, symmetric)
    x, dy, bias = randn(m, k, dtype=torch.bfloat16), randn(m, n, dtype=torch.bfloat16), randn(n)
    y = run2(poison, w8a16_triton.w8a16_linear_triton, x, q, s, z, gs, bias, path)
    assert rel_err(y, w8a16_ref.w8a16_linear_ref(x.float(), q, s, z, gs, bias)) < 1e-2
    dx = run2(poison, w8a16_triton.w8a16_grad_input_triton, dy, q, s, z, gs, path)
    assert rel_err(dx, w8a16_ref.w8a16_grad_input_ref(dy.float(), q, s, z, gs)) < 1e-2



_W8_CONFIGS = w8a16_triton._SMALL_M + w8a16_triton._LARGE_M


@pytest.mark.cuda
@pytest.mark.parametrize("idx", range(len(_W8_CONFIGS)))
def test_w8a16_every_config_cuda(monkeypatch, idx):
    """Each autotuner config is correct on its own (the tuner would pick a wrong-but-fast one).

    A config only ever runs on its own M bucket (`_prune`), so it is checked there: small-M configs
    (split-K among them) on decode-sized token counts, large-M configs on training-sized ones.
    """
    cfg = _W8_CONFIGS[idx]
    small = cfg in w8a16_triton._SMALL_M
    monkeypatch.setenv("QGL_TRITON_AUTOTUNE", "0")
    monkeypatch.setattr(w8a16_triton, "_SMALL_M", [cfg] if small else w8a16_triton._SMALL_M)
    monkeypatch.setattr(w8a16_triton, "_LARGE_M", w8a16_triton._LARGE_M if small else [cfg])
    # fast path (in % group == 0; groups spanning rows with in % 128 == 0) and general path
    for m in (5, 40) if small else (65, 300):
        for n, k, gs, sym in [(520, 1024, 256, True), (136, 640, 256, False), (260, 1000, 128, False)]:
            q, s, z = int8_ref.quantize_int8_ref(randn(n, k), gs, sym)
            x, dy, bias = randn(m, k, dtype=torch.bfloat16), randn(m, n, dtype=torch.bfloat16), randn(n)
            with skip_if_too_large():
                y = w8a16_triton.w8a16_linear_triton(x, q, s, z, gs, bias, path="fused")
                dx = w8a16_triton.w8a16_grad_input_triton(dy, q, s, z, gs, path="fused")
            assert rel_err(y, w8a16_ref.w8a16_linear_ref(x.float(), q, s, z, gs, bias)) < 1e-2, (m, n, k)
            assert rel_err(dx, w8a16_ref.w8a16_grad_input_ref(dy.float(), q, s, z, gs)) < 1e-2, (m, n, k)
