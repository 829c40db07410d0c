"""Peak GPU memory of a training step: bf16 AdamW, bitsandbytes AdamW8bit, galore-torch and qgl
Q-GaLore without and with optimizer-state offload (and qgl's GaLore on the float weights), per model,
one table; qgl beside its planner.

    python benchmarks/memory.py --models 130m,1b,7b --batch 1 --seq 256 --steps 4 \\
        --methods bf16-adamw,adamw8bit,galore-torch,qgl,qgl-offload,qgl-paged,qgl-galore
    python benchmarks/memory.py --models 7b --methods qgl,qgl-offload --cap-gib 16   # 7B in 16 GB
    python benchmarks/memory.py --find-min-cap --caps 10,9,8.5,8                    # 7B offload, smallest cap
    python benchmarks/memory.py --report a.json b.json --out benchmarks/results/memory_h100_<date>.json

Every (model, method) runs in its own process (`--one`, `benchmarks/_memory_child.py`): a clean peak,
and an out-of-memory error or a `--timeout` ends one row ("OOM", "timeout"), not the table. Same batch
and sequence length for all, bf16 parameters, activation checkpointing, random tokens, `--steps`
steps; peak = `torch.cuda.max_memory_allocated` over the model's build and the steps; tokens/s over
the steps after the first `--warmup` (the first step runs every layer's SVD). The qgl rows show
`qgl plan`'s prediction (`qgl.plan.plan_memory`, same settings) and measured / predicted, and where
in the steps the peak came, to a pair of consecutive layer-wise updates (`peak in step S: between A
and B`). Rank,
learning rate and Q-GaLore settings are the recipes' (`recipes/pretrain/llama_<model>.yaml`); so is
the SVD (`--svd` replaces it, and the header says so).

`--cap-gib X` caps each process with `torch.cuda.set_per_process_memory_fraction(X GiB / total)`;
`--find-min-cap` runs 7B qgl-offload under `--caps` (largest first) until one fails, and reports the
smallest that completed the steps. Rows are merged into `benchmarks/results/memory_<gpu>_<date>.json`
(a row replaces the one of the same model, method, cap, batch and length), so a long run can be split
over several commands; each prints the table of everything in that file. `--report` merges rows files
(e.g. one `--out` per command, fetched from different machines) and prints their table, without a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # only benchmarks/ (see methods.py)

from _cli import choice_list  # noqa: E402
from _memory_child import GIB, METHODS, MODELS, ROW_PREFIX, is_oom, measure, predicted_bytes  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_CAPS = (12.0, 10.0, 9.0, 8.0, 7.0, 6.0)
Runner = Callable[[list[str], float, dict[str, str]], dict[str, Any]]


def _caps(text: str) -> list[float]:
    try:
        caps = sorted({float(t) for t in text.split(",") if t.strip()}, reverse=True)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--caps takes GiB numbers, comma-separated, got {text!r}") from None
    if not caps or min(caps) <= 0:
        raise argparse.ArgumentTypeError(f"--caps must be positive GiB numbers, got {text!r}")
    return caps


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=choice_list(MODELS, "models"), default=["130m", "1b", "7b"])
    ap.add_argument("--methods", type=choice_list(METHODS, "methods"), default=list(METHODS))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1, help="first steps left out of tokens/s (SVDs)")
    ap.add_argument("--cap-gib", type=float, default=None, help="per-process GPU memory cap, GiB")
    ap.add_argument("--find-min-cap", action="store_true", help="smallest --caps cap for 7B qgl-offload")
    ap.add_argument("--caps", type=_caps, default=list(DEFAULT_CAPS), help="GiB, for --find-min-cap")
    ap.add_argument("--svd", choices=("full", "randomized"), default=None, help="default: the recipe's")
    ap.add_argument("--timeout", type=float, default=450.0, help="seconds per process (a 'timeout' row)")
    ap.add_argument("--alloc-conf", default="expandable_segments:True",
                    help="PYTORCH_CUDA_ALLOC_CONF of the processes ('' for torch's default)")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON file of the rows (default: results/memory_<gpu>_<date>.json)")
    ap.add_argument("--report", type=Path, nargs="+", default=None, metavar="JSON",
                    help="print the table of these rows files (merged in order; into --out if any), exit")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child: one row
    ap.add_argument("--model", choices=MODELS, help=argparse.SUPPRESS)
    ap.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)
    if ns.one and (ns.model is None or ns.method is None):
        ap.error("--one needs --model and --method")
    if ns.steps <= ns.warmup or ns.warmup < 0 or ns.batch < 1 or ns.seq < 1:
        ap.error("need batch, seq >= 1 and steps > warmup >= 0")
    return ns


# ------------------------------------------------------------------ children
def child_command(model: str, method: str, ns: argparse.Namespace, cap_gib: float | None) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", "--model", model, "--method", method,
           "--batch", str(ns.batch), "--seq", str(ns.seq), "--steps", str(ns.steps),
           "--warmup", str(ns.warmup)]
    if cap_gib is not None:
        cmd += ["--cap-gib", str(cap_gib)]
    if ns.svd is not None:
        cmd += ["--svd", ns.svd]
    return cmd


def run_child(cmd: list[str], timeout: float, env: dict[str, str]) -> dict[str, Any]:
    """Run one child; its row, or a row saying why there is none: status "timeout", "OOM" (its
    stderr says so), or "error" with the last line of its stderr."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **env})
    except subprocess.TimeoutExpired as err:
        stderr = err.stderr.decode(errors="replace") if isinstance(err.stderr, bytes) else err.stderr or ""
        last = [ln for ln in stderr.splitlines() if ln.strip()][-1:]
        return {"status": "timeout", "error": f"no result within {timeout:g} s"
                + (f" (last: {last[0][:200]})" if last else "")}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(ROW_PREFIX):
            return json.loads(line[len(ROW_PREFIX):])
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()] or [f"exit status {proc.returncode}"]
    oom = any(is_oom(RuntimeError(ln)) or "OutOfMemoryError" in ln for ln in lines)
    return {"status": "OOM" if oom else "error", "error": lines[-1][:300]}


