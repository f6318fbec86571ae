"""What the benchmark scripts share: writing their rows as CSV and getting matplotlib when it is there."""
from __future__ import annotations

import csv
import os
import time


def write_csv(rows: list, out: str, name: str) -> str:
    """Rows (dicts with the same keys) as ``out/name``; returns the path."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, name)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None (with a note) when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not importable: no plot (the CSV has the numbers)")
        return None
    return plt


def spin(step, ms: float = 200.0) -> None:
    """Runs ``step`` back to back for ``ms`` of wall time (synchronising after each) before a measurement, so every
    provider is timed from the same state: after its own calls, not right after another provider's compile or
    autotune (seconds of an idle GPU), whatever do_bench's own warm-up (25 ms) leaves."""
    import torch
    torch.cuda.synchronize()
    end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < end:
        step()
        torch.cuda.synchronize()


def tune_afresh() -> None:
    """Every autotuner times its candidates in this run, not a pick kept on disk by an earlier one
    (codegen/tune_cache.py), unless MEMATTN_AUTOTUNE_CACHE says otherwise."""
    os.environ.setdefault("MEMATTN_AUTOTUNE_CACHE", "0")
