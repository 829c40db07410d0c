"""q-galore-torch's INT8-weight simulation (benchmarks/_public_int8.py), its optimizer driven on it
(benchmarks/_public_adapters.py) and the q-galore-torch row of benchmarks/methods.py."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from _bench import load_benchmark
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.checkpoint import checkpoint

from qgl.config import load_recipe
from qgl.models.llama import LlamaForCausalLM
from qgl.nn import quantize_model

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))  # as benchmarks/methods.py does: one `_public_int8` module
import _public_adapters as adapters  # noqa: E402
import _public_int8 as int8  # noqa: E402


def _public_packages() -> None:
    pytest.importorskip("bitsandbytes")
    if not adapters.available("q-galore-torch"):
        pytest.skip("q-galore-torch not installed")


# ---------------------------------------------------------------- quantization
@pytest.mark.parametrize("group_size", [256, 128])
def test_quantize_round_trip_within_half_a_step(group_size):
    w = torch.randn(64, 512) * 0.02
    q, scales, zeros = int8.quantize_uint8(w, group_size)
    n = w.numel() // group_size
    assert q.dtype == torch.uint8 and q.shape == w.shape
    assert scales.shape == zeros.shape == (n, 1) and scales.dtype == zeros.dtype == torch.float32
    assert torch.equal(zeros, zeros.round()) and zeros.min() >= 0 and zeros.max() <= 255
    back = int8.dequantize_uint8(q, scales, zeros, group_size, torch.float32)
    err = (back - w).abs().reshape(n, group_size)
    assert (err <= scales / 2 * (1 + 1e-4) + 1e-9).all(), (err / scales).max()


def test_group_size_must_divide_the_weight():
    with pytest.raises(
        ValueError, match=r"numel 300 \(shape \(3, 100\)\) is not divisible by group_size 256"
    ):
        int8.quantize_uint8(torch.randn(3, 100))
    with pytest.raises(ValueError, match="not divisible by group_size 0"):
        int8.quantize_uint8(torch.randn(4, 64), 0)
    with pytest.raises(ValueError, match="group_size 256"):
        int8.Int8SimLinear.from_linear(nn.Linear(10, 3))


# ---------------------------------------------------------------- the layer
def _layer(bias: bool, out_f: int = 64, in_f: int = 128) -> tuple[int8.Int8SimLinear, list]:
    m = int8.Int8SimLinear.from_linear(nn.Linear(in_f, out_f, bias=bias))
    calls: list = []
    m.weight.backward_hook = calls.append
    return m, calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_and_backward_are_the_float_math(dtype, bias):
    m, calls = _layer(bias)
    w = m.weight
    assert w.dtype == torch.uint8 and not w.requires_grad and w.shape == (64, 128)
    assert (w.group_size, w.saved_data_dtype, w.stochastic_round, w.float_grad) == (
        256,
        torch.uint8,
        True,
        None,
    )
    assert w.scales.shape == (32, 1) and w.scales.dtype == torch.float32
    x = torch.randn(2, 8, 128, dtype=dtype, requires_grad=True)
    W = m.dequantize_weight(dtype)
    y = m(x)
    ref = x.detach() @ W.t() + (m.bias.detach().to(dtype) if bias else 0)
    assert y.dtype == dtype
    torch.testing.assert_close(y.detach(), ref)
    dy = torch.randn_like(y)
    y.backward(dy)
    g = dy.reshape(-1, 64).t() @ x.detach().reshape(-1, 128)
    torch.testing.assert_close(x.grad, dy @ W)
    torch.testing.assert_close(w.float_grad, g)
    assert w.float_grad.dtype == dtype and w.grad is None
    if bias:
        torch.testing.assert_close(m.bias.grad, dy.reshape(-1, 64).sum(0).float())
    assert len(calls) == 1 and calls[0] is w
    m(x).backward(dy)  # a second micro-batch accumulates
    torch.testing.assert_close(w.float_grad, 2 * g)
    assert len(calls) == 2 and calls[1] is w


def test_autocast_computes_in_its_dtype():
    m, _ = _layer(bias=True)
    x = torch.randn(4, 128, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    W = m.dequantize_weight(torch.bfloat16)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.detach(), x.detach().bfloat16() @ W.t() + m.bias.detach().bfloat16())
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and m.weight.float_grad.dtype == torch.bfloat16
    assert m.bias.grad.dtype == torch.float32


def _requantize(p: torch.Tensor) -> None:
    """What a layer-wise step does to its weight inside backward: new codes, scales and zeros."""
    w = int8.dequantize_uint8(p.data, p.scales, p.zeros, p.group_size, torch.float32) * 1.5
    p.data, p.scales, p.zeros = int8.quantize_uint8(w, p.group_size)


@pytest.mark.parametrize("step_in_backward", [False, True])
def test_activation_checkpointing_gives_the_same_results(step_in_backward):
    torch.manual_seed(0)
    a, b = (
        int8.Int8SimLinear.from_linear(nn.Linear(128, 256)),
        int8.Int8SimLinear.from_linear(nn.Linear(256, 64)),
    )
    block = lambda t: b(torch.relu(a(t)))
    x = torch.randn(3, 5, 128)
    dy = torch.randn(3, 5, 64)
    results = []
    for ckpt in (False, True):
        calls = []
        for m in (a, b):
            m.weight.float_grad = None
            m.weight.backward_hook = _requantize if step_in_backward and ckpt else calls.append
        saved = [(m.weight.data.clone(), m.weight.scales, m.weight.zeros) for m in (a, b)]
        xi = x.clone().requires_grad_()
        y = checkpoint(block, xi, use_reentrant=False) if ckpt else block(xi)
        y.backward(dy)
        results.append((y.detach(), xi.grad, a.weight.float_grad, b.weight.float_grad))
        if not step_in_backward or not ckpt:
            assert [id(c) for c in calls] == [id(b.weight), id(a.weight)]  # once each, in backward order
        for m, (q, s, z) in zip((a, b), saved, strict=True):  # back to the same weights for the next pass
            m.weight.data, m.weight.scales, m.weight.zeros = q, s, z
    for ref, got in zip(*results, strict=True):
        torch.testing.assert_close(got, ref)


def test_to_dtype_and_state_dict_keep_the_attributes():
    m, calls = _layer(bias=True)
    w, ref = m.weight, m.dequantize_weight(torch.float64)
    m.to(torch.float64)
    assert m.weight is w and w.dtype == torch.uint8 and w.scales.dtype == torch.float64
    assert w.backward_hook == calls.append and w.group_size == 256 and m.bias.dtype == torch.float64
    torch.testing.assert_close(m.dequantize_weight(torch.float64), ref)
    other, _ = _layer(bias=True)
    other.to(torch.float64).load_state_dict(m.state_dict())
    assert torch.equal(other.dequantize_weight(torch.float64), ref)


def test_to_int8_swaps_the_galore_targets_of_the_model():
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_name("tiny", num_layers=2)
    x = torch.randint(0, 320, (2, 16))
    ref = model(x)
    converted = int8.to_int8(model, ["attn", "mlp"], ["lm_head"])
    assert len(converted) == 14 and converted == int8.int8_modules(model)
    assert set(converted) == {
        f"blocks.{i}.{n}"
        for i in range(2)
        for n in (
            "attn.q_proj",
            "attn.k_proj",
            "attn.v_proj",
            "attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    }
    assert type(model.lm_head) is nn.Linear
    assert all(int8.is_int8_weight(m.weight) and m.weight.dtype == torch.uint8 for m in converted.values())
    assert (model(x) - ref).abs().max() < 0.05 * ref.abs().max()
    q = LlamaForCausalLM.from_name("tiny", num_layers=2)
    quantize_model(q)
    with pytest.raises(ValueError, match="is a QLinear, not a plain nn.Linear"):
        int8.to_int8(q)


# ---------------------------------------------------------------- q-galore-torch's optimizer on it
def test_galore_torch_has_no_int8_mode():
    q = dataclasses.asdict(load_recipe(None, []).qgalore)
    with pytest.raises(ValueError, match="galore-torch has no INT8-weight mode"):
        adapters.PublicGaLoreCallback("galore-torch", q, int8_weights=True)
    assert adapters.PublicGaLoreCallback("q-galore-torch", q).int8_weights
    assert not adapters.PublicGaLoreCallback("galore-torch", q).int8_weights


@pytest.mark.parametrize("layerwise", [True, False])
def test_public_driver_steps_the_int8_weights(layerwise, one_thread):
    _public_packages()
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_name("tiny", num_layers=2)
    converted = int8.to_int8(model)
    weights = [m.weight for m in converted.values()]
    before = [w.data.clone() for w in weights]
    q = dataclasses.asdict(
        load_recipe(None, ["qgalore.update_proj_gap=2", f"qgalore.layerwise={layerwise}"]).qgalore
    )
    driver = adapters.public_driver(
        "q-galore-torch", model, q, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0
    )
    first, *rest = driver.param_groups
    assert [id(p) for p in first["params"]] == [id(w) for w in weights] and first["rank"] == q["rank"]
    ids = [id(p) for g in driver.param_groups for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(ids) == len(set(ids)) and set(ids) == trainable | {id(w) for w in weights}
    assert all("rank" not in g for g in rest)
    assert all(hasattr(w, "backward_hook") == layerwise for w in weights)
    x = torch.randint(0, 320, (4, 32))
    losses = []
    for _ in range(6):
        driver.step(lambda: losses.append(model(x, labels=x)) or losses[-1].backward())
        driver.zero_grad()
        assert all(w.float_grad is None and w.dtype == torch.uint8 for w in weights)
    assert losses[-1].item() < losses[0].item() - 0.2, [round(v.item(), 3) for v in losses]
    assert all(not torch.equal(w.data, b) for w, b in zip(weights, before, strict=True))
    assert all(w.scales.dtype == torch.float32 for w in weights) and driver.svd_count() == 14 * 3
    nbytes = driver.state_nbytes()
    numel = sum(w.numel() for w in weights)
    assert nbytes["int8_codes"] == numel and nbytes["int8_scales_zeros"] == 2 * 4 * numel // 256
    driver.remove_hooks()
    assert not any(hasattr(w, "backward_hook") for w in weights)


# ---------------------------------------------------------------- the methods benchmark
@pytest.fixture
def workdir(tmp_path, monkeypatch, one_thread):
    """An empty working dir; the tokenized corpus cache shared with the other tests."""
    monkeypatch.setenv("QGL_CACHE", os.environ.get("QGL_CACHE") or str(Path.home() / ".cache" / "qgl"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


class _Probe(Callback):
    """The INT8 weights as the run starts (after PublicGaLoreCallback's setup) and as it ends."""

    def setup(self, trainer, pl_module, stage):
        self.modules = int8.int8_modules(pl_module)
        self.before = {n: m.weight.detach().clone() for n, m in self.modules.items()}

    def on_fit_end(self, trainer, pl_module):
        self.groups = trainer.optimizers[0].param_groups


FAST = [
    "data.batch_size=4",
    "data.block_size=64",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=5",
    "qgalore.update_proj_gap=5",
]


@pytest.mark.parametrize("layerwise", [True, False])
def test_q_galore_torch_row_trains_int8_weights(layerwise, workdir):
    _public_packages()
    bench, probe = load_benchmark("methods.py"), _Probe()
    row = bench.run_method(
        None,
        [*FAST, f"qgalore.layerwise={layerwise}"],
        "q-galore-torch",
        20,
        "cpu",
        workdir,
        callbacks=[probe],
    )
    assert "error" not in row, row.get("error")
    assert row["steps"] == 20 and math.isfinite(row["val_loss"]) and row["svds"] > 0
    assert row["train_loss"] < row["train_loss_first"] - 0.2, (row["train_loss_first"], row["train_loss"])
    assert "INT8-weight simulation (uint8 weights, group 256, stochastic rounding" in row["notes"]
    assert len(probe.modules) == 28  # tiny: 4 blocks x 7 linears
    for name, m in probe.modules.items():
        assert m.weight.dtype == torch.uint8 and not torch.equal(m.weight, probe.before[name]), name
        assert not hasattr(m.weight, "backward_hook")  # removed at teardown
    assert [id(p) for p in probe.groups[0]["params"]] == [id(m.weight) for m in probe.modules.values()]


def test_public_float_weights_switch(workdir):
    _public_packages()
    bench = load_benchmark("methods.py")
    args = [
        "--device",
        "cpu",
        "--steps",
        "2",
        "--methods",
        "q-galore-torch",
        "--public-float-weights",
        "--out",
        str(workdir / "out"),
        "data.batch_size=2",
        "data.block_size=32",
        "trainer.limit_val_batches=1",
    ]
    assert bench.main(args) == 0
    (row,) = json.loads((workdir / "out" / "results.json").read_text())
    assert "on float weights (--public-float-weights" in row["notes"] and "error" not in row
