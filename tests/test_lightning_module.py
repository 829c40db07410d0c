"""CausalLMModule: the tiny LLaMA trains, logs loss / perplexity / tokens, and follows its LR schedule."""

from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from qgl.callbacks import QGaLoreCallback
from qgl.lightning import CausalLMModule, WarmupCosine
from qgl.models.llama import LlamaConfig

TINY = LlamaConfig.from_name("tiny", num_layers=2)
BLOCK, BATCH = 32, 4


pytestmark = pytest.mark.usefixtures("one_thread")


def token_loader(n_blocks: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    period = torch.randint(0, TINY.vocab_size, (8,), generator=g)  # a repeating pattern: learnable
    stream = period.repeat(n_blocks * BLOCK // 8 + 1)
    windows = stream[: n_blocks * BLOCK + 1]
    x = torch.stack([windows[i * BLOCK:(i + 1) * BLOCK] for i in range(n_blocks)])
    y = torch.stack([windows[i * BLOCK + 1:(i + 1) * BLOCK + 1] for i in range(n_blocks)])
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)


def fit(tmp_path: Path, module: CausalLMModule, callbacks=(), max_steps: int = 4) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps,
                        logger=CSVLogger(tmp_path, name="csv"), log_every_n_steps=1,
                        callbacks=list(callbacks), default_root_dir=tmp_path, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1)
    trainer.fit(module, train_dataloaders=token_loader(), val_dataloaders=token_loader(4))
    return trainer


def test_warmup_cosine_shape():
    f = WarmupCosine(warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    warmup = [f(s) for s in range(10)]
    assert warmup == pytest.approx([(s + 1) / 10 for s in range(10)])
    decay = [f(s) for s in range(10, 111)]
    assert decay[0] == 1.0 and decay[50] == pytest.approx(0.55) and decay[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))
    assert f(500) == pytest.approx(0.1)

    # The module's own optimizer and scheduler follow it.
    module = CausalLMModule(TINY, lr=2e-3, warmup_steps=3, max_steps=9, min_lr_ratio=0.25)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step" and optimizer.param_groups[0]["betas"] == (0.9, 0.95)
    lrs = []
    for _ in range(12):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = WarmupCosine(3, 9, 0.25)
    assert lrs == pytest.approx([2e-3 * expected(s) for s in range(12)])
    assert lrs[2] == pytest.approx(2e-3) and lrs[9] == lrs[11] == pytest.approx(5e-4)


def test_tiny_trains_and_logs(tmp_path):
    torch.manual_seed(0)
    module = CausalLMModule(TINY, lr=3e-3, warmup_steps=1, max_steps=4)
    trainer = fit(tmp_path, module)

    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    train = [r for r in rows if r.get("train/loss")]
    assert len(train) == 4
    losses = [float(r["train/loss"]) for r in train]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert float(train[0]["train/ppl"]) == pytest.approx(math.exp(losses[0]), rel=1e-4)
    assert float(train[-1]["train/tokens_seen"]) == 4 * BATCH * BLOCK == module.tokens_seen
    assert float(train[-1]["train/tokens_per_sec"]) > 0
    val = [r for r in rows if r.get("val/ppl")]
    assert val and math.isfinite(float(val[-1]["val/ppl"])) and float(val[-1]["val/ppl"]) > 1

    # A config given as a dataclass is saved as a dict: the checkpoint loads with weights_only=True.
    trainer.save_checkpoint(tmp_path / "tiny.ckpt")
    ckpt = torch.load(tmp_path / "tiny.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["model"]["num_layers"] == 2 and ckpt["tokens_seen"] == module.tokens_seen
    restored = CausalLMModule.load_from_checkpoint(tmp_path / "tiny.ckpt", weights_only=True)
    assert torch.equal(restored.model.embed.weight, module.model.embed.weight)


def test_tiny_with_qgalore_follows_the_schedule(tmp_path):
    torch.manual_seed(0)
    module = CausalLMModule(TINY, lr=1e-3, warmup_steps=2, max_steps=4, min_lr_ratio=0.1)
    seen: list[float] = []

    class RecordLR(L.Callback):  # after QGaLoreCallback, which copies the lr at batch start
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    callback = QGaLoreCallback(rank=16, update_proj_gap=2, subspace_monitor=False)
    fit(tmp_path, module, [callback, RecordLR()], max_steps=4)
    assert seen == pytest.approx([1e-3 * WarmupCosine(2, 4, 0.1)(s) for s in range(4)])
    assert type(module.model.blocks[0].attn.q_proj).__name__ == "QLinear"
    assert type(module.model.lm_head).__name__ == "Linear"
    assert math.isfinite(float(module.trainer.callback_metrics["train/loss"]))


@pytest.mark.skipif(importlib.util.find_spec("transformers") is not None, reason="transformers is installed")
def test_hf_path_without_transformers_says_what_to_install():
    with pytest.raises(ImportError, match=r"pip install qgl\[hf\]"):
        CausalLMModule(hf_path="/nonexistent")
