"""Prefill attention: memattn's Triton kernels vs torch SDPA (flash, cuDNN, efficient), side by side in one run.

    python benchmarks/prefill.py                 # the full grid (H100: a few minutes)
    python benchmarks/prefill.py --quick         # d in {64, 128}, n in {2k, 4k}
    python benchmarks/prefill.py --d 128 --n 4096 8192 --causal 1 --mode fwd

bf16, B*n = 32k tokens, H = 16 (32 for d = 64). TFLOP/s counts 4*B*H*n^2*d, halved for causal, x2.5 for fwd+bwd.
Peak memory is the allocator's peak during one call above what the inputs already hold. Prints a table, writes
prefill.csv and, where matplotlib is importable, prefill.png into --out. --configs also prints, whenever a point
makes memattn's autotuners tune a new key, every candidate tile's time (ms, median of the CUDA-graph timer), so a
weak point can be traced to its config space.

Each provider is timed eagerly (do_bench), launch path included, as a user's model calls it. Where a call's
device time is under the host time of memattn's launch path (torch.ops dispatch, autograd, Triton's launcher: about
0.2 ms per forward on the H200 machine with torch 2.11 and Triton 3.6, benchmarks/launch_overhead.py), the row
measures that path, not the kernel. --configs' times are the kernels' own (CUDA-graph replays).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

from common import pyplot, spin, tune_afresh, write_csv

PROVIDERS = ("memattn", "flash", "cudnn", "efficient")


def sdpa_fn(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
          "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend]

    def run(q, k, v, causal):
        with sdpa_kernel([be]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


def memattn_fn():
    import attn_compiler.ops  # noqa: F401  registers torch.ops.memattn.attention

    def run(q, k, v, causal):
        out, _ = torch.ops.memattn.attention(q, k, v, None, None, None, q.shape[-1] ** -0.5, 0.0, causal, 0,
                                             float("-inf"), True, 0.0, False, "triton")
        return out
    return run


def flops(b, h, n, d, causal, mode):
    f = 4.0 * b * h * n * n * d
    if causal:
        f /= 2
    if mode == "fwd+bwd":
        f *= 2.5
    return f


def measure(fn, q, k, v, causal, mode):
    from triton.testing import do_bench
    if mode == "fwd":
        def step():
            fn(q, k, v, causal)
    else:
        dout = torch.randn(q.shape[:-1] + (v.shape[-1],), device=q.device, dtype=q.dtype)

        def step():
            fn(q, k, v, causal).backward(dout)
    step()  # compile / autotune / cuDNN plan outside the timing and the memory peak
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    spin(step)
    ms = do_bench(step, warmup=25, rep=100, grad_to_none=[q, k, v], return_mode="median")
    return ms, peak


def check(fn, ref, q, k, v, causal):
    """max |memattn - SDPA flash| on this shape, so every timed config is also a checked one."""
    with torch.no_grad():
        return (fn(q, k, v, causal).float() - ref(q, k, v, causal).float()).abs().max().item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="d in {64,128}, n in {2048,4096}")
    ap.add_argument("--d", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--n", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--causal", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--mode", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    ap.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    ap.add_argument("--tokens", type=int, default=32768, help="B * n")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for prefill.csv / prefill.png")
    ap.add_argument("--configs", action="store_true", help="print each autotuned tile's time (see above)")
    a = ap.parse_args(argv)
    tune_afresh()
    if a.quick:
        a.d, a.n = [64, 128], [2048, 4096]
    if not torch.cuda.is_available():
        print("prefill benchmark needs a CUDA device", file=sys.stderr)
        return 1
    from attn_compiler.codegen import dispatch
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    import triton
    print(f"triton {triton.__version__}", flush=True)

    fns = {p: (memattn_fn() if p == "memattn" else sdpa_fn(p)) for p in a.providers}
    ref = sdpa_fn("flash")
    rows = []
    for d in a.d:
        h = 32 if d == 64 else 16
        for n in a.n:
            b = max(1, a.tokens // n)
            g = torch.Generator(device="cuda").manual_seed(0)
            q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
                       for _ in range(3))
            for causal in a.causal:
                tuned = {name: len(t.cache) for name, t in tuners().items()}
                err = check(fns["memattn"], ref, q, k, v, bool(causal)) if "memattn" in fns else float("nan")
                for mode in a.mode:
                    row = dict(d=d, n=n, b=b, h=h, causal=causal, mode=mode, max_err_vs_flash=err)
                    for p, fn in fns.items():
                        try:
                            ms, peak = measure(fn, q, k, v, bool(causal), mode)
                            tf = flops(b, h, n, d, causal, mode) / ms / 1e9
                        except Exception as e:  # a backend that does not take this shape
                            print(f"  {p} d={d} n={n} causal={causal} {mode}: {type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:100] if str(e) else ''}", flush=True)
                            ms, peak, tf = float("nan"), float("nan"), float("nan")
                        row[f"{p}_ms"], row[f"{p}_tflops"], row[f"{p}_peak_mib"] = ms, tf, peak / 2 ** 20
                    if "flash" in fns:
                        for p in fns:
                            row[f"{p}_vs_flash"] = row[f"{p}_tflops"] / row["flash_tflops"]
                    rows.append(row)
                    print(fmt_row(row, fns), flush=True)
                if a.configs:
                    print_tunings(tuned)
            del q, k, v
            torch.cuda.empty_cache()
    if dispatch.fallbacks:
        print(f"WARNING: memattn fell back to the reference: {dispatch.fallbacks}")
    print()
    print(table(rows, fns))
    save(rows, a.out)
    return 0


def tuners():
    from attn_compiler.codegen import autotune, triton_prefill  # noqa: F401  (registers the prefill autotuners)
    return {name: autotune.AUTOTUNED[name][0] for name in ("fwd", "dq", "dkdv")}


def print_tunings(before):
    """Each candidate's time for the kernels that tuned a new key since ``before`` (their cache sizes)."""
    for name, t in tuners().items():
        if len(t.cache) == before[name]:
            continue
        timings = getattr(t, "configs_timings", None) or {}
        ms = {c: (v[0] if isinstance(v, (list, tuple)) else v) for c, v in timings.items()}
        if t.best_config not in ms:  # the prune left one candidate: nothing was timed
            print(f"    {name:4s} one candidate, not timed", flush=True)
            continue
        for c in sorted(ms, key=ms.get):
            tile = "x".join(str(c.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N"))
            print(f"    {name:4s} {tile:>7} w{c.num_warps} s{c.num_stages}  {ms[c]:.4f} ms"
                  f"{'  <- picked' if c is t.best_config else ''}", flush=True)


def fmt_row(r, fns):
    cells = [f"d={r['d']:3d} n={r['n']:5d} B={r['b']:2d} H={r['h']} {'causal' if r['causal'] else 'full  '} "
             f"{r['mode']:7s}"]
    for p in fns:
        cells.append(f"{p} {r[p + '_tflops']:6.1f}")
    if "flash" in fns and "memattn" in fns:
        cells.append(f"x{r['memattn_vs_flash']:.2f}")
    cells.append(f"err {r['max_err_vs_flash']:.1e}")
    return "  ".join(cells)


def table(rows, fns):
    head = ["d", "n", "causal", "mode"] + [f"{p} TF/s" for p in fns]
    if "flash" in fns:
        head += [f"{p}/flash" for p in fns if p != "flash"]
    head += [f"{p} MiB" for p in fns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["d"]), str(r["n"]), "yes" if r["causal"] else "no", r["mode"]]
        cells += [f"{r[p + '_tflops']:.1f}" for p in fns]
        if "flash" in fns:
            cells += [f"{r[p + '_vs_flash']:.2f}" for p in fns if p != "flash"]
        cells += [f"{r[p + '_peak_mib']:.0f}" for p in fns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save(rows, out):
    if not rows:
        return
    print(f"wrote {write_csv(rows, out, 'prefill.csv')}")
    plt = pyplot()
    if plt is None:
        return
    keys = sorted({(r["d"], r["causal"], r["mode"]) for r in rows})
    cols = 4
    fig, axes = plt.subplots(math.ceil(len(keys) / cols), cols, figsize=(4 * cols, 3 * math.ceil(len(keys) / cols)),
                             squeeze=False)
    provs = [k[:-7] for k in rows[0] if k.endswith("_tflops")]
    for ax, key in zip(axes.flat, keys):
        sel = [r for r in rows if (r["d"], r["causal"], r["mode"]) == key]
        for p in provs:
            ax.plot([r["n"] for r in sel], [r[p + "_tflops"] for r in sel], marker="o", label=p)
        ax.set_xscale("log", base=2)
        ax.set_title(f"d={key[0]} {'causal' if key[1] else 'full'} {key[2]}", fontsize=9)
        ax.set_xlabel("n")
        ax.set_ylabel("TFLOP/s")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    png = os.path.join(out, "prefill.png")
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


if __name__ == "__main__":
    sys.exit(main())
