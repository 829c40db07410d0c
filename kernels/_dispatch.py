"""Choice between a Triton kernel and its plain-torch reference, made per call.

Triton runs for CUDA tensors when triton imports and ``QGL_DISABLE_TRITON`` is not ``"1"``; the
reference runs everywhere else. Each public function of ``qgl.kernels`` asks ``use_triton`` and, when
it answers True, imports its Triton function by name inside that branch; the Triton modules are
thus never imported at package import, so that CPU-only installs (no triton) still import.
"""

from __future__ import annotations

import functools
import os

from torch import Tensor

__all__ = ["use_triton", "triton_available"]


@functools.cache
def triton_available() -> bool:
    """True iff ``import triton`` succeeds (checked once per process)."""
    try:
        import triton  # noqa: F401
    except Exception:  # a broken triton install must not break the references
        return False
    return True


def use_triton(t: Tensor) -> bool:
    """True iff ``t`` is a CUDA tensor, triton imports and env ``QGL_DISABLE_TRITON`` is not "1"."""
    # The env var is read on every call so that it can be flipped at run time (tests, debugging).
    return (
        isinstance(t, Tensor)
        and t.is_cuda
        and os.environ.get("QGL_DISABLE_TRITON") != "1"
        and triton_available()
    )
