"""One settings schema, validated once: bad values fail at load (one line naming key and file, exit 2),
and the recipe section, QGaLoreCallback, QGaLoreAdamW, the projector/refresh and the planner share it."""

import dataclasses
import inspect
import re
import typing

import pytest
import torch

from qgl.cli import main, recipe_keys
from qgl.config import RecipeConfig, RecipeError, load_recipe
from qgl.optim import AdaptiveRefresh, GaLoreProjector, QGaLoreAdamW, make_param_groups
from qgl.optim.qgalore_adamw import GALORE_DEFAULTS
from qgl.optim.settings import (
    QGALORE,
    GaLoreSettings,
    OptimizerSettings,
    QGaLoreSettings,
    SettingError,
    WeightSettings,
)
from qgl.plan import PlanError, PlanSettings, plan_memory

# override -> the key the one-line error must name (issue 17's list, then other numeric keys)
BAD = {
    "optim.lr=-1": "optim.lr",
    "optim.lr=nan": "optim.lr",
    "optim.lr=inf": "optim.lr",
    "data.val_fraction=2": "data.val_fraction",
    "optim.betas=[2,3]": "optim.betas",
    "optim.betas=[0.9]": "optim.betas",
    "optim.weight_decay=-1": "optim.weight_decay",
    "qgalore.update_proj_gap=0": "qgalore.update_proj_gap",
    "qgalore.group_size=0": "qgalore.group_size",
    "qgalore.optim_bits=4": "qgalore.optim_bits",
    "qgalore.svd_method=bogus": "qgalore.svd_method",
    "data.num_workers=-1": "data.num_workers",
    "trainer.accelerator=tpu": "trainer.accelerator",
    "qgalore.rank=129": "qgalore.rank",  # tiny's matrices are 128 x 128 and 344 x 128
    "qgalore.scale=-1": "qgalore.scale",
    "optim.warmup_steps=-5": "optim.warmup_steps",
    "optim.min_lr_ratio=1.5": "optim.min_lr_ratio",
    "lora.alpha=-1": "lora.alpha",
    "lora.dropout=nan": "lora.dropout",
    "trainer.log_every_n_steps=0": "trainer.log_every_n_steps",
    "trainer.limit_val_batches=-1": "trainer.limit_val_batches",
    "trainer.gradient_clip_val=-1": "trainer.gradient_clip_val",
    "trainer.memory_snapshot_step=-1": "trainer.memory_snapshot_step",
    "qgalore.cos_threshold=2": "qgalore.cos_threshold",
    "qgalore.gamma_proj=0.5": "qgalore.gamma_proj",
    "qgalore.queue_size=0": "qgalore.queue_size",
    "qgalore.max_gap=5": "qgalore.max_gap",  # below tiny's update_proj_gap 20
    "qgalore.proj_group_size=0": "qgalore.proj_group_size",
    "qgalore.min_8bit_size=-1": "qgalore.min_8bit_size",
    "qgalore.offload=gpu": "qgalore.offload",
    "qgalore.layerwise_clip_norm=0": "qgalore.layerwise_clip_norm",
    "qgalore.target_modules=[nothing]": "qgalore.target_modules",
    "seed=-1": "seed",
    "data.block_size=513": "data.block_size",  # tiny's RoPE cache holds 512 positions
    "trainer.strategy=fsdp": "trainer.strategy",  # qgalore (tiny's method): FSDP shards whole matrices
    "trainer.strategy=horovod": "trainer.strategy",  # not a Lightning strategy
}


@pytest.mark.parametrize("override", ["qgalore.shard_state=2", "model.activation_checkpointing=1",
                                      "checkpoint.save_last=null"])
def test_a_bool_key_takes_only_a_bool(override):
    # OmegaConf alone would turn 2 or 1 into true.
    key = override.partition("=")[0]
    expected = f"override '{re.escape(override)}': key '{key}': expected bool, got"
    with pytest.raises(RecipeError, match=expected):
        load_recipe("tiny", [override])


