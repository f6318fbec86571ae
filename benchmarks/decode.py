"""Cached decode: memattn's split-KV kernel vs torch SDPA on the same KV cache, side by side in one run.

    python benchmarks/decode.py                  # the full grid (H100: about two minutes)
    python benchmarks/decode.py --quick          # batch {1, 32}, cache {4k, 64k}
    python benchmarks/decode.py --batch 8 --cache 16384 --hkv 8
    python benchmarks/decode.py --sweep --batch 8 32 --cache 1024 65536   # tune the split heuristic

q_len 1, 32 query heads, 8 KV heads, d = 128, bf16. Bandwidth counts the bytes of K and V read (2 * B * Hkv * N * d
* 2) over the time of one call, as % of the card's HBM peak (--peak; by default the datasheet figure of the card the
run is on: 3.35 TB/s for an H100 SXM, 4.8 TB/s for an H200, else --peak is required). Every provider is
timed the same way: its call captured in a CUDA graph and replayed (triton.testing.do_bench_cudagraph), so Python
launch overhead, which would swamp a 10 us kernel, is out of every number. Providers:
    memattn        torch.ops.memattn.attention (split-KV Triton kernel; K/V read once per KV head)
    sdpa_gqa       F.scaled_dot_product_attention(..., enable_gqa=True) (PyTorch picks the backend)
    sdpa_repeat    HF's repeat_kv (expand + reshape: a copy of K and V per query head) then SDPA, copy included
    flash_repeat   the same with the flash backend forced
Points whose repeated cache does not fit in memory are skipped for that provider. "As called" columns time
memattn and sdpa_gqa the way an eager generation loop calls them: back-to-back calls with no CUDA graph, so each
call costs the larger of its host path and its kernel (--no-called leaves them out). Prints a table, writes
decode.csv and, where matplotlib is importable, decode.png into --out.

--kernels prints, per point and provider, each CUDA kernel's mean device time (torch.profiler), so a gap between
two providers can be placed in one kernel (memattn: the split kernel and, with several splits, the combine).

--sweep times memattn under each (programs per SM, least keys per split, wave efficiency kept) of --sweep-waves x
--sweep-min-chunk x --sweep-eff (the three knobs of triton_decode.num_splits; the kernel is re-autotuned for each)
against sdpa_gqa, and prints one row per point: the time ratio sdpa_gqa / memattn per setting, the splits it used
and the autotuned tile.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

from common import pyplot, spin, tune_afresh, write_csv

PROVIDERS = ("memattn", "sdpa_gqa", "sdpa_repeat", "flash_repeat")


def repeat_kv(x, n):
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d)


def provider(name):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if name == "memattn":
        import attn_compiler.ops  # noqa: F401  registers torch.ops.memattn.attention

        def run(q, k, v):
            return torch.ops.memattn.attention(q, k, v, None, None, None, q.shape[-1] ** -0.5, 0.0, False, 0,
                                               float("-inf"), True, 0.0, False, "triton")[0]
    elif name == "sdpa_gqa":
        def run(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    elif name == "sdpa_repeat":
        def run(q, k, v):
            n = q.shape[1] // k.shape[1]
            return F.scaled_dot_product_attention(q, repeat_kv(k, n), repeat_kv(v, n))
    else:
        def run(q, k, v):
            n = q.shape[1] // k.shape[1]
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return F.scaled_dot_product_attention(q, repeat_kv(k, n), repeat_kv(v, n))
    return run


def reference(q, k, v):
    n = q.shape[1] // k.shape[1]
    s = (q.float() @ repeat_kv(k, n).float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(s, -1) @ repeat_kv(v, n).float()


def fits(name, b, hkv, h, n, d) -> bool:
    free, _ = torch.cuda.mem_get_info()
    cache = 2 * b * hkv * n * d * 2
    extra = cache * (h // hkv) if "repeat" in name else cache // 8
    return extra < 0.8 * free


def bench(fn, q, k, v):
    from triton.testing import do_bench_cudagraph
    fn(q, k, v)  # compile and autotune outside the capture
    spin(lambda: fn(q, k, v))
    return do_bench_cudagraph(lambda: fn(q, k, v), rep=100)


CALLED = ("memattn", "sdpa_gqa")   # the providers also timed as called (no CUDA graph)


def bench_called(fn, q, k, v, calls: int = 200, rounds: int = 5) -> float:
    """ms per call of ``calls`` back-to-back calls without a CUDA graph (the median of ``rounds`` rounds, CUDA
    events around each): what a generation loop in eager Python pays, host path included."""
    fn(q, k, v)
    spin(lambda: fn(q, k, v))
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn(q, k, v)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[rounds // 2]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--cache", type=int, nargs="+", default=[1024, 4096, 16384, 65536, 131072])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--peak", type=float, default=None, help="HBM bandwidth of the card, bytes/s")
    ap.add_argument("--kernels", action="store_true", help="per-kernel device times (see above)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-called", dest="called", action="store_false", help="leave out the as-called columns")
    ap.add_argument("--waves", type=int, default=None, help="override the split heuristic's programs per SM")
    ap.add_argument("--min-chunk", type=int, default=None, help="override the least keys per split")
    ap.add_argument("--wave-eff", type=float, default=None, help="override the wave efficiency the split count keeps")
    ap.add_argument("--sweep", action="store_true", help="tune the split heuristic (see above)")
    ap.add_argument("--sweep-waves", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--sweep-min-chunk", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--sweep-eff", type=float, nargs="+", default=None, help="default: the kernel's _WAVE_EFF")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for decode.csv / decode.png")
    args = ap.parse_args(argv)
    tune_afresh()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/decode.py needs a CUDA device")
    if args.quick:
        args.batch, args.cache = [1, 32], [4096, 65536]
    if args.peak is None:
        args.peak = datasheet_peak(torch.cuda.get_device_name())
    from attn_compiler.codegen import triton_decode
    if args.waves is not None:
        triton_decode._WAVES = args.waves
    if args.min_chunk is not None:
        triton_decode._MIN_CHUNK = args.min_chunk
    if args.wave_eff is not None:
        triton_decode._WAVE_EFF = args.wave_eff
    if args.sweep:
        return sweep(args)
    if args.kernels:
        return kernels(args)
    fns = {p: provider(p) for p in PROVIDERS}
    rows = []
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, q_len 1, H={args.heads}, "
          f"Hkv={args.hkv}, d={args.d}; GB/s of K+V read (% of {args.peak / 1e12:.2f} TB/s)")
    for b in args.batch:
        for n in args.cache:
            torch.cuda.empty_cache()
            q, k, v = make_inputs(args, b, n)
            kv_bytes = 2 * b * args.hkv * n * args.d * 2
            row = dict(batch=b, cache=n, tokens=b * n, kv_mib=kv_bytes / 2 ** 20)
            ref = reference(q[:1], k[:1], v[:1])  # one batch row: the check costs no memory to speak of
            for p, fn in fns.items():
                if not fits(p, b, args.hkv, args.heads, n, args.d):
                    row[p + "_us"] = row[p + "_pct"] = float("nan")
                    continue
                try:
                    err = (fn(q[:1], k[:1], v[:1]).float() - ref).abs().max().item()
                    assert err < 2e-2, f"{p}: max error {err} vs the fp32 reference"
                    ms = bench(fn, q, k, v)
                except torch.OutOfMemoryError:
                    row[p + "_us"] = row[p + "_pct"] = float("nan")
                    continue
                row[p + "_us"] = ms * 1e3
                row[p + "_pct"] = 100 * kv_bytes / (ms * 1e-3) / args.peak
            for p in PROVIDERS[1:]:
                row["x_" + p] = row[p + "_us"] / row["memattn_us"]
            if args.called:
                for p in CALLED:
                    row[p + "_called_us"] = bench_called(fns[p], q, k, v) * 1e3
                row["called_memattn_over_sdpa_gqa"] = row["memattn_called_us"] / row["sdpa_gqa_called_us"]
            rows.append(row)
            print(fmt_row(row), flush=True)
            del q, k, v
    table(rows)
    save(rows, args.out)


PEAKS = {"H100": 3.35e12, "H200": 4.8e12}  # HBM bytes/s by the vendors' datasheets (SXM parts)


def datasheet_peak(name: str) -> float:
    for card, peak in PEAKS.items():
        if card in name:
            return peak
    sys.exit(f"no HBM peak known for {name!r}: pass --peak (bytes/s)")


def kernels(args):
    """Mean device time of each CUDA kernel a provider launches, per point (torch.profiler over 20 calls)."""
    from torch.profiler import ProfilerActivity, profile
    calls = 20
    for b in args.batch:
        for n in args.cache:
            q, k, v = make_inputs(args, b, n)
            print(f"# batch {b} cache {n}")
            for p in PROVIDERS[:2]:
                fn = provider(p)
                fn(q, k, v)
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(calls):
                        fn(q, k, v)
                    torch.cuda.synchronize()
                for e in prof.key_averages():
                    t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
                    if t > 0 and e.count >= calls:
                        print(f"  {p:9s} {t / e.count:8.2f} us x{e.count // calls}  {e.key[:90]}", flush=True)
            del q, k, v
            torch.cuda.empty_cache()


def make_inputs(args, b, n):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, args.heads, 1, args.d, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(b, args.hkv, n, args.d, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(b, args.hkv, n, args.d, device="cuda", dtype=torch.bfloat16, generator=g)
    return q, k, v


def sweep(args):
    from attn_compiler.codegen import triton_decode as td
    effs = args.sweep_eff or [td._WAVE_EFF]
    settings = [(w, c, e) for w in args.sweep_waves for c in args.sweep_min_chunk for e in effs]
    mem, gqa = provider("memattn"), provider("sdpa_gqa")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"# sweep on {torch.cuda.get_device_name()}: sdpa_gqa time / memattn time per (waves, min_chunk, "
          f"wave efficiency); splits and autotuned (BLOCK_N, warps, stages) below each")
    print(f"{'batch':>5} {'cache':>7} {'gqa us':>8} " + " ".join(f"{f'w{w} c{c} e{e}':>16}"
                                                                  for w, c, e in settings))
    rows = []
    for b in args.batch:
        for n in args.cache:
            torch.cuda.empty_cache()
            q, k, v = make_inputs(args, b, n)
            t_gqa = bench(gqa, q, k, v)
            cells, notes = [], []
            for w, c, e in settings:
                td._WAVES, td._MIN_CHUNK, td._WAVE_EFF = w, c, e
                td.decode_split_tuned.cache.clear()
                t = bench(mem, q, k, v)
                splits, _ = td.num_splits(b * args.hkv, n, sms)
                bc = td.decode_split_tuned.best_config
                cells.append(f"{t_gqa / t:15.2f}x")
                note = f"s{splits} {bc.kwargs['BLOCK_N']}/{bc.num_warps}/{bc.num_stages}"
                notes.append(f"{note:>16}")
                rows.append(dict(batch=b, cache=n, waves=w, min_chunk=c, wave_eff=e, splits=splits, memattn_us=t * 1e3,
                                 sdpa_gqa_us=t_gqa * 1e3, x_sdpa_gqa=t_gqa / t, block_n=bc.kwargs["BLOCK_N"],
                                 warps=bc.num_warps, stages=bc.num_stages))
            print(f"{b:>5} {n:>7} {t_gqa * 1e3:8.1f} " + " ".join(cells), flush=True)
            print(f"{'':>22} " + " ".join(notes), flush=True)
            del q, k, v
    write_csv(rows, args.out, "decode_sweep.csv")


def fmt_row(r):
    cells = [f"{r['batch']:>5} {r['cache']:>7}"]
    for p in PROVIDERS:
        us, pct = r[p + "_us"], r[p + "_pct"]
        cells.append(f"{'-':>16}" if math.isnan(us) else f"{us:8.1f}us {pct:5.1f}%")
    cells += [f"{r['x_' + p]:6.2f}x" if not math.isnan(r["x_" + p]) else f"{'-':>7}" for p in PROVIDERS[1:]]
    if "called_memattn_over_sdpa_gqa" in r:
        cells.append(f"| as called {r['memattn_called_us']:7.1f}us vs {r['sdpa_gqa_called_us']:7.1f}us "
                     f"({r['called_memattn_over_sdpa_gqa']:4.2f}x the time)")
    return " ".join(cells)


def table(rows):
    head = f"{'batch':>5} {'cache':>7} " + " ".join(f"{p:>16}" for p in PROVIDERS) + " " + " ".join(
        f"{'vs ' + p[:4]:>7}" for p in PROVIDERS[1:])
    print("\n" + head)
    for r in rows:
        print(fmt_row(r))
    print("(us per call and % of HBM peak; 'vs X' = X's time / memattn's time, > 1 means memattn is faster; "
          "'as called': memattn's and sdpa_gqa's time per call without CUDA graphs, and memattn's over sdpa_gqa's)")


def save(rows, out):
    path = write_csv(rows, out, "decode.csv")
    plt = pyplot()
    if plt is None:
        return
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(4 * len(batches), 3.2), squeeze=False)
    for ax, b in zip(axes[0], batches):
        sel = [r for r in rows if r["batch"] == b]
        for p in PROVIDERS:
            ax.plot([r["cache"] for r in sel], [r[p + "_pct"] for r in sel], marker="o", label=p)
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 100)
        ax.set_title(f"batch {b}")
        ax.set_xlabel("cache length")
        ax.set_ylabel("% of HBM peak")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    png = os.path.join(out, "decode.png")
    fig.savefig(png, dpi=110)
    print(f"wrote {path} and {png}")


if __name__ == "__main__":
    main()
