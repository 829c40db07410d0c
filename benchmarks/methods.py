"""Methods side by side: every training method of a recipe for N steps, one table.

    python benchmarks/methods.py pretrain/llama_60m data.source=/data/c4 --steps 200            # GPU
    python benchmarks/methods.py --device cpu --steps 3 data.batch_size=2                     # smoke test
    python benchmarks/methods.py --methods full,qgalore,q-galore-torch trainer.precision=bf16-mixed
    python benchmarks/methods.py --methods galore,qgalore,qgalore.q2 --set qgalore.q2:qgalore.queue_size=2

Each method is one `qgl.lightning.run.run` of the same recipe (same model init, data order, seed,
LR schedule, logging and `MemoryMonitor` accounting) with `method=<m>`, `trainer.max_steps=N`, no
checkpoints, a CSV logger and validation once at the end; key=value overrides apply to all, `--set
METHOD:key=value` to the row named METHOD only (after the benchmark's own overrides).

A row is named by its method or by a labelled variant of it, `BASE.LABEL` (LABEL of letters, digits,
'_' and '-'): `qgalore.q2` runs method qgalore as a row of its own (its own log, row and table line),
so that two configurations of one method compare in one run, as in the last example above. `--set`
names a row exactly: `qgalore:...` sets the plain qgalore row only, `qgalore.q2:...` that variant only.
The public packages `galore-torch` (GaLoreAdamW8bit) and `q-galore-torch` (QGaLoreAdamW8bit)
run, when installed (`pip install qgl[bench]`), as method "full" with their optimizer in place of
the module's (`benchmarks/_public_adapters.py`: bitsandbytes 0.50 argument adapters, no change of
their math), layer-wise when the recipe's `qgalore.layerwise` is (as qgl's galore/qgalore), with the
recipe's rank, gap and scale. q-galore-torch trains INT8 weights: its wheel has the optimizer but
not its INT8-weight linear, which `benchmarks/_public_int8.py` re-implements from the published
`QGaLoreLinear` (uint8 weights in groups of `qgalore.group_size`, stochastic rounding);
`--public-float-weights` runs it on the model's float weights instead (galore-torch always is).

Each row runs in a process of its own (`--isolate`, the default on CUDA): a row run after another in
one process measured that run's leftovers too (2026-12-02, H200: q-galore-torch peaked at 8,005 MiB
after galore-torch in the same process, 4,464 MiB first in a fresh one).

Columns: peak memory (CUDA: `max_memory_allocated`, the highest step; CPU: the process's peak RSS,
which, without `--isolate`, only grows over the runs of one process, so rows after the first are
upper bounds);
weights + optimizer states (bytes of parameters, INT8 weights with their scales and zeros, moments
and projections, comparable on any device); training tokens/s; mean training loss of the last 10
steps; validation loss and perplexity at the end; SVDs run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import math
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

# Only this folder, for `_public_adapters`: the repository root would make our top-level kernels/
# shadow the `kernels` package that bitsandbytes tries to import.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cli import LABEL_RULE, choice_list, variant_base  # noqa: E402
from _public_adapters import PACKAGES, PublicGaLoreCallback, available  # noqa: E402

from qgl._atomic import atomic_open  # noqa: E402
from qgl.callbacks.methods import METHODS  # noqa: E402
from qgl.config import load_recipe  # noqa: E402

ALL = (*METHODS, *PACKAGES)
_MIB = 2**20


def base_method(name: str) -> str:
    """The method a row runs: `name` itself, or BASE of a labelled variant `BASE.LABEL` (`qgalore.q2`:
    qgalore). Raises ValueError for a name that is neither."""
    base = variant_base(name, ALL)
    if base is None:
        raise ValueError(f"unknown method {name!r}: expected one of {','.join(ALL)} or a labelled variant "
                         f"BASE.LABEL of one of them, {LABEL_RULE}")
    return base


def _notes(method: str, cfg: Any, device: str, public_int8: bool = True) -> str:
    q, lo = cfg.qgalore, cfg.lora
    layerwise = "layer-wise" if q.layerwise else "not layer-wise"
    also = f"; also trained: {', '.join(lo.trainable)}" if lo.trainable else ""
    galore = f"rank {q.rank}, gap {q.update_proj_gap}, scale {q.scale}, {layerwise}"
    refresh = f"queue {q.queue_size}, cos threshold {q.cos_threshold:g}, gamma {q.gamma_proj:g}"
    adaptive = f"adaptive gap ({refresh})" if q.adaptive else "fixed gap"
    weights = (f"on its INT8-weight simulation (uint8 weights, group {q.group_size}, stochastic rounding, "
               "re-implemented in benchmarks/_public_int8.py from its published QGaLoreLinear)" if public_int8
               else "on float weights (--public-float-weights; its INT8 linear is not in the wheel)")
    return {
        "full": "torch AdamW, fp32 master weights",
        "adamw8bit": "bitsandbytes AdamW8bit",
        "lora": f"r {lo.r}, alpha {lo.alpha:g}, bf16 base frozen, torch AdamW on the adapters{also}",
        "qlora": f"r {lo.r}, alpha {lo.alpha:g}, NF4 base (bnb Linear4bit), "
                 + ("paged AdamW8bit (its paged states, unified memory, are not in max_memory_allocated)"
                    if device == "cuda" else "AdamW8bit (no paging off CUDA)"),
        "galore": f"qgl: float weights, float projections, fixed gap, 8-bit moments; {galore}",
        "qgalore": f"qgl: INT8 weights, INT4 projections, {adaptive}, 8-bit moments; {galore}",
        "galore-torch": f"galore-torch 1.0 GaLoreAdamW8bit via the bnb-0.50 adapter; {galore}",
        "q-galore-torch": f"q-galore-torch 1.0 QGaLoreAdamW8bit via the bnb-0.50 adapter, {weights}; "
                          f"adaptive gap ({refresh}); {galore}",
    }[method]


def _overrides(method: str, steps: int, device: str, work: Path) -> list[str]:
    """The benchmark's overrides for the row `method` (a variant's name included)."""
    base = base_method(method)
    return [f"method={'full' if base in PACKAGES else base}", f"trainer.max_steps={steps}",
            f"trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}", "trainer.devices=1",
            "trainer.val_check_interval=null", "logger.wandb=false", f"logger.save_dir={work / 'runs'}",
            f"logger.name={method}", f"checkpoint.dir={work / 'checkpoints' / method}",
            "checkpoint.every_n_steps=null", "checkpoint.save_last=false"]


def run_method(recipe: str | None, overrides: list[str], method: str, steps: int, device: str, work: Path,
               log: Path | None = None, extra_overrides: Sequence[str] = (),
               callbacks: Sequence[Callback] = (), public_int8: bool = True) -> dict[str, Any]:
    """One row: train `method` (a method or a labelled variant `BASE.LABEL` of one, which runs BASE)
    for `steps` steps and return its numbers (or why it did not run).

    The run's output goes to `log` (None: left on stdout/stderr, the traceback of a failure too);
    `extra_overrides` apply after this benchmark's own (e.g. a validation interval); `callbacks`
    join the run's (after the public packages' callback, so their `setup` sees INT8 weights);
    `public_int8=False`: q-galore-torch on float weights.
    """
    from qgl.lightning.run import run

    base = base_method(method)
    cfg = load_recipe(recipe, [*overrides, *_overrides(method, steps, device, work), *extra_overrides])
    int8 = public_int8 and base == "q-galore-torch"
    notes = "; ".join([_notes(base, cfg, device, int8), *extra_overrides])
    row: dict[str, Any] = {"method": method, "notes": notes}
    if base in PACKAGES and not available(base):
        return {**row, "error": f"not installed (pip install {base}==1.0)"}
    extra = ([PublicGaLoreCallback(base, dataclasses.asdict(cfg.qgalore), int8_weights=int8)]
             if base in PACKAGES else [])
    try:
        with contextlib.ExitStack() as stack:
            if log is not None:
                f = stack.enter_context(open(log, "w"))
                stack.enter_context(contextlib.redirect_stdout(f))
                stack.enter_context(contextlib.redirect_stderr(f))
            summary = run(cfg, [*extra, *callbacks])
    except Exception as err:  # one method failing must not hide the others' numbers
        with (open(log, "a") if log is not None else contextlib.nullcontext(sys.stderr)) as f:
            traceback.print_exc(file=f)
        first = str(err).splitlines()[0] if str(err) else ""
        where = f" (log: {log})" if log is not None else ""
        return {**row, "error": f"{type(err).__name__}: {first}{where}"}
    finally:
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    parts = summary["memory_parts"]
    svds = summary["svd_total"]
    states = sum(parts.get(k, 0) for k in ("int8_weights", "params", "optimizer_moments", "projections"))
    if extra:
        svds = extra[0].optimizer.svd_count()
        # MemoryMonitor counts the uint8 codes (parameters) but not their scales and zeros (attributes).
        states += extra[0].optimizer.state_nbytes()["int8_scales_zeros"]
    return {**row, "steps": summary["steps"], "peak_mib": (summary["peak_memory_bytes"] or 0) / _MIB,
            "memory_kind": summary["memory_kind"], "states_mib": states / _MIB,
            "tokens_per_s": summary["tokens_per_sec"],
            "tokens_per_s_steady": summary.get("tokens_per_sec_after_first_step"),
            "tokens_per_s_second_half": summary.get("tokens_per_sec_second_half"),
            "tokens_per_s_median_step": summary.get("tokens_per_sec_median_step"),
            "step_seconds": summary.get("step_seconds"),
            "train_loss": summary["train_loss"],
            "val_loss": summary["val_loss"], "val_ppl": summary["val_ppl"], "svds": svds or 0,
            "svd_seconds": None if extra else summary.get("svd_seconds"),
            "train_loss_first": summary["train_loss_first"], "wall_s": summary["wall_seconds"]}


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as one Markdown table."""
    lines = ["| method | peak MiB | weights + states MiB | tokens/s | tokens/s after step 1 | train loss "
             "| val loss | val ppl | SVDs | notes |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | - | - | - | - | - | - | - | - | did not run: {r['error']}; "
                         f"{r['notes']} |")
            continue
        kind = "" if r["memory_kind"] == "cuda" else " (RSS)"
        lines.append(f"| {r['method']} | {r['peak_mib']:,.1f}{kind} | {r['states_mib']:,.2f} | "
                     f"{_fmt(r['tokens_per_s'], ',.0f')} | {_fmt(r.get('tokens_per_s_steady'), ',.0f')} | "
                     f"{_fmt(r['train_loss'], '.4f')} | "
                     f"{_fmt(r['val_loss'], '.4f')} | {_fmt(r['val_ppl'], ',.2f')} | {r['svds']} | "
                     f"{r['notes']} |")
    return "\n".join(lines)


