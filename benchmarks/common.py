"""What the benchmark scripts share: writing their rows as CSV and getting matplotlib when it is there."""
from __future__ import annotations

import csv
import os


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