def test_a_number_for_a_bool_key_in_a_recipe_file_is_refused(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("qgalore:\n  rank: 16\n  layerwise: 3\n")
    with pytest.raises(RecipeError, match=r"r.yaml: key 'qgalore.layerwise': expected bool, got 3"):
        load_recipe(recipe)


@pytest.mark.parametrize("method", ["full", "galore", "qgalore"])
def test_fsdp_is_refused_on_cpu_for_every_method(method):
    # full under FSDP needs Lightning's FSDPStrategy, which needs CUDA: one line at load, not at fit.
    with pytest.raises(RecipeError, match="key 'trainer.strategy'") as e:
        load_recipe("tiny", [f"method={method}", "trainer.strategy=fsdp", "trainer.accelerator=cpu"])
    with pytest.raises(RecipeError, match="unknown Lightning strategy 'horovod'"):
        load_recipe("tiny", [f"method={method}", "trainer.strategy=horovod"])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("override", list(BAD))
def test_bad_value_fails_at_load_naming_key_and_file(override):
    with pytest.raises(RecipeError) as e:
        load_recipe("tiny", [override])
    line = str(e.value)
    assert "\n" not in line and e.value.key == BAD[override], line
    assert f"tiny.yaml: key '{BAD[override]}': " in line


def test_combinations_and_good_values_load():
    with pytest.raises(RecipeError, match="key 'qgalore.layerwise_clip_norm'.*needs layerwise"):
        load_recipe("tiny", ["qgalore.layerwise=false", "qgalore.layerwise_clip_norm=1.0"])
    cfg = load_recipe("tiny", ["qgalore.rank=128", "optim.lr=1e-4", "data.val_fraction=0",
                               "optim.warmup_steps=0", "qgalore.layerwise=false", "trainer.accelerator=gpu"])
    assert cfg.qgalore.rank == 128 and isinstance(cfg.qgalore, QGaLoreSettings)
    # Methods without GaLore do not check its rank.
    assert load_recipe("tiny", ["method=lora", "qgalore.rank=100000"]).method == "lora"


def test_cli_exit_2_one_line_and_plan_refuses_as_train(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--dry-run", "qgalore.svd_method=bogus"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert ("tiny.yaml: key 'qgalore.svd_method': unknown svd_method 'bogus'; choose one of: full, "
            "randomized") in err
    args = ["pretrain/llama_7b", "qgalore.rank=100000"]
    assert main(["train", "--dry-run", *args, "data.source=x"]) == 2
    train_err = capsys.readouterr().err
    assert main(["plan", *args]) == 2
    plan_err = capsys.readouterr().err
    assert plan_err == train_err and "key 'qgalore.rank'" in plan_err and "(4096 x 4096)" in plan_err
    assert main(["plan", "--gpu-mem", "1e400"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "--gpu-mem '1e400'" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_every_setting_is_defined_once():
    """The schema, QGaLoreCallback's keywords, the recipe keys, the optimizer's group defaults, the
    projector/refresh constructors and the planner agree field by field (names and defaults)."""
    from qgl.callbacks import QGaLoreCallback

    fields = [f.name for f in dataclasses.fields(QGaLoreSettings)]
    concerns = (GaLoreSettings, WeightSettings, OptimizerSettings)
    parts = [f.name for cls in concerns for f in dataclasses.fields(cls)]
    assert sorted(fields) == sorted(parts) and len(set(fields)) == len(fields)
    params = inspect.signature(QGaLoreCallback).parameters
    assert set(params) == {*fields, "seed", "subspace_monitor"}
    for name in fields:
        assert params[name].default == QGALORE[name], name
    keys = {k.removeprefix("qgalore."): (d, h) for k, _, d, h in recipe_keys() if k.startswith("qgalore.")}
    assert set(keys) == set(fields)
    for name in fields:
        default, help_ = keys[name]
        assert (tuple(default) if isinstance(default, list) else default) == QGALORE[name] and help_, name
    assert typing.get_type_hints(RecipeConfig)["qgalore"] is QGaLoreSettings
    galore = [f.name for f in dataclasses.fields(GaLoreSettings)]
    assert list(GALORE_DEFAULTS) == galore and GALORE_DEFAULTS["rank"] is None
    assert all(GALORE_DEFAULTS[k] == QGALORE[k] for k in galore if k != "rank")
    refresh = inspect.signature(AdaptiveRefresh).parameters
    for name in ("update_proj_gap", "adaptive", "cos_threshold", "gamma_proj", "queue_size", "max_gap"):
        assert refresh[name].default == QGALORE[name], name
    projector = inspect.signature(GaLoreProjector).parameters
    for arg, name in (("scale", "scale"), ("quantize", "proj_quant"), ("group_size", "proj_group_size"),
                      ("svd_method", "svd_method")):
        assert projector[arg].default == QGALORE[name], arg
    plan = PlanSettings()
    shared = [f.name for f in dataclasses.fields(PlanSettings) if f.name in QGALORE]
    assert len(shared) == 15  # with shard_state (distributed) and cuda_graphs (the graphs' gradient buffers)
    assert inspect.signature(make_param_groups).parameters["rank"].default == QGALORE["rank"]
    from qgl.config import PRECISIONS
    from qgl.plan.settings import PRECISIONS as PLAN_PRECISIONS

    assert set(PRECISIONS) == set(PLAN_PRECISIONS)  # the planner knows the bytes of every recipe precision
    assert all(getattr(plan, name) == QGALORE[name] for name in shared)


@pytest.mark.parametrize(("kwargs", "field"), [
    (dict(svd_method="bogus"), "svd_method"), (dict(rank=0), "rank"), (dict(scale=-1.0), "scale"),
    (dict(optim_bits=4), "optim_bits"), (dict(offload="gpu"), "offload"),
    (dict(update_proj_gap=0), "update_proj_gap"),
    (dict(group_size=0), "group_size"), (dict(target_modules=[1]), "target_modules"),
    (dict(exclude="lm_head"), "exclude"),
    (dict(layerwise=False, layerwise_clip_norm=1.0), "layerwise_clip_norm"),
])
def test_every_user_refuses_at_construction(kwargs, field):
    """Not in the first backward hook: the callback, the optimizer and the planner refuse at once."""
    from qgl.callbacks import QGaLoreCallback

    with pytest.raises(SettingError) as e:
        QGaLoreCallback(**kwargs)
    assert e.value.field == field and "\n" not in str(e.value) and field in str(e.value)
    galore = {k: v for k, v in kwargs.items() if k in GALORE_DEFAULTS}
    if galore:
        model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        with pytest.raises(ValueError, match=field):
            QGaLoreAdamW(make_param_groups(model, **{"rank": 4, "target_modules": ["0"], **galore}))
    shared = {k: v for k, v in kwargs.items() if k in {f.name for f in dataclasses.fields(PlanSettings)}}
    if shared and field != "layerwise_clip_norm":
        with pytest.raises(PlanError, match=field):
            PlanSettings(**shared)


def test_planner_refuses_a_rank_larger_than_a_layer():
    with pytest.raises(PlanError, match=r"rank 129 is larger than the matrix blocks\.0\.attn\.q_proj"):
        plan_memory("tiny", rank=129)
