"""Training methods side by side: the `method` key, LoRA/QLoRA, the 8-bit AdamW swap, the methods
benchmark and its adapters for the public GaLore packages."""

from __future__ import annotations

import copy
import json
import math
import os
import sys
from pathlib import Path

import bitsandbytes as bnb
import lightning as L
import pytest
import torch
from _bench import load_benchmark
from torch import nn

from qgl.callbacks import AdamW8bitCallback, LoRACallback, QGaLoreCallback, method_callbacks
from qgl.callbacks.methods import METHODS, check_4bit
from qgl.config import RecipeError, load_recipe
from qgl.models.llama import LlamaForCausalLM
from qgl.nn import LoRALinear, apply_lora, lora_modules, quantize_model

ROOT = Path(__file__).resolve().parent.parent
FAST = ["trainer.max_steps=20", "data.batch_size=4", "data.block_size=64", "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=5", "checkpoint.every_n_steps=null", "checkpoint.save_last=false",
        "logger.wandb=false", "qgalore.update_proj_gap=5"]


@pytest.fixture
def workdir(tmp_path, monkeypatch, one_thread):
    """An empty working dir; the tokenized corpus cache shared with the other tests."""
    monkeypatch.setenv("QGL_CACHE", os.environ.get("QGL_CACHE") or str(Path.home() / ".cache" / "qgl"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _run(overrides):
    from qgl.lightning.run import run

    return run(load_recipe(None, [*FAST, *overrides]))


# ---------------------------------------------------------------- every method trains
@pytest.mark.parametrize("method", METHODS)
def test_method_trains_and_lowers_the_loss(method, workdir):
    s = _run([f"method={method}"])
    assert s["method"] == method and s["steps"] == 20
    assert math.isfinite(s["train_loss"]) and math.isfinite(s["val_loss"])
    assert s["train_loss"] < s["train_loss_first"] - 0.2, (s["train_loss_first"], s["train_loss"])
    if "galore" in method:
        assert s["svd_total"] > 0
    else:
        assert s["svd_total"] is None
    parts = s["memory_parts"]
    assert parts["params"] > 0 and (parts["optimizer_moments"] > 0)
    assert (parts["int8_weights"] > 0) == (method == "qgalore")


def test_method_callbacks_and_alias():
    assert method_callbacks("full") == [] and method_callbacks("adamw") == []
    (cb,) = method_callbacks("adamw8bit")
    assert isinstance(cb, AdamW8bitCallback) and not cb.paged
    lora, opt = method_callbacks("qlora", lora={"r": 4})
    assert isinstance(lora, LoRACallback) and lora.config["base"] == "nf4" and lora.config["r"] == 4
    assert isinstance(opt, AdamW8bitCallback) and opt.paged
    (g,) = method_callbacks("galore", qgalore={"rank": 8}, seed=3)
    assert isinstance(g, QGaLoreCallback) and g.config["rank"] == 8 and g.config["seed"] == 3
    assert not g.config["quantize_weights"] and not g.config["proj_quant"] and not g.config["adaptive"]
    (q,) = method_callbacks("qgalore", qgalore={"rank": 8})
    assert q.config["quantize_weights"] and q.config["proj_quant"] and q.config["adaptive"]
    with pytest.raises(ValueError, match="unknown method 'sgd'.*qlora"):
        method_callbacks("sgd")


class _Toy(L.LightningModule):
    """An MLP whose hidden linears are named attn/mlp, with torch AdamW and a decaying LR schedule."""

    def __init__(self) -> None:
        super().__init__()
        self.attn, self.mlp, self.norm = nn.Linear(16, 64), nn.Linear(64, 64), nn.LayerNorm(64)
        self.head = nn.Linear(64, 1)
        self.lrs: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
        h = self.norm(self.mlp(torch.relu(self.attn(x))))
        return nn.functional.mse_loss(self.head(h).squeeze(-1), y)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self):
        x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :4].sum(-1).sin()), 16)


def test_swap_and_lora_callbacks_on_any_module(tmp_path):
    def fit(callbacks):
        module = _Toy()
        trainer = L.Trainer(max_steps=4, accelerator="cpu", callbacks=callbacks, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=tmp_path)
        trainer.fit(module)
        return module, trainer

    module, trainer = fit([AdamW8bitCallback()])
    (opt,) = trainer.optimizers
    assert type(opt) is bnb.optim.AdamW8bit and opt.param_groups[0]["betas"] == (0.9, 0.95)
    assert module.lrs == pytest.approx([1e-2 / (1 + s) for s in range(4)])  # the module's schedule drives it
    assert opt.state[module.mlp.weight]["state1"].dtype == torch.uint8  # 4096 elements: 8-bit moments
    module, trainer = fit([LoRACallback(r=2, target_modules=["attn", "mlp"], trainable=["head"])])
    assert isinstance(module.attn, LoRALinear) and module.attn.base.weight.dtype == torch.bfloat16
    trained = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trained == {"attn.lora_A", "attn.lora_B", "mlp.lora_A", "mlp.lora_B", "head.weight", "head.bias"}
    assert type(trainer.optimizers[0]) is torch.optim.AdamW  # the module's own, on the adapters


