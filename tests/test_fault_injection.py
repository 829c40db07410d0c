"""kill -9 during training and inside checkpoint writes never costs a loadable checkpoint, and resuming
from the newest one continues the uninterrupted run's losses bitwise.

One chain of trials on the tiny recipe (Q-GaLore, a checkpoint every step): start the run (resuming
from the newest checkpoint once there is one), SIGKILL it at a random moment of training or in the
middle of a random checkpoint write, check that every checkpoint on disk loads (checksums included)
and none went backwards, and go on. Every loss any trial logged must equal the uninterrupted run's at
that step, bit for bit. Trials are children forked by one server process (`_fault_driver.py`), so the
imports are paid once. `QGL_FI_SEED` replays a chain's random choices.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qgl.lightning.checkpoint import load_checkpoint

DRIVER = Path(__file__).with_name("_fault_driver.py")
ARGS = ["data.batch_size=2", "data.block_size=32", "trainer.limit_val_batches=0", "logger.wandb=false",
        "checkpoint.every_n_steps=1", "qgalore.update_proj_gap=5", "logger.name=fi",
        "trainer.log_every_n_steps=1"]


class Server:
    """The forking server of `_fault_driver.py`, run in `cwd`."""

    def __init__(self, cwd: Path) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
        env.setdefault("QGL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "qgl"))
        self.proc = subprocess.Popen([sys.executable, str(DRIVER)], cwd=cwd, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.child: int | None = None

    def start(self, args: list[str], losses: Path, kill_save: list | None = None) -> int:
        trial = {"args": args, "losses": str(losses), "kill_save": kill_save}
        self.proc.stdin.write(json.dumps(trial) + "\n")
        self.proc.stdin.flush()
        self.child = json.loads(self.proc.stdout.readline())["pid"]
        return self.child

    def status(self) -> int:
        line = self.proc.stdout.readline()
        assert line, "the fault-injection server died"
        return json.loads(line)["status"]

    def close(self) -> None:
        """End the server; a trial still running (a failed assertion mid-chain) is killed first."""
        if self.child is not None:
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(self.child, signal.SIGKILL)
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _losses(path: Path) -> dict[int, str]:
    """step -> loss (float.hex) of the complete lines of a trial's log."""
    out: dict[int, str] = {}
    if path.exists():
        for line in path.read_text().splitlines(keepends=True):
            if line.endswith("\n"):
                step, value = line.split()
                out[int(step)] = value
    return out


def _lines(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


def _checkpoints(ckpt_dir: Path) -> dict[Path, int]:
    """Every checkpoint in the run's directory, loaded (raises on any unloadable one) -> its step."""
    return {p: int(load_checkpoint(p)["global_step"]) for p in sorted(ckpt_dir.glob("*.ckpt"))}


def _chain(tmp_path: Path, trials: int, steps: int) -> None:
    seed = int(os.environ.get("QGL_FI_SEED") or time.time_ns() % 2**31)
    rng = random.Random(seed)
    why = f"(replay with QGL_FI_SEED={seed})"
    server = Server(tmp_path)
    try:
        args = [*ARGS, f"trainer.max_steps={steps}"]
        t0 = time.perf_counter()
        server.start([*args, "logger.name=reference"], tmp_path / "reference.txt")
        assert server.status() == 0, "the uninterrupted run failed"
        reference = _losses(tmp_path / "reference.txt")
        assert sorted(reference) == list(range(1, steps + 1))
        step_time = (time.perf_counter() - t0) / steps  # an upper bound: includes the start

        run_dir = tmp_path / "runs" / "qgl" / "fi"
        newest, killed, logs = 0, 0, []
        for trial in range(trials):
            ckpts = _checkpoints(run_dir / "checkpoints") if run_dir.exists() else {}
            resume = [f"ckpt_path={max(ckpts, key=ckpts.get)}"] if ckpts else []
            if not ckpts and run_dir.exists():  # killed before its first checkpoint: start it over
                shutil.rmtree(run_dir)  # (else the new run would go to fi-1, beside the checked dir)
            log = tmp_path / f"trial{trial}.txt"
            logs.append(log)
            in_save = trial % 2 == 1
            kill_save = [rng.randint(1, 4), rng.uniform(0.02, 0.98)] if in_save else None
            pid = server.start([*args, *resume], log, kill_save)
            if not in_save:  # a random moment once training runs
                deadline = time.monotonic() + 120
                while _lines(log) == 0 and time.monotonic() < deadline:
                    time.sleep(0.02)
                time.sleep(rng.uniform(0, 3 * step_time))
                with contextlib.suppress(ProcessLookupError):  # it may have finished
                    os.kill(pid, signal.SIGKILL)
            status = server.status()
            assert status in (0, -signal.SIGKILL), f"trial {trial}: exit {status} {why}"
            killed += status == -signal.SIGKILL
            ckpts = _checkpoints(run_dir / "checkpoints")  # every checkpoint loads, checksums match
            top = max(ckpts.values(), default=0)
            assert top >= newest, f"trial {trial}: newest checkpoint went from step {newest} to {top} {why}"
            newest = top
            if status == 0:  # the run finished before the kill: start the chain again
                assert top == steps
                shutil.rmtree(run_dir)
                newest = 0
        assert killed >= trials // 2, f"only {killed} of {trials} trials were killed {why}"
        # Finish the run from the newest checkpoint; every logged step of every trial is the reference's.
        ckpts = _checkpoints(run_dir / "checkpoints") if run_dir.exists() else {}
        resume = [f"ckpt_path={max(ckpts, key=ckpts.get)}"] if ckpts else []
        if not ckpts and run_dir.exists():
            shutil.rmtree(run_dir)
        logs.append(tmp_path / "final.txt")
        server.start([*args, *resume], logs[-1])
        assert server.status() == 0
        assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == steps
        resumed = 0
        for log in logs:
            for step, value in _losses(log).items():
                assert value == reference[step], f"{log.name}: step {step} {value} != {reference[step]} {why}"
                resumed += 1
        assert resumed >= steps, why
        assert sorted(p.name for p in run_dir.parent.iterdir()) == ["fi", "reference"], why
    finally:
        server.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the trial server forks")
def test_kill_during_training_and_checkpoint_writes_fast(tmp_path):
    _chain(tmp_path, trials=3, steps=10)


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="the trial server forks")
def test_kill_during_training_and_checkpoint_writes(tmp_path):
    _chain(tmp_path, trials=20, steps=30)
