"""Host time and Python calls per matrix of the layer-wise qgalore update, on CPU, source tree by tree.

    OMP_NUM_THREADS=1 python benchmarks/host_path.py --rounds 3
    OMP_NUM_THREADS=1 python benchmarks/host_path.py --rounds 3 \\
        --base 3338d3d=/tmp/qgl-base --base 2f6246f=/tmp/qgl-main      # trees side by side
    python benchmarks/host_path.py --profile                           # + cProfile, by call count

On a GPU the layer-wise update of one matrix is a few dozen small launches, and the Python that
issues them (the hook, the projections, the 8-bit Adam, the INT8 update) can outlast the GPU work:
the step is then bound by the host (issue 20; `benchmarks/overhead.py` measures that on CUDA). This
script measures the Python side on CPU, where no GPU is needed, for two pieces:

- update: the layer-wise update of one projected matrix (QGaLoreAdamW with the `qgalore` method's
  settings, i.e. QGaLoreCallback's defaults: INT8 QLinear weight, INT4 projection, 8-bit Adam, the
  finite check), entered as the backward hook enters it (grad mode off), on a non-refresh step;
- fwd+bwd+update: forward and backward of one QLinear layer (input gradient too, as for a layer
  inside a model), whose post-accumulate-grad hook runs that update.

The default shape is small (256 x 128, rank 32, 8 tokens) so that the math is small and Python and
dispatch overhead is most of what is measured. Not all: on CPU every op runs before the next is
issued, and the 8-bit Adam runs its plain-torch reference (CUDA runs bitsandbytes' kernel), whose
`torch.bucketize` of the 4,096 low-rank elements (the fewest that get 8-bit moments) is about 40% of
the update's time here. Two numbers per piece: host microseconds per call (the median over
`--rounds`) and function calls per call, Python and C functions called from Python, counted with
`sys.setprofile` (cProfile's count). On a shared 2-core machine the times are noisy (up to 2x between
runs); the call counts are exact and repeatable, so compare trees by them first.

Every tree (this one, and each `--base [LABEL=]PATH`, e.g. a `git archive` of an older commit) is
measured in its own subprocess with `PYTHONPATH=PATH` (its `qgl`, `qgl.callbacks`, `qgl.kernels`
taken from that tree, whatever is pip-installed), the trees interleaved round by round so that a
change in the machine's load hits them alike. A tree lacking an API this script uses gets the error
in its row instead of numbers.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import importlib.abc
import importlib.util
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
MARK = "HOST_PATH_ROW "  # the child's result line on stdout
COLUMNS = ("tree", "us/update", "calls/update", "us fwd+bwd+update", "calls fwd+bwd+update")
PIECES = ("update", "step")  # "step": forward + backward + the hook's update


# ----------------------------------------------------------------------------- what is measured


def _optimizer(m: int, n: int, rank: int, method: str) -> tuple[nn.Module, Any]:
    """A one-matrix model ({"mlp": (m, n) linear}, bf16) under layer-wise QGaLoreAdamW, as the method's
    callback builds it (QGaLoreAdamW's defaults are QGaLoreCallback's; check_finite on)."""
    from qgl.nn import QLinear
    from qgl.optim import QGaLoreAdamW, make_param_groups

    torch.manual_seed(0)
    model = nn.ModuleDict({"mlp": nn.Linear(n, m, bias=False)})
    galore: dict[str, Any] = {}
    if method == "qgalore":
        model["mlp"] = QLinear.from_linear(model["mlp"])
    else:
        from qgl.callbacks.methods import GALORE

        galore = {k: v for k, v in GALORE.items() if k != "quantize_weights"}
    model = model.bfloat16()
    # A gap no run reaches: every timed call is a non-refresh step (the first call's SVD is untimed).
    groups = make_param_groups(model, rank=rank, update_proj_gap=10**6, **galore)
    return model, QGaLoreAdamW(groups, lr=1e-5, layerwise=True)


def _update_entry(opt: Any) -> tuple[str, Callable[[Any], None]]:
    """The driver's per-matrix entry: `update_from_grad` (since c0a22aa), else the hook itself."""
    for name in ("update_from_grad", "_on_grad"):
        fn = getattr(opt.layerwise, name, None)
        if fn is not None:
            return name, fn
    raise AttributeError("the optimizer's layerwise driver has neither update_from_grad nor _on_grad")


