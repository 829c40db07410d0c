"""The report of a quality run (`benchmarks/quality.py`), rebuilt from its folder alone.

A run folder holds `run.json` (what was run: command, device, recipe, methods), and per method
`curves/<method>.csv` (written while it trains, `_curves.CurveWriter`) and `rows/<method>.json` (its
numbers, written when it ends). `summarize(folder)` turns whatever of those exists into
`results.json` (one row per method, the format of `benchmarks/methods.py` plus the quality fields),
`summary.md` (header and table) and `loss_curves.png` (every method's training loss in one figure,
validation points marked). A method without a row (killed, still running) is reported from its
curve; one without either says so. A method is named as it was run, a labelled variant (`qgalore.q2`)
too: each is a row, a table line and a plot line of its own. With a `galore` row, the column "SVDs vs
galore" gives each row's SVD count as a fraction of that row's (of the SVDs per step where the steps
differ): how many fewer SVDs the adaptive refresh of `qgalore` and its variants ran.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from _curves import read_curve

Curve = dict[str, list[tuple[int, float]]]


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-" if value is None else str(value)
    return format(value, spec)


def _last(points: list[tuple[int, float]]) -> tuple[int, float] | tuple[None, None]:
    return points[-1] if points else (None, None)


def common_val_step(curves: dict[str, Curve]) -> int | None:
    """The last step at which every method with validation points was validated (None: none)."""
    steps = [{s for s, _ in c["val"]} for c in curves.values() if c["val"]]
    if not steps:
        return None
    shared = set.intersection(*steps)
    return max(shared) if shared else None


def _from_curve(method: str, row: dict[str, Any], curve: Curve, why: str) -> dict[str, Any]:
    """A row for a method that left no numbers of its own: the last points of its curve."""
    step, train = _last(curve["train"])
    val_step, val = _last(curve["val"])
    _, ppl = _last(curve["val_ppl"])
    _, seconds = _last(curve["elapsed"])
    _, tokens = _last(curve["tokens"])
    return {**row, "method": method, "partial": True, "steps": step, "train_loss": train,
            "val_loss": val, "val_ppl": ppl, "val_step": val_step,
            "tokens_per_s": tokens / seconds if tokens and seconds else None,
            "why": f"partial ({why}): numbers from its curve, last logged step {step}"}


def collect(folder: Path, meta: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Curve]]:
    """One row per method of `meta` (and any other found in the folder), and the curves read."""
    methods = list(meta.get("methods", []))
    found = sorted(p.stem for p in [*(folder / "rows").glob("*.json"), *(folder / "curves").glob("*.csv")])
    methods += [m for m in dict.fromkeys(found) if m not in methods]
    rows, curves = [], {}
    for method in methods:
        curve = read_curve(folder / "curves" / f"{method}.csv")
        if curve["train"] or curve["val"]:
            curves[method] = curve
        path = folder / "rows" / f"{method}.json"
        row = json.loads(path.read_text()) if path.is_file() else {"method": method}
        if "error" in row or "steps" not in row:
            why = row.get("error") or "no result: killed, or still running"
            row = _from_curve(method, row, curve, why) if method in curves else {**row, "error": why}
        rows.append(row)
    return rows, curves


def _steps_cell(r: dict[str, Any], requested: int | None) -> str:
    done = r.get("steps")
    if done is None:
        return "-"
    return f"{done}" if requested is None or done == requested else f"{done} of {requested}"


def _svd_reference(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The plain `galore` row, when it finished with SVDs to compare with (else None)."""
    return next((r for r in rows if r["method"] == "galore" and "error" not in r and r.get("svds")
                 and r.get("steps")), None)


def _svds(r: dict[str, Any]) -> str:
    """The SVD count and the seconds spent in them ("-" where the row has none: rows before 2026-12-07,
    methods without SVDs)."""
    seconds = r.get("svd_seconds")
    return f"{r.get('svds', '-')} | " + (f"{seconds:.2f}" if seconds else "-")


def svds_vs(r: dict[str, Any], ref: dict[str, Any]) -> str:
    """Row `r`'s SVDs as a fraction of the reference row's, per step where their steps differ; "-" for
    a row without SVDs (full-rank, LoRA, a partial row)."""
    svds, steps = r.get("svds"), r.get("steps")
    if not isinstance(svds, int) or not svds or not steps or "error" in r:
        return "-"
    if steps == ref["steps"]:
        return f"{svds / ref['svds']:.2f}"
    return f"{svds / steps / (ref['svds'] / ref['steps']):.2f} per step"


