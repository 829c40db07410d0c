"""One Lightning run of a tiny LLaMA, for the multi-process tests (tests/test_distributed.py).

    python tests/_ddp_script.py OUT --method qgalore --devices 2 --strategy ddp [--accumulate 2] ...

Lightning's DDP launcher re-executes this command for every other rank. Every rank writes
OUT/rank<r>.pt: its per-micro-batch losses (in data order), the final module state dict (INT8 codes
and scales included), its optimizer's `state_nbytes()`, the subspace statistics and the time of
the first optimizer step. The data are `--batches` global batches of random tokens; with
`--devices 1 --accumulate N` they are reordered so that micro-batch r of step k holds what rank r
of an N-process run (DistributedSampler, no shuffle) reads at step k: the same global batch.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Sampler, TensorDataset

from qgl.callbacks import QGaLoreCallback
from qgl.callbacks.methods import GALORE
from qgl.lightning.module import CausalLMModule
from qgl.models.llama import LlamaConfig

VOCAB, SEQ = 320, 32


def data(batches: int, world: int, local_batch: int, reorder: bool) -> TensorDataset:
    """`batches` global batches of `world * local_batch` sequences; reordered for the 1-process run."""
    g = torch.Generator().manual_seed(1234)
    n = batches * world * local_batch
    tokens = torch.randint(0, VOCAB, (n, SEQ + 1), generator=g)
    if reorder:  # micro-batch (k, r), element j = DistributedSampler's rank r, step k, element j
        order = [world * (k * local_batch + j) + r for k in range(batches) for r in range(world)
                 for j in range(local_batch)]
        tokens = tokens[order]
    return TensorDataset(tokens[:, :-1], tokens[:, 1:])


class ResumeSampler(Sampler):
    """The data in order, rank r taking every `world`-th sample (DistributedSampler without shuffle),
    from the first sample of the trainer's next global step: a resumed run (on any number of processes
    with the same global batch) continues where the checkpoint stopped."""

    def __init__(self, n: int, world: int, rank: int, global_batch: int) -> None:
        self.n, self.world, self.rank, self.global_batch = n, world, rank, global_batch
        self.trainer: L.Trainer | None = None

    def __len__(self) -> int:
        return self.n // self.world

    def __iter__(self):
        start = (self.trainer.global_step * self.global_batch) % self.n if self.trainer is not None else 0
        return iter(range(start + self.rank, self.n, self.world))


class Positioned(DataLoader):
    """Tells Lightning that a mid-epoch resume is supported (the sampler finds the position)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


class NonFinite(L.Callback):
    """On rank 1 at step `step`, a NaN in the local gradient of one parameter that rank 0 owns."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_start(self, trainer, pl_module) -> None:
        driver = trainer.optimizers[0].distributed
        p = next(p for p in driver.params if driver.owners[p] == 0)
        # A tensor hook runs before the gradient is accumulated, hence before qgl's reduction.
        p.register_hook(lambda g: g * float("nan") if trainer.global_rank == 1
                        and trainer.global_step == self.step else g)


class GradsAlive(L.Callback):
    """The most parameters holding a gradient at once, seen from a hook that runs after qgl's."""

    def __init__(self) -> None:
        self.most = 0

    def on_train_start(self, trainer, pl_module) -> None:
        params = [p for p in pl_module.parameters() if p.requires_grad]

        def count(_):
            self.most = max(self.most, sum(q.grad is not None for q in params))

        for p in params:
            p.register_post_accumulate_grad_hook(count)


class Record(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.first_step_seconds: float | None = None
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]) * trainer.accumulate_grad_batches)
        if self.first_step_seconds is None and trainer.global_step == 1:
            self.first_step_seconds = time.perf_counter() - self._t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--method", default="qgalore", choices=["qgalore", "galore", "full"])
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--strategy", default="auto")
    ap.add_argument("--accumulate", type=int, default=1)
    ap.add_argument("--local-batch", type=int, default=4)
    ap.add_argument("--world", type=int, default=2, help="processes whose global batch the data emulate")
    ap.add_argument("--batches", type=int, default=4, help="global batches per epoch")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--no-shard", action="store_true")
    ap.add_argument("--no-layerwise", action="store_true")
    ap.add_argument("--ckpt-dir", default=None, help="save a checkpoint every 2 steps there")
    ap.add_argument("--resume", default=None)
    ap.add_argument("--nan-at", type=int, default=None,
                    help="at this step, rank 1 makes a gradient owned by rank 0 non-finite")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args()

    torch.set_num_threads(1)
    L.seed_everything(0)
    config = LlamaConfig(VOCAB, args.hidden, args.hidden * 2, args.layers, 4, max_seq_len=SEQ)
    module = CausalLMModule(config.__dict__, lr=1e-2, warmup_steps=2, max_steps=args.steps)
    callbacks: list[L.Callback] = [record := Record(), alive := GradsAlive()]
    if args.method != "full":
        extra = GALORE if args.method == "galore" else {}
        callbacks.append(QGaLoreCallback(**{"rank": 8, "update_proj_gap": 2, "group_size": 64,
                                            "proj_group_size": 64, "min_8bit_size": 256, "queue_size": 2,
                                            "subspace_monitor": False, "shard_state": not args.no_shard,
                                            "layerwise": not args.no_layerwise,
                                            **extra}))
    if args.nan_at is not None:
        callbacks.append(NonFinite(args.nan_at))
    if args.ckpt_dir:
        callbacks.append(ModelCheckpoint(dirpath=args.ckpt_dir, filename="step{step}", every_n_train_steps=2,
                                         auto_insert_metric_name=False, save_top_k=-1))
    dataset = data(args.batches, args.world, args.local_batch, args.devices == 1 and args.world > 1)
    sampler = ResumeSampler(len(dataset), args.devices, int(os.environ.get("LOCAL_RANK", 0)),
                            args.world * args.local_batch)
    loader = Positioned(dataset, batch_size=args.local_batch, sampler=sampler, shuffle=False)
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy=args.strategy, max_steps=args.steps,
                        accumulate_grad_batches=args.accumulate, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False,
                        enable_checkpointing=bool(args.ckpt_dir),
                        callbacks=callbacks, num_sanity_val_steps=0)
    sampler.trainer = trainer
    trainer.fit(module, train_dataloaders=loader, ckpt_path=args.resume)
    optimizer = trainer.optimizers[0]
    nbytes = optimizer.state_nbytes() if hasattr(optimizer, "state_nbytes") else {}
    stats = optimizer.subspace_stats() if hasattr(optimizer, "subspace_stats") else {}
    # This rank's own SVDs (subspace_stats gathers every owner's).
    local = optimizer.local_subspace_stats() if hasattr(optimizer, "subspace_stats") else {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"losses": record.losses, "state_dict": module.state_dict(), "state_nbytes": nbytes,
                "subspace": {k: v["svd_count"] for k, v in stats.items()},
                "local_svds": sum(v["svd_count"] for v in local.values()),
                "local_svd_seconds": sum(v["svd_seconds"] for v in local.values()),
                "first_step_seconds": record.first_step_seconds, "world_size": trainer.world_size,
                "owned": len(optimizer.state), "grads_alive": alive.most,
                "params": sum(1 for p in module.parameters() if p.requires_grad)},
               out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
