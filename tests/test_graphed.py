"""Device scalars (the update with its step, lr and decay read from tensors) and the CUDA-graph replay
of the per-matrix update (qgl/optim/graphed.py).

On CPU: the device-scalar path gives the host-number path's bits (the 8-bit Adam then runs the Triton
kernel under the interpreter, the INT8 update its reference with the same key). On CUDA (`cuda`
marker): replayed graphs give the eager device-scalar path's bits through refreshes, a moving
learning rate and a checkpoint load, and train as the default eager path does.
"""

import contextlib
import copy

import pytest
import torch
from _hand_step import step_by_hand
from torch import nn

import qgl.kernels as K
from qgl.nn import quantize_model
from qgl.optim import QGaLoreAdamW, make_param_groups
from qgl.optim.graphed import GraphedUpdates
from qgl.optim.update import DeviceScalars, apply_update, sr_key, sr_seed
from qgl.quant import Int8Tensor, storage_of


def _net(quantize: bool, device: str = "cpu", width: int = 64) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(width, 96), nn.GELU(), nn.Linear(96, width))
    if quantize:
        net = quantize_model(net, target_modules=["0", "2"], group_size=32)
    return net.to(device)


def _optimizer(net: nn.Module, **kw) -> QGaLoreAdamW:
    groups = make_param_groups(net, rank=8, target_modules=["0", "2"], update_proj_gap=3)
    return QGaLoreAdamW(groups, lr=1e-2, weight_decay=0.1, min_8bit_size=16, **kw)


def _host_scalars(state, group) -> DeviceScalars:
    """The numbers of the next update, as CPU tensors (what GraphedUpdates writes on the device)."""
    back = state["projector"].multiplier(-group["lr"])
    return DeviceScalars(torch.tensor([state["step"] + 1]), torch.tensor(back, dtype=torch.float32),
                         torch.tensor(1.0 - group["lr"] * group["weight_decay"], dtype=torch.float32))


@pytest.mark.parametrize("quantize", [True, False], ids=["int8", "float"])
def test_device_scalars_give_the_host_numbers_bits(quantize):
    """Seven steps through two refreshes: apply_update with device scalars (Triton 8-bit Adam in the
    interpreter, INT8 update keyed by sr_key + step) gives the host path's weights and moments."""
    nets = [_net(quantize), _net(quantize)]
    opts = [_optimizer(n) for n in nets]
    hand = opts[1]
    for step in range(7):
        x = torch.randn(16, 64, generator=torch.Generator().manual_seed(step))
        for net in nets:
            net(x).square().mean().backward()
        opts[0].step()
        step_by_hand(hand, lambda state, group: _host_scalars(state, group) if "projector" in state else None)
        for opt in opts:
            opt.zero_grad()
    a, b = (net.state_dict() for net in nets)
    assert a.keys() == b.keys()
    for k in a:
        if quantize:  # the bf16 update and the stochastic rounding absorb the direction's last bits
            assert torch.equal(a[k], b[k]), k
        else:  # torch's CPU fp32 sqrt is not correctly rounded, the kernel's is: an ulp of the direction
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)
    states = [[o.state[p] for g in o.param_groups for p in g["params"]] for o in opts]
    for s0, s1 in zip(*states, strict=True):
        for key in ("exp_avg_codes", "exp_avg_sq_codes"):
            if key in s0:
                assert (s0[key] != s1[key]).float().mean() <= 0.002, key
        for key in ("exp_avg_absmax", "exp_avg_sq_absmax"):
            if key in s0:
                torch.testing.assert_close(s0[key], s1[key], rtol=1e-5, atol=0), key
        assert s0["step"] == s1["step"] == 7
    assert any("exp_avg_codes" in s and "projector" in s for s in states[0])


def test_device_scalars_refuse_what_they_cannot_serve():
    net = _net(True)
    opt = _optimizer(net, stochastic_rounding=False)
    p = net[0].weight
    net(torch.randn(4, 64)).sum().backward()
    state, group = opt.state[p], opt._group_of[p]
    opt._init_state(p, group, state)
    with pytest.raises(ValueError, match="stochastic rounding"), torch.no_grad():
        apply_update(storage_of(p), p.grad, state, group, 0, _host_scalars(state, group))


