"""Build a quantized LLaMA straight on its device, without the float model ever there.

`quantize_model(LlamaForCausalLM(cfg).cuda())` first holds the whole float model on the GPU (27 GB in
fp32 for LLaMA-7B, more than the Q-GaLore training step). `build_quantized_llama` builds the model on
the meta device (no memory), swaps the targeted linears for `QLinear` there (`quantize_model`: the same
selection as a run), then materialises one module at a time on the device: each QLinear from one
fp32 weight drawn with `init_weights`' std and quantized at once, the other modules (embedding,
norms, head, RoPE cache) directly in `dtype`. The device then holds at most the finished part of the
model plus one fp32 weight and its quantization's temporaries.

`load_quantized_hf` does the same for a Hugging Face checkpoint (its weights, not random ones): loaded
in host memory, then quantized onto the device one layer at a time. `load_hf_causal_lm` loads one
from a local directory or a Hub id, with a one-line error where the Hub cannot be reached.
"""

from __future__ import annotations

import os
import re
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


# ---------------------------------------------------------------- Hugging Face checkpoints
HF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _looks_local(path: str) -> bool:
    """A path rather than a Hub id ("org/name"): absolute, relative with ./ or ~, or several slashes."""
    return path.startswith((os.sep, ".", "~")) or path.count("/") > 1 or os.path.exists(path)


def load_hf_causal_lm(hf_path: str, dtype: str | None = None) -> nn.Module:
    """`AutoModelForCausalLM.from_pretrained(hf_path)` in host memory, in `dtype` (bf16, fp16, fp32;
    None: fp32). `hf_path`: a local directory, or a Hub id fetched where the Hub is reachable (and
    then cached by huggingface_hub). Errors are one line naming `hf_path`."""
    from qgl._hf import transformers

    tf = transformers()
    if dtype is not None and dtype not in HF_DTYPES:
        raise ValueError(f"model dtype {dtype!r} is not one of: {', '.join(HF_DTYPES)}")
    torch_dtype = HF_DTYPES[dtype or "fp32"]
    path = os.path.expanduser(hf_path)
    if _looks_local(hf_path):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model.hf_path {hf_path!r}: no such directory")
        return tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=True)
    try:
        return tf.AutoModelForCausalLM.from_pretrained(hf_path, dtype=torch_dtype)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OSError(f"model.hf_path {hf_path!r}: not a local directory, and the Hugging Face Hub could not "
                      f"provide it ({first}); download it where the Hub is reachable and give its "
                      "directory") from None


@torch.no_grad()
def load_quantized_hf(hf_path: str, device: torch.device | str, dtype: str = "bf16",
                      target_modules: Sequence[str] = ("attn", "mlp"), exclude: Sequence[str] = ("lm_head",),
                      group_size: int = 256, symmetric: bool = True) -> nn.Module:
    """A Hugging Face causal LM with its targeted linears as `QLinear`, on `device`, without the float
    model ever there: loaded in host memory in `dtype` (`load_hf_causal_lm`), then one targeted layer
    at a time is moved to `device`, quantized there and its float weight released; the rest (embedding,
    norms, head) follows in `dtype`. Peak on `device`: the finished part plus one float layer."""
    from qgl.nn.surgery import _matches, is_conv1d

    model = load_hf_causal_lm(hf_path, dtype)
    device = torch.device(device)
    names = [n for n, m in model.named_modules()
             if n and (isinstance(m, nn.Linear) or is_conv1d(m)) and _matches(n, target_modules)
             and not _matches(n, exclude)]
    if not names:
        quantize_model(model, target_modules, exclude)  # raises, listing the model's linear layers
    for name in names:
        model.get_submodule(name).to(device)
        quantize_model(model, ["re:^" + re.escape(name) + "$"], (), group_size, symmetric)
    return model.to(device)
