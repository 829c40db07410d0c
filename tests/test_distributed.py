"""Q-GaLore and GaLore under Lightning DDP on CPU (gloo, 2 processes), against one process.

The reference is one process over the same global batch: `accumulate_grad_batches=2`, micro-batch r
holding what rank r reads (tests/_ddp_script.py). Lightning scales each micro-batch's loss by 1/2,
DDP-qgl divides each rank's gradient by 2 before the sum: both are exact (a power of two), and the
sum of two floats does not depend on their order, so the averaged gradients, hence every update
(SVDs, 8-bit moments, stochastic rounding: seeded by parameter and step) are the same bits, and the
test asserts equality, not a tolerance.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from qgl.callbacks import QGaLoreCallback

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "_ddp_script.py"


def launch(out: Path, *args: str, timeout: int = 240) -> list[dict]:
    """Run the script (Lightning re-launches it on rank 1), return each rank's record."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), *args], env=env, cwd=out.parent,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(out.glob("rank*.pt"))
    return [torch.load(f, weights_only=True) for f in files]


def assert_same_run(ref: dict, ranks: list[dict]) -> None:
    """Rank r's loss at step k is the reference's micro-batch 2k + r; every weight equal, on every rank."""
    world = len(ranks)
    for r, rec in enumerate(ranks):
        assert rec["losses"] == ref["losses"][r::world], (r, rec["losses"], ref["losses"])
        for key, value in ref["state_dict"].items():
            assert torch.equal(rec["state_dict"][key], value), (r, key)


def state_bytes(rec: dict) -> int:
    return sum(rec["state_nbytes"].values())


@pytest.mark.parametrize("method", ["qgalore", pytest.param("galore", marks=pytest.mark.slow)])
def test_ddp_equals_one_process_and_shards_state(method, tmp_path):
    [ref] = launch(tmp_path / "ref", "--method", method, "--devices", "1", "--accumulate", "2")
    ranks = launch(tmp_path / "ddp", "--method", method, "--devices", "2", "--strategy", "ddp")
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert_same_run(ref, ranks)
    # No full-model gradient: at most the one in flight and the one autograd just wrote.
    alive = [(r["grads_alive"], r["params"]) for r in ranks]
    assert all(0 < most <= 2 < params for most, params in alive), alive
    if method == "qgalore":  # the INT8 codes and scales were among the weights compared
        assert any(k.endswith("weight_int8") for k in ref["state_dict"])
    # Sharded by matrix: the parameters' states split between the ranks, ~half the bytes each.
    total = state_bytes(ref)
    assert sum(state_bytes(r) for r in ranks) == total
    assert sum(r["owned"] for r in ranks) == ref["owned"]
    for r in ranks:
        assert 0.4 * total <= state_bytes(r) <= 0.6 * total, (state_bytes(r), total)
    # The SVDs ran on the owners; the statistics gathered from them are the one-process ones.
    assert ranks[0]["subspace"] == ranks[1]["subspace"] == ref["subspace"]
    svds = ref["local_svds"]
    assert svds > 0 and sum(r["local_svds"] for r in ranks) == svds
    assert all(r["local_svds"] <= 0.6 * svds for r in ranks), [r["local_svds"] for r in ranks]


@pytest.mark.slow
def test_ddp_all_reduce_without_sharding_equals_one_process(tmp_path):
    [ref] = launch(tmp_path / "ref", "--devices", "1", "--accumulate", "2")
    ranks = launch(tmp_path / "ddp", "--devices", "2", "--strategy", "ddp", "--no-shard")
    assert_same_run(ref, ranks)
    assert [state_bytes(r) for r in ranks] == [state_bytes(ref)] * 2  # every rank holds every state


@pytest.mark.slow
def test_ddp_not_layerwise_sharded_equals_one_process(tmp_path):
    [ref] = launch(tmp_path / "ref", "--devices", "1", "--accumulate", "2", "--no-layerwise")
    ranks = launch(tmp_path / "ddp", "--devices", "2", "--strategy", "ddp", "--no-layerwise")
    assert_same_run(ref, ranks)
    assert sum(state_bytes(r) for r in ranks) == state_bytes(ref)
    assert all(0.4 * state_bytes(ref) <= state_bytes(r) <= 0.6 * state_bytes(ref) for r in ranks)


