"""benchmarks/compile_time.py runs on a CPU machine: a one-layer model, static and dynamic shapes, one repeat.
The numbers themselves are the benchmark's (timing is not asserted); the rows and the budget it plans are."""
import csv
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import compile_time  # noqa: E402


def test_compile_time_rows(tmp_path, capsys):
    assert compile_time.main(["--layers", "1", "--d-model", "32", "--heads", "2", "--seq", "32", "--repeat", "1",
                              "--device", "cpu", "--budget-fraction", "0.9", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "compile_time.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["shapes"] for r in rows] == ["static", "dynamic"]
    for r in rows:
        # compile seconds are a difference of two timings: finite, but on a loaded machine a tiny model's can
        # come out at or below zero; a first step's whole time cannot
        for key in ("aot_eager_s", "memattn_s", "memattn_budget_s"):
            assert math.isfinite(float(r[key])), (key, r)
        for key in ("aot_eager_first_step_s", "memattn_first_step_s", "memattn_budget_first_step_s"):
            assert float(r[key]) > 0, (key, r)
        assert int(r["budget_bytes"]) > 0
    assert "extra+budget" in capsys.readouterr().out