def row_for(model: str, method: str, ns: argparse.Namespace, cap_gib: float | None, runner: Runner,
            env: dict[str, str]) -> dict[str, Any]:
    """One measured row with the planner's prediction (qgl rows) and the settings that identify it."""
    print(f"[memory] {model} {method}" + (f" (cap {cap_gib:g} GiB)" if cap_gib else "") + " ...",
          file=sys.stderr, flush=True)
    row = {"model": model, "method": method, "batch": ns.batch, "seq": ns.seq, "steps": ns.steps,
           "cap_gib": cap_gib, **runner(child_command(model, method, ns, cap_gib), ns.timeout, env)}
    row["predicted_bytes"] = predicted_bytes(model, method, ns.batch, ns.seq, ns.svd)
    return row


def find_min_cap(ns: argparse.Namespace, runner: Runner, env: dict[str, str]) -> list[dict[str, Any]]:
    """7B qgl-offload under each cap of `ns.caps`, largest first, until one does not complete."""
    rows = []
    for cap in ns.caps:
        rows.append(row_for("7b", "qgl-offload", ns, cap, runner, env))
        if rows[-1]["status"] != "ok":
            break
    return rows


# ------------------------------------------------------------------ results file and table
def results_path(device: str, date: datetime.date) -> Path:
    """results/memory_<gpu>_<date>.json, <gpu> the model in the device name (h100) or its first word."""
    m = re.search(r"\b([A-Z]+\d+[A-Z]*)\b", device)
    gpu = (m.group(1) if m else device.split()[0] if device.split() else "gpu").lower()
    return RESULTS / f"memory_{gpu}_{date.isoformat()}.json"


def _key(row: dict[str, Any]) -> tuple:
    return row["model"], row["method"], row.get("cap_gib"), row["batch"], row["seq"]


def merge(path: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`path`'s rows with `rows` added (replacing those of the same key), written back; all rows."""
    old = json.loads(path.read_text()) if path.exists() else []
    new_keys = {_key(r) for r in rows}
    merged = [r for r in old if _key(r) not in new_keys] + rows
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=1) + "\n")
    return merged


def _gib(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / GIB:.2f}"


def _peak_cell(row: dict[str, Any]) -> str:
    if row["status"] == "ok":
        return _gib(row["peak_bytes"])
    return row["status"] + (f" (> {_gib(row['peak_bytes'])} at {row['at']})" if row.get("peak_bytes") else "")


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table, plus offload's cost in tokens/s and the cap search, if any."""
    lines = ["| model | method | cap GiB | peak GiB | predicted GiB | measured / predicted | reserved GiB "
             "| tokens/s | first step s | notes |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = (f"{r['peak_bytes'] / r['predicted_bytes']:.2f}" if r["status"] == "ok"
                 and r.get("predicted_bytes") else "-")
        notes = r.get("error", "") if r["status"] != "ok" else _notes(r)
        tps = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-"
        first = f"{r['first_step_s']:.1f}" if r.get("first_step_s") is not None else "-"
        cap = f"{r['cap_gib']:g}" if r.get("cap_gib") else "-"
        lines.append(f"| {r['model']} | {r['method']} | {cap} | {_peak_cell(r)} | "
                     f"{_gib(r.get('predicted_bytes'))} | {ratio} | {_gib(r.get('peak_reserved_bytes'))} | "
                     f"{tps} | {first} | {notes} |")
    return "\n".join(lines + _offload_lines(rows) + _cap_lines(rows))


