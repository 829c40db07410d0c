"""The optimizer core (qgl/optim/update.py), the layer-wise driver on its own, and the INT8 storage
that updates go through (qgl.quant.Int8Tensor attached to QLinear's carrier)."""

import ast
import copy
import sys
from pathlib import Path

import pytest
import torch
from _hand_step import step_by_hand
from torch import nn

from qgl.nn import QLinear, quantize_model
from qgl.optim import QGaLoreAdamW, make_param_groups
from qgl.optim.layerwise import LayerwiseDriver
from qgl.quant import Int8Tensor, storage_of

OPTIM = Path(__file__).resolve().parents[1] / "qgl" / "optim"


def _model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 8))
    return quantize_model(net, target_modules=["0", "2"], group_size=32)


def _imports(name: str) -> set[str]:
    tree = ast.parse((OPTIM / name).read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_core_driver_and_offload_do_not_import_each_other():
    """update.py is called by the optimizer and knows none of optimizer/driver/offload; the driver and
    the offloader know neither the optimizer nor each other."""
    assert not {"qgl.optim.qgalore_adamw", "qgl.optim.layerwise", "qgl.optim.offload"} & _imports("update.py")
    assert not {"qgl.optim.qgalore_adamw", "qgl.optim.offload", "qgl.optim.update"} & _imports("layerwise.py")
    assert not {"qgl.optim.qgalore_adamw", "qgl.optim.layerwise", "qgl.optim.update"} & _imports("offload.py")
    assert "_qgl_owner" not in (OPTIM / "update.py").read_text() + (OPTIM / "qgalore_adamw.py").read_text()


@pytest.mark.parametrize("stochastic_rounding", [True, False])
def test_apply_update_alone_equals_the_optimizer_step(stochastic_rounding):
    """apply_update driven by hand (state, group, index, storage) gives the optimizer's weights, bit
    for bit."""
    kw = dict(rank=4, target_modules=["0", "2", "4"], update_proj_gap=2)
    models = [_model(), _model()]
    opts = [QGaLoreAdamW(make_param_groups(m, **kw), lr=1e-2, weight_decay=0.1,
                         stochastic_rounding=stochastic_rounding) for m in models]
    hand = opts[1]
    for step in range(5):
        x = torch.randn(16, 32, generator=torch.Generator().manual_seed(step))
        for m in models:
            m(x).square().mean().backward()
        opts[0].step()
        step_by_hand(hand)
        for o in opts:
            o.zero_grad()
    a, b = (m.state_dict() for m in models)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(isinstance(storage_of(p), Int8Tensor) for p in models[0].parameters())


def test_layerwise_driver_runs_any_update_callable():
    lin = nn.Linear(4, 3)
    seen = []
    name = lambda p: "weight" if p is lin.weight else "bias"  # noqa: E731
    driver = LayerwiseDriver(lin.parameters(), lambda p: seen.append(p.grad.clone()), name,
                             check_finite=True, clip_norm=None)
    lin(torch.ones(2, 4)).sum().backward()
    assert len(seen) == 2 and lin.weight.grad is None and lin.bias.grad is None  # updated, then freed
    with driver.accumulating():
        lin(torch.ones(2, 4)).sum().backward()
    assert len(seen) == 2 and lin.weight.grad is not None  # deferred: the gradient accumulates
    lin.weight.grad = None
    lin.bias.grad = None
    lin(torch.full((2, 4), float("nan"))).sum().backward()
    with pytest.raises(FloatingPointError, match=r"\['weight'\]"):
        driver.raise_if_nonfinite()
    driver.remove()
    lin(torch.ones(2, 4)).sum().backward()
    assert len(seen) == 4 and lin.weight.grad is not None


def test_qlinear_storage_is_a_live_view_of_its_buffers():
    q = QLinear.from_linear(nn.Linear(16, 8), group_size=32, symmetric=False)
    s = q.storage
    assert storage_of(q.weight) is s and s.q is q.weight_int8 and s.zero is q.weight_zero
    other = QLinear.from_linear(nn.Linear(16, 8), group_size=32, symmetric=False)
    q.load_state_dict(other.state_dict(), assign=True)  # new buffer tensors: the view follows them
    assert s.q is q.weight_int8 and torch.equal(s.dequantize(), other.dequantize_weight())
    c = copy.deepcopy(q)
    assert c.storage.q is c.weight_int8 and c.storage.q is not q.weight_int8
    before = q.dequantize_weight()
    s.add_(torch.full((8, 16), 0.01), 1.0, seed=3)
    assert not torch.equal(q.dequantize_weight(), before)
    with pytest.raises(ValueError, match="shape"):
        s.add_(torch.zeros(16, 8), 1.0, seed=None)


def _tensors(obj):
    """Every tensor in an optimizer state (projectors through their state dicts)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
    elif hasattr(obj, "state_dict"):
        yield from _tensors(obj.state_dict())


def _layerwise_model(min_8bit_size: int):
    torch.manual_seed(0)
    net = quantize_model(nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 48)), target_modules=["0"],
                         group_size=32)  # an INT8 QLinear and a float nn.Linear, both projected
    groups = make_param_groups(net, rank=4, target_modules=["0", "1"], update_proj_gap=2)
    return net, QGaLoreAdamW(groups, lr=1e-2, weight_decay=0.1, layerwise=True, min_8bit_size=min_8bit_size)


@pytest.mark.parametrize("min_8bit_size", [1, 4096])  # 8-bit and fp32 moments
@pytest.mark.parametrize("entry", ["update_param", "update_from_grad"])
def test_updates_called_with_grad_enabled_build_no_graph(entry, min_8bit_size):
    """Called outside backward with grad mode on, the update still runs under no_grad (entered only
    then, not in the hooks): no autograd graph on the weights or the state, even from a gradient that
    has one, and the same weights and state as with grad mode off."""
    runs = []
    for grad_mode in (True, False):
        net, opt = _layerwise_model(min_8bit_size)
        params = [p for g in opt.param_groups for p in g["params"]]
        call = opt.update_param if entry == "update_param" else opt.layerwise.update_from_grad
        gen = torch.Generator().manual_seed(1)
        with torch.set_grad_enabled(grad_mode):
            for _ in range(3):  # a refresh at step 2 (gap 2) too
                for p in params:
                    p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).requires_grad_() * 1.0
                    call(p)
                    p.grad = None
            assert torch.is_grad_enabled() is grad_mode  # the mode is restored
        runs.append((net, opt))
    (net, opt), (ref_net, ref_opt) = runs
    assert all(p.is_leaf and p.grad_fn is None for p in net.parameters())
    assert not any(t.requires_grad for t in net.buffers())
    state = list(_tensors(list(opt.state.values())))
    assert state and not any(t.requires_grad or t.grad_fn is not None for t in state)
    a, b = net.state_dict(), ref_net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ref_state = list(_tensors(list(ref_opt.state.values())))
    assert len(ref_state) == len(state)
    assert all(torch.equal(x, y) for x, y in zip(state, ref_state, strict=True))


def test_the_backward_hook_path_enters_no_no_grad_context(monkeypatch):
    """Grad mode is off inside backward: the layer-wise update enters no `torch.no_grad()` there; a
    direct call with grad mode on enters exactly one (update_param, inside, sees it off)."""
    entered = []

    class CountingNoGrad(torch.no_grad):
        def __enter__(self):
            # The optimizer's only (torch's once_differentiable, in QLinear's backward, enters its own)
            if "qgl/optim/" in sys._getframe(1).f_code.co_filename.replace("\\", "/"):
                entered.append(1)
            return super().__enter__()

    net, opt = _layerwise_model(4096)
    x = torch.randn(4, 32)
    net(x).square().mean().backward()  # the first updates: states and the SVD
    monkeypatch.setattr(torch, "no_grad", CountingNoGrad)
    net(x).square().mean().backward()
    assert entered == [] and all(p.grad is None for p in net.parameters())
    p = net[1].weight
    p.grad = torch.randn(p.shape)
    opt.layerwise.update_from_grad(p)
    assert entered == [1]
