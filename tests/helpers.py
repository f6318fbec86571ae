"""Comparison helpers shared by the tests: fp64 truth, eager error, first-bad-element reporting."""
from __future__ import annotations

import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attn_compiler
from attn_compiler.codegen import rng
from attn_compiler.codegen.reference import Spec
from conftest import TOL


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    both_nan = a.isnan() & b.isnan()
    d = (a.detach().double() - b.detach().double()).abs().masked_fill(both_nan, 0)
    return float(d.max()) if d.numel() else 0.0


def describe_mismatch(got: torch.Tensor, want: torch.Tensor, n: int = 5) -> str:
    got, want = got.detach(), want.detach()
    d = (got.double() - want.double()).abs().nan_to_num(float("inf"))
    d = d.masked_fill(got.isnan() & want.isnan(), 0)
    flat = d.flatten()
    idx = flat.topk(min(n, flat.numel())).indices
    rows = []
    for i in idx.tolist():
        pos = tuple(int(x) for x in torch.unravel_index(torch.tensor(i), d.shape))
        rows.append(f"  at {pos}: got {got[pos].item():.6g}, want {want[pos].item():.6g}")
    return "\n".join(rows)


def assert_close_to_truth(got, eager, truth, dtype, what="output"):
    """|got - truth| <= MULT * |eager - truth| + ATOL, NaNs where (and only where) the truth has them."""
    atol, mult = TOL[dtype]
    assert got.shape == truth.shape, f"{what}: shape {tuple(got.shape)} != {tuple(truth.shape)}"
    # eager itself can be NaN where the truth is not: torch's CPU bf16 matmul (2.13, AVX-512) lets a NaN row of p
    # (a fully masked row) leak into the next row of p @ v. There eager counts as exact (which only tightens the
    # budget), and so may the compiled graph where it ran the same aten ops (a site left alone); everywhere else
    # the NaN patterns must agree
    eager_own = eager.isnan() & ~truth.isnan()
    assert torch.equal(got.isnan() & ~eager_own, truth.isnan() & ~eager_own), (
        f"{what}: NaN pattern differs from the fp64 truth")
    eager = torch.where(eager_own, truth.to(eager.dtype), eager)
    got = torch.where(eager_own & got.isnan(), truth.to(got.dtype), got)
    err, base = _max_err(got, truth), _max_err(eager, truth)
    assert err <= mult * base + atol, (
        f"{what}: error {err:.3g} vs eager's {base:.3g} (dtype {dtype}, budget {mult}x + {atol})\n"
        + describe_mismatch(got, truth))


def run_fwd_bwd(fn, inputs, grad_out=None):
    """Output and grads of the float inputs that require grad."""
    out = fn(*inputs)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if not leaves:
        return out, []
    g = grad_out if grad_out is not None else torch.ones_like(out)
    grads = torch.autograd.grad(out, leaves, g.to(out.dtype), allow_unused=True)
    return out, list(grads)


def clone_inputs(inputs, dtype=None):
    out = []
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.dtype.is_floating_point:
            c = t.detach().to(dtype or t.dtype).clone()
            c.requires_grad_(t.requires_grad)
            out.append(c)
        else:
            out.append(t)
    return out


