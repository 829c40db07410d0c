"""Choice between a Triton kernel and its plain-torch reference, made per call.

Triton runs for CUDA tensors when triton imports and ``QGL_DISABLE_TRITON`` is not ``"1"``; the
reference runs everywhere else. The Triton modules (``int8_triton``, ``int4_triton``,
``w8a16_triton``) are imported only when first needed, never at package import, so that CPU-only
installs and a partially written kernel set still import.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from collections.abc import Callable

from torch import Tensor

__all__ = ["use_triton", "triton_available", "pick"]


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


@functools.cache
def _triton_impl(family: str, name: str) -> Callable | None:
    module = f"{__package__}.{family}_triton"
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name != module:  # the kernel module exists but one of its imports is missing
            raise
        impl = None
    else:
        impl = getattr(mod, f"{name}_triton", None)
    if impl is None:
        warnings.warn(
            f"{module}.{name}_triton is not available; using the plain-torch reference on CUDA",
            RuntimeWarning,
            stacklevel=3,
        )
    return impl


def pick(t: Tensor, family: str, name: str, ref: Callable) -> Callable:
    """The implementation of ``name`` for tensor ``t``: ``<family>_triton.<name>_triton`` or ``ref``.

    A missing Triton module or function falls back to ``ref`` with a one-time RuntimeWarning
    rather than failing, so that a kernel can land before its siblings.
    """
    if not use_triton(t):
        return ref
    return _triton_impl(family, name) or ref