def _notes(r: dict[str, Any]) -> str:
    """Rank and SVDs of a GaLore row; where in the steps the peak came (`_memory_child.locate_peak`)."""
    parts = [f"rank {r['rank']}, {r['svds']} SVDs ({r['svd_method']})"] if r.get("svds") else []
    if r.get("offloaded_bytes"):
        where = "unified" if r["method"] == "qgl-paged" else "pinned host"
        parts.append(f"{r['offloaded_bytes'] / GIB:.2f} GiB of state in {where} memory")
    if r.get("peak_at"):
        parts.append(f"peak in {r['peak_at']}")
    return "; ".join(parts)


def _offload_lines(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    # Per method the least constrained row: uncapped, else the largest cap.
    ranked = sorted(rows, key=lambda r: (r.get("cap_gib") is not None, -(r.get("cap_gib") or 0)))
    for model in dict.fromkeys(r["model"] for r in rows):
        ok: dict[str, dict[str, Any]] = {}
        for r in ranked:
            if r["model"] == model and r["status"] == "ok" and r.get("tokens_per_s"):
                ok.setdefault(r["method"], r)
        for method, how in (("qgl-offload", "offload"), ("qgl-paged", "paged offload")):
            if "qgl" in ok and method in ok:
                a, b = ok["qgl"]["tokens_per_s"], ok[method]["tokens_per_s"]
                out.append(f"- LLaMA-{model}: {how} runs at {b:,.0f} tokens/s against {a:,.0f} without "
                           f"({(1 - b / a) * 100:.0f}% lost)")
    return [""] + out if out else []


def _cap_lines(rows: list[dict[str, Any]]) -> list[str]:
    capped = [r for r in rows if (r["model"], r["method"]) == ("7b", "qgl-offload") and r.get("cap_gib")]
    tried = sorted(capped, key=lambda r: -r["cap_gib"])
    if len(tried) < 2:
        return []
    ok = [r["cap_gib"] for r in tried if r["status"] == "ok"]
    steps = tried[0]["steps"]
    best = f"{min(ok):g} GiB" if ok else "none of them"
    return ["", f"- LLaMA-7B qgl-offload, smallest cap that completed {steps} steps: {best} (tried "
            + ", ".join(f"{r['cap_gib']:g} GiB {r['status']}" for r in tried) + ")"]


def header(rows: list[dict[str, Any]], alloc_conf: str) -> str:
    """Device, versions, date and the settings common to the rows."""
    ran = [r for r in rows if "device" in r] or [{}]
    first = ran[0]
    devices = " / ".join(sorted({r.get("device", "?") for r in ran}))
    dates = " to ".join(sorted({r.get("date", "?") for r in ran}))
    svd = ", ".join(sorted({f"{r['model']}: rank {r['rank']}, {r['svd_method']} SVD" for r in ran
                            if "rank" in r}))
    versions = ", ".join(f"{k} {first.get(k, '?')}" for k in ("torch", "bitsandbytes", "galore-torch"))
    return (f"{devices}, {versions}, {dates}; batch {rows[0]['batch']} x "
            f"{rows[0]['seq']} tokens, {rows[0]['steps']} steps (tokens/s without the first "
            f"{first.get('warmup', 1)}: SVDs), bf16 parameters, activation checkpointing, random tokens; "
            f"{svd or 'no qgl row ran'}; PYTORCH_CUDA_ALLOC_CONF={alloc_conf or '(default)'}; peak = "
            "torch.cuda.max_memory_allocated over build and steps, predicted = qgl plan (recipe settings, "
            "bf16-true, checkpointing, layer-wise, same batch)")


# ------------------------------------------------------------------ main
def main(argv: Sequence[str] | None = None, runner: Runner = run_child) -> int:
    ns = parse_args(argv)
    if ns.one:
        row = measure(ns.model, ns.method, ns.batch, ns.seq, ns.steps, ns.warmup, ns.cap_gib, ns.svd)
        print(ROW_PREFIX + json.dumps(row), flush=True)
        return 0
    if ns.report is not None:
        rows: list[dict[str, Any]] = []
        for path in ns.report:
            new = json.loads(path.read_text())
            keys = {_key(r) for r in new}
            rows = [r for r in rows if _key(r) not in keys] + new
        if ns.out is not None:
            rows = merge(ns.out, rows)
        print(header(rows, ns.alloc_conf) + "\n\n" + table(rows))
        return 0
    env = {"PYTORCH_CUDA_ALLOC_CONF": ns.alloc_conf} if ns.alloc_conf else {}
    if ns.find_min_cap:
        rows = find_min_cap(ns, runner, env)
    else:
        rows = [row_for(m, meth, ns, ns.cap_gib, runner, env) for m in ns.models for meth in ns.methods]
    device = next((r["device"] for r in rows if "device" in r), None)
    if device is None:
        print("no process measured anything:\n" + table(rows), file=sys.stderr)
        return 1
    path = ns.out or results_path(device, datetime.date.today())
    merged = merge(path, rows)
    print("\n" + header(merged, ns.alloc_conf) + "\n\n" + table(merged) + f"\n\nrows: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
