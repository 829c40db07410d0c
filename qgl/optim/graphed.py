"""CUDA-graph replay of each matrix's update on the steps between its refreshes.

A layer-wise step runs the update of every matrix from its backward hook: about ten kernels (decode
the INT4 P, project, 8-bit Adam, scale, back-project, stochastic-rounding INT8 update), each launched
from Python. At LLaMA-1B that host time, not the GPU's, bounds the step (`benchmarks/overhead.py`).
Between two refreshes of a matrix nothing about its update changes but numbers: the step, the
learning rate, the gradient's values. `GraphedUpdates` captures the update once as a CUDA graph
whose kernels read those numbers from device tensors (`qgl.optim.update.DeviceScalars`), and then
replays it: one launch a matrix instead of ten.

How a matrix's update runs, step by step (`QGaLoreAdamW._update_param` asks `replay` first, else runs
`apply_update` inside `recording`; this module calls no update itself, as `offload.resident` does not):

- refresh steps (and a matrix's first update): eagerly, `apply_update` with the device scalars, so
  the same kernels run (compiled before any capture) and give the same bits as a replay; the new P
  lives at new addresses, so the matrix's graph turns stale;
- the first step after: `apply_update(weight, buffer, ...)` is captured after `step += 1` on a side
  stream into one memory pool shared by every graph, then replayed;
- every later step (`replay`): copy the gradient into the buffer the graph reads (one per shape and
  dtype), write the lr-dependent scalars when the learning rate moved (once per group and step), replay.

Every tensor a graph touches outside its pool is updated in place and keeps its address: the INT8
codes and scales, the 8-bit moments, P's packed codes, the step and the scalars. Replays run on one
stream in backward order and leave nothing alive in the pool, so the graphs can share it. Moments
and P must stay on the device (no offload) and 8-bit (the kernel that reads a device step), the
weight's rounding stochastic; other parameters are updated eagerly as before.

Same bits with or without graphs where the eager path takes device scalars (`capture=False`, the
tests' reference); against the default eager path (bitsandbytes' 8-bit Adam and host numbers), the
Adam kernel (`qgl.kernels.adam8_triton`) differs from bitsandbytes' by its rounding of the moments.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from qgl.kernels import use_triton
from qgl.optim.update import DeviceScalars
from qgl.quant import Int8Tensor

__all__ = ["GraphedUpdates"]


@dataclass
class _Matrix:
    """A matrix's graph (None until first captured), whether it is stale, and its step on the device.

    A refresh makes the graph stale (it reads the old P) without dropping it: it is replaced once the
    next capture is done. The shared memory pool must never lose its last graph while its id is still
    used (torch's allocator refuses to share a pool whose graphs are all gone), and this keeps every
    matrix's graph alive until its successor exists."""

    step: Tensor  # int64 [1]: the step of the last update (the graph adds 1 before it reads it)
    graph: torch.cuda.CUDAGraph | None = None
    stale: bool = True


@dataclass
class Recording:
    """What `GraphedUpdates.recording` hands its body: the gradient to update from (the parameter's, or
    the buffer a graph reads) and the device scalars; `failed` is set if the capture failed."""

    grad: Tensor
    scalars: DeviceScalars
    failed: bool = False


@dataclass
class _GroupScalars:
    """The lr-dependent device scalars of a param group, and the numbers they were written from."""

    back: Tensor  # fp32 0-dim: scale * -lr
    decay: Tensor  # fp32 0-dim: 1 - lr * weight_decay
    written_from: tuple[float, float, float] | None = None  # (lr, weight_decay, scale); None: not yet


class GraphedUpdates:
    """Runs the per-matrix updates of `QGaLoreAdamW` as replayed CUDA graphs where it can.

    Args:
        capture: False runs every update eagerly with the device scalars (the graphs' reference).

    Counters (for tests and benchmarks): `captures`, `replays`, `eager` updates.
    """

    def __init__(self, capture: bool = True) -> None:
        self.capture = capture
        self.enabled = True  # False after a capture failed (warned once): every update then runs eagerly
        self._matrices: dict[Tensor, _Matrix] = {}
        self._groups: dict[tuple[int, torch.device], _GroupScalars] = {}
        self._grad_buffers: dict[tuple[tuple[int, ...], torch.dtype, torch.device], Tensor] = {}
        self._pool: Any = None
        self._streams: dict[torch.device, torch.cuda.Stream] = {}  # the side stream captures run on
        self.captures = self.replays = self.eager = 0

    @staticmethod
    def serves(
        weight: Tensor | Int8Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]
    ) -> bool:
        """Whether this parameter's update can be replayed: a CUDA GaLore matrix with 8-bit moments on
        the device, stochastic rounding if its weight is INT8, and the Triton kernels on."""
        return (
            use_triton(grad)  # CUDA, and the kernels not switched off (QGL_DISABLE_TRITON=1)
            and "projector" in state
            and "exp_avg_codes" in state
            and state["exp_avg_codes"].is_cuda
            and (group["stochastic_rounding"] or not isinstance(weight, Int8Tensor))
        )

    def replay(self, p: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> bool:
        """Step `p` by replaying its graph if the graph is valid for this step (captured, no refresh
        due, graphs on): the gradient copied into the buffer the graph reads, the lr-dependent scalars
        written if the learning rate moved, `state["step"]` advanced. False: nothing done, the update
        goes through `recording`. `serves(...)` must hold."""
        matrix = self._matrices.get(p)
        if matrix is None or matrix.stale or not (self.capture and self.enabled):
            return False
        if state["projector"].refresh.due(state["step"]):
            return False
        self._group_scalars(group, grad.device)
        state["step"] += 1  # what the captured apply_update did once, at capture
        self._grad_buffer(grad).copy_(grad)
        matrix.graph.replay()
        self.replays += 1
        return True

    @contextmanager
    def recording(
        self, p: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]
    ) -> Iterator[Recording]:
        """The context of an update of `p` that `replay` could not run. Its body runs
        `apply_update(weight, run.grad, state, group, index, run.scalars)` for the `run` it yields:

        - on a refresh step (or with capture off) eagerly, with the device scalars: the new P has new
          addresses, so the matrix's graph turns stale;
        - else captured into the matrix's new graph (reading the gradient buffer), which is then
          replayed for this step. If the capture fails, `run.failed` is set afterwards (warned once,
          graphs off from then on, the step count restored): the caller then runs the update eagerly.
        """
        matrix = self._matrices.get(p)
        if matrix is None:
            matrix = self._matrices[p] = _Matrix(torch.zeros(1, dtype=torch.int64, device=grad.device))
        scalars = DeviceScalars(matrix.step, *self._group_scalars(group, grad.device))
        projector = state["projector"]
        refresh = projector.refresh.due(state["step"]) or not projector.initialized
        if refresh or not (self.capture and self.enabled):
            matrix.stale = True  # a refresh stores P anew: the graph would read the old one
            matrix.step.fill_(state["step"] + 1)
            yield Recording(grad, scalars)
            self.eager += 1
            return
        buffer = self._grad_buffer(grad)
        run = Recording(buffer, scalars)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        stream = self._streams.get(grad.device)
        if stream is None:
            stream = self._streams[grad.device] = torch.cuda.Stream(device=grad.device)
        matrix.step.fill_(state["step"])
        step_before = state["step"]
        graph = torch.cuda.CUDAGraph()
        current = torch.cuda.current_stream(grad.device)
        stream.wait_stream(current)
        entered = False  # whether the body ran (inside the capture)
        try:
            with torch.cuda.stream(stream):
                # thread_local: the data loader's pinning thread may call into CUDA meanwhile.
                graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
                try:
                    matrix.step.add_(1)
                    entered = True
                    yield run
                finally:
                    graph.capture_end()
        except Exception as err:  # noqa: BLE001 - any failure: warn once, run eagerly from now on
            state["step"] = step_before  # the captured apply_update advanced it
            self.enabled = False
            warnings.warn(f"CUDA-graph capture of an update failed ({type(err).__name__}: {err}); updates "
                          "run eagerly from now on (set cuda_graphs=false to silence this)", RuntimeWarning,
                          stacklevel=4)
            if entered:  # the body ran inside the failed capture: the caller runs the update again
                run.failed = True
                return
            matrix.step.fill_(state["step"] + 1)  # the capture never began: the body runs eagerly
            yield Recording(grad, scalars)
            self.eager += 1
            return
        current.wait_stream(stream)
        matrix.graph, matrix.stale = graph, False  # the old graph goes only now (see _Matrix)
        self.captures += 1
        buffer.copy_(grad)
        graph.replay()
        self.replays += 1

    def forget(self) -> None:
        """Drop every graph (the states were replaced: a checkpoint was loaded); the next update of each
        matrix runs eagerly and recaptures after, into a new pool (the old one loses all its graphs)."""
        self._matrices.clear()
        self._pool = None

    # ----------------------------------------------------------------- internals

    def _group_scalars(self, group: dict[str, Any], device: torch.device) -> tuple[Tensor, Tensor]:
        key = (id(group), device)
        scalars = self._groups.get(key)
        if scalars is None:
            zero = lambda: torch.zeros((), dtype=torch.float32, device=device)
            scalars = self._groups[key] = _GroupScalars(zero(), zero())
        numbers = (group["lr"], group["weight_decay"], group["scale"])
        if numbers != scalars.written_from:  # once per group and step under a scheduler
            lr, weight_decay, scale = numbers
            # The numbers apply_update computes on the host, rounded to fp32 as its ops round them.
            scalars.back.fill_(scale * float(-lr))
            scalars.decay.fill_(1.0 - lr * weight_decay)
            scalars.written_from = numbers
        return scalars.back, scalars.decay

    def _grad_buffer(self, grad: Tensor) -> Tensor:
        key = (tuple(grad.shape), grad.dtype, grad.device)
        buffer = self._grad_buffers.get(key)
        if buffer is None:
            buffer = self._grad_buffers[key] = torch.empty_like(grad, memory_format=torch.contiguous_format)
        return buffer
