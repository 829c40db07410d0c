"""Where a run writes, and what resuming one means (README, "Runs and resume").

Run directory: `<logger.save_dir>/<logger.project>/<name>/`, holding `config.yaml` (the resolved
recipe of the latest start), `checkpoints/` (a relative `checkpoint.dir` is inside the run dir; an
absolute one is used as given), the CSV metrics or the `wandb/` folder, heatmaps and profiles.
`<name>` is `logger.name`, else `run-<UTC time>`; a new run whose directory already holds files gets
`<name>-1`, `<name>-2`, ... so that no run ever writes into another's directory.

`ckpt_path=last` resumes the newest run (by the time of its `last.ckpt`) among `<name>` and
`<name>-<n>` (any run of the project when `logger.name` is null), in that run's directory (with an
absolute `checkpoint.dir`: that directory's `last.ckpt`, in the newest such run). An explicit
checkpoint path resumes in the run directory that holds it, or else starts a new run directory.

Resume rule (`check_resume`): settings the checkpoint's state was built for or whose data position
it records (`method`, `model.*`, `data.*` but `num_workers`, `seed`, `qgalore.*` but `offload`,
`lora.*`) must equal the checkpoint's: a change is refused with one line. The optimizer and schedule
(`optim.*`, `trainer.max_steps`, `trainer.accumulate_grad_batches`, `trainer.gradient_clip_val`) apply
from the resumed step on, the LR schedule rebuilt from the new values (`ScheduleFromConfig`), with a
warning naming each change. Everything else (logging, checkpointing, precision, ...) just applies.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf

from qgl._atomic import atomic_open
from qgl._ranks import is_launched_rank
from qgl.config import RecipeConfig
from qgl.lightning.checkpoint import load_checkpoint

RECIPE_KEY = "qgl_recipe"  # the resolved recipe, a plain dict, in every checkpoint qgl writes
REFUSED = ("method", "model.", "data.", "seed", "qgalore.", "lora.")
REFUSED_EXCEPT = ("data.num_workers", "qgalore.offload")
WARNED = ("optim.", "trainer.max_steps", "trainer.accumulate_grad_batches", "trainer.gradient_clip_val")


class RunSetupError(ValueError):
    """A run that cannot start (output not writable, nothing to resume, a refused change); one line."""


@dataclass(frozen=True)
class RunPaths:
    """The run's directory, its checkpoint directory and the checkpoint it resumes (or None)."""

    run_dir: Path
    checkpoint_dir: Path
    resume_from: Path | None


def recipe_dict(cfg: RecipeConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _checkpoint_dir(cfg: RecipeConfig, run_dir: Path) -> Path:
    d = Path(cfg.checkpoint.dir).expanduser()
    return d if d.is_absolute() else run_dir / d


def _runs_of(root: Path, name: str | None) -> list[Path]:
    if not root.is_dir():
        return []
    pattern = re.compile(rf"{re.escape(name)}(-\d+)?" if name else r".+")
    return [p for p in root.iterdir() if p.is_dir() and pattern.fullmatch(p.name)]


def _new_run_dir(root: Path, name: str | None) -> Path:
    base = name or time.strftime("run-%Y%m%d-%H%M%S", time.gmtime())
    candidate, n = root / base, 0
    while candidate.exists() and any(candidate.iterdir()):
        n += 1
        candidate = root / f"{base}-{n}"
    return candidate


# Rank 0's RunPaths, handed to the processes that Lightning's DDP launcher starts for the other ranks:
# they re-run `qgl train` from the top, and would otherwise pick a run directory of their own (a later
# `run-<time>`, or `<name>-1` since rank 0's already exists).
LAUNCHED_RUN_ENV = "QGL_RUN_PATHS"


def share_with_launched_ranks(paths: RunPaths) -> None:
    """Put `paths` in the environment that Lightning's launcher copies into the other ranks' processes."""
    resume_from = None if paths.resume_from is None else str(paths.resume_from)
    os.environ[LAUNCHED_RUN_ENV] = json.dumps([str(paths.run_dir), str(paths.checkpoint_dir), resume_from])


def _launched_rank_paths() -> RunPaths | None:
    """Rank 0's paths in a process a launcher started for another rank, else None."""
    raw = os.environ.get(LAUNCHED_RUN_ENV)
    if not raw or not is_launched_rank():
        return None
    run_dir, checkpoint_dir, resume_from = json.loads(raw)
    return RunPaths(Path(run_dir), Path(checkpoint_dir), None if resume_from is None else Path(resume_from))


def resolve_run(cfg: RecipeConfig) -> RunPaths:
    """The run directory, checkpoint directory and resume checkpoint of `cfg` (module docstring);
    creates nothing. Raises `RunSetupError` when `ckpt_path` names nothing to resume. In a process
    that Lightning's DDP launcher started for a rank > 0: rank 0's (`share_with_launched_ranks`)."""
    launched = _launched_rank_paths()
    if launched is not None:
        return launched
    root = Path(cfg.logger.save_dir).expanduser() / cfg.logger.project
    name = cfg.logger.name
    if cfg.ckpt_path is None:
        run_dir = _new_run_dir(root, name)
        return RunPaths(run_dir, _checkpoint_dir(cfg, run_dir), None)
    if cfg.ckpt_path == "last" and Path(cfg.checkpoint.dir).expanduser().is_absolute():
        # A checkpoint dir outside the run dirs (shared by the runs that name it): its last.ckpt,
        # continued in the newest run directory of this name (a new one if there is none).
        path = Path(cfg.checkpoint.dir).expanduser() / "last.ckpt"
        if not path.is_file():
            raise RunSetupError(f"ckpt_path=last: {str(path)!r} does not exist (checkpoint.dir is absolute)")
        runs = _runs_of(root, name)
        run_dir = max(runs, key=lambda r: r.stat().st_mtime_ns) if runs else _new_run_dir(root, name)
        return RunPaths(run_dir, path.parent, path)
    if cfg.ckpt_path == "last":
        lasts = [(_checkpoint_dir(cfg, r) / "last.ckpt", r) for r in _runs_of(root, name)]
        lasts = [(p, r) for p, r in lasts if p.is_file()]
        if not lasts:
            who = f"named {name!r} (or {name}-<n>)" if name else "at all"
            raise RunSetupError(f"ckpt_path=last: no run {who} in {root} has a last.ckpt; give a "
                                "checkpoint path, or set logger.name to the run to resume")
        path, run_dir = max(lasts, key=lambda pr: pr[0].stat().st_mtime_ns)
        return RunPaths(run_dir, _checkpoint_dir(cfg, run_dir), path)
    path = Path(cfg.ckpt_path).expanduser()
    if not path.is_file():
        raise RunSetupError(f"ckpt_path={cfg.ckpt_path!r}: no such checkpoint file")
    for run_dir in _runs_of(root, None):  # resume in the run that holds the checkpoint
        ckpt_dir = _checkpoint_dir(cfg, run_dir)
        if ckpt_dir.is_dir() and ckpt_dir.resolve() == path.resolve().parent:
            return RunPaths(run_dir, ckpt_dir, path)
    run_dir = _new_run_dir(root, name)
    return RunPaths(run_dir, _checkpoint_dir(cfg, run_dir), path)


def prepare_dirs(cfg: RecipeConfig, paths: RunPaths) -> None:
    """Create the run and checkpoint directories and prove them writable (a file created and
    removed in each), before anything is built; `RunSetupError` names the key and the problem."""
    dirs = [("logger.save_dir", paths.run_dir), ("checkpoint.dir", paths.checkpoint_dir)]
    if not cfg.checkpoint.save_last and not cfg.checkpoint.every_n_steps:
        dirs.pop()  # nothing will be checkpointed
    for key, d in dirs:
        try:
            d.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=d):
                pass
        except OSError as e:
            raise RunSetupError(f"{key}: cannot write to {str(d)!r} ({e.strerror or e})") from e
    with atomic_open(paths.run_dir / "config.yaml") as f:
        f.write(OmegaConf.to_yaml(OmegaConf.structured(cfg)).encode())


