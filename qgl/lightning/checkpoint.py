"""Crash-safe checkpoints: a run killed while saving leaves the previous checkpoint intact.

Lightning's default writer serializes the whole checkpoint into memory, writes it to a temporary
file in the *system* temp dir and moves it over the target (a copy, not a rename, when /tmp is on
another device), with no fsync: a kill or power loss can leave a truncated `last.ckpt`, and the
in-memory copy doubles host memory for a large model. Here the bytes stream straight into a
temporary file beside the target, which is flushed and fsync'ed and then `os.replace`d over the
target (atomic on POSIX and Windows within one filesystem), and the directory is fsync'ed so that
the rename itself survives a power loss.

Every checkpoint is a zip archive (torch's format) whose members carry a CRC32 of their bytes;
`verify_checkpoint` checks them all before a load, so that a truncated, overwritten or bit-flipped
file is one clear error (`CheckpointError`) instead of a silent load or torch's advice to retry with
`weights_only=False`. The checksums live inside the file, so they are written (and renamed into
place) atomically with it. Files get the process umask (mkstemp would leave them 0600).

Two pieces, because Lightning splits the job the same way:
  * `AtomicCheckpointIO`: the `CheckpointIO` plugin that does the writing (any `trainer.save_checkpoint`);
  * `AtomicModelCheckpoint`: a `ModelCheckpoint` that installs it on its trainer, removes temporary
    files a killed run left behind, and always leaves `last.ckpt` at the final step.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import zipfile
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


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; `str(error)` is one line naming the file and the problem."""


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save(obj, path)` that either fully replaces `path` or leaves it untouched, with the
    CRC32 of every member written (whatever `torch.serialization.set_crc32_options` says).

    On a hard kill the hidden temporary (suffix `TMP_SUFFIX`) stays behind and `path` still
    holds the previous checkpoint; `remove_stale_temporaries` cleans such leftovers."""
    crc = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(True)
    try:
        with atomic_open(path, suffix=TMP_SUFFIX) as f:
            torch.save(obj, f)
    finally:
        torch.serialization.set_crc32_options(crc)


# path -> (inode, size, mtime_ns) of a file verified with remember=True, for the one next load.
_VERIFIED: dict[str, tuple[int, int, int]] = {}


def _signature(path: Path) -> tuple[str, tuple[int, int, int]]:
    st = path.stat()
    return str(path.resolve()), (st.st_ino, st.st_size, st.st_mtime_ns)


def verify_checkpoint(path: str | os.PathLike, *, remember: bool = False) -> None:
    """Raise `CheckpointError` (one line) unless `path` is a complete torch zip checkpoint whose
    members all match their CRC32 (reads the whole file once). `remember`: the next
    `load_checkpoint(path, reuse_verification=True)` of the unchanged file skips the second read (a
    resume checks the file before building the model, then Lightning loads it)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {str(path)!r} is empty (a save was cut short?)")
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a complete torch checkpoint ({e})") from e
    if bad is not None:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupted: member {bad!r} fails its checksum")
    if not any(n.endswith("/data.pkl") for n in names):
        raise CheckpointError(f"checkpoint {str(path)!r} is a zip file but not a torch checkpoint")
    if remember:
        key, sig = _signature(path)
        _VERIFIED[key] = sig


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", *, mmap: bool = False,
                    remember: bool = False, reuse_verification: bool = False) -> dict[str, Any]:
    """`torch.load(path, weights_only=True)` after `verify_checkpoint(path, remember=remember)`, which
    `reuse_verification` skips once for a file verified with `remember=True` and unchanged since; any
    failure is a one-line `CheckpointError` (never a suggestion to unpickle arbitrary objects)."""
    key, sig = _signature(Path(path)) if reuse_verification and Path(path).is_file() else ("", None)
    if sig is None or _VERIFIED.pop(key, None) != sig:
        verify_checkpoint(path, remember=remember)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        why = next((ln.strip() for ln in first if "Unsupported global" in ln), "unsupported content")
        raise CheckpointError(f"checkpoint {str(path)!r} holds objects other than tensors and plain "
                              f"types; refusing to unpickle them ({why})") from e
    except Exception as e:  # noqa: BLE001 - whatever torch raises, one line naming the file
        line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be loaded: {line}") from e


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

    @override
    def load_checkpoint(self, path: Any, map_location: Any = "cpu",
                        weights_only: bool | None = None) -> dict[str, Any]:
        if "file" not in get_filesystem(path).protocol or weights_only is False:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        return load_checkpoint(path, map_location=map_location, reuse_verification=True)


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
        # _should_skip_saving_checkpoint is also true when this step was already saved; but a run
        # resumed from a periodic checkpoint of its final step (killed before last.ckpt followed it)
        # has "saved" this step while last.ckpt holds an older one: check the file itself then.
        if self.save_last and (not self._should_skip_saving_checkpoint(trainer)
                               or (self._fitting(trainer) and not self._last_is_current(trainer))):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A fit resumed at its max_steps runs no training loop, hence no on_train_end.
        if self.save_last and self._fitting(trainer) and not self._last_is_current(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_fit_end(trainer, pl_module)

    @staticmethod
    def _fitting(trainer: L.Trainer) -> bool:
        return not trainer.fast_dev_run and trainer.state.fn == "fit" and not trainer.sanity_checking

    def _last_is_current(self, trainer: L.Trainer) -> bool:
        """Whether `last.ckpt` exists and holds this global step (reads only its pickle, memory-mapped)."""
        path = self.last_model_path
        if not path or not os.path.isfile(path):
            return False
        try:
            step = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step")
        except Exception:  # noqa: BLE001 - an unreadable last.ckpt is not current
            return False
        return step == trainer.global_step


__all__ = ["AtomicCheckpointIO", "AtomicModelCheckpoint", "CheckpointError", "atomic_torch_save",
           "load_checkpoint", "remove_stale_temporaries", "verify_checkpoint"]