@pytest.mark.slow
def test_resume_two_processes_and_on_one(tmp_path):
    common = ["--batches", "4", "--steps", "4"]
    whole = launch(tmp_path / "whole", *common, "--devices", "2", "--strategy", "ddp",
                   "--ckpt-dir", str(tmp_path / "ckpt"))
    ckpt = tmp_path / "ckpt" / "step2.ckpt"  # mid-epoch
    saved = torch.load(ckpt, weights_only=True)
    [opt] = saved["optimizer_states"]
    assert len(opt["state"]) == whole[0]["owned"] + whole[1]["owned"]  # every owner's state, gathered
    resumed = launch(tmp_path / "resumed", *common, "--devices", "2", "--strategy", "ddp",
                     "--resume", str(ckpt))
    for a, b in zip(whole, resumed, strict=True):
        assert b["losses"] == a["losses"][2:]
        for key, value in a["state_dict"].items():
            assert torch.equal(b["state_dict"][key], value), key
    # On one process over the same global batches (2 micro-batches a step): the same run.
    [one] = launch(tmp_path / "one", *common, "--devices", "1", "--accumulate", "2", "--resume", str(ckpt))
    assert one["losses"] == [x for pair in zip(whole[0]["losses"][2:], whole[1]["losses"][2:], strict=True)
                             for x in pair]
    for key, value in whole[0]["state_dict"].items():
        assert torch.equal(one["state_dict"][key], value), key


@pytest.mark.slow
def test_non_finite_gradient_owned_elsewhere_stops_every_rank(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "out"), "--devices", "2", "--strategy",
                           "ddp", "--nan-at", "1"], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    assert "rank 0: non-finite gradient in" in proc.stderr
    assert not (tmp_path / "out").exists()  # no rank went on to finish the run


def _fake_trainer(strategy) -> SimpleNamespace:
    return SimpleNamespace(strategy=strategy, world_size=2, callbacks=[])


@pytest.mark.parametrize("galore", [False, True], ids=["qgalore", "galore"])
def test_fsdp_and_fsdp2_are_refused_naming_ddp(galore):
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
    from test_callbacks import ToyRegressor

    from qgl.callbacks.methods import GALORE

    kwargs = GALORE if galore else {}
    for strategy in (FSDPStrategy(), ModelParallelStrategy()):
        name = type(strategy).__name__
        with pytest.raises(ValueError, match=f"does not run under {name}.*strategy='ddp'"):
            QGaLoreCallback(**kwargs).setup(_fake_trainer(strategy), ToyRegressor(), "fit")


def test_ddp_sharded_step_refuses_global_clipping_and_16_mixed():
    from lightning.pytorch.strategies import DDPStrategy

    from qgl.callbacks.distributed import check_strategy

    trainer = SimpleNamespace(strategy=DDPStrategy(), world_size=2, gradient_clip_val=1.0,
                              precision="32-true")
    config = {"layerwise": False, "shard_state": True}
    with pytest.raises(ValueError, match="cannot clip the global gradient norm.*shard_state=False"):
        check_strategy(trainer, config)
    trainer.gradient_clip_val, trainer.precision = None, "16-mixed"
    with pytest.raises(ValueError, match="16-mixed.*shard_state=False"):
        check_strategy(trainer, config)
    assert check_strategy(trainer, {**config, "shard_state": False})