def header(recipe: str | None, overrides: list[str], steps: int, device: str) -> str:
    import bitsandbytes
    import lightning

    cfg = load_recipe(recipe, overrides)
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    memory = ("peak = torch.cuda.max_memory_allocated of the highest step" if device == "cuda" else
              "peak = process peak RSS, cumulative over the runs of this process (upper bounds after the "
              "first row): a smoke test, not a measurement")
    return (f"{where}, torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}, lightning "
            f"{lightning.__version__}, {datetime.date.today()}; recipe {recipe or 'tiny'} "
            f"{' '.join(overrides)}; model {cfg.model.hf_path or cfg.model.name}, batch "
            f"{cfg.data.batch_size} x {cfg.data.block_size} tokens x {cfg.trainer.accumulate_grad_batches} "
            f"accumulated, precision {cfg.trainer.precision} (the recipe's; a method's own overrides, listed "
            f"last, replace it), {steps} steps, seed {cfg.seed}; {memory}")


def per_method_override(text: str) -> tuple[str, str]:
    """`--set METHOD:key=value` -> (METHOD, "key=value"); METHOD a method or a labelled variant
    `BASE.LABEL` of one (whether it is in --methods is checked once all arguments are parsed)."""
    method, sep, override = text.partition(":")
    if not sep or "=" not in override or variant_base(method, ALL) is None:
        raise argparse.ArgumentTypeError(f"--set {text!r}: expected METHOD:key=value with METHOD one of "
                                         f"{','.join(ALL)}, or a labelled variant BASE.LABEL of one of them "
                                         f"({LABEL_RULE}, e.g. qgalore.q2)")
    return method, override


