"""`build_quantized_llama`: the model `quantize_model(LlamaForCausalLM(cfg)).to(dtype)` would give
(structure, dtypes, init statistics), built without ever holding the float model (CPU allocation
profile), and trainable by QGaLoreAdamW."""

from dataclasses import replace

import pytest
import torch
from _tensors import peak_cpu_allocated

from qgl.models.build import build_quantized_llama
from qgl.models.llama import LLAMA_CONFIGS, LlamaForCausalLM, count_parameters
from qgl.nn import quantize_model
from qgl.optim import QGaLoreAdamW, make_param_groups

TINY = LLAMA_CONFIGS["tiny"]


def _signature(model: torch.nn.Module) -> tuple:
    params = [(n, tuple(p.shape), p.stride(), p.dtype, p.requires_grad) for n, p in model.named_parameters()]
    state = [(k, tuple(v.shape), v.dtype) for k, v in model.state_dict().items()]
    return params, state, str(model), model.training


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_same_model_as_quantizing_the_float_one(dtype, one_thread):
    built = build_quantized_llama(TINY, "cpu", dtype)
    ref = quantize_model(LlamaForCausalLM(TINY)).to(dtype)
    assert _signature(built) == _signature(ref)
    assert torch.equal(built.rope_cos, ref.rope_cos) and torch.equal(built.rope_sin, ref.rope_sin)
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for n, m in built.named_modules()
               if n.endswith("norm_1") or n == "norm")
    for name, std in (("blocks.1.attn.q_proj", 0.02), ("blocks.1.mlp.down_proj", 0.02 / 8**0.5)):
        w = built.get_submodule(name).dequantize_weight()
        assert abs(w.mean()) < 0.1 * std and abs(w.std() / std - 1) < 0.05, name
    for name in ("embed", "lm_head"):
        w = built.get_submodule(name).weight.float()
        assert abs(w.std() / 0.02 - 1) < 0.05, name


def test_tied_embeddings_stay_tied():
    cfg = replace(TINY, tie_embeddings=True)
    with pytest.warns(UserWarning, match="tied"):
        built = build_quantized_llama(cfg, "cpu", target_modules=("attn", "mlp", "lm_head"), exclude=())
    assert built.lm_head.weight is built.embed.weight


def test_never_holds_the_float_model(one_thread):
    cfg = replace(TINY, hidden_size=256, intermediate_size=768, num_layers=6, max_seq_len=64)
    out: list[torch.nn.Module] = []
    peak = peak_cpu_allocated(lambda: out.append(build_quantized_llama(cfg, "cpu", torch.bfloat16)))
    model = out[0]
    final = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()  # carriers: one element
                 for t in [*model.parameters(), *model.buffers()]}.values())
    largest_fp32 = 4 * cfg.hidden_size * cfg.intermediate_size
    assert peak <= final + 3 * largest_fp32, (peak, final)  # one fp32 weight and its quantization
    assert peak < 2 * count_parameters(cfg)  # less than the model in bf16, let alone fp32


def test_trains_with_qgalore(one_thread):
    torch.manual_seed(0)
    model = build_quantized_llama(TINY, "cpu", torch.bfloat16)
    opt = QGaLoreAdamW(make_param_groups(model, 16), lr=1e-2, layerwise=True)
    x = torch.randint(0, TINY.vocab_size, (2, 32))
    losses = []
    for _ in range(4):
        loss = model(x, labels=x)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
