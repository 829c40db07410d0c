"""The built-in LLaMA family: a flat, readable decoder-only transformer in plain torch.

Architecture (as in LLaMA and in the GaLore / Q-GaLore papers' pre-training runs):
token embedding -> N x [RMSNorm -> causal self-attention with RoPE -> residual,
RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> lm_head.

Module names are part of the API: Q-GaLore selects its layers by name, and the patterns
"attn" and "mlp" pick exactly the seven projection linears of each block:

    embed                                   nn.Embedding   [V, H]
    blocks.{i}.norm_1 / norm_2              RMSNorm        [H]
    blocks.{i}.attn.{q,k,v,o}_proj          nn.Linear      [H, H], no bias
    blocks.{i}.mlp.{gate,up}_proj           nn.Linear      [I, H], no bias
    blocks.{i}.mlp.down_proj                nn.Linear      [H, I], no bias
    norm                                    RMSNorm        [H]
    lm_head                                 nn.Linear      [V, H], no bias (optionally tied to embed)

The model can be built on the meta device (`with torch.device("meta"): ...`) for memory
planning; after `model.to_empty(device=...)` call `model.init_weights()`, which also rebuilds
the RoPE cache and re-ties the embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


@dataclass
class LlamaConfig:
    """Shape of a LLaMA model. `max_seq_len` is the length of the RoPE cache, not the training
    block size (the papers pre-train at 256 tokens)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    activation_checkpointing: bool = False
    tie_embeddings: bool = False
    num_kv_heads: int | None = None  # grouped-query attention (HF num_key_value_heads); None: num_heads

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.num_kv_heads is not None and (self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads):
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_name(cls, name: str, **overrides) -> LlamaConfig:
        """A copy of `LLAMA_CONFIGS[name]` with `overrides` applied, e.g. `from_name("60m", max_seq_len=256)`.
        """
        if name not in LLAMA_CONFIGS:
            raise KeyError(f"unknown LLaMA config {name!r}; known: {sorted(LLAMA_CONFIGS)}")
        return replace(LLAMA_CONFIGS[name], **overrides)


# Sizes of GaLore's configs/llama_*.json (the ones Q-GaLore pre-trains): hidden, intermediate,
# layers, heads, vocab 32000 (the T5/LLaMA sentencepiece vocabulary), max positions 1024
# (2048 for 7b), RMSNorm eps 1e-6, untied embeddings.
LLAMA_CONFIGS: dict[str, LlamaConfig] = {
    "60m": LlamaConfig(32000, 512, 1376, 8, 8),
    "130m": LlamaConfig(32000, 768, 2048, 12, 12),
    "350m": LlamaConfig(32000, 1024, 2736, 24, 16),
    "1b": LlamaConfig(32000, 2048, 5461, 24, 32),
    "7b": LlamaConfig(32000, 4096, 11008, 32, 32, max_seq_len=2048),
    # For CPU tests and the quick-start: ByteTokenizer's 257 ids (256 bytes + eos) padded up to
    # a multiple of 64. 128*344 and 128*128 are multiples of the INT8 group size 256.
    "tiny": LlamaConfig(320, 128, 344, 4, 4, max_seq_len=512),
}


def count_parameters(cfg: LlamaConfig) -> int:
    """Number of distinct parameters of `LlamaForCausalLM(cfg)`, from the config alone."""
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    kv = (cfg.num_kv_heads or cfg.num_heads) * cfg.head_dim
    per_block = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h  # attention, MLP, two norms
    head = 0 if cfg.tie_embeddings else v * h
    return v * h + cfg.num_layers * per_block + h + head


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight over the last dim; computed in float32 for stability, returned in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def build_rope_cache(seq_len: int, head_dim: int, theta: float = 10000.0,
                     device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each [seq_len, head_dim] float32 (the two halves repeat)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, nh, T, hd] by cos/sin [T, hd] (the "rotate half" convention of HF LLaMA)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    """Multi-head causal self-attention with RoPE, through `F.scaled_dot_product_attention`."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.num_kv_heads = cfg.num_kv_heads or cfg.num_heads
        h, kv = cfg.hidden_size, self.num_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(h, h, bias=False)
        self.k_proj = nn.Linear(h, kv, bias=False)
        self.v_proj = nn.Linear(h, kv, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, T, H] -> [B, T, H]."""
        B, T, H = x.shape
        # [B, T, H] -> [B, nh, T, hd]
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.num_kv_heads != self.num_heads:  # grouped-query attention: each kv head serves a group
            k = k.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
            v = v.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm transformer block. The norms are named `norm_1`/`norm_2` so that the name patterns
    "attn" and "mlp" match the projection linears only."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.norm_1 = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm_2 = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x), cos, sin)
        return x + self.mlp(self.norm_2(x))


