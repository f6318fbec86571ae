"""Edge inputs (issue 7): NaN/inf in q, k or v, zero-size dims, gradients wanted for only some of q/k/v, and two
models in one process. The compiled result must be eager's (NaN exactly where eager has NaN)."""
from __future__ import annotations

import math

import pytest
import torch

import attn_compiler
from helpers import assert_close_to_truth, check_against_eager, run_fwd_bwd
from patterns import causal, scaled


def qkv(b=2, h=4, sq=17, sk=17, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, s, d, generator=g) for s in (sq, sk, sk)]


def attention(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1) @ v


@pytest.mark.parametrize("where,value", [("q", float("nan")), ("k", float("inf")), ("v", float("nan")),
                                         ("k", float("-inf"))], ids=["nan_q", "inf_k", "nan_v", "neg_inf_k"])
def test_non_finite_inputs_give_eagers_nan_pattern(where, value):
    """One poisoned element: the NaNs spread to exactly the outputs and gradients eager's spread them to."""
    q, k, v = qkv()
    t = {"q": q, "k": k, "v": v}[where]
    t[1, 2, 5, 3] = value
    check_against_eager(attention, [q, k, v], torch.float32)


@pytest.mark.parametrize("b,sq,sk", [(0, 17, 17), (2, 0, 17), (2, 17, 0)], ids=["batch0", "queries0", "keys0"])
def test_zero_size_dims(b, sq, sk):
    """An empty batch or no queries: empty results; no keys: eager's matmul over an empty axis gives zeros."""
    q, k, v = qkv(b=b, sq=sq, sk=sk)
    fn = torch.compile(attention, backend="memattn", fullgraph=True)
    for t in (q, k, v):
        t.requires_grad_()
    got = fn(q, k, v)
    want = attention(*(t.detach().requires_grad_() for t in (q, k, v)))
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, equal_nan=True)
    got.sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and t.grad.shape == t.shape and not t.grad.isnan().any()
    report = attn_compiler.last_report()
    # an empty axis is still an axis: the matmuls' views of an empty batch are told apart by the other sizes
    assert [s.status for s in report.sites] == ["rewritten"], str(report)


def test_view_of_an_empty_tensor_groups_axes_only_when_unambiguous():
    """0 is the product of any run of axes that includes it: the grouping is taken only when it is the one
    whose products give the new sizes, and a view that several groupings explain cannot be tracked."""
    from attn_compiler.layout import Factor, Untrackable, apply_view
    dims = [[Factor(i, s)] for i, s in enumerate((0, 4, 17, 16))]
    merged = apply_view(dims, (0, 17, 16))
    assert [[f.axis for f in d] for d in merged] == [[0, 1], [2], [3]]
    assert [[f.axis for f in d] for d in apply_view(merged, (0, 4, 17, 16))] == [[0], [1], [2], [3]]
    with pytest.raises(Untrackable, match="empty tensor"):
        apply_view([[Factor(i, s)] for i, s in enumerate((0, 4, 0))], (0, 0))  # (0, 4*0) or (0*4, 0)?


@pytest.mark.parametrize("needs", ["q", "k", "v", "kv", "qv"])
def test_grads_for_some_of_q_k_v(needs):
    """Only some inputs require grad: the others get none, and the ones that do match eager and the fp64 truth."""
    base = qkv(sq=19, sk=19)
    inputs = [t.detach().requires_grad_(name in needs) for name, t in zip("qkv", base)]
    truth = run_fwd_bwd(causal.tril_ones, [t.detach().double().requires_grad_(t.requires_grad) for t in inputs])
    eager = run_fwd_bwd(causal.tril_ones, [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs])
    compiled = torch.compile(causal.tril_ones, backend="memattn", fullgraph=True)
    got = run_fwd_bwd(compiled, inputs)
    assert attn_compiler.last_report().sites[0].status == "rewritten"
    assert_close_to_truth(got[0], eager[0], truth[0], torch.float32)
    assert len(got[1]) == len(needs)
    for a, e, t in zip(got[1], eager[1], truth[1]):
        assert_close_to_truth(a, e, t, torch.float32, what="grad")


def test_two_models_in_one_process_get_their_own_reports():
    before = len(attn_compiler.reports())
    f1 = torch.compile(attention, backend="memattn")
    f2 = torch.compile(scaled.div_scores, backend="memattn")
    q, k, v = qkv()
    f1(q, k, v)
    r1 = attn_compiler.last_report()
    f2(q, k, v[..., :8])
    r2 = attn_compiler.last_report()
    assert len(attn_compiler.reports()) == before + 2 and r1 is not r2
    assert r1.sites[0].location != r2.sites[0].location
    assert r1.sites[0].shapes["out"] != r2.sites[0].shapes["out"]  # v's head dim 16 vs 8
    assert all(len(r.sites) == 1 and r.sites[0].status == "rewritten" for r in (r1, r2))
