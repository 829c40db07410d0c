"""Atomic checkpoints: a save that dies half-way leaves the previous checkpoint loadable."""

import subprocess
import sys
import textwrap

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from qgl.lightning.checkpoint import (
    TMP_SUFFIX,
    AtomicCheckpointIO,
    AtomicModelCheckpoint,
    atomic_torch_save,
    remove_stale_temporaries,
)

_real_save = torch.save


def _half_then_raise(obj, f, *args, **kwargs):
    """A torch.save that writes half of the real bytes and then fails, like a full disk or a crash."""
    import io

    buf = io.BytesIO()
    _real_save(obj, buf, *args, **kwargs)
    data = buf.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    raise OSError("simulated crash during save")


def test_failed_save_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1, "w": torch.ones(1000)}, path)
    monkeypatch.setattr(torch, "save", _half_then_raise)
    with pytest.raises(OSError, match="simulated"):
        atomic_torch_save({"step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # the temporary is gone


def test_killed_process_keeps_previous(tmp_path):
    """A process killed (os._exit) in the middle of writing: the old file loads, the stale temporary
    is cleaned up by `remove_stale_temporaries`."""
    path = tmp_path / "last.ckpt"
    script = textwrap.dedent(f"""
        import io, os, torch
        from qgl.lightning.checkpoint import atomic_torch_save
        atomic_torch_save({{"step": 1, "w": torch.arange(10000.0)}}, {str(path)!r})
        real = torch.save
        def dying_save(obj, f, *a, **k):
            buf = io.BytesIO(); real(obj, buf); data = buf.getvalue()
            f.write(data[: len(data) // 2]); f.flush()
            os._exit(9)  # no cleanup, no exception handlers: like SIGKILL
        torch.save = dying_save
        atomic_torch_save({{"step": 2, "w": torch.zeros(10000)}}, {str(path)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    ckpt = torch.load(path)
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.arange(10000.0))
    stale = [p for p in tmp_path.iterdir() if p.name.endswith(TMP_SUFFIX)]
    assert len(stale) == 1 and stale[0].name.startswith(".last.ckpt.")
    assert remove_stale_temporaries(tmp_path) == stale
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def _trainer(tmp_path, max_steps):
    ckpt = AtomicModelCheckpoint(dirpath=tmp_path / "ckpt", filename="step{step:06d}",
                                 auto_insert_metric_name=False, every_n_train_steps=5, save_last=True)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[ckpt], default_root_dir=tmp_path)
    return trainer, ckpt


def test_model_checkpoint_last_is_final_and_survives_crash(tmp_path, monkeypatch):
    trainer, ckpt = _trainer(tmp_path, max_steps=7)
    trainer.fit(BoringModel())
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["last.ckpt", "step000005.ckpt"]
    last = tmp_path / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 7  # not the stale step 5

    # Resume and crash inside the next periodic save (step 10): last.ckpt still holds step 7.
    monkeypatch.setattr(torch, "save", _half_then_raise)
    trainer, _ = _trainer(tmp_path, max_steps=20)
    with pytest.raises(OSError, match="simulated"):
        trainer.fit(BoringModel(), ckpt_path=str(last))
    monkeypatch.undo()
    assert torch.load(last, weights_only=False)["global_step"] == 7
    assert torch.load(tmp_path / "ckpt" / "step000005.ckpt", weights_only=False)["global_step"] == 5
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.endswith(TMP_SUFFIX)]
