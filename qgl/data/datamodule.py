"""`TextDataModule`: token blocks from any text source for Lightning, shuffled deterministically and
resumable mid-epoch (its `state_dict` goes into Lightning checkpoints)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, DistributedSampler

from qgl.data.dataset import TokenBlocks, build_datasets, load_tokens
from qgl.data.tokenizer import Tokenizer, get_tokenizer


class ResumableSampler(DistributedSampler):
    """A seeded shuffle (the permutation of epoch e is that of `seed + e`, as in DistributedSampler)
    that can start an epoch part-way through: the first pass after `skip(n)` leaves out the first n
    indices of this rank. It is a DistributedSampler so that Lightning leaves it in place under DDP
    instead of wrapping it, and it keeps reporting the full epoch's length because Lightning counts
    the resumed batches of the epoch as already seen.

    With `own_epochs` (how `TextDataModule` hands it to a Trainer) it counts epochs itself: each pass
    after the first is the next epoch, and `set_epoch` is ignored. Lightning's epoch counter can run
    ahead of the data (a checkpoint written when `max_steps` ends a fit counts the epoch as finished),
    and the data order must not follow it there."""

    def __init__(self, dataset: TokenBlocks, *, seed: int, num_replicas: int = 1, rank: int = 0,
                 shuffle: bool = True, own_epochs: bool = False) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=True)
        self.own_epochs, self._passes = own_epochs, 0
        self._skip = 0
        self.yielded = 0  # indices handed out in the current pass, for use outside Lightning

    def skip(self, epoch: int, num_indices: int) -> None:
        self.epoch, self._skip = epoch, num_indices

    def set_epoch(self, epoch: int) -> None:
        if self.own_epochs:
            return
        if epoch != self.epoch:  # a new epoch starts from its beginning
            self._skip = 0
        super().set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        if self.own_epochs:
            if self._passes:
                self.epoch += 1
            self._passes += 1
        indices = list(super().__iter__())
        skip, self._skip = self._skip, 0  # the skip applies to one pass only
        self.yielded = skip
        for i in indices[skip:]:
            self.yielded += 1
            yield i


class _PositionedByDataModule(DataLoader):
    """The training loader handed to a Trainer through `TextDataModule`. Its position lives in the
    data module's state (restored before this loader is built), so it has nothing of its own to save;
    having state_dict/load_state_dict tells Lightning that a mid-epoch resume is supported."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


