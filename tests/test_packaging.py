"""Packaging (issue 16): the package-dir mapping, triton as an extra, a torch-free `qgl --help`, and the
bound on `lightning` that covers the private Lightning APIs qgl uses."""

from __future__ import annotations

import importlib
import importlib.metadata
import subprocess
import sys
import time
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def _requirements() -> list[Requirement]:
    return [Requirement(r) for r in importlib.metadata.requires("qgl") or []]


def test_installed_lightning_is_inside_the_declared_bound():
    (lightning,) = [r for r in _requirements() if r.name == "lightning"]
    # An upper bound is declared, and the Lightning this runs on satisfies the whole specifier.
    assert any(s.operator in ("<", "<=", "~=", "==") for s in lightning.specifier), lightning
    installed = Version(importlib.metadata.version("lightning"))
    assert lightning.specifier.contains(installed), (str(installed), str(lightning.specifier))


def test_every_private_lightning_symbol_still_exists():
    from qgl.callbacks._lightning_private import PRIVATE_SYMBOLS

    assert PRIVATE_SYMBOLS
    for module, attribute in PRIVATE_SYMBOLS:
        obj = importlib.import_module(module)
        for part in attribute.split("."):
            assert hasattr(obj, part), f"lightning {importlib.metadata.version('lightning')} has no " \
                                       f"{module}.{attribute}: re-read callbacks/_lightning_private.py"
            obj = getattr(obj, part)
        assert callable(obj), (module, attribute)


def test_private_lightning_apis_are_used_in_one_module_only():
    # Every `from lightning... import _x` and `._should_accumulate` of qgl's own code is in one file.
    offenders = []
    for path in [*ROOT.glob("callbacks/*.py"), *ROOT.glob("qgl/**/*.py"), *ROOT.glob("benchmarks/*.py")]:
        if path.name == "_lightning_private.py":
            continue
        text = path.read_text(encoding="utf-8")
        if "lightning.pytorch.core.optimizer import" in text or "._should_accumulate(" in text:
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_triton_is_required_only_under_extras():
    triton = [r for r in _requirements() if r.name == "triton"]
    extras = {e for r in triton for e in ("cuda", "test")
              if r.marker is not None and r.marker.evaluate({"extra": e, "platform_system": "Linux"})}
    assert extras == {"cuda", "test"}
    for r in triton:  # a plain install (no extra) never pulls it, on any platform
        assert not r.marker.evaluate({"extra": "", "platform_system": "Linux"}), str(r)
    names = {r.name.lower().replace("_", "-") for r in _requirements() if r.marker is None}
    assert {"wandb", "matplotlib", "psutil", "typing-extensions"} <= names


def test_callbacks_kernels_recipes_are_real_qgl_packages_not_symlinks():
    import qgl.callbacks
    import qgl.kernels
    import qgl.recipes
    from qgl.config import RECIPES_DIR, bundled_recipes

    for name in ("callbacks", "kernels", "recipes"):
        assert not (ROOT / "qgl" / name).is_symlink() and not (ROOT / "qgl" / name).exists(), name
    assert Path(qgl.callbacks.__file__).parent.name == "callbacks"
    assert Path(qgl.kernels.__file__).parent.name == "kernels"
    assert Path(qgl.recipes.__file__).parent == RECIPES_DIR
    assert "tiny.yaml" in bundled_recipes() and "pretrain/llama_60m.yaml" in bundled_recipes()


def test_pyproject_lists_every_package():
    tomllib = pytest.importorskip("tomllib")
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    on_disk = {"qgl", *("qgl." + p.parent.name for p in (ROOT / "qgl").glob("*/__init__.py"))}
    on_disk |= {f"qgl.{d}" for d in setuptools["package-dir"].values()}
    assert listed == on_disk, f"add to [tool.setuptools] packages: {sorted(on_disk - listed)}"


@pytest.mark.parametrize("args", [["--help"], ["recipes"]])
def test_cli_answers_without_torch(args):
    code = ("import sys\nfrom qgl.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in ('torch', 'lightning', 'triton') if m in sys.modules)\n"
            "print('HEAVY', heavy, file=sys.stderr)\n")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stderr and proc.stdout.strip()
    assert wall < 5.0, wall  # ~0.15 s measured; the bound leaves room for a loaded CI machine


def test_memory_monitor_imports_without_the_resource_module():
    # Windows has no `resource`: importing qgl.callbacks must not need it (psutil, imported first, uses
    # it on Linux; hidden after that, any `import resource` of qgl's raises ImportError).
    code = ("import sys\nimport psutil\nsys.modules['resource'] = None\n"
            "import qgl.callbacks.memory as m\nprint(m._current_rss() > 0, m._peak_rss() > 0)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True"]
