"""Labelled variants in benchmarks/methods.py and benchmarks/quality.py: `--methods galore,qgalore,qgalore.q2
--set qgalore.q2:qgalore.queue_size=2` runs qgalore twice, each configuration a row of its own. Names
and `--set` parsed (good and bad), a row's overrides and child command, the report's "SVDs vs galore"
column, and a CPU smoke run of the three rows."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pytest
from _bench import load_benchmark

quality = load_benchmark("quality.py", "bench_quality_variants")  # puts benchmarks/ on sys.path
methods = sys.modules["methods"]
report = sys.modules["_quality_report"]
cli = sys.modules["_cli"]


def _table(text: str) -> dict[str, dict[str, str]]:
    """Method -> its cells, from the Markdown table of summary.md."""
    rows = [line.strip("|").split(" | ") for line in text.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in rows[0]]
    return {cells[0].strip(): dict(zip(header, (c.strip() for c in cells), strict=True))
            for cells in rows[1:]}


# ---------------------------------------------------------------- names
def test_variant_names_parse_to_rows_of_their_base():
    names = methods._methods("galore, qgalore,qgalore.q2,q-galore-torch.A_b-1,full.lr3")
    assert names == ["galore", "qgalore", "qgalore.q2", "q-galore-torch.A_b-1", "full.lr3"]
    assert [methods.base_method(n) for n in names] == ["galore", "qgalore", "qgalore", "q-galore-torch",
                                                       "full"]
    assert cli.variant_base("qgalore.q2", methods.ALL) == "qgalore"
    assert cli.variant_base("qgalore", methods.ALL) == "qgalore"
    with pytest.raises(ValueError, match=r"'sgd\.q2'.*BASE\.LABEL"):
        methods.base_method("sgd.q2")


@pytest.mark.parametrize("text,bad", [("qgalore,qgalore.q 2", "qgalore.q 2"), ("qgalore.", "qgalore."),
                                      ("qgalore.a.b", "qgalore.a.b"), ("sgd.q2", "sgd.q2"), (".q2", ".q2"),
                                      ("galore,qgalore/q2", "qgalore/q2"), ("qgalore.q+", "qgalore.q+")])
def test_bad_variant_names_are_named_with_the_allowed_form(text, bad):
    with pytest.raises(argparse.ArgumentTypeError) as err:
        methods._methods(text)
    message = str(err.value)
    assert repr(bad) in message and "BASE.LABEL" in message and "letters, digits, '_' and '-'" in message
    assert "qgalore" in message.split("known:")[1]  # the methods a BASE may be


@pytest.mark.parametrize("text", ["qgalore,qgalore", "qgalore.q2,galore,qgalore.q2"])
def test_a_row_name_listed_twice_is_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match="listed more than once"):
        methods._methods(text)


def test_other_choice_lists_take_no_variants():
    parse = cli.choice_list(("a", "b"), "models")
    assert parse("a,b,a") == ["a", "b", "a"]
    with pytest.raises(argparse.ArgumentTypeError, match=r"unknown models \['a\.x'\]; known: a,b$"):
        parse("a.x")


# ---------------------------------------------------------------- --set
def test_set_targets_a_variant_by_its_full_name():
    assert methods.per_method_override("qgalore.q2:qgalore.queue_size=2") == ("qgalore.q2",
                                                                              "qgalore.queue_size=2")
    assert methods.per_method_override("qgalore:optim.lr=1e-3") == ("qgalore", "optim.lr=1e-3")
    for bad in ("qgalore.q!:qgalore.queue_size=2", "sgd.q2:optim.lr=1", "qgalore.q2:optim.lr", "qgalore.q2"):
        with pytest.raises(argparse.ArgumentTypeError, match="BASE.LABEL") as err:
            methods.per_method_override(bad)
        assert repr(bad) in str(err.value)


@pytest.mark.parametrize("main", ["quality", "methods"])
@pytest.mark.parametrize("names,target", [("galore,qgalore", "qgalore.q2"), ("galore,qgalore.q2", "qgalore")])
def test_set_for_a_name_not_in_methods_is_an_error(main, names, target, capsys):
    """`--set` names a row exactly: neither the variant's base nor another label stands in for it."""
    entry = quality.main if main == "quality" else methods.main
    with pytest.raises(SystemExit) as err:
        entry(["--device", "cpu", "--methods", names, "--set", f"{target}:qgalore.queue_size=2"])
    assert err.value.code == 2
    message = capsys.readouterr().err.split("error: ")[1]
    assert (message.startswith(f"--set for {target}, which is not in --methods") if main == "quality" else
            message.startswith(f"--set {target}:qgalore.queue_size=2: {target} is not among --methods"))


# ---------------------------------------------------------------- a variant's run
def test_a_variant_row_runs_its_base_under_its_own_name(tmp_path):
    o = methods._overrides("qgalore.q2", 4, "cpu", tmp_path)
    assert "method=qgalore" in o and "logger.name=qgalore.q2" in o
    assert f"checkpoint.dir={tmp_path / 'checkpoints' / 'qgalore.q2'}" in o
    assert "method=full" in methods._overrides("q-galore-torch.f", 4, "cpu", tmp_path)


