"""What was alive at the peak of one CUDA training step, from the caching allocator's own record.

`StepSnapshot` (used by `MemoryMonitor(snapshot_step=...)`, recipe key `trainer.memory_snapshot_step`)
records the allocator's history (`torch.cuda.memory._record_memory_history`, Python stacks) over
one optimizer step and writes, into its directory:

- `memory-snapshot-step<N>.pickle`: torch's snapshot, to drop on https://pytorch.org/memory_viz;
- `memory-peak-step<N>.txt`: `peak_report` as text: the step's peak of allocated bytes, replayed
  from the trace, and the allocations alive at that moment grouped by the code that made them.

`peak_report` is plain Python over the snapshot dict (its format: `torch.cuda.memory._snapshot`'s
docstring), so it is tested on CPU with hand-made traces.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.checkpoint import set_checkpoint_early_stop

from qgl._atomic import atomic_open

LIBRARY_CODE = ("site-packages/", "dist-packages/", "/lib/python3", "<")
"""Path fragments of library frames (torch, Lightning, the standard library); an allocation's site is
the innermost frame outside them: the user's code, or qgl's wherever it is installed."""

_MIB = 2**20


@dataclass
class Site:
    """Allocations made at one place and alive at the peak: their bytes and how many."""

    where: str
    nbytes: int
    count: int


@dataclass
class PeakReport:
    """The highest point of allocated bytes over a trace and what held it.

    `before_bytes`: allocated before the trace began and still alive at the peak (weights, optimizer
    state, ...); `sites`: the blocks allocated during the trace and alive at the peak, largest
    site first; `peak_bytes` = `before_bytes` + their sum.
    """

    peak_bytes: int
    before_bytes: int
    sites: list[Site] = field(default_factory=list)
    event_index: int = -1  # the trace entry at which the peak was reached (-1: before any)
    events: int = 0

    def format(self, top: int = 25) -> str:
        lines = [f"peak allocated: {self.peak_bytes / _MIB:,.1f} MiB (at trace entry {self.event_index} "
                 f"of {self.events})",
                 f"  allocated before the recording, alive at the peak: {self.before_bytes / _MIB:,.1f} MiB",
                 "  allocated during the recording, alive at the peak, by site (innermost frame outside "
                 "the libraries [innermost frame]):"]
        for s in self.sites[:top]:
            lines.append(f"  {s.nbytes / _MIB:>10,.1f} MiB  {s.count:>5} x  {s.where}")
        rest = self.sites[top:]
        if rest:
            lines.append(f"  {sum(s.nbytes for s in rest) / _MIB:>10,.1f} MiB  in {len(rest)} more sites")
        return "\n".join(lines)


def _is_library(filename: str) -> bool:
    return "/qgl/" not in filename and any(m in filename for m in LIBRARY_CODE)


def _short(filename: str) -> str:
    """A path from its package (`torch/...`, `qgl/...`) or, for other code, its last three parts."""
    for marker in ("site-packages/", "dist-packages/"):
        i = filename.rfind(marker)
        if i >= 0:
            return filename[i + len(marker):]
    i = filename.rfind("/qgl/")
    return filename[i + 1:] if i >= 0 else "/".join(filename.split("/")[-3:])


def site_of(frames: Sequence[Mapping[str, Any]]) -> str:
    """Where an allocation was made: the innermost frame outside the libraries (`LIBRARY_CODE`), then,
    in brackets, the innermost frame of all when that is a library's (torch's, say). `frames`
    innermost first."""
    if not frames:
        return "<no Python frame>"
    fmt = lambda f: f"{_short(str(f.get('filename', '?')))}:{f.get('line', '?')} {f.get('name', '?')}"
    ours = next((f for f in frames if not _is_library(str(f.get("filename", "")))), None)
    if ours is None:
        return f"[{fmt(frames[0])}]"
    return fmt(ours) if ours is frames[0] else f"{fmt(ours)} [{fmt(frames[0])}]"


def peak_report(snapshot: Mapping[str, Any], baseline_bytes: int, device: int = 0) -> PeakReport:
    """Replay `snapshot["device_traces"][device]` from `baseline_bytes` allocated at its start.

    Allocated bytes rise at "alloc" and fall at a block's first "free_requested" or
    "free_completed" (the caching allocator's `allocated_bytes`, which `max_memory_allocated`
    tracks, falls when a free is requested; a block used by another stream stays reserved until
    its free completes). A free of a block the trace never saw allocated comes off the baseline.
    The trace gives requested sizes, the allocator counts its blocks (rounded up to 512 B, and a
    reused cached block may be up to 1 MiB larger than asked): the replayed peak can differ from
    `max_memory_allocated` by that rounding, never by a tensor.
    """
    traces = snapshot.get("device_traces") or []
    trace = traces[device] if device < len(traces) else []

    def replay(stop: int | None):
        live: dict[Any, tuple[int, Any]] = {}
        requested: set[Any] = set()  # freed blocks whose bytes came off at "free_requested"
        before = current = int(baseline_bytes)
        best, best_at = current, -1
        for i, e in enumerate(trace if stop is None else trace[: stop + 1]):
            action, addr, size = e.get("action"), e.get("addr"), int(e.get("size", 0))
            if action == "alloc":
                live[addr] = (size, e.get("frames") or [])
                current += size
            elif action == "free_requested":
                requested.add(addr)
                if addr in live:
                    current -= live.pop(addr)[0]
                else:
                    before, current = before - size, current - size
            elif action == "free_completed":
                if addr in requested:
                    requested.discard(addr)
                elif addr in live:
                    current -= live.pop(addr)[0]
                else:
                    before, current = before - size, current - size
            if current > best:
                best, best_at = current, i
        return live, before, best, best_at

    _, _, peak, at = replay(None)
    live, before, _, _ = replay(at) if at >= 0 else ({}, int(baseline_bytes), 0, -1)
    sites: dict[str, Site] = {}
    for size, frames in live.values():
        where = site_of(frames)
        s = sites.setdefault(where, Site(where, 0, 0))
        s.nbytes += size
        s.count += 1
    ranked = sorted(sites.values(), key=lambda s: s.nbytes, reverse=True)
    return PeakReport(peak_bytes=peak, before_bytes=max(0, before), sites=ranked, event_index=at,
                      events=len(trace))


class StepSnapshot:
    """Record the CUDA allocator over one optimizer step, then write the snapshot and its report.

    Args:
        step: the optimizer step to record (0 = the first), counted as `trainer.global_step` at its start.
        directory: where the two files go.
        max_entries: trace entries kept (a ring buffer: a longer step loses its first entries, and the
            report says so).
    """

    def __init__(self, step: int, directory: str | Path, max_entries: int = 2_000_000) -> None:
        if step < 0:
            raise ValueError(f"snapshot step must be >= 0, got {step}")
        self.step = int(step)
        self.directory = Path(directory)
        self.max_entries = int(max_entries)
        self.baseline: int | None = None
        self.written: tuple[Path, Path] | None = None
        self._no_early_stop: contextlib.AbstractContextManager | None = None

    @property
    def recording(self) -> bool:
        return self.baseline is not None

    def start(self, device: torch.device) -> None:
        """Start recording (and, until `stop_and_write`, run activation checkpoints without early stop).

        Non-reentrant checkpointing stops a recomputation by raising an exception from the hook that
        saves its last tensor; raised inside a custom autograd Function's forward (QLinear's) while
        the allocator records Python stacks, torch loses it and the step dies with "SystemError:
        <built-in method apply of FunctionMeta ...> returned NULL without setting an exception"
        (torch 2.11, H100 and H200). Recomputing each checkpointed block to its end raises nothing;
        it costs the few ops after a block's last saved tensor.
        """
        torch.cuda.memory._record_memory_history(max_entries=self.max_entries, stacks="python")
        self._no_early_stop = set_checkpoint_early_stop(False)
        self._no_early_stop.__enter__()
        self.baseline = torch.cuda.memory_allocated(device)

    def stop_and_write(self, device: torch.device, why: str = "") -> tuple[Path, Path]:
        """Stop recording; write `memory-snapshot-step<N>.pickle` and `memory-peak-step<N>.txt`."""
        try:
            snapshot = torch.cuda.memory._snapshot(device)
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)
            if self._no_early_stop is not None:
                self._no_early_stop.__exit__(None, None, None)
                self._no_early_stop = None
        baseline, self.baseline = int(self.baseline or 0), None
        index = device.index if device.index is not None else torch.cuda.current_device()
        report = peak_report(snapshot, baseline, index)
        pickle_path = self.directory / f"memory-snapshot-step{self.step}.pickle"
        text_path = self.directory / f"memory-peak-step{self.step}.txt"
        with atomic_open(pickle_path) as f:
            pickle.dump(snapshot, f)
        peak = torch.cuda.max_memory_allocated(device) / _MIB
        head = f"optimizer step {self.step}{f' ({why})' if why else ''}; " \
               f"max_memory_allocated since the step's last reset: {peak:,.1f} MiB\n"
        if report.events >= self.max_entries:
            head += f"the trace filled its {self.max_entries} entries: the first are lost (partial replay)\n"
        with atomic_open(text_path) as f:
            f.write((head + report.format() + "\n").encode())
        self.written = (pickle_path, text_path)
        return self.written
