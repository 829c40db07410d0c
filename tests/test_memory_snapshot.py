"""The allocator-snapshot report: replay of hand-made traces (CPU), the recipe key, and on CUDA a real
step whose replayed peak must match `torch.cuda.max_memory_allocated`."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from qgl.callbacks.memory_snapshot import StepSnapshot, peak_report, site_of
from qgl.config import RecipeError, load_recipe

MIB = 2**20


def frame(filename: str, line: int, name: str) -> dict:
    return {"filename": filename, "line": line, "name": name}


TORCH = frame("/usr/lib/python3.11/site-packages/torch/nn/functional.py", 2380, "linear")
OURS = frame("/work/main/qgl/optim/projector.py", 187, "project_back")
OUTER = frame("/work/main/qgl/lightning/run.py", 230, "run")


def trace(*events: tuple) -> dict:
    """A snapshot dict of one device whose trace is `(action, addr, MiB, frames)` tuples."""
    return {"segments": [], "device_traces": [[
        {"action": a, "addr": addr, "size": int(mib * MIB), "frames": frames, "stream": 0}
        for a, addr, mib, frames in events]]}


def test_site_names_the_innermost_frame_outside_the_libraries_and_the_innermost_frame():
    assert site_of([TORCH, OURS, OUTER]) == ("qgl/optim/projector.py:187 project_back "
                                             "[torch/nn/functional.py:2380 linear]")
    assert site_of([OURS, OUTER]) == "qgl/optim/projector.py:187 project_back"
    assert site_of([TORCH]) == "[torch/nn/functional.py:2380 linear]"
    assert site_of([]) == "<no Python frame>"
    # A user's own module counts as code; qgl counts as code when installed in site-packages too.
    user = frame("/home/me/project/models/net.py", 12, "forward")
    assert site_of([TORCH, user, OURS]) == ("project/models/net.py:12 forward "
                                            "[torch/nn/functional.py:2380 linear]")
    installed = frame("/venv/lib/python3.11/site-packages/qgl/nn/qlinear.py", 80, "forward")
    assert site_of([TORCH, installed]).startswith("qgl/nn/qlinear.py:80 forward")
    stdlib = frame("/usr/lib/python3.11/contextlib.py", 81, "inner")
    assert site_of([stdlib, TORCH]) == "[lib/python3.11/contextlib.py:81 inner]"


def test_replay_finds_the_peak_and_what_was_alive_there():
    snap = trace(("alloc", 1, 10, [TORCH, OURS]),          # 110
                 ("alloc", 2, 30, [OURS]),                 # 140
                 ("alloc", 3, 5, [TORCH, OURS]),           # 145 <- peak
                 ("free_requested", 2, 30, [OURS]),        # 115
                 ("free_completed", 2, 30, [OURS]),        # 115 (already off)
                 ("alloc", 4, 20, []),                     # 135
                 ("free_requested", 99, 40, []),           # 95: a block from before the trace
                 ("free_completed", 98, 8, []))            # 87: one whose free was not requested in it
    report = peak_report(snap, baseline_bytes=100 * MIB)
    assert report.peak_bytes == 145 * MIB
    assert report.event_index == 2 and report.events == 8
    assert report.before_bytes == 100 * MIB
    assert [(s.where, s.nbytes, s.count) for s in report.sites] == [
        ("qgl/optim/projector.py:187 project_back", 30 * MIB, 1),
        ("qgl/optim/projector.py:187 project_back [torch/nn/functional.py:2380 linear]", 15 * MIB, 2)]
    text = report.format()
    assert "peak allocated: 145.0 MiB" in text and "30.0 MiB" in text and "2 x" in text


def test_a_peak_after_blocks_from_before_the_trace_were_freed_counts_them_off():
    snap = trace(("free_requested", 7, 60, []), ("free_completed", 7, 60, []),
                 ("alloc", 1, 50, [OURS]), ("alloc", 2, 20, [OURS]))
    report = peak_report(snap, baseline_bytes=100 * MIB)
    assert report.peak_bytes == 110 * MIB and report.before_bytes == 40 * MIB
    assert report.sites[0].nbytes == 70 * MIB and report.sites[0].count == 2


def test_a_trace_that_never_rises_reports_the_baseline():
    report = peak_report(trace(("free_requested", 1, 1, []), ("free_completed", 1, 1, [])), 8 * MIB)
    assert report.peak_bytes == 8 * MIB and report.event_index == -1 and report.sites == []
    assert peak_report({"device_traces": []}, 3).peak_bytes == 3


def test_snapshot_step_is_checked():
    with pytest.raises(ValueError, match="snapshot step must be >= 0"):
        StepSnapshot(-1, ".")
    with pytest.raises(RecipeError, match="trainer.memory_snapshot_step"):
        load_recipe(None, ["trainer.max_steps=5", "trainer.memory_snapshot_step=5"])
    cfg = load_recipe(None, ["trainer.max_steps=5", "trainer.memory_snapshot_step=4"])
    assert cfg.trainer.memory_snapshot_step == 4


def _fit_tiny(monitor, max_steps: int):
    """A 4 -> 1 linear regression trained by Lightning on the CPU with `monitor`."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 1)

        def training_step(self, batch, _):
            return nn.functional.mse_loss(self.lin(batch[0]).squeeze(-1), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = DataLoader(TensorDataset(torch.randn(32, 4), torch.randn(32)), batch_size=8)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, callbacks=[monitor], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Tiny(), data)
    return trainer


