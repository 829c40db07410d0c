"""What a memory plan is computed for: the model's shape and the run's settings (from a recipe or by hand)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qgl.models.llama import LLAMA_CONFIGS, LlamaConfig
from qgl.optim.settings import OFFLOAD_MODES, QGALORE, QGaLoreSettings, SettingError, check_value

if TYPE_CHECKING:
    from qgl.config import RecipeConfig

# Lightning precision -> (bytes of a parameter, bytes of the compute dtype, autocast on).
# "-mixed" keeps fp32 parameters and runs matmuls in bf16/fp16 under autocast; "-true" casts the
# whole module (parameters and floating buffers) to that dtype.
PRECISIONS: dict[str, tuple[int, int, bool]] = {
    "32-true": (4, 4, False), "32": (4, 4, False), "64-true": (8, 8, False), "64": (8, 8, False),
    "bf16-mixed": (4, 2, True), "bf16": (4, 2, True), "16-mixed": (4, 2, True), "16": (4, 2, True),
    "bf16-true": (2, 2, False), "16-true": (2, 2, False),
}
OPTIMIZERS = ("qgalore", "adamw")
OFFLOADS = OFFLOAD_MODES
PLANNABLE_METHODS = ("qgalore", "galore", "full", "adamw")  # recipe methods (qgl.config.METHODS)


_Q = QGALORE
_SHARED = ("layerwise", "offload", "rank", "target_modules", "exclude", "quantize_weights", "group_size",
           "symmetric", "proj_quant", "proj_group_size", "svd_method", "optim_bits", "min_8bit_size",
           "cuda_graphs")


class PlanError(ValueError):
    """A model or setting the planner cannot plan; `str(error)` is one line."""


@dataclass(frozen=True)
class PlanSettings:
    """The settings a plan depends on.

    Attributes:
        batch_size: sequences per micro-batch; seq_len: tokens per sequence.
        accumulate: micro-batches per optimizer step (global batch = batch_size * accumulate).
            Layer-wise updates accumulate in `.grad`, so accumulate > 1 holds a full gradient.
        checkpointing: activation checkpointing of every block.
        precision: Lightning's ("bf16-mixed": fp32 parameters, bf16 autocast; "bf16-true": bf16
            parameters; "32-true": fp32).
        optimizer: "qgalore" (QGaLoreAdamW) or "adamw" (torch AdamW, foreach, on the unquantized
            model: states in the parameters' dtype).
        layerwise: update each parameter in its backward hook (QGaLoreAdamW).
        offload: optimizer states in host memory: None, "cpu" (`qgl.optim.offload.StateOffloader`)
            or "paged" (8-bit codes in CUDA unified memory).
        devices: data-parallel processes (DDP), the plan is per GPU; shard_state: under DDP, each
            matrix's optimizer state on one owner rank (`qgl.optim.distributed`).
        fused_8bit: bitsandbytes' fused 8-bit Adam kernel runs the moments (False: the plain-torch
            reference, with fp32 copies of both moments).
        rank ... min_8bit_size, cuda_graphs: QGaLoreCallback's arguments of the same names
            (`cuda_graphs`: one gradient buffer per matrix shape that the replayed updates read).
    """

    batch_size: int = 1
    seq_len: int = 256
    accumulate: int = 1
    checkpointing: bool = False
    precision: str = "bf16-mixed"
    optimizer: str = "qgalore"
    # The Q-GaLore settings: QGaLoreSettings' fields and defaults (`_Q`), checked by its checks.
    layerwise: bool = _Q["layerwise"]
    offload: str | None = _Q["offload"]
    rank: int = _Q["rank"]
    target_modules: tuple[str, ...] = _Q["target_modules"]
    exclude: tuple[str, ...] = _Q["exclude"]
    quantize_weights: bool = _Q["quantize_weights"]
    group_size: int = _Q["group_size"]
    symmetric: bool = _Q["symmetric"]
    proj_quant: bool = _Q["proj_quant"]
    proj_group_size: int = _Q["proj_group_size"]
    svd_method: str = _Q["svd_method"]
    optim_bits: int = _Q["optim_bits"]
    min_8bit_size: int = _Q["min_8bit_size"]
    cuda_graphs: bool = _Q["cuda_graphs"]
    fused_8bit: bool = True
    devices: int = 1
    shard_state: bool = _Q["shard_state"]

    def __post_init__(self) -> None:
        for name, choices in (("precision", tuple(PRECISIONS)), ("optimizer", OPTIMIZERS)):
            if getattr(self, name) not in choices:
                raise PlanError(f"{name}={getattr(self, name)!r} is not one of {choices}")
        for name in ("batch_size", "seq_len", "accumulate", "devices"):
            if getattr(self, name) < 1:
                raise PlanError(f"{name} must be >= 1, got {getattr(self, name)}")
        try:
            for name in _SHARED:
                check_value(QGaLoreSettings, name, getattr(self, name))
        except SettingError as e:
            raise PlanError(str(e)) from e
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        object.__setattr__(self, "exclude", tuple(self.exclude))

    @property
    def dtype_bytes(self) -> tuple[int, int, bool]:
        """(parameter bytes, compute bytes, autocast) of `precision`."""
        return PRECISIONS[self.precision]

    @property
    def qgalore(self) -> bool:
        return self.optimizer == "qgalore"

    def replace(self, **changes: Any) -> PlanSettings:
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """One line: micro-batch, precision, checkpointing, optimizer and offload."""
        parts = [f"micro-batch {self.batch_size} x {self.seq_len} tokens",
                 f"accumulate {self.accumulate}", self.precision,
                 "checkpointing" if self.checkpointing else "no checkpointing"]
        if self.qgalore:
            parts += ["layer-wise" if self.layerwise else "not layer-wise", f"rank {self.rank}",
                      f"offload {self.offload or 'off'}"]
        else:
            parts.append("torch AdamW")
        if self.devices > 1:  # distributed: DDP, per GPU
            sharded = self.qgalore and self.layerwise and self.shard_state
            parts.append(f"DDP on {self.devices} GPUs" + (", state sharded by matrix" if sharded else ""))
        return ", ".join(parts)

    @classmethod
    def from_recipe(cls, cfg: RecipeConfig) -> PlanSettings:
        """The settings of a resolved recipe (`qgl.config.load_recipe`). Methods: qgalore; galore (float
        weights, float P, exact SVD, as `qgl.callbacks.methods.GALORE`); full / adamw (torch AdamW)."""
        if cfg.method not in PLANNABLE_METHODS:
            raise PlanError(f"method {cfg.method!r} cannot be planned yet "
                            f"(plannable: {', '.join(PLANNABLE_METHODS)})")
        q, galore = cfg.qgalore, cfg.method in ("qgalore", "galore")
        quantized = cfg.method == "qgalore"
        return cls(batch_size=cfg.data.batch_size, seq_len=cfg.data.block_size,
                   accumulate=cfg.trainer.accumulate_grad_batches,
                   checkpointing=cfg.model.activation_checkpointing, precision=cfg.trainer.precision,
                   optimizer="qgalore" if galore else "adamw", layerwise=q.layerwise,
                   offload=q.offload if galore else None, rank=q.rank,
                   target_modules=tuple(q.target_modules), exclude=tuple(q.exclude),
                   quantize_weights=q.quantize_weights and quantized, group_size=q.group_size,
                   symmetric=q.symmetric, proj_quant=q.proj_quant and quantized,
                   proj_group_size=q.proj_group_size,
                   svd_method=q.svd_method if quantized else "full",  # galore: the exact SVD
                   optim_bits=q.optim_bits,
                   min_8bit_size=q.min_8bit_size, shard_state=q.shard_state, cuda_graphs=q.cuda_graphs,
                   devices=(cfg.trainer.devices if isinstance(cfg.trainer.devices, int) else 1)
                   * cfg.trainer.num_nodes)


def model_config(cfg: RecipeConfig) -> tuple[str, LlamaConfig]:
    """(display name, LlamaConfig) of a recipe's model: a built-in size, or the shape read from a
    local Hugging Face directory's config.json (LLaMA-shaped models only)."""
    if cfg.model.hf_path is None:
        return f"LLaMA-{cfg.model.name}", LLAMA_CONFIGS[cfg.model.name]
    path = Path(cfg.model.hf_path).expanduser() / "config.json"
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PlanError(f"{path}: cannot read the model's config ({e}); the plan needs its shape") from e
    try:
        config = LlamaConfig(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                             intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"],
                             num_heads=d["num_attention_heads"],
                             num_kv_heads=d.get("num_key_value_heads"),
                             max_seq_len=d.get("max_position_embeddings", 2048),
                             tie_embeddings=bool(d.get("tie_word_embeddings", False)))
    except KeyError as e:
        raise PlanError(f"{path}: no {e.args[0]!r}: only LLaMA-shaped models can be planned") from e
    return f"{Path(cfg.model.hf_path).name} (LLaMA shape of its config.json)", config
