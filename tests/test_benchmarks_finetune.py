"""benchmarks/finetune_memory.py runs on the CPU at a tiny shape (known to work before GPU time)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
from _bench import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "finetune_memory.py"


def _bench():
    return load_benchmark("finetune_memory.py", "bench_finetune")


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


def test_a_replaced_linear_is_freed_as_soon_as_it_is_converted():
    """The qlora row's build must not hold every bf16 weight until the end (its measured build peak was
    the whole float model): each replaced linear is garbage once `convert` has made its replacement."""
    import gc
    import weakref

    import torch

    from qgl.models.llama import LlamaForCausalLM

    bench = _bench()
    with torch.device("meta"):
        model = LlamaForCausalLM(bench.shape_config("tiny")).to(torch.bfloat16)
    replaced: list[weakref.ref] = []
    alive_at_each_swap: list[int] = []

    def convert(name, linear):
        if "mlp" not in name:
            return False
        if linear is None:
            return True
        gc.collect()
        alive_at_each_swap.append(sum(ref() is not None for ref in replaced))
        replaced.append(weakref.ref(linear))
        return torch.nn.Identity()  # keeps nothing of the linear, as the NF4 conversion keeps no bf16 copy

    bench._materialise(model, torch.device("cpu"), convert)
    gc.collect()
    assert len(replaced) == 2 * 3 and alive_at_each_swap == [0] * 6
    assert all(ref() is None for ref in replaced)
