"""``python -m attn_compiler demo``: compile the embedded GPT with memattn, print the report, and measure eager vs
memattn (output difference, training-step time and peak memory) on whatever device is present."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _device(name: str) -> str:
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _build(args):
    import torch
    from attn_compiler.models import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=args.layers, n_head=args.heads, n_kv_head=args.kv_heads, d_model=args.d_model,
                    block=max(args.seq, 16))
    dev = _device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = GPT(cfg).to(dev, dtype)
    g = torch.Generator(device="cpu").manual_seed(1)
    idx = torch.randint(0, cfg.vocab, (args.batch, args.seq), generator=g).to(dev)
    return model, idx


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


def _reset_peak_rss() -> bool:
    """Linux resets the peak resident size (VmHWM) when 5 is written to clear_refs."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _worker(args) -> None:
    """One measured configuration in a fresh process, so peak memory is this configuration's alone."""
    import gc

    import torch
    import attn_compiler  # noqa: F401

    model, idx = _build(args)
    cuda = idx.is_cuda
    step = model if args.worker == "eager" else torch.compile(model, backend="memattn")

    def train_step():
        loss = step(idx, idx)
        loss.backward()
        model.zero_grad(set_to_none=True)

    train_step()  # compile and warm up
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        measurable = _reset_peak_rss()
        base = _status_kib("VmRSS") * 1024 if measurable else 0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        train_step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if cuda:
        peak, kind = torch.cuda.max_memory_allocated() - base, "CUDA memory a step adds at its peak"
    elif measurable:
        peak, kind = _status_kib("VmHWM") * 1024 - base, "resident memory a step adds at its peak (VmHWM)"
    else:
        peak, kind = float("nan"), "peak memory not measurable here"
    print(json.dumps({"time_ms": 1000 * sorted(times)[len(times) // 2], "peak_bytes": peak, "peak_kind": kind}))


def _measure(args, which: str) -> dict:
    cmd = [sys.executable, "-m", "attn_compiler", "demo", "--worker", which] + _passthrough(args)
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if out.returncode != 0:
        raise SystemExit(f"demo worker '{which}' failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _passthrough(args):
    return ["--seq", str(args.seq), "--batch", str(args.batch), "--layers", str(args.layers), "--heads",
            str(args.heads), "--kv-heads", str(args.kv_heads), "--d-model", str(args.d_model), "--steps",
            str(args.steps), "--device", args.device, "--dtype", args.dtype]


def demo(args) -> int:
    import torch
    import attn_compiler

    if args.worker:
        _worker(args)
        return 0
    model, idx = _build(args)
    print(f"memattn demo: GPT with {args.layers} layers, {args.heads} heads ({args.kv_heads} kv heads), "
          f"d_model {args.d_model}, batch {args.batch}, sequence {args.seq}, {args.dtype} on {idx.device}\n")
    compiled = torch.compile(model, backend="memattn")
    with torch.no_grad():
        out = compiled(idx)
        ref = model(idx)
    report = attn_compiler.last_report()
    print(report.summary())
    print(report.table())
    print(f"\nmax |memattn - eager| of the logits: {(out.float() - ref.float()).abs().max().item():.3g}")
    if args.steps > 0:
        eager, mem = _measure(args, "eager"), _measure(args, "memattn")
        print(f"\ntraining step (forward + backward), median of {args.steps}, {eager['peak_kind']}:")
        print(f"  {'':8s} {'time ms':>10s} {'peak MiB':>10s}")
        for name, r in (("eager", eager), ("memattn", mem)):
            print(f"  {name:8s} {r['time_ms']:10.1f} {r['peak_bytes'] / 2 ** 20:10.1f}")
        print(f"  ratio    {mem['time_ms'] / eager['time_ms']:10.2f} "
              f"{mem['peak_bytes'] / max(eager['peak_bytes'], 1):10.2f}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attn_compiler", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="compile the embedded GPT with memattn and compare it with eager")
    d.add_argument("--seq", type=int, default=1024, help="sequence length (default 1024)")
    d.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    d.add_argument("--layers", type=int, default=4, help="transformer layers (default 4)")
    d.add_argument("--heads", type=int, default=8, help="query heads (default 8)")
    d.add_argument("--kv-heads", type=int, default=4, help="key/value heads; fewer than heads is GQA (default 4)")
    d.add_argument("--d-model", type=int, default=256, help="model width (default 256)")
    d.add_argument("--steps", type=int, default=3, help="timed training steps per side; 0 skips timing")
    d.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    d.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="parameter dtype (default fp32)")
    d.add_argument("--worker", choices=["eager", "memattn"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    return demo(args)


if __name__ == "__main__":
    sys.exit(main())
