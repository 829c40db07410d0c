"""benchmarks/first_step.py on CPU with small shapes: the table, the rows, the shapes of a model,
argument errors (the GPU run times LLaMA-7B's shapes with the same code)."""

from __future__ import annotations

import json

import pytest
from _bench import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("first_step.py")


def test_llama_7b_has_224_projected_matrices(bench):
    shapes = bench.model_shapes("7b")
    assert shapes == [((4096, 4096), 128), ((11008, 4096), 64), ((4096, 11008), 32)]
    assert sum(c for _, c in shapes) == 224


def test_cpu_run_prints_the_table_and_writes_the_rows(bench, tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert bench.main(["--device", "cpu", "--shapes", "96x64:4,48x128:2", "--rank", "8", "--repeats", "1",
                       "--alpha", "1.0", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "first-step SVDs on cpu: 6 matrices, rank 8" in text
    assert "| 96x64 (4) | 1 | randomized |" in text and "| 48x128 (2) | 1 | warm |" in text
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 * 4  # shapes x methods
    by = {(r["shape"], r["method"]): r for r in rows}
    for shape, side in (("96x64", "right"), ("48x128", "left")):
        assert by[(shape, "full")]["energy"] == pytest.approx(1.0) and by[(shape, "full")]["side"] == side
        assert by[(shape, "randomized")]["energy"] > 0.99
        assert by[(shape, "warm")]["overlap"] > by[(shape, "stale")]["overlap"]  # the refresh helps
        assert by[(shape, "stale")]["overlap"] < 0.99  # the subspace did move
        assert by[(shape, "stale")]["seconds_per_matrix"] == 0.0
    r = by[("96x64", "randomized")]
    assert r["seconds_all"] == pytest.approx(4 * r["seconds_per_matrix"])
    assert "| randomized |" in text.split("first step's SVDs, s (estimated)")[1]


def test_argument_errors(bench):
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--shapes", "96by64"])
    with pytest.raises(SystemExit, match="rank 80 is larger than the matrix"):
        bench.main(["--device", "cpu", "--shapes", "96x64", "--rank", "80"])
