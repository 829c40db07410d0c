"""Optimizer-state offload: each parameter's state lives in host memory between its updates.

Q-GaLore's optimizer state (8-bit moments, the fp32 moments of small tensors, the INT4 projection
P and its fp32 leading vector) is needed on the device only while its parameter is updated; with
layer-wise updates, inside that parameter's post-accumulate-grad hook. `StateOffloader` (mode
"cpu") keeps every state in CPU memory, pinned where CUDA is available so that copies are
asynchronous DMA, and brings one parameter's state to the device around its update:

    with offloader.resident(p, optimizer.state[p]):
        ...  # update p: the state's tensors are device copies here

On entry the state's tensors are replaced by device copies (prefetched, or copied now) and the copy
of the *next* parameter's state starts on a side CUDA stream; on exit the state is copied back
into its host buffers on the side stream, ordered after the update by `wait_stream`, and the device
copies are released once that copy has run (`record_stream`). "Next" is learned: hooks fire in
reverse order of the forward, the same order every step, so the order of the previous step (closed
by `end_step()`, which `QGaLoreAdamW.step` calls) predicts it; the first step runs without prefetch.

Device memory held for optimizer state is then at most three parameters' states (one being written
back, one in use, one prefetched) instead of all; host memory holds all of them once. Copies are
exact, so the updates are bitwise those without offload. On a CPU device the same code runs: host
and "device" copies are plain CPU tensors, copies are synchronous, no streams or events.

Mode "paged" (`PagedStates`) is bitsandbytes' alternative: 8-bit moment codes of at least
`PAGED_MIN_NUMEL` elements move to CUDA unified memory (`bitsandbytes.functional.get_paged`), which
the driver pages between host and device on demand; each is prefetched before its update. CUDA and
bitsandbytes only; only the codes are paged (absmax, small moments and P stay on the device).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor

from qgl.optim import settings

OFFLOAD_MODES = tuple(m for m in settings.OFFLOAD_MODES if m is not None)  # ("cpu", "paged")
PAGED_MIN_NUMEL = 100_000
"""bitsandbytes pages optimizer states of at least 1e5 elements (`Optimizer8bit.get_state_buffer`)."""
_CODES = ("exp_avg_codes", "exp_avg_sq_codes")
_PROJ = "projector."


def offload_mode(value: bool | str | None) -> str | None:
    """None (off) for False/None/"none"; "cpu" for True/"cpu"; "paged" for "paged"."""
    if value is None or value is False or value == "none":
        return None
    if value is True:
        return "cpu"
    if value in OFFLOAD_MODES:
        return str(value)
    raise ValueError(f"offload must be False, True, 'cpu' or 'paged', got {value!r}")


def state_tensors(state: dict[str, Any]) -> dict[str, Tensor]:
    """The tensors of one parameter's optimizer state by slot: moment keys, and `projector.<name>`
    for the projector's tensors (`GaLoreProjector.tensors`)."""
    out = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    projector = state.get("projector")
    if projector is not None:
        out.update({_PROJ + k: v for k, v in projector.tensors().items()})
    return out


