"""The per-layer refresh schedule of Q-GaLore's layer-adaptive subspace update, and its monitor.

Each projected layer owns one `AdaptiveRefresh`. It only does bookkeeping (no tensors): the
projector asks `due(step)` with the layer's own step count and, when it ran an SVD, reports
`record(step, cos, seconds)`.

Schedule (DESIGN.md, "The algorithm, precisely"):

- a refresh is due at the layer's step 0 and then every `gap` steps of that layer
  (`next_refresh = last refresh step + gap`, so a change of gap takes effect from the refresh
  that caused it);
- at every refresh after the first, the caller reports a similarity in [0, 1] between the new
  and the previous basis, the one `metric` names: "leading" (the paper's: |cos| between the new
  and the previous leading singular vector) or "subspace" (the mean squared cosine of the
  principal angles between the previous and the new P, ||P_old P_new^T||_F^2 / r for orthonormal
  bases); it is pushed into a queue of the last `queue_size` values;
- when the queue is full and its mean is >= `cos_threshold`, the subspace is deemed stable:
  `gap = min(int(gap * gamma_proj), max_gap)` (at least gap + 1 when gamma_proj > 1, so that a
  small gap with a small gamma still grows).

What the paper leaves open, decided here:

- The queue is cleared after each lengthening (the reference code keeps a sliding window, so
  once the mean crosses the threshold the gap grows at *every* following refresh, i.e.
  geometrically in the number of SVDs). Clearing means each lengthening needs a fresh full
  queue of evidence measured at the new gap, where the subspace has had longer to move.
- `max_gap` (default: no cap) bounds the gap; once reached the queue is no longer filled.
- The gap never shrinks: a rotating subspace only stops it from growing.
- `frozen` reports a layer whose gap reached `frozen_gap` (default 8x the initial gap) or
  `max_gap`: it refreshes so rarely that its subspace is practically fixed.
- A failed SVD (`record_failure`) pushes nothing, leaves the gap as it is and schedules the next
  try `retry_in` steps later (default: the gap); `svd_failures` counts them.

The two metrics differ where the leading vector and the subspace disagree: two nearly equal top
singular values that trade places make the leading cosine drop to ~0 while the subspace has not
moved ("subspace" lengthens the gap, "leading" does not), and a stable dominant direction over a
rotating rest keeps the leading cosine near 1 while most of the subspace is new ("leading"
lengthens the gap, "subspace" does not). tests/test_refresh.py builds both streams.
"""

from __future__ import annotations

import math
from collections import deque

from qgl.optim.settings import GALORE as _G
from qgl.optim.settings import REFRESH_METRICS, GaLoreSettings

__all__ = ["REFRESH_METRICS", "AdaptiveRefresh"]