def build(piece: str, m: int, n: int, rank: int, tokens: int, method: str = "qgalore"
          ) -> tuple[Callable[[], None], bool, str]:
    """(call, grad mode to run it in, entry name) for `piece`: "update" (one layer-wise update from a
    bf16 (m, n) gradient) or "step" (QLinear forward + backward on a bf16 (tokens, n) input needing its
    gradient; the backward hook updates). The first call (the SVD) is left to the caller's warm-up."""
    model, opt = _optimizer(m, n, rank, method)
    layer = model["mlp"]
    p = layer.weight
    if piece == "update":
        name, entry = _update_entry(opt)
        grad = torch.randn(m, n, dtype=torch.bfloat16) * 1e-3

        def update() -> None:
            p.grad = grad
            entry(p)  # frees p.grad; its finite flag would be read by step(), never called here

        return update, False, name  # grad mode off, as inside autograd's backward
    x = torch.randn(tokens, n, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(tokens, m, dtype=torch.bfloat16)

    def step() -> None:
        layer(x).backward(dy)
        x.grad = None

    return step, True, "hook"


def time_us(fn: Callable[[], None], calls: int, grad: bool) -> float:
    """Host microseconds per call of `fn` over `calls` calls (after 3 untimed ones)."""
    with torch.set_grad_enabled(grad):
        for _ in range(3):
            fn()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return 1e6 * (time.perf_counter() - t0) / calls


def count_calls(fn: Callable[[], None], calls: int, grad: bool) -> float:
    """Function calls per call of `fn` (itself included): Python and C functions called from Python,
    cProfile's count, by `sys.setprofile` (this thread: autograd runs CPU backward on the caller's)."""
    here = sys._getframe()
    count = 0

    def hook(frame: Any, event: str, arg: Any) -> None:
        nonlocal count
        # Calls made from this frame (the loop, setprofile(None)) are the counter's, not fn's.
        if event in ("call", "c_call") and frame is not here:
            count += 1

    with torch.set_grad_enabled(grad):
        fn()
        sys.setprofile(hook)
        try:
            for _ in range(calls):
                fn()
        finally:
            sys.setprofile(None)
    return count / calls


def profile_text(fn: Callable[[], None], calls: int, grad: bool, top: int = 30) -> str:
    """cProfile listing of `calls` calls of `fn`, the `top` functions by call count."""
    with torch.set_grad_enabled(grad):
        fn()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            fn()
        prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("calls", "tottime").print_stats(top)
    return out.getvalue()


def measure(shape: tuple[int, int] = (256, 128), rank: int = 32, tokens: int = 8, calls: int = 100,
            rounds: int = 1, method: str = "qgalore", profile: bool = False) -> dict[str, Any]:
    """One row for the `qgl` imported here: `us_<piece>` (median over `rounds`), `calls_<piece>`,
    `entry`, and `error_<piece>` ("Type: message") instead of numbers where a piece fails."""
    import qgl

    m, n = shape
    row: dict[str, Any] = {"qgl": str(Path(qgl.__file__).resolve().parent.parent), "torch": torch.__version__,
                           "threads": torch.get_num_threads()}
    for piece in PIECES:
        try:
            fn, grad, row[f"entry_{piece}"] = build(piece, m, n, rank, tokens, method)
            row[f"us_{piece}"] = statistics.median(time_us(fn, calls, grad) for _ in range(rounds))
            row[f"calls_{piece}"] = count_calls(fn, min(calls, 10), grad)
            row.setdefault("kernels", str(Path(sys.modules["qgl.kernels"].__file__).parent))
            if profile and piece == "update":
                row["profile"] = profile_text(fn, calls, grad)
        except Exception as err:  # an older tree without an API used here: say so in its row
            row[f"error_{piece}"] = f"{type(err).__name__}: {err}".splitlines()[0][:300]
    return row


# ----------------------------------------------------------------------------- one tree, one process


class _TreeFinder(importlib.abc.MetaPathFinder):
    """Imports qgl.callbacks, qgl.kernels and qgl.recipes from the tree: at its top level (pip's
    package-dir mapping, which an editable install of another checkout would otherwise answer) or
    under qgl/ (older trees' symlinks)."""

    def __init__(self, tree: Path) -> None:
        self.dirs = {}
        for name in ("callbacks", "kernels", "recipes"):
            for d in (tree / "qgl" / name, tree / name):
                if (d / "__init__.py").is_file():
                    self.dirs[f"qgl.{name}"] = d
                    break

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        d = self.dirs.get(fullname)
        if d is None:
            return None
        return importlib.util.spec_from_file_location(fullname, d / "__init__.py",
                                                      submodule_search_locations=[str(d)])


def _child(spec: dict[str, Any]) -> None:
    tree = Path(spec["tree"]).resolve()
    sys.meta_path.insert(0, _TreeFinder(tree))
    torch.set_num_threads(spec["threads"])
    import qgl

    if not Path(qgl.__file__).resolve().is_relative_to(tree):
        row = {"error": f"qgl imported from {Path(qgl.__file__).parent}, not from {tree}"}
    else:
        row = measure(tuple(spec["shape"]), spec["rank"], spec["tokens"], spec["calls"], 1, spec["method"],
                      spec["profile"])
    print(MARK + json.dumps(row), flush=True)


def run_tree(tree: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """Measure `tree` in a subprocess (`PYTHONPATH=tree`); its row, or {"error": ...} when it failed."""
    if not (tree / "qgl" / "__init__.py").is_file():
        return {"error": f"{tree} holds no qgl/__init__.py"}
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps({**spec, "tree": str(tree)})],
                          env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {proc.returncode}: {tail[:300]}"}
    return json.loads(lines[-1][len(MARK):])


def merge(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from a tree's rounds: median times (and each round's, `us_<piece>_rounds`), the call
    counts (exact: equal across rounds, else the median), the first round's other fields."""
    row = dict(rounds[0])
    for piece in PIECES:
        for key in (f"us_{piece}", f"calls_{piece}"):
            values = [r[key] for r in rounds if key in r]
            if values:
                row[key] = statistics.median(values)
                if key.startswith("us_"):
                    row[f"{key}_rounds"] = values  # the spread, for the JSON
    row["rounds"] = len(rounds)
    return row


# ----------------------------------------------------------------------------- the table


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table (`COLUMNS`) of rows with a `tree` label; errors listed under it."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    notes = []
    for row in rows:
        cells = [row["tree"]]
        if "error" in row:  # the tree's process failed: no piece was measured
            notes.append(f"- {row['tree']}: {row['error']}")
        for piece, what in zip(PIECES, ("update", "fwd+bwd+update"), strict=True):
            error = row.get(f"error_{piece}")
            if error:
                notes.append(f"- {row['tree']}, {what}: {error}")
            if error or "error" in row:
                cells += ["error", "error"]
            else:
                cells += [f"{row[f'us_{piece}']:,.0f}", f"{row[f'calls_{piece}']:,.1f}".removesuffix(".0")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + ([""] + notes if notes else []))


def _tree_arg(text: str) -> tuple[str, Path]:
    label, sep, path = text.partition("=")
    if not sep:
        label, path = Path(text).name or text, text
    return label, Path(path).expanduser().resolve()


def _this_tree_label() -> str:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    head, branch = git("rev-parse", "--short", "HEAD"), git("rev-parse", "--abbrev-ref", "HEAD")
    if not head:
        return "this tree"
    dirty = "+changes" if git("status", "--porcelain", "--untracked-files=no") else ""
    return f"{branch} ({head}{dirty})" if branch and branch != "HEAD" else f"{head}{dirty}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", action="append", default=[], metavar="[LABEL=]PATH",
                    help="another source tree of qgl to measure beside this one (repeatable)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per tree; the table has the median")
    ap.add_argument("--calls", type=int, default=100, help="timed calls per round")
    ap.add_argument("--shape", default="256x128", help="the matrix, out x in (default 256x128)")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=8, help="rows of the layer's input")
    ap.add_argument("--method", choices=("qgalore", "galore"), default="qgalore")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each tree's process")
    ap.add_argument("--profile", action="store_true", help="cProfile of the update, top functions by calls")
    ap.add_argument("--json", type=Path, help="write the rows and the settings here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(json.loads(args.child))
        return 0
    try:
        m, n = (int(v) for v in args.shape.lower().split("x"))
    except ValueError:
        ap.error(f"--shape must be OUTxIN, e.g. 256x128; got {args.shape!r}")
    if args.rounds < 1 or args.calls < 1:
        ap.error("--rounds and --calls must be >= 1")
    trees = [*(_tree_arg(b) for b in args.base), (_this_tree_label(), ROOT)]
    spec = dict(shape=[m, n], rank=args.rank, tokens=args.tokens, calls=args.calls, method=args.method,
                threads=args.threads, profile=False)
    results: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in trees}
    for r in range(args.rounds):  # interleaved: load drifts hit every tree alike
        for label, path in trees:
            print(f"round {r + 1}/{args.rounds}: {label}", file=sys.stderr, flush=True)
            results[label].append(run_tree(path, {**spec, "profile": args.profile and r == 0}))
    rows = [{**merge(results[label]), "tree": label, "path": str(path)} for label, path in trees]
    print(f"CPU host path, {datetime.date.today()}, torch {torch.__version__}, {args.threads} thread(s); "
          f"{args.method} layer-wise, matrix {m} x {n}, rank {args.rank}, {args.tokens} tokens; "
          f"{args.calls} calls x {args.rounds} rounds, median\n")
    print(table(rows))
    for row in rows:
        if "profile" in row:
            print(f"\ncProfile of {args.calls} updates, {row['tree']}, by call count:\n{row.pop('profile')}")
    if args.json:
        settings = {k: v for k, v in spec.items() if k != "profile"} | {"rounds": args.rounds}
        args.json.write_text(json.dumps({"settings": settings, "date": str(datetime.date.today()),
                                         "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