def set_state_tensors(state: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    """Put `tensors` (slots as `state_tensors` names them) into `state`."""
    proj = {k[len(_PROJ):]: v for k, v in tensors.items() if k.startswith(_PROJ)}
    state.update({k: v for k, v in tensors.items() if not k.startswith(_PROJ)})
    if proj:
        state["projector"].set_tensors(proj)


def offloaded_nbytes(offloader: StateOffloader | PagedStates,
                     states: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Bytes of `states` by kind: `moments`, `projections` (on the device) and `offloaded_moments`,
    `offloaded_projections` (held in host or unified memory by `offloader`)."""
    out = dict(moments=0, projections=0, offloaded_moments=0, offloaded_projections=0)
    for state in states:
        for name, t in state_tensors(state).items():
            kind = "projections" if name.startswith(_PROJ) else "moments"
            out[("offloaded_" if offloader.holds(t) else "") + kind] += t.numel() * t.element_size()
    return out


def make_offloader(offload: bool | str | None) -> StateOffloader | PagedStates | None:
    """The offloader of a mode (see `offload_mode`), or None."""
    mode = offload_mode(offload)
    return None if mode is None else StateOffloader() if mode == "cpu" else PagedStates()


class StateOffloader:
    """Optimizer state in (pinned) host memory, on the device only around its parameter's update.

    Args:
        prefetch: copy the next parameter's state ahead of its update (by last step's order).
    Attributes:
        hits, misses: updates whose state was prefetched / had to be copied on demand.
    """

    mode = "cpu"

    def __init__(self, prefetch: bool = True) -> None:
        self.prefetch = prefetch
        self.hits = self.misses = 0
        self._host: dict[Tensor, dict[str, Tensor]] = {}
        self._pending: dict[Tensor, tuple[dict[str, Tensor], Any]] = {}  # device copies, ready event
        self._order: list[Tensor] = []
        self._seen: set[Tensor] = set()
        self._next: dict[Tensor, Tensor] = {}
        self._streams: dict[torch.device, Any] = {}

    @contextmanager
    def resident(self, p: Tensor, state: dict[str, Any]) -> Iterator[None]:
        """Inside, `state`'s tensors are on `p.device`; on exit they go back to host memory."""
        if p in self._seen:  # the order repeats without end_step(): a new step began
            self.end_step()
        self._seen.add(p)
        self._order.append(p)
        if p in self._host:
            set_state_tensors(state, self._take(p))
        nxt = self._next.get(p)
        if self.prefetch and nxt is not None and nxt in self._host and nxt not in self._pending:
            self._pending[nxt] = self._copy_in(nxt)
        try:
            yield
        finally:
            self._write_back(p, state)

    def adopt(self, p: Tensor, state: dict[str, Any]) -> None:
        """Move a state built elsewhere (e.g. loaded from a checkpoint) into host memory."""
        self.synchronize()  # the CPU may overwrite host buffers that a copy in flight still writes
        self._pending.pop(p, None)
        self._write_back(p, state)

    def end_step(self) -> None:
        """Close the step: its update order predicts the next step's; unused prefetches are dropped
        and the first state of the next step is prefetched."""
        first = self._order[0] if self._order else None
        if self._order:
            self._next = dict(zip(self._order, self._order[1:], strict=False))
        self._order, self._seen = [], set()
        self._pending.clear()
        if self.prefetch and first is not None and first in self._host:
            self._pending[first] = self._copy_in(first)

    def synchronize(self) -> None:
        """Wait for the copies in flight (before reading host buffers, e.g. to save a checkpoint)."""
        for stream in self._streams.values():
            stream.synchronize()

    def holds(self, t: Tensor) -> bool:
        """True: between updates every state tensor is a host copy."""
        return True

    # ------------------------------------------------------------------ copies

    def _side(self, device: torch.device) -> Any:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def _copy_in(self, p: Tensor) -> tuple[dict[str, Tensor], Any]:
        """Device copies of `p`'s host state and, on CUDA, the event that marks them ready."""
        host, device = self._host[p], p.device
        if device.type != "cuda":
            return {k: h.to(device, copy=True) for k, h in host.items()}, None
        side = self._side(device)
        with torch.cuda.stream(side):  # allocated on, and copied by, the side stream
            copies = {k: h.to(device, non_blocking=True) for k, h in host.items()}
            ready = torch.cuda.Event()
            ready.record(side)
        return copies, ready

    def _take(self, p: Tensor) -> dict[str, Tensor]:
        pending = self._pending.pop(p, None)
        if pending is None:
            self.misses += 1
            pending = self._copy_in(p)
        else:
            self.hits += 1
        copies, ready = pending
        if ready is not None:  # the compute stream waits for the copy and uses the tensors from now on
            stream = torch.cuda.current_stream(p.device)
            stream.wait_event(ready)
            for t in copies.values():
                t.record_stream(stream)
        return copies

    def _write_back(self, p: Tensor, state: dict[str, Any]) -> None:
        tensors = state_tensors(state)
        host = self._host.setdefault(p, {})
        for name in [k for k in host if k not in tensors]:
            del host[name]
        side = None
        if p.device.type == "cuda":
            side = self._side(p.device)
            side.wait_stream(torch.cuda.current_stream(p.device))  # after the update's kernels
        with torch.cuda.stream(side) if side is not None else nullcontext():
            for name, t in tensors.items():
                h = host.get(name)
                if h is t:
                    continue
                if h is None or h.shape != t.shape or h.dtype != t.dtype:
                    h = host[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=torch.cuda.is_available())
                h.copy_(t, non_blocking=True)
                if side is not None and t.is_cuda:
                    t.record_stream(side)  # its memory is reused only after this copy ran
        set_state_tensors(state, dict(host))


class PagedStates:
    """bitsandbytes' paged (CUDA unified memory) 8-bit moment codes; same interface as StateOffloader.

    Args:
        min_numel: codes of at least this many elements are paged (bitsandbytes' threshold by default;
            smaller ones stay ordinary device tensors, counted under `moments`).
        functional: the module that allocates and prefetches paged tensors (`get_paged`,
            `prefetch_tensor`); `bitsandbytes.functional` by default, which needs CUDA. Tests pass a
            stand-in whose `get_paged` returns CPU tensors flagged `is_paged`.
    """

    mode = "paged"

    def __init__(self, min_numel: int = PAGED_MIN_NUMEL, functional: Any = None) -> None:
        from qgl.optim.adam import _bitsandbytes

        if functional is None and torch.cuda.is_available():
            functional = _bitsandbytes()
        if functional is None:
            raise ValueError("offload='paged' needs CUDA and bitsandbytes (CUDA unified memory); "
                             "use offload=True (or 'cpu') for CPU-pinned states instead")
        self.min_numel = min_numel
        self._bnbf = functional

    @contextmanager
    def resident(self, p: Tensor, state: dict[str, Any]) -> Iterator[None]:
        """Prefetch `p`'s paged codes to the device; after the first update, page its large codes."""
        for key in _CODES:
            if self.holds(state.get(key)):
                self._bnbf.prefetch_tensor(state[key])
        try:
            yield
        finally:
            for key in _CODES:
                t = state.get(key)
                # Not `t.is_cuda`: bitsandbytes' paged tensors are CPU tensors over managed memory
                # (`torch.frombuffer`), so "not yet paged" is told by the flag, not the device.
                if t is not None and not self.holds(t) and t.numel() >= self.min_numel:
                    paged = self._bnbf.get_paged(*t.shape, dtype=t.dtype, device=t.device)
                    paged.copy_(t)
                    state[key] = paged

    def adopt(self, p: Tensor, state: dict[str, Any]) -> None:
        """Nothing to do: codes are paged at their first update."""

    def end_step(self) -> None:
        """Nothing to do: the driver pages on demand."""

    def synchronize(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def holds(self, t: Tensor | None) -> bool:
        """True for tensors in unified memory."""
        return bool(getattr(t, "is_paged", False))
