"""benchmarks/launch_overhead.py: refuses clearly without a GPU; on one, times every layer of both call paths."""
import csv
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import launch_overhead  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_needs_a_gpu(capsys):
    assert launch_overhead.main(["--calls", "3"]) == 1
    assert "needs a CUDA device" in capsys.readouterr().err


@pytest.mark.gpu
def test_every_layer_timed(tmp_path):
    assert launch_overhead.main(["--calls", "50", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "launch_overhead.csv")))
    got = {(r["kind"], r["entry"]) for r in rows}
    for entry in ("op+autograd", "op", "dispatch", "module"):
        assert ("prefill", entry) in got and ("decode", entry) in got
    assert ("prefill", "autotuned") in got and ("prefill", "direct") in got and ("prefill", "sdpa") in got
    assert all(float(r["host_us"]) > 0 for r in rows)
