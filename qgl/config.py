"""Recipe schema and loader: recipes are data (YAML) checked against typed dataclasses.

Each section of a recipe is a dataclass registered as an OmegaConf structured config, so a recipe
can only name keys that exist here, with values of the declared type. `load_recipe` merges, in
order, the schema defaults <- the recipe YAML <- `key=value` overrides, and turns every problem
into a `RecipeError` whose message is one line naming the key and the file, before anything is
built or written. Keys whose value is `???` (OmegaConf's MISSING) must be given by an override.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

# qgl.callbacks.methods holds what each does; "adamw" is the former name of "full" (kept as an alias).
METHODS = ("full", "adamw8bit", "lora", "qlora", "galore", "qgalore", "adamw")
WANDB_MODES = (None, "online", "offline", "disabled")
PROFILERS = (None, "simple", "advanced", "pytorch")
PRECISIONS = ("32-true", "32", "16-mixed", "16", "bf16-mixed", "bf16", "16-true", "bf16-true", "64-true",
              "64")
DEFAULT_RECIPE = "tiny.yaml"
RECIPES_DIR = Path(__file__).parent / "recipes"  # a symlink to the repo's recipes/ (copied into wheels)


def _f(default: Any, help: str) -> Any:
    """A dataclass field with a help line (shown by `qgl train --help`); lists get a default_factory."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    name: str = _f("tiny", "built-in LLaMA size: tiny, 60m, 130m, 350m, 1b, 7b")
    hf_path: str | None = _f(None, "Hugging Face causal LM: a local directory or a Hub id (fine-tuning); "
                             "overrides name")
    activation_checkpointing: bool = _f(False, "recompute each block in backward to save activations")
    dtype: str | None = _f(None, "dtype the Hugging Face model is loaded in: bf16, fp16, fp32 (null: fp32)")


@dataclass
class DataConfig:
    source: str = _f("embedded", "'embedded' (bundled corpus), a local .txt/.jsonl file or folder, "
                     "or hf:<dataset>[:<config>]")
    block_size: int = _f(128, "tokens per training sequence")
    batch_size: int = _f(8, "sequences per batch per device")
    val_fraction: float = _f(0.05, "fraction of the token stream held out for validation")
    num_workers: int = _f(0, "DataLoader worker processes")
    tokenizer: str | None = _f(None, "'byte' or a local HF tokenizer dir (null: model.hf_path, else byte)")
    text_field: str = _f("text", "field of each .jsonl line that holds the text")
    format: str = _f("text", "'text' (pre-training stream) or 'sft': JSON lines of {prompt, response} or "
                     "{messages} (chat template), loss on the responses only (qgl.data.sft)")
    packing: bool = _f(True, "sft: pack examples into full blocks (false: one padded example a row)")


@dataclass
class QGaLoreConfig:
    rank: int = _f(256, "rank of the gradient subspace")
    target_modules: list[str] = _f(["attn", "mlp"], "name patterns of the Linear layers Q-GaLore trains")
    exclude: list[str] = _f(["lm_head"], "name patterns left to plain (8-bit) AdamW")
    quantize_weights: bool = _f(True, "store target weights in INT8 (stochastic-rounding updates)")
    group_size: int = _f(256, "INT8 weight quantization group")
    symmetric: bool = _f(True, "symmetric INT8 weight groups")
    update_proj_gap: int = _f(200, "steps between subspace refreshes (SVDs), before adaptation")
    scale: float = _f(0.25, "GaLore scale alpha of the projected-back update")
    proj_quant: bool = _f(True, "store projections in INT4")
    proj_group_size: int = _f(256, "INT4 projection quantization group")
    adaptive: bool = _f(True, "lengthen a layer's gap while its subspace stays put")
    cos_threshold: float = _f(0.4, "mean cosine similarity that counts as 'stable'")
    gamma_proj: float = _f(2.0, "factor applied to a stable layer's gap")
    queue_size: int = _f(5, "cosine similarities averaged before deciding")
    max_gap: int | None = _f(None, "cap on a layer's gap (null: none)")
    svd_method: str = _f("full", "how projections are computed")
    optim_bits: int = _f(8, "bits of the Adam moments (8 or 32)")
    min_8bit_size: int = _f(4096, "tensors smaller than this keep 32-bit moments")
    layerwise: bool = _f(True, "update each layer during backward (no full gradient in memory)")
    layerwise_clip_norm: float | None = _f(None, "per-layer gradient clipping when layerwise")
    offload: str | None = _f(None, "optimizer states in host memory between layer updates: null (off), "
                             "cpu (pinned, prefetched), paged (bitsandbytes unified memory, CUDA)")


