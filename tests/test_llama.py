"""The built-in LLaMA: shapes, causality, checkpointing, meta-device builds, parameter counts, names."""

import math

import pytest
import torch
from torch import nn

from qgl.models.llama import (
    LLAMA_CONFIGS,
    LlamaConfig,
    LlamaForCausalLM,
    apply_rope,
    build_rope_cache,
    count_parameters,
)


def tiny(**overrides) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_name("tiny", **overrides)


def test_forward_shapes_and_loss():
    model = tiny()
    V = model.config.vocab_size
    x = torch.randint(0, V, (2, 32))
    logits = model(x)
    assert logits.shape == (2, 32, V) and logits.dtype == torch.float32
    loss = model(x, labels=torch.roll(x, -1, dims=1))
    assert loss.ndim == 0 and torch.isfinite(loss)
    # At init the model is close to uniform over the vocabulary.
    assert abs(loss.item() - math.log(V)) < 0.5
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_labels_are_aligned_and_ignore_index():
    model = tiny()
    x = torch.randint(0, 320, (1, 16))
    y = torch.randint(0, 320, (1, 16))
    logits = model(x)
    expected = nn.functional.cross_entropy(logits[0, :8], y[0, :8])
    y_masked = y.clone()
    y_masked[0, 8:] = -100
    torch.testing.assert_close(model(x, labels=y_masked), expected)


def test_causal_masking():
    model = tiny().eval()
    x = torch.randint(0, 320, (1, 24))
    x2 = x.clone()
    x2[0, 15:] = (x2[0, 15:] + 7) % 320  # change only the future
    with torch.no_grad():
        a, b = model(x), model(x2)
    torch.testing.assert_close(a[:, :15], b[:, :15])
    assert not torch.allclose(a[:, 15:], b[:, 15:])


def test_activation_checkpointing_same_loss_and_grads():
    plain, ckpt = tiny(), tiny(activation_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randint(0, 320, (2, 32))
    y = torch.randint(0, 320, (2, 32))
    losses = []
    for model in (plain, ckpt):
        loss = model(x, labels=y)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1])
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_rope_rotates_pairs_and_keeps_norm():
    cos, sin = build_rope_cache(8, 16)
    x = torch.randn(1, 2, 8, 16)
    y = apply_rope(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])  # position 0 is not rotated
    # Relative: <rope(q, m), rope(k, n)> depends only on m - n.
    q, k = torch.randn(16), torch.randn(16)
    qs = apply_rope(q.expand(1, 1, 8, 16), cos, sin)[0, 0]
    ks = apply_rope(k.expand(1, 1, 8, 16), cos, sin)[0, 0]
    torch.testing.assert_close(qs[5] @ ks[3], qs[4] @ ks[2])


@pytest.mark.parametrize("name", ["60m", "130m", "350m", "1b", "7b"])
def test_paper_sizes_on_meta(name):
    with torch.device("meta"):
        model = LlamaForCausalLM.from_name(name)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == count_parameters(model.config)


def test_paper_sizes_match_galore_configs():
    c = LLAMA_CONFIGS
    got = {n: (c[n].hidden_size, c[n].intermediate_size, c[n].num_layers, c[n].num_heads, c[n].vocab_size)
           for n in ("60m", "130m", "350m", "1b", "7b")}
    assert got == {"60m": (512, 1376, 8, 8, 32000), "130m": (768, 2048, 12, 12, 32000),
                   "350m": (1024, 2736, 24, 16, 32000), "1b": (2048, 5461, 24, 32, 32000),
                   "7b": (4096, 11008, 32, 32, 32000)}
    assert count_parameters(c["7b"]) == 6_738_415_616  # LLaMA-7B's published count


@pytest.mark.parametrize("tie", [False, True])
def test_count_parameters_tiny(tie):
    model = tiny(tie_embeddings=tie)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(model.config)
    assert (model.lm_head.weight is model.embed.weight) == tie


def test_meta_then_materialize():
    with torch.device("meta"):
        model = tiny(tie_embeddings=True)
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.lm_head.weight is model.embed.weight
    ref = tiny()
    torch.testing.assert_close(model.rope_cos, ref.rope_cos)
    x = torch.randint(0, 320, (1, 8))
    assert torch.isfinite(model(x, labels=x)).all()


def test_init_std():
    model = LlamaForCausalLM(LlamaConfig(320, 256, 688, 8, 4))
    assert abs(model.blocks[0].attn.q_proj.weight.std().item() - 0.02) < 2e-3
    assert abs(model.blocks[0].mlp.down_proj.weight.std().item() - 0.02 / 4) < 1e-3
    assert torch.equal(model.blocks[0].norm_1.weight, torch.ones(256))


def test_name_patterns_select_the_seven_projections():
    model = tiny()
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    selected = [n for n in linears if "attn" in n or "mlp" in n]
    per_block = ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert selected == [f"blocks.{i}.{p}" for i in range(model.config.num_layers) for p in per_block]
    assert set(linears) - set(selected) == {"lm_head"}
    assert [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)] == ["embed"]


def test_errors():
    with pytest.raises(KeyError, match="known"):
        LlamaConfig.from_name("13b")
    with pytest.raises(ValueError, match="divisible"):
        LlamaConfig(320, 100, 256, 2, 3)
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny(max_seq_len=8)(torch.zeros(1, 9, dtype=torch.long))
