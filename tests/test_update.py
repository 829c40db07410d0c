"""The optimizer core (qgl/optim/update.py), the layer-wise driver on its own, and the INT8 storage
that updates go through (qgl.quant.Int8Tensor attached to QLinear's carrier)."""

import ast
import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from qgl.nn import QLinear, quantize_model
from qgl.optim import QGaLoreAdamW, make_param_groups
from qgl.optim.layerwise import LayerwiseDriver
from qgl.optim.update import apply_update
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
        for i, p in enumerate(p for g in hand.param_groups for p in g["params"]):
            state = hand.state[p]
            if not state:
                hand._init_state(p, hand._group_of[p], state)
            with torch.no_grad():
                apply_update(storage_of(p) or p, p.grad, state, hand._group_of[p], i)
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