@pytest.mark.slow
def test_qgl_train_ddp_two_processes_prints_one_summary(tmp_path):
    # The recipe's logger: W&B, offline (ranks > 0 get Lightning's dummy experiment).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "QGL_CACHE": os.environ.get("QGL_CACHE") or str(Path.home() / ".cache" / "qgl")}
    args = ["trainer.devices=2", "trainer.accelerator=cpu", "trainer.strategy=ddp", "trainer.max_steps=6",
            "data.batch_size=4", "data.block_size=64", "trainer.limit_val_batches=2",
            "trainer.val_check_interval=3", "checkpoint.every_n_steps=3", "qgalore.update_proj_gap=2"]
    proc = subprocess.run([sys.executable, "-m", "qgl", "train", *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("qgl run summary (qgalore, 6 steps") == 1, proc.stdout
    assert proc.stdout.count("# recipe:") == 1
    # Every rank writes into rank 0's run directory (the launched ranks inherit it), and only rank 0 writes.
    [run_dir] = [d for d in (tmp_path / "runs" / "qgl").iterdir() if d.is_dir()]
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert len(list((tmp_path / "runs").rglob("subspace_heatmap.png"))) == 1  # drawn by rank 0 alone


def test_data_position_resumes_on_another_world_size(tmp_path):
    from test_data import keys, make_dm, words

    f = tmp_path / "w.txt"
    f.write_text(words(600))

    def ranks(world: int, state: dict | None = None) -> list:
        dms = []
        for r in range(world):
            dm = make_dm(f)
            dm.trainer = SimpleNamespace(world_size=world, global_rank=r)
            if state is not None:
                dm.load_state_dict(state)
            dms.append(dm)
        return dms

    # Two ranks read 2 batches each (16 samples); one process resumes after those 16 samples of the
    # epoch's permutation, which is the same for any world size.
    seen = {k for dm in ranks(2) for b, _ in zip(dm.train_dataloader(), range(2), strict=False)
            for k in keys(b)}
    fresh = [k for b in ranks(1)[0].train_dataloader() for k in keys(b)]
    state = {**make_dm(f).state_dict(), "epoch": 0, "batches_seen": 2, "world_size": 2}
    [one] = ranks(1, state)
    assert seen == set(fresh[:16])
    assert [k for b in one.train_dataloader() for k in keys(b)] == fresh[16:]
    with pytest.raises(ValueError, match="2-process run on 4 processes.*resume on 2 processes"):
        ranks(4, {**state, "batches_seen": 1})[0].train_dataloader()


def test_plan_devices_shards_the_optimizer_state(capsys):
    from qgl.cli import main
    from qgl.config import load_recipe
    from qgl.plan import plan_memory

    cfg = load_recipe("pretrain/llama_1b", ["data.source=embedded", "data.batch_size=4",
                                            "trainer.accumulate_grad_batches=1"])
    one, four = plan_memory(cfg), plan_memory(cfg, devices=4)
    state = lambda plan: plan.parts["optimizer_moments"] + plan.parts["projections"]
    # The most loaded of 4 ranks: about a quarter. Not exactly: whole matrices, spread evenly first (the
    # SVDs), then embedding and head (a quarter of the 1B's state between them) onto the least loaded.
    assert state(one) / 4 <= state(four) <= 0.33 * state(one), (state(one), state(four))
    assert state(plan_memory(cfg, devices=2)) <= 0.51 * state(one)
    assert four.parts["int8_weights"] == one.parts["int8_weights"]  # weights are replicated
    assert four.parts["gradients"] > one.parts["gradients"]  # + one gradient in its reduction
    assert four.total < one.total
    assert main(["plan", "pretrain/llama_1b", "--devices", "4"]) == 0
    assert "DDP on 4 GPUs, state sharded by matrix" in capsys.readouterr().out
    assert main(["plan", "pretrain/llama_1b", "--devices", "0"]) == 2
    assert "devices must be >= 1" in capsys.readouterr().err
    unsharded = load_recipe("pretrain/llama_1b", ["data.source=embedded", "qgalore.shard_state=false"])
    assert state(plan_memory(unsharded, devices=4)) == state(one)


def test_balance_spreads_matrices_and_plain_parameters():
    from qgl.optim.distributed import balance

    costs = [(100, True), (90, True), (80, True), (10, True), (50, False), (5, False), (5, False)]
    owners = balance(costs, 2)
    # Largest first onto the least loaded: the matrices (SVDs) spread, then the plain ones even the bytes.
    assert owners == [0, 1, 1, 0, 0, 0, 0]
    assert balance(costs, 1) == [0] * len(costs)


@pytest.mark.parametrize("layerwise", [True, False])
def test_distribute_is_explicit_and_equals_the_local_optimizer(layerwise, tmp_path):
    """`QGaLoreAdamW.distribute()` on a one-process gloo group: the optimizer's own methods go through
    `optimizer.distributed` (no instance attribute is replaced) and give the single-process results."""
    import torch.distributed as dist

    from qgl.optim import QGaLoreAdamW
    from qgl.optim.distributed import DistributedLayerwise

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        def build() -> tuple[torch.nn.Linear, QGaLoreAdamW]:
            torch.manual_seed(0)
            lin = torch.nn.Linear(16, 12)
            groups = [{"params": [lin.weight], "rank": 4, "update_proj_gap": 2}, {"params": [lin.bias]}]
            return lin, QGaLoreAdamW(groups, lr=1e-2, layerwise=layerwise)

        (ref, ref_opt), (lin, opt) = build(), build()
        assert opt.distributed is None
        opt.consolidate_state_dict()  # nothing to gather on one process
        driver = opt.distribute(shard=True)
        assert isinstance(driver, DistributedLayerwise) and opt.distributed is driver
        assert "step" not in vars(opt) and "state_dict" not in vars(opt)
        with pytest.raises(RuntimeError, match="already called"):
            opt.distribute()
        x = torch.randn(8, 16)
        for _ in range(3):
            for model, o in ((ref, ref_opt), (lin, opt)):
                model(x).square().mean().backward()
                o.step()
                o.zero_grad()
        assert torch.equal(lin.weight, ref.weight) and torch.equal(lin.bias, ref.bias)
        assert opt.subspace_stats().keys() == ref_opt.subspace_stats().keys() != set()
        opt.consolidate_state_dict()
        sd = opt.state_dict()
        assert sd["state"].keys() == ref_opt.state_dict()["state"].keys() == {0, 1}
        opt.load_state_dict(sd)
        assert opt.local_state_dict()["state"][0]["step"] == 3
        # The non-finite check is the collective one (its message names the rank).
        (lin(x) * float("nan")).sum().backward()
        with pytest.raises(FloatingPointError, match="rank 0: non-finite gradient"):
            opt.step()
        driver.remove()
    finally:
        dist.destroy_process_group()
