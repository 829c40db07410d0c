"""benchmarks/quality.py: a CPU smoke run of two methods on the tiny recipe, the report rebuilt from
saved files (also from a run cut short), and the curve writer's time limit."""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from _bench import load_benchmark

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


quality = load_benchmark("quality.py")  # puts benchmarks/ on sys.path: _curves, _quality_report below
report = sys.modules["_quality_report"]
curves_mod = sys.modules["_curves"]


def _table(text: str) -> dict[str, list[str]]:
    """Method -> its cells, from the Markdown table of summary.md."""
    rows = [line.strip("|").split(" | ") for line in text.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in rows[0]]
    return {cells[0].strip(): dict(zip(header, (c.strip() for c in cells), strict=True))
            for cells in rows[1:]}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working dir; the tokenized corpus cache shared with the other tests."""
    monkeypatch.setenv("QGL_CACHE", os.environ.get("QGL_CACHE") or str(Path.home() / ".cache" / "qgl"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.slow  # 15-25 s on 2 busy cores: two child processes each import torch + Lightning
def test_quality_smoke_run_on_cpu(workdir, capsys):
    before = sorted(RESULTS.iterdir()) if RESULTS.is_dir() else []
    out = workdir / "out"
    args = ["--recipe", "tiny", "--device", "cpu", "--steps", "8", "--methods", "full,qgalore",
            "--out", str(out), "--val-every", "4", "--log-every", "2", "--set", "full:optim.lr=3e-3",
            "data.batch_size=4", "data.block_size=32", "trainer.limit_val_batches=1"]
    assert quality.main(args) == 0
    printed = capsys.readouterr().out
    for name in ("run.json", "summary.md", "results.json", "loss_curves.png", "curves/full.csv",
                 "curves/qgalore.csv", "rows/full.json", "rows/qgalore.json", "logs/qgalore.log"):
        assert (out / name).is_file(), name
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "summary.md").read_text()
    assert summary in printed
    assert "--steps 8" in summary and "full:optim.lr=3e-3" in summary and "CPU" in summary
    table = _table(summary)
    assert set(table) == {"full", "qgalore"}
    for method, cells in table.items():
        assert cells["steps"] == "8", cells
        train, val, ppl = float(cells["train loss"]), float(cells["val loss"]), float(cells["val ppl"])
        assert all(math.isfinite(v) for v in (train, val, ppl)) and 0 < val < 6
        assert ppl == pytest.approx(math.exp(val), rel=2e-3)
        assert float(cells["val loss @ 8"]) == pytest.approx(val, abs=1e-4)
        assert float(cells["tokens/s"].replace(",", "")) > 0 and cells["peak MiB"].endswith("(RSS)")
        curve = curves_mod.read_curve(out / "curves" / f"{method}.csv")
        assert [s for s, _ in curve["train"]] == [2, 4, 6, 8] and [s for s, _ in curve["val"]] == [4, 8]
        assert curve["train"][-1][1] < curve["train"][0][1], (method, curve["train"])  # the loss went down
    assert int(table["qgalore"]["SVDs"]) > 0 and table["full"]["SVDs"] == "0"
    assert float(table["qgalore"]["SVD s"]) > 0 and table["full"]["SVD s"] == "-"  # seconds in SVDs
    assert json.loads((out / "run.json").read_text())["per_method"] == {"full": ["optim.lr=3e-3"]}
    # --summarize rebuilds the same report from the files alone
    (out / "summary.md").unlink()
    (out / "loss_curves.png").unlink()
    assert quality.main(["--summarize", str(out)]) == 0
    assert (out / "summary.md").read_text() == summary and (out / "loss_curves.png").is_file()
    assert (sorted(RESULTS.iterdir()) if RESULTS.is_dir() else []) == before  # nothing in the repository
    assert not (workdir / "runs").exists() and not (workdir / "checkpoints").exists()


def _write_curve(path: Path, train: list[tuple[int, float]], val: list[tuple[int, float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, curves_mod.FIELDS)
        w.writeheader()
        for step, loss in train:
            w.writerow({"step": step, "train_loss": loss, "elapsed_s": step / 10, "tokens": step * 100})
        for step, loss in val:
            w.writerow({"step": step, "val_loss": loss, "val_ppl": math.exp(loss), "elapsed_s": step / 10,
                        "tokens": step * 100})
        f.write("30,4.")  # a line cut short by a kill


def test_report_from_a_run_cut_short(tmp_path):
    meta = {"command": "python benchmarks/quality.py --steps 40", "methods": ["full", "qgalore", "lora"],
            "steps": 40, "device": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "parallel": 3,
            "val_every": 10, "log_every": 10, "config": {"model": "60m", "source": "embedded"}}
    (tmp_path / "run.json").write_text(json.dumps(meta))
    _write_curve(tmp_path / "curves" / "full.csv", [(10, 6.0), (20, 5.0), (30, 4.5), (40, 4.2)],
                 [(10, 6.1), (20, 5.1), (40, 4.3)])
    _write_curve(tmp_path / "curves" / "qgalore.csv", [(10, 6.2), (20, 5.3)], [(10, 6.3), (20, 5.4)])
    (tmp_path / "rows").mkdir()
    row = {"method": "full", "notes": "torch AdamW", "steps": 40, "peak_mib": 2713.6, "memory_kind": "cuda",
           "tokens_per_s": 92411.0, "train_loss": 4.21, "val_loss": 4.3, "val_ppl": math.exp(4.3), "svds": 0,
           "requested_steps": 40, "stopped_at": None}
    (tmp_path / "rows" / "full.json").write_text(json.dumps(row))
    text = report.summarize(tmp_path)
    table = _table(text)
    assert table["full"]["steps"] == "40" and table["full"]["val loss"] == "4.3000"
    assert table["full"]["peak MiB"] == "2,714" and table["full"]["val loss @ 20"] == "5.1000"
    assert table["qgalore"]["steps"] == "20 of 40" and table["qgalore"]["val loss @ 20"] == "5.4000"
    assert "partial (no result: killed, or still running)" in table["qgalore"]["notes"]
    assert table["qgalore"]["tokens/s"] == "1,000" and table["qgalore"]["peak MiB"] == "-"
    assert table["lora"]["notes"].startswith("did not run: no result")
    assert "`python benchmarks/quality.py --steps 40`" in text and "H100" in text
    assert (tmp_path / "loss_curves.png").stat().st_size > 10_000
    assert [r["method"] for r in json.loads((tmp_path / "results.json").read_text())] == ["full", "qgalore",
                                                                                           "lora"]


def test_curve_writer_stops_at_the_deadline(tmp_path):
    writer = curves_mod.CurveWriter(tmp_path / "c.csv", every=2, deadline=0.0)  # long past
    trainer = SimpleNamespace(global_step=0, accumulate_grad_batches=2, max_steps=100, should_stop=False,
                              sanity_checking=False, callback_metrics={})
    module = SimpleNamespace(tokens_seen=0)
    writer.on_train_start(trainer, module)
    writer.on_train_batch_end(trainer, module, {"loss": 1.5}, None, 0)  # first micro-batch: no step yet
    assert not trainer.should_stop
    trainer.global_step = 1
    writer.on_train_batch_end(trainer, module, {"loss": 2.5}, None, 1)
    assert trainer.should_stop and writer.stopped_at == 1
    writer.on_train_end(trainer, module)
    assert curves_mod.read_curve(tmp_path / "c.csv")["train"] == [(1, 4.0)]  # (1.5 + 2.5) x 2 / 2


@pytest.mark.parametrize("name,tag", [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA A100-SXM4-80GB", "a100"),
                                      ("NVIDIA H200", "h200"), ("CPU (x86_64, 2 cores)", "cpu")])
def test_device_tag(name, tag):
    assert quality.device_tag(name) == tag
