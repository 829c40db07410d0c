"""`adam_step_`: the plain-parameter AdamW step over chunks is bit-identical to one pass over the
tensor (8-bit reference and fp32 moments, bf16 and fp32 parameters, weight decay), its temporaries
are O(chunk), QGaLoreAdamW's plain groups (embedding, norms) use it, offload and paged codes keep
working through it. Bit-identity is checked on one thread: on CPU, torch runs the tail of each
thread's range of an elementwise op in scalar code, which may round bf16 differently from the
vector code, so even one pass differs between thread counts (CUDA kernels are per element)."""

import pytest
import torch

import qgl.optim.adam as adam
from qgl.optim import QGaLoreAdamW, make_param_groups
from qgl.optim.adam import BLOCK_8BIT, adam_direction, adam_step_, init_moments

CHUNK = 2 * BLOCK_8BIT
BETAS, EPS = (0.9, 0.95), 1e-8


def _one_pass(p, grad, state, lr, decay, step):
    """The update before chunking: the direction of the whole tensor, then decay and add."""
    update = adam_direction(grad, state, *BETAS, EPS, step)
    if decay != 1.0:
        p.mul_(decay)
    p.add_(update.to(p.dtype), alpha=-lr)


@pytest.mark.parametrize("bits", [8, 32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_chunked_step_is_bit_identical(bits, dtype, monkeypatch, one_thread):
    monkeypatch.setattr(adam, "PLAIN_CHUNK", CHUNK)
    shape = (37, 61)  # 2257 elements: 4 chunks and a partial block at the end
    torch.manual_seed(0)
    p0 = torch.randn(shape).to(dtype)
    chunked, whole = p0.clone(), p0.clone()
    st_c = init_moments(shape, p0.device, bits, min_8bit_size=256)
    st_w = init_moments(shape, p0.device, bits, min_8bit_size=256)
    lr, wd = 1e-2, 0.1
    for step in range(1, 5):
        grad = (torch.randn(shape) * 10.0 ** (step - 2)).to(dtype)
        grad[0, :5] = 0  # zero gradients: the 8-bit second moment's smallest code
        adam_step_(chunked, grad, st_c, lr, 1.0 - lr * wd, *BETAS, EPS, step)
        _one_pass(whole, grad, st_w, lr, 1.0 - lr * wd, step)
        assert torch.equal(chunked, whole), step
        assert st_c.keys() == st_w.keys() and all(torch.equal(st_c[k], st_w[k]) for k in st_c), step
    assert not torch.equal(chunked, p0)


def test_temporaries_are_bounded_by_the_chunk(monkeypatch):
    monkeypatch.setattr(adam, "PLAIN_CHUNK", CHUNK + 7)  # rounded down to whole 256-element blocks
    seen = []
    real = adam.adam_direction

    def spy(grad, state, *args):
        seen.append(grad.numel())
        assert all(state[k].numel() == grad.numel() for k in state if not k.endswith("absmax"))
        return real(grad, state, *args)

    monkeypatch.setattr(adam, "adam_direction", spy)
    p = torch.randn(5 * CHUNK + 3)
    adam_step_(p, torch.randn_like(p), init_moments(p.shape, p.device, 8, 256), 1e-3, 1.0, *BETAS, EPS, 1)
    assert seen == [CHUNK] * 5 + [3]
    seen.clear()  # a non-contiguous parameter takes one pass
    q = torch.randn(64, 80).t()
    adam_step_(q, torch.randn_like(q), init_moments(q.shape, q.device, 32), 1e-3, 1.0, *BETAS, EPS, 1)
    assert seen == [q.numel()]


def test_slices_of_paged_codes_stay_paged():
    state = init_moments((4, 512), torch.device("cpu"), 8, 256)
    state["exp_avg_codes"].is_paged = True
    state["exp_avg_codes"].page_deviceid = 0
    part = adam._state_slice(state, 512, 2048)
    assert part["exp_avg_codes"].is_paged and part["exp_avg_codes"].page_deviceid == 0
    assert not getattr(part["exp_avg_sq_codes"], "is_paged", False)
    assert part["exp_avg_absmax"].numel() == 6 and part["exp_avg_codes"].numel() == 1536
    part["exp_avg_absmax"].fill_(3.0)  # views: writes reach the state
    assert state["exp_avg_absmax"][2:].eq(3.0).all() and state["exp_avg_absmax"][:2].eq(0).all()


def _embedding_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Embedding(300, 24), torch.nn.LayerNorm(24), torch.nn.Linear(24, 300))


def _train(chunk: int, monkeypatch, offload=False, bits: int = 8) -> torch.nn.Module:
    monkeypatch.setattr(adam, "PLAIN_CHUNK", chunk)
    model = _embedding_model()
    groups = make_param_groups(model, rank=8, target_modules=("2",), exclude=())
    opt = QGaLoreAdamW(groups, lr=1e-2, weight_decay=0.05, optim_bits=bits, min_8bit_size=1024,
                       layerwise=True, offload=offload)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randint(0, 300, (4, 8), generator=g)
        torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
        opt.step()
    return model


@pytest.mark.parametrize("bits", [8, 32])
def test_optimizer_plain_groups_identical_chunked_and_offloaded(bits, monkeypatch, one_thread):
    whole = _train(1 << 30, monkeypatch, bits=bits)
    chunked = _train(CHUNK, monkeypatch, bits=bits)
    offloaded = _train(CHUNK, monkeypatch, offload="cpu", bits=bits)
    for a, b, c in zip(whole.parameters(), chunked.parameters(), offloaded.parameters(), strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.cuda
def test_cuda_bitsandbytes_chunked_step_is_bit_identical(monkeypatch):
    pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(adam, "PLAIN_CHUNK", 1 << 12)
    shape = (1000, 77)
    p0 = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    chunked, whole = p0.clone(), p0.clone()
    st_c, st_w = (init_moments(shape, p0.device, 8) for _ in range(2))
    for step in range(1, 4):
        grad = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        adam_step_(chunked, grad, st_c, 1e-2, 0.999, *BETAS, EPS, step)
        _one_pass(whole, grad, st_w, 1e-2, 0.999, step)
    assert torch.equal(chunked, whole) and all(torch.equal(st_c[k], st_w[k]) for k in st_c)