def test_sr_seed_is_key_plus_step():
    for seed, index, step in [(0, 0, 1), (7, 3, 10**6), (2**40, 123, 5), (-3, 9, 2)]:
        key = sr_key(seed, index)
        assert 0 <= key < 2**62
        assert sr_seed(seed, index, step) == (key + step) % 2**62


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_int8_update_with_device_step_matches_host_seed(path, monkeypatch):
    """int8_update_(decay tensor, key, step tensor) == int8_update_(float decay, (key + step) mod 2**62):
    the reference reads them on the host, the kernel (interpreter) on the device."""
    if path == "reference":
        monkeypatch.setenv("QGL_DISABLE_TRITON", "1")
    torch.manual_seed(1)
    w = Int8Tensor.from_float(torch.randn(48, 64), group_size=32)
    delta = torch.randn(48, 64) * 1e-2
    key, step = 2**62 - 3, 5  # the key wraps: (key + step) mod 2**62 = 2
    a, b = copy.deepcopy(w), copy.deepcopy(w)
    if path == "triton":
        from qgl.kernels.int8_triton import int8_update_triton

        int8_update_triton(a.q, a.scale, a.zero, delta, 0.99, 32, (key + step) % 2**62)
        int8_update_triton(b.q, b.scale, b.zero, delta, torch.tensor(0.99), 32, key, torch.tensor([step]))
    else:
        a.add_(delta, 0.99, (key + step) % 2**62)
        b.add_(delta, torch.tensor(0.99), key, step=torch.tensor([step]))
    assert torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale)
    assert not torch.equal(a.q, w.q)


@pytest.mark.parametrize("bad,match", [
    (dict(step=torch.tensor([1.0])), "step must be an int32/int64 tensor"),
    (dict(step=torch.tensor([1, 2])), "step must be an int32/int64 tensor"),
    (dict(decay=0.9), "decay must be an fp32 tensor"),
    (dict(decay=torch.tensor(0.9, dtype=torch.float64)), "decay must be an fp32 tensor"),
    (dict(seed=2**62), r"seed must be an int in \[0, 2\*\*62\)"),
    (dict(seed=-1), r"seed must be an int in \[0, 2\*\*62\)"),
])  # fmt: skip
def test_int8_update_device_scalars_are_checked(bad, match):
    w = Int8Tensor.from_float(torch.randn(8, 32), group_size=32)
    args = {**dict(decay=torch.tensor(1.0), seed=3, step=torch.tensor([1])), **bad}
    with pytest.raises(ValueError, match=match):
        K.int8_update_(w.q, w.scale, w.zero, torch.zeros(8, 32), args["decay"], 32, args["seed"],
                       args["step"])


def test_graphs_off_on_cpu_offload_and_after_distribute():
    net = _net(True)
    assert _optimizer(net).graphs is not None  # built, but serves CUDA tensors only
    assert _optimizer(net, cuda_graphs=False).graphs is None
    assert _optimizer(net, offload=True).graphs is None
    opt = _optimizer(net, layerwise=True)
    net(torch.randn(4, 64)).sum().backward()
    assert opt.graphs.replays == opt.graphs.captures == opt.graphs.eager == 0  # CPU: the eager core ran


class _NoCapture:
    """torch.cuda's graph API as seen on a machine where capturing fails at once."""

    class CUDAGraph:
        def capture_begin(self, **kw):
            raise RuntimeError("capture refused")

    class Stream:
        def __init__(self, *a, **kw):
            pass

        def wait_stream(self, other):
            pass

    @staticmethod
    def graph_pool_handle():
        return (0, 1)

    @staticmethod
    def current_stream(device=None):
        return _NoCapture.Stream()

    @staticmethod
    def stream(s):
        return contextlib.nullcontext()


def test_a_capture_that_cannot_begin_warns_once_and_runs_every_update_eagerly(monkeypatch):
    """The orchestration around a failed capture (here on CPU, the graph API stubbed to refuse): the
    update the capture was for and every later one run eagerly with the device scalars, the same bits
    as graphs that never capture, one warning."""
    monkeypatch.setattr(GraphedUpdates, "serves", staticmethod(lambda w, g, state, group: "projector" in state
                                                               and "exp_avg_codes" in state))
    for name in ("CUDAGraph", "Stream", "graph_pool_handle", "current_stream", "stream"):
        monkeypatch.setattr(torch.cuda, name, getattr(_NoCapture, name))
    nets = [_net(True), _net(True)]
    opts = [_optimizer(net, layerwise=True) for net in nets]
    opts[1].graphs = GraphedUpdates(capture=False)
    with pytest.warns(RuntimeWarning, match="capture of an update failed.*capture refused") as caught:
        for net in nets:
            for step in range(5):
                x = torch.randn(16, 64, generator=torch.Generator().manual_seed(step))
                net(x).square().mean().backward()
    assert len([w for w in caught if "capture" in str(w.message)]) == 1
    a, b = (net.state_dict() for net in nets)
    assert all(torch.equal(a[k], b[k]) for k in a)
    graphs = opts[0].graphs
    assert not graphs.enabled and graphs.captures == graphs.replays == 0 and graphs.eager == 10
    assert opts[0].state[nets[0][0].weight]["step"] == opts[1].state[nets[1][0].weight]["step"] == 5


