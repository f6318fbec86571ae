"""A mutation check of the test suite: each mutant is one plausible bug written into the code; the tests named
for it must fail. A mutant that survives is a property no test holds.

    python tests/mutants.py                 # every mutant, a table of killed / survived (minutes on a 2-core CPU)
    python tests/mutants.py --only gib      # some of them
    python tests/mutants.py --list

The tests of each mutant are first run on the code as it is, and must pass. Each mutant then edits one file in
place and restores it afterwards, whatever happens (do not run two at once, nor while editing those files). Exit
code 1 when any mutant survives, 2 when a baseline fails. tests/mutants.md records the last full run.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str          # relative to the repository root
    old: str           # must occur exactly once in the file
    new: str
    tests: tuple       # pytest arguments: the tests that should kill it
    why: str           # the bug it stands for
    env: tuple = ()    # (name, value) pairs for the test process


MUTANTS = [
    Mutant("causal_without_query_axis", "patterns/causal.py",
           "(coefs[0] == 0 and not has_m))", "(coefs[0] == 0))",
           ("tests/test_fuzz.py", "-k", "structured"),
           "a key-only index comparison (j <= 3) taken for the causal diagonal"),
    Mutant("strict_compare_bound", "patterns/causal.py",
           "return Pred(diff, _ladd(c, {1: -1}))", "return Pred(diff, c)",
           ("tests/test_patterns.py", "-k", "causal"),
           "j < i read as j <= i: the diagonal kept where the mask drops it"),
    Mutant("stats_not_saved", "attn_compiler/analysis.py",
           '[("out", 0), ("out", 1)]', '[("out", 0)]',
           ("tests/test_memory.py",),
           "the attention op's saved softmax stats missing from the memory estimate"),
    Mutant("online_softmax_no_rescale", "codegen/reference.py",
           "l_i = l_i * alpha + p.sum(-1)", "l_i = l_i + p.sum(-1)",
           ("tests/test_reference.py",),
           "the running softmax sum not rescaled when a later tile raises the row max"),
    Mutant("dropout_not_rescaled", "codegen/reference.py",
           "keep.to(self.acc) * (1.0 / (1.0 - p))", "keep.to(self.acc)",
           ("tests/test_reference.py", "-k", "dropout"),
           "kept probabilities not scaled by 1 / (1 - p)"),
    Mutant("softcap_not_scaled_back", "codegen/reference.py",
           "s = t * spec.softcap", "s = t",
           ("tests/test_reference.py",),
           "softcap * tanh(s / softcap) computed as tanh(s / softcap)"),
    Mutant("gib_as_gb", "attn_compiler/options.py",
           '"gib": 2 ** 30', '"gib": 10 ** 9',
           ("tests/test_backend.py", "-k", "budget or option"),
           "memory_budget='8GiB' parsed as 8 GB"),
    Mutant("plan_ignores_scale", "codegen/dispatch.py",
           "_sig(mask),\n           _sig(seed), scale, softcap,", "_sig(mask),\n           _sig(seed), softcap,",
           ("tests/test_launch.py", "tests/test_backend.py"),
           "a forward plan reused for a call with another softmax scale"),
    Mutant("backward_plan_ignores_causal_offset", "codegen/dispatch.py",
           "_sig(seed), scale, softcap, causal, causal_offset, mask_fill, mask_keep,\n",
           "_sig(seed), scale, softcap, causal, mask_fill, mask_keep,\n",
           ("tests/test_launch.py",),
           "a backward plan reused for a call with another causal offset"),
    Mutant("scale_after_bias_inverted", "patterns/scaled.py",
           'c = c if kind == "mul" else 1.0 / c', "c = c",
           ("tests/test_patterns.py", "-k", "masked"),
           "(scores + bias) / sqrt(d): the bias scaled by sqrt(d) instead of 1 / sqrt(d)"),
    Mutant("gqa_heads_grouped_the_wrong_way", "codegen/reference.py",
           "return t.unflatten(1, (hkv, h // hkv))", "return t.unflatten(1, (h // hkv, hkv)).transpose(1, 2)",
           ("tests/test_reference.py",),
           "a per-head bias or mask given to query head h of group h % hkv instead of h // (h / hkv)"),
    Mutant("kernel_causal_strict", "codegen/tiles.py",
           "x = tl.where(cols <= rows + causal_offset, x, float(\"-inf\"))",
           "x = tl.where(cols < rows + causal_offset, x, float(\"-inf\"))",
           ("tests/test_triton_prefill.py", "-k", "causal"),
           "the Triton kernel's causal compare drops the diagonal", env=(("TRITON_INTERPRET", "1"),)),
]


def _pytest(tests, env, timeout):
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **dict(env)})


def baseline(chosen, timeout: float) -> bool:
    """The tests of every mutant pass on the code as it is: otherwise a 'killed' would mean nothing."""
    ok = True
    for tests, env in dict.fromkeys((m.tests, m.env) for m in chosen):
        res = _pytest(tests, env, timeout)
        if res.returncode != 0:
            print(f"baseline: {' '.join(tests)} fails without any mutant (pytest exit {res.returncode}):\n"
                  f"{res.stdout[-2000:]}")
            ok = False
    return ok


def run(m: Mutant, timeout: float) -> tuple[str, float]:
    path = ROOT / m.path
    text = path.read_text()
    if text.count(m.old) != 1:
        return f"stale: the code it mutates is not in {m.path} exactly once", 0.0
    t0 = time.perf_counter()
    try:
        path.write_text(text.replace(m.old, m.new))
        try:
            res = _pytest(m.tests, m.env, timeout)
        except subprocess.TimeoutExpired:
            return "timeout", time.perf_counter() - t0
    finally:
        path.write_text(text)
    if res.returncode == 0:
        return "SURVIVED", time.perf_counter() - t0
    if res.returncode == 1:   # tests failed: killed
        return "killed", time.perf_counter() - t0
    return f"error (pytest exit {res.returncode})", time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds per mutant")
    ap.add_argument("--no-baseline", action="store_true", help="skip running the tests on the unmutated code")
    a = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if not a.only or m.name in a.only]
    if a.only and len(chosen) != len(a.only):
        known = ", ".join(m.name for m in MUTANTS)
        raise SystemExit(f"unknown mutant in {a.only}; known: {known}")
    if a.list:
        for m in chosen:
            print(f"{m.name:36s} {m.path}: {m.why}")
        return 0
    if not a.no_baseline and not baseline(chosen, a.timeout):
        return 2
    survived = 0
    print(f"{'mutant':36s} {'outcome':10s} {'s':>6s}  tests")
    for m in chosen:
        outcome, secs = run(m, a.timeout)
        survived += outcome != "killed"
        print(f"{m.name:36s} {outcome:10s} {secs:6.0f}  {' '.join(m.tests)}", flush=True)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
