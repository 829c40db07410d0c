"""QGaLoreCallback, SubspaceMonitor and MemoryMonitor on a LightningModule written here (not qgl's)."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qgl.callbacks import MemoryMonitor, QGaLoreCallback, SubspaceMonitor
from qgl.nn import QLinear, quantized_modules
from qgl.optim import QGaLoreAdamW

pytestmark = pytest.mark.usefixtures("one_thread")


class ToyRegressor(L.LightningModule):
    """A small MLP regressor whose hidden linears are named `attn` and `mlp`, with its own AdamW."""

    def __init__(self, lr: float = 3e-3, schedule: bool = False, n: int = 128, batch_size: int = 16) -> None:
        super().__init__()
        self.lr, self.schedule, self.n, self.batch_size = lr, schedule, n, batch_size
        self.inp = nn.Linear(16, 64)
        self.attn = nn.Linear(64, 64)
        self.mlp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 1)
        self.losses: list[float] = []
        self.lrs: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        h = h + torch.tanh(self.attn(h))
        return self.head(self.norm(h + self.mlp(h))).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.losses.append(loss.item())
        self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, betas=(0.9, 0.95), weight_decay=0.01)
        if not self.schedule:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(self.n, 16, generator=g)
        y = torch.sin(x[:, :4].sum(-1)) + 0.5 * x[:, 4]
        return DataLoader(TensorDataset(x, y), batch_size=self.batch_size, shuffle=False)


def trainer(tmp_path: Path, callbacks=(), csv: bool = False, **kwargs) -> L.Trainer:
    kwargs.setdefault("max_steps", 8)
    kwargs.setdefault("enable_checkpointing", False)
    return L.Trainer(accelerator="cpu", devices=1, callbacks=list(callbacks), default_root_dir=tmp_path,
                     logger=CSVLogger(tmp_path, name="csv") if csv else False, enable_progress_bar=False,
                     enable_model_summary=False, **kwargs)


def qgalore(**kwargs) -> QGaLoreCallback:
    kwargs = {"rank": 8, "group_size": 64, "proj_group_size": 64, "update_proj_gap": 4, **kwargs}
    return QGaLoreCallback(**kwargs)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_callback_trains_a_foreign_module_and_monitors_it(tmp_path):
    torch.manual_seed(0)
    plain = ToyRegressor()
    trainer(tmp_path, max_steps=40).fit(plain)
    assert isinstance(plain.trainer.optimizers[0], torch.optim.AdamW)

    torch.manual_seed(0)
    module = ToyRegressor()
    t = trainer(tmp_path, [qgalore(), MemoryMonitor()], csv=True, max_steps=40, log_every_n_steps=4)
    t.fit(module)

    assert isinstance(t.optimizers[0], QGaLoreAdamW)
    assert sorted(quantized_modules(module)) == ["attn", "mlp.0", "mlp.2"]
    assert isinstance(module.attn, QLinear) and isinstance(module.head, nn.Linear)
    for losses in (plain.losses, module.losses):
        assert sum(losses[-8:]) / 8 < 0.6 * sum(losses[:8]) / 8

    # The callback added a SubspaceMonitor; its per-layer figures reached the CSV logger.
    monitor = next(cb for cb in t.callbacks if isinstance(cb, SubspaceMonitor))
    rows = read_csv(Path(t.logger.log_dir) / "metrics.csv")
    columns = set(rows[0])
    for layer in ("attn.weight", "mlp.0.weight", "mlp.2.weight"):
        assert {f"subspace/{layer}/{k}" for k in ("cos", "gap", "svd_count", "svd_seconds")} <= columns
    assert {"subspace/frozen_layers", "subspace/svd_total", "subspace/svd_saved_frac"} <= columns
    summary = monitor.summary()
    assert summary["svd_total"] == sum(len(h["steps"]) for h in monitor.history.values())
    assert summary["svd_seconds"] == pytest.approx(sum(s["svd_seconds"] for s in summary["layers"].values()))
    assert summary["svd_seconds"] > 0
    assert summary["galore_svds"] == 3 * 10 >= summary["svd_total"]
    assert monitor.history["attn.weight"]["steps"][:3] == [0, 4, 8]

    # The heatmap: a valid PNG in the logger's directory.
    png = Path(summary["heatmap"])
    assert png.parent == Path(t.logger.log_dir) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(png).ndim == 3

    # MemoryMonitor on CPU: RSS and the parts; INT8 weights are the QLinear buffers.
    memory = next(cb for cb in t.callbacks if isinstance(cb, MemoryMonitor))
    mem = memory.summary()
    assert memory.kind == "rss"
    int8 = sum(b.numel() * b.element_size() for m in quantized_modules(module).values() for b in m.buffers())
    assert mem["int8_weights"] == int8 and mem["rss"] > 0 and mem["peak"] >= mem["rss"] // 2
    assert mem["optimizer_moments"] > 0 and mem["projections"] > 0
    assert "memory/peak_mib" in columns


def test_user_scheduler_drives_qgalore_lr(tmp_path):
    module = ToyRegressor(lr=1e-2, schedule=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = trainer(tmp_path, [qgalore(subspace_monitor=False)], max_steps=6)
        t.fit(module)
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    # The lr each step used is the user's schedule: 1e-2 / (1 + step), in every group.
    assert module.lrs == pytest.approx([1e-2 / (1 + s) for s in range(6)])
    assert [g["lr"] for g in t.optimizers[0].param_groups] == pytest.approx([1e-2 / 6] * 3)
    assert len(t.lr_scheduler_configs) == 1 and t.lr_scheduler_configs[0].scheduler.last_epoch == 6
    # Kept from the user's AdamW: betas, eps, weight decay (matrices only).
    groups = {g["rank"] is None and g["weight_decay"] == 0.0: g for g in t.optimizers[0].param_groups}
    assert all(g["betas"] == (0.9, 0.95) for g in t.optimizers[0].param_groups)
    assert groups[False]["weight_decay"] == 0.01 and "norm.weight" in groups[True]["names"]


class GradsAfterBackward(L.Callback):
    """Records, after each backward, whether any parameter still holds a gradient."""

    def __init__(self) -> None:
        self.held: list[bool] = []

    def on_after_backward(self, trainer, pl_module):
        self.held.append(any(p.grad is not None for p in pl_module.parameters()))


def test_layerwise_accumulation_equals_plain(tmp_path):
    def run(layerwise: bool) -> tuple[dict, list[float], list[bool]]:
        torch.manual_seed(0)
        module, grads = ToyRegressor(n=96, batch_size=8), GradsAfterBackward()
        trainer(tmp_path, [qgalore(layerwise=layerwise, subspace_monitor=False), grads], max_steps=5,
                accumulate_grad_batches=2).fit(module)
        return module.state_dict(), module.losses, grads.held

    (w_lw, loss_lw, held_lw), (w_plain, loss_plain, held_plain) = run(True), run(False)
    # Layer-wise: the first micro-batch accumulates, the second's hooks step and free every gradient.
    assert held_lw == [True, False] * 5 and held_plain == [True] * 10
    assert loss_lw == loss_plain and len(loss_lw) == 10
    assert w_lw.keys() == w_plain.keys()
    for k in w_lw:
        assert torch.equal(w_lw[k], w_plain[k]), k


def test_exclude_and_targets(tmp_path):
    module = ToyRegressor()
    callback = qgalore(target_modules=("attn", "mlp.0", "head"), exclude=("head",), subspace_monitor=False)
    t = trainer(tmp_path, [callback], max_steps=1)
    t.fit(module)
    assert sorted(quantized_modules(module)) == ["attn", "mlp.0"]
    galore = [g for g in t.optimizers[0].param_groups if g["rank"] is not None]
    assert len(galore) == 1 and galore[0]["names"] == ["attn.weight", "mlp.0.weight"]
    # teardown gave the module its own configure_optimizers back
    assert "configure_optimizers" not in vars(module)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(gradient_clip_val=1.0), "gradient_clip_val=None"),
    (dict(plugins=[MixedPrecision("16-mixed", "cpu")]), "bf16-mixed"),
])
def test_layerwise_refusals(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        trainer(tmp_path, [qgalore()], **kwargs).fit(ToyRegressor())


def test_optimizer_refusals(tmp_path):
    class TwoGroups(ToyRegressor):
        def configure_optimizers(self):
            return torch.optim.AdamW([{"params": self.head.parameters()},
                                      {"params": [p for n, p in self.named_parameters() if "head" not in n]}])

    class TwoOptimizers(ToyRegressor):
        def configure_optimizers(self):
            return [torch.optim.AdamW(self.head.parameters()), torch.optim.AdamW(self.attn.parameters())]

    class Manual(ToyRegressor):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(ValueError, match="single group"):
        trainer(tmp_path, [qgalore()]).fit(TwoGroups())
    with pytest.raises(ValueError, match="returned 2"):
        trainer(tmp_path, [qgalore()]).fit(TwoOptimizers())
    with pytest.raises(ValueError, match="manual optimization"):
        trainer(tmp_path, [qgalore()]).fit(Manual())
    # A strategy other than one device or DDP: checked before anything is built (a fake trainer: no
    # processes are launched; tests/test_distributed.py has FSDP's refusals and DDP's runs).
    other = SimpleNamespace(strategy=object(), world_size=2)
    with pytest.raises(ValueError, match="does not run under object.*strategy='ddp'"):
        qgalore().setup(other, ToyRegressor(), "fit")


def test_resume_equals_uninterrupted_run(tmp_path):
    def fit(max_steps: int, ckpt_path: str | None = None, checkpoint: ModelCheckpoint | None = None):
        torch.manual_seed(0)
        module = ToyRegressor(schedule=True, n=64)  # 4 batches an epoch
        callbacks = [qgalore(update_proj_gap=2, cos_threshold=0.0, queue_size=1, gamma_proj=2.0)]
        t = trainer(tmp_path, callbacks + ([checkpoint] if checkpoint else []), max_steps=max_steps,
                    enable_checkpointing=checkpoint is not None)
        t.fit(module, ckpt_path=ckpt_path)
        return module, t

    full, t_full = fit(8)
    # At the epoch's last batch: a plain DataLoader cannot resume mid-epoch (nor, in Lightning 2.6,
    # from an on_train_epoch_end checkpoint, which replays one batch).
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=4)
    first, _ = fit(4, checkpoint=ckpt)
    resumed, t_resumed = fit(8, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"))

    assert first.losses + resumed.losses == full.losses
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    assert t_resumed.optimizers[0].param_groups[0]["lr"] == t_full.optimizers[0].param_groups[0]["lr"]
    # The subspace history went through the checkpoint: gaps doubled on the same steps.
    history = lambda t: next(cb for cb in t.callbacks if isinstance(cb, SubspaceMonitor)).history
    assert history(t_resumed) == history(t_full)
    assert history(t_full)["attn.weight"]["steps"] == [0, 2, 6]
