"""The first training step holds no more than later ones: the offloader keeps no more optimizer state
on the device in it (states are created, updated and written back one parameter at a time), and the
Triton autotuners, which run in it, flush L2 with a buffer of the L2's size, not Triton's 256 MiB."""

import types

import pytest
import torch
from test_offload import _batches, _build, _train

import qgl.kernels._bench as bench
from qgl.optim.offload import state_tensors


def _nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def test_first_step_holds_no_more_device_state_than_later_steps(one_thread):
    """Bytes of optimizer state on the "device" side (every state tensor that is not the offloader's
    host buffer, and the prefetched copies) at the end of each update, before its write-back: in the
    first step, where states are created on the device, at most the parameter's own state; later, its
    own and the prefetched next one's. The first step's largest is at most the later steps' largest."""
    model, opt = _build("cpu")
    off = opt.offloader
    real = opt._update_param
    per_update = []

    def spy(p):
        real(p)
        host = {id(h) for buffers in off._host.values() for h in buffers.values()}
        resident = [t for st in opt.state.values() for t in state_tensors(st).values() if id(t) not in host]
        prefetched = [t for copies, _ in off._pending.values() for t in copies.values()]
        own = _nbytes(state_tensors(opt.state[p]).values())
        per_update.append((_nbytes(resident), _nbytes(prefetched), own))

    opt._update_param = spy
    n = sum(p.requires_grad for p in model.parameters())
    batches = _batches(4)
    _train(model, opt, batches[:1])
    first = list(per_update)
    assert len(first) == n and all(res == own and pre == 0 for res, pre, own in first)
    per_update.clear()
    _train(model, opt, batches[1:])
    later = per_update
    assert len(later) == 3 * n and all(res == own for res, _, own in later)
    assert max(res + pre for res, pre, _ in first) <= max(res + pre for res, pre, _ in later)
    assert opt.state_nbytes()["moments"] == opt.state_nbytes()["projections"] == 0


def test_autotuners_use_the_l2_sized_flush():
    pytest.importorskip("triton")
    import qgl.kernels.int4_triton as int4
    import qgl.kernels.w8a16_triton as w8a16

    assert all(t.do_bench is bench.do_bench for t in (w8a16._fwd_tuned, w8a16._bwd_tuned, int4._mm_tuned))


def test_flush_bytes_and_summary(monkeypatch):
    props = types.SimpleNamespace(L2_cache_size=50 * 2**20)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    assert bench.flush_bytes(0) == 50 * 2**20
    props.L2_cache_size = 0  # not reported: Triton's own size
    assert bench.flush_bytes(0) == bench.TRITON_FLUSH_BYTES == 256 * 2**20
    times = [4.0, 1.0, 3.0, 2.0]
    assert bench.summarize(times, None) == 2.5
    assert bench.summarize(times, (0.5,)) == pytest.approx(2.5)
    assert bench.summarize(times, (0.5, 0.2, 0.8)) == pytest.approx([2.5, 1.6, 3.4])


@pytest.mark.cuda
def test_autotuning_allocates_at_most_the_l2_size():
    """A fused INT8 linear meeting a new autotuning key (the first step) allocates its output and
    the L2-sized flush buffer, not Triton's 256 MiB."""
    pytest.importorskip("triton")
    from qgl.kernels.int8_triton import quantize_int8_triton
    from qgl.kernels.w8a16_triton import w8a16_linear_triton

    device = torch.device("cuda")
    n, k, m, gs = 1664, 1536, 96, 128  # a shape no other test uses: a fresh key
    q, scale, zero = quantize_int8_triton(torch.randn(n, k, device=device), gs, False)
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    w8a16_linear_triton(x, q, scale, zero, gs, path="fused")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra <= bench.flush_bytes(device) + 8 * 2**20, extra
