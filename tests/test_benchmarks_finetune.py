"""benchmarks/finetune_memory.py runs on the CPU at a tiny shape (known to work before GPU time)."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "finetune_memory.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_finetune", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("method", ["lora-r16", "qlora", "galore", "qgalore"])
def test_every_row_trains_at_the_tiny_shape(method):
    bench = _bench()
    ns = bench.parse_args(["--tiny", "--batch", "2", "--seq", "16", "--steps", "2"])
    row = bench.measure("tiny", method, ns)
    assert row["status"] == "ok", row
    assert math.isfinite(row["loss"]) and row["tokens_per_s"] > 0
    if method in ("galore", "qgalore"):
        assert bench.predicted_bytes("tiny", method, ns) > 0


def test_lora_rows_train_only_adapters_and_qgalore_quantizes():
    import torch

    from qgl.nn import LoRALinear, QLinear

    bench = _bench()
    ns = bench.parse_args(["--tiny"])
    model, opt = bench.build("tiny", "lora-r64", ns, torch.device("cpu"))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.endswith(("lora_A", "lora_B")) for n in trained)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 2 * 7
    assert model.blocks[0].attn.q_proj.r == 64
    model, opt = bench.build("tiny", "qgalore", ns, torch.device("cpu"))
    assert sum(isinstance(m, QLinear) for m in model.modules()) == 2 * 7
    assert model.blocks[0].attn.k_proj.weight.shape == (64, 128)  # 2 kv heads of 32: GQA


@pytest.mark.slow
def test_script_prints_the_table_one_process_a_row():
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--methods", "lora-r16,qgalore", "--seq", "16",
           "--steps", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert any(ln.split()[:3] == ["tiny", "lora-r16", "ok"] for ln in lines)
    assert any(ln.split()[:3] == ["tiny", "qgalore", "ok"] for ln in lines)
