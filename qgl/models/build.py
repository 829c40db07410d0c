"""Build a quantized LLaMA straight on its device, without the float model ever there.

`quantize_model(LlamaForCausalLM(cfg).cuda())` first holds the whole float model on the GPU (27 GB in
fp32 for LLaMA-7B, more than the Q-GaLore training step). `build_quantized_llama` builds the model on
the meta device (no memory), swaps the targeted linears for `QLinear` there (`quantize_model`: the same
selection as a run), then materialises one module at a time on the device: each QLinear from one
fp32 weight drawn with `init_weights`' std and quantized at once, the other modules (embedding,
norms, head, RoPE cache) directly in `dtype`. The device then holds at most the finished part of the
model plus one fp32 weight and its quantization's temporaries.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from qgl.models.llama import LlamaConfig, LlamaForCausalLM, RMSNorm, build_rope_cache
from qgl.nn import QLinear, quantize_model


@torch.no_grad()
def build_quantized_llama(
    config: LlamaConfig,
    device: torch.device | str,
    dtype: torch.dtype = torch.bfloat16,
    target_modules: Sequence[str] = ("attn", "mlp"),
    exclude: Sequence[str] = ("lm_head",),
    group_size: int = 256,
    symmetric: bool = True,
) -> LlamaForCausalLM:
    """`quantize_model(LlamaForCausalLM(config), ...)` cast to `dtype`, built module by module on `device`.

    The result has the structure, dtypes (INT8 codes, fp32 scales, `dtype` carriers, parameters and
    RoPE cache) and initial distribution of that model (normal weights of `init_weights`' std, norms
    at one), in training mode; its random draws differ (one weight at a time, in module order).
    """
    device = torch.device(device)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    quantize_model(model, target_modules, exclude, group_size, symmetric)
    model.to(dtype)  # on meta: nothing allocated; QLinear buffers keep their formats
    for name, module in list(model.named_modules()):
        if isinstance(module, QLinear):
            _swap(model, name, _quantized(module, model.init_std(name), device).to(dtype))
            continue
        module.to_empty(device=device, recurse=False)  # keeps the (meta) dtype
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=model.init_std(name))
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            module.reset_parameters()
    if config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    cos, sin = build_rope_cache(config.max_seq_len, config.head_dim, config.rope_theta, device=device)
    model.rope_cos.copy_(cos)
    model.rope_sin.copy_(sin)
    return model.train()


def _quantized(meta: QLinear, std: float, device: torch.device) -> QLinear:
    """A QLinear shaped like `meta` on `device`, quantized from an fp32 normal(0, std) weight (zero
    bias), its carrier fp32 (`.to(dtype)` casts it as after `quantize_model`)."""
    with torch.device("meta"):
        linear = nn.Linear(meta.in_features, meta.out_features, bias=meta.bias is not None)
    linear.to_empty(device=device)
    nn.init.normal_(linear.weight, std=std)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
    return QLinear.from_linear(linear, meta.group_size, meta.symmetric)


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)
