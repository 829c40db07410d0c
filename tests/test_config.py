"""Recipe schema and loader: a bad recipe is one line naming key and file, exit code 2, no side effects."""

import dataclasses
import inspect

import pytest

from qgl.cli import main
from qgl.config import (
    RECIPES_DIR,
    QGaLoreConfig,
    RecipeConfig,
    RecipeError,
    bundled_recipes,
    load_recipe,
    resolve_recipe,
    to_yaml,
)


@pytest.fixture
def bad_recipe(tmp_path, monkeypatch):
    """Write a recipe into an empty working directory; returns its (relative) name."""
    monkeypatch.chdir(tmp_path)

    def write(text: str, name: str = "x.yaml") -> str:
        (tmp_path / name).write_text(text)
        return name

    return write


# (recipe text or None for the default recipe, overrides, substrings of the one-line message)
BAD = {
    "unknown key": ("trainer:\n  max_stepz: 3\n", [],
                    ["x.yaml", "unknown key 'trainer.max_stepz'", "did you mean 'max_steps'"]),
    "unknown section": ("optimizer:\n  lr: 1\n", [], ["x.yaml", "unknown key 'optimizer'"]),
    "wrong type": ("trainer:\n  max_steps: abc\n", [],
                   ["x.yaml", "key 'trainer.max_steps': expected int, got 'abc'"]),
    "wrong list item": ("optim:\n  betas: [0.9, high]\n", [],
                        ["x.yaml", "key 'optim.betas[1]': expected float"]),
    "scalar for section": ("trainer: 5\n", [], ["x.yaml", "key 'trainer'", "section"]),
    "not yaml": ("trainer: [1,\n", [], ["x.yaml", "not valid YAML"]),
    "override unknown": (None, ["trainer.max_stepz=3"],
                         ["tiny.yaml", "trainer.max_stepz=3", "unknown key 'trainer.max_stepz'"]),
    "override wrong type": (None, ["trainer.max_steps=abc"],
                            ["tiny.yaml", "key 'trainer.max_steps': expected int, got 'abc'"]),
    "override float for int": (None, ["data.batch_size=1.5"],
                               ["tiny.yaml", "key 'data.batch_size': expected int"]),
    "override no '='": ("", ["trainer.max_steps"],
                        ["x.yaml", "bad override 'trainer.max_steps'", "expected key=value"]),
    "key as recipe": (None, ["trainer.max_steps", "5"],
                      ["trainer.max_steps: recipe file not found", "give it as key=value"]),
    "override empty key": (None, ["=3"], ["tiny.yaml", "bad override '=3'"]),
    "override bad value": (None, ["optim.betas=[0.9"], ["tiny.yaml", "key 'optim.betas'", "not valid YAML"]),
    "bad method": (None, ["method=sgd"], ["tiny.yaml", "key 'method'", "qgalore, adamw"]),
    "bad model": (None, ["model.name=3b"], ["tiny.yaml", "key 'model.name'", "60m"]),
    "bad wandb mode": (None, ["logger.mode=online2"], ["tiny.yaml", "key 'logger.mode'", "offline"]),
    "bad profiler": (None, ["trainer.profiler=torch"], ["tiny.yaml", "key 'trainer.profiler'", "pytorch"]),
    "non-positive": (None, ["trainer.max_steps=0"], ["tiny.yaml", "key 'trainer.max_steps'", ">= 1"]),
    "qgalore + clip": (None, ["trainer.gradient_clip_val=1.0"],
                       ["key 'trainer.gradient_clip_val'", "layerwise_clip_norm"]),
    "qgalore + 2 devices": (None, ["trainer.devices=2"], ["key 'trainer.devices'", "1 device"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_recipe_exits_2_with_one_line_and_creates_nothing(case, bad_recipe, tmp_path, capsys):
    text, overrides, expected = BAD[case]
    args = ["train", bad_recipe(text), *overrides] if text is not None else ["train", *overrides]
    before = sorted(tmp_path.iterdir())
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for part in expected:
        assert part in lines[0], (part, lines[0])
    assert sorted(tmp_path.iterdir()) == before  # no run dir, no checkpoint dir, nothing


def test_missing_recipe_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "recipes/nope.yaml", "trainer.max_steps=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "recipes/nope.yaml: recipe file not found" in err
    assert list(tmp_path.iterdir()) == []


def test_missing_required_values(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "finetune/llama_hf_local"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "llama_hf_local.yaml" in err
    assert "missing required value for keys 'data.source', 'model.hf_path'" in err
    assert main(["train", "finetune/llama_hf_local", "model.hf_path=/models/x"]) == 2
    err = capsys.readouterr().err
    assert "missing required value for key 'data.source'" in err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RecipeError) as e:
        load_recipe("pretrain/llama_60m")
    assert e.value.key == "data.source" and e.value.file.endswith("llama_60m.yaml")


def test_defaults_and_overrides():
    cfg = load_recipe(None, ["trainer.max_steps=7", "optim.betas=[0.8,0.9]", "qgalore.max_gap=400",
                             "logger.name=null", "checkpoint.every_n_steps=null"])
    assert isinstance(cfg, RecipeConfig)
    assert cfg.model.name == "tiny" and cfg.data.source == "embedded" and cfg.method == "qgalore"
    assert cfg.trainer.max_steps == 7 and cfg.optim.betas == [0.8, 0.9] and cfg.qgalore.max_gap == 400
    assert cfg.logger.name is None and cfg.checkpoint.every_n_steps is None
    assert load_recipe(None, ["method=adamw"]).method == "adamw"


def test_yaml_round_trip(tmp_path):
    cfg = load_recipe("tiny", ["seed=3", "qgalore.target_modules=[attn]"])
    path = tmp_path / "r.yaml"
    path.write_text(to_yaml(cfg))
    assert load_recipe(str(path)) == cfg


def test_qgalore_defaults_match_the_callback():
    """QGaLoreConfig mirrors QGaLoreCallback's arguments and defaults (lists for its tuples)."""
    from qgl.callbacks import QGaLoreCallback

    params = inspect.signature(QGaLoreCallback).parameters
    for f in dataclasses.fields(QGaLoreConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        want = params[f.name].default
        assert default == (list(want) if isinstance(want, tuple) else want), f.name
    assert set(params) - {f.name for f in dataclasses.fields(QGaLoreConfig)} == {"seed", "subspace_monitor"}


def test_recipe_resolution(tmp_path, monkeypatch):
    assert resolve_recipe(None) == RECIPES_DIR / "tiny.yaml"
    assert resolve_recipe("pretrain/llama_60m") == resolve_recipe("pretrain/llama_60m.yaml")
    monkeypatch.chdir(tmp_path)
    # (rank 16: the schema's default rank 256 is larger than the tiny model's 128 x 128 matrices)
    (tmp_path / "tiny.yaml").write_text("trainer:\n  max_steps: 3\nqgalore:\n  rank: 16\n")
    assert load_recipe("tiny.yaml").trainer.max_steps == 3  # an existing path wins over the bundled name


def test_bundled_recipes_load():
    names = bundled_recipes()
    assert {"tiny.yaml", "finetune/llama_hf_local.yaml"} <= set(names)
    ranks = {"60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 1024}
    for size, rank in ranks.items():
        cfg = load_recipe(f"pretrain/llama_{size}", ["data.source=embedded"])
        assert cfg.model.name == size and cfg.qgalore.rank == rank and cfg.data.block_size == 256
        assert cfg.trainer.precision == "bf16-mixed" and cfg.qgalore.scale == 0.25
        assert cfg.data.batch_size * cfg.trainer.accumulate_grad_batches == 512
        assert cfg.model.activation_checkpointing == (size in ("1b", "7b"))
    cfg = load_recipe("finetune/llama_hf_local", ["model.hf_path=/m", "data.source=/d.jsonl"])
    assert cfg.model.hf_path == "/m" and cfg.data.source == "/d.jsonl"
