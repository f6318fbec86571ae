"""End to end: one training step (forward + backward) of a whole model with memattn against the same model with
PyTorch's SDPA, compiled by Inductor and not, side by side in one run.

    python benchmarks/model.py                                   # GPT and LLaMA-style, n in {2k, 8k, 16k}
    python benchmarks/model.py --models gpt --n 2048 --steps 3   # quicker
    python benchmarks/model.py --device cpu --layers 2 --d-model 64 --heads 4 --n 64 --steps 1   # smoke run

Models (random weights, bf16, batch 1, cross-entropy loss on the inputs shifted by the model):
    gpt     attn_compiler.models.GPT: --layers (12) layers, d_model 1024, 16 heads, causal, the attention in the
            eager spelling softmax(q @ k^T * scale + causal mask) @ v (or F.scaled_dot_product_attention for the
            SDPA providers)
    llama   transformers' LlamaForCausalLM: --llama-layers (8) layers, hidden 1024, 16 heads / 8 KV heads (GQA),
            RoPE, SwiGLU; attn_implementation="eager" for memattn, "sdpa" for the SDPA providers
Providers:
    sdpa              the SDPA model, not compiled
    sdpa-inductor     torch.compile(SDPA model): Inductor, the baseline a user compares with
    memattn           torch.compile(eager model, backend="memattn"), default options (on CUDA inner="auto" is
                      Inductor compiling the rewritten graph)
    memattn-eager     the same with options={"inner": "eager"}: the rewritten graph run op by op
Step time: the median of --steps steps (each synchronised) after two warm-up steps; the first step's time (the
compile) is given too. Peak: torch.cuda.max_memory_allocated over one step (parameters and gradients included).
Ratios are memattn's over sdpa-inductor's. Prints a table; writes model.csv and model.png into --out.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from common import pyplot, write_csv

PROVIDERS = ("sdpa", "sdpa-inductor", "memattn", "memattn-eager")
BASELINE = "sdpa-inductor"
GIB = 2 ** 30


def build(args, model: str, n: int, sdpa: bool):
    """(module, step: () -> loss) for one model at sequence length n."""
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    idx = torch.randint(0, args.vocab, (args.batch, n), generator=torch.Generator().manual_seed(1)).to(args.device)
    if model == "gpt":
        from attn_compiler.models import GPT, GPTConfig
        cfg = GPTConfig(vocab=args.vocab, block=n, n_layer=args.layers, n_head=args.heads, n_kv_head=args.heads,
                        d_model=args.d_model, attention="sdpa" if sdpa else "explicit")
        net = GPT(cfg).to(args.device, dtype)
        return net, lambda fn: fn(idx, idx)
    import transformers
    cfg = transformers.LlamaConfig(hidden_size=args.d_model, intermediate_size=args.d_model * 8 // 3,
                                   num_hidden_layers=args.llama_layers, num_attention_heads=args.heads,
                                   num_key_value_heads=max(1, args.heads // 2), vocab_size=args.vocab,
                                   max_position_embeddings=n, attn_implementation="sdpa" if sdpa else "eager")
    net = transformers.LlamaForCausalLM(cfg).to(args.device, dtype)

    def step(fn):
        logits = fn(input_ids=idx).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), idx[:, 1:].flatten())
    return net, step


def sync(args):
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


def run(args, model: str, n: int, provider: str):
    """(median step s, first step s, peak bytes)."""
    import attn_compiler
    torch._dynamo.reset()
    net, step = build(args, model, n, sdpa=provider.startswith("sdpa"))
    if provider == "sdpa":
        fn = net
    elif provider == "sdpa-inductor":
        fn = torch.compile(net)
    else:
        opts = {"inner": "eager"} if provider == "memattn-eager" else {}
        # the backend object rather than its entry-point name: works from a checkout that is not pip-installed
        fn = torch.compile(net, backend=attn_compiler.backend(**opts))

    def one():
        net.zero_grad(set_to_none=True)
        step(fn).backward()

    sync(args)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # HF's notes on eager attention; memattn's own land in its report
        one()
        sync(args)
        first = time.perf_counter() - t0
        one()
        sync(args)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            one()
            sync(args)
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else float("nan")
    net = fn = None   # frees them (the step closure holds the cells)
    return statistics.median(times), first, peak


def plot(rows, out):
    plt = pyplot()
    if plt is None:
        return
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, m in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == m]
        for p in PROVIDERS:
            pts = [(r["n"], r[f"{p}_ms"]) for r in mine if r[f"{p}_ms"] == r[f"{p}_ms"]]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=p)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("training step, ms")
        ax.set_title(m)
        ax.legend()
    fig.tight_layout()
    path = os.path.join(out, "model.png")
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["gpt", "llama"], choices=["gpt", "llama"])
    ap.add_argument("--n", type=int, nargs="+", default=[2048, 8192, 16384])
    ap.add_argument("--layers", type=int, default=12, help="GPT layers")
    ap.add_argument("--llama-layers", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for model.csv and model.png")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("benchmarks/model.py times a CUDA device (--device cpu only smoke-tests it)", file=sys.stderr)
        return 1
    import triton
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu (smoke run)"
    print(f"# {name}, torch {torch.__version__}, triton {triton.__version__}, {args.dtype}, batch {args.batch}; "
          f"training step ms (median of {args.steps}), first step s, peak GiB", flush=True)
    rows = []
    for model in args.models:
        for n in args.n:
            row = dict(model=model, n=n)
            for p in args.providers:
                try:
                    sec, first, peak = run(args, model, n, p)
                except torch.OutOfMemoryError:
                    sec = first = peak = float("nan")
                    torch.cuda.empty_cache()
                row.update({f"{p}_ms": sec * 1e3, f"{p}_first_s": first, f"{p}_peak_gib": peak / GIB})
                print(f"{model:6s} n={n:6d} {p:17s} {sec * 1e3:9.2f} ms  first {first:6.1f} s  peak "
                      f"{peak / GIB:6.2f} GiB", flush=True)
            for p in args.providers:
                if p.startswith("memattn") and BASELINE in args.providers:
                    row[f"{p}_time_ratio"] = row[f"{p}_ms"] / row[f"{BASELINE}_ms"]
                    row[f"{p}_peak_ratio"] = row[f"{p}_peak_gib"] / row[f"{BASELINE}_peak_gib"]
            rows.append(row)
    print()
    print("| model | n | " + " | ".join(f"{p} ms (GiB)" for p in args.providers) + " | " +
          " | ".join(f"{p} / {BASELINE} time, peak" for p in args.providers if f"{p}_time_ratio" in rows[0]) + " |")
    for r in rows:
        cells = [f"{r[f'{p}_ms']:.1f} ({r[f'{p}_peak_gib']:.2f})" for p in args.providers]
        cells += [f"{r[f'{p}_time_ratio']:.2f}x, {r[f'{p}_peak_ratio']:.2f}x" for p in args.providers
                  if f"{p}_time_ratio" in r]
        print(f"| {r['model']} | {r['n']} | " + " | ".join(cells) + " |")
    print(f"wrote {write_csv(rows, args.out, 'model.csv')}")
    plot(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
