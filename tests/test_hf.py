"""Hugging Face in and out (issue 18): fine-tune a local HF LLaMA on instruction data with Q-GaLore,
export it, reload it with `from_pretrained`; no silent loss on `save_pretrained`; Conv1D; loading."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from _hf_tiny import PAIRS, instruction_jsonl, tiny_gpt2, tiny_llama, tiny_llama_dir, tiny_tokenizer
from lightning.pytorch.callbacks import ModelCheckpoint

import qgl
from qgl._hf import transformers
from qgl.callbacks import QGaLoreCallback
from qgl.cli import main
from qgl.data.datamodule import TextDataModule
from qgl.data.sft import IGNORE_INDEX, build_sft_datasets
from qgl.lightning.module import CausalLMModule
from qgl.nn import QLinear, apply_lora, dequantize_model, quantize_model

pytest.importorskip("tokenizers")
tf = transformers()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny HF LlamaForCausalLM fine-tuned 30 steps with qgalore on instruction jsonl (CPU)."""
    root = tmp_path_factory.mktemp("hf")
    model_dir = tiny_llama_dir(root / "base")
    data = instruction_jsonl(root / "sft.jsonl")
    L.seed_everything(0)
    module = CausalLMModule(hf_path=str(model_dir), lr=3e-3, warmup_steps=2, max_steps=30)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    dm = TextDataModule(source=str(data), block_size=16, batch_size=4, val_fraction=0.1,
                        tokenizer=str(model_dir), format="sft")
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", save_last=True)
    trainer = L.Trainer(max_steps=30, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=2, val_check_interval=30,
                        check_val_every_n_epoch=None,
                        callbacks=[QGaLoreCallback(rank=8, group_size=64, update_proj_gap=10,
                                                   subspace_monitor=False), ckpt])
    trainer.fit(module, datamodule=dm)
    module.eval()
    return {"root": root, "model_dir": model_dir, "data": data, "module": module, "before": before,
            "ckpt": root / "ckpt" / "last.ckpt", "x": dm.val_set[0][0][None]}


def test_finetuned_export_reloads_with_from_pretrained(trained):
    module, x = trained["module"], trained["x"]
    q = module.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, QLinear)
    assert not torch.equal(q.dequantize_weight(), trained["before"]["model.layers.0.self_attn.q_proj.weight"])
    with torch.no_grad():
        ref = module.model(x).logits.float()
    # In memory, bf16 (the default): equal within bf16 rounding of the weights.
    out = qgl.export(module, trained["root"] / "bf16")
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    reloaded = tf.AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.dtype == torch.bfloat16
    with torch.no_grad():
        got = reloaded(x).logits.float()
    assert (got - ref).abs().max() <= 2 ** -6 * ref.abs().max()  # bf16 keeps 8 bits of mantissa
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    # From the Lightning checkpoint, through the command line, fp32: the same logits.
    fp32 = str(trained["root"] / "fp32")
    assert main(["export", str(trained["ckpt"]), "--to", fp32, "--dtype", "fp32"]) == 0
    reloaded = tf.AutoModelForCausalLM.from_pretrained(trained["root"] / "fp32")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, ref, atol=1e-5, rtol=1e-5)
    assert (trained["root"] / "fp32" / "tokenizer.json").is_file()
    # A non-empty destination is refused, not overwritten.
    assert main(["export", str(trained["ckpt"]), "--to", str(trained["root"] / "fp32")]) == 2