@dataclass
class LoRAConfig:
    r: int = _f(16, "rank of the LoRA adapters (methods lora, qlora)")
    alpha: float = _f(32.0, "LoRA scale numerator: the update is alpha / r * B A x")
    dropout: float = _f(0.0, "dropout on the adapters' input")
    target_modules: list[str] = _f(["attn", "mlp"], "name patterns of the Linear layers that get adapters")
    exclude: list[str] = _f(["lm_head"], "name patterns left without adapters")
    trainable: list[str] = _f([], "name patterns of other parameters left trainable (default: all frozen)")


@dataclass
class OptimConfig:
    lr: float = _f(1e-3, "peak learning rate")
    weight_decay: float = _f(0.0, "decoupled weight decay")
    betas: list[float] = _f([0.9, 0.95], "Adam betas")
    warmup_steps: int = _f(100, "linear warm-up steps")
    min_lr_ratio: float = _f(0.1, "cosine decay floor, as a fraction of lr")


@dataclass
class TrainerConfig:
    max_steps: int = _f(200, "optimizer steps to train")
    precision: str = _f("32-true", "Lightning precision: 32-true, bf16-mixed, 16-mixed, bf16-true ...")
    accelerator: str = _f("auto", "cpu, gpu, auto")
    devices: int = _f(1, "devices (GPUs) to use")
    log_every_n_steps: int = _f(10, "steps between logged metrics")
    val_check_interval: int | None = _f(None, "steps between validations (null: once, at the end)")
    limit_val_batches: int | None = _f(None, "validation batches per check (null: all)")
    gradient_clip_val: float | None = _f(None, "global gradient-norm clip (null: none)")
    accumulate_grad_batches: int = _f(1, "micro-batches per optimizer step")
    profiler: str | None = _f(None, "Lightning profiler: simple, advanced, pytorch (report in the run dir)")
    memory_snapshot_step: int | None = _f(None, "CUDA: record the allocator over this optimizer step (0: the "
                                          "first); snapshot and what its peak held in the run dir")


@dataclass
class LoggerConfig:
    wandb: bool = _f(True, "log to Weights & Biases (false: CSV files)")
    project: str = _f("qgl", "W&B project / CSV folder name")
    name: str | None = _f(None, "run name (null: generated)")
    save_dir: str = _f("runs", "where run directories go")
    mode: str | None = _f(None, "W&B mode online/offline/disabled (null: offline unless a W&B key is set)")


@dataclass
class CheckpointConfig:
    dir: str = _f("checkpoints", "checkpoint directory")
    every_n_steps: int | None = _f(100, "steps between checkpoints (null: only last)")
    save_last: bool = _f(True, "keep last.ckpt with the final state")


@dataclass
class RecipeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: str = _f("qgalore", "training method: full (adamw), adamw8bit, lora, qlora, galore, qgalore")
    qgalore: QGaLoreConfig = field(default_factory=QGaLoreConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    seed: int = _f(0, "global seed (model init, data order, stochastic rounding)")
    ckpt_path: str | None = _f(None, "checkpoint to resume from ('last' or a path)")


class RecipeError(Exception):
    """A bad recipe or override; `str(error)` is one line naming the file and the key."""

    def __init__(self, line: str, *, file: str | None = None, key: str | None = None) -> None:
        super().__init__(line)
        self.line, self.file, self.key = line, file, key


# ---------------------------------------------------------------- recipe files
def bundled_recipes() -> list[str]:
    """Bundled recipes, relative to the bundled directory, e.g. 'pretrain/llama_60m.yaml'."""
    return sorted(p.relative_to(RECIPES_DIR).as_posix() for p in RECIPES_DIR.rglob("*.yaml"))


def resolve_recipe(recipe: str | os.PathLike | None) -> Path:
    """An existing path as given, else a bundled recipe name ('.yaml' optional); None: tiny.yaml."""
    if recipe is None:
        return RECIPES_DIR / DEFAULT_RECIPE
    path = Path(recipe).expanduser()
    if path.is_file():
        return path
    for candidate in (RECIPES_DIR / str(recipe), RECIPES_DIR / f"{recipe}.yaml"):
        if candidate.is_file():
            return candidate
    hint = "; it looks like a recipe key: give it as key=value" if _field_type(str(recipe)) else ""
    raise RecipeError(f"{recipe}: recipe file not found (not a file, nor a bundled recipe; "
                      f"`qgl recipes` lists those){hint}", file=str(recipe))


def _display(path: Path) -> str:
    """`path` relative to the working directory when inside it, else as is."""
    rel = os.path.relpath(path)
    return path.as_posix() if rel.startswith("..") else rel


# ---------------------------------------------------------------- error messages
def _field_type(key: str) -> Any:
    """The declared type of a dotted key ('optim.betas[1]' -> float), or None if unknown."""
    tp: Any = RecipeConfig
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", key):
        if part.startswith("["):
            args = typing.get_args(tp)
            tp = args[0] if args else None
        elif dataclasses.is_dataclass(tp):
            tp = typing.get_type_hints(tp).get(part)
        else:
            return None
    return tp


def type_name(tp: Any) -> str:
    """A schema annotation in words: 'int', 'int or null', 'list of float', 'a section (mapping)'."""
    if dataclasses.is_dataclass(tp):
        return "a section (mapping)"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names + (["null"] if type(None) in args else []))
    if origin is list:
        return f"list of {type_name(args[0])}" if args else "list"
    return getattr(tp, "__name__", str(tp))


