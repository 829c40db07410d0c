"""GaLore's projector: a low-rank basis P of one layer's gradient, stored INT4, refreshed adaptively.

For a gradient G of shape (m, n) and a rank r:

- m >= n, side "right": P (r, n) = Vh[:r];  low = G @ P^T, (m, r);  back = low @ P, (m, n);
- m <  n, side "left":  P (m, r) = U[:, :r]; low = P^T @ G, (r, n);  back = P @ low, (m, n).

The side is the smaller one, so P and the low-rank optimizer state are as small as they can be.
`project_back` multiplies by `scale` (GaLore's alpha). All results are fp32 (`project_back`: in
the dtype asked for). A 16-bit gradient is multiplied on 16-bit operands (P rounded to its dtype)
with fp32 accumulation, as the INT4 path is and GaLore's reference; fp32 gradients in fp32.
`add_back_` adds the back-projection to a float weight in place (one addmm_ in its dtype), so a
float weight's update never exists as an (m, n) tensor; an INT8 weight takes `project_back`'s.

P is stored as `qgl.quant.Int4Tensor` (group-wise asymmetric INT4, two nibbles a byte) when
`quantize`, else in the dtype it is multiplied in: that of the gradient it was computed from if
16-bit (its products round P to 16 bits anyway, so fp32 storage would hold bits no product reads;
GaLore's reference keeps P in the weight's dtype too), else fp32. The leading singular vector is
kept in fp32 (m or n floats): the next refresh compares against it, and a rounded copy would add
noise to a cosine that decides the schedule.

Refresh (`maybe_refresh`): with `svd_method="randomized"` a layer's first basis comes from a
Gaussian sketch and every later one is warm-started from the previous P (`qgl.optim.svd`). The
similarity pushed into the refresh queue is the one `refresh.metric` names: "leading" (the paper's:
|cos| of the new and previous leading singular vectors) or "subspace" (the mean squared cosine of
the principal angles between the previous and the new P, both as stored, so an unchanged subspace
reads exactly 1 even in INT4). If the SVD fails (`torch.linalg.LinAlgError`, or a non-finite
basis from a non-finite or badly conditioned gradient), the layer keeps its previous P, warns
naming the layer, and tries again at its next scheduled refresh; at a first refresh, with no
previous P, it takes a random orthonormal basis (seeded like the sketch), warns, and tries again
at the next step: training continues on a subspace GaLore's random-projection variants show to
work, rather than stopping at the first step of a long run.

Synchronization: on CUDA, `maybe_refresh` synchronizes the device before and after the SVD to
time it, and reads the similarity and the basis' finiteness with `.item()`. Refresh steps are the
only sync points; `project` and `project_back` never synchronize.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from qgl.kernels.mm16 import mm16
from qgl.optim.refresh import AdaptiveRefresh
from qgl.optim.settings import GALORE as _G
from qgl.optim.settings import GaLoreSettings, check_value, rank_fits
from qgl.optim.svd import subspace_overlap, top_singular_vectors
from qgl.quant.int4 import Int4Tensor

_HALF = (torch.bfloat16, torch.float16)

_INT4_KEYS = ("packed", "scale", "zero")


class GaLoreProjector:
    """Projector of one 2-D parameter's gradient (see the module docstring for shapes).

    Args:
        shape: (m, n) of the gradient.
        rank: 1 <= rank <= min(m, n).
        scale: factor applied by `project_back` (GaLore's alpha).
        quantize: store P as INT4 (`group_size` elements a group) instead of fp32.
        svd_method: "full" or "randomized" (`qgl.optim.svd.top_singular_vectors`).
        refresh: the layer's schedule and monitor; a default `AdaptiveRefresh()` if None.
        seed: seeds the randomized SVD's sketch, together with the refresh step, so that a run
            (and a run resumed from a checkpoint) computes the same bases.
        name: the layer's name, for warnings (an SVD that failed).
    """

    def __init__(self, shape: tuple[int, int], rank: int, scale: float = _G["scale"],
                 quantize: bool = _G["proj_quant"], group_size: int = _G["proj_group_size"],
                 svd_method: str = _G["svd_method"], refresh: AdaptiveRefresh | None = None,
                 seed: int = 0, name: str | None = None) -> None:
        shape = tuple(int(s) for s in shape)
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"GaLore projects 2-D gradients; got shape {shape}")
        m, n = shape
        # Ranges and choices: GaLoreSettings' (checked once there), under this constructor's names.
        for field, label, value in (("rank", "rank", rank), ("scale", "scale", scale),
                                    ("svd_method", "svd_method", svd_method),
                                    ("proj_group_size", "group_size", group_size)):
            check_value(GaLoreSettings, field, value, label)
        rank_fits(rank, (m, n))
        self.shape: tuple[int, int] = (m, n)
        self.rank = int(rank)
        self.scale = float(scale)
        self.quantize = bool(quantize)
        self.group_size = int(group_size)
        self.svd_method = svd_method
        self.refresh = refresh if refresh is not None else AdaptiveRefresh()
        self.seed = int(seed)
        self.name = name
        self.side = "right" if m >= n else "left"
        self._p: Int4Tensor | Tensor | None = None  # (rank, n) right / (m, rank) left
        self._lead: Tensor | None = None  # fp32 leading singular vector, (n,) right / (m,) left
        self._half: torch.dtype | None = None  # the last projected gradient's dtype, if 16-bit
        self._decoded: Tensor | None = None  # INT4 P decoded for the products of one update (`decoded`)

    # -- shapes ---------------------------------------------------------------------------------

    @property
    def basis_shape(self) -> tuple[int, int]:
        m, n = self.shape
        return (self.rank, n) if self.side == "right" else (m, self.rank)

    @property
    def low_shape(self) -> tuple[int, int]:
        """Shape of the projected gradient (and of the optimizer state that lives on it)."""
        m, n = self.shape
        return (m, self.rank) if self.side == "right" else (self.rank, n)

    @property
    def initialized(self) -> bool:
        return self._p is not None

    # -- refresh --------------------------------------------------------------------------------

    def maybe_refresh(self, grad: Tensor, step: int) -> bool:
        """Compute a new basis from `grad` (m, n) if the layer's step `step` is a refresh step.

        Returns True when it refreshed (also when the SVD failed and a fallback basis is in use:
        see the module docstring). The SVD runs in fp32 whatever grad's dtype.
        """
        self._check_grad(grad)
        if not self.refresh.due(step):
            return False
        cuda = grad.is_cuda
        if cuda:
            torch.cuda.synchronize(grad.device)  # time the SVD only, not the queued backward
        t0 = time.perf_counter()
        try:
            basis = self._svd(grad, step)
        except torch.linalg.LinAlgError as err:
            return self._svd_failed(grad, step, str(err).splitlines()[0])
        if cuda:
            torch.cuda.synchronize(grad.device)
        seconds = time.perf_counter() - t0
        if not bool(torch.isfinite(basis).all()):
            return self._svd_failed(grad, step, "non-finite singular vectors")

        lead = (basis[0] if self.side == "right" else basis[:, 0]).clone()
        cos = None
        if self.refresh.metric == "leading" and self._lead is not None:
            # |cos|: singular vectors have no intrinsic sign (svd.py normalizes it, but a near
            # tie in the largest entry could still flip it).
            old = self._lead.to(lead.device)
            denom = (lead.norm() * old.norm()).clamp_min(1e-30)
            cos = (torch.dot(lead, old).abs() / denom).item()
        old_p = self.basis() if self.refresh.metric == "subspace" and self._lead is not None else None
        self._lead = lead
        self._store(basis, grad.dtype)
        if old_p is not None:  # both as stored: an unchanged subspace reads 1 even through INT4
            cos = subspace_overlap(old_p, self.basis(), self.side)
        self.refresh.record(step, cos, seconds)
        return True

    def _svd(self, grad: Tensor, step: int) -> Tensor:
        """The new basis (fp32, in `basis_shape`): exact, or randomized (warm-started from the
        current P once there is one)."""
        if self.svd_method != "randomized":
            return top_singular_vectors(grad, self.rank, self.side, self.svd_method)
        generator = torch.Generator(device=grad.device)
        generator.manual_seed((self.seed * 1_000_003 + int(step)) % (2**63))
        init = self.basis() if self._lead is not None else None  # no warm start from a random fallback
        return top_singular_vectors(grad, self.rank, self.side, "randomized", generator=generator, init=init)

    def _svd_failed(self, grad: Tensor, step: int, why: str) -> bool:
        """Fallback of a failed SVD (module docstring): keep P, or take a random orthonormal one."""
        layer = self.name or f"a projected layer of shape {self.shape}"
        if self._p is not None:
            warnings.warn(f"SVD of {layer} failed at its step {step} ({why}); keeping its previous "
                          f"projection until the next refresh", RuntimeWarning, stacklevel=3)
            self.refresh.record_failure(step)
            return True
        warnings.warn(f"SVD of {layer} failed at its first refresh, step {step} ({why}); using a random "
                      f"orthonormal projection and trying again at the next step", RuntimeWarning,
                      stacklevel=3)
        generator = torch.Generator(device=grad.device)
        generator.manual_seed((self.seed * 1_000_003 + int(step)) % (2**63))
        m, n = self.shape
        k = n if self.side == "right" else m
        cols = torch.linalg.qr(torch.randn(k, self.rank, device=grad.device, generator=generator)).Q
        self._store(cols.T.contiguous() if self.side == "right" else cols, grad.dtype)
        self._lead = None  # the next refresh has nothing meaningful to compare with
        self.refresh.record_failure(step, retry_in=1)
        return True

    def _store(self, basis: Tensor, grad_dtype: torch.dtype) -> None:
        if self.quantize:
            self._p = Int4Tensor.from_float(basis, self.group_size)
        else:
            self._p = basis.to(grad_dtype) if grad_dtype in _HALF else basis

    # -- projections ----------------------------------------------------------------------------

    @contextmanager
    def decoded(self, grad: Tensor) -> Iterator[None]:
        """Within the block, `project` and `project_back` share one decoding of an INT4 P.

        On a GPU both products decode P to bf16 and multiply in cuBLAS; decoding it once for the
        update saves a kernel launch, whose host time, paid for every matrix in every step, exceeds
        its device time. Results are bit-identical; elsewhere (CPU references, the fused kernel)
        the block changes nothing. The decoded P (rank x n or m x rank, bf16) lives only inside.
        """
        p = self._p
        self._decoded = p.dense_basis(grad) if isinstance(p, Int4Tensor) else None
        try:
            yield
        finally:
            self._decoded = None

    def project(self, grad: Tensor) -> Tensor:
        """Low-rank gradient, fp32: G @ P^T (m, rank) if right, P^T @ G (rank, n) if left."""
        self._check_grad(grad)
        p = self._require_basis()
        if self._decoded is not None:  # the products the INT4 dense path runs, on the shared decoding
            g16, p16 = grad.to(self._decoded.dtype), self._decoded
            return mm16(g16, p16.T) if self.side == "right" else mm16(p16.T, g16)
        if isinstance(p, Int4Tensor):
            # Reads G in its own dtype and computes in fp32: no fp32 copy of a bf16 gradient.
            return p.project(grad, self.side).float()
        self._half = grad.dtype if grad.dtype in _HALF else None
        if self._half is not None:
            # A 16-bit gradient (16-bit weights): P rounded to its dtype, fp32 accumulation, as
            # the INT4 path and GaLore's reference compute; no fp32 copy of G, tensor-core speed.
            p16 = p.to(self._half)  # a no-op unless the dtype of the gradients changed since the refresh
            return mm16(grad, p16.T) if self.side == "right" else mm16(p16.T, grad)
        g, p = grad.float(), p.float()
        return g @ p.T if self.side == "right" else p.T @ g

    def project_back(
        self, low: Tensor, factor: float | Tensor = 1.0, out_dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """Full-shape update times `scale * factor`: low @ P if right, P @ low if left; computed
        in fp32, returned in `out_dtype` (rounded once).

        The factors are applied to `low` (m x r or r x n), not to the (m, n) result: one pass
        over the small tensor instead of one over the full one. A tensor `factor` (fp32, one
        element, on low's device) is the whole multiplier, `scale` included: `multiplier(f)` rounded
        to fp32, read when the product runs (a CUDA graph's learning rate); same bits as the float.
        """
        if tuple(low.shape) != self.low_shape:
            raise ValueError(f"expected a low-rank tensor of shape {self.low_shape}, got {tuple(low.shape)}")
        p = self._require_basis()
        low = low.float() * self._multiplier(factor)
        if self._decoded is not None:
            low16, p16 = low.to(self._decoded.dtype), self._decoded
            return mm16(low16, p16, out_dtype) if self.side == "right" else mm16(p16, low16, out_dtype)
        if isinstance(p, Int4Tensor):
            return p.project_back(low, self.side, out_dtype)
        if self._half is not None:  # the projected gradient was 16-bit: the same operands here
            low16, p16 = low.to(self._half), p.to(self._half)
            return mm16(low16, p16, out_dtype) if self.side == "right" else mm16(p16, low16, out_dtype)
        p = p.float()
        return (low @ p if self.side == "right" else p @ low).to(out_dtype)

    def add_back_(self, weight: Tensor, low: Tensor, factor: float | Tensor = 1.0) -> None:
        """``weight += scale * factor * back(low)`` in place, for a float weight of shape (m, n): one
        ``addmm_`` in the weight's dtype (fp32 accumulation, one rounding, no (m, n) temporary),
        where `project_back` + ``add_`` would write the whole update to memory first.

        `low` and P are rounded to the weight's dtype for the product (P is already stored in it
        when the weight is 16-bit and the gradient was too); `low` (m x r or r x n) is scaled first.
        A tensor `factor` is the whole multiplier, as in `project_back`.
        """
        if tuple(weight.shape) != self.shape:
            raise ValueError(f"expected a weight of shape {self.shape}, got {tuple(weight.shape)}")
        if tuple(low.shape) != self.low_shape:
            raise ValueError(f"expected a low-rank tensor of shape {self.low_shape}, got {tuple(low.shape)}")
        p = self._require_basis()
        dtype = weight.dtype
        if self._decoded is not None and self._decoded.dtype == dtype:
            p = self._decoded
        else:
            p = p.dequantize(dtype) if isinstance(p, Int4Tensor) else p.to(dtype)
        low = (low.float() * self._multiplier(factor)).to(dtype)
        if self.side == "right":
            weight.addmm_(low, p)
        else:
            weight.addmm_(p, low)

    def multiplier(self, factor: float) -> float:
        """`scale * factor`: what `project_back` and `add_back_` multiply the low-rank tensor by."""
        return self.scale * float(factor)

    def _multiplier(self, factor: float | Tensor) -> float | Tensor:
        return factor if isinstance(factor, Tensor) else self.multiplier(factor)

    def basis(self) -> Tensor | None:
        """P as used by the projections (dequantized if stored INT4), in fp32, or None before the
        first refresh."""
        if self._p is None:
            return None
        return self._p.dequantize(torch.float32) if isinstance(self._p, Int4Tensor) else self._p.float()

    @property
    def nbytes(self) -> int:
        """Bytes held: P's storage (packed codes, scales and zeros if INT4) + the leading vector."""
        total = 0
        if isinstance(self._p, Int4Tensor):
            total += int(self._p.nbytes)
        elif self._p is not None:
            total += self._p.numel() * self._p.element_size()
        if self._lead is not None:
            total += self._lead.numel() * self._lead.element_size()
        return total

    def tensors(self) -> dict[str, Tensor]:
        """The tensors held, by name: P's storage (`packed`/`scale`/`zero` if INT4, `proj` if float)
        and the leading vector `lead`; empty before the first refresh (for moving them, offload)."""
        out: dict[str, Tensor] = {}
        if isinstance(self._p, Int4Tensor):
            out.update(packed=self._p.packed, scale=self._p.scale, zero=self._p.zero)
        elif self._p is not None:
            out["proj"] = self._p
        if self._lead is not None:
            out["lead"] = self._lead
        return out

    def set_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Replace what `tensors()` returned by tensors of the same names, shapes and dtypes
        (e.g. their copies on another device)."""
        if "packed" in tensors:
            shape, group = (self._p.shape, self._p.group_size) if self._p is not None else \
                (self.basis_shape, self.group_size)
            self._p = Int4Tensor(tensors["packed"], tensors["scale"], tensors["zero"], shape, group)
        elif "proj" in tensors:
            self._p = tensors["proj"]
        if "lead" in tensors:
            self._lead = tensors["lead"]

    # -- checkpointing --------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Tensors, numbers, lists and None only (no strings: `torch.optim.Optimizer.load_state_dict`
        mangles them). P appears as `proj_packed`/`proj_scale`/`proj_zero` (INT4) or `proj` (stored)."""
        d: dict = {"shape": list(self.shape), "rank": self.rank, "quantize": self.quantize,
                   "group_size": self.group_size, "lead": self._lead, "refresh": self.refresh.state_dict()}
        if isinstance(self._p, Int4Tensor):
            sd = self._p.state_dict()
            d.update({f"proj_{k}": sd[k] for k in _INT4_KEYS})
        else:
            d["proj"] = self._p
        return d

    def load_state_dict(self, d: dict) -> None:
        """Restore `state_dict`'s output. Tensors are cast back to their formats (uint8 codes, fp32
        scales), since `Optimizer.load_state_dict` casts state to the parameter's dtype."""
        if tuple(d["shape"]) != self.shape or int(d["rank"]) != self.rank:
            raise ValueError(f"state of a projector of shape {tuple(d['shape'])} and rank {d['rank']} "
                             f"cannot load into one of shape {self.shape} and rank {self.rank}")
        self.quantize = bool(d["quantize"])
        self.group_size = int(d["group_size"])
        self._lead = None if d["lead"] is None else d["lead"].float()
        self.refresh.load_state_dict(d["refresh"])
        if "proj_packed" in d:
            self._p = Int4Tensor.from_state_dict({
                "packed": d["proj_packed"].to(torch.uint8), "scale": d["proj_scale"].float(),
                "zero": d["proj_zero"].float(), "shape": self.basis_shape, "group_size": self.group_size})
        else:
            proj = d["proj"]
            self._p = None if proj is None else (proj if proj.dtype in _HALF else proj.float())

    # -- helpers --------------------------------------------------------------------------------

    def _check_grad(self, grad: Tensor) -> None:
        if tuple(grad.shape) != self.shape:
            raise ValueError(f"expected a gradient of shape {self.shape}, got {tuple(grad.shape)}")

    def _require_basis(self) -> Int4Tensor | Tensor:
        if self._p is None:
            raise RuntimeError("the projector has no basis yet: call maybe_refresh(grad, step) first")
        return self._p

    def __repr__(self) -> str:
        return (f"GaLoreProjector(shape={self.shape}, rank={self.rank}, side={self.side!r}, "
                f"quantize={self.quantize}, refresh={self.refresh!r})")