def test_isolated_variant_child_gets_its_name_and_overrides(tmp_path, monkeypatch, capsys):
    """`--isolate`: the child process of a variant is asked for that variant with its --set only, and its
    log, row and table line carry the full name (the child here runs in this process, its training faked)."""
    calls, children = [], []

    def fake_run_method(recipe, overrides, method, steps, device, work, log=None, extra_overrides=(),
                        callbacks=(), public_int8=True):
        calls.append((method, list(extra_overrides)))
        return {"method": method, "notes": "; ".join(extra_overrides), "steps": steps, "peak_mib": 1.0,
                "memory_kind": "rss", "states_mib": 1.0, "tokens_per_s": 1.0, "train_loss": 1.0,
                "val_loss": 1.0, "val_ppl": 2.7, "svds": 3}

    def fake_subprocess_run(cmd, stdout=None, stderr=None):
        children.append(cmd)
        assert methods.main(cmd[2:]) == 0
        return argparse.Namespace(returncode=0)

    monkeypatch.setattr(methods, "run_method", fake_run_method)
    monkeypatch.setattr(methods.subprocess, "run", fake_subprocess_run)
    args = ["--device", "cpu", "--steps", "2", "--isolate", "--out", str(tmp_path), "--methods",
            "qgalore,qgalore.q2", "--set", "qgalore.q2:qgalore.queue_size=2",
            "--set", "qgalore:optim.lr=1e-3"]
    assert methods.main(args) == 0
    assert calls == [("qgalore", ["optim.lr=1e-3"]), ("qgalore.q2", ["qgalore.queue_size=2"])]
    child = children[1]
    assert child[child.index("--methods") + 1] == "qgalore.q2"
    assert [a for a in child if a.startswith("--set")] == ["--set=qgalore.q2:qgalore.queue_size=2"]
    assert (tmp_path / "qgalore.q2.log").is_file()
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in rows] == ["qgalore", "qgalore.q2"]
    out = capsys.readouterr().out
    assert "| qgalore.q2 | 1.0 (RSS) |" in out and "; qgalore.q2: qgalore.queue_size=2" in out


# ---------------------------------------------------------------- the report
def _row(method, steps, svds, **extra):
    return {"method": method, "steps": steps, "svds": svds, "train_loss": 4.0, "val_loss": 4.1,
            "val_ppl": 60.3, "notes": "n", **extra}


def test_svds_vs_galore_column():
    rows = [_row("full", 40, 0), _row("galore", 40, 100), _row("qgalore", 40, 40),
            _row("qgalore.q2", 20, 30), _row("lora", 40, 0), {"method": "qgalore.q3", "error": "killed"}]
    table = _table(report.table(rows, {}, 40))
    assert [table[m]["SVDs vs galore"] for m in ("full", "galore", "qgalore", "qgalore.q2", "lora")] == [
        "-", "1.00", "0.40", "0.60 per step", "-"]  # q2: 1.5 SVDs a step against galore's 2.5
    assert table["qgalore.q3"]["SVDs vs galore"] == "-" and table["qgalore.q3"]["notes"].startswith("did not")
    without = _table(report.table([r for r in rows if r["method"] != "galore"], {}, 40))
    assert "SVDs vs galore" not in without["qgalore"] and without["qgalore"]["SVDs"] == "40"
    failed = [{"method": "galore", "error": "OOM"}, _row("qgalore", 40, 40)]
    assert "SVDs vs galore" not in _table(report.table(failed, {}, 40))["qgalore"]


# ---------------------------------------------------------------- end to end
@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working dir; the tokenized corpus cache shared with the other tests."""
    monkeypatch.setenv("QGL_CACHE", os.environ.get("QGL_CACHE") or str(Path.home() / ".cache" / "qgl"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.slow  # 30-40 s on 2 cores: three child processes each import torch + Lightning
def test_quality_runs_a_variant_as_a_row_of_its_own(workdir, capsys):
    out = workdir / "out"
    args = ["--recipe", "tiny", "--device", "cpu", "--steps", "4", "--methods", "galore,qgalore,qgalore.q5",
            "--set", "qgalore.q5:qgalore.queue_size=5", "--out", str(out), "--val-every", "2",
            "--log-every", "2", "data.batch_size=4", "data.block_size=32", "trainer.limit_val_batches=1"]
    assert quality.main(args) == 0
    names = ("galore", "qgalore", "qgalore.q5")
    for name in names:
        for path in (f"curves/{name}.csv", f"rows/{name}.json", f"logs/{name}.log"):
            assert (out / path).is_file(), path
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())}
    assert list(rows) == list(names) and not any("error" in r for r in rows.values())
    assert all(r["steps"] == 4 and r["svds"] > 0 for r in rows.values())
    # The variant's resolved config (its notes) has the queue of 5 (the paper's code), and lists its
    # override; the plain qgalore row keeps the default queue of 2 and has no such override.
    assert "adaptive gap (queue 5," in rows["qgalore.q5"]["notes"]
    assert rows["qgalore.q5"]["notes"].endswith("; qgalore.queue_size=5")
    plain = rows["qgalore"]["notes"]
    assert "adaptive gap (queue 2," in plain and "queue_size" not in plain
    summary = (out / "summary.md").read_text()
    assert summary in capsys.readouterr().out
    table = _table(summary)
    assert list(table) == list(names)
    assert table["galore"]["SVDs vs galore"] == "1.00"
    assert float(table["qgalore.q5"]["SVDs vs galore"]) > 0
    assert "per method: qgalore.q5: `qgalore.queue_size=5`" in summary
    assert json.loads((out / "run.json").read_text())["methods"] == list(names)
