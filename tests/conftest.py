"""Shared test set-up: Triton kernels run under the interpreter on CPU; `cuda` tests skip there."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported: kernels then run on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


_real_empty = torch.empty


@pytest.fixture
def poison(monkeypatch):
    """Make torch.empty return garbage (NaN / odd integers) so that unwritten elements show."""

    def empty(*args, **kwargs):
        t = _real_empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -77 if t.dtype != torch.uint8 else 0x5A)

    monkeypatch.setattr(torch, "empty", empty)


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy 2-core machine those spin-wait
    (about 10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def spy_run(monkeypatch):
    """The summaries `qgl.lightning.run.run` returned, in order (`qgl.cli.main` returns the exit code)."""
    import qgl.lightning.run as run_mod

    results = []
    real = run_mod.run

    def spy(cfg):
        results.append(real(cfg))
        return results[-1]

    monkeypatch.setattr(run_mod, "run", spy)
    return results
