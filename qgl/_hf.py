"""Import `transformers` safely from inside a qgl checkout.

The repository's top-level `kernels/` folder (installed as `qgl.kernels`) shadows the `kernels`
package of the Hugging Face Hub when Python runs with the checkout's root on `sys.path` (`python -c`,
`python -m pytest`, `python -m qgl` there), and so would any folder of the checkout that a script puts
there; transformers imports that package on its first model import and fails with "cannot import
name ... from 'kernels'". `transformers()` does that first import with the checkout's folders left out
of `sys.path`, so later imports find the real package in `sys.modules`. Installed (not a checkout),
nothing is left out.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

_ROOT = Path(__file__).resolve().parent.parent  # the checkout's root (or site-packages)
# Only a checkout has qgl's kernels at the top level (installed, they are qgl/kernels; site-packages
# may then hold the Hub's `kernels` package, which must stay importable).
_CHECKOUT = (_ROOT / "kernels" / "int8_ref.py").is_file()


def transformers() -> ModuleType:
    """The `transformers` module with its modeling utilities imported; ImportError naming `qgl[hf]`."""
    if "transformers.modeling_utils" not in sys.modules:
        saved = sys.path[:]
        sys.path[:] = [p for p in sys.path if not _in_checkout(p)]
        try:
            import transformers.modeling_utils  # noqa: F401  (imports `kernels` when installed)
        except ImportError as err:
            raise ImportError(f"this needs the optional package `transformers` ({err}): "
                              "pip install qgl[hf]") from err
        finally:
            sys.path[:] = saved
    return sys.modules["transformers"]


def _in_checkout(entry: str) -> bool:
    """Whether `entry` is a folder of the checkout (not a virtual environment inside it) that holds a
    module or package named `kernels` (qgl's own, or a script's)."""
    if not _CHECKOUT:
        return False
    try:
        path = Path(entry or ".").resolve()
        return (path.is_relative_to(_ROOT) and "site-packages" not in path.parts
                and ((path / "kernels.py").is_file() or (path / "kernels" / "__init__.py").is_file()))
    except OSError:
        return False
