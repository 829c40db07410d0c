"""Quality run: each method trained for N steps on the same data, validation perplexity side by side.

    python benchmarks/quality.py --recipe pretrain/llama_60m --steps 1500 --time-limit 480 \\
        --methods full,adamw8bit,lora,galore,qgalore,galore-torch,q-galore-torch \\
        data.source=embedded data.batch_size=16 trainer.accumulate_grad_batches=1 data.val_fraction=0.02 \\
        data.num_workers=1 optim.warmup_steps=150 --set full:optim.lr=1e-3 --set adamw8bit:optim.lr=1e-3 \\
        --set lora:optim.lr=1e-3 --set lora:lora.r=128 --set 'lora:lora.trainable=[embed,norm,lm_head]'
    python benchmarks/quality.py --device cpu --steps 10 --methods full,qgalore --out /tmp/q    # smoke test
    python benchmarks/quality.py --methods galore,qgalore,qgalore.q2 --set qgalore.q2:qgalore.queue_size=2
    python benchmarks/quality.py --summarize benchmarks/results/quality_h100_2026-11-24     # rebuild report

Every method is one `benchmarks/methods.py` run (`qgl.lightning.run.run` of the recipe with
`method=<m>`: same initial weights, batch order, seed and LR schedule; the public `galore-torch` /
`q-galore-torch` optimizers too, when installed) in its own process, `--parallel` at a time (default:
all at once: a 60M model fills neither an H100's memory nor its compute), validating every
`--val-every` steps and at the end. `key=value` overrides apply to every method, `--set
METHOD:key=value` to one (after the benchmark's own; its row's notes list them): above, the full-rank
baselines take GaLore's AdamW learning rate for 60M (the recipe's 1.5e-2 is Q-GaLore's), and LoRA
GaLore's rank with trainable embeddings, norms and head as in the GaLore/ReLoRA pre-training baselines.

A method may run more than once as labelled variants `BASE.LABEL` (LABEL of letters, digits, '_' and
'-'), each a method of its own here (process, curve, row, log, table line, plot line) that runs BASE:
the second example compares Q-GaLore's default refresh queue with a queue of 2 in one run. `--set`
names a method exactly: `qgalore:...` sets the plain qgalore only, `qgalore.q2:...` that variant only.

Output, in `--out` (default `benchmarks/results/quality_<gpu|cpu>_<date>/`): `run.json` (the command
and set-up), per method `curves/<m>.csv` (training loss every `--log-every` steps and every
validation, written as it trains) and `rows/<m>.json` (its numbers), `logs/<m>.log`, and the report
`summary.md`, `results.json`, `loss_curves.png`, rebuilt whenever a method ends and at the end. The
report only reads those files, so a run that was cut short still has one (`--summarize DIR` rebuilds
it); `--time-limit S` makes the methods stop training in time to validate and report within S seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

T0 = time.time()  # a script's --time-limit counts from here, before the slow imports
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # this folder only (see methods.py: the root's kernels/ would shadow one)
if importlib.util.find_spec("qgl") is None:  # not installed: the checkout's, behind everything else
    sys.path.append(str(HERE.parent))

import torch  # noqa: E402
from _quality_report import summarize  # noqa: E402
from methods import (  # noqa: E402
    ALL,
    METHODS_HELP,
    PACKAGES,
    SET_HELP,
    _methods,
    base_method,
    per_method_override,
)

from qgl.config import RecipeError, load_recipe  # noqa: E402

DEFAULT_METHODS = "full,adamw8bit,lora,galore,qgalore"
RESERVE_S = 60.0  # of --time-limit, kept for the last validation and the report


# ---------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides for every method")
    ap.add_argument("--recipe", default=None, help="recipe path or bundled name (default: tiny)")
    ap.add_argument("--methods", default=_methods(DEFAULT_METHODS), type=_methods,
                    help=f"{METHODS_HELP} {','.join(ALL)} (default {DEFAULT_METHODS})")
    ap.add_argument("--steps", type=int, default=1500, help="optimizer steps per method")
    ap.add_argument("--parallel", type=int, default=None, help="methods running at once (default: all)")
    ap.add_argument("--set", dest="per_method", type=per_method_override, action="append", default=[],
                    metavar="METHOD:key=value", help=SET_HELP)
    ap.add_argument("--val-every", type=int, default=None,
                    help="steps between validations (default: steps/10)")
    ap.add_argument("--log-every", type=int, default=10, help="steps averaged in each training-curve point")
    ap.add_argument("--time-limit", type=float, default=None, metavar="S",
                    help=f"seconds for the whole run: training stops at S - {RESERVE_S:.0f} (at most a "
                         "quarter of S), the report is written by S")
    ap.add_argument("--device", choices=("cuda", "cpu"),
                    default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results/"
                    "quality_<device>_<date>)")
    ap.add_argument("--summarize", type=Path, default=None, metavar="DIR",
                    help="only rebuild DIR's report from its saved curves and rows")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one method, in a child process
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    return ap


def device_tag(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; 'cpu' for a CPU; else the name as a slug."""
    if name.lower().startswith("cpu"):
        return "cpu"
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", name.replace("NVIDIA", ""))
    return (m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")).lower()


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# ---------------------------------------------------------------- worker (one method, child process)
def worker(ns: argparse.Namespace) -> int:
    """Train ns.worker (a method or a labelled variant) and write rows/<method>.json (curves/<method>.csv
    is written as it trains); its --set overrides apply after the benchmark's own."""
    from _curves import CurveWriter
    from methods import run_method

    if ns.threads:
        torch.set_num_threads(ns.threads)
    method, out = ns.worker, ns.out.resolve()
    curve = CurveWriter(out / "curves" / f"{method}.csv", every=ns.log_every, deadline=ns.deadline)
    own = [o for m, o in ns.per_method if m == method]
    row = run_method(ns.recipe, ns.overrides, method, ns.steps, ns.device, out, log=None,
                     extra_overrides=[f"trainer.val_check_interval={ns.val_every}", *own], callbacks=[curve])
    row.update(requested_steps=ns.steps, stopped_at=curve.stopped_at)
    for empty in (out / "checkpoints" / method, out / "checkpoints"):  # nothing is checkpointed
        with contextlib.suppress(OSError):
            empty.rmdir()
    (out / "rows").mkdir(exist_ok=True)
    tmp = out / "rows" / f".{method}.json.tmp"
    tmp.write_text(json.dumps(row, indent=1))
    tmp.replace(out / "rows" / f"{method}.json")
    return 1 if "error" in row else 0


# ---------------------------------------------------------------- parent
def _meta(ns: argparse.Namespace, argv: list[str], per_method: dict[str, list[str]]) -> dict[str, Any]:
    cfg = load_recipe(ns.recipe, ns.overrides)
    script = os.path.relpath(__file__)
    script = script if not script.startswith("..") else __file__
    return {
        "command": shlex.join(["python", script, *argv]), "date": datetime.date.today().isoformat(),
        "started": datetime.datetime.now().isoformat(timespec="seconds"), "device": ns.device,
        "device_name": _device_name(ns.device), "torch": torch.__version__,
        "lightning": _version("lightning"), "bitsandbytes": _version("bitsandbytes"), "recipe": ns.recipe,
        "overrides": ns.overrides,
        "per_method": per_method, "methods": ns.methods, "steps": ns.steps, "parallel": ns.parallel,
        "time_limit": ns.time_limit, "val_every": ns.val_every, "log_every": ns.log_every,
        "config": {"model": cfg.model.hf_path or cfg.model.name, "source": cfg.data.source,
                   "batch_size": cfg.data.batch_size, "block_size": cfg.data.block_size,
                   "accumulate": cfg.trainer.accumulate_grad_batches, "precision": cfg.trainer.precision,
                   "seed": cfg.seed, "limit_val_batches": cfg.trainer.limit_val_batches,
                   "val_fraction": cfg.data.val_fraction},
    }


def _launch(ns: argparse.Namespace, method: str, per_method: list[str], deadline: float | None,
            threads: int) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--worker", method, "--out", str(ns.out), "--steps", str(ns.steps),
           "--device", ns.device, "--val-every", str(ns.val_every), "--log-every", str(ns.log_every),
           "--threads", str(threads), *(["--recipe", ns.recipe] if ns.recipe else []),
           *(["--deadline", repr(deadline)] if deadline is not None else []),
           *(f"--set={method}:{o}" for o in per_method), "--", *ns.overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(ns.out / "logs" / f"{method}.log", "w") as log:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def _stop(procs: dict[str, subprocess.Popen], grace: float = 10.0) -> None:
    """SIGTERM the children, SIGKILL those still alive after `grace` seconds."""
    for p in procs.values():
        if p.poll() is None:
            p.terminate()
    end = time.time() + grace
    for p in procs.values():
        try:
            p.wait(timeout=max(0.1, end - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _no_result(out: Path, method: str, why: str) -> None:
    """Record why `method` has no row of its own (unless it wrote one after all)."""
    path = out / "rows" / f"{method}.json"
    if not path.exists():
        path.write_text(json.dumps({"method": method, "error": why}))


class _Terminated(Exception):
    """SIGTERM reached the parent (e.g. an outer `timeout`): stop the children, write the report."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated()


def _schedule(ns: argparse.Namespace, per_method: dict[str, list[str]], start: float) -> None:
    """Run the methods, `ns.parallel` at a time, rebuilding the report as each ends; `start`: when the
    time limit started counting."""
    hard = start + ns.time_limit if ns.time_limit else None
    deadline = hard - min(RESERVE_S, 0.25 * ns.time_limit) if hard else None
    threads = max(1, (os.cpu_count() or 1) // ns.parallel)
    pending, running = list(ns.methods), {}
    last_report = start
    try:
        while pending or running:
            while pending and len(running) < ns.parallel:
                method = pending.pop(0)
                if deadline is not None and time.time() >= deadline:
                    _no_result(ns.out, method, "not started: the time limit came first")
                    continue
                running[method] = _launch(ns, method, per_method.get(method, []), deadline, threads)
                print(f"[quality] {method}: started (pid {running[method].pid})", file=sys.stderr, flush=True)
            for method, p in list(running.items()):
                if p.poll() is not None:
                    del running[method]
                    print(f"[quality] {method}: ended after {time.time() - start:.0f} s, exit code "
                          f"{p.returncode}", file=sys.stderr, flush=True)
                    _no_result(ns.out, method, f"its process ended (exit code {p.returncode}) without a "
                               f"result; see logs/{method}.log")
                    summarize(ns.out)
            if hard is not None and time.time() >= hard and running:
                print(f"[quality] time limit: stopping {', '.join(running)}", file=sys.stderr, flush=True)
                _stop(running)
                for method in running:
                    _no_result(ns.out, method, "killed at the time limit")
                break
            if time.time() - last_report >= 60 and running:
                last_report = time.time()
                print(f"[quality] {time.time() - start:.0f} s: " + ", ".join(
                    f"{m} at step {_last_step(ns.out, m)}" for m in running), file=sys.stderr, flush=True)
            time.sleep(0.5)
    except (_Terminated, KeyboardInterrupt):
        print("[quality] interrupted: stopping the methods, writing the report", file=sys.stderr, flush=True)
        _stop(running, grace=3.0)
        for method in running:
            _no_result(ns.out, method, "stopped by an interrupt")
    for method in pending:
        _no_result(ns.out, method, "not started: the run was stopped first")


def _last_step(out: Path, method: str) -> str:
    from _curves import read_curve

    train = read_curve(out / "curves" / f"{method}.csv")["train"]
    return str(train[-1][0]) if train else "-"


def main(argv: list[str] | None = None) -> int:
    start = T0 if argv is None else time.time()  # a script counts its start-up too
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = build_parser()
    ns = ap.parse_intermixed_args(argv)
    if ns.summarize is not None:
        print(summarize(ns.summarize))
        return 0
    if ns.val_every is None:
        ns.val_every = max(1, ns.steps // 10)
    if ns.worker is not None:
        return worker(ns)
    if ns.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here (use --device cpu for a smoke test)")
    bad = [m for m, _ in ns.per_method if m not in ns.methods]
    if bad:
        ap.error(f"--set for {', '.join(sorted(set(bad)))}, which is not in --methods (--set names a "
                 "method exactly, a labelled variant's too)")
    per_method: dict[str, list[str]] = {}
    for method, override in ns.per_method:
        per_method.setdefault(method, []).append(override)
    ns.parallel = max(1, min(ns.parallel or len(ns.methods), len(ns.methods)))
    try:
        for method in ns.methods:  # every recipe error now, before any process starts
            base = base_method(method)
            name = "full" if base in PACKAGES else base
            load_recipe(ns.recipe, [*ns.overrides, f"method={name}", *per_method.get(method, [])])
        meta = _meta(ns, argv, per_method)
    except RecipeError as err:
        print(f"quality: error: {err}", file=sys.stderr)
        return 2
    default = HERE / "results" / f"quality_{device_tag(meta['device_name'])}_{meta['date']}"
    ns.out = (ns.out or default).resolve()
    for sub in ("curves", "rows", "logs"):
        (ns.out / sub).mkdir(parents=True, exist_ok=True)
        for old in (ns.out / sub).glob("*"):  # a previous run into the same folder
            old.unlink()
    (ns.out / "run.json").write_text(json.dumps(meta, indent=1))
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        _schedule(ns, per_method, start)
    finally:
        signal.signal(signal.SIGTERM, previous)
    text = summarize(ns.out)
    print(text)
    print(f"report: {ns.out / 'summary.md'}, {ns.out / 'loss_curves.png'}")
    rows = json.loads((ns.out / "results.json").read_text())
    failed = [r for r in rows if r.get("partial") or "not installed" not in r.get("error", "not installed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
