"""QLinear (INT8 weight + zero-memory gradient carrier) and quantize_model, on CPU."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qgl.nn import QLinear, quantize_model, quantized_modules

IN, OUT = 96, 40


def _qlinear(bias=True, group_size=32, symmetric=True, dtype=torch.float32) -> QLinear:
    lin = nn.Linear(IN, OUT, bias=bias)
    return QLinear.from_linear(lin, group_size=group_size, symmetric=symmetric, compute_dtype=dtype)


def _reference(q: QLinear, dtype=torch.float32) -> nn.Linear:
    """An nn.Linear holding q's dequantized weight (and bias) in ``dtype``."""
    ref = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, dtype=dtype)
    with torch.no_grad():
        ref.weight.copy_(q.dequantize_weight(dtype))
        if q.bias is not None:
            ref.bias.copy_(q.bias)
    return ref


def _assert_no_dense_float(q: QLinear) -> None:
    """No float parameter or buffer of q owns storage for out*in elements (the carrier costs one)."""
    for t in list(q.parameters()) + list(q.buffers()):
        if t.is_floating_point():
            assert t.untyped_storage().nbytes() < q.out_features * q.in_features * t.element_size()
    assert q.weight.stride() == (0, 0)
    assert q.weight.untyped_storage().nbytes() == q.weight.element_size()


# ------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("group_size", [32, 80])  # divides IN=96 / does not
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, IN), (2, 5, IN)])
def test_forward_matches_dequantized_linear(group_size, bias, symmetric, dtype, shape):
    q = _qlinear(bias, group_size, symmetric, dtype)
    x = torch.randn(shape, dtype=dtype)
    y = q(x)
    b = None if q.bias is None else q.bias.to(dtype)
    expected = F.linear(x, q.dequantize_weight(dtype), b)
    assert y.dtype == dtype and y.shape == (*shape[:-1], OUT)
    torch.testing.assert_close(y, expected)
    # and the dequantized weight is close to the float one it came from (a sanity check on from_linear)
    assert q.dequantize_weight().abs().max() > 0


@pytest.mark.parametrize("group_size", [32, 80])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape", [(7, IN), (2, 5, IN)])
def test_gradients_match_nn_linear(group_size, symmetric, shape):
    q = _qlinear(True, group_size, symmetric)
    ref = _reference(q)
    x = torch.randn(shape, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    dy = torch.randn(*shape[:-1], OUT)
    q(x).backward(dy)
    ref(x_ref).backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(q.weight.grad, ref.weight.grad)
    torch.testing.assert_close(q.bias.grad, ref.bias.grad)
    g = q.weight.grad
    assert g.shape == (OUT, IN) and g.is_contiguous() and g.dtype == torch.float32
    _assert_no_dense_float(q)  # the grad is dense, the carrier stays stride 0


def test_gradient_accumulation_and_post_accumulate_hook():
    q = _qlinear()
    seen = []
    q.weight.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.clone()))
    x1, x2 = torch.randn(4, IN), torch.randn(3, IN)
    q(x1).sum().backward()
    g1 = q.weight.grad.clone()
    q(x2).sum().backward()
    torch.testing.assert_close(g1, torch.ones(4, OUT).t() @ x1)
    torch.testing.assert_close(q.weight.grad, g1 + torch.ones(3, OUT).t() @ x2)
    assert len(seen) == 2
    torch.testing.assert_close(seen[0], g1)
    torch.testing.assert_close(seen[1], q.weight.grad)


def test_frozen_weight_and_no_input_grad():
    q = _qlinear()
    q.weight.requires_grad_(False)
    x = torch.randn(3, IN, requires_grad=True)
    q(x).sum().backward()
    assert q.weight.grad is None and x.grad is not None and q.bias.grad is not None
    q.weight.requires_grad_(True)
    q(torch.randn(3, IN)).sum().backward()  # x needs no grad: only dW and db
    assert q.weight.grad.shape == (OUT, IN)