def check_against_eager(fn, inputs, dtype, *, dynamic=False, rewritten=1, left=0, fullgraph=True,
                        grad=True, options=None):
    """Compile fn with memattn and check output and grads vs eager and the fp64 truth; returns the report."""
    torch.manual_seed(1234)
    base = [t.detach().requires_grad_(grad and t.dtype.is_floating_point) if isinstance(t, torch.Tensor) else t
            for t in inputs]
    with torch.no_grad():
        # the output gradient as a value of the tested dtype: the truth sees the dO that eager and compiled see
        # (bf16 rounding of dO alone moves an ill-conditioned dq by an ulp of its largest element)
        g = torch.randn_like(fn(*clone_inputs(base, torch.float64))).to(dtype).double()
    truth, truth_g = run_fwd_bwd(fn, clone_inputs(base, torch.float64), g)
    eager, eager_g = run_fwd_bwd(fn, clone_inputs(base, dtype), g)
    compiled = torch.compile(fn, backend="memattn", dynamic=dynamic, fullgraph=fullgraph, options=options)
    got, got_g = run_fwd_bwd(compiled, clone_inputs(base, dtype), g)
    report = attn_compiler.last_report()
    assert len(report.rewritten) == rewritten and len(report.left) == left, str(report)
    assert got.dtype == eager.dtype
    assert_close_to_truth(got, eager, truth, dtype)
    for i, (a, e, t) in enumerate(zip(got_g, eager_g, truth_g)):
        if t is None:
            assert a is None or not a.abs().sum(), f"grad {i}: expected none"
            continue
        assert_close_to_truth(a, e, t, dtype, what=f"grad of input {i}")
    return report


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.op = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), func
        return out


def check_model(model, inputs, dtype, *, dynamic=False, rewritten=None, left=0, fullgraph=True, options=None,
                train=True):
    """Like check_against_eager for an nn.Module: fp64 copy as truth, outputs and parameter grads compared."""
    import copy

    torch.manual_seed(4321)
    models = {name: copy.deepcopy(model).to(dt) for name, dt in
              (("truth", torch.float64), ("eager", dtype), ("compiled", dtype))}
    for m in models.values():
        m.train(train)
    results = {}
    g = None
    for name, m in models.items():
        fn = m if name != "compiled" else torch.compile(m, backend="memattn", dynamic=dynamic, fullgraph=fullgraph,
                                                        options=options)
        ins = clone_inputs(inputs, torch.float64 if name == "truth" else dtype)
        out = fn(*ins)
        if g is None:
            g = torch.randn_like(out, dtype=torch.float64).to(dtype).double()  # a value of dtype (as above)
        grads = torch.autograd.grad(out, list(m.parameters()), g.to(out.dtype), allow_unused=True)
        results[name] = (out, grads)
    report = attn_compiler.last_report()
    if rewritten is not None:
        assert len(report.rewritten) == rewritten and len(report.left) == left, str(report)
    (t_out, t_g), (e_out, e_g), (c_out, c_g) = results["truth"], results["eager"], results["compiled"]
    assert_close_to_truth(c_out, e_out, t_out, dtype)
    for (pname, _), a, e, t in zip(model.named_parameters(), c_g, e_g, t_g):
        if t is None:
            continue
        assert_close_to_truth(a, e, t, dtype, what=f"grad of {pname}")
    return report


# The bf16 near-one-hot case of test_reference.py / test_triton_prefill.py (ds = p (dp - delta) cancels, so the
# backward's delta must be exact): its two Spec variants and its tensors.
NEAR_ONE_HOT_SPECS = {
    # softcap, dropout, and a row masked everywhere with a finite fill (uniform p, no gradient through it)
    "softcap_dropout_finite_fill": dict(scale=24 ** -0.5, softcap=20.0, dropout_p=0.3,
                                        mask_fill=torch.finfo(torch.bfloat16).min),
    # rows with no key at all (masked, and before the causal diagonal's start) under safe softmax: zero gradients
    "safe_softmax_empty_rows": dict(scale=24 ** -0.5, causal=True, causal_offset=-1, safe_softmax=True),
}