class AdaptiveRefresh:
    """Refresh schedule and monitor of one projected layer.

    Monitoring figures: `svd_count`, `gap`, `last_cos` (float or None: the last similarity,
    whichever the metric), `svd_seconds` (total), `refresh_steps` (layer steps at which SVDs ran),
    `next_refresh`, `frozen`, `svd_failures`.
    """

    def __init__(self, update_proj_gap: int = _G["update_proj_gap"], adaptive: bool = _G["adaptive"],
                 cos_threshold: float = _G["cos_threshold"], gamma_proj: float = _G["gamma_proj"],
                 queue_size: int = _G["queue_size"], max_gap: int | None = _G["max_gap"],
                 frozen_gap: int | None = None, metric: str = _G["refresh_metric"]) -> None:
        # Ranges and their combination: GaLoreSettings' (the other fields at their defaults).
        GaLoreSettings(update_proj_gap=update_proj_gap, adaptive=adaptive, cos_threshold=cos_threshold,
                       gamma_proj=gamma_proj, queue_size=queue_size, max_gap=max_gap, refresh_metric=metric)
        if frozen_gap is not None and frozen_gap < 1:
            raise ValueError(f"frozen_gap must be >= 1, got {frozen_gap}")
        self.update_proj_gap = int(update_proj_gap)
        self.adaptive = bool(adaptive)
        self.cos_threshold = float(cos_threshold)
        self.gamma_proj = float(gamma_proj)
        self.queue_size = int(queue_size)
        self.max_gap = None if max_gap is None else int(max_gap)
        self.frozen_gap = 8 * self.update_proj_gap if frozen_gap is None else int(frozen_gap)
        self.metric = metric
        self._reset_state()

    def _reset_state(self) -> None:
        self.gap: int = self.update_proj_gap
        self.next_refresh: int = 0
        self.svd_count: int = 0
        self.svd_seconds: float = 0.0
        self.last_cos: float | None = None
        self.refresh_steps: list[int] = []
        self.svd_failures: int = 0
        self._queue: deque[float] = deque(maxlen=self.queue_size)

    # -- schedule -------------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        """Whether the layer must compute a new basis at its step `step` (0-based)."""
        return step >= self.next_refresh

    def record(self, step: int, cos: float | None, seconds: float) -> None:
        """Report a refresh at layer step `step`.

        Args:
            cos: the similarity `metric` names between the new and the previous basis, in
                [0, 1]; None at the first refresh (nothing to compare with).
            seconds: wall time of the SVD.
        """
        self.svd_count += 1
        self.svd_seconds += float(seconds)
        self.refresh_steps.append(int(step))
        self.last_cos = None if cos is None else float(cos)
        if cos is not None and self.adaptive and not self._at_cap():
            self._queue.append(float(cos))
            full = len(self._queue) == self.queue_size
            if full and sum(self._queue) / self.queue_size >= self.cos_threshold:
                new_gap = int(self.gap * self.gamma_proj)
                if self.gamma_proj > 1.0:
                    new_gap = max(new_gap, self.gap + 1)  # int() would keep a gap of 1 at 1 forever
                if self.max_gap is not None:
                    new_gap = min(new_gap, self.max_gap)
                self.gap = max(new_gap, self.gap)
                self._queue.clear()  # the next lengthening needs a fresh, full queue
        self.next_refresh = int(step) + self.gap

    def record_failure(self, step: int, retry_in: int | None = None) -> None:
        """Report a refresh at layer step `step` whose SVD failed: no similarity, no change of gap;
        the next try comes `retry_in` steps later (None: after the current gap)."""
        if retry_in is not None and (int(retry_in) != retry_in or retry_in < 1):
            raise ValueError(f"retry_in must be an integer >= 1, got {retry_in}")
        self.svd_failures += 1
        self.next_refresh = int(step) + (self.gap if retry_in is None else int(retry_in))

    def _at_cap(self) -> bool:
        return self.max_gap is not None and self.gap >= self.max_gap

    # -- monitoring -----------------------------------------------------------------------------

    @property
    def queue(self) -> list[float]:
        """The cosine similarities gathered since the last change of gap (oldest first)."""
        return list(self._queue)

    @property
    def frozen(self) -> bool:
        """True once the gap reached `frozen_gap` or `max_gap`: the subspace barely moves."""
        return self.gap >= self.frozen_gap or self._at_cap()

    def galore_svds(self, steps: int) -> int:
        """SVDs that plain GaLore's fixed schedule (every `update_proj_gap` steps from step 0)
        would have run over the layer steps 0 .. steps - 1. `galore_svds(n) - svd_count` is
        the number of SVDs saved."""
        return max(0, math.ceil(int(steps) / self.update_proj_gap))

    # -- checkpointing --------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Plain python numbers and lists: the configuration and the schedule's state."""
        return {
            "update_proj_gap": self.update_proj_gap, "adaptive": self.adaptive,
            "cos_threshold": self.cos_threshold, "gamma_proj": self.gamma_proj,
            "queue_size": self.queue_size, "max_gap": self.max_gap, "frozen_gap": self.frozen_gap,
            # a bool, not the metric's name: Optimizer.load_state_dict mangles strings
            "metric_subspace": self.metric == "subspace", "svd_failures": self.svd_failures,
            "gap": self.gap, "next_refresh": self.next_refresh, "svd_count": self.svd_count,
            "svd_seconds": self.svd_seconds, "last_cos": self.last_cos,
            "refresh_steps": list(self.refresh_steps), "queue": list(self._queue),
        }

    def load_state_dict(self, d: dict) -> None:
        """Restore what `state_dict` saved, configuration included (a resumed run continues
        the schedule it was on, whatever the constructor was given)."""
        self.__init__(update_proj_gap=d["update_proj_gap"], adaptive=d["adaptive"],
                      cos_threshold=d["cos_threshold"], gamma_proj=d["gamma_proj"],
                      queue_size=d["queue_size"], max_gap=d["max_gap"], frozen_gap=d["frozen_gap"],
                      metric="subspace" if d.get("metric_subspace") else "leading")  # older: leading
        self.svd_failures = int(d.get("svd_failures", 0))
        self.gap = int(d["gap"])
        self.next_refresh = int(d["next_refresh"])
        self.svd_count = int(d["svd_count"])
        self.svd_seconds = float(d["svd_seconds"])
        self.last_cos = None if d["last_cos"] is None else float(d["last_cos"])
        self.refresh_steps = [int(s) for s in d["refresh_steps"]]
        self._queue.extend(float(c) for c in d["queue"])

    def __repr__(self) -> str:
        return (f"AdaptiveRefresh(gap={self.gap}, svd_count={self.svd_count}, next_refresh="
                f"{self.next_refresh}, last_cos={self.last_cos}, frozen={self.frozen})")