def check_resume(cfg: RecipeConfig, path: str | os.PathLike) -> list[str]:
    """Compare `cfg` with the recipe stored in checkpoint `path` (which is verified first). Returns
    one warning per changed optimizer/schedule setting; raises `RunSetupError` on a refused change
    and `CheckpointError` on an unusable file."""
    ckpt = load_checkpoint(path, mmap=True, remember=True)  # Lightning's load then skips the re-read
    saved = ckpt.get(RECIPE_KEY)
    if saved is None:  # not written by `qgl train`: compare what Lightning kept
        hp = ckpt.get("hyper_parameters") or {}
        model = hp.get("model")
        if isinstance(model, str) and cfg.model.hf_path is None and model != cfg.model.name:
            raise RunSetupError(f"cannot resume {str(path)!r}: it holds model.name={model}, this run has "
                                f"model.name={cfg.model.name}")
        return []
    old, new = _flat(saved), _flat(recipe_dict(cfg))
    changed = [k for k in new if k in old and old[k] != new[k]]
    refused = [k for k in changed if k.startswith(REFUSED) and k not in REFUSED_EXCEPT]
    if refused:
        diffs = ", ".join(f"{k}={old[k]} -> {new[k]}" for k in refused[:4])
        more = f" and {len(refused) - 4} more" if len(refused) > 4 else ""
        raise RunSetupError(f"cannot resume {str(path)!r} with a changed {diffs}{more}: the checkpoint's "
                            "model, optimizer state and data position belong to the old values; set them "
                            "back, or start a new run (no ckpt_path)")
    warned = [k for k in changed if k.startswith(WARNED)]
    if not warned:
        return []
    step = int(ckpt.get("global_step", 0))
    return [f"resume from step {step}: {', '.join(f'{k} {old[k]} -> {new[k]}' for k in warned)} apply from "
            f"here on, the LR schedule rebuilt from them; {_same_past(old, new, warned, step)}"]


def _same_past(old: dict[str, Any], new: dict[str, Any], changed: list[str], step: int) -> str:
    """Whether the steps already taken would have been the same under the new settings."""
    from qgl.lightning.module import WarmupCosine

    schedule = ("trainer.max_steps", "optim.warmup_steps", "optim.min_lr_ratio")
    sched = lambda c: WarmupCosine(c["optim.warmup_steps"], c["trainer.max_steps"], c["optim.min_lr_ratio"])
    if set(changed) <= set(schedule):
        a, b = sched(old), sched(new)
        if all(a(s) == b(s) for s in range(step)):
            return "the steps taken so far had the same LR: the run continues as an uninterrupted one would"
    return "the steps taken so far followed the old values: the run differs from an uninterrupted one"


class RecipeRecord(Callback):
    """Stores the resolved recipe in every checkpoint (key `RECIPE_KEY`), for `check_resume`."""

    def __init__(self, cfg: RecipeConfig) -> None:
        self.recipe = recipe_dict(cfg)

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        checkpoint[RECIPE_KEY] = self.recipe


__all__ = ["RECIPE_KEY", "RecipeRecord", "RunPaths", "RunSetupError", "check_resume", "prepare_dirs",
           "resolve_run"]
