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
    for kind in ("prefill", "decode"):
        for entry in ("op+autograd", "op", "dispatch", "plan", "launches", "kernel.run", "via triton", "sdpa"):
            assert (kind, entry) in got, (kind, entry)
    for entry in ("op", "dispatch", "plan", "launches", "kernel.run"):
        assert ("backward", entry) in got, entry
    assert ("train", "op fwd+bwd") in got and ("train", "sdpa") in got
    assert all(float(r["host_us"]) > 0 for r in rows)


def test_own_time_is_the_chain_step():
    """Each layer's own time is its time less the next layer's; the innermost layer and the rows set aside for
    comparison (Triton's autotuner path, SDPA) have none, wherever they sit in the table."""
    rows = launch_overhead.own_times([("op", 100.0), ("plan", 60.0), ("via triton", 50.0), ("kernel.run", 20.0),
                                      ("sdpa", 10.0)])
    own = {name: layer for name, _, layer in rows}
    assert own["op"] == 40.0 and own["plan"] == 40.0
    assert all(own[n] != own[n] for n in ("kernel.run", "via triton", "sdpa"))   # nan
