"""`qgl` command line: `qgl train [RECIPE] [key=value ...]`, `qgl recipes`, `qgl plan [RECIPE] [...]`,
`qgl export CKPT --to DIR`, `qgl eval CKPT_OR_DIR --data SOURCE`.

The command only parses, resolves and prints the recipe; training lives in `qgl.lightning.run`
(imported lazily, so `qgl --help` and recipe errors answer without loading torch/Lightning).
A bad recipe or override prints one line to stderr and exits with code 2 before anything is
created on disk.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
import typing
from collections.abc import Sequence
from typing import Any

from qgl._ranks import is_launched_rank
from qgl.config import (
    DEFAULT_RECIPE,
    RECIPES_DIR,
    RecipeConfig,
    RecipeError,
    bundled_recipes,
    load_recipe,
    resolve_recipe,
    to_yaml,
    type_name,
)

EXIT_RECIPE_ERROR = 2
EXIT_RUN_ERROR = 1  # a run that could not start or stopped: bad data, checkpoint, output dir, NaN


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each option (not after the positional list), and epilogs printed as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return super()._get_help_string(action) if action.option_strings else action.help


def _fmt_default(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def recipe_keys() -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, help) of every recipe key, in schema order, from the dataclasses."""
    rows: list[tuple[str, str, Any, str]] = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            rows.append((prefix + f.name, type_name(tp), default, f.metadata.get("help", "")))

    walk(RecipeConfig, "")
    return rows