def test_on_cpu_the_monitor_warns_and_trains_on(tmp_path):
    from qgl.callbacks import MemoryMonitor

    monitor = MemoryMonitor(print_table=False, snapshot_step=1, snapshot_dir=tmp_path)
    with pytest.warns(UserWarning, match="memory snapshots record the CUDA allocator"):
        trainer = _fit_tiny(monitor, max_steps=3)
    assert trainer.global_step == 3 and monitor.snapshot is None and not list(tmp_path.iterdir())


def test_a_snapshot_step_the_fit_never_runs_is_reported(tmp_path):
    from qgl.callbacks import MemoryMonitor

    monitor = MemoryMonitor(print_table=False, snapshot_step=7, snapshot_dir=tmp_path)
    with pytest.warns(UserWarning, match="optimizer step 7 was not run in this fit"):
        _fit_tiny(monitor, max_steps=2)


@pytest.mark.cuda
def test_replayed_peak_of_a_cuda_step_is_max_memory_allocated(tmp_path):
    """The replay's arithmetic is the allocator's: a recorded training step's peak equals
    max_memory_allocated over the same step, and the largest live site is the known big temporary."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 4096), nn.GELU(), nn.Linear(4096, 1024)).cuda()
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(2048, 1024, device="cuda")
    for _ in range(2):  # optimizer state exists before the recorded step
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    snap = StepSnapshot(0, tmp_path)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    snap.start(torch.device("cuda"))
    baseline = snap.baseline
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated()
    pickle_path, text_path = snap.stop_and_write(torch.device("cuda"))
    with open(pickle_path, "rb") as f:
        report = peak_report(pickle.load(f), baseline)
    assert report.events > 0, "the allocator recorded nothing"
    # Trace sizes are as requested, the allocator's blocks rounded up: equal up to that rounding.
    slack = max(2 * MIB, 0.01 * measured)
    assert abs(report.peak_bytes - measured) <= slack, (measured / MIB, report.format())
    assert report.before_bytes + sum(s.nbytes for s in report.sites) == report.peak_bytes
    assert sum(s.nbytes for s in report.sites) >= 2048 * 4096 * 4  # at least one (2048, 4096) fp32 activation
    assert "peak allocated:" in text_path.read_text()


def test_checkpoints_recompute_without_early_stop_while_recording(tmp_path, monkeypatch):
    """While a step is recorded, activation checkpoints recompute each block to its end (the early
    stop raises through QLinear's autograd Function, which torch loses under Python-stack recording);
    before and after, torch's default holds."""
    import torch.utils.checkpoint as ckpt

    cuda_memory = torch.cuda.memory
    monkeypatch.setattr(cuda_memory, "_record_memory_history", lambda *a, **k: None)
    monkeypatch.setattr(cuda_memory, "_snapshot", lambda *a, **k: {"segments": [], "device_traces": [[]]})
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 0)
    default = ckpt._enable_checkpoint_early_stop
    snap = StepSnapshot(0, tmp_path)
    snap.start(torch.device("cuda", 0))
    assert ckpt._enable_checkpoint_early_stop is False
    snap.stop_and_write(torch.device("cuda", 0))
    assert ckpt._enable_checkpoint_early_stop is default
    assert (tmp_path / "memory-peak-step0.txt").is_file()


@pytest.mark.cuda
def test_a_recorded_step_of_checkpointed_int8_linears_runs(tmp_path):
    """QLinear inside a non-reentrant activation checkpoint, recorded with Python stacks: the step
    runs (it died with a SystemError from the Function's apply before early stop was turned off)."""
    from torch.utils.checkpoint import checkpoint

    from qgl.nn import QLinear

    torch.manual_seed(0)
    layers = nn.Sequential(QLinear(256, 512), nn.GELU(), QLinear(512, 256)).cuda().bfloat16()
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    snap = StepSnapshot(0, tmp_path)
    snap.start(torch.device("cuda"))
    checkpoint(layers, x, use_reentrant=False).float().square().mean().backward()
    torch.cuda.synchronize()
    _, text_path = snap.stop_and_write(torch.device("cuda"))
    assert layers[0].weight.grad is not None and torch.isfinite(layers[0].weight.grad).all()
    assert "peak allocated:" in text_path.read_text()