def table(rows: list[dict[str, Any]], curves: dict[str, Curve], requested: int | None) -> str:
    """The Markdown table of the rows (with "SVDs vs galore" when a `galore` row ran SVDs)."""
    common = common_val_step(curves)
    at = f"val loss @ {common}" if common is not None else "val loss @ common step"
    ref = _svd_reference(rows)
    vs = " SVDs vs galore |" if ref else ""
    lines = [f"| method | steps | train loss | val loss | val ppl | {at} | tokens/s | peak MiB | "
             f"SVDs | SVD s |{vs} notes |",
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if ref else "") + "---|"]
    for r in rows:
        if "error" in r and not r.get("partial"):
            dashes = " | -" * (10 if ref else 9)
            lines.append(f"| {r['method']}{dashes} | did not "
                         f"run: {r['error']}" + (f"; {r['notes']}" if r.get("notes") else "") + " |")
            continue
        curve = curves.get(r["method"], {"val": []})
        at_common = next((v for s, v in curve["val"] if s == common), None)
        notes = [r["why"]] if r.get("why") else []
        if r.get("stopped_at") is not None:
            notes.append(f"stopped by the time limit at step {r['stopped_at']} (LR schedule not finished)")
        notes += [r["notes"]] if r.get("notes") else []
        peak = r.get("peak_mib")
        kind = " (RSS)" if r.get("memory_kind") == "rss" else ""
        lines.append(f"| {r['method']} | {_steps_cell(r, requested)} | {_fmt(r.get('train_loss'), '.4f')} | "
                     f"{_fmt(r.get('val_loss'), '.4f')} | {_fmt(r.get('val_ppl'), ',.2f')} | "
                     f"{_fmt(at_common, '.4f')} | {_fmt(r.get('tokens_per_s'), ',.0f')} | "
                     f"{_fmt(peak, ',.0f') + (kind if peak is not None else '')} | {_svds(r)} | "
                     + (f"{svds_vs(r, ref)} | " if ref else "") + f"{'; '.join(notes)} |")
    return "\n".join(lines)


def header(meta: dict[str, Any]) -> str:
    """What ran, where, when and how: the lines above the table."""
    c = meta.get("config", {})
    model = c.get("model", "?")
    lines = [f"# Quality run: LLaMA-{model}, {c.get('source', '?')} data, {meta.get('steps', '?')} steps", ""]
    lines.append(f"- device: {meta.get('device_name', '?')}; torch {meta.get('torch', '?')}, "
                 f"lightning {meta.get('lightning', '?')}, bitsandbytes {meta.get('bitsandbytes', '?')}; "
                 f"started {meta.get('started', '?')}")
    lines.append(f"- command: `{meta.get('command', '?')}`")
    overrides = " ".join(meta.get("overrides", [])) or "none"
    lines.append(f"- recipe {meta.get('recipe') or 'tiny'}, overrides: `{overrides}`; batch "
                 f"{c.get('batch_size')} x {c.get('block_size')} tokens x {c.get('accumulate')} accumulated, "
                 f"precision {c.get('precision')}, seed {c.get('seed')}: every method starts from the same "
                 "weights and sees the same batches")
    per = meta.get("per_method") or {}
    if per:
        lines.append("- per method: " + "; ".join(f"{m}: `{' '.join(o)}`" for m, o in per.items()))
    lines.append(f"- validation every {meta.get('val_every')} steps and at the end, on "
                 f"{c.get('limit_val_batches') or 'all'} batches of the held-out {c.get('val_fraction')} "
                 "of the data; train loss: mean of the last 10 steps; curves: mean of every "
                 f"{meta.get('log_every')} steps; val ppl: exp of the mean token loss")
    where = "GPU" if meta.get("device") == "cuda" else "CPU"
    peak = ("torch.cuda.max_memory_allocated of each process" if meta.get("device") == "cuda" else
            "each process's peak RSS (a smoke test, not a measurement)")
    lines.append(f"- {len(meta.get('methods', []))} methods, one process each, {meta.get('parallel')} at a "
                 f"time on one {where}: tokens/s are those of a shared device (compare them with each other, "
                 f"not with a run alone); peak memory: {peak}")
    if meta.get("time_limit"):
        lines.append(f"- time limit {meta['time_limit']:.0f} s: a method still training then stops, "
                     "validates and reports the step it reached")
    return "\n".join(lines)


def plot(meta: dict[str, Any], curves: dict[str, Curve], path: Path) -> None:
    """Every method's training loss (lines) and validation loss (markers) in one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5), layout="constrained")
    tops, bottoms = [], []
    for i, (method, c) in enumerate(curves.items()):
        color = plt.cm.tab10(i % 10)
        if c["train"]:
            steps, losses = zip(*c["train"], strict=True)
            ax.plot(steps, losses, color=color, linewidth=1.4, label=f"{method} (train)")
            finite = [v for v in losses if math.isfinite(v)]
            tops += finite[len(finite) // 20:][:1]  # the y-range starts after the first, steep drop
            bottoms += finite
        if c["val"]:
            steps, losses = zip(*c["val"], strict=True)
            ax.plot(steps, losses, linestyle="none", marker="o", markersize=6, markeredgecolor="black",
                    color=color, label=f"{method} (val)")
            bottoms += [v for v in losses if math.isfinite(v)]
    if tops:
        low, high = min(bottoms), max(tops)
        ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
    c = meta.get("config", {})
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(f"LLaMA-{c.get('model', '?')}, {c.get('source', '?')} data, batch {c.get('batch_size')} x "
                 f"{c.get('block_size')}: training loss (lines), validation loss (dots)\n"
                 f"{meta.get('device_name', '?')}, {meta.get('date', '')}", fontsize=10)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(ncol=2, fontsize=8)
    else:
        ax.text(0.5, 0.5, "no curves recorded", ha="center", va="center", transform=ax.transAxes)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarize(folder: Path) -> str:
    """Write results.json, summary.md and loss_curves.png of `folder`; return the Markdown."""
    folder = Path(folder)
    meta_path = folder / "run.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    rows, curves = collect(folder, meta)
    text = f"{header(meta)}\n\n{table(rows, curves, meta.get('steps'))}\n"
    (folder / "results.json").write_text(json.dumps(rows, indent=1))
    (folder / "summary.md").write_text(text)
    plot(meta, curves, folder / "loss_curves.png")
    return text
