"""Activation memory of the built-in LLaMA (`qgl.models.llama`), in bytes, per token of a micro-batch.

Korthikanti et al. (2022, "Reducing activation recomputation in large transformer models", eq. 2)
count (34 h + 5 a s) bytes per token and layer for a GPT block in 16-bit: 11 h for attention's
linears and dropout masks, 5 a s for the s x s scores, softmax and its dropout mask, 19 h for
the 4h GeLU MLP, 4 h for the two LayerNorms. Our block differs: SDPA (flash / memory-efficient)
keeps no s x s tensor, there is no dropout, the MLP is SwiGLU of width i, RMSNorm computes in
fp32, and Q-GaLore's QLinear saves its (cast) input like nn.Linear. Counting what autograd saves,
with c = compute-dtype bytes (2 in bf16), a = heads:

    each RMSNorm: its fp32 input (the residual itself when that is fp32, else a fp32 copy) and the
        normalized fp32 x/rms (4 h + 4 h), and rsqrt (4)                              8 h + 4
    attention input: under autocast each of q/k/v casts the fp32 norm output on its own
        (3 c h); otherwise the three share the norm's output (c h)              3 c h | c h
    rotated q, k, v and SDPA's output (o_proj's input is a view of it), lse     4 c h + 4 a
    MLP input: gate and up cast separately under autocast (2 c h), else share (c h)   2 c h | c h
    gate output (silu's input), silu output, up output, their product (down's input)   4 c i

    block = 16 h + 8 + (5 c h under autocast, else 2 c h) + 4 c h + 4 a + 4 c i   per token.

So bf16-mixed: 34 h + 8 i + 4 a + 8; bf16-true: 28 h + 8 i + 4 a + 8; 32-true: 40 h + 16 i + 4 a + 8
(Korthikanti's 34 h holds for bf16-mixed by coincidence: the fp32 norms cost what dropout did).
After the blocks: the final norm (8 h + 4), lm_head's input (c h), token ids and labels (int64,
16). The loss: log_softmax's fp32 output (saved), its gradient and the gradient of the logits are
alive together in its backward: 12 V (the logits' bf16 copy, 2 V, is gone by then).

With activation checkpointing only each block's input is kept (r h, r = the residual's bytes:
the parameters' dtype), and one block is recomputed at a time: L r h + block. Backward also
holds gradients in flight: the residual's (in and out, 2 r h) and up to three i-wide ones in the
MLP (3 c i); this one is an estimate, the rest is what autograd saves (checked on CPU by
tests/test_plan.py against `torch.autograd.graph.saved_tensors_hooks`).

Weight-sized extras: under autocast, the bf16 copy of every linear weight that is not INT8
(lm_head; every linear for plain AdamW) is cached for the step (2 numel); under bf16-true each
RMSNorm's `weight.float()` is a fp32 copy (4 h per norm).
"""

from __future__ import annotations

from dataclasses import dataclass

from qgl.models.llama import LlamaConfig
from qgl.plan.settings import PlanSettings


@dataclass(frozen=True)
class ActivationBytes:
    """Bytes of the parts of activation memory for one micro-batch."""

    blocks: int  # all blocks' saved tensors, or the checkpointed inputs + one recomputed block
    head: int  # final norm, lm_head input, ids and labels
    backward: int  # gradients in flight (estimate)
    logits: int  # the loss: 12 V per token
    norm_copies: int  # bf16-true: fp32 copies of the RMSNorm weights

    @property
    def total(self) -> int:
        return self.blocks + self.head + self.backward + self.logits + self.norm_copies


def block_bytes_per_token(config: LlamaConfig, compute_bytes: int, autocast: bool) -> int:
    """What one block saves for backward, per token (see the module docstring)."""
    h, i, a, c = config.hidden_size, config.intermediate_size, config.num_heads, compute_bytes
    return 16 * h + 8 + (5 if autocast else 2) * c * h + 4 * c * h + 4 * a + 4 * c * i


def activation_bytes(config: LlamaConfig, s: PlanSettings) -> ActivationBytes:
    """Activation parts for `s.batch_size` x `s.seq_len` tokens."""
    pb, c, autocast = s.dtype_bytes
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_layers
    tokens = s.batch_size * s.seq_len
    block = block_bytes_per_token(config, c, autocast)
    blocks = (layers * pb * h + block) if s.checkpointing else layers * block
    norm_copies = 4 * h * (2 * layers + 1) if pb != 4 else 0
    return ActivationBytes(blocks=blocks * tokens, head=(8 * h + 4 + c * h + 16) * tokens,
                           backward=(2 * pb * h + 3 * c * i) * tokens, logits=12 * config.vocab_size * tokens,
                           norm_copies=norm_copies)
