"""Crash-safe checkpoints: a run killed while saving leaves the previous checkpoint intact.

Lightning's default writer serializes the whole checkpoint into memory, writes it to a temporary
file in the *system* temp dir and moves it over the target (a copy, not a rename, when /tmp is on
another device), with no fsync: a kill or power loss can leave a truncated `last.ckpt`, and the
in-memory copy doubles host memory for a large model. Here the bytes stream straight into a
temporary file beside the target, which is flushed and fsync'ed and then `os.replace`d over the
target (atomic on POSIX and Windows within one filesystem), and the directory is fsync'ed so that
the rename itself survives a power loss.

Two pieces, because Lightning splits the job the same way:
  * `AtomicCheckpointIO`: the `CheckpointIO` plugin that does the writing (any `trainer.save_checkpoint`);
  * `AtomicModelCheckpoint`: a `ModelCheckpoint` that installs it on its trainer, removes temporary
    files a killed run left behind, and always leaves `last.ckpt` at the final step.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override

from qgl._atomic import atomic_open

TMP_SUFFIX = ".qgl-tmp"  # temporary files are ".<name>.<random>.qgl-tmp": hidden, never "*.ckpt"


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save(obj, path)` that either fully replaces `path` or leaves it untouched.

    On a hard kill the hidden temporary (suffix `TMP_SUFFIX`) stays behind and `path` still
    holds the previous checkpoint; `remove_stale_temporaries` cleans such leftovers."""
    with atomic_open(path, suffix=TMP_SUFFIX) as f:
        torch.save(obj, f)


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that killed saves left in `directory`; returns what was removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = [p for p in directory.glob(f".*{TMP_SUFFIX}") if p.is_file()]
    for p in stale:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return stale


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose local saves go through `atomic_torch_save`. Remote (fsspec) paths keep
    Lightning's own writer, since object stores publish an object only once it is complete."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        if "file" not in get_filesystem(path).protocol:
            super().save_checkpoint(checkpoint, path)
            return
        atomic_torch_save(checkpoint, path)


class AtomicModelCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` with crash-safe writes and a final `last.ckpt`.

    * On setup it swaps a plain `TorchCheckpointIO` of the strategy for `AtomicCheckpointIO` (a
      custom plugin the user chose is left alone) and deletes temporaries of killed saves.
    * Lightning writes `last.ckpt` only together with a periodic checkpoint, so a run whose final
      step is not a multiple of `every_n_train_steps` would leave `last.ckpt` behind the model; this
      class saves it once more at the end of training when it is stale.
    * Lightning removes the previous periodic checkpoint only after the new one is written, so with
      the atomic writer there is always one complete checkpoint on disk.
    """

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        strategy = trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()
        if trainer.is_global_zero and self.dirpath is not None:
            remove_stale_temporaries(self.dirpath)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # _should_skip_saving_checkpoint is also true when this step was already saved.
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)


__all__ = ["AtomicCheckpointIO", "AtomicModelCheckpoint", "atomic_torch_save", "remove_stale_temporaries"]
