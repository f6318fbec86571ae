"""Training-step peak memory: measured vs memattn's estimate, and the recompute planner under memory budgets.

    python benchmarks/memory.py                       # 12-layer GPT, d_model 1024, 16 heads, n in {2k, 8k, 16k}
    python benchmarks/memory.py --n 1024 --layers 2   # quicker

One process, one configuration after another (bf16 weights, batch 1, cross-entropy loss, AdamW-free: the step is
forward + backward with parameter grads set to None before each step). For each n:
  eager            the model as written (n x n scores in every layer), no compile
  sdpa             the same model with F.scaled_dot_product_attention(is_causal=True), no compile
  memattn          torch.compile(backend="memattn"), no budget
  memattn@90/70/50 memory_budget = that fraction of memattn's measured unconstrained peak
Measured: torch.cuda.max_memory_allocated over one step (parameters, inputs and grads included, as in the
estimate). Estimated: the report's peak (eager: peak_before of the memattn compile, i.e. the lowered graph before
the rewrite; memattn: peak_after). Step time: mean of --steps steps after one warm-up. Prints a table, writes
memory.csv and, where matplotlib is importable, memory.png (peak vs n) into --out.
"""
from __future__ import annotations

import argparse
import csv
import gc
import os
import sys
import time
import traceback
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common import pyplot  # noqa: E402

GIB = 2 ** 30


def build(args, n, sdpa=False):
    from attn_compiler.models import GPT, GPTConfig
    torch.manual_seed(0)
    cfg = GPTConfig(vocab=args.vocab, block=n, n_layer=args.layers, n_head=args.heads, n_kv_head=args.heads,
                    d_model=args.d_model, attention="sdpa" if sdpa else "explicit")
    model = GPT(cfg).to(args.device, getattr(torch, args.dtype))
    idx = torch.randint(0, cfg.vocab, (args.batch, n), generator=torch.Generator().manual_seed(1)).to(args.device)
    return model, idx


CUDA = True   # False only for a CPU smoke run (--device cpu): then no memory is measured


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def measure(step_fn, model, steps):
    """(peak bytes of one step, mean step seconds, first-step seconds)."""
    def one():
        model.zero_grad(set_to_none=True)
        loss = step_fn()
        loss.backward()
        del loss

    t0 = time.perf_counter()
    one()                       # compile (for memattn) and warm up
    _sync()
    first = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    gc.collect()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    one()
    _sync()
    peak = torch.cuda.max_memory_allocated() if CUDA else 1
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    _sync()
    return peak, (time.perf_counter() - t0) / max(steps, 1), first


def run_one(args, n, provider, budget=None):
    import attn_compiler
    torch._dynamo.reset()
    model, idx = build(args, n, sdpa=provider == "sdpa")
    report = None
    if provider.startswith("memattn"):
        opts = {} if budget is None else {"memory_budget": int(budget)}
        # the backend object rather than its entry-point name: works from a checkout that is not pip-installed
        compiled = torch.compile(model, backend=attn_compiler.backend(**opts))
        step = lambda: compiled(idx, idx)  # noqa: E731
    else:
        step = lambda: model(idx, idx)  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peak, sec, first = measure(step, model, args.steps)
    if provider.startswith("memattn"):
        report = attn_compiler.last_report()
    notes = [str(w.message) for w in caught if "memattn" in str(w.message)]
    model = idx = None   # frees them (the step closure holds the cells)
    return peak, sec, first, report, notes


