"""Host time of one attention call, layer by layer: where the microseconds between a model's call and the kernel
launch go, against SDPA's host time on the same shapes.

    python benchmarks/launch_overhead.py
    python benchmarks/launch_overhead.py --profile      # also cProfile's top entries for the full op call

A short call is bound by the host when its launch path takes longer than its kernel: the GPU then waits on Python.
Each row times back-to-back calls of one entry point with no synchronisation between them (5 rounds of --calls / 5,
the median round kept), on shapes so small that the GPU always keeps up, so the time per call is the host's. Kinds:
prefill and decode forwards, the prefill backward, and "train" (forward and backward through autograd, against
SDPA's). The entry points, outermost first:
    op+autograd   torch.ops.memattn.attention with q, k, v requiring grad (dispatcher, autograd node, op)
    op            the op under torch.no_grad (no autograd node); the backward op for kind "backward"
    dispatch      codegen/dispatch.attention (attention_backward): the call signature's plan looked up
    plan          the signature's plan itself: outputs allocated, its kernel launches run
    launches      the plan's kernel launches alone (codegen/launch.Launch: the binding checked, then the launcher)
    kernel.run    the bound launchers alone (the compiled kernels' own launch, the floor of the Python path)
Each memattn row's "own" time is its time less the next row's: what that layer adds. Rows outside that chain, for
comparison: "via triton" (the same launches through Triton's JIT and autotuner, which a bound Launch skips) and
SDPA's (flash / cuDNN / the default choice), the baseline a user compares with. Prints a table; writes
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

ASIDE = ("sdpa", "via triton")  # rows for comparison, outside the chain of layers
PREFILL = dict(z=1, h=4, hkv=4, m=128, n=128, d=64)
SHAPES = {"prefill": PREFILL, "backward": PREFILL, "train": PREFILL,
          "decode": dict(z=1, h=32, hkv=8, m=1, n=4096, d=128)}


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


def _op_args(kind, q):
    """The op's arguments after (q, k, v): no bias, mask or dropout; causal for the prefill kinds."""
    return (None, None, None, q.shape[-1] ** -0.5, 0.0, kind != "decode", 0, float("-inf"), True, 0.0, False,
            "triton")


def entry_points(kind, q, k, v):
    """(name, zero-argument callable) for each layer, outermost first."""
    import attn_compiler.ops  # noqa: F401  registers torch.ops.memattn.attention
    from attn_compiler.codegen import dispatch
    from attn_compiler.codegen.reference import Spec
    rest = _op_args(kind, q)
    spec = Spec(*rest[3:11])
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    op = torch.ops.memattn.attention.default
    if kind == "train":
        dout = torch.randn_like(q)

        def step():
            out, _ = op(qg, kg, vg, *rest)
            out.backward(dout)
            qg.grad = kg.grad = vg.grad = None
        return [("op fwd+bwd", step)]
    if kind == "backward":
        out, stats = op(q, k, v, *rest)
        dout = torch.randn_like(out)
        brest = (*rest, False)
        bop = torch.ops.memattn.attention_backward.default
        tensors = (dout, q, k, v, out, stats, None, None, None)

        def no_grad_bop():
            with torch.no_grad():
                return bop(*tensors, *brest[3:])
        plan = dispatch.plan_backward(*tensors, spec, "triton", False)
        points = [("op", no_grad_bop), ("dispatch", lambda: dispatch.attention_backward(*tensors, *brest[3:]))]
    else:
        def no_grad_op():
            with torch.no_grad():
                return op(q, k, v, *rest)
        tensors = (q, k, v, None, None, None)
        plan = dispatch.plan_forward(*tensors, spec, "triton")
        points = [("op+autograd", lambda: op(qg, kg, vg, *rest)), ("op", no_grad_op),
                  ("dispatch", lambda: dispatch.attention(q, k, v, *rest, 0))]
    points.append(("plan", lambda: plan(*tensors)))
    return points + _launch_points(plan, tensors)


def _launch_points(plan, tensors):
    """The plan's kernel launches with the tensors one call gave them: through each Launch, through the bound
    launchers alone, and through Triton's own path."""
    from attn_compiler.codegen import launch
    inner = getattr(plan, "inner", None)
    names = [n for n in getattr(type(inner), "__slots__", ()) if isinstance(getattr(inner, n, None), launch.Launch)]
    if not names:
        return []
    seen, reals = [], {n: getattr(inner, n) for n in names}

    def recorder(real):
        def run(*ts):
            seen.append((real, ts))
            return real(*ts)
        return run
    plan(*tensors)   # binds
    for name, real in reals.items():
        setattr(inner, name, recorder(real))
    try:
        plan(*tensors)
    finally:
        for name, real in reals.items():
            setattr(inner, name, real)
    points = [("launches", lambda: [real(*ts) for real, ts in seen])]
    if all(real.bound for real, _ in seen):
        bound = [(real._bound, ts) for real, ts in seen]
        points.append(("kernel.run", lambda: [b(ts) for b, ts in bound]))
    points.append(("via triton", lambda: [real._through_triton(ts) for real, ts in seen]))
    return points


def sdpa_points(kind, q, k, v):
    """SDPA's rows for a kind: its forward (prefill, decode) or its forward and backward through autograd (train),
    under its default choice and forced to flash and to cuDNN; none for the backward alone."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if kind == "backward":
        return []
    gqa = q.shape[1] != k.shape[1]
    causal = kind != "decode"
    if kind == "train":
        q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
        dout = torch.randn_like(q)
    points = []
    for name, backends in (("sdpa", None), ("sdpa flash", [SDPBackend.FLASH_ATTENTION]),
                           ("sdpa cudnn", [SDPBackend.CUDNN_ATTENTION])):
        def run(backends=backends):
            with (sdpa_kernel(backends) if backends else contextlib.nullcontext()):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
                if kind == "train":
                    out.backward(dout)
                    q.grad = k.grad = v.grad = None
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
        points = entry_points(kind, q, k, v) + sdpa_points(kind, q, k, v)
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