def test_generate_on_exported_model(trained):
    module, x = trained["module"], trained["x"][:, :6]
    out = qgl.export(module, trained["root"] / "gen", dtype="fp32")
    exported = tf.AutoModelForCausalLM.from_pretrained(out)
    tok = tf.AutoTokenizer.from_pretrained(out)
    generated = exported.generate(x, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    seq = x  # greedy decoding with the trained (quantized) model itself
    with torch.no_grad():
        for _ in range(5):
            seq = torch.cat([seq, module.model(seq).logits[:, -1:].argmax(-1)], dim=1)
    assert generated.shape[1] > x.shape[1]
    assert torch.equal(generated, seq[:, : generated.shape[1]])
    assert isinstance(tok.decode(generated[0]), str)


def test_eval_checkpoint_and_exported_dir_agree(trained, capsys):
    args = ["--data", str(trained["data"]), "--format", "sft", "--block-size", "16", "--device", "cpu"]
    assert main(["eval", str(trained["ckpt"]), *args]) == 0
    from_ckpt = capsys.readouterr().out
    qgl.export(trained["ckpt"], trained["root"] / "eval", dtype="fp32")
    assert main(["eval", str(trained["root"] / "eval"), *args]) == 0
    from_dir = capsys.readouterr().out
    loss = lambda s: float(s.split("loss ")[1].split(",")[0])
    assert loss(from_ckpt) == pytest.approx(loss(from_dir), abs=1e-4)
    assert 0 < loss(from_dir) < 5 and "perplexity" in from_dir


def test_prompt_tokens_carry_no_loss(trained):
    tok = tiny_tokenizer()
    rows, _ = build_sft_datasets(trained["data"], 16, 0.0, str(trained["model_dir"]), packing=False)
    prompt, response = PAIRS[0]
    p, r = tok.encode(prompt), tok.encode(response) + [tok.eos_token_id]
    x, y = rows[0]  # {"prompt", "response"}: labels are the response's tokens only
    assert x[: len(p) + len(r) - 1].tolist() == (p + r)[:-1]
    assert y.tolist() == [IGNORE_INDEX] * (len(p) - 1) + r + [IGNORE_INDEX] * (16 - len(p) - len(r) + 1)
    x, y = rows[1]  # {"messages"}: only the assistant's turn (its text and the template's </s>)
    text = tok.apply_chat_template([{"role": "user", "content": prompt},
                                    {"role": "assistant", "content": response}], tokenize=False)
    ids = tok.encode(text, add_special_tokens=False)
    assert x[: len(ids) - 1].tolist() == ids[:-1]
    trained_targets = [t for t in y.tolist() if t != IGNORE_INDEX]
    assert trained_targets == tok.encode(response) + [tok.eos_token_id]
    # Packed blocks: every labelled token of the whole set is a response token or eos.
    packed, _ = build_sft_datasets(trained["data"], 16, 0.0, str(trained["model_dir"]), packing=True)
    response_ids = {i for _, r in PAIRS for i in tok.encode(r)} | {tok.eos_token_id}
    prompt_only = {i for p, _ in PAIRS for i in tok.encode(p)} - response_ids
    labelled = {int(t) for _, y in packed for t in y if t != IGNORE_INDEX}
    assert labelled and labelled <= response_ids and not labelled & prompt_only


def test_save_pretrained_of_quantized_model_round_trips(tmp_path):
    model = tiny_llama(40)
    x = torch.randint(0, 40, (2, 12))
    quantize_model(model, group_size=64)
    with torch.no_grad():
        ref = model(x).logits
    with pytest.warns(UserWarning, match="dequantized"):
        model.save_pretrained(tmp_path / "q")
    reloaded = tf.LlamaForCausalLM.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, ref, atol=1e-6, rtol=1e-6)
    # LoRA adapters (non-zero B) are merged, not saved as base/adapter keys.
    model = tiny_llama(40, seed=1)
    apply_lora(model, r=4, alpha=8)
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            torch.nn.init.normal_(p, std=0.05)
    with torch.no_grad():
        ref = model(x).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "lora")
    reloaded = tf.LlamaForCausalLM.from_pretrained(tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, ref, atol=1e-5, rtol=1e-5)


def test_stock_optimizer_names_dequantize_model_and_dequantize_restores_linear():
    model = tiny_llama(40)
    x = torch.randint(0, 40, (2, 12))
    quantize_model(model, group_size=64)
    with torch.no_grad():
        ref = model(x).logits
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(x).logits.sum().backward()
    with pytest.raises(TypeError, match="dequantize_model"):
        opt.step()
    dequantize_model(model)
    q = model.model.layers[0].self_attn.q_proj
    assert type(q) is torch.nn.Linear and q.weight.shape == (64, 64) and q.weight.stride() == (64, 1)
    assert "save_pretrained" not in model.__dict__
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.zero_grad()
    model(x).logits.sum().backward()
    opt.step()  # a stock optimizer now trains it
    assert not torch.equal(q.weight, model.model.layers[1].self_attn.q_proj.weight)