def fmt(b):
    return "-" if b is None else f"{b / GIB:.2f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[2048, 8192, 16384])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.9, 0.7, 0.5])
    ap.add_argument("--providers", nargs="+", default=["eager", "sdpa", "memattn"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=".")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    global CUDA
    CUDA = args.device.startswith("cuda")
    if CUDA and not torch.cuda.is_available():
        sys.exit("benchmarks/memory.py measures torch.cuda.max_memory_allocated: it needs a CUDA device "
                 "(--device cpu only smoke-tests the script)")
    os.makedirs(args.out, exist_ok=True)
    name = torch.cuda.get_device_name() if CUDA else "cpu (smoke run, nothing measured)"
    print(f"device: {name}, torch {torch.__version__}, {args.layers} layers, "
          f"d_model {args.d_model}, {args.heads} heads, batch {args.batch}, {args.dtype}", flush=True)
    header = ("n", "provider", "budget GiB", "estimate GiB", "measured GiB", "est/meas", "<= budget", "fits (report)",
              "checkpoints", "step ms", "first step s", "note")
    rows = []

    path = os.path.join(args.out, "memory.csv")

    def emit(row):
        row = tuple(str(c).replace("\n", " ") for c in row)
        rows.append(row)
        print(" | ".join(str(c) for c in row), flush=True)
        with open(path, "w", newline="") as f:   # rewritten after each row: a run cut short keeps its numbers
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)

    print(" | ".join(header), flush=True)
    for n in args.n:
        free_peak = None
        eager_estimate = None
        # memattn first: its report gives the eager estimate (peak_before) and the unconstrained peak
        configs = [(p, None) for p in sorted(args.providers, key=lambda p: p != "memattn")]
        for provider, _ in configs:
            try:
                peak, sec, first, report, notes = run_one(args, n, provider)
                est = None
                if report is not None:
                    est = report.peak_after.at()
                    eager_estimate = report.peak_before.at()
                    free_peak = peak if CUDA else est   # CPU smoke run: budgets from the estimate
                elif provider == "eager" and eager_estimate is not None:
                    est = eager_estimate
                if report is not None:
                    notes.append(f"eager (lowered graph, no rewrite) estimate {fmt(eager_estimate)} GiB")
                emit((n, provider, "-", fmt(est), fmt(peak), f"{est / peak:.3f}" if est else "-", "-", "-", "-",
                      f"{sec * 1e3:.1f}", f"{first:.1f}", "; ".join(notes)[:160]))
            except torch.cuda.OutOfMemoryError:
                emit((n, provider, "-", fmt(eager_estimate) if provider == "eager" else "-", "OOM", "-", "-", "-",
                      "-", "-", "-", "out of memory"))
            except Exception as e:
                traceback.print_exc()
                emit((n, provider, "-", "-", "error", "-", "-", "-", "-", "-", "-", f"{type(e).__name__}: {e}"[:120]))
            gc.collect()
            if CUDA:
                torch.cuda.empty_cache()
        if free_peak is None:
            continue
        for frac in args.budgets:
            budget = int(frac * free_peak)
            name = f"memattn@{int(round(frac * 100))}%"
            try:
                peak, sec, first, report, notes = run_one(args, n, "memattn", budget)
                plan = report.graphs[0].plan
                est = report.peak_after.at()
                emit((n, name, fmt(budget), fmt(est), fmt(peak), f"{est / peak:.3f}", peak <= budget,
                      plan.fits if plan else "-", len(report.checkpoints), f"{sec * 1e3:.1f}", f"{first:.1f}",
                      "; ".join(notes)[:120]))
                if n == args.n[-1] and frac == args.budgets[-1]:
                    print(report.memory(), flush=True)
            except torch.cuda.OutOfMemoryError:
                emit((n, name, fmt(budget), "-", "OOM", "-", False, "-", "-", "-", "-", "out of memory"))
            except Exception as e:
                traceback.print_exc()
                emit((n, name, fmt(budget), "-", "error", "-", "-", "-", "-", "-", "-",
                      f"{type(e).__name__}: {e}"[:120]))
            gc.collect()
            if CUDA:
                torch.cuda.empty_cache()

    print(f"wrote {path}")
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for provider in dict.fromkeys(r[1] for r in rows):
        pts = [(int(r[0]), float(r[4])) for r in rows if r[1] == provider and r[4] not in ("OOM", "error")]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=provider)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length n")
    ax.set_ylabel("training-step peak (GiB, max_memory_allocated)")
    ax.set_title(f"{args.layers}-layer GPT, d_model {args.d_model}, {args.heads} heads, {args.dtype}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "memory.png"), dpi=120)
    print(f"wrote {os.path.join(args.out, 'memory.png')}")


if __name__ == "__main__":
    main()
