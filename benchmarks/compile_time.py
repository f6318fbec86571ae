"""Compile overhead: what the memattn backend adds to torch.compile's first training step, against aot_eager.

    python benchmarks/compile_time.py                      # 12-layer GPT, static and dynamic shapes, CPU or CUDA
    python benchmarks/compile_time.py --layers 24 --device cuda

The aim: at most 2 s over aot_eager for a 12-layer model. Both start from the same Dynamo graph.
aot_eager traces forward and backward ahead of time (AOTAutograd) and runs both graphs eagerly. memattn (default
inner="eager") lowers the graph to ATen once (make_fx), matches, builds the sympy memory model, rewrites and
reports, and runs the result under eager autograd (the attention op has its own backward); with a memory budget
whose plan recomputes, the planner's graph then goes through AOTAutograd and the min-cut partitioner, and the
partitioned graphs are checked against the plan (re-planned if they peak higher). Each row is one
fresh compile (torch._dynamo.reset() first): the first forward+backward's time minus the fastest of the next
three steps' times, the median of --repeat runs (the CSV also has each first step's whole time), after a
warm-up compile that pays the one-time import and initialisation costs. Rows:
    aot_eager                 the baseline
    memattn                   rewrite and report, no budget
    memattn + budget          --budget-fraction of the unbudgeted estimate: the planner must recompute to fit
Prints a table; writes compile_time.csv into --out.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from common import write_csv


def step(model, x):
    out = model(x)
    (out[0] if isinstance(out, tuple) else out).float().sum().backward()


STEADY_STEPS = 3


def compile_seconds(cfg, x, backend, options, dynamic, device) -> tuple[float, float]:
    """(first step's seconds, compile seconds) of a freshly compiled model: the compile is the first step
    (compile + run) minus the fastest of STEADY_STEPS later steps (run only). On a loaded machine a later step can
    be slower than the first one's run, so the compile estimate is noisy for a tiny model, and can even be
    negative; the first step's own time never is."""
    import torch._dynamo
    from attn_compiler.models import GPT
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    compiled = torch.compile(model, backend=backend, dynamic=dynamic, **({"options": options} if options else {}))
    t0 = time.perf_counter()
    step(compiled, x)
    sync(device)
    first = time.perf_counter() - t0
    steady = []
    for _ in range(STEADY_STEPS):
        t0 = time.perf_counter()
        step(compiled, x)
        sync(device)
        steady.append(time.perf_counter() - t0)
    return first, first - min(steady)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--budget-fraction", type=float, default=0.7)
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for compile_time.csv")
    a = ap.parse_args(argv)
    import attn_compiler
    from attn_compiler.models import GPTConfig
    cfg = GPTConfig(n_layer=a.layers, d_model=a.d_model, n_head=a.heads, n_kv_head=a.heads, block=a.seq)
    x = torch.randint(0, cfg.vocab, (a.batch, a.seq), device=a.device)
    compile_seconds(GPTConfig(n_layer=1, d_model=64, n_head=2, n_kv_head=2, block=a.seq), x, "memattn", None,
                    False, a.device)  # warm-up: imports, Dynamo and AOTAutograd initialisation
    print(f"# {a.layers}-layer GPT (d_model {a.d_model}, {a.heads} heads), batch {a.batch} x {a.seq} tokens, "
          f"{a.device}, torch {torch.__version__}; seconds of compile in the first training step "
          f"(median of {a.repeat})")
    print(f"{'shapes':8} {'aot_eager':>10} {'memattn':>10} {'+budget':>10} {'extra':>8} {'extra+budget':>13}")
    rows = []
    for dynamic in (False, True):
        compile_seconds(cfg, x, "memattn", {"report": False}, dynamic, a.device)
        budget = int(a.budget_fraction * int(attn_compiler.last_report().peak_after))  # at these sizes
        times, firsts = {}, {}
        for name, backend, options in (("aot_eager", "aot_eager", None), ("memattn", "memattn", None),
                                       ("budget", "memattn", {"memory_budget": budget})):
            runs = [compile_seconds(cfg, x, backend, options, dynamic, a.device) for _ in range(a.repeat)]
            firsts[name] = statistics.median(first for first, _ in runs)
            times[name] = statistics.median(compile for _, compile in runs)
        row = dict(shapes="dynamic" if dynamic else "static", layers=a.layers, device=a.device,
                   aot_eager_s=times["aot_eager"], memattn_s=times["memattn"], memattn_budget_s=times["budget"],
                   extra_s=times["memattn"] - times["aot_eager"],
                   extra_budget_s=times["budget"] - times["aot_eager"], budget_bytes=budget,
                   aot_eager_first_step_s=firsts["aot_eager"], memattn_first_step_s=firsts["memattn"],
                   memattn_budget_first_step_s=firsts["budget"])
        rows.append(row)
        print(f"{row['shapes']:8} {row['aot_eager_s']:10.2f} {row['memattn_s']:10.2f} {row['memattn_budget_s']:10.2f}"
              f" {row['extra_s']:8.2f} {row['extra_budget_s']:13.2f}", flush=True)
    print(f"wrote {write_csv(rows, a.out, 'compile_time.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