# ----------------------------------------------------------------- CUDA


def _train(net: nn.Module, opt: QGaLoreAdamW, steps: int, start: int = 0) -> list[float]:
    losses = []
    for step in range(start, start + steps):
        for group in opt.param_groups:  # a learning rate that moves every step
            group["lr"] = 1e-2 * (0.9**step)
        x = torch.randn(32, 64, generator=torch.Generator().manual_seed(step)).cuda()
        loss = net(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _assert_same_training_state(nets, opts):
    a, b = (net.state_dict() for net in nets)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for p0, p1 in zip(*(list(net.parameters()) for net in nets), strict=True):
        s0, s1 = opts[0].state[p0], opts[1].state[p1]
        assert s0["step"] == s1["step"]
        for key in ("exp_avg_codes", "exp_avg_sq_codes", "exp_avg_absmax", "exp_avg_sq_absmax"):
            if key in s0:
                assert torch.equal(s0[key], s1[key]), key


@pytest.mark.cuda
@pytest.mark.parametrize("quantize", [True, False], ids=["int8", "float"])
def test_replayed_graphs_give_the_eager_device_scalar_bits(quantize):
    """Layer-wise, 12 steps, refreshes every 3 (adaptive), lr moving every step: graphs replayed between
    refreshes give the eager device-scalar path's bits (weights, 8-bit moments, steps)."""
    nets = [_net(quantize, "cuda"), _net(quantize, "cuda")]
    opts = [_optimizer(net, layerwise=True) for net in nets]
    opts[1].graphs = GraphedUpdates(capture=False)
    _train(nets[0], opts[0], 12)
    _train(nets[1], opts[1], 12)
    _assert_same_training_state(nets, opts)
    graphs = opts[0].graphs
    assert graphs.enabled  # no capture failed (a failure falls back to the eager path, warned)
    assert graphs.captures >= 4 and graphs.replays > graphs.captures and graphs.eager >= 4
    assert opts[1].graphs.captures == opts[1].graphs.replays == 0


@pytest.mark.cuda
def test_graphs_after_a_checkpoint_load_continue_with_the_same_bits():
    """Load an optimizer state mid-run (the graphs read the replaced tensors: forget and recapture)."""
    nets = [_net(True, "cuda"), _net(True, "cuda")]
    opts = [_optimizer(net, layerwise=True) for net in nets]
    opts[1].graphs = GraphedUpdates(capture=False)
    for net, opt in zip(nets, opts, strict=True):
        _train(net, opt, 5)
        saved = copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict())
        _train(net, opt, 2, start=5)  # steps that the load throws away
        net.load_state_dict(saved[0])
        opt.load_state_dict(saved[1])
        _train(net, opt, 6, start=5)
    _assert_same_training_state(nets, opts)
    assert opts[0].graphs.enabled and opts[0].graphs.replays > 0


@pytest.mark.cuda
def test_graphed_training_tracks_the_default_eager_path():
    """Graphs (Triton 8-bit Adam) against the default eager path (bitsandbytes' where installed): the
    same loss curve up to the moments' rounding (the runs' stochastic roundings then drift apart)."""
    nets = [_net(True, "cuda", width=256), _net(True, "cuda", width=256)]
    opts = [_optimizer(nets[0], layerwise=True), _optimizer(nets[1], layerwise=True, cuda_graphs=False)]
    curves = []
    for net, opt in zip(nets, opts, strict=True):
        for group in opt.param_groups:
            group["lr"] = 2e-3
        curve = []
        for step in range(40):
            x = torch.randn(32, 256, generator=torch.Generator().manual_seed(step)).cuda()
            loss = net(x).square().mean()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        curves.append(torch.tensor(curve))
    graphed, eager = curves
    assert graphed[-10:].mean() < 0.9 * graphed[:10].mean(), graphed  # it trained
    for window in (slice(0, 10), slice(-10, None)):  # the same curve, as curves (not step by step)
        a, b = graphed[window].mean(), eager[window].mean()
        assert abs(a - b) < 0.05 * b, (graphed, eager)
    assert opts[0].graphs.enabled and opts[0].graphs.replays > 0 and opts[1].graphs is None
