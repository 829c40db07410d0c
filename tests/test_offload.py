"""Optimizer-state offload: identical updates with and without it, resume, prefetch, modes, a run."""

import os

import pytest
import torch

import qgl.lightning.run as run_mod
import qgl.optim.adam as adam
from qgl.cli import main
from qgl.models.llama import LlamaForCausalLM
from qgl.nn import quantize_model
from qgl.optim import QGaLoreAdamW, make_param_groups
from qgl.optim.offload import PagedStates, StateOffloader, make_offloader, offload_mode, state_tensors


def _build(offload, layerwise=True, device="cpu", seed=0):
    torch.manual_seed(seed)
    model = quantize_model(LlamaForCausalLM.from_name("tiny", num_layers=2)).to(device)
    # rank 8: some low-rank moments stay fp32 (< 4096 elements), others are 8-bit; P refreshes every 2.
    groups = make_param_groups(model, rank=8, update_proj_gap=2, weight_decay=0.1)
    return model, QGaLoreAdamW(groups, lr=1e-2, layerwise=layerwise, offload=offload)


def _batches(n, device="cpu"):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 320, (2, 32), generator=g).to(device) for _ in range(n)]


def _train(model, opt, batches, accumulate=1):
    for k in range(0, len(batches), accumulate):
        for j, x in enumerate(batches[k:k + accumulate]):
            last = j == accumulate - 1
            if opt.layerwise is not None:
                opt.layerwise.defer = not last
            model(x, labels=x).backward()
        opt.step()
        opt.zero_grad()


def _assert_identical(model_a, opt_a, model_b, opt_b):
    sa, sb = model_a.state_dict(), model_b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    for pa, pb in zip(opt_a.state, opt_b.state, strict=True):
        ta, tb = state_tensors(opt_a.state[pa]), state_tensors(opt_b.state[pb])
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k].to(ta[k].device)) for k in ta)


@pytest.mark.parametrize("layerwise", [True, False])
def test_offload_gives_identical_updates(layerwise, one_thread):
    plain, offloaded = _build(False, layerwise), _build(True, layerwise)
    for model, opt in (plain, offloaded):
        _train(model, opt, _batches(6))
    _assert_identical(*plain, *offloaded)
    nbytes, reference = offloaded[1].state_nbytes(), plain[1].state_nbytes()
    assert nbytes["moments"] == nbytes["projections"] == 0  # between steps the state is in host memory
    assert (nbytes["offloaded_moments"], nbytes["offloaded_projections"]) == (
        reference["moments"], reference["projections"])
    offloader = offloaded[1].offloader
    n_params = len(offloaded[1].state)
    assert offloader.misses == 0 and offloader.hits == 5 * n_params  # every update after the first prefetched


def test_offload_with_layerwise_accumulation(one_thread):
    plain, offloaded = _build(None), _build("cpu")
    for model, opt in (plain, offloaded):
        _train(model, opt, _batches(6), accumulate=2)
    _assert_identical(*plain, *offloaded)


def test_offloaded_resume_equals_uninterrupted(one_thread):
    batches = _batches(6)
    ref_model, ref_opt = _build("cpu")
    _train(ref_model, ref_opt, batches)
    model, opt = _build("cpu")
    _train(model, opt, batches[:3])
    saved_model, saved_opt = model.state_dict(), opt.state_dict()
    for offload in ("cpu", False):  # offloaded checkpoints load into either kind of optimizer
        resumed_model, resumed_opt = _build(offload, seed=1)
        resumed_model.load_state_dict(saved_model)
        resumed_opt.load_state_dict(saved_opt)
        _train(resumed_model, resumed_opt, batches[3:])
        _assert_identical(ref_model, ref_opt, resumed_model, resumed_opt)