def _keys_epilog() -> str:
    rows = recipe_keys()
    width = max(len(f"{k}={_fmt_default(d)}") for k, _, d, _ in rows) + 2
    lines = ["recipe keys (override any with key=value; shown with their schema defaults):"]
    section = None
    for key, tp, default, help_ in rows:
        head = key.split(".")[0] if "." in key else ""
        if head != section:
            section = head
            lines.append(f"  [{head or 'top level'}]")
        lines.append(f"    {f'{key}={_fmt_default(default)}':<{width}}{tp}. {help_}")
    lines.append("")
    lines.append(f"RECIPE: a YAML path, or a bundled recipe name (`qgl recipes`); default {DEFAULT_RECIPE}.")
    lines += ["examples:", "  qgl train", "  qgl train trainer.max_steps=50 logger.wandb=false",
              "  qgl train pretrain/llama_60m data.source=/data/c4_txt trainer.max_steps=1000",
              "  qgl train my_recipe.yaml optim.betas=[0.9,0.99] ckpt_path=last"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The `qgl` argument parser (sub-commands `train` and `recipes`)."""
    parser = argparse.ArgumentParser(
        prog="qgl", formatter_class=_Formatter,
        description="Q-GaLore for PyTorch Lightning: train LLMs with INT8 weights, INT4 projections and "
                    "8-bit low-rank Adam from OmegaConf recipes.",
        epilog="Run `qgl train --help` for every recipe key and its default.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    train = sub.add_parser(
        "train", formatter_class=_Formatter, epilog=_keys_epilog(),
        help="train from a recipe (default: tiny.yaml, a quick CPU run on the embedded corpus)",
        description="Resolve RECIPE with the key=value overrides, print it as YAML, and train.")
    train.add_argument("args", nargs="*", metavar="RECIPE|key=value",
                       help="an optional recipe (path or bundled name) first, then key=value overrides")
    train.add_argument("--dry-run", action="store_true",
                       help="print the resolved recipe and exit without training")
    sub.add_parser("recipes", formatter_class=_Formatter, help="list the bundled recipes",
                   description=f"List the recipes bundled in {RECIPES_DIR}.")
    plan = sub.add_parser(
        "plan", formatter_class=_Formatter, help="predict a recipe's peak GPU memory and its parts",
        description="Resolve RECIPE with the key=value overrides and print its memory plan (qgl.plan): the "
                    "predicted peak of torch.cuda.max_memory_allocated and its parts, without building "
                    "anything. With --gpu-mem, also the settings (offload, activation checkpointing, "
                    "micro-batch with accumulation keeping the global batch) that fit. data.source is not "
                    "needed.",
        epilog="examples:\n  qgl plan pretrain/llama_7b --gpu-mem 16GiB\n"
               "  qgl plan pretrain/llama_1b data.batch_size=8 qgalore.offload=cpu")
    plan.add_argument("args", nargs="*", metavar="RECIPE|key=value",
                      help="an optional recipe (path or bundled name) first, then key=value overrides")
    plan.add_argument("--gpu-mem", metavar="SIZE", help="GPU memory budget, e.g. 16GiB, 80GB, 12000MiB")
    plan.add_argument("--devices", type=int, metavar="N", default=None,
                      help="GPUs under DDP (default: the recipe's trainer.devices x num_nodes); the plan "
                           "is per GPU, with the optimizer state sharded by matrix (qgalore.shard_state)")
    _add_hf_commands(sub)
    return parser


def _add_hf_commands(sub: Any) -> None:
    """`qgl export` and `qgl eval` (qgl.hf_export, qgl.evaluate)."""
    export = sub.add_parser(
        "export", formatter_class=_Formatter, help="write a checkpoint as a Hugging Face model directory",
        description="Dequantize the INT8 layers and merge the LoRA adapters of a `qgl train` checkpoint and "
                    "write a Hugging Face directory (safetensors, config, tokenizer) that "
                    "`AutoModelForCausalLM.from_pretrained` loads without qgl.",
        epilog="example:\n  qgl export runs/qgl/tiny/checkpoints/last.ckpt --to my-model --dtype bf16")
    export.add_argument("ckpt", metavar="CKPT", help="a checkpoint written by `qgl train`")
    export.add_argument("--to", required=True, metavar="DIR", help="the directory to write (must not exist, "
                        "or be empty, unless --overwrite)")
    export.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="weights' dtype")
    export.add_argument("--tokenizer", metavar="DIR", help="tokenizer to save beside it (default: the "
                        "checkpoint's model.hf_path, when it has one)")
    export.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    ev = sub.add_parser(
        "eval", formatter_class=_Formatter, help="loss and perplexity of a checkpoint or model dir on data",
        description="Loss (mean cross entropy over every labelled token) and perplexity of a `qgl train` "
                    "checkpoint or a Hugging Face model directory on a data source.",
        epilog="examples:\n  qgl eval my-model --data val.txt\n"
               "  qgl eval checkpoints/last.ckpt --data chat.jsonl --format sft --block-size 512")
    ev.add_argument("model", metavar="CKPT_OR_DIR", help="a checkpoint or a Hugging Face model directory")
    ev.add_argument("--data", required=True, metavar="SOURCE", help="embedded, a .txt/.jsonl file or folder")
    ev.add_argument("--format", default="text", choices=("text", "sft"), help="as the recipe key data.format")
    ev.add_argument("--tokenizer", help="'byte' or a tokenizer directory (default: the model's own)")
    ev.add_argument("--block-size", type=int, default=256, help="tokens per sequence")
    ev.add_argument("--batch-size", type=int, default=8, help="sequences per batch")
    ev.add_argument("--max-batches", type=int, help="stop after this many batches (default: all)")
    ev.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")


def cmd_export(ns: argparse.Namespace) -> int:
    """`qgl export`: exit 2 with one line on a bad checkpoint or destination."""
    from qgl.hf_export import export

    try:
        out = export(ns.ckpt, ns.to, dtype=ns.dtype, tokenizer=ns.tokenizer, overwrite=ns.overwrite)
    except (ValueError, FileNotFoundError, OSError) as e:
        return _fail(e, EXIT_RECIPE_ERROR)
    print(f"exported {ns.ckpt} -> {out} ({ns.dtype}); load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


def cmd_eval(ns: argparse.Namespace) -> int:
    """`qgl eval`: print loss and perplexity; exit 2 with one line on bad input."""
    import torch

    from qgl.evaluate import evaluate

    device = ("cuda" if torch.cuda.is_available() else "cpu") if ns.device == "auto" else ns.device
    try:
        r = evaluate(ns.model, ns.data, tokenizer=ns.tokenizer, block_size=ns.block_size,
                     batch_size=ns.batch_size, format=ns.format, max_batches=ns.max_batches, device=device)
    except (ValueError, FileNotFoundError, OSError) as e:
        return _fail(e, EXIT_RECIPE_ERROR)
    print(f"{ns.model} on {ns.data}: loss {r['loss']:.4f}, perplexity {r['ppl']:.2f} "
          f"({r['tokens']} tokens, {r['batches']} batches)")
    return 0


def _split(args: Sequence[str]) -> tuple[str | None, list[str]]:
    """(recipe, overrides): the first argument is the recipe unless it looks like key=value."""
    if args and "=" not in args[0]:
        return args[0], list(args[1:])
    return None, list(args)


def _describe(name: str) -> str:
    """First comment line of a bundled recipe, as its one-line description."""
    for line in (RECIPES_DIR / name).read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def cmd_recipes() -> int:
    """Print the bundled recipes, one per line with their description."""
    names = bundled_recipes()
    width = max((len(n) for n in names), default=0) + 2
    print(f"bundled recipes ({RECIPES_DIR}):")
    for name in names:
        print(f"  {name.removesuffix('.yaml'):<{width}}{_describe(name)}")
    return 0


def _fail(error: BaseException, code: int) -> int:
    """Print `error` as qgl's one error line on stderr; return the exit code `code`."""
    line = str(error).splitlines()[0] if str(error) else type(error).__name__
    print(f"qgl: error: {line}", file=sys.stderr)
    return code


def cmd_train(args: Sequence[str], dry_run: bool = False) -> int:
    """Resolve the recipe (exit 2 on a RecipeError, having created nothing), print it, run it."""
    recipe, overrides = _split(args)
    try:
        cfg = load_recipe(recipe, overrides)
        path = resolve_recipe(recipe)
    except RecipeError as e:
        return _fail(e, EXIT_RECIPE_ERROR)
    # distributed: Lightning's DDP launcher re-runs this command on the other ranks; rank 0 prints.
    if not is_launched_rank():
        print(f"# recipe: {path}" + (f"  overrides: {' '.join(overrides)}" if overrides else ""))
        print(to_yaml(cfg), end="", flush=True)
    if dry_run:
        return 0
    from qgl.callbacks.finite import NonFiniteError
    from qgl.data.dataset import DataError
    from qgl.lightning.checkpoint import CheckpointError
    from qgl.lightning.resume import RunSetupError
    from qgl.lightning.run import run

    try:
        run(cfg)
    except (RunSetupError, CheckpointError, DataError, NonFiniteError) as e:
        return _fail(e, EXIT_RUN_ERROR)
    return 0


_UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "kb": 10**3, "m": 2**20, "mib": 2**20, "mb": 10**6,
          "g": 2**30, "gib": 2**30, "gb": 10**9, "t": 2**40, "tib": 2**40, "tb": 10**12}


