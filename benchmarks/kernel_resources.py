"""Registers, spills and shared memory of memattn's Triton kernels, per autotune candidate, on any machine.

    python benchmarks/kernel_resources.py                            # every kernel, d in {64, 128, 256}, sm_90a
    python benchmarks/kernel_resources.py --kernel dkdv --d 256 --extra 32,32,8,2
    python benchmarks/kernel_resources.py --kernel fwd --causal --bucket 1 --arch 80
    python benchmarks/kernel_resources.py --kernel fwd --d 64 --causal --sass --set FUSE_SCALE=0   # A/B a flag

No GPU is needed: Triton compiles for the named target and this script runs the ptxas Triton ships on the PTX
(``ptxas -v``). A tile that spills ("bytes spill stores" per thread) pays local-memory traffic in its inner loop;
this is how the backward spaces of codegen/triton_prefill.py got spill-light candidates without GPU time. Speed
is still the GPU benchmark's call (benchmarks/prefill.py --configs): this only says which tiles are worth timing.

--sass also counts the instructions of the compiled code (cuobjdump, shipped with Triton next to ptxas): all, and
the classes the softmax spends its time in (FMUL, FFMA, FADD, MUFU = exp2, FMNMX, FSEL) against HGMMA (the MMAs),
and prints a digest of the code itself: a refactor that should not change a kernel shows the same digests
(``--sass --all-flags`` before and after, then diff the two outputs).
Static counts, not time, but the same kernel with a flag flipped (--set NAME=VALUE overrides a constexpr) shows what
a change removes from the code; e.g. FUSE_SCALE=0 vs 1.

Each kernel is compiled for bf16 inputs without bias, mask or dropout, pointer loads (no TMA), head dim d for both
q/k and v; the candidates are the kernel's pruned autotune space for that d, --bucket and --causal, plus --extra
tiles (d,BLOCK_M,BLOCK_N,warps,stages; the decode kernel's BLOCK_M is its row block). Triton's code depends on its
version: run this with the Triton of the GPU machine (e.g. ``pip install --no-deps --target /tmp/t36
triton==3.6.0``, then ``PYTHONPATH=/tmp/t36 python benchmarks/kernel_resources.py ...``).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from attn_compiler.codegen import autotune
from attn_compiler.codegen import triton_decode  # noqa: F401  (registers the decode autotuner, and prefill's)

# name -> (the raw jit kernel under the autotuner, its prune, its config space)
KERNELS = {name: (autotune.jit_function(tuner), prune, space) for name, (tuner, prune, space)
           in autotune.AUTOTUNED.items()}
POINTERS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "DO": "*bf16", "Out": "*bf16", "DQ": "*bf16", "DK": "*bf16",
            "DV_": "*bf16", "KDesc": "*bf16", "VDesc": "*bf16", "Bias": "*fp32", "Stats": "*fp32",
            "Delta": "*fp32", "DBias": "*fp32", "Acc": "*fp32", "ML": "*fp32", "Mask": "*i1", "Seed": "*i64"}
FLOATS = {"qk_scale", "softcap_in", "softcap_out", "fill2", "dropout_p", "inv_keep", "scale"}
INTS = {"H", "HKV", "M", "N", "D", "DV", "GQA_RATIO", "ZHM", "BUCKET_M", "BUCKET_N", "BUCKET_P", "G", "R", "CHUNK",
        "SPLITS", "ROWS_PAD", "causal_offset"}


def flags(d: int, causal: bool) -> dict:
    """The constexpr values of a plain bf16 call with head dim d (every kernel takes the ones it declares)."""
    return dict(BLOCK_D=d, BLOCK_DV=d, EVEN_M=True, EVEN_N=True, EVEN_D=True, EVEN_DV=True, IS_CAUSAL=causal,
                HAS_BIAS=False, HAS_MASK=False, MASK_KEEP=True, HAS_DROPOUT=False, SOFTCAP=False,
                SAFE_SOFTMAX=False, HAS_DBIAS=False, DB_SUM_M=False, DB_SUM_N=False, NATURAL=False, DOT_PREC="tf32",
                USE_TMA=False, WARP_SPEC=False, FUSE_SCALE=True, CAUSAL_LOOP=0, DIRECT=False, PDL=False)


def example_int(name: str, d: int, decode: bool) -> int:
    """The value an integer argument has in a typical call (contiguous [B, H, n, d] tensors, n = 4096; a decode
    step: one query row, GQA group 4, 32 splits), for the specialisation Triton's launcher would compile."""
    if name.startswith("stride_"):
        if name[7:].startswith(("b", "m", "db")):   # bias / mask (absent here): broadcast strides
            return 0
        return 1 if name.endswith("d") else 16 * d   # the head dim is contiguous; every other stride is d * k
    return {"H": 32, "HKV": 8, "M": 1 if decode else 4096, "N": 131072 if decode else 4096, "D": d, "DV": d,
            "GQA_RATIO": 1, "ZHM": 32 * 4096, "G": 4, "R": 4, "CHUNK": 4096, "SPLITS": 32, "ROWS_PAD": 16,
            "causal_offset": 0}.get(name, 2)        # BUCKET_*: a middle bucket