_methods = choice_list(ALL, "methods", variants=True)
METHODS_HELP = ("comma-separated rows to run, each a method or a labelled variant BASE.LABEL of one (e.g. "
                "qgalore.q2: method qgalore in a row of its own, for its own --set), of")
SET_HELP = ("an override for one row (repeatable), e.g. qgalore:trainer.precision=bf16-true; METHOD names "
            "the row exactly: qgalore:... sets the plain qgalore row only, qgalore.q2:... the variant "
            "qgalore.q2 only")


def _run_in_child(ns: argparse.Namespace, method: str, extra: Sequence[str], work: Path) -> dict[str, Any]:
    """One row from a fresh `python methods.py ... --methods METHOD` process (its row comes back as
    JSON through a file); a child that dies without one (a crash, the OOM killer) gives an error row."""
    row_json = work / f"{method}.row.json"
    row_json.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), *ns.args, "--methods", method,
           "--steps", str(ns.steps), "--device", ns.device, "--out", str(work), "--no-isolate",
           "--row-json", str(row_json), *(f"--set={method}:{o}" for o in extra)]
    cmd += ["--public-float-weights"] if ns.public_float_weights else []
    log = work / f"{method}.log"
    with contextlib.ExitStack() as stack:
        out = None if ns.verbose else stack.enter_context(open(log, "w"))
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT if out else None).returncode
    if row_json.is_file():
        row = json.loads(row_json.read_text())
        row_json.unlink()
        return row
    where = "" if ns.verbose else f" (log: {log})"
    return {"method": method, "notes": "; ".join(extra),
            "error": f"its process exited with code {code} before reporting a row{where}"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("args", nargs="*", metavar="RECIPE|key=value",
                    help="a recipe (path or bundled name; default tiny) first, then overrides for every run")
    ap.add_argument("--methods", default=",".join(ALL), type=_methods,
                    help=f"{METHODS_HELP} {','.join(ALL)} (default: all of them)")
    ap.add_argument("--steps", type=int, default=50, help="optimizer steps per method")
    ap.add_argument("--device", choices=("cuda", "cpu"),
                    default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None, help="folder for the run logs and results.json "
                    "(default: a temporary folder)")
    ap.add_argument("--verbose", action="store_true", help="show each run's output instead of logging it")
    ap.add_argument("--public-float-weights", action="store_true",
                    help="q-galore-torch on the model's float weights, not on its INT8-weight simulation")
    ap.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                    help="run each method in a fresh Python process (default: on CUDA), so that no row "
                    "measures memory a previous row left behind")
    ap.add_argument("--row-json", type=Path, default=None, help=argparse.SUPPRESS)  # --isolate's child
    ap.add_argument("--set", dest="per_method", type=per_method_override, action="append", default=[],
                    metavar="METHOD:key=value", help=SET_HELP)
    ns = ap.parse_args(argv)
    per_method: dict[str, list[str]] = {}
    for method, override in ns.per_method:
        if method not in ns.methods:
            ap.error(f"--set {method}:{override}: {method} is not among --methods (--set names a row "
                     "exactly, a labelled variant's too)")
        per_method.setdefault(method, []).append(override)
    recipe = ns.args[0] if ns.args and "=" not in ns.args[0] else None
    overrides = ns.args[1:] if recipe is not None else ns.args
    if ns.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here (use --device cpu for a smoke test)")
    work = ns.out or Path(tempfile.mkdtemp(prefix="qgl_methods_"))
    work.mkdir(parents=True, exist_ok=True)
    if ns.row_json is not None:  # a child of --isolate: one method, its row to a file, no table
        if len(ns.methods) != 1:
            ap.error("--row-json takes exactly one method")
        (method,) = ns.methods  # its output goes where the parent sends it (the method's log)
        row = run_method(recipe, overrides, method, ns.steps, ns.device, work.resolve(), None,
                         extra_overrides=per_method.get(method, ()), public_int8=not ns.public_float_weights)
        with atomic_open(ns.row_json) as f:
            f.write(json.dumps(row).encode())
        return 0
    isolate = ns.device == "cuda" if ns.isolate is None else ns.isolate
    rows = []
    for method in ns.methods:
        print(f"[methods] {method} ...", file=sys.stderr, flush=True)
        if isolate:
            rows.append(_run_in_child(ns, method, per_method.get(method, ()), work.resolve()))
        else:
            log = None if ns.verbose else work.resolve() / f"{method}.log"
            rows.append(run_method(recipe, overrides, method, ns.steps, ns.device, work.resolve(), log,
                                   extra_overrides=per_method.get(method, ()),
                                   public_int8=not ns.public_float_weights))
        # After every row: a run cut short (a time limit) keeps the rows it finished.
        with atomic_open(work / "results.json") as f:
            f.write(json.dumps(rows, indent=1).encode())
        print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    print()
    print(header(recipe, overrides, ns.steps, ns.device)
          + "".join(f"; {m}: {' '.join(o)}" for m, o in per_method.items()))
    print()
    print(table(rows))
    print(f"\nlogs and results.json: {work}")
    failed = [r["method"] for r in rows if "error" in r and not r["error"].startswith("not installed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