def _explain(err: OmegaConfBaseException, where: str, key: str = "", fallback: Any = None) -> RecipeError:
    """One line for an OmegaConf error raised while merging into the schema (`key`, `fallback`: the key
    and value to name when the error does not, e.g. for a scalar given for a whole section)."""
    key = (getattr(err, "full_key", "") or "").strip() or key
    msg = str(getattr(err, "msg", err)).splitlines()[0]
    if isinstance(err, ConfigKeyError) or "not in" in msg:
        hint = re.search(r"Did you mean: '([^']+)'", msg)
        more = f" (did you mean '{hint.group(1)}'?)" if hint else ""
        return RecipeError(f"{where}: unknown key '{key}'{more}", file=where, key=key)
    if isinstance(err, ValidationError):
        value = getattr(err, "value", None)
        value = value if value is not None else fallback
        tp = _field_type(key)
        expected = type_name(tp) if tp is not None else msg
        return RecipeError(f"{where}: key '{key}': expected {expected}, got {value!r}", file=where, key=key)
    return RecipeError(f"{where}: key '{key}': {msg}", file=where, key=key)


# ---------------------------------------------------------------- loading
_OVERRIDE = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*|\[\d+\])*=")


def _read_yaml(path: Path, where: str) -> DictConfig:
    try:
        loaded = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError, UnicodeDecodeError, OSError
        first = " ".join(str(e).split())
        raise RecipeError(f"{where}: not valid YAML: {first}", file=where) from e
    if loaded is None:
        return OmegaConf.create({})
    if not isinstance(loaded, DictConfig):
        raise RecipeError(f"{where}: a recipe is a mapping of sections, got a list", file=where)
    return loaded


def _check_sections(node: DictConfig, schema: type, where: str, prefix: str = "") -> None:
    """A scalar where the schema has a section: OmegaConf's error would not name the key."""
    hints = typing.get_type_hints(schema)
    for key in node:
        tp = hints.get(str(key))
        if dataclasses.is_dataclass(tp):
            value = node._get_node(key)
            if not isinstance(value, DictConfig):
                raise RecipeError(f"{where}: key '{prefix}{key}': expected a section (mapping), got "
                                  f"{value._value()!r}", file=where, key=f"{prefix}{key}")
            _check_sections(value, tp, where, f"{prefix}{key}.")


def _merge_override(cfg: DictConfig, override: str, where: str) -> DictConfig:
    if not _OVERRIDE.match(override):
        raise RecipeError(f"{where}: bad override {override!r}: expected key=value, "
                          "e.g. trainer.max_steps=100", file=where)
    key, _, raw = override.partition("=")
    try:
        dot = OmegaConf.from_dotlist([override])
    except Exception as e:
        raise RecipeError(f"{where}: bad override {override!r}: key '{key}': value is not valid YAML "
                          f"({str(e).splitlines()[0]})", file=where, key=key) from e
    try:
        return OmegaConf.merge(cfg, dot)
    except OmegaConfBaseException as e:
        raise _explain(e, f"{where}: override {override!r}", key, raw) from e


def _check_choice(value: Any, choices: tuple, key: str, where: str) -> None:
    if value not in choices:
        shown = ", ".join("null" if c is None else str(c) for c in choices)
        raise RecipeError(f"{where}: key '{key}': {value!r} is not one of: {shown}", file=where, key=key)