def signature(kernel, consts: dict, d: int) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) as Triton's launcher specialises a typical call: integers equal to 1 become
    constants and pointers and integers divisible by 16 carry tt.divisibility, which decides vectorised loads
    and with them whether a loop's loads are pipelined (cp.async)."""
    sig, values, attrs = {}, {}, {}
    decode = "BLOCK_R" in kernel.arg_names
    for i, p in enumerate(kernel.params):
        if p.is_constexpr:
            sig[p.name], values[p.name] = "constexpr", consts[p.name]
        elif p.name in POINTERS:
            sig[p.name] = POINTERS[p.name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif p.name in FLOATS:
            sig[p.name] = "fp32"
        elif p.name in INTS or p.name.startswith("stride_"):
            v = example_int(p.name, d, decode)
            if v == 1:
                sig[p.name], values[p.name] = "constexpr", 1
            else:
                sig[p.name] = "i32"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            raise ValueError(f"{kernel.__name__}: parameter {p.name!r} is not classified here (add it to POINTERS, "
                             f"FLOATS or INTS)")
    return sig, values, attrs


# --all-flags: one build per code path a refactor could touch (each set over flags()'s plain call, first candidate
# tile only). TMA is left out: its descriptors are not pointer arguments this script can type.
FLAG_SETS = {
    "plain": {},
    "causal": dict(IS_CAUSAL=True),
    "causal1": dict(IS_CAUSAL=True, CAUSAL_LOOP=1),
    "ragged": dict(EVEN_M=False, EVEN_N=False, EVEN_D=False, EVEN_DV=False),
    "mask": dict(HAS_MASK=True, NATURAL=True, FUSE_SCALE=False, IS_CAUSAL=True),
    "maskdrop": dict(HAS_MASK=True, MASK_KEEP=False, NATURAL=True, FUSE_SCALE=False, EVEN_M=False),
    "bias": dict(HAS_BIAS=True, NATURAL=True, FUSE_SCALE=False, HAS_DBIAS=True),
    "biasrow": dict(HAS_BIAS=True, NATURAL=True, FUSE_SCALE=False, HAS_DBIAS=True, DB_SUM_M=True, EVEN_N=False),
    "softcap": dict(SOFTCAP=True, FUSE_SCALE=False, SAFE_SOFTMAX=True),
    "dropout": dict(HAS_DROPOUT=True, IS_CAUSAL=True),
    "direct": dict(DIRECT=True, SAFE_SOFTMAX=True),
}

SASS_CLASSES = ("FMUL", "FFMA", "FADD", "MUFU", "FMNMX", "FSEL", "HGMMA")


def sass_counts(cubin: bytes, arch: int) -> dict:
    """Instruction counts of a cubin: 'all', per opcode (the mnemonic before its first dot), and 'digest': a hash of
    every instruction with its operands in order (not the kernel's name or line info), so that two builds of a
    kernel compare equal exactly when their machine code is the same."""
    from triton.backends.nvidia.compiler import get_ptxas
    tool = os.path.join(os.path.dirname(get_ptxas(arch).path), "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
    ops = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass, re.M)
    code = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(.*?)\s*;", sass, re.M)
    counts = {"all": len(ops), "digest": hashlib.sha1("\n".join(code).encode()).hexdigest()[:12]}
    for op in ops:
        counts[op] = counts.get(op, 0) + 1
    return counts


def resources(kernel, consts: dict, warps: int, stages: int, arch: int, sass: bool = False) -> dict:
    """Compile for sm_<arch> and read ptxas -v: registers and spill stores per thread, shared memory per block
    (and with ``sass`` the instruction counts, see sass_counts)."""
    sig, values, attrs = signature(kernel, consts, consts["BLOCK_D"])
    start = time.time()
    k = triton.compile(ASTSource(kernel, sig, values, attrs), target=GPUTarget("cuda", arch, 32),
                       options=dict(num_warps=warps, num_stages=stages))
    seconds = time.time() - start
    from triton.backends.nvidia.compiler import get_ptxas
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(k.asm["ptx"])
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        log = subprocess.run([get_ptxas(arch).path, "-v", "--gpu-name", gpu, ptx, "-o", ptx + ".o"],
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    return dict(regs=int(regs.group(1)) if regs else -1, spill_bytes=int(spills.group(1)) if spills else 0,
                shared=k.metadata.shared, compile_s=seconds, cp_async=k.asm["ptx"].count("cp.async.c"),
                sass=sass_counts(k.asm["cubin"], arch) if sass else None)


def candidates(name: str, d: int, bucket: int, causal: bool, extra: list[str]) -> list[tuple]:
    _, prune, space = KERNELS[name]
    args = dict(BLOCK_D=d, BLOCK_DV=d, BUCKET_M=bucket, IS_CAUSAL=causal, DOT_PREC="tf32")
    tiles = []
    for c in prune(space, {}, **args):
        bm = c.kwargs.get("BLOCK_M", 16)
        tiles.append((d, bm, c.kwargs["BLOCK_N"], c.num_warps, c.num_stages))
    for e in extra:
        t = tuple(int(x) for x in e.split(","))
        if len(t) != 5:
            raise ValueError(f"--extra {e!r}: want d,BLOCK_M,BLOCK_N,warps,stages")
        if t[0] == d and t not in tiles:
            tiles.append(t)
    return tiles


def parse_overrides(items: list) -> dict:
    """NAME=VALUE pairs of constexpr flags; a name must be one of flags()'s."""
    known = flags(64, False)
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in known:
            raise ValueError(f"--set {item!r}: want NAME=VALUE with NAME one of {', '.join(sorted(known))}")
        if isinstance(known[name], bool):
            out[name] = value.lower() in ("1", "true")
        elif isinstance(known[name], int):
            out[name] = int(value)
        else:
            out[name] = value
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernel", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    ap.add_argument("--d", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--bucket", type=int, default=2, help="query-length bucket of the prunes (0-3, see _bucket)")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (sm_90a), 80")
    ap.add_argument("--extra", nargs="*", default=[], help="more tiles: d,BLOCK_M,BLOCK_N,warps,stages")
    ap.add_argument("--sass", action="store_true", help="also count instructions (see above)")
    ap.add_argument("--all-flags", action="store_true",
                    help="every FLAG_SETS entry on each kernel's first candidate tile (implies --sass)")
    ap.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE",
                    help="override constexpr flags (bool, int or string)")
    a = ap.parse_args(argv)
    overrides = parse_overrides(a.set)
    sets = FLAG_SETS if a.all_flags else {"": {}}
    a.sass = a.sass or a.all_flags
    print(f"# triton {triton.__version__}, sm_{a.arch}, bf16, bucket {a.bucket}, "
          f"{'causal' if a.causal else 'not causal'}, pointer loads")
    if overrides:
        print(f"# flags set: {overrides}")
    head = f"{'kernel':6} {'d':>3} {'tile':>7} {'warps':>5} {'stages':>6} {'regs':>4} {'spill B':>7} {'smem KiB':>8}"
    columns = ("all",) + SASS_CLASSES + ("digest",)
    print(head + ("".join(f" {c:>6}" for c in columns) if a.sass else "") + (" flags" if a.all_flags else ""))
    for name in a.kernel:
        kernel = KERNELS[name][0]
        for d in a.d:
            tiles = candidates(name, d, a.bucket, a.causal, a.extra)
            for set_name, flag_set in sets.items():
                for d_, bm, bn, w, s in tiles[:1] if a.all_flags else tiles:
                    consts = dict(flags(d_, a.causal), BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=bm, **flag_set, **overrides)
                    r = resources(kernel, consts, w, s, a.arch, sass=a.sass)
                    tile = f"{bm}x{bn}"
                    counts = "".join(f" {r['sass'].get(c, 0):>6}" for c in columns) if a.sass else ""
                    print(f"{name:6} {d_:>3} {tile:>7} {w:>5} {s:>6} {r['regs']:>4} {r['spill_bytes']:>7} "
                          f"{r['shared'] / 1024:>8.1f}{counts} {set_name}".rstrip(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