def test_recipe_method_and_lora_keys():
    for method in (*METHODS, "adamw"):
        assert load_recipe(None, [f"method={method}"]).method == method
    cfg = load_recipe(None, ["method=lora", "lora.r=4", "lora.trainable=[norm]"])
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (4, 32.0, 0.0) and cfg.lora.trainable == ["norm"]
    assert cfg.lora.target_modules == ["attn", "mlp"] and cfg.lora.exclude == ["lm_head"]
    for bad, key in (("lora.r=0", "lora.r"), ("lora.dropout=1.0", "lora.dropout"), ("method=sgd", "method")):
        with pytest.raises(RecipeError, match=f"key '{key}'"):
            load_recipe(None, [bad])
    with pytest.raises(RecipeError, match="gradient_clip_val"):  # galore is layer-wise like qgalore
        load_recipe(None, ["method=galore", "trainer.gradient_clip_val=1.0"])


def test_qlora_without_4bit_kernels_says_it_needs_cuda(workdir, monkeypatch):
    def no_4bit(*args, **kwargs):
        raise NotImplementedError("no 4-bit kernel for this device")

    monkeypatch.setattr(bnb.functional, "quantize_4bit", no_4bit)
    with pytest.raises(ValueError, match=r"method qlora needs CUDA: .*4-bit \(NF4\).*cpu.*method=lora"):
        check_4bit(torch.device("cpu"))
    with pytest.raises(ValueError, match="method qlora needs CUDA"):
        _run(["method=qlora"])
    check_4bit(torch.device("cuda"))  # never probed there


def test_qlora_resumes_from_its_checkpoint(workdir):
    """NF4 statistics, adapters, the 8-bit moments and the lr schedule come back from last.ckpt."""
    args = ["method=qlora", "trainer.max_steps=6", "checkpoint.save_last=true", "lora.r=4"]
    first = _run(args)
    assert first["steps"] == 6 and first["last_checkpoint"]
    resumed = _run([*args, "trainer.max_steps=8", "ckpt_path=last"])
    assert resumed["steps"] == 8 and math.isfinite(resumed["val_loss"])


# ---------------------------------------------------------------- LoRA
def _tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return LlamaForCausalLM.from_name("tiny", num_layers=2)


def test_fresh_lora_model_computes_the_base_model():
    base = _tiny()
    x = torch.randint(0, 320, (2, 16))
    ref = base(x)
    model = copy.deepcopy(base)
    adapters = apply_lora(model, ["attn", "mlp"], r=4, alpha=8)
    assert len(adapters) == 14 and all(torch.count_nonzero(a.lora_B) == 0 for a in adapters.values())
    assert torch.equal(model(x), ref)  # B = 0: exactly the base's function
    assert lora_modules(base) == {}  # the copy was wrapped, not the original
    m16 = copy.deepcopy(base)
    apply_lora(m16, base="bf16")
    assert m16.blocks[0].attn.q_proj.base.weight.dtype == torch.bfloat16
    assert (m16(x) - ref).abs().max() < 0.05 * ref.abs().max()
    m4 = copy.deepcopy(base)
    apply_lora(m4, base="nf4")
    assert isinstance(m4.blocks[0].mlp.up_proj.base, bnb.nn.Linear4bit)
    assert (m4(x) - ref).abs().max() < 0.5 * ref.abs().max()
    q = copy.deepcopy(base)
    quantize_model(q)
    ref_q = q(x)
    apply_lora(q)
    assert torch.equal(q(x), ref_q)  # over INT8 QLinear bases too


def test_lora_freezes_the_base_and_trains_only_adapters():
    model = _tiny()
    apply_lora(model, r=4, trainable=["norm", "attn"])  # "attn" cannot unfreeze a base
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) or "norm" in n for n in trainable)
    assert not any(".base." in n for n in trainable) and "embed.weight" not in trainable
    model(torch.randint(0, 320, (2, 8)), labels=torch.randint(0, 320, (2, 8))).backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable
    first = model.blocks[0].attn.q_proj
    assert isinstance(first, LoRALinear) and first.lora_A.dtype == torch.float32
    assert first.lora_A.shape == (4, 128) and first.lora_B.shape == (128, 4) and first.scaling == 8.0
    assert len(apply_lora(model, r=4)) == 14  # idempotent: no adapters on adapters
    with pytest.raises(ValueError, match="no linear layer matched.*blocks.0.attn"):
        apply_lora(_tiny(), ["nothing"])


def test_nf4_lora_state_dict_round_trip():
    model = _tiny()
    apply_lora(model, r=4, base="nf4")
    with torch.no_grad():
        for a in lora_modules(model).values():
            a.lora_B.normal_()
    x = torch.randint(0, 320, (2, 16))
    state = model.state_dict()
    other = _tiny(seed=1)
    apply_lora(other, r=4, base="nf4")
    other.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(other(x), model(x))


