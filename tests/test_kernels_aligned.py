"""kernels/aligned.py: a product on shapes padded to 16 bytes gives the plain product's values,
contiguous, in the operands' dtype, whatever the padding's unwritten memory holds; on CPU, under
ALIGN_MIN_FLOPS and under autograd it is the plain product itself."""

from __future__ import annotations

import pytest
import torch

from qgl.kernels import aligned


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    tol = dict(rtol=1e-5, atol=1e-5) if want.dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got, want, **tol)


@pytest.fixture
def poisoned(monkeypatch):
    """Padded buffers start as NaN: a pad of the reduced dimension left unzeroed, or a padded row or
    column not dropped, shows in the result."""

    def nan_empty(*shape, **kw):
        return torch.full(shape, float("nan"), **kw)

    monkeypatch.setattr(aligned, "_empty", nan_empty)


def test_multiple_is_16_bytes_of_the_dtype():
    assert aligned.multiple(torch.bfloat16) == 8 and aligned.multiple(torch.float32) == 4
    assert aligned.multiple(torch.float64) == 2


def test_padding_keeps_the_major_order_and_zeroes_only_what_is_asked(poisoned):
    t = torch.arange(6.0).view(2, 3)
    rows = aligned._padded(t, 4, 4, zero_rows=True, zero_cols=False)
    assert rows.shape == (4, 4) and torch.equal(rows[:2, :3], t)
    assert torch.equal(rows[2:], torch.zeros(2, 4)) and rows[:2, 3].isnan().all()
    col = aligned._padded(t.t(), 4, 4, zero_rows=False, zero_cols=True)  # a transposed matrix
    assert (
        col.stride(0) == 1 and torch.equal(col[:3, :2], t.t()) and torch.equal(col[:, 2:], torch.zeros(4, 2))
    )
    ready = torch.zeros(4, 4)
    assert aligned._padded(ready, 4, 4, zero_rows=True, zero_cols=True) is ready  # nothing to pad


# (m, k, n): unaligned k (LLaMA-1B's down_proj forward), unaligned n (gate/up forward), all three, none.
SHAPES = [(32, 21, 16), (32, 16, 21), (17, 13, 11), (8, 16, 24)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("transposed", [False, True])
def test_forced_mm_is_the_plain_product_contiguous(poisoned, dtype, shape, transposed):
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
def test_forced_linear_and_matmul_keep_the_leading_dims(poisoned, bias):
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


def test_aligned_shapes_take_torchs_own_call_even_forced(monkeypatch):
    """LLaMA-7B's shapes (multiples of 8) keep the exact kernels and bits they had: no padding."""
    monkeypatch.setattr(aligned, "_padded", lambda *a, **k: pytest.fail("padded an aligned product"))
    x, w, dy = torch.randn(2, 8, 16), torch.randn(24, 16), torch.randn(2, 8, 24)
    assert torch.equal(aligned.linear(x, w, force=True), torch.nn.functional.linear(x, w))
    assert torch.equal(aligned.matmul(dy, w, force=True), dy @ w)
    assert torch.equal(aligned.mm(x[0], w.t(), force=True), x[0] @ w.t())


def test_what_is_padded_on_cuda():
    """The decision the GPU path takes, on CPU: a CUDA product is padded when unaligned and at least
    ALIGN_MIN_FLOPS, to 16 bytes of its dtype; aligned, small or CPU products are not (unless forced)."""
    from types import SimpleNamespace

    cuda_bf16 = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)  # _pad_step reads only these two
    cpu_bf16 = SimpleNamespace(is_cuda=False, dtype=torch.bfloat16)
    big = (4096, 2048, 5461)  # LLaMA-1B's up/gate forward at 16 x 256 tokens: 92 GFLOP
    assert aligned._pad_step(*big, cuda_bf16, force=False) == 8
    assert aligned._pad_step(4096, 4096, 11008, cuda_bf16, force=False) == 0  # LLaMA-7B: aligned
    assert aligned._pad_step(64, 2048, 5461, cuda_bf16, force=False) == 0  # 1.4 GFLOP: not worth it
    assert aligned._pad_step(*big, cpu_bf16, force=False) == 0
    assert aligned._pad_step(64, 2048, 5461, cpu_bf16, force=True) == 8
    assert aligned._pad_step(*big, SimpleNamespace(is_cuda=True, dtype=torch.float32), force=False) == 4


def test_unforced_on_cpu_and_under_autograd_it_is_the_plain_product():
    a, b = torch.randn(9, 7), torch.randn(7, 5)
    assert torch.equal(aligned.mm(a, b), a @ b)  # CPU: nothing to pad for
    a.requires_grad_(True)
    out = aligned.mm(a, b, force=True)  # under autograd: the plain product, no padded copies saved
    assert out.grad_fn is not None and torch.equal(out, a @ b)
    with pytest.raises(ValueError, match="2-D"):
        aligned.mm(torch.zeros(2, 3, 4), torch.zeros(4, 2))


def test_the_benchmark_runs_every_row_on_cpu(capsys):
    """benchmarks/aligned_gemm.py end to end at toy sizes (its timings need a GPU)."""
    from _bench import load_benchmark

    bench = load_benchmark("aligned_gemm.py")
    bench.main(["--device", "cpu", "--tokens", "64", "--hidden", "16", "--width", "21"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 6 + 2 and rows[-1].startswith("| QLinear down (21 -> 16)")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("in_out", [(2048, 5461), (5461, 2048)])
def test_qlinear_on_unaligned_llama_1b_shapes_matches_the_float_layer_on_cuda(in_out):
    """LLaMA-1B's MLP (5461 wide) at 2048 tokens: a product over ALIGN_MIN_FLOPS, so the dense path and
    the weight gradient run padded; forward, input and weight gradients match nn.Linear on the
    dequantized weight."""
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
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    for got, want in [(y, y_ref), (x1.grad, x2.grad), (layer.weight.grad, ref.weight.grad)]:
        assert got.is_contiguous()
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