def test_autocast_bf16():
    q = _qlinear()  # fp32 carrier and bias, as under Lightning's bf16-mixed
    ref = _reference(q)
    x = torch.randn(2, 5, IN, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = q(x), ref(x_ref)
    assert y.dtype == torch.bfloat16
    expected = F.linear(x.detach().bfloat16(), q.dequantize_weight(torch.bfloat16), q.bias.bfloat16())
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(y, y_ref)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    assert x.grad.dtype == q.weight.grad.dtype == q.bias.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(q.weight.grad, ref.weight.grad)
    torch.testing.assert_close(q.bias.grad, ref.bias.grad)
    _assert_no_dense_float(q)


def test_layerwise_update_in_post_accumulate_hook():
    """The optimizer's pattern: update the INT8 weight from the hook, during backward."""
    torch.manual_seed(1)
    a, b = QLinear.from_linear(nn.Linear(IN, 64), 32), QLinear.from_linear(nn.Linear(64, OUT), 32)
    calls = []

    def hook(p):
        calls.append(p._qgl_owner)
        p._qgl_owner.apply_weight_update_(-0.1 * p.grad.float(), 1.0, seed=len(calls))
        p.grad = None

    for m in (a, b):
        m.weight.register_post_accumulate_grad_hook(hook)
    before = [m.dequantize_weight() for m in (a, b)]
    x = torch.randn(5, IN)
    b(torch.relu(a(x))).square().mean().backward()
    assert b(torch.randn(2, 64)).shape == (2, OUT)  # still usable afterwards
    assert calls == [b, a]  # one update per layer, last layer first
    assert all(not torch.equal(m.dequantize_weight(), w) for m, w in zip((a, b), before, strict=True))
    c = QLinear.from_linear(nn.Linear(IN, IN), 32)  # a layer used twice: one accumulated grad, one update
    c.weight.register_post_accumulate_grad_hook(hook)
    c(c(x)).sum().backward()
    assert calls[-1] is c and len(calls) == 3


def test_inplace_update_between_forward_and_backward_raises():
    q = _qlinear()
    x = torch.randn(3, IN, requires_grad=True)
    y = q(x)
    q.apply_weight_update_(torch.zeros(OUT, IN), 1.0, seed=0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_stock_optimizer_on_carrier_fails_loudly():
    q = _qlinear()
    q(torch.randn(2, IN)).sum().backward()
    # Issue 18: before the update (not torch's "single memory location ... clone()" error inside it),
    # naming what to do instead.
    with pytest.raises(TypeError, match=r"SGD cannot update a QLinear's weight.*dequantize_model"):
        torch.optim.SGD([q.weight], lr=0.1).step()


# ------------------------------------------------------------------------------- conversions
@pytest.mark.parametrize("convert", ["to", "bfloat16", "half", "double"])
def test_dtype_conversion_keeps_carrier(convert):
    q = _qlinear(symmetric=False)
    q(torch.randn(2, IN)).sum().backward()
    w, hooks = q.weight, []
    w.register_post_accumulate_grad_hook(lambda p: hooks.append(p.grad.dtype))
    int8_before = q.weight_int8.clone()
    target = {
        "to": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "half": torch.float16,
        "double": torch.float64,
    }
    out = q.to(torch.bfloat16) if convert == "to" else getattr(q, convert)()
    dtype = target[convert]
    assert out is q and q.weight is w and w._qgl_owner is q
    assert w.dtype == dtype and w.grad.dtype == dtype and w.grad.shape == (OUT, IN)
    assert q.bias.dtype == dtype
    assert q.weight_scale.dtype == q.weight_zero.dtype == torch.float32
    assert q.weight_int8.dtype == torch.int8 and torch.equal(q.weight_int8, int8_before)
    _assert_no_dense_float(q)
    w.grad = None
    y = q(torch.randn(2, IN, dtype=dtype))
    assert y.dtype == dtype
    y.sum().backward()
    assert hooks == [dtype] and w.grad.dtype == dtype


def test_meta_then_to_empty():
    q = QLinear.from_linear(nn.Linear(IN, OUT, device="meta"), group_size=32)
    assert q.weight_int8.is_meta and q.weight.is_meta and q.weight.stride() == (0, 0)
    q.to_empty(device="cpu")
    q.reset_parameters()
    _assert_no_dense_float(q)
    assert q.weight_scale.dtype == torch.float32 and q(torch.randn(2, IN)).shape == (2, OUT)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copy_and_pickle_keep_carrier(how):
    q = _qlinear(symmetric=False)
    if how == "deepcopy":
        c = copy.deepcopy(q)
    elif how == "pickle":
        c = pickle.loads(pickle.dumps(q))
    else:
        buf = io.BytesIO()
        torch.save(q, buf)
        buf.seek(0)
        c = torch.load(buf, weights_only=False)
    assert c.weight is not q.weight and c.weight._qgl_owner is c
    assert [n for n, _ in c.named_parameters()] == ["weight", "bias"]
    _assert_no_dense_float(c)
    x = torch.randn(3, IN)
    torch.testing.assert_close(c(x), q(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------- state dict
@pytest.mark.parametrize("symmetric", [True, False])
def test_state_dict_round_trip(symmetric):
    q = _qlinear(group_size=80, symmetric=symmetric)
    sd = q.state_dict()
    expected = {"weight_int8", "weight_scale", "bias"} | ({"weight_zero"} if not symmetric else set())
    assert set(sd) == expected
    fresh = QLinear(IN, OUT, group_size=80, symmetric=symmetric)
    ptrs = {k: v.data_ptr() for k, v in fresh.state_dict().items()}
    carrier = fresh.weight
    fresh.load_state_dict(sd)  # strict: the carrier is not reported missing
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k]) and v.data_ptr() == ptrs[k], k  # exact and in place
    assert fresh.weight is carrier and carrier.stride() == (0, 0)


def test_load_assign_into_meta_module():
    sd = _qlinear(symmetric=False).state_dict()
    q = QLinear(IN, OUT, group_size=32, symmetric=False, device="meta")
    q.load_state_dict(sd, assign=True)
    assert q.weight.device.type == "cpu" and q.weight._qgl_owner is q
    _assert_no_dense_float(q)
    q(torch.randn(2, IN)).sum().backward()
    assert q.weight.grad.shape == (OUT, IN)


def test_load_nn_linear_checkpoint_quantizes():
    lin = nn.Linear(IN, OUT)
    q = QLinear(IN, OUT, group_size=32)
    q.load_state_dict(lin.state_dict())
    ref = QLinear.from_linear(lin, group_size=32)
    for k, v in ref.state_dict().items():
        assert torch.equal(q.state_dict()[k], v), k


def test_load_state_dict_errors():
    q = _qlinear()
    sd = q.state_dict()
    with pytest.raises(RuntimeError, match="both given"):
        q.load_state_dict({**sd, "weight": torch.randn(OUT, IN)})
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        q.load_state_dict({"weight": torch.randn(OUT, IN + 1), "bias": sd["bias"]})
    with pytest.raises(RuntimeError, match="weight_scale"):
        q.load_state_dict({k: v for k, v in sd.items() if k != "weight_scale"})
    with pytest.raises(RuntimeError, match="weight_zero"):  # asymmetric checkpoint into a symmetric layer
        q.load_state_dict(_qlinear(symmetric=False).state_dict())


# ------------------------------------------------------------------------------ update protocol
@pytest.mark.parametrize("decay", [1.0, 0.9])
@pytest.mark.parametrize("symmetric", [True, False])
def test_apply_weight_update_expected_value(decay, symmetric):
    q = QLinear.from_linear(nn.Linear(16, 8), group_size=32, symmetric=symmetric)
    w0 = q.dequantize_weight()
    step = q.weight_scale.max().item()
    delta = 0.3 * step * torch.randn(8, 16)  # well under one INT8 step: lost without SR
    state = {k: v.clone() for k, v in q.state_dict().items()}
    n = 400
    acc = torch.zeros(8, 16)
    for seed in range(n):
        q.load_state_dict(state)
        q.apply_weight_update_(delta, decay, seed)
        acc += q.dequantize_weight()
    mean = acc / n
    # SR error per element is at most one step and has std <= step / 2: the mean of n is within ~5 sigma.
    torch.testing.assert_close(mean, decay * w0 + delta, rtol=0, atol=5 * step / (2 * n**0.5) + 1e-6)
    q.load_state_dict(state)
    q.apply_weight_update_(delta, decay, seed=7)
    a = q.state_dict()
    q.load_state_dict(state)
    q.apply_weight_update_(delta, decay, seed=7)
    assert all(torch.equal(a[k], v) for k, v in q.state_dict().items())  # same seed, same result
    with pytest.raises(ValueError, match="shape"):
        q.apply_weight_update_(torch.zeros(16, 8), decay, 0)


def test_nbytes_and_repr():
    q = _qlinear(group_size=32, symmetric=False)
    n_groups = OUT * IN // 32
    assert q.nbytes() == OUT * IN + 2 * 4 * n_groups
    assert "group_size=32" in repr(q) and "symmetric=False" in repr(q)


# ------------------------------------------------------------------------------------- surgery
class _Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.o_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True))


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = _Attn(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _ToyLM(nn.Module):
    def __init__(self, vocab=50, d=64, n_layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(_Block(d) for _ in range(n_layers))
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.embed(idx)
        for b in self.blocks:
            x = b(x)
        return self.lm_head(x)


def test_quantize_model_swaps_expected_layers():
    model = _ToyLM()
    idx = torch.randint(0, 50, (2, 12))
    y_float = model(idx).detach()
    old = model.blocks[0].attn.q_proj
    assert quantize_model(model, group_size=64) is model
    expected = {f"blocks.{i}.attn.{p}_proj" for i in range(2) for p in "qkvo"}
    expected |= {f"blocks.{i}.mlp.{j}" for i in range(2) for j in (0, 2)}
    assert set(quantized_modules(model)) == expected
    assert type(model.lm_head) is nn.Linear
    assert old.weight is None and old.bias is None  # the float copy was released
    y = model(idx)
    assert (y - y_float).norm() / y_float.norm() < 2e-2
    y.sum().backward()
    for m in quantized_modules(model).values():
        _assert_no_dense_float(m)
        assert m.weight.grad.shape == (m.out_features, m.in_features)
    assert quantize_model(model) is model  # idempotent: already-quantized layers count as matches


def test_quantize_model_patterns_and_errors():
    model = quantize_model(_ToyLM(), target_modules=[r"re:attn\.[qv]_proj$"], exclude=["blocks.1"])
    assert set(quantized_modules(model)) == {"blocks.0.attn.q_proj", "blocks.0.attn.v_proj"}
    with pytest.raises(ValueError, match=r"no nn.Linear matched.*lm_head"):
        quantize_model(_ToyLM(), target_modules=["ffn"])
    with pytest.raises(ValueError, match="not a valid regex"):
        quantize_model(_ToyLM(), target_modules=["re:("])


def test_quantize_model_skips_tied_and_mha_and_handles_shared():
    model = _ToyLM()
    model.blocks[1].attn.k_proj.weight = model.blocks[1].attn.q_proj.weight  # tied
    model.blocks[1].mlp[2] = model.blocks[0].mlp[2]  # one module under two names
    with pytest.warns(UserWarning, match="shared with another module"):
        quantize_model(model, target_modules=["attn", "mlp"])
    names = set(quantized_modules(model))
    assert "blocks.1.attn.q_proj" not in names and "blocks.1.attn.k_proj" not in names
    assert model.blocks[1].mlp[2] is model.blocks[0].mlp[2] and isinstance(model.blocks[0].mlp[2], QLinear)
    mha = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True)
    with (
        pytest.warns(UserWarning, match="MultiheadAttention"),
        pytest.raises(ValueError, match="no nn.Linear"),
    ):
        quantize_model(mha, target_modules=["self_attn"])
    with pytest.warns(UserWarning, match="TransformerEncoderLayer"), pytest.raises(ValueError):
        quantize_model(mha, target_modules=["linear"])
