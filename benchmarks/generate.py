"""End to end: greedy `model.generate` tokens/s of a LLaMA-style model (random weights, GQA) with memattn's
attention against HF's eager and SDPA attention, side by side in one run.

    python benchmarks/generate.py                          # H100: batch {1, 8}, prompt 1024, 256 new tokens
    python benchmarks/generate.py --batch 1 --new 64 --cache static
    python benchmarks/generate.py --device cpu --layers 2 --hidden 128 --prompt 32 --new 8   # smoke run

Providers (the same weights; only the attention differs):
    eager      attn_implementation="eager", not compiled: HF's repeat_kv copies K/V, n x n scores in prefill
    sdpa       attn_implementation="sdpa", not compiled (PyTorch's fused attention; HF passes GQA as repeat_kv or
               enable_gqa, whichever its version does)
    memattn    attn_implementation="eager", model.forward compiled with backend="memattn": the prompt runs the
               prefill kernel, every decode step the split-KV kernel, repeat_kv folded away. The rest of the
               graph runs op by op (inner="eager", the default): each decomposed aten op is one Python call and
               one launch, so a small model at batch 1 is launch-bound and slower than HF's eager module
    memattn-inductor   the same with options={"inner": "inductor"}: Inductor fuses everything but attention
    sdpa-inductor      attn_implementation="sdpa", model.forward compiled with Inductor (the compiled baseline)
--mode passes a torch.compile mode (e.g. reduce-overhead: CUDA graphs) to both Inductor providers.
Both caches: "dynamic" (torch.cat every step; memattn's report gives the bytes that copies) and "static"
(written in place). Each provider generates once to warm up (memattn compiles there, including the recompile that
makes the cache length dynamic), then --reps times; tokens/s = batch * new tokens / mean time of one generate.
Peak memory is torch.cuda.max_memory_allocated over one timed generate. "same" is the fraction of generated tokens
equal to eager's (greedy decoding in bf16 may part ways after a near-tie). Prints a table; writes generate.csv.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from common import write_csv

PROVIDERS = ("eager", "sdpa", "memattn", "memattn-inductor", "sdpa-inductor")
DEFAULT_PROVIDERS = ("eager", "sdpa", "memattn", "memattn-inductor")


def build(args, attn):
    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                                   num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                   num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                                   max_position_embeddings=args.prompt + args.new + 16, attn_implementation=attn)
    return transformers.LlamaForCausalLM(cfg).to(args.device, getattr(torch, args.dtype)).eval()


def sync(args):
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


def run(args, provider, cache, batch, ids):
    torch._dynamo.reset()
    model = build(args, "sdpa" if provider.startswith("sdpa") else "eager")
    if provider == "memattn":
        model.forward = torch.compile(model.forward, backend="memattn")
    elif provider == "memattn-inductor":
        opts = {"inner": "inductor"} if args.mode is None else {"inner": "inductor", "mode": args.mode}
        model.forward = torch.compile(model.forward, backend="memattn", options=opts)
    elif provider == "sdpa-inductor":
        model.forward = torch.compile(model.forward, mode=args.mode)
    # disable_compile: HF would torch.compile a static-cache model itself on CUDA; the baselines stay eager
    kw = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0,
              disable_compile=True)
    if cache == "static":
        kw["cache_implementation"] = "static"
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model.generate(ids, **kw)          # warm-up (and memattn's compiles)
        sync(args)
        first = time.perf_counter() - t0
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(args.reps):
            out = model.generate(ids, **kw)
        sync(args)
        sec = (time.perf_counter() - t0) / args.reps
    peak = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else float("nan")
    del model
    return out[:, ids.shape[1]:], sec, first, peak


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--cache", nargs="+", default=["dynamic", "static"], choices=["dynamic", "static"])
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--providers", nargs="+", default=list(DEFAULT_PROVIDERS), choices=PROVIDERS)
    ap.add_argument("--mode", default=None, help="torch.compile mode of the Inductor providers")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for generate.csv")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("benchmarks/generate.py times a CUDA device (--device cpu only smoke-tests it)")
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu (smoke run)"
    print(f"# {name}, torch {torch.__version__}, {args.dtype}, LLaMA-style {args.layers} layers, hidden "
          f"{args.hidden}, {args.heads} heads / {args.kv_heads} KV heads, prompt {args.prompt}, {args.new} new tokens")
    ours = [p for p in args.providers if p.startswith("memattn")]
    pairs = [(m, p) for m in ours for p in args.providers if p not in ours]   # memattn X / baseline Y
    rows = []
    for cache in args.cache:
        for b in args.batch:
            ids = torch.randint(1, args.vocab, (b, args.prompt),
                                generator=torch.Generator().manual_seed(1)).to(args.device)
            row = dict(cache=cache, batch=b)
            for p in args.providers:
                row.update({f"{p}_{k}": float("nan") for k in ("tok_s", "first_s", "peak_gib", "same")})
            ref = None
            for p in args.providers:
                try:
                    toks, sec, first, peak = run(args, p, cache, b, ids)
                except torch.OutOfMemoryError:
                    continue
                if ref is None:
                    ref = toks
                row[f"{p}_tok_s"] = b * args.new / sec
                row[f"{p}_first_s"] = first
                row[f"{p}_peak_gib"] = peak / 2 ** 30
                row[f"{p}_same"] = (toks == ref).float().mean().item()
            for m, p in pairs:
                row[f"{m}_vs_{p}"] = row[f"{m}_tok_s"] / row[f"{p}_tok_s"]
            rows.append(row)
            print(" | ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
                  flush=True)
    print()
    head = ["cache", "batch"] + [f"{p} tok/s (peak GiB)" for p in args.providers] + \
        [f"{m} / {p}" for m, p in pairs]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [r["cache"], str(r["batch"])]
        cells += [f"{r.get(p + '_tok_s', float('nan')):.1f} ({r.get(p + '_peak_gib', float('nan')):.2f})"
                  for p in args.providers]
        cells += [f"{r.get(m + '_vs_' + p, float('nan')):.2f}x" for m, p in pairs]
        print("| " + " | ".join(cells) + " |")
    print("(tokens/s of greedy generate; 'memattn / X' > 1 means memattn generates faster than X)")
    if rows:
        write_csv(rows, args.out, "generate.csv")


if __name__ == "__main__":
    main()