class TextDataModule(L.LightningDataModule):
    """Blocks of `block_size` tokens from `source` ("corpus", a local .txt/.jsonl file or folder,
    or "hf:<dataset>[:<config>]"), tokenized once into the cache. Batches are (input_ids, labels),
    each [batch_size, block_size] torch.long. Training batches are shuffled by a generator seeded
    with `seed + epoch`; validation batches come in order. `state_dict()` records (epoch, batches
    seen) so that a run resumed from a mid-epoch checkpoint continues with the next unseen batch."""

    def __init__(self, source: str | os.PathLike = "corpus", block_size: int = 256, batch_size: int = 8,
                 num_workers: int = 0, val_fraction: float = 0.01, seed: int = 0,
                 tokenizer: str | Tokenizer = "byte", cache_dir: str | os.PathLike | None = None,
                 text_field: str = "text", hf_split: str = "train", format: str = "text",
                 packing: bool = True) -> None:
        super().__init__()
        if format not in ("text", "sft"):
            raise ValueError(f"data format {format!r} is not one of: text, sft")
        # "sft": instruction/chat JSON lines, loss on responses only (qgl.data.sft).
        self.format, self.packing = format, packing
        self.source, self.block_size, self.batch_size = source, block_size, batch_size
        self.num_workers, self.val_fraction, self.seed = num_workers, val_fraction, seed
        self.tokenizer = get_tokenizer(tokenizer)
        self._load_kwargs = dict(cache_dir=cache_dir, text_field=text_field, hf_split=hf_split)
        self.train_set: TokenBlocks | None = None
        self.val_set: TokenBlocks | None = None
        self._sampler: ResumableSampler | None = None
        self._resume: tuple[int, int] = (0, 0)  # (epoch, batches seen in it, per rank)
        self._resume_world = 1  # the world size of the run that saw them

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def prepare_data(self) -> None:
        # Runs on one process per node: tokenize and cache, so that setup() on every rank only maps the file.
        if self.format == "sft":
            return  # small, tokenized in setup
        load_tokens(self.source, self.tokenizer, **self._load_kwargs)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None and self.format == "sft":
            from qgl.data.sft import build_sft_datasets

            self.train_set, self.val_set = build_sft_datasets(self.source, self.block_size, self.val_fraction,
                                                              self.tokenizer, self.packing)
        if self.train_set is None:
            self.train_set, self.val_set = build_datasets(self.source, self.block_size, self.val_fraction,
                                                          self.tokenizer, **self._load_kwargs)

    def _dataloader(self, dataset: TokenBlocks, sampler: DistributedSampler | None,
                    cls: type[DataLoader] = DataLoader) -> DataLoader:
        return cls(dataset, batch_size=self.batch_size, sampler=sampler, shuffle=False,
                          drop_last=sampler is not None, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=False)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        self._sampler = ResumableSampler(self.train_set, seed=self.seed, num_replicas=world, rank=rank,
                                         own_epochs=trainer is not None)
        epoch, seen = self._resume
        seen = self._seen_on(world, seen)
        if seen >= self.batches_per_epoch:  # saved at the end of an epoch: resume at the next one
            epoch, seen = epoch + 1, 0
        self._sampler.skip(epoch, seen * self.batch_size)
        # Only a loader requested by a Trainer through this module is resumed by the module's state.
        cls = _PositionedByDataModule if trainer is not None else DataLoader
        return self._dataloader(self.train_set, self._sampler, cls)

    def val_dataloader(self) -> DataLoader | list:
        self.setup()
        return self._dataloader(self.val_set, None) if self.val_set is not None else []

    @property
    def batches_per_epoch(self) -> int:
        """Training batches per epoch on this rank."""
        self.setup()
        world = self.trainer.world_size if self.trainer is not None else 1
        return len(self.train_set) // world // self.batch_size

    def _position(self) -> tuple[int, int]:
        trainer, sampler = self.trainer, self._sampler
        if trainer is not None:
            # Lightning's count of the training batches it took, over the whole run (restored on
            # resume): the loader itself runs ahead of the training step (the fetcher prefetches), so
            # its own count would not do, and Lightning's epoch counter may run ahead of the data.
            total = trainer.fit_loop.epoch_loop.batch_progress.total.ready
            per_epoch = self.batches_per_epoch
            return total // per_epoch, total % per_epoch
        if sampler is not None:
            return sampler.epoch, sampler.yielded // self.batch_size
        return self._resume

    def _seen_on(self, world: int, seen: int) -> int:
        """Batches per rank of a run on `world` processes that cover the samples `seen` batches per rank
        covered on the checkpoint's world size (the shuffle is the same permutation for any world size,
        rank r reading every world-th index of it)."""
        saved = self._resume_world
        if saved == world:
            return seen
        samples = seen * self.batch_size * saved
        if samples % (self.batch_size * world):
            raise ValueError(f"cannot resume the data position of a {saved}-process run on {world} "
                             "processes: "
                             f"{samples} samples seen is not a whole number of {world} x batch_size "
                             f"{self.batch_size}; resume on {saved} processes")
        return samples // (self.batch_size * world)

    def state_dict(self) -> dict[str, Any]:
        epoch, seen = self._position()
        world = self.trainer.world_size if self.trainer is not None else 1
        return {"epoch": epoch, "batches_seen": seen, "seed": self.seed, "batch_size": self.batch_size,
                "block_size": self.block_size, "world_size": world}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name in ("seed", "batch_size", "block_size"):
            if state_dict.get(name, getattr(self, name)) != getattr(self, name):
                # A different seed/batch/block size makes "batches seen" point at other samples.
                raise ValueError(f"cannot resume the data position: the checkpoint has {name}="
                                 f"{state_dict[name]}, this TextDataModule has {getattr(self, name)}")
        self._resume = (int(state_dict["epoch"]), int(state_dict["batches_seen"]))
        self._resume_world = int(state_dict.get("world_size", 1))  # batches_seen counts per rank
