"""kernels/aligned.py: products on operands with 16-byte aligned rows give the plain product's values,
contiguous, in the operands' dtype; on CPU, under ALIGN_MIN_FLOPS and under autograd they are the
plain product itself."""

from __future__ import annotations

import pytest
import torch

from qgl.kernels import aligned


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    tol = dict(rtol=1e-5, atol=1e-5) if a.dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(a, b, **tol)


def test_is_aligned_reads_the_strides_and_the_base_address():
    assert aligned.is_aligned(torch.zeros(4, 8, dtype=torch.bfloat16))  # rows of 16 bytes
    assert not aligned.is_aligned(torch.zeros(4, 7, dtype=torch.bfloat16))  # 14 bytes
    assert aligned.is_aligned(torch.zeros(4, 8, dtype=torch.bfloat16).t())  # column-major, ld 8
    assert not aligned.is_aligned(torch.zeros(4, 7, dtype=torch.bfloat16).t())
    assert aligned.is_aligned(torch.zeros(4, 4, dtype=torch.float32))
    assert not aligned.is_aligned(torch.zeros(4, 16, dtype=torch.bfloat16)[:, 1:9])  # base off by 2 bytes
    assert not aligned.is_aligned(torch.zeros(4, 16, dtype=torch.bfloat16)[:, ::2])  # no unit stride
    assert aligned.is_aligned(torch.zeros(4, 16, dtype=torch.bfloat16)[:, :5])  # short rows, strided


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_aligned_copies_only_an_unaligned_matrix_into_padded_rows(dtype):
    ok = torch.randn(6, 8, dtype=dtype)
    assert aligned.aligned(ok) is ok
    odd = torch.randn(6, 7, dtype=dtype)
    copy = aligned.aligned(odd)
    assert copy.shape == odd.shape and torch.equal(copy, odd) and aligned.is_aligned(copy)
    assert copy.stride(0) * copy.element_size() % aligned.ALIGN_BYTES == 0 and copy.stride(1) == 1
    col = aligned.aligned(odd.t())  # a transposed unaligned matrix: a column-major copy
    assert torch.equal(col, odd.t()) and aligned.is_aligned(col) and col.stride(0) == 1


# (m, k, n): unaligned k (LLaMA-1B's down_proj), unaligned n (gate/up), both, neither.
SHAPES = [(33, 21, 16), (33, 16, 21), (17, 13, 11), (8, 16, 24)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("transposed", [False, True])
def test_forced_mm_is_the_plain_product_contiguous(dtype, shape, transposed):
    m, k, n = shape
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(k, n, generator=g).to(dtype)
    if transposed:  # the operands of a weight gradient, dy^T x: column-major views
        a, b = a.t().contiguous().t(), b.t().contiguous().t()
    out = aligned.mm(a, b, force=True)
    assert out.shape == (m, n) and out.dtype == dtype and out.is_contiguous()
    _close(out, a @ b)


@pytest.mark.parametrize("bias", [False, True])
def test_forced_linear_and_matmul_keep_the_leading_dims(bias):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 13, generator=g)
    w = torch.randn(11, 13, generator=g)
    b = torch.randn(11, generator=g) if bias else None
    y = aligned.linear(x, w, b, force=True)
    assert y.shape == (2, 5, 11) and y.is_contiguous()
    _close(y, torch.nn.functional.linear(x, w, b))
    dy = torch.randn(2, 5, 11, generator=g)
    dx = aligned.matmul(dy, w, force=True)
    assert dx.shape == (2, 5, 13) and dx.is_contiguous()
    _close(dx, dy @ w)


def test_unforced_on_cpu_and_under_autograd_it_is_the_plain_product():
    a, b = torch.randn(9, 7), torch.randn(7, 5)
    assert torch.equal(aligned.mm(a, b), a @ b)  # CPU: nothing to align for
    a.requires_grad_(True)
    out = aligned.mm(a, b, force=True)  # `mm(out=...)` refuses tracked inputs: the plain product
    assert out.grad_fn is not None and torch.equal(out, a @ b)
    with pytest.raises(ValueError, match="2-D"):
        aligned.mm(torch.zeros(2, 3, 4), torch.zeros(4, 2))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("in_out", [(2048, 5461), (5461, 2048)])
def test_qlinear_on_unaligned_llama_1b_shapes_matches_the_float_layer_on_cuda(in_out):
    """LLaMA-1B's MLP (5461 wide) at 2048 tokens: a product over ALIGN_MIN_FLOPS, so the dense path and
    the weight gradient run on aligned copies; forward, input and weight gradients match nn.Linear
    on the dequantized weight."""
    from qgl.nn import QLinear

    torch.manual_seed(0)
    fin, fout = in_out
    assert 2 * 2048 * fin * fout >= aligned.ALIGN_MIN_FLOPS
    linear = torch.nn.Linear(fin, fout, bias=False).cuda()
    layer = QLinear.from_linear(linear).to(torch.bfloat16)
    ref = torch.nn.Linear(fin, fout, bias=False).cuda().to(torch.bfloat16)
    ref.weight.data.copy_(layer.dequantize_weight(torch.bfloat16))
    x = torch.randn(4, 512, fin, device="cuda", dtype=torch.bfloat16)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y, y_ref = layer(x1), ref(x2)
    assert y.is_contiguous()
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    for got, want in [(y, y_ref), (x1.grad, x2.grad), (layer.weight.grad, ref.weight.grad)]:
        assert got.is_contiguous()
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_the_benchmark_runs_every_row_on_cpu(capsys):
    """benchmarks/aligned_gemm.py end to end at toy sizes (its timings need a GPU)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import aligned_gemm

    aligned_gemm.main(["--device", "cpu", "--tokens", "64", "--hidden", "16", "--width", "21"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 6 + 2 and rows[-1].startswith("| QLinear down (21 -> 16)")
