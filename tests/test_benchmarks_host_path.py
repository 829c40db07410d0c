"""benchmarks/host_path.py on the current tree, in-process with a few calls: positive times, exact call
counts, the table's columns, and a tree that cannot be measured reported in its row."""

from __future__ import annotations

import pytest
from _bench import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("host_path.py")


def test_measure_gives_positive_numbers_and_the_table_its_columns(bench, one_thread):
    row = bench.measure(shape=(256, 128), rank=32, tokens=4, calls=2)
    assert row["entry_update"] == "update_from_grad"
    for piece in bench.PIECES:
        assert f"error_{piece}" not in row, row
        assert row[f"us_{piece}"] > 0
        assert row[f"calls_{piece}"] > 0 and row[f"calls_{piece}"] == int(row[f"calls_{piece}"])
    # forward + backward run the same update from the hook, and more besides
    assert row["calls_step"] > row["calls_update"]
    text = bench.table([{**row, "tree": "here"}])
    header, rule, line = text.splitlines()
    assert [c.strip() for c in header.strip("|").split("|")] == list(bench.COLUMNS)
    assert rule == "|---|---|---|---|---|"
    assert line.startswith("| here | ") and line.count("|") == 6


def test_call_count_is_exact(bench):
    def leaf() -> int:
        return len("ab")  # one C call

    def fn() -> None:
        leaf()
        leaf()

    # fn, 2 x leaf, 2 x len; nothing of the counting loop
    assert bench.count_calls(fn, 5, grad=False) == 5


def test_a_tree_without_qgl_and_a_failed_piece_are_reported_in_their_rows(bench, tmp_path):
    assert "no qgl/__init__.py" in bench.run_tree(tmp_path, {})["error"]
    rows = [{"tree": "old", "error": "exit 1: ImportError: x"},
            {"tree": "older", "error_update": "AttributeError: y", "us_step": 10.0, "calls_step": 7.0}]
    text = bench.table(rows)
    assert "| old | error | error | error | error |" in text
    assert "| older | error | error | 10 | 7 |" in text
    assert "- old: exit 1: ImportError: x" in text and "- older, update: AttributeError: y" in text


def test_rounds_merge_to_median_times_and_keep_each_round(bench):
    rounds = [{"us_update": 3.0, "calls_update": 5.0, "us_step": 9.0, "calls_step": 8.0, "entry_update": "x"},
              {"us_update": 1.0, "calls_update": 5.0, "us_step": 7.0, "calls_step": 8.0},
              {"us_update": 2.0, "calls_update": 5.0, "us_step": 8.0, "calls_step": 8.0}]
    row = bench.merge(rounds)
    assert (row["us_update"], row["us_step"], row["calls_update"], row["calls_step"]) == (2.0, 8.0, 5.0, 8.0)
    assert row["us_update_rounds"] == [3.0, 1.0, 2.0] and row["rounds"] == 3 and row["entry_update"] == "x"