def test_gpt2_conv1d_layers_are_quantized_transposed_and_export_back(tmp_path):
    model = tiny_gpt2()
    x = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        float_logits = model(x).logits
    quantize_model(model, target_modules=["attn", "mlp"], group_size=64)
    assert isinstance(model.transformer.h[0].attn.c_attn, QLinear)
    assert model.transformer.h[0].attn.c_attn.weight.shape == (192, 64)  # [out, in]: Conv1D's transposed
    with torch.no_grad():
        ref = model(x).logits
    assert (ref - float_logits).abs().max() < 0.05 * float_logits.abs().max()
    qgl.export(model, tmp_path / "gpt2", dtype="fp32")
    reloaded = tf.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2")
    assert type(reloaded.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, ref, atol=1e-5, rtol=1e-5)
    dequantize_model(model)
    assert type(model.transformer.h[0].mlp.c_fc).__name__ == "Conv1D"
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref, atol=1e-5, rtol=1e-5)


def test_rank_larger_than_a_layer_is_refused_before_surgery(tmp_path):
    from qgl.nn import check_rank

    model = tiny_llama(40)
    with pytest.raises(ValueError, match=r"rank=256 .*rank<=32"):
        check_rank(model, 256)
    assert not any(isinstance(m, QLinear) for m in model.modules())
    check_rank(model, 32)


def test_qgl_llama_exports_as_transformers_llama(tmp_path):
    from qgl.models.llama import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM.from_name("tiny", hidden_size=64, intermediate_size=128, num_layers=2,
                                       num_heads=4, max_seq_len=64)
    quantize_model(model, group_size=64)
    x = torch.randint(0, 320, (2, 12))
    with torch.no_grad():
        ref = model(x)
    qgl.export(model, tmp_path / "llama", dtype="fp32")
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "llama")
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, ref, atol=1e-4, rtol=1e-4)


def test_sft_reader_gz_and_errors_name_file_and_line(tmp_path):
    rows = [{"prompt": "a b", "response": "c"}] * 6
    gz = tmp_path / "d.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    train, val = build_sft_datasets(gz, 4, 0.0, "byte", packing=False)
    assert len(train) == 6 and val is None
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a",\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        build_sft_datasets(bad, 4, 0.0, "byte")
    bad.write_text('{"prompt": "a", "response": "b"}\n\n{"text": "a"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:3: an example needs 'prompt' and 'response'"):
        build_sft_datasets(bad, 4, 0.0, "byte")
    bad.write_text('{"messages": [{"role": "user", "content": "a"}]}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: 'messages' examples need .*chat_template"):
        build_sft_datasets(bad, 4, 0.0, "byte")


def test_hf_path_hub_id_without_hub_is_one_clear_line(tmp_path, monkeypatch):
    from qgl.models.build import load_hf_causal_lm

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"'nobody/no-such-model': not a local directory, and the Hugging Face"):
        load_hf_causal_lm("nobody/no-such-model")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_hf_causal_lm(str(tmp_path / "missing"))
    from qgl.data.tokenizer import get_tokenizer

    with pytest.raises(OSError, match=r"tokenizer 'nobody/no-such-model': not a local directory"):
        get_tokenizer("nobody/no-such-model")  # the tokenizer follows model.hf_path by default


def test_load_quantized_hf_layer_by_layer(tmp_path):
    from qgl.models.build import load_quantized_hf

    model_dir = tiny_llama_dir(tmp_path / "m")
    float_model = tf.AutoModelForCausalLM.from_pretrained(model_dir)
    model = load_quantized_hf(str(model_dir), "cpu", dtype="fp32", group_size=64)
    layers = [m for m in model.modules() if isinstance(m, QLinear)]
    assert len(layers) == 2 * 7 and not isinstance(model.lm_head, QLinear)
    x = torch.randint(0, 40, (1, 10))
    with torch.no_grad():
        a, b = model(x).logits, float_model(x).logits
    assert (a - b).abs().max() < 0.05 * b.abs().max()


def test_grouped_query_attention_in_qgl_llama_export_and_plan(tmp_path):
    from qgl.config import load_recipe
    from qgl.models.llama import LlamaForCausalLM, count_parameters
    from qgl.plan import plan_memory
    from qgl.plan.settings import model_config

    torch.manual_seed(0)
    model = LlamaForCausalLM.from_name("tiny", hidden_size=64, intermediate_size=128, num_layers=2,
                                       num_heads=4, num_kv_heads=2, max_seq_len=64)
    assert model.blocks[0].attn.k_proj.weight.shape == (32, 64)
    assert count_parameters(model.config) == sum(p.numel() for p in model.parameters())
    x = torch.randint(0, 320, (2, 12))
    with torch.no_grad():
        ref = model(x)
    qgl.export(model, tmp_path / "gqa", dtype="fp32")
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "gqa")
    assert reloaded.config.num_key_value_heads == 2
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, ref, atol=1e-4, rtol=1e-4)
    # The planner reads num_key_value_heads from an HF directory: k/v projections of [kv * hd, h].
    hf_dir = tiny_llama_dir(tmp_path / "hf")
    cfg = load_recipe("finetune/llama_hf_sft", [f"model.hf_path={hf_dir}", "data.source=x.jsonl",
                                                "qgalore.rank=8"])
    _, config = model_config(cfg)
    hf = tf.AutoModelForCausalLM.from_pretrained(hf_dir)
    assert config.num_kv_heads == 2
    assert count_parameters(config) == sum(p.numel() for p in hf.parameters())
    assert plan_memory(cfg).total > 0


