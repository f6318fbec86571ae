"""Host time of one attention call, layer by layer: where the microseconds between a model's call and the kernel
launch go, against SDPA's host time on the same shapes.

    python benchmarks/launch_overhead.py
    python benchmarks/launch_overhead.py --profile      # also cProfile's top entries for the full op call

A short call is bound by the host when its launch path takes longer than its kernel: the GPU then waits on Python.
Each row times back-to-back calls of one entry point with no synchronisation between them (5 rounds of --calls / 5,
the median round kept), on shapes so small that the GPU always keeps up, so the time per call is the host's. The
entry points, outermost first:
    op+autograd   torch.ops.memattn.attention with q, k, v requiring grad (dispatcher, autograd node, op)
    op            the same under torch.no_grad (no autograd node)
    dispatch      attn_compiler.codegen.dispatch.forward (the routing: kernel choice, support check, device guard)
    module        triton_prefill.forward / triton_decode.forward (argument preparation and the launches)
    launch_tuned  prefill only: the forward kernel's launch as module makes it (triton_prefill.launch_tuned: a
                  tuned key's remembered pick, its pre-hook, the kernel's Triton launch)
    direct        prefill only: the same kernel's Triton launch alone, the pre-hook's arguments made beforehand
Each memattn row's "own" time is its time less the next row's: what that layer adds. Rows outside that chain, for
comparison: "via autotuner" (the same launch through Triton's autotuner, which launch_tuned skips once a key is
tuned) and SDPA's (flash / cuDNN / the default choice), the baseline a user compares with. Prints a table; writes
launch_overhead.csv into --out.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from common import write_csv

ASIDE = ("sdpa", "via autotuner")  # rows for comparison, outside the chain of layers
SHAPES = {"prefill": dict(z=1, h=4, hkv=4, m=128, n=128, d=64), "decode": dict(z=1, h=32, hkv=8, m=1, n=4096, d=128)}


def host_us(fn, calls: int, rounds: int = 5) -> float:
    """Host time of one call: the median over ``rounds`` rounds of the mean over calls / rounds calls issued back
    to back (synchronised before and after each round). The host's timing wanders by a quarter between runs on the
    H200 machine; the median keeps a round with a collector pause or a preempted core from setting the number."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    per = max(1, calls // rounds)
    means = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(per):
            fn()
        means.append((time.perf_counter() - t) / per * 1e6)
        torch.cuda.synchronize()
    return statistics.median(means)


def _args(shape):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(shape["z"], shape["h"], shape["m"], shape["d"], device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(shape["z"], shape["hkv"], shape["n"], shape["d"], device="cuda", dtype=torch.bfloat16,
                        generator=g) for _ in range(2))
    return q, k, v


def entry_points(kind, q, k, v):
    """(name, zero-argument callable) for each layer, outermost first."""
    import attn_compiler.ops  # noqa: F401  registers torch.ops.memattn.attention
    from attn_compiler.codegen import dispatch
    from attn_compiler.codegen import triton_decode as td
    from attn_compiler.codegen import triton_prefill as tp
    from attn_compiler.codegen.reference import Spec
    scale = q.shape[-1] ** -0.5
    causal = kind == "prefill"
    spec = Spec(scale, 0.0, causal, 0, float("-inf"), True, 0.0, False, 0)
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    op = torch.ops.memattn.attention

    def call_op(a, b, c):
        return op(a, b, c, None, None, None, scale, 0.0, causal, 0, float("-inf"), True, 0.0, False, "triton")

    module = tp if kind == "prefill" else td
    points = [("op+autograd", lambda: call_op(qg, kg, vg))]

    def no_grad_op():
        with torch.no_grad():
            return call_op(q, k, v)
    points.append(("op", no_grad_op))
    points.append(("dispatch", lambda: dispatch.forward(q, k, v, None, None, None, spec, "triton")))

    def in_module():
        with dispatch.device_guard(q):
            return module.forward(q, k, v, None, None, None, spec)
    points.append(("module", in_module))
    if kind == "prefill":
        points += _kernel_points(tp, in_module)
    return points


def _kernel_points(tp, in_module):
    """The forward kernel's launch as the module last made it: through launch_tuned, direct with its pick, and
    through Triton's autotuner."""
    seen = []
    real = tp._launch

    def record(tuned, raw, grid_fn, args, kwargs):
        seen.append((tuned, raw, grid_fn, args, kwargs))
        return real(tuned, raw, grid_fn, args, kwargs)
    tp._launch = record
    try:
        in_module()
    finally:
        tp._launch = real
    tuned, raw, grid_fn, args, kwargs = seen[-1]
    cfg = tuned.best_config
    meta = {**kwargs, **cfg.all_kwargs()}
    full = {**dict(zip(raw.arg_names, args)), **meta}

    def direct():
        if cfg.pre_hook is not None:
            cfg.pre_hook(full)
        raw[grid_fn(meta)](*args, **meta)
    return [("launch_tuned", lambda: tp.launch_tuned(tuned, grid_fn, args, kwargs)), ("direct", direct),
            ("via autotuner", lambda: tuned[grid_fn](*args, **kwargs))]


def sdpa_points(q, k, v, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    gqa = q.shape[1] != k.shape[1]
    points = []
    for name, backends in (("sdpa", None), ("sdpa flash", [SDPBackend.FLASH_ATTENTION]),
                           ("sdpa cudnn", [SDPBackend.CUDNN_ATTENTION])):
        def run(backends=backends):
            with (sdpa_kernel(backends) if backends else contextlib.nullcontext()):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
        try:
            run()
        except RuntimeError:  # that backend does not take this shape (e.g. flash with GQA on some builds)
            continue
        points.append((name, run))
    return points


def own_times(times):
    """(name, us, own us) per (name, us) row: a chain row's own cost is its time less the next chain row's (nan for
    the innermost); rows ASIDE get nan."""
    chain = [name for name, _ in times if not name.startswith(ASIDE)]
    by_name = dict(times)
    out = []
    for name, us in times:
        i = chain.index(name) if name in chain else len(chain)
        out.append((name, us, us - by_name[chain[i + 1]] if i + 1 < len(chain) else float("nan")))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--kinds", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--profile", action="store_true", help="cProfile's top entries for op+autograd / op")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for launch_overhead.csv")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("the launch-overhead benchmark needs a CUDA device", file=sys.stderr)
        return 1
    import triton
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; host us per "
          f"call, the median of 5 rounds of {a.calls // 5} calls", flush=True)
    rows = []
    for kind in a.kinds:
        q, k, v = _args(SHAPES[kind])
        points = entry_points(kind, q, k, v) + sdpa_points(q, k, v, kind == "prefill")
        times = [(name, host_us(fn, a.calls)) for name, fn in points]
        for name, us, layer in own_times(times):
            rows.append(dict(kind=kind, entry=name, host_us=us, layer_us=layer, **SHAPES[kind]))
            print(f"{kind:8s} {name:12s} {us:8.1f} us" + (f"   (own {layer:6.1f} us)" if layer == layer else ""),
                  flush=True)
        if a.profile:
            _profile(points[0][1], kind)
    print(f"wrote {write_csv(rows, a.out, 'launch_overhead.csv')}")
    return 0


def _profile(fn, kind):
    import cProfile
    import pstats
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(500):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    print(f"--- cProfile, {kind} op+autograd, 500 calls, by own time")
    pstats.Stats(pr).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    sys.exit(main())
