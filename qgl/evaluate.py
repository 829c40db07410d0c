"""`qgl eval CKPT_OR_DIR --data SOURCE`: loss and perplexity of a trained model on a data source.

The model is a Hugging Face directory (e.g. written by `qgl export`) or a `qgl train` checkpoint (exported
to a temporary fp32 directory first, so both go through the same `from_pretrained`). The data is read
as training would read it: a text source in blocks (`qgl.data.TokenBlocks`, every block of the whole
source), or instruction data (`format="sft"`, `qgl.data.sft`: responses only). The loss is the mean
cross entropy over every labelled token (not a mean of batch means).
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from qgl._hf import transformers
from qgl.models.llama import IGNORE_INDEX


def load_for_eval(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Any, str | None]:
    """(Hugging Face model in eval mode on `device`, its directory if it holds a tokenizer)."""
    from qgl.hf_export import _has_tokenizer, export, load_checkpoint_model

    path = Path(path).expanduser()
    tf = transformers()
    if path.is_file():
        trained, info = load_checkpoint_model(path)
        with tempfile.TemporaryDirectory() as tmp:
            out = export(trained, Path(tmp) / "model", dtype="fp32", tokenizer=False)
            model = tf.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
        tokenizer = info.get("tokenizer")
    elif path.is_dir():
        model = tf.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        tokenizer = str(path) if _has_tokenizer(str(path)) else None
    else:
        raise FileNotFoundError(f"{path}: neither a checkpoint file nor a model directory")
    return model.to(device).eval(), tokenizer


@torch.no_grad()
def evaluate(path: str | os.PathLike, source: str, *, tokenizer: str | None = None, block_size: int = 256,
             batch_size: int = 8, format: str = "text", max_batches: int | None = None,
             device: str | torch.device = "cpu") -> dict[str, float]:
    """{"loss", "ppl", "tokens", "batches"} of the model at `path` on `source` (see the module docstring).
    `tokenizer`: a tokenizer spec ("byte", a directory); None: the model's own, else "byte"."""
    from qgl.data.dataset import TokenBlocks, load_tokens
    from qgl.data.sft import build_sft_datasets
    from qgl.data.tokenizer import get_tokenizer

    model, own = load_for_eval(path, device)
    tok = get_tokenizer(tokenizer or own or "byte")
    if format == "sft":
        data, _ = build_sft_datasets(source, block_size, 0.0, tok, packing=True)
    elif format == "text":
        src = "corpus" if source in ("embedded", "corpus") else source
        data = TokenBlocks(load_tokens(src, tok), block_size)
    else:
        raise ValueError(f"format {format!r} is not one of: text, sft")
    total, count, batches = 0.0, 0, 0
    for x, y in DataLoader(data, batch_size=batch_size):
        if max_batches is not None and batches >= max_batches:
            break
        out = model(x.to(device))
        logits = getattr(out, "logits", out).float()
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.to(device).flatten(),
                                                         ignore_index=IGNORE_INDEX, reduction="sum"))
        count += int((y != IGNORE_INDEX).sum())
        batches += 1
    if count == 0:
        raise ValueError(f"{source}: no labelled tokens to evaluate on (block_size={block_size})")
    loss = total / count
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": count, "batches": batches}
