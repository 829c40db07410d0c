"""Recipe schema and loader: recipes are data (YAML) checked against typed dataclasses.

Each section of a recipe is a dataclass registered as an OmegaConf structured config, so a recipe
can only name keys that exist here, with values of the declared type. `load_recipe` merges, in
order, the schema defaults <- the recipe YAML <- `key=value` overrides, and turns every problem
into a `RecipeError` whose message is one line naming the key and the file, before anything is
built or written. Keys whose value is `???` (OmegaConf's MISSING) must be given by an override.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from qgl.optim.settings import QGaLoreSettings, SettingError, check_fields, integer, one_of, real, setting

# qgl.callbacks.methods holds what each does; "adamw" is the former name of "full" (kept as an alias).
METHODS = ("full", "adamw8bit", "lora", "qlora", "galore", "qgalore", "adamw")
WANDB_MODES = (None, "online", "offline", "disabled")
PROFILERS = (None, "simple", "advanced", "pytorch")
PRECISIONS = ("32-true", "32", "16-mixed", "16", "bf16-mixed", "bf16", "16-true", "bf16-true", "64-true",
              "64")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")  # Lightning's, less tpu/hpu (qgl's kernels: CUDA or CPU)
DEFAULT_RECIPE = "tiny.yaml"
# The package qgl.recipes (the repository's recipes/, by pyproject's package-dir mapping), wherever it is
# installed; importing it loads no torch (qgl/__init__.py imports lazily).
RECIPES_DIR = Path(str(importlib.resources.files("qgl.recipes")))

_f = setting  # a field with its help line (`qgl train --help`) and its check (qgl.optim.settings)


class _Section:
    """A recipe section: `__post_init__` (OmegaConf's to_object calls it) runs its fields' checks."""

    def __post_init__(self) -> None:
        check_fields(self)


def _betas(name: str, value: Any) -> str | None:
    if len(value) != 2:
        return f"{name} must be 2 values, got {list(value)}"
    bad = [b for b in value if not (isinstance(b, (int, float)) and 0.0 <= b < 1.0)]
    return f"{name} must lie in [0, 1), got {list(value)}" if bad else None


@dataclass
class ModelConfig(_Section):
    name: str = _f("tiny", "built-in LLaMA size: tiny, 60m, 130m, 350m, 1b, 7b")
    hf_path: str | None = _f(None, "Hugging Face causal LM: a local directory or a Hub id (fine-tuning); "
                             "overrides name")
    activation_checkpointing: bool = _f(False, "recompute each block in backward to save activations")
    dtype: str | None = _f(None, "dtype the Hugging Face model is loaded in: bf16, fp16, fp32 (null: fp32)",
                           one_of((None, "bf16", "fp16", "fp32")))


@dataclass
class DataConfig(_Section):
    source: str = _f("embedded", "'embedded' (bundled corpus), a local .txt/.jsonl file or folder, "
                     "or hf:<dataset>[:<config>]")
    block_size: int = _f(128, "tokens per training sequence", integer(1))
    batch_size: int = _f(8, "sequences per batch per device", integer(1))
    val_fraction: float = _f(0.05, "fraction of the token stream held out for validation",
                               real(0.0, 1.0, high_open=True))
    num_workers: int = _f(0, "DataLoader worker processes", integer(0))
    tokenizer: str | None = _f(None, "'byte' or a local HF tokenizer dir (null: model.hf_path, else byte)")
    text_field: str = _f("text", "field of each .jsonl line that holds the text")
    format: str = _f("text", "'text' (pre-training stream) or 'sft': JSON lines of {prompt, response} or "
                     "{messages} (chat template), loss on the responses only (qgl.data.sft)",
                     one_of(("text", "sft")))
    packing: bool = _f(True, "sft: pack examples into full blocks (false: one padded example a row)")


# The recipe section `qgalore` is the one Q-GaLore schema, shared with QGaLoreCallback and the planner.
QGaLoreConfig = QGaLoreSettings


@dataclass
class LoRAConfig(_Section):
    r: int = _f(16, "rank of the LoRA adapters (methods lora, qlora)", integer(1))
    alpha: float = _f(32.0, "LoRA scale numerator: the update is alpha / r * B A x",
                      real(0.0, low_open=True))
    dropout: float = _f(0.0, "dropout on the adapters' input", real(0.0, 1.0, high_open=True))
    target_modules: list[str] = _f(["attn", "mlp"], "name patterns of the Linear layers that get adapters")
    exclude: list[str] = _f(["lm_head"], "name patterns left without adapters")
    trainable: list[str] = _f([], "name patterns of other parameters left trainable (default: all frozen)")


@dataclass
class OptimConfig(_Section):
    lr: float = _f(1e-3, "peak learning rate", real(0.0, low_open=True))
    weight_decay: float = _f(0.0, "decoupled weight decay", real(0.0))
    betas: list[float] = _f([0.9, 0.95], "Adam betas (two, each in [0, 1))", _betas)
    warmup_steps: int = _f(100, "linear warm-up steps", integer(0))
    min_lr_ratio: float = _f(0.1, "cosine decay floor, as a fraction of lr", real(0.0, 1.0))


def _devices(name: str, value: Any) -> str | None:
    """distributed: a device count >= 1, or auto."""
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return None
    return f"{name} must be a number >= 1 or auto, got {value!r}"


@dataclass
class TrainerConfig(_Section):
    max_steps: int = _f(200, "optimizer steps to train", integer(1))
    precision: str = _f("32-true", "Lightning precision: 32-true, bf16-mixed, 16-mixed, bf16-true ...",
                         one_of(PRECISIONS))
    accelerator: str = _f("auto", "cpu, gpu (cuda), mps, auto", one_of(ACCELERATORS))
    devices: int | str = _f(1, "devices (GPUs) per node: a number, or auto", _devices)
    strategy: str = _f("auto", "Lightning strategy: auto, ddp (qgalore/galore: state sharded by matrix) ...")
    num_nodes: int = _f(1, "machines (each with `devices` devices)", integer(1))
    log_every_n_steps: int = _f(10, "steps between logged metrics", integer(1))
    val_check_interval: int | None = _f(None, "steps between validations (null: once, at the end)",
                                        integer(1, optional=True))
    limit_val_batches: int | None = _f(None, "validation batches per check (null: all)",
                                       integer(0, optional=True))
    gradient_clip_val: float | None = _f(None, "global gradient-norm clip (null: none)",
                                           real(0.0, optional=True))
    accumulate_grad_batches: int = _f(1, "micro-batches per optimizer step", integer(1))
    profiler: str | None = _f(None, "Lightning profiler: simple, advanced, pytorch (report in the run dir)",
                               one_of(PROFILERS))
    memory_snapshot_step: int | None = _f(None, "CUDA: record the allocator over this optimizer step (0: the "
                                          "first); snapshot and what its peak held in the run dir",
                                          integer(0, optional=True))


@dataclass
class LoggerConfig(_Section):
    wandb: bool = _f(True, "log to Weights & Biases (false: CSV files)")
    project: str = _f("qgl", "W&B project / CSV folder name")
    name: str | None = _f(None, "run name (null: generated)")
    save_dir: str = _f("runs", "where run directories go")
    mode: str | None = _f(None, "W&B mode online/offline/disabled (null: offline unless a W&B key is set)",
                          one_of(WANDB_MODES))


@dataclass
class CheckpointConfig(_Section):
    dir: str = _f("checkpoints", "checkpoint directory")
    every_n_steps: int | None = _f(100, "steps between checkpoints (null: only last)",
                                      integer(1, optional=True))
    save_last: bool = _f(True, "keep last.ckpt with the final state")


@dataclass
class RecipeConfig(_Section):
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: str = _f("qgalore", "training method: full (adamw), adamw8bit, lora, qlora, galore, qgalore",
                     one_of(METHODS))
    qgalore: QGaLoreConfig = field(default_factory=QGaLoreConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    seed: int = _f(0, "global seed (model init, data order, stochastic rounding)", integer(0))
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
    """A scalar where the schema has a section: OmegaConf's error would not name the key. A bool key
    given a number or a string: OmegaConf would turn 2 into true."""
    hints = typing.get_type_hints(schema)
    for key in node:
        tp = hints.get(str(key))
        value = node._get_node(key)
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, DictConfig):
                raise RecipeError(f"{where}: key '{prefix}{key}': expected a section (mapping), got "
                                  f"{value._value()!r}", file=where, key=f"{prefix}{key}")
            _check_sections(value, tp, where, f"{prefix}{key}.")
        elif tp in (bool, bool | None) and not isinstance(value, DictConfig):
            raw = value._value()
            unset = raw is None and tp is not bool
            if not (isinstance(raw, bool) or unset or OmegaConf.is_missing(node, key)
                    or OmegaConf.is_interpolation(node, key)):
                raise RecipeError(f"{where}: key '{prefix}{key}': expected {type_name(tp)}, got {raw!r}",
                                  file=where, key=f"{prefix}{key}")


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
    _check_sections(dot, RecipeConfig, f"{where}: override {override!r}")
    try:
        return OmegaConf.merge(cfg, dot)
    except OmegaConfBaseException as e:
        raise _explain(e, f"{where}: override {override!r}", key, raw) from e


def _check_qgalore(cfg: RecipeConfig, where: str) -> None:
    """Combinations QGaLoreCallback refuses at set-up, reported before anything is built."""
    t, q = cfg.trainer, cfg.qgalore
    # distributed: one device or DDP (qgl/callbacks/distributed.py says why FSDP is refused).
    why = ": FSDP would shard the whole matrices a (Q-)GaLore update needs" if "fsdp" in t.strategy else ""
    problems = {"trainer.strategy": (
        t.strategy.split("_")[0] not in ("auto", "ddp", "single"),
        f"{cfg.method} runs on one device or under strategy=ddp (state sharded by matrix), "
        f"not {t.strategy!r}{why}")}
    sharded_step = t.strategy.startswith("ddp") and not q.layerwise and q.shard_state
    problems["qgalore.shard_state"] = (
        sharded_step and (t.gradient_clip_val is not None or t.precision in ("16-mixed", "16")),
        "with qgalore.layerwise=false each rank holds only its own matrices' gradients: global clipping "
        "and 16-mixed need qgalore.shard_state=false")
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


def _check_choice(value: Any, choices: tuple, key: str, where: str) -> None:
    if value not in choices:
        shown = ", ".join("null" if c is None else str(c) for c in choices)
        raise RecipeError(f"{where}: key '{key}': {value!r} is not one of: {shown}", file=where, key=key)


def _check_rank(cfg: RecipeConfig, where: str) -> None:
    """GaLore's rank must fit every projected layer: shapes from the built-in LLaMA table or the
    model's config.json (the planner's), without building the model. Skipped when the shape is
    unknown (an hf_path without a LLaMA-shaped config.json): the optimizer checks it at build."""
    from qgl.plan.inventory import galore_problem
    from qgl.plan.settings import PlanError, model_config

    try:
        _, config = model_config(cfg)
    except PlanError:
        return
    q = cfg.qgalore
    problem = galore_problem(config, q.rank, q.target_modules, q.exclude)
    # An hf_path model's module names are not the built-in model's: only the rank is checked there.
    if problem is not None and not (cfg.model.hf_path is not None and problem[0] == "target_modules"):
        field, why = problem
        raise RecipeError(f"{where}: key 'qgalore.{field}': {why}", file=where, key=f"qgalore.{field}")


def _validate(cfg: RecipeConfig, where: str) -> None:
    """Checks across sections (each section checked its own fields when it was built)."""
    if cfg.model.hf_path is None:
        from qgl.models.llama import LLAMA_CONFIGS

        _check_choice(cfg.model.name, tuple(LLAMA_CONFIGS), "model.name", where)
        longest = LLAMA_CONFIGS[cfg.model.name].max_seq_len  # the RoPE cache: the forward refuses longer
        if cfg.data.block_size > longest:
            raise RecipeError(f"{where}: key 'data.block_size': {cfg.data.block_size} is longer than model "
                              f"{cfg.model.name}'s max_seq_len {longest}", file=where, key="data.block_size")
    from lightning.pytorch.strategies import StrategyRegistry

    known = ("auto", *StrategyRegistry.available_strategies())
    if cfg.trainer.strategy not in known:
        raise RecipeError(f"{where}: key 'trainer.strategy': unknown Lightning strategy "
                          f"{cfg.trainer.strategy!r} (e.g. auto, ddp, ddp_spawn, fsdp, deepspeed)",
                          file=where, key="trainer.strategy")
    if cfg.trainer.strategy.startswith("fsdp") and cfg.trainer.accelerator == "cpu":
        # Lightning's FSDPStrategy needs CUDA; its own refusal comes only once the Trainer is built.
        raise RecipeError(f"{where}: key 'trainer.strategy': {cfg.trainer.strategy!r} needs GPUs "
                          "(trainer.accelerator=gpu); on CPU use trainer.strategy=ddp",
                          file=where, key="trainer.strategy")
    if cfg.method in ("qgalore", "galore"):
        _check_qgalore(cfg, where)
        _check_rank(cfg, where)
    step = cfg.trainer.memory_snapshot_step
    if step is not None and not 0 <= step < cfg.trainer.max_steps:
        raise RecipeError(f"{where}: key 'trainer.memory_snapshot_step': must be a step in [0, "
                          f"trainer.max_steps={cfg.trainer.max_steps}), got {step}",
                          file=where, key="trainer.memory_snapshot_step")


def _sections(schema: type | None = None, prefix: str = "") -> dict[type, str]:
    """{section class: its key prefix}, e.g. {OptimConfig: 'optim.', RecipeConfig: ''}."""
    schema = schema or RecipeConfig
    out = {schema: prefix}
    for name, tp in typing.get_type_hints(schema).items():
        if dataclasses.is_dataclass(tp):
            out.update(_sections(tp, f"{prefix}{name}."))
    return out


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
        obj = OmegaConf.to_object(cfg)  # builds the dataclasses: each section checks its fields
    except OmegaConfBaseException as e:  # e.g. a broken ${interpolation}
        raise _explain(e, where) from e
    except SettingError as e:
        key = _sections().get(e.owner, "") + e.field
        raise RecipeError(f"{where}: key '{key}': {e}", file=where, key=key) from e
    _validate(obj, where)
    return obj


def to_yaml(cfg: RecipeConfig) -> str:
    """The resolved recipe as YAML (what `qgl train` prints before running)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


__all__ = ["RecipeConfig", "RecipeError", "bundled_recipes", "load_recipe", "resolve_recipe", "to_yaml",
           "type_name"]
