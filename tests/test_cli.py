"""The `qgl` command: help, recipe listing, and short end-to-end runs of the default recipe."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qgl.cli import main
from qgl.lightning.run import wandb_mode

# A few steps of the default recipe on a smaller batch: the whole path, in seconds on 2 cores.
FAST = ["trainer.max_steps=6", "data.batch_size=4", "data.block_size=64", "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=2", "checkpoint.every_n_steps=4", "qgalore.update_proj_gap=2"]


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    """An empty working dir, no W&B key (HOME without .netrc), and os.environ restored afterwards
    (run() sets WANDB_MODE / WANDB_SILENT for the process). One intra-op thread: the tiny model gains
    nothing from more, and spinning OpenMP threads on a busy 2-core machine cost 10x."""
    saved, threads = dict(os.environ), torch.get_num_threads()
    torch.set_num_threads(1)
    cache = os.environ.get("QGL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qgl")
    for name in ("WANDB_API_KEY", "WANDB_MODE", "NETRC", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("QGL_CACHE", cache)  # reuse the tokenized corpus across tests and runs
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    os.environ.clear()
    os.environ.update(saved)
    torch.set_num_threads(threads)


def test_help_lists_commands_and_defaults(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "recipes" in out
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for expected in ("--dry-run", "(default: False)", "trainer.max_steps=200", "qgalore.rank=256",
                     "qgalore.cos_threshold=0.4", "optim.betas=[0.9, 0.95]", "logger.mode=null",
                     "data.source=embedded", "checkpoint.every_n_steps=100", "method=qgalore"):
        assert expected in out, expected


def test_recipes_lists_bundled(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in ("tiny", "pretrain/llama_60m", "pretrain/llama_7b", "finetune/llama_hf_local"):
        assert f"  {name} " in out


def test_dry_run_prints_yaml_and_creates_nothing(clean_env, capsys):
    args = ["train", "pretrain/llama_130m", "data.source=embedded", "--dry-run", "trainer.max_steps=7"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "llama_130m.yaml" in out and "max_steps: 7" in out and "rank: 256" in out
    assert sorted(p.name for p in clean_env.iterdir()) == []
    assert main(["train", "--dry-run", "--bogus"]) == 2 and main(["recipes", "x"]) == 2


def test_python_dash_m_works():
    proc = subprocess.run([sys.executable, "-m", "qgl", "train", "--dry-run", "seed=5"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "seed: 5" in proc.stdout


def test_wandb_mode_detection(tmp_path, monkeypatch):
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    assert wandb_mode(None) == "offline"  # no key anywhere
    netrc.write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    netrc.chmod(0o600)
    assert wandb_mode(None) == "online"
    assert wandb_mode("offline") == "offline"  # logger.mode wins
    netrc.write_text("")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_mode(None) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(None) == "disabled"  # the user's environment wins over the key check


def test_train_end_to_end_wandb_offline(clean_env, spy_run, capsys):
    assert main(["train", *FAST]) == 0
    out = capsys.readouterr().out
    assert out.index("max_steps: 6") < out.index("qgl run summary")  # the resolved YAML comes first
    s = spy_run[0]
    assert s["steps"] == 6 and math.isfinite(s["train_loss"]) and math.isfinite(s["val_loss"])
    assert s["train_loss"] < s["train_loss_first"]
    assert s["tokens_per_sec"] > 0 and s["peak_memory_bytes"] > 0 and s["svd_total"] > 0
    # 6 steps: the rate after the first step (every layer's SVD) counts the 5 others
    assert s["tokens_per_sec_after_first_step"] > 0
    assert s["tokens_per_sec_second_half"] > 0 and s["svd_seconds"] > 0  # steps 3..6; SVD time
    assert "after the first step" in out
    assert 0 < s["first_step_seconds"] < s["wall_seconds"] and "first optimizer step" in out
    assert os.environ["WANDB_MODE"] == "offline"
    # Everything of the run in its own directory <save_dir>/<project>/<logger.name>: the recipe, the
    # W&B run, the checkpoints.
    run_dir = clean_env / "runs" / "qgl" / "tiny"
    assert s["run_dir"] == str(run_dir.resolve()) and (run_dir / "config.yaml").is_file()
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and s["log_dir"] == str(runs[0].resolve())
    assert any(runs[0].glob("run-*.wandb"))
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and s["last_checkpoint"].endswith("last.ckpt")
    assert (run_dir / "checkpoints" / "step000004.ckpt").is_file()


def test_train_with_a_profiler_writes_its_report_in_the_run_dir(clean_env, spy_run):
    """`trainer.profiler=simple`: Lightning's report (time per hook, training_step among them)."""
    assert main(["train", *FAST, "logger.wandb=false", "logger.name=p", "trainer.profiler=simple"]) == 0
    report = (clean_env / "runs" / "qgl" / "p" / "fit-profile.txt").read_text()
    assert "Profiler Report" in report and "training_step" in report
    assert Path(spy_run[0]["run_dir"]) == (clean_env / "runs" / "qgl" / "p").resolve()


def test_train_adamw_csv_and_resume(clean_env, spy_run, capsys):
    """method=adamw with the CSV logger and gradient accumulation, then resume from last.ckpt."""
    args = ["train", *FAST, "method=adamw", "logger.wandb=false", "logger.name=a",
            "trainer.accumulate_grad_batches=2"]
    assert main(args) == 0
    assert (clean_env / "runs" / "qgl" / "a" / "metrics.csv").is_file()
    assert spy_run[0]["svd_total"] is None and spy_run[0]["steps"] == 6
    # The first step's loss is the untrained model's, ln(vocab 320), not divided by the accumulation.
    assert abs(spy_run[0]["train_loss_first"] - math.log(320)) < 0.3
    assert main([*args, "trainer.max_steps=8", "ckpt_path=last"]) == 0
    assert spy_run[1]["steps"] == 8


def test_second_half_rate_counts_from_the_middle_step_to_the_last():
    from qgl.lightning.run import RunStats

    stats = RunStats()
    assert stats.second_half_rate() is None
    # step ends at 10 s (a slow first step), then 1 s a step of 100 tokens, the 4th step slower
    stats.step_marks = [(10.0, 100), (11.0, 200), (12.0, 300), (14.0, 400), (15.0, 500)]
    assert stats.second_half_rate() == (500 - 300) / (15.0 - 12.0)
    stats.step_marks = stats.step_marks[:3]
    assert stats.second_half_rate() is None  # fewer than 4 steps: no second half worth the name


def test_step_seconds_and_the_median_step_rate_leave_out_the_first_step():
    from qgl.lightning.run import RunStats

    stats = RunStats()
    assert stats.step_seconds() == [] and stats.median_step_rate() is None
    # a slow first step, then 1 s, 1 s, a 3 s hiccup, 1 s (100 tokens a step)
    stats.step_marks = [(10.0, 100), (11.0, 200), (12.0, 300), (15.0, 400), (16.0, 500)]
    assert stats.step_seconds() == [1.0, 1.0, 3.0, 1.0]
    assert stats.median_step_rate() == 100.0  # the hiccup moves the mean, not the median