def _check_qgalore(cfg: RecipeConfig, where: str) -> None:
    """Combinations QGaLoreCallback refuses at set-up, reported before anything is built."""
    t, q = cfg.trainer, cfg.qgalore
    problems = {"trainer.devices": (t.devices != 1, f"qgalore runs on 1 device for now, got {t.devices}")}
    if q.layerwise:
        problems["trainer.gradient_clip_val"] = (
            t.gradient_clip_val is not None,
            "global clipping cannot run with qgalore.layerwise=true; use qgalore.layerwise_clip_norm "
            "or qgalore.layerwise=false")
        problems["trainer.precision"] = (
            t.precision in ("16-mixed", "16"),
            "16-mixed cannot run with qgalore.layerwise=true (GradScaler); use bf16-mixed or layerwise=false")
    for key, (bad, why) in problems.items():
        if bad:
            raise RecipeError(f"{where}: key '{key}': {why}", file=where, key=key)


def _validate(cfg: RecipeConfig, where: str) -> None:
    """Checks the schema cannot express: choices and ranges."""
    _check_choice(cfg.method, METHODS, "method", where)
    _check_choice(cfg.logger.mode, WANDB_MODES, "logger.mode", where)
    _check_choice(cfg.trainer.precision, PRECISIONS, "trainer.precision", where)
    _check_choice(cfg.trainer.profiler, PROFILERS, "trainer.profiler", where)
    _check_choice(cfg.data.format, ("text", "sft"), "data.format", where)
    _check_choice(cfg.model.dtype, (None, "bf16", "fp16", "fp32"), "model.dtype", where)
    if cfg.model.hf_path is None:
        from qgl.models.llama import LLAMA_CONFIGS

        _check_choice(cfg.model.name, tuple(LLAMA_CONFIGS), "model.name", where)
    if cfg.method in ("qgalore", "galore"):
        _check_qgalore(cfg, where)
        _check_choice(cfg.qgalore.offload, (None, "cpu", "paged"), "qgalore.offload", where)
    if len(cfg.optim.betas) != 2:
        raise RecipeError(f"{where}: key 'optim.betas': expected 2 values, got {cfg.optim.betas}",
                          file=where, key="optim.betas")
    positive = {"trainer.max_steps": cfg.trainer.max_steps, "data.block_size": cfg.data.block_size,
                "data.batch_size": cfg.data.batch_size, "qgalore.rank": cfg.qgalore.rank,
                "lora.r": cfg.lora.r, "trainer.accumulate_grad_batches": cfg.trainer.accumulate_grad_batches,
                "checkpoint.every_n_steps": cfg.checkpoint.every_n_steps,
                "trainer.val_check_interval": cfg.trainer.val_check_interval}
    for key, value in positive.items():
        if value is not None and value < 1:
            raise RecipeError(f"{where}: key '{key}': must be >= 1, got {value}", file=where, key=key)
    step = cfg.trainer.memory_snapshot_step
    if step is not None and not 0 <= step < cfg.trainer.max_steps:
        raise RecipeError(f"{where}: key 'trainer.memory_snapshot_step': must be a step in [0, "
                          f"trainer.max_steps={cfg.trainer.max_steps}), got {step}",
                          file=where, key="trainer.memory_snapshot_step")
    if not 0.0 <= cfg.lora.dropout < 1.0:
        raise RecipeError(f"{where}: key 'lora.dropout': must be in [0, 1), got {cfg.lora.dropout}",
                          file=where, key="lora.dropout")


def load_recipe(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> RecipeConfig:
    """Schema <- recipe YAML (`path`: a file, or a bundled recipe name; None: tiny.yaml) <- `key=value`
    overrides, validated; raises `RecipeError` (one line) on any problem. Has no side effects."""
    recipe = resolve_recipe(path)
    where = _display(recipe)
    cfg = OmegaConf.structured(RecipeConfig)
    loaded = _read_yaml(recipe, where)
    _check_sections(loaded, RecipeConfig, where)
    try:
        cfg = OmegaConf.merge(cfg, loaded)
        # merge() keeps the schema default where the recipe says ???: mark those keys required again.
        for key in OmegaConf.missing_keys(loaded):
            OmegaConf.update(cfg, key, MISSING, merge=False)
    except OmegaConfBaseException as e:
        raise _explain(e, where) from e
    for override in overrides:
        cfg = _merge_override(cfg, override, where)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        keys = ", ".join(f"'{k}'" for k in missing)
        noun = "key" if len(missing) == 1 else "keys"
        raise RecipeError(f"{where}: missing required value for {noun} {keys} (give it as {missing[0]}=...)",
                          file=where, key=missing[0])
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:  # e.g. a broken ${interpolation}
        raise _explain(e, where) from e
    _validate(obj, where)
    return obj


def to_yaml(cfg: RecipeConfig) -> str:
    """The resolved recipe as YAML (what `qgl train` prints before running)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


__all__ = ["RecipeConfig", "RecipeError", "bundled_recipes", "load_recipe", "resolve_recipe", "to_yaml",
           "type_name"]