def test_modes_and_errors():
    assert [offload_mode(v) for v in (False, None, "none", True, "cpu", "paged")] == [
        None, None, None, "cpu", "cpu", "paged"]
    assert isinstance(make_offloader(True), StateOffloader) and make_offloader(False) is None
    with pytest.raises(ValueError, match="offload must be"):
        offload_mode("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"offload='paged' needs CUDA and bitsandbytes.*offload=True"):
            _build("paged")


def test_recipe_key_reaches_the_optimizer(tmp_path, monkeypatch, one_thread):
    """`qgl train qgalore.offload=cpu`: config -> QGaLoreCallback -> QGaLoreAdamW; the run summary
    carries the planner's prediction beside the measurement."""
    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("QGL_CACHE", os.environ.get("QGL_CACHE") or os.path.expanduser("~/.cache/qgl"))
    monkeypatch.chdir(tmp_path)
    seen = {}
    real_run = run_mod.run

    def spy(cfg):
        seen["summary"] = real_run(cfg)
        return seen["summary"]

    monkeypatch.setattr(run_mod, "run", spy)
    offloaders = []
    real_init = QGaLoreAdamW.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        offloaders.append(self.offloader)

    monkeypatch.setattr(QGaLoreAdamW, "__init__", init)
    args = ["train", "trainer.max_steps=3", "data.batch_size=2", "data.block_size=32", "logger.wandb=false",
            "trainer.limit_val_batches=1", "checkpoint.every_n_steps=null", "checkpoint.save_last=false",
            "qgalore.offload=cpu", "qgalore.update_proj_gap=2"]
    assert main(args) == 0
    assert len(offloaders) == 1 and isinstance(offloaders[0], StateOffloader) and offloaders[0].hits > 0
    s = seen["summary"]
    assert s["steps"] == 3 and s["predicted_peak_bytes"] > 0 and s["memory_parts"]["optimizer_moments"] == 0


@pytest.mark.cuda
def test_cuda_offload_identical_and_paged_runs():
    plain, offloaded = _build(False, device="cuda"), _build("cpu", device="cuda")
    for model, opt in (plain, offloaded):
        _train(model, opt, _batches(6, "cuda"))
    torch.cuda.synchronize()
    _assert_identical(*plain, *offloaded)
    assert all(t.is_pinned() for st in offloaded[1].state.values() for t in state_tensors(st).values())
    pytest.importorskip("bitsandbytes")
    plain = _build(False, device="cuda")
    model, opt = _build("paged", device="cuda")
    # The tiny model has no code tensor of bitsandbytes' 1e5 elements: page every 8-bit code.
    opt.offloader.min_numel = 1
    for m, o in (plain, (model, opt)):
        _train(m, o, _batches(4, "cuda"))
    torch.cuda.synchronize()
    _assert_identical(*plain, model, opt)
    _assert_paged_accounting(opt, plain[1])


class _FakePaged:
    """Stand-in for `bitsandbytes.functional` on CPU: "unified memory" is a CPU tensor flagged
    `is_paged`, as bitsandbytes' `get_paged` returns one (`torch.frombuffer` over managed memory)."""

    def __init__(self):
        self.allocated, self.prefetched = [], 0

    def get_paged(self, *shape, dtype=torch.float32, device=None):
        out = torch.empty(shape, dtype=dtype)
        out.is_paged, out.page_deviceid = True, getattr(device, "index", None)
        self.allocated.append(out)
        return out

    def prefetch_tensor(self, t, to_cpu=False):
        assert t.is_paged
        self.prefetched += 1


def _codes_nbytes(opt, min_numel):
    """Bytes of the 8-bit codes of at least `min_numel` elements (those the paged mode pages)."""
    return sum(t.numel() for st in opt.state.values() for k, t in st.items()
               if k.endswith("_codes") and t.numel() >= min_numel)


def _assert_paged_accounting(opt, reference):
    """`state_nbytes` of a paged run: the paged codes under offloaded_moments, the rest (absmax, fp32
    moments of small tensors, small codes) under moments; totals equal the unpaged reference's."""
    nbytes, ref = opt.state_nbytes(), reference.state_nbytes()
    paged = _codes_nbytes(opt, opt.offloader.min_numel)
    assert paged > 0 and nbytes["offloaded_moments"] == paged
    assert nbytes["moments"] == ref["moments"] - paged and nbytes["projections"] == ref["projections"]
    assert nbytes["offloaded_projections"] == 0
    for st in opt.state.values():
        for k, t in st.items():
            if isinstance(t, torch.Tensor):
                big_codes = k.endswith("_codes") and t.numel() >= opt.offloader.min_numel
                assert bool(getattr(t, "is_paged", False)) == big_codes, k


@pytest.mark.parametrize("min_numel", [1, 20_000])
def test_paged_accounting_with_a_fake_allocator(min_numel, monkeypatch, one_thread):
    """The paged mode's bookkeeping on CPU: codes are paged at their first update (plain parameters
    through the chunked step too), stay paged (slices keep the flag, nothing replaces them), are
    prefetched before each later update, and `state_nbytes` counts them under offloaded_moments."""
    monkeypatch.setattr(adam, "PLAIN_CHUNK", 4096)  # the embedding (40,960 elements) in 10 chunks
    plain = _build(False)
    model, opt = _build(False)
    fake = _FakePaged()
    opt.offloader = PagedStates(min_numel=min_numel, functional=fake)
    for m, o in (plain, (model, opt)):
        _train(m, o, _batches(4))
    _assert_identical(*plain, model, opt)
    _assert_paged_accounting(opt, plain[1])
    n_paged = sum(1 for st in opt.state.values() for k, t in st.items()
                  if k.endswith("_codes") and t.numel() >= min_numel)
    assert len(fake.allocated) == n_paged  # paged once, at the first update
    assert fake.prefetched == 3 * n_paged  # before each of the 3 later updates
