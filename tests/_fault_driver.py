"""Subprocess of `test_fault_injection.py`: a server that imports torch, Lightning and qgl once and then
forks one child per trial, each a `qgl train` run (`qgl.lightning.run.run`) that the test kills -9.

Protocol (one JSON object a line): the test writes `{"args": [...], "losses": path, "kill_save": null |
[n, fraction]}` to stdin; the server forks, prints `{"pid": <child>}`, waits for the child and prints
`{"status": <exit code, or -signal>}`. End of stdin ends the server.

The child adds to the run:
* every optimizer step appends `<global_step> <loss as float.hex()>` to `losses` (line-buffered: a
  kill -9 loses at most the line being written);
* `kill_save=[n, fraction]`: the n-th `torch.save` (1-based; only checkpoints call it) writes that
  fraction of its bytes into the real writer's file object and then SIGKILLs its own process.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from qgl.config import load_recipe
from qgl.lightning.run import run


class LossLog(Callback):
    def __init__(self, path: str) -> None:
        self.f = open(path, "a", buffering=1)  # noqa: SIM115 - open for the whole run
        self.step = -1

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step != self.step:
            self.step = trainer.global_step
            self.f.write(f"{trainer.global_step} {float(outputs['loss']).hex()}\n")


def _kill_inside_save(n: int, fraction: float) -> None:
    real, count = torch.save, [0]

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        count[0] += 1
        if count[0] != n:
            return real(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        real(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        f.write(data[: int(len(data) * fraction)])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = save


def _child(trial: dict[str, Any]) -> None:
    out = os.open(os.devnull, os.O_WRONLY)
    os.dup2(out, 1)  # the run's table and progress bar: not into the protocol
    os.dup2(out, 2)
    if trial.get("kill_save"):
        _kill_inside_save(*trial["kill_save"])
    run(load_recipe(None, trial["args"]), extra_callbacks=[LossLog(trial["losses"])])


def main() -> None:
    torch.set_num_threads(1)
    for line in sys.stdin:
        trial = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _child(trial)
            except BaseException:  # noqa: BLE001 - reported as the exit code
                code = 1
            os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"status": code}), flush=True)


if __name__ == "__main__":
    main()