def test_lora_checkpoint_exports_merged(tmp_path):
    from qgl.hf_export import load_checkpoint_model

    model = tiny_llama(40, seed=2)
    apply_lora(model, r=4, alpha=12.0)
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            torch.nn.init.normal_(p, std=0.05)
    base = tmp_path / "base"
    tiny_llama(40).save_pretrained(base)  # only its config is read
    sd = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": sd, "hyper_parameters": {"model": "tiny", "hf_path": str(base)},
                "callbacks": {"LoRACallback": {"config": {"r": 4, "alpha": 12.0}}}}, tmp_path / "l.ckpt")
    rebuilt, info = load_checkpoint_model(tmp_path / "l.ckpt")
    assert info["replaced_layers"] == 14
    x = torch.randint(0, 40, (2, 9))
    qgl.export(tmp_path / "l.ckpt", tmp_path / "out", dtype="fp32")
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)


def test_qgl_train_sft_recipe_then_export(tmp_path, monkeypatch):
    """The recipe path: `qgl train finetune/llama_hf_sft` (data.format=sft) on CPU, then `qgl export`."""
    monkeypatch.chdir(tmp_path)
    model_dir = tiny_llama_dir(tmp_path / "m")
    data = instruction_jsonl(tmp_path / "d.jsonl", repeat=2)
    args = ["train", "finetune/llama_hf_sft", f"model.hf_path={model_dir}", f"data.source={data}",
            "model.dtype=fp32", "model.activation_checkpointing=false", "data.block_size=16",
            "data.batch_size=2", "qgalore.rank=8", "qgalore.group_size=64", "trainer.max_steps=3",
            "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.accumulate_grad_batches=1",
            "trainer.val_check_interval=3", "trainer.limit_val_batches=1", "logger.wandb=false",
            "checkpoint.dir=ck", "optim.warmup_steps=1"]
    assert main(args) == 0
    # A relative checkpoint.dir lies inside the run's own directory (README, "Runs and resume").
    [last] = (tmp_path / "runs").rglob("ck/last.ckpt")
    assert main(["export", str(last), "--to", "out"]) == 0
    assert tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out").dtype == torch.bfloat16


def test_transformers_imports_with_the_checkout_on_sys_path():
    """qgl's top-level kernels/ must not shadow the Hub's `kernels` package that transformers imports,
    with the checkout's root (python -m pytest, python -c there) first on sys.path."""
    root = Path(qgl.__file__).resolve().parent.parent
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from qgl._hf import transformers; "
            "v = transformers().__version__; k = sys.modules.get('kernels'); "
            "print(v, getattr(k, '__file__', None))")
    proc = subprocess.run([sys.executable, "-c", code, str(root)], cwd=root, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not proc.stdout.split()[-1].startswith(str(root / "kernels")), proc.stdout