class LlamaForCausalLM(nn.Module):
    """Decoder-only LLaMA language model.

    `forward(input_ids)` returns logits; `forward(input_ids, labels)` returns the mean
    cross-entropy loss. `labels` are already aligned with the positions (labels[:, t] is the
    token that should follow input_ids[:, t], as `qgl.data.TokenBlocks` yields them), so the
    model does not shift them; positions labelled -100 are ignored.
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # Not persistent: derived from the config, and so rebuilt rather than checkpointed.
        self.register_buffer("rope_cos", torch.empty(config.max_seq_len, config.head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(config.max_seq_len, config.head_dim), persistent=False)
        self.init_weights()

    @classmethod
    def from_name(cls, name: str, **overrides) -> LlamaForCausalLM:
        """Build `LLAMA_CONFIGS[name]` with config `overrides`, e.g. `from_name("tiny", num_layers=2)`."""
        return cls(LlamaConfig.from_name(name, **overrides))

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, 0.02) for embeddings and linears; the projections that write into the residual
        stream (o_proj, down_proj) get 0.02 / sqrt(2 * num_layers), so that the residual's variance
        does not grow with depth (GPT-2). Norms to one. Also rebuilds the RoPE cache and re-ties
        lm_head to embed (both are lost by `to_empty`). A no-op on the meta device."""
        nn.init.normal_(self.embed.weight, std=self.init_std("embed"))
        for i, block in enumerate(self.blocks):
            block.norm_1.reset_parameters()
            block.norm_2.reset_parameters()
            for name in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.gate_proj", "mlp.up_proj",
                         "attn.o_proj", "mlp.down_proj"):  # this order: the random streams of earlier runs
                nn.init.normal_(block.get_submodule(name).weight, std=self.init_std(f"blocks.{i}.{name}"))
        self.norm.reset_parameters()
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=self.init_std("lm_head"))
        cos, sin = build_rope_cache(self.config.max_seq_len, self.config.head_dim, self.config.rope_theta,
                                    device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def init_std(self, name: str) -> float:
        """Std of the normal init `init_weights` gives the weight of module `name` (the embedding or a
        linear, e.g. "blocks.3.attn.o_proj"): 0.02, divided by sqrt(2 * num_layers) for o_proj and
        down_proj."""
        std = 0.02
        return std / math.sqrt(2 * self.config.num_layers) if name.endswith(("o_proj", "down_proj")) else std

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] long -> logits [B, T, V] (parameter dtype); with labels [B, T] long ->
        scalar float32 loss."""
        seq_len = input_ids.shape[1]
        if seq_len > self.config.max_seq_len:
            raise ValueError(f"sequence length {seq_len} exceeds max_seq_len={self.config.max_seq_len}")
        x = self.embed(input_ids)
        cos, sin = self.rope_cos[:seq_len].to(x.dtype), self.rope_sin[:seq_len].to(x.dtype)
        # With checkpointing only each block's input is kept; its activations are recomputed in backward.
        use_ckpt = self.config.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, cos, sin, use_reentrant=False) if use_ckpt else block(x, cos, sin)
        logits = self.lm_head(self.norm(x))
        if labels is None:
            return logits
        return causal_lm_loss(logits, labels)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy of logits [B, T, V] against aligned labels [B, T], in float32; -100 is ignored."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
