"""benchmarks/memory.py on CPU: arguments, the child's refusal without CUDA, OOM / timeout rows,
the table and cap search from fake rows, merged results, the planner's predictions, and every
method's build and step on the tiny recipe (the code the GPU children run)."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from _bench import load_benchmark

GIB = 2**30


@pytest.fixture(scope="module")
def memory():
    return load_benchmark("memory.py")  # puts benchmarks/ on sys.path: _memory_child below


def _row(model, method, status="ok", peak=None, cap=None, tps=None, predicted=None, **extra):
    row = dict(model=model, method=method, batch=1, seq=256, steps=4, warmup=1, cap_gib=cap, status=status,
               peak_bytes=peak, predicted_bytes=predicted, tokens_per_s=tps, device="NVIDIA H100 80GB HBM3",
               date="2026-11-24", torch="2.11.0", bitsandbytes="0.50.2", rank=1024, svd_method="full")
    return {**row, **extra}


def test_arguments(memory):
    ns = memory.parse_args([])
    assert (ns.models, ns.methods, ns.batch, ns.seq, ns.steps, ns.warmup) == (
        ["130m", "1b", "7b"],
        ["bf16-adamw", "adamw8bit", "galore-torch", "qgl", "qgl-offload", "qgl-paged", "qgl-galore"],
        1, 256, 4, 1)
    assert ns.cap_gib is None and not ns.find_min_cap and ns.caps == [12, 10, 9, 8, 7, 6]
    ns = memory.parse_args(["--models", "7b", "--methods", "qgl,qgl-offload", "--cap-gib", "16",
                            "--caps", "8,9.5,8", "--svd", "randomized"])
    assert ns.models == ["7b"] and ns.methods == ["qgl", "qgl-offload"] and ns.cap_gib == 16
    assert ns.caps == [9.5, 8.0] and ns.svd == "randomized"
    cmd = memory.child_command("7b", "qgl", ns, 16.0)
    assert cmd[0] == sys.executable and cmd[1].endswith("memory.py")
    assert cmd[2:] == ["--one", "--model", "7b", "--method", "qgl", "--batch", "1", "--seq", "256", "--steps",
                       "4", "--warmup", "1", "--cap-gib", "16.0", "--svd", "randomized"]
    for bad in (["--models", "13b"], ["--methods", "sgd"], ["--steps", "1"], ["--caps", "8,x"],
                ["--one", "--model", "7b"]):
        with pytest.raises(SystemExit):
            memory.parse_args(bad)


def test_child_refuses_without_cuda(memory, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        memory.main(["--one", "--model", "130m", "--method", "qgl"])
    assert "MEMORY_ROW" not in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the child measures for real on a GPU")
def test_parent_reports_a_child_that_cannot_run(memory, tmp_path):
    ns = memory.parse_args(["--timeout", "120"])
    row = memory.run_child(memory.child_command("130m", "qgl", ns, None), 120, {})
    assert row["status"] == "error" and "needs a CUDA device" in row["error"]


def test_timeout_oom_and_row_lines(memory):
    py = sys.executable
    slow = ("import sys, time; print('[12:00:00] step 1 of 4 running', file=sys.stderr, flush=True); "
            "time.sleep(30)")
    assert memory.run_child([py, "-c", slow], 2, {}) == {
        "status": "timeout", "error": "no result within 2 s (last: [12:00:00] step 1 of 4 running)"}
    oom = ("import sys; print('torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB', "
           "file=sys.stderr); sys.exit(1)")
    assert memory.run_child([py, "-c", oom], 30, {})["status"] == "OOM"
    crash = "raise ValueError('broken')"
    assert memory.run_child([py, "-c", crash], 30, {}) == {"status": "error", "error": "ValueError: broken"}
    ok = f"print('noise'); print({memory.ROW_PREFIX!r} + '{{\"status\": \"ok\", \"peak_bytes\": 5}}')"
    assert memory.run_child([py, "-c", ok], 30, {"X": "1"}) == {"status": "ok", "peak_bytes": 5}


def test_table_offload_cost_and_min_cap(memory):
    rows = [_row("7b", "bf16-adamw", "OOM", peak=79 * GIB, at="first_step", error="CUDA out of memory"),
            _row("7b", "galore-torch", "timeout", error="no result within 450 s"),
            _row("7b", "qgl", peak=11 * GIB, predicted=11.5 * GIB, tps=1000.0, first_step_s=200.0, svds=224),
            _row("7b", "qgl-offload", peak=7.5 * GIB, predicted=7.6 * GIB, tps=800.0, cap=16.0, svds=224),
            _row("7b", "qgl-offload", peak=7.5 * GIB, predicted=7.6 * GIB, tps=790.0, cap=9.0),
            _row("7b", "qgl-offload", "OOM", peak=7.9 * GIB, cap=8.0, at="first_step", error="oom"),
            _row("7b", "qgl-paged", peak=9 * GIB, predicted=9.2 * GIB, tps=600.0, offloaded_bytes=3 * GIB)]
    text = memory.table(rows)
    lines = text.splitlines()
    assert lines[0].startswith("| model | method | cap GiB | peak GiB | predicted GiB | measured / predicted")
    assert "| 7b | bf16-adamw | - | OOM (> 79.00 at first_step) | - | - |" in text
    assert "| 7b | galore-torch | - | timeout | - | - |" in text and "no result within 450 s" in text
    assert "| 7b | qgl | - | 11.00 | 11.50 | 0.96 |" in text
    assert "1,000 | 200.0 | rank 1024, 224 SVDs (full)" in text
    assert "offload runs at 800 tokens/s against 1,000 without (20% lost)" in text
    assert "| 9.00 | 9.20 | 0.98 |" in text and "3.00 GiB of state in unified memory" in text
    assert "paged offload runs at 600 tokens/s against 1,000 without (40% lost)" in text
    assert "smallest cap that completed 4 steps: 9 GiB (tried 16 GiB ok, 9 GiB ok, 8 GiB OOM)" in text
    head = memory.header(rows, "expandable_segments:True")
    assert head.startswith("NVIDIA H100 80GB HBM3, torch 2.11.0, bitsandbytes 0.50.2, galore-torch ?, "
                           "2026-11-24")
    assert "batch 1 x 256 tokens" in head and "7b: rank 1024, full SVD" in head


def test_main_merges_rows_and_stops_the_cap_search(memory, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(memory, "predicted_bytes", lambda model, method, *a: GIB if "qgl" in method else None)
    seen = []

    def runner(cmd, timeout, env):
        seen.append(cmd)
        assert env == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
        cap = float(cmd[cmd.index("--cap-gib") + 1]) if "--cap-gib" in cmd else None
        if cap is not None and cap < 9:
            return {"status": "OOM", "error": "CUDA out of memory", "device": "NVIDIA H100 80GB HBM3"}
        return {"status": "ok", "peak_bytes": GIB, "tokens_per_s": 10.0, "device": "NVIDIA H100 80GB HBM3"}

    out = tmp_path / "rows.json"
    assert memory.main(["--models", "130m", "--methods", "qgl,adamw8bit", "--out", str(out)], runner) == 0
    assert memory.main(["--models", "130m", "--methods", "qgl", "--out", str(out)], runner) == 0
    rows = json.loads(out.read_text())
    assert [(r["model"], r["method"]) for r in rows] == [("130m", "adamw8bit"), ("130m", "qgl")]
    assert rows[1]["predicted_bytes"] == GIB and rows[0]["predicted_bytes"] is None
    seen.clear()
    assert memory.main(["--find-min-cap", "--caps", "12,9,8,7", "--out", str(out)], runner) == 0
    assert [c[c.index("--cap-gib") + 1] for c in seen] == ["12.0", "9.0", "8.0"]  # stops at the first OOM
    text = capsys.readouterr().out
    assert "smallest cap that completed 4 steps: 9 GiB" in text and f"rows: {out}" in text
    assert memory.main(["--report", str(out)]) == 0 and "| 130m | qgl |" in capsys.readouterr().out
    other = tmp_path / "other.json"
    other.write_text(json.dumps([{**rows[1], "method": "qgl-offload"}, {**rows[0], "peak_bytes": 2 * GIB}]))
    merged = tmp_path / "merged.json"
    assert memory.main(["--report", str(out), str(other), "--out", str(merged)]) == 0
    both = json.loads(merged.read_text())
    assert len(both) == 6 and [r["peak_bytes"] for r in both if r["method"] == "adamw8bit"] == [2 * GIB]
    assert memory.results_path("NVIDIA H100 80GB HBM3", __import__("datetime").date(2026, 11, 24)).name == (
        "memory_h100_2026-11-24.json")


def test_main_without_any_measurement_fails(memory, capsys):
    runner = lambda cmd, timeout, env: {"status": "error", "error": "needs a CUDA device"}  # noqa: E731
    assert memory.main(["--models", "130m", "--methods", "adamw8bit"], runner) == 1
    assert "no process measured anything" in capsys.readouterr().err


def test_predictions_are_the_planners(memory):
    from _memory_child import predicted_bytes, recipe

    from qgl.plan import PlanSettings, plan_memory

    assert predicted_bytes("7b", "bf16-adamw", 1, 256) is None
    cfg = recipe("7b", 256)
    s = PlanSettings.from_recipe(cfg).replace(batch_size=1, accumulate=1, precision="bf16-true",
                                              offload="cpu")
    assert s.checkpointing and s.layerwise and s.rank == 1024
    assert predicted_bytes("7b", "qgl-offload", 1, 256) == plan_memory(cfg, s).total < 8 * GIB
    assert predicted_bytes("7b", "qgl", 1, 256) == plan_memory(cfg, s.replace(offload=None)).total < 12 * GIB
    assert predicted_bytes("7b", "qgl-paged", 1, 256) == plan_memory(cfg, s.replace(offload="paged")).total
    galore = recipe("7b", 256, method="qgl-galore")
    g = PlanSettings.from_recipe(galore).replace(batch_size=1, seq_len=256, accumulate=1, checkpointing=True,
                                                 precision="bf16-true", layerwise=True, offload=None)
    assert not g.quantize_weights and not g.proj_quant
    assert predicted_bytes("7b", "qgl-galore", 1, 256) == plan_memory(galore, g).total > 12 * GIB


def test_paged_row_needs_cuda_and_says_so(memory):
    from _memory_child import build

    from qgl.config import load_recipe

    if torch.cuda.is_available():
        pytest.skip("CPU behaviour")
    cfg = load_recipe("tiny", ["data.source=unused", "qgalore.rank=16"])
    with pytest.raises(ValueError, match="offload='paged' needs CUDA"):
        build("qgl-paged", cfg, torch.device("cpu"))


@pytest.mark.parametrize("method", ["bf16-adamw", "adamw8bit", "galore-torch", "qgl", "qgl-offload",
                                    "qgl-galore"])
def test_every_method_builds_and_trains_on_cpu(memory, method, one_thread):
    from _memory_child import build, train_step
    from _public_adapters import available

    from qgl.config import load_recipe

    if method == "galore-torch" and not available("galore-torch"):
        pytest.skip("galore-torch is not installed")
    cfg = load_recipe("tiny", ["data.source=unused", "qgalore.rank=16", "qgalore.update_proj_gap=2"])
    torch.manual_seed(0)
    net, opt = build(method, cfg, torch.device("cpu"))
    assert net.config.activation_checkpointing and net.training
    assert all(p.dtype == torch.bfloat16 for p in net.parameters())
    data = torch.randint(0, net.config.vocab_size, (2, 33))
    losses = [float(train_step(net, opt, data)) for _ in range(3)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_locate_peak_names_the_updates_around_it(memory):
    import _memory_child as child

    records = [(0, "start", 10), (0, "before head", 12), (0, "after head", 30), (0, "end", 30),
               (1, "start", 5), (1, "before head", 20), (1, "after head", 35), (1, "before blk", 40),
               (1, "after blk", 40), (1, "end", 40)]
    assert child.locate_peak(records, 30) == "step 1: between before head and after head"
    assert child.locate_peak(records, 40) == "step 2: between after head and before blk"
    assert child.locate_peak(records, 35) == "step 2: between before head and after head"
    assert child.locate_peak([(0, "end", 5), (1, "start", 5), (1, "before head", 50)], 50) == (
        "step 2: between start and before head")
    assert child.locate_peak(records, 41) is None
    where = "step 2: between after head and before blk"
    row = _row("7b", "qgl", peak=40 * GIB, rank=1024, svds=224, peak_at=where)
    assert f"rank 1024, 224 SVDs (full); peak in {where}" in memory.table([row])


def test_trace_updates_records_every_layerwise_update(memory, monkeypatch, one_thread):
    """The tracer sees each parameter's update once per step, around the optimizer's own update."""
    from _memory_child import build, trace_updates, train_step

    from qgl.config import load_recipe

    cfg = load_recipe("tiny", ["data.source=unused", "qgalore.rank=16"])
    net, opt = build("qgl", cfg, torch.device("cpu"))
    counter = iter(range(10**6))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: next(counter))
    records, step = [], [0]
    trace_updates(opt, records, step)
    data = torch.randint(0, net.config.vocab_size, (2, 33))
    for i in range(2):
        step[0] = i
        train_step(net, opt, data)
    names = {opt.param_name(p) for p in net.parameters() if p.requires_grad}
    for i in range(2):
        labels = [label for s, label, _ in records if s == i]
        assert sorted(labels) == sorted([f"before {n}" for n in names] + [f"after {n}" for n in names])
        assert all(a.replace("before", "after") == b for a, b in zip(labels[::2], labels[1::2], strict=True))