def near_one_hot_bf16_case(device="cpu"):
    """(q, k, v, bias, dout) in bf16, mask, seed: 3 keys, every query row a multiple of one key (p one-hot up to
    ~1e-6), a row masked everywhere and a masked key that is not its row's winner. The tensors are bf16 values, so
    an fp64 truth taken from them measures the computation's error, not the inputs' rounding."""
    g = torch.Generator().manual_seed(5)
    z, h, hkv, m, n, d = 2, 4, 2, 20, 3, 24
    k = torch.randn(z, hkv, n, d, generator=g)
    q = k.repeat_interleave(h // hkv, 1)[:, :, torch.arange(m) % n] * 3 + torch.randn(z, h, m, d, generator=g) * 0.1
    v = torch.randn(z, hkv, n, d, generator=g)
    bias = torch.randn(1, h, m, n, generator=g)
    dout = torch.randn(z, h, m, d, generator=g)
    tensors = tuple(t.to(device=device, dtype=torch.bfloat16) for t in (q, k, v, bias, dout))
    mask = torch.ones(m, n, dtype=torch.bool, device=device)
    mask[3] = False
    mask[7, 0] = False
    return tensors, mask, torch.tensor(77)


# ------------------------------------------------------------- kernel tests: the op's eager semantics and errors

# dtype -> (K forward, K backward, floor): kernel_err <= K * eager_err + floor (relative Frobenius errors)
BUDGET = {
    torch.float32: (4.0, 4.0, 2e-5),
    torch.float16: (2.0, 3.0, 1e-4),
    torch.bfloat16: (2.0, 3.0, 1e-3),
}


def eager(q, k, v, bias, mask, seed, spec: Spec):
    """Plain eager attention with every feature, materialising the M x N scores (tiny shapes only)."""
    z, h, m, _ = q.shape
    hkv, n = k.shape[1], k.shape[2]
    k = k.repeat_interleave(h // hkv, 1)
    v = v.repeat_interleave(h // hkv, 1)
    s = (q @ k.transpose(-1, -2)) * spec.scale
    if spec.softcap != 0:
        s = spec.softcap * torch.tanh(s / spec.softcap)
    if bias is not None:
        s = s + bias
    if mask is not None:
        s = s.masked_fill(~mask if spec.mask_keep else mask, spec.mask_fill)
    if spec.causal:
        rows = torch.arange(m, device=q.device).view(-1, 1)
        cols = torch.arange(n, device=q.device).view(1, -1)
        s = s.masked_fill(cols > rows + spec.causal_offset, float("-inf"))
    p = torch.softmax(s, -1)
    if spec.safe_softmax:
        p = torch.where((s == float("-inf")).all(-1, keepdim=True), torch.zeros_like(p), p)
    if spec.dropout_p > 0:
        p = p * (keep_full(z, h, m, n, seed, spec.dropout_p, q.device).to(p.dtype) / (1 - spec.dropout_p))
    return p @ v


def keep_full(z, h, m, n, seed, p, device):
    zh = torch.arange(z * h, device=device).view(z, h, 1, 1)
    rows = torch.arange(m, device=device).view(-1, 1)
    cols = torch.arange(n, device=device)
    return rng.keep_mask(rng.row_hash(int(seed), zh, rows), cols, p)


def rel_err(got, want):
    got, want = got.double(), want.double()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), mismatch("NaN pattern", got, want)
    assert torch.equal(torch.isinf(got), torch.isinf(want)), mismatch("inf pattern", got, want)
    fin = torch.isfinite(want)
    num = (got - want)[fin].norm()
    # a gradient that is 0 in exact arithmetic (one key: p = 1, ds = 0) has only rounding left: measure it
    # against an O(1) scale instead of its own near-zero norm
    den = want[fin].norm() + 0.1 * math.sqrt(max(int(fin.sum()), 1))
    return (num / den).item()


def mismatch(what, got, want, n=5):
    bad = (torch.isnan(got) != torch.isnan(want)) | ((got - want).abs() > 1e-2 * (want.abs() + 1e-2))
    idx = bad.nonzero()[:n].tolist()
    lines = [f"{what}: {int(bad.sum())} of {bad.numel()} elements differ; first:"]
    lines += [f"  {tuple(i)}: got {got[tuple(i)].item():.6g} want {want[tuple(i)].item():.6g}" for i in idx]
    return "\n".join(lines)
