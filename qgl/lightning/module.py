"""CausalLMModule: next-token training of a LLaMA (built-in or local Hugging Face) with Lightning.

It configures a plain torch AdamW with a warm-up + cosine schedule; `QGaLoreCallback` swaps the
optimizer for QGaLoreAdamW and keeps the schedule, so the same module trains with and without it.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torchmetrics.text import Perplexity

from qgl.models.llama import IGNORE_INDEX, LlamaConfig, LlamaForCausalLM, causal_lm_loss


class WarmupCosine:
    """LR factor: linear warm-up to 1 over `warmup_steps`, then cosine down to `min_lr_ratio` at
    `max_steps` (and flat after)."""

    def __init__(self, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> None:
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.warmup_steps, self.max_steps = int(warmup_steps), int(max_steps)
        self.min_lr_ratio = float(min_lr_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps  # the first update already moves the weights
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class ScheduleFromConfig(torch.optim.lr_scheduler.LambdaLR):
    """A `LambdaLR` whose checkpoint restores only its position (the step count): the schedule and
    the base lrs stay those it was built with, i.e. the current config's, so that a resumed run with
    a larger `max_steps` or another `lr` follows the new schedule from the resumed step on. Loading
    also sets each group's lr for that step (the optimizer's own state brought the old one)."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_epoch = int(state_dict["last_epoch"])
        self._step_count = int(state_dict.get("_step_count", self.last_epoch + 1))
        lrs = [base * fn(self.last_epoch) for base, fn in zip(self.base_lrs, self.lr_lambdas, strict=True)]
        for group, base, lr in zip(self.optimizer.param_groups, self.base_lrs, lrs, strict=True):
            group["lr"], group["initial_lr"] = lr, base
        self._last_lr = lrs


def build_model(model: str | LlamaConfig | dict, activation_checkpointing: bool = False,
                hf_path: str | None = None, vocab_size: int | None = None,
                dtype: str | None = None) -> nn.Module:
    """A `LlamaForCausalLM` from a size name, a config (or its dict), or a Hugging Face causal LM
    (`hf_path`: a local directory or a Hub id; `dtype`: bf16/fp16/fp32 to load it in, default fp32)."""
    if hf_path is not None:
        from qgl.models.build import load_hf_causal_lm

        hf = load_hf_causal_lm(hf_path, dtype=dtype).train()  # from_pretrained returns it in eval mode
        if activation_checkpointing:
            hf.gradient_checkpointing_enable()
        return hf
    overrides: dict[str, Any] = {"activation_checkpointing": activation_checkpointing}
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    if isinstance(model, str):
        return LlamaForCausalLM.from_name(model, **overrides)
    config = LlamaConfig(**model) if isinstance(model, dict) else model
    return LlamaForCausalLM(LlamaConfig(**{**asdict(config), **overrides}))


class CausalLMModule(pl.LightningModule):
    """Causal language modelling on `(input_ids, labels)` batches (labels aligned, -100 ignored).

    Args:
        model: a `LLAMA_CONFIGS` name ("tiny", "60m", ...), a `LlamaConfig` or its dict.
        lr, weight_decay, betas: torch AdamW's.
        warmup_steps, max_steps, min_lr_ratio: the schedule (`WarmupCosine`), stepped every step.
        activation_checkpointing: recompute each block in backward.
        hf_path: a Hugging Face causal LM (local directory or Hub id), used instead of `model`.
        dtype: of the Hugging Face model's weights (bf16, fp16, fp32; None: fp32).
        vocab_size: override the config's (e.g. to the tokenizer's).

    Logs `train/loss`, `train/ppl` (exp of the step's loss: the batch's perplexity, without a
    second softmax over the logits), `train/tokens_seen`, `train/tokens_per_sec`, and `val/loss`,
    `val/ppl` (torchmetrics `Perplexity` over the whole validation set).
    """

    def __init__(self, model: str | LlamaConfig | dict = "tiny", lr: float = 1e-3, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.95), warmup_steps: int = 100, max_steps: int = 1000,
                 min_lr_ratio: float = 0.1, activation_checkpointing: bool = False,
                 hf_path: str | None = None, vocab_size: int | None = None, dtype: str | None = None) -> None:
        super().__init__()
        # Saved as plain types, so that checkpoints load with torch.load(weights_only=True).
        model = asdict(model) if isinstance(model, LlamaConfig) else model
        betas = (float(betas[0]), float(betas[1]))
        self.save_hyperparameters()
        self.model = build_model(model, activation_checkpointing, hf_path, vocab_size, dtype)
        self.val_ppl = Perplexity(ignore_index=IGNORE_INDEX)
        self.tokens_seen = 0
        self._last_time: float | None = None

    def forward(self, input_ids: Tensor) -> Tensor:
        out = self.model(input_ids)
        return out.logits if hasattr(out, "logits") else out  # HF models return an output object

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        input_ids, labels = batch
        loss = causal_lm_loss(self(input_ids), labels)
        self.tokens_seen += int(input_ids.numel())
        now = time.perf_counter()
        if self._last_time is not None:
            self.log("train/tokens_per_sec", input_ids.numel() / (now - self._last_time), on_step=True)
        self._last_time = now
        self.log("train/loss", loss, on_step=True, prog_bar=True)
        self.log("train/ppl", loss.detach().exp(), on_step=True)
        self.log("train/tokens_seen", float(self.tokens_seen), on_step=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        input_ids, labels = batch
        logits = self(input_ids)
        self.val_ppl.update(logits.float(), labels)
        self.log("val/loss", causal_lm_loss(logits, labels), prog_bar=True, sync_dist=True)
        self.log("val/ppl", self.val_ppl)

    def on_validation_epoch_end(self) -> None:
        self._last_time = None  # time spent validating is not training throughput

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, betas=tuple(hp.betas),
                                      weight_decay=hp.weight_decay)
        schedule = ScheduleFromConfig(optimizer, WarmupCosine(hp.warmup_steps, hp.max_steps, hp.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokens_seen = int(checkpoint.get("tokens_seen", 0))