def parse_size(text: str) -> int:
    """Bytes of '16GiB', '16G' (binary), '80GB' (decimal), '12000MiB', '1e9'; ValueError otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if not m or m.group(2) not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"--gpu-mem {text!r}: expected a size such as 16GiB, 80GB or 12000MiB")
    size = float(m.group(1)) * _UNITS[m.group(2)]
    if not math.isfinite(size) or size < 1:  # 1e400 is inf; 1e-9 rounds to no byte
        raise ValueError(f"--gpu-mem {text!r}: not a usable size (expected e.g. 16GiB, 80GB or 12000MiB)")
    return int(size)


def cmd_plan(args: Sequence[str], gpu_mem: str | None = None, devices: int | None = None) -> int:
    """Print the recipe's memory plan (and, with a budget, what fits); exit 2 on a bad recipe or size."""
    from qgl.plan import PlanError, plan_memory

    recipe, overrides = _split(args)
    try:
        budget = None if gpu_mem is None else parse_size(gpu_mem)
        # The plan does not read the data: a recipe's required data.source need not be given.
        changes = {} if devices is None else {"devices": devices}
        plan = plan_memory(load_recipe(recipe, ["data.source=embedded", *overrides]), **changes)
    except (RecipeError, PlanError, ValueError) as e:
        return _fail(e, EXIT_RECIPE_ERROR)
    print(plan.table())
    if budget is not None:
        print(plan.fit_table(budget))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `qgl` console script and `python -m qgl`; returns the exit code."""
    parser = build_parser()
    try:
        # Known-args parsing lets options and overrides mix: `qgl train tiny --dry-run seed=1`.
        ns, extra = parser.parse_known_args(argv)
        if extra and (ns.command not in ("train", "plan") or any(a.startswith("-") for a in extra)):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:  # --help, or an argparse usage error (code 2)
        return int(e.code or 0)
    if ns.command == "recipes":
        return cmd_recipes()
    if ns.command == "plan":
        return cmd_plan([*ns.args, *extra], ns.gpu_mem, ns.devices)
    if ns.command == "export":
        return cmd_export(ns)
    if ns.command == "eval":
        return cmd_eval(ns)
    return cmd_train([*ns.args, *extra], dry_run=ns.dry_run)


if __name__ == "__main__":
    sys.exit(main())
