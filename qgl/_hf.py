"""Import `transformers` safely from inside a qgl checkout.

The repository's top-level `kernels/` folder (installed as `qgl.kernels`) shadows the `kernels`
package of the Hugging Face Hub when Python runs with the checkout's root on `sys.path` (`python -c`,
`python -m pytest`, `python -m qgl` there); transformers imports that package on its first model
import and fails with "cannot import name ... from 'kernels'". `transformers()` does that first
import with the checkout's root left out of `sys.path`, so later imports find the real package in
`sys.modules`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

_ROOT = Path(__file__).resolve().parent.parent  # the checkout's root (or site-packages)


def transformers() -> ModuleType:
    """The `transformers` module with its modeling utilities imported; ImportError naming `qgl[hf]`."""
    if "transformers.modeling_utils" not in sys.modules:
        saved = sys.path[:]
        sys.path[:] = [p for p in sys.path if not _is_root(p)]
        try:
            import transformers.modeling_utils  # noqa: F401  (imports `kernels` when installed)
        except ImportError as err:
            raise ImportError(f"this needs the optional package `transformers` ({err}): "
                              "pip install qgl[hf]") from err
        finally:
            sys.path[:] = saved
    return sys.modules["transformers"]


def _is_root(entry: str) -> bool:
    try:
        return Path(entry or ".").resolve() == _ROOT and (_ROOT / "kernels").is_dir()
    except OSError:
        return False
