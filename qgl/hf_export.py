"""Export a trained model as a Hugging Face directory that `from_pretrained` loads without qgl.

    qgl.export(model, "out/")              # a model in memory (HF, qgl's LLaMA, a LightningModule)
    qgl.export("checkpoints/last.ckpt", "out/", dtype="fp32", tokenizer="path/to/tokenizer")
    qgl export checkpoints/last.ckpt --to out/ [--dtype bf16]      # the same from the command line

Every `QLinear` is dequantized and every LoRA adapter merged (`qgl.nn.plain_state_dict`), the weights
are cast to `dtype` (bf16 by default) and written as safetensors with the model's config by
`save_pretrained` of a weightless (meta-device) copy of the original architecture: a Hugging Face
model keeps its class and config; qgl's own LLaMA becomes a `transformers.LlamaForCausalLM` (same
RoPE convention, SwiGLU, RMSNorm; `convert_qgl_llama`). The tokenizer is saved beside it when one is
given or the model was loaded from a directory that has one.

A Lightning checkpoint (`qgl train`'s `.ckpt`) is first rebuilt (`load_checkpoint_model`): the model's
architecture without weights, the run's surgery (INT8 layers, LoRA adapters) read off the state dict's
keys and the callbacks' saved settings, then the state dict assigned.

The directory is written next to its destination and renamed into place when complete; an existing
non-empty destination is refused unless `overwrite=True`.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qgl._hf import transformers
from qgl.models.build import HF_DTYPES
from qgl.nn import LoRALinear, QLinear, apply_lora, plain_state_dict, quantize_model
from qgl.nn.restore import is_hf_model

__all__ = ["DTYPES", "convert_qgl_llama", "export", "find_hf_model", "load_checkpoint_model"]

# The recipe's names (model.dtype) and torch's ("bfloat16", "float16", "float32").
DTYPES = {**HF_DTYPES, **{str(d).removeprefix("torch."): d for d in HF_DTYPES.values()}}


class ExportError(ValueError):
    """What cannot be exported, in one line."""


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} is not one of: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def find_hf_model(model: nn.Module) -> nn.Module | None:
    """The outermost Hugging Face model in `model` (a module with `save_pretrained` and `config`)."""
    return next((m for m in model.modules() if is_hf_model(m)), None)


def _qgl_llama(model: nn.Module) -> nn.Module | None:
    from qgl.models.llama import LlamaForCausalLM

    return next((m for m in model.modules() if isinstance(m, LlamaForCausalLM)), None)


# ------------------------------------------------------------------ qgl LLaMA -> transformers
_QGL_TO_HF = [(r"^embed\.", "model.embed_tokens."),
              (r"^blocks\.(\d+)\.norm_1\.", r"model.layers.\1.input_layernorm."),
              (r"^blocks\.(\d+)\.norm_2\.", r"model.layers.\1.post_attention_layernorm."),
              (r"^blocks\.(\d+)\.attn\.", r"model.layers.\1.self_attn."),
              (r"^blocks\.(\d+)\.mlp\.", r"model.layers.\1.mlp."),
              (r"^norm\.", "model.norm."), (r"^lm_head\.", "lm_head.")]


def convert_qgl_llama(config: Any, state_dict: dict[str, Tensor],
                      eos_token_id: int | None = None) -> tuple[nn.Module, dict[str, Tensor]]:
    """(`transformers.LlamaForCausalLM` on the meta device, its state dict) for qgl's `LlamaConfig`
    `config` and a plain state dict of `qgl.models.LlamaForCausalLM`. The layouts are the same
    (rotate-half RoPE of `cat([angles, angles])`, SwiGLU, RMSNorm, no biases); only names differ."""
    tf = transformers()
    hf_config = tf.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=getattr(config, "num_kv_heads", None) or config.num_heads,
        max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_embeddings, hidden_act="silu", attention_bias=False, mlp_bias=False,
        eos_token_id=eos_token_id, bos_token_id=None, pad_token_id=None)
    out: dict[str, Tensor] = {}
    for key, t in state_dict.items():
        for pattern, repl in _QGL_TO_HF:
            new, n = re.subn(pattern, repl, key)
            if n:
                out[new] = t
                break
        else:
            raise ExportError(f"no Hugging Face LLaMA name for qgl parameter {key!r}")
    with torch.device("meta"):
        hf = tf.LlamaForCausalLM(hf_config)
    return hf, out


# ------------------------------------------------------------------ writing
def _atomic_dir(out: Path, overwrite: bool) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ExportError(f"{out} exists and is not empty; choose another directory or pass overwrite=True "
                          "(--overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def _commit_dir(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _save_tokenizer(tokenizer: Any, into: Path) -> bool:
    if tokenizer is None or tokenizer is False:
        return False
    if isinstance(tokenizer, str | os.PathLike):
        tokenizer = transformers().AutoTokenizer.from_pretrained(os.fspath(tokenizer), local_files_only=True)
    tokenizer = getattr(tokenizer, "_tok", tokenizer)  # qgl.data.HFTokenizer wraps one
    if not callable(getattr(tokenizer, "save_pretrained", None)):
        raise ExportError(f"cannot save tokenizer {tokenizer!r}: give a Hugging Face tokenizer or its "
                          "directory")
    tokenizer.save_pretrained(into)
    return True


def _default_tokenizer(hf: nn.Module | None) -> str | None:
    path = getattr(hf, "name_or_path", None) or getattr(getattr(hf, "config", None), "_name_or_path", None)
    return path if path and _has_tokenizer(path) else None


@torch.no_grad()
def export(model: nn.Module | str | os.PathLike, out_dir: str | os.PathLike, *,
           dtype: str | torch.dtype = "bf16", tokenizer: Any = None, overwrite: bool = False) -> Path:
    """Write `model` (a module holding a Hugging Face causal LM or qgl's LLaMA, e.g. the
    `CausalLMModule` of a run, or the path of a Lightning checkpoint) as a Hugging Face directory
    `out_dir`: config.json, safetensors weights in `dtype` ("bf16", "fp16", "fp32"), generation
    config, and the tokenizer (`tokenizer`: an HF tokenizer or its directory; None: the model's own
    directory's, when it has one; False: none). The model is not changed. Returns the directory's path."""
    torch_dtype = _dtype(dtype)
    out = Path(out_dir).expanduser()
    if isinstance(model, str | os.PathLike):
        model, info = load_checkpoint_model(model)
        tokenizer = tokenizer if tokenizer is not None else info.get("tokenizer")
    hf = find_hf_model(model)
    if hf is not None:
        sd = plain_state_dict(hf, torch_dtype, device="cpu")
        config = copy.deepcopy(hf.config)
        with torch.device("meta"):
            target = type(hf)(config)
        if getattr(hf, "generation_config", None) is not None:
            target.generation_config = copy.deepcopy(hf.generation_config)
        tokenizer = tokenizer if tokenizer is not None else _default_tokenizer(hf)
    else:
        llama = _qgl_llama(model)
        if llama is None:
            raise ExportError(f"{type(model).__name__} holds neither a Hugging Face model nor qgl's "
                              "LlamaForCausalLM: nothing to export")
        eos = getattr(getattr(tokenizer, "_tok", tokenizer), "eos_token_id", None)
        target, sd = convert_qgl_llama(llama.config, plain_state_dict(llama, torch_dtype, "cpu"), eos)
    target.to(torch_dtype)  # on meta: only what save_pretrained writes as the config's dtype
    tmp = _atomic_dir(out, overwrite)
    try:
        target.save_pretrained(tmp, state_dict=sd)
        _save_tokenizer(tokenizer, tmp)
        _commit_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ------------------------------------------------------------------ Lightning checkpoints
def _callback_settings(ckpt: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(QGaLoreCallback config, LoRACallback config) saved in the checkpoint's callback states."""
    qgalore, lora = {}, {}
    for key, state in (ckpt.get("callbacks") or {}).items():
        config = state.get("config") if isinstance(state, dict) else None
        if not isinstance(config, dict):
            continue
        if "group_size" in config:
            qgalore = config
        elif "alpha" in config and str(key).startswith("LoRACallback"):
            lora = config
    return qgalore, lora


def _exact(names: list[str]) -> list[str]:
    return ["re:^(" + "|".join(re.escape(n) for n in names) + ")$"]


def load_checkpoint_model(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """(model, info) from a `qgl train` checkpoint of `CausalLMModule`: the model with the run's
    INT8 layers and LoRA adapters and the trained weights (on the CPU); info["tokenizer"]: the
    Hugging Face directory the run loaded (its tokenizer), or None."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ExportError(f"{path}: checkpoint file not found")
    from qgl.lightning.checkpoint import CheckpointError, load_checkpoint

    try:  # checksummed, tensors and plain types only (never unpickles code)
        ckpt = load_checkpoint(path, map_location="cpu")
    except CheckpointError as e:
        raise ExportError(str(e)) from e
    hp = ckpt.get("hyper_parameters") or {}
    if "state_dict" not in ckpt or "model" not in hp:
        raise ExportError(f"{path}: not a checkpoint of qgl's CausalLMModule (no state_dict or no 'model' "
                          "hyper-parameter)")
    sd = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    hf_path = hp.get("hf_path")
    if hf_path:
        tf = transformers()
        config = tf.AutoConfig.from_pretrained(hf_path, local_files_only=os.path.isdir(hf_path))
        with torch.device("meta"):
            model = tf.AutoModelForCausalLM.from_config(config)
    else:
        from qgl.lightning.module import build_model

        with torch.device("meta"):
            model = build_model(hp["model"], False, None, hp.get("vocab_size"))
    qgalore, lora = _callback_settings(ckpt)
    int8 = sorted(k[: -len(".weight_int8")] for k in sd if k.endswith(".weight_int8"))
    int8 = [n for n in int8 if ".base" not in n]
    if int8:
        quantize_model(model, _exact(int8), (), group_size=int(qgalore.get("group_size", 256)),
                       symmetric=f"{int8[0]}.weight_zero" not in sd)
    adapters = sorted(k[: -len(".lora_A")] for k in sd if k.endswith(".lora_A"))
    if adapters:
        if any(k.startswith(f"{adapters[0]}.base.weight.") for k in sd):
            raise ExportError(f"{path}: NF4 (qlora) checkpoints are not exported yet; train with method=lora "
                              "or export the model in memory with qgl.export(module, ...)")
        if "alpha" not in lora:
            warnings.warn(f"{path}: the checkpoint does not record LoRA's alpha; merging with alpha=32 "
                          "(the recipe default)", stacklevel=2)
        r = int(sd[f"{adapters[0]}.lora_A"].shape[0])
        apply_lora(model, _exact(adapters), (), r=r, alpha=float(lora.get("alpha", 32.0)))
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    # Non-persistent buffers (RoPE caches) are not in a state dict; everything else must be.
    persistent = {k for k in model.state_dict()}
    missing = [k for k in missing if k in persistent and not _tied(model, k)]
    if missing or unexpected:
        raise ExportError(f"{path}: the rebuilt model does not match the checkpoint: missing "
                          f"{missing[:3]}, unexpected {unexpected[:3]}")
    n = sum(isinstance(m, QLinear | LoRALinear) for m in model.modules())
    tokenizer = hf_path if hf_path and _has_tokenizer(hf_path) else None
    return model, {"tokenizer": tokenizer, "replaced_layers": n}


def _has_tokenizer(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, f))
                                       for f in ("tokenizer.json", "tokenizer_config.json"))


def _tied(model: nn.Module, key: str) -> bool:
    """True for a weight the model ties to another (an HF lm_head tied to the embedding)."""
    return key == "lm_head.weight" and bool(getattr(getattr(model, "config", None), "tie_word_embeddings",
                                                        False))