# ---------------------------------------------------------------- the benchmark and its adapters
def test_methods_benchmark_smoke_on_cpu(workdir, capsys):
    bench = load_benchmark("methods.py")
    args = ["--device", "cpu", "--steps", "3", "--out", str(workdir / "out"), "data.batch_size=2",
            "data.block_size=32", "trainer.limit_val_batches=1"]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    assert "process peak RSS" in out and "(RSS)" in out
    for method in bench.ALL:
        line = next(line for line in out.splitlines() if line.startswith(f"| {method} |"))
        if "did not run" in line:
            assert "not installed" in line and method in ("galore-torch", "q-galore-torch")
    assert (workdir / "out" / "results.json").is_file()


def test_methods_benchmark_per_method_override(workdir, capsys):
    """`--set galore:trainer.precision=bf16-true` reaches that method's run only, and its row says so."""
    bench = load_benchmark("methods.py")
    args = ["--device", "cpu", "--steps", "2", "--out", str(workdir / "out"), "--methods", "full,galore",
            "--set", "galore:trainer.precision=bf16-true", "data.batch_size=2", "data.block_size=32",
            "trainer.limit_val_batches=1"]
    assert bench.main(args) == 0
    rows = {r["method"]: r for r in json.loads((workdir / "out" / "results.json").read_text())}
    assert rows["galore"]["notes"].endswith("; trainer.precision=bf16-true")
    assert "bf16-true" not in rows["full"]["notes"]
    # bf16 weights: galore's parameters take half full's fp32 bytes (and 8-bit moments, not fp32).
    assert rows["galore"]["states_mib"] < rows["full"]["states_mib"] / 2
    assert "galore: trainer.precision=bf16-true" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main([*args[:4], "--methods", "full", "--set", "galore:trainer.precision=bf16-true"])


def _adapters():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import _public_adapters

    return _public_adapters


@pytest.mark.parametrize("package", ["galore-torch", "q-galore-torch"])
def test_public_adapter_restores_arguments_not_math(package):
    adapters = _adapters()
    if not adapters.available(package):
        pytest.skip(f"{package} not installed")
    cls = adapters._adapt(package)
    lin = nn.Linear(64, 128)
    x = torch.randn(16, 64)
    for min_8bit in (64, 4096):  # the 8-bit and the 32-bit update
        a, b = copy.deepcopy(lin), copy.deepcopy(lin)
        ours = cls(a.parameters(), lr=1e-2, weight_decay=0.1, min_8bit_size=min_8bit)
        ref = bnb.optim.AdamW8bit(b.parameters(), lr=1e-2, weight_decay=0.1, min_8bit_size=min_8bit)
        assert ours.args.max_unorm == 0.0 and ours.args.skip_zeros is False
        for _ in range(3):
            for m, opt in ((a, ours), (b, ref)):
                m(x).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
        # A plain group (no rank) is bitsandbytes' AdamW8bit, bit for bit.
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    galore = dict(rank=4, update_proj_gap=2, scale=0.25, proj_type="std")
    if package == "q-galore-torch":
        galore.update(quant=True, quant_n_bit=4, quant_group_size=256, cos_threshold=0.4, gamma_proj=2,
                      queue_size=5)
    c = copy.deepcopy(lin)
    groups = [{"params": [c.weight], **galore}, {"params": [c.bias]}]
    driver = adapters.PublicDriver(groups, cls, layerwise=True)
    losses = []
    for _ in range(6):
        loss = c(x).pow(2).mean()
        losses.append(loss.item())
        driver.step(loss.backward)  # the hooks step each parameter in backward
    assert losses[-1] < losses[0] and c.weight.grad is None and driver.svd_count() == 3
    assert driver.state_nbytes()["projections"] > 0


def test_methods_benchmark_isolates_each_row_in_its_own_process(workdir, capsys):
    """`--isolate`: every row comes from a fresh process; a process that dies without its row
    leaves an error row naming its exit code and log, and the other rows stand."""
    bench = load_benchmark("methods.py")
    args = ["--device", "cpu", "--steps", "2", "--out", str(workdir / "out"), "--isolate",
            "--methods", "full,galore", "--set", "galore:trainer.max_steps=not-a-number",
            "data.batch_size=2", "data.block_size=32", "trainer.limit_val_batches=1"]
    assert bench.main(args) == 1  # galore failed
    rows = {r["method"]: r for r in json.loads((workdir / "out" / "results.json").read_text())}
    assert rows["full"]["steps"] == 2 and math.isfinite(rows["full"]["train_loss"])
    assert "its process exited with code 1 before reporting a row" in rows["galore"]["error"]
    assert "not-a-number" in (workdir / "out" / "galore.log").read_text()
    assert not list((workdir / "out").glob("*.row.json*"))  # nothing half-written is left
    assert "| galore | - |" in capsys.readouterr().out
