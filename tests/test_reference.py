"""The op and its blockwise CPU implementation against a dense fp64 softmax(QK^T)V, across the flag grid."""
import itertools
import operator

import pytest
import torch

from attn_compiler.codegen import reference, rng
from attn_compiler.codegen.reference import Spec
from helpers import NEAR_ONE_HOT_SPECS, LargestTensor, near_one_hot_bf16_case

attention = torch.ops.memattn.attention


def dense(q, k, v, bias, mask, spec: Spec, seed=None, dtype=torch.float64):
    """softmax(QK^T)V written the obvious way in fp64 (or eager in ``dtype``), with the op's dropout decisions."""
    h, hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(h // hkv, 1).to(dtype)
    v = v.repeat_interleave(h // hkv, 1).to(dtype)
    s = (q.to(dtype) @ k.transpose(-1, -2)) * spec.scale
    if spec.softcap:
        s = torch.tanh(s / spec.softcap) * spec.softcap
    if bias is not None:
        s = s + bias.to(dtype)
    if mask is not None:
        s = s.masked_fill(~mask if spec.mask_keep else mask, spec.mask_fill)
    if spec.causal:
        i = torch.arange(s.shape[-2])[:, None]
        j = torch.arange(s.shape[-1])[None, :]
        s = s.masked_fill(j > i + spec.causal_offset, float("-inf"))
    p = torch.ops.aten._safe_softmax(s, -1) if spec.safe_softmax else torch.softmax(s, -1)
    if spec.dropout_p:
        z, hh, m, n = p.shape
        zh = torch.arange(z * hh).view(z, hh, 1, 1)
        keep = rng.keep_mask(rng.row_hash(int(seed), zh, torch.arange(m).view(1, 1, m, 1)), torch.arange(n),
                             spec.dropout_p)
        p = p * keep / (1 - spec.dropout_p)
    return p @ v


def call(q, k, v, bias, mask, spec: Spec, seed=None):
    return attention(q, k, v, bias, mask, seed, spec.scale, spec.softcap, spec.causal, spec.causal_offset,
                     spec.mask_fill, spec.mask_keep, spec.dropout_p, spec.safe_softmax, "reference")


GRID = list(itertools.product(
    [(1, 1), (17, 17), (17, 40), (127, 33)],    # (M, N): single query, tile-straddling, cross-attention
    [16, 40, 64, 80],                            # head dims, powers of two and not
    [(4, 4), (4, 2), (4, 1)],                    # (H, Hkv): MHA, GQA, MQA
))


@pytest.mark.parametrize("mn,d,heads", GRID, ids=lambda x: str(x))
def test_forward_backward_vs_dense_fp64(mn, d, heads):
    m, n = mn
    h, hkv = heads
    g = torch.Generator().manual_seed(m * 1000 + n + d + h * 7 + hkv)
    q = torch.randn(2, h, m, d, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(2, hkv, n, d, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(2, hkv, n, d + 8, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(1, h, m, n, dtype=torch.float64, generator=g, requires_grad=True)
    mask = torch.rand(2, 1, 1, n, generator=g) > 0.25
    mask[..., 0] = True
    causal = m <= n
    spec = Spec(scale=d ** -0.5, softcap=7.0, causal=causal, causal_offset=n - m, mask_fill=-1e9)
    want = dense(q, k, v, bias, mask, spec)
    got, _ = call(q, k, v, bias, mask, spec)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    go = torch.randn_like(want)
    gw = torch.autograd.grad(want, (q, k, v, bias), go)
    gg = torch.autograd.grad(got, (q, k, v, bias), go)
    for name, a, b in zip("q k v bias".split(), gg, gw):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=lambda s: f"d{name}: {s}")


@pytest.mark.parametrize("offset", [-3, 0, 5])
def test_causal_offsets_and_fully_masked_rows(offset):
    q, k, v = (torch.randn(1, 2, 20, 8, dtype=torch.float64) for _ in range(3))
    spec = Spec(scale=0.3, causal=True, causal_offset=offset)
    got, _ = call(q, k, v, None, None, spec)
    want = dense(q, k, v, None, None, spec)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12, equal_nan=True)
    assert got.isnan().any() == (offset < 0)  # rows before the diagonal's start see no key: NaN as in eager


def test_safe_softmax_zeroes_fully_masked_rows():
    q, k, v = (torch.randn(1, 1, 6, 4) for _ in range(3))
    mask = torch.ones(6, 6, dtype=torch.bool)
    mask[2] = False
    out, _ = call(q, k, v, None, mask, Spec(scale=1.0, safe_softmax=True))
    assert out[0, 0, 2].eq(0).all() and not out.isnan().any()


def test_empty_key_length_gives_zeros_like_eager():
    q = torch.randn(1, 2, 5, 8)
    k = v = torch.randn(1, 2, 0, 8)
    out, _ = call(q, k, v, None, None, Spec(scale=1.0))
    eager = torch.softmax(q @ k.transpose(-1, -2), -1) @ v
    torch.testing.assert_close(out, eager)


def test_no_n_by_n_intermediate(monkeypatch):
    """Forward and backward at M = N = 512 with 64-wide tiles: nothing near M x N per head is ever allocated."""
    monkeypatch.setattr(reference, "BLOCK_M", 64)
    monkeypatch.setattr(reference, "BLOCK_N", 64)
    z, h, n, d = 1, 2, 512, 16
    q, k, v = (torch.randn(z, h, n, d, requires_grad=True) for _ in range(3))
    spec = Spec(scale=0.25)
    with LargestTensor() as probe:
        out, _ = call(q, k, v, None, None, spec)
        out.sum().backward()
    tile = z * h * 64 * 64
    assert probe.largest <= max(tile, z * h * n * d), (probe.largest, probe.op)
    assert probe.largest < z * h * n * n // 8
    # and the dense computation does allocate it: the probe would have seen it
    with LargestTensor() as probe2:
        torch.softmax(q @ k.transpose(-1, -2), -1) @ v
    assert probe2.largest == z * h * n * n


def test_dropout_is_deterministic_per_seed_and_matches_the_dense_mask():
    q, k, v = (torch.randn(2, 2, 33, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    spec = Spec(scale=0.3, dropout_p=0.25)
    seed = torch.tensor(1234)
    a, _ = call(q, k, v, None, None, spec, seed)
    b, _ = call(q, k, v, None, None, spec, seed)
    c, _ = call(q, k, v, None, None, spec, torch.tensor(99))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    want = dense(q, k, v, None, None, spec, seed=1234)
    torch.testing.assert_close(a, want, atol=1e-12, rtol=1e-12)
    go = torch.randn_like(a)
    for x, y in zip(torch.autograd.grad(a, (q, k, v), go), torch.autograd.grad(want, (q, k, v), go)):
        torch.testing.assert_close(x, y, atol=1e-12, rtol=1e-12)


def test_dropout_keep_rate():
    zh = torch.arange(8).view(8, 1, 1)
    keep = rng.keep_mask(rng.row_hash(7, zh, torch.arange(256).view(1, 256, 1)), torch.arange(256), 0.3)
    assert abs(keep.float().mean().item() - 0.7) < 0.005
    # neighbouring elements are not correlated (a broken hash gives stripes)
    assert abs((keep[:, :, 1:] & keep[:, :, :-1]).float().mean().item() - 0.49) < 0.01


def test_gradcheck_with_bias_mask_softcap():
    q, k, v = (torch.randn(1, 2, 5, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 1, 5, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(5, 5) > 0.3
    mask[:, 0] = True

    def f(q, k, v, bias):
        return call(q, k, v, bias, mask, Spec(scale=0.7, softcap=3.0, mask_fill=float("-inf")))[0]

    assert torch.autograd.gradcheck(f, (q, k, v, bias))


def test_safe_softmax_fully_masked_rows_get_zero_gradient():
    q, k, v = (torch.randn(1, 1, 6, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.ones(6, 6, dtype=torch.bool)
    mask[2] = False
    out, _ = call(q, k, v, None, mask, Spec(scale=1.0, safe_softmax=True))
    s = (q @ k.transpose(-1, -2)).masked_fill(~mask, float("-inf"))
    want = torch.ops.aten._safe_softmax(s, -1) @ v
    torch.testing.assert_close(out, want)
    go = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(want, (q, k, v), go)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("variant", list(NEAR_ONE_HOT_SPECS))
def test_bf16_grads_near_one_hot_few_keys(variant):
    """Nearly one-hot softmax over 3 keys in bf16: ds = p (dp - delta) cancels, so delta must be exact.

    With FA2's delta = rowsum(dO * O) the rounding of O to bf16 survived the cancellation and dk, dbias came out
    5-10x eager's error (the fuzzer found it); with delta summed from p and dp they are well below eager's.
    """
    spec = Spec(**NEAR_ONE_HOT_SPECS[variant])
    (q, k, v, bias, dout), mask, seed = near_one_hot_bf16_case()

    def grads(fn, dtype):
        leaves = [t.to(dtype).requires_grad_(True) for t in (q, k, v, bias)]
        return torch.autograd.grad(fn(*leaves), leaves, dout.to(dtype))

    truth = grads(lambda *a: dense(*a, mask, spec, seed), torch.float64)
    eager = grads(lambda *a: dense(*a, mask, spec, seed, dtype=torch.bfloat16), torch.bfloat16)
    got = grads(lambda *a: call(*a, mask, spec, seed)[0], torch.bfloat16)
    for name, a, e, t in zip(("dq", "dk", "dv", "dbias"), got, eager, truth):
        assert not t.isnan().any() and not a.isnan().any(), name
        err, base = (a.double() - t).abs().max().item(), (e.double() - t).abs().max().item()
        assert err <= 2 * base + 1e-4, f"{name}: error {err:.3g} vs eager's {base:.3g}"


@pytest.mark.parametrize("case", ["causal_gqa", "bias_zmhd", "mask"])
def test_op_registration_passes_opcheck(case):
    """The op is registered piece by piece (attn_compiler/ops.py: schema, implementation, fake, autograd kernel):
    torch.library.opcheck checks that the pieces agree (the schema, the autograd registration, the fake's metadata
    against the implementation's, AOTAutograd with dynamic shapes), for both ops."""
    import attn_compiler.ops  # noqa: F401
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 5, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(1, 1, 7, 8, generator=g, requires_grad=True) for _ in range(2))
    bias = mask = None
    causal, offset, layout = False, 0, 0
    if case == "causal_gqa":
        causal, offset = True, 2
    elif case == "bias_zmhd":
        bias, layout = torch.randn(1, 2, 5, 7, generator=g, requires_grad=True), 1
    else:
        mask = torch.rand(5, 7, generator=g) > 0.3
    args = (q, k, v, bias, mask, None, 0.3, 0.0, causal, offset, float("-inf"), True, 0.0, False, "reference",
            layout)
    torch.library.opcheck(torch.ops.memattn.attention.default, args)
    out, stats = torch.ops.memattn.attention(*args)
    bw_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), stats,
               None if bias is None else bias.detach(), mask, None, 0.3, 0.0, causal, offset, float("-inf"), True,
               0.0, False, "reference", bias is not None)
    torch.library.opcheck(torch.ops.memattn.attention_backward.default, bw_args)


def test_double_backward_is_a_clear_error():
    """A gradient of the attention gradient is not implemented: asking for one raises, it never returns a
    second derivative that silently misses the attention."""
    import attn_compiler.ops  # noqa: F401
    q, k, v = (torch.randn(1, 1, 4, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out, _ = torch.ops.memattn.attention(q, k, v, None, None, None, 0.5, 0.0, False, 0, float("-inf"), True, 0.0,
                                         False, "reference")
    (gq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gq.sum().backward()


def test_device_calls_skip_the_second_dispatch_and_nothing_else_does(monkeypatch):
    """Below autograd the op calls its implementation directly only when the next dispatch key is the tensors'
    device (ops._below_autograd): a plain call, with or without grad, reaches dispatch.attention; fake tensors and
    make_fx tracing (real or symbolic) must reach the fake instead, never the implementation."""
    import attn_compiler.ops as ops
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    calls = []
    real = ops.dispatch.attention
    monkeypatch.setattr(ops.dispatch, "attention", lambda *a: calls.append(1) or real(*a))

    def f(q, k, v):
        return torch.ops.memattn.attention(q, k, v, None, None, None, 0.5, 0.0, True, 0, float("-inf"), True, 0.0,
                                           False, "reference")[0]
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    f(q, k, v)
    f(q.requires_grad_(), k, v).sum().backward()
    assert len(calls) == 2 and q.grad is not None
    calls.clear()
    mode = FakeTensorMode()
    fakes = [mode.from_tensor(t.detach()) for t in (q, k, v)]
    with mode:
        out = f(*fakes)
    assert out.shape == (1, 2, 5, 8) and calls == []
    for tracing_mode in ("real", "symbolic"):   # real tracing runs the op (and so the implementation) once
        gm = make_fx(f, tracing_mode=tracing_mode)(q.detach(), k, v)
        ours = [n.target for n in gm.graph.nodes if n.op == "call_function" and "memattn" in str(n.target)]
        assert ours == [torch.ops.memattn.attention.default], gm.graph
        others = [n.target for n in gm.graph.nodes if n.op == "call_function" and n.target not in ours]
        assert all(t is operator.getitem for t in others), gm.graph   # the op and its outputs, nothing inside it
    assert len(calls) == 1, calls


def test_op_arguments_by_name():
    """Graph passes build and read memattn.attention calls by argument name (ops.attention_args / node_args); the
    names are the schema's, defaults are filled in, and a wrong or missing name is an error, not a shifted call."""
    from attn_compiler import ops
    assert ops.ARGS[:6] == ("q", "k", "v", "bias", "mask", "seed") and ops.ARGS[-1] == "out_layout"
    named = dict(q="q", k="k", v="v", bias=None, mask=None, seed=None, scale=0.5, softcap=0.0, causal=True,
                 causal_offset=2, mask_fill=-1.0, mask_keep=True, dropout_p=0.0, safe_softmax=False, kernel="auto")
    args = ops.attention_args(**named)
    assert len(args) == len(ops.ARGS) - 1 and args[ops.ARGS.index("causal_offset")] == 2   # out_layout left out
    graph = torch.fx.Graph()
    node = graph.call_function(torch.ops.memattn.attention.default, args)
    assert ops.node_args(node) == {**named, "out_layout": 0}
    assert ops.replace_args(node, out_layout=1)[-1] == 1 and ops.replace_args(node, scale=2.0)[6] == 2.0
    with pytest.raises(TypeError, match="no argument"):
        ops.attention_args(**named, causal_ofset=1)
    with pytest.raises(TypeError, match="'kernel' is required"):
        ops.attention_args(**{k: v for k, v in named.items() if k != "kernel"})
