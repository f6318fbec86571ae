"""Every pattern family, compiled with memattn, against eager and the fp64 truth (forward and backward), with exact
site counts, in fp32 and bf16, static and dynamic shapes, at lengths that do and do not divide the tile."""
import math

import pytest
import torch
import torch.nn.functional as F

from attn_compiler import patterns
from helpers import check_against_eager

plain, scaled, masked, softcap, causal, dropout, gqa = (patterns.family(name) for name in (
    "plain", "scaled", "masked", "softcap", "causal", "dropout", "gqa"))   # the family-specific tests below

DTYPES = [torch.float32, torch.bfloat16]
# (sequence length, head dim) pairs: 1 (a single query), 17 and 127 (cross the 16-wide reference tiles unevenly),
# head dims including non-powers of two.
SIZES = [(1, 16), (17, 40), (33, 80), (127, 64)]


def qkv(s, d, b=2, h=4, hkv=None, sk=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    hkv = hkv or h
    sk = sk or s
    return (torch.randn(b, h, s, d, generator=g), torch.randn(b, hkv, sk, d, generator=g),
            torch.randn(b, hkv, sk, d, generator=g))


def _ids(fns):
    return list(fns)


SPELLINGS = patterns.spellings()


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family,name,fn,example_args", SPELLINGS, ids=[f"{f}.{n}" for f, n, _, _ in SPELLINGS])
def test_every_spelling_of_every_family(family, name, fn, example_args, dtype, dynamic):
    """Every spelling the registry lists (patterns.FAMILIES), with its family's example arguments: one site,
    rewritten, matching eager and the fp64 truth forward and backward, and saying what its family says it must
    (the family's check_site). A new family is covered here by being listed."""
    q, k, v = qkv(33, 40)
    args = example_args(name, q, k, v)
    report = check_against_eager(fn, list(args), dtype, dynamic=dynamic)
    site = report.sites[0]
    assert site.status == "rewritten"
    check = getattr(patterns.family(family), "check_site", None)
    if check is not None:
        check(name, site, *args[:3])


def test_the_registry_has_one_owner_per_op():
    """Each aten op the walk folds belongs to one family (the registry refuses a second claim), and every family
    that rewrites sites has spellings (the fused-call family reports sites and rewrites none)."""
    owners = {}
    for fam in patterns.FAMILIES:
        for op in getattr(fam, "SCORE_HANDLERS", {}):
            assert op not in owners, (op, owners.get(op), fam.__name__)
            owners[op] = fam.__name__
    assert set(owners) == set(patterns.SCORE_HANDLERS)
    rewriting = {patterns.name(f) for f in patterns.FAMILIES if not hasattr(f, "FUSED_SITES")}
    assert rewriting == {f for f, _, _, _ in SPELLINGS}   # every family that rewrites has spellings to test
    with pytest.raises(ValueError, match="no pattern family 'nope'"):
        patterns.family("nope")


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"s{s[0]}d{s[1]}")
@pytest.mark.parametrize("name", list(plain.SPELLINGS) + list(scaled.SPELLINGS) + list(softcap.SPELLINGS))
def test_plain_scaled_softcap(name, size, dtype, dynamic):
    fn = {**plain.SPELLINGS, **scaled.SPELLINGS, **softcap.SPELLINGS}[name]
    if name == "einsum" and size[0] == 1:
        # einsum contracts a single key with mul + sum, not a matmul: there is no PV matmul to rewrite
        report = check_against_eager(fn, qkv(*size), dtype, dynamic=dynamic, rewritten=0, left=1)
        assert "before the PV matmul" in report.sites[0].reason
        return
    report = check_against_eager(fn, qkv(*size), dtype, dynamic=dynamic)
    site = report.sites[0]
    # the kernel from the query length: <= 16 rows a decode step; a dynamic length (Dynamo keeps 1 static) either
    kind = "decode" if size[0] <= 16 else ("prefill/decode" if dynamic else "prefill")
    assert site.status == "rewritten" and site.kernel == kind
    if name in scaled.SPELLINGS:
        assert "scaled" in site.pattern
        assert site.flags["scale"] == pytest.approx(1 / math.sqrt(size[1]), rel=1e-6)
    if name in softcap.SPELLINGS:
        assert site.flags["softcap"] == softcap.CAP


def _mask_inputs(kind, s, sk, b=2, h=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(7)
    shapes = {"full": (b, h, s, sk), "batch_keys": (b, 1, 1, sk), "rows_keys": (s, sk), "heads": (1, h, s, sk)}
    shape = shapes[kind]
    keep = torch.rand(shape, generator=g) > 0.3
    keep[..., 0] = True  # keep every row alive; fully masked rows are tested on their own
    return keep


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ["full", "batch_keys", "rows_keys", "heads"])
@pytest.mark.parametrize("name", list(masked.SPELLINGS))
def test_masked(name, shape, dtype, dynamic):
    s, sk, d = 17, 23, 40
    q, k, v = qkv(s, d, sk=sk)
    keep = _mask_inputs(shape, s, sk)
    if name.startswith("additive"):
        extra = torch.where(keep, 0.0, -1e4) + torch.randn(keep.shape) * 0.5
    else:
        extra = keep
    fn = masked.SPELLINGS[name]
    report = check_against_eager(lambda q, k, v, m: fn(q, k, v, m), [q, k, v, extra], dtype, dynamic=dynamic)
    flags = report.sites[0].flags
    assert flags["bias"] + flags["bool_masks"] == 1 and not flags["causal"]


@pytest.mark.parametrize("fill", [float("-inf"), "min"])
def test_fully_masked_rows_match_eager(fill):
    """Rows with every key masked: NaN with a -inf fill (as eager gives), uniform attention with finfo.min."""
    q, k, v = qkv(17, 16)
    keep = _mask_inputs("full", 17, 17)
    keep[:, :, 5] = False
    value = float("-inf") if fill != "min" else torch.finfo(torch.float32).min

    def fn(q, k, v, keep):
        return torch.softmax((q @ k.transpose(-2, -1)).masked_fill(~keep, value), -1) @ v

    report = check_against_eager(fn, [q, k, v, keep], torch.float32, grad=(fill == "min"))
    assert report.sites[0].status == "rewritten"
    out = torch.compile(fn, backend="memattn")(q, k, v, keep)
    if fill == "min":
        assert torch.allclose(out[:, :, 5], v.mean(-2), atol=1e-5)
    else:
        assert out[:, :, 5].isnan().all() and not out[:, :, 4].isnan().any()


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(causal.SPELLINGS))
def test_causal_in_graph(name, dtype, dynamic):
    report = check_against_eager(causal.SPELLINGS[name], qkv(33, 16), dtype, dynamic=dynamic)
    site = report.sites[0]
    assert site.flags["causal"] and site.flags["bias"] == 0 and site.flags["bool_masks"] == 0, site.flags


def test_causal_fill_read_from_a_buffer_is_data():
    """The same where(allowed, 0, finfo.min) mask as the tensor_literal_fill spelling, but its 'allowed' value read
    from a module buffer: the buffer may change between calls, so the mask is not proven causal and is passed to
    the kernel as a tensor. (A tensor literal created by the traced code is part of the program and may be.)"""
    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("allowed_value", torch.tensor(0.0))

        def forward(self, q, k, v):
            s = q.shape[-2]
            allowed = torch.arange(s)[None, :] <= torch.arange(s)[:, None]
            bias = torch.where(allowed, self.allowed_value, torch.finfo(torch.float32).min)
            return torch.softmax(q @ k.transpose(-2, -1) + bias, -1) @ v

    mod = Attn()
    report = check_against_eager(mod, qkv(17, 16), torch.float32, grad=False)
    flags = report.sites[0].flags
    assert not flags["causal"] and flags["bias"] == 1, flags
    mod.allowed_value.fill_(-5.0)  # the data changed: the compiled model follows it
    q, k, v = qkv(17, 16)
    torch.testing.assert_close(torch.compile(mod, backend="memattn")(q, k, v), mod(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sq,sk", [(5, 37), (1, 40), (17, 17)])
def test_causal_cross_lengths_bottom_right(sq, sk):
    """q shorter than k (a prefill chunk after a cache): eager's arange mask aligns the diagonal bottom-right."""
    report = check_against_eager(causal.arange_compare, qkv(sq, 16, sk=sk), torch.float32)
    assert report.sites[0].flags["causal"]


def test_causal_longer_queries_with_finite_fill_keeps_the_mask():
    """With q longer than k some rows see no key; a finite fill then gives uniform rows in eager, so the mask
    must stay a tensor (skipping tiles would be wrong) and the site is still rewritten."""
    def fn(q, k, v):
        sq, sk = q.shape[-2], k.shape[-2]
        allowed = torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + (sk - sq)
        s = (q @ k.transpose(-2, -1)).masked_fill(~allowed, torch.finfo(q.dtype).min)
        return torch.softmax(s, -1) @ v

    report = check_against_eager(fn, qkv(20, 16, sk=12), torch.float32)
    flags = report.sites[0].flags
    assert not flags["causal"] and flags["bool_masks"] == 1 and "whole rows" in flags["note"]


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hkv", [1, 2, 4], ids=lambda r: f"hkv{r}")
@pytest.mark.parametrize("name", list(gqa.SPELLINGS))
def test_gqa(name, hkv, dtype, dynamic):
    report = check_against_eager(gqa.SPELLINGS[name], qkv(17, 32, h=4, hkv=hkv), dtype, dynamic=dynamic)
    site = report.sites[0]
    assert ("gqa" in site.pattern) == (hkv != 4)
    assert site.flags["gqa"] == {1: "MQA", 2: "GQA", 4: 1}[hkv]


def test_dropout_eval_is_plain():
    report = check_against_eager(lambda q, k, v: dropout.train_dropout(q, k, v, 0.3, training=False),
                                 qkv(17, 16), torch.float32)
    assert report.sites[0].flags["dropout_p"] == 0.0


def test_cross_attention_lengths():
    report = check_against_eager(scaled.div_scores, qkv(9, 24, sk=31), torch.float32, dynamic=True)
    assert report.sites[0].status == "rewritten"


def test_layouts_bshd_and_3d():
    """Inputs in [B, S, H, D] from a projection, and the (B*H, S, D) bmm layout."""
    b, s, h, d = 2, 19, 3, 8
    x = torch.randn(b, s, h * d)
    w = torch.randn(3, h * d, h * d) * 0.2

    def fn(x, w):
        q, k, v = (torch.matmul(x, w[i]).view(b, s, h, d).transpose(1, 2) for i in range(3))
        att = torch.softmax(torch.einsum("bhqd,bhkd->bhqk", q, k) * d ** -0.5, dim=-1)
        y = torch.einsum("bhqk,bhkd->bhqd", att, v)
        return y.transpose(1, 2).reshape(b, s, h * d)

    check_against_eager(fn, [x, w], torch.float32)
    check_against_eager(plain.bmm_3d, qkv(19, 8, h=3), torch.float32, dynamic=True)


def test_baddbmm_bias():
    """Bloom-style baddbmm(alibi, q, k^T, beta, alpha)."""
    b, h, s, d = 2, 4, 17, 16
    q, k, v = (t.reshape(b * h, s, d) for t in qkv(s, d))
    alibi = torch.randn(b * h, 1, s)

    def fn(q, k, v, alibi):
        scores = torch.baddbmm(alibi, q, k.transpose(1, 2), beta=1.0, alpha=d ** -0.5)
        return torch.bmm(F.softmax(scores, dim=-1), v)

    report = check_against_eager(fn, [q, k, v, alibi], torch.float32)
    assert report.sites[0].flags["bias"] == 1


def test_fused_sdpa_calls_are_reported_sites():
    """F.scaled_dot_product_attention lowers to a fused ATen kernel: a site in the report, left as it is (the
    output is eager's to the bit), with what the call was given and why it was not rewritten."""
    import attn_compiler
    q, k, v = qkv(33, 16)
    keep = _mask_inputs("batch_keys", 33, 33)

    def masked_call(q, k, v, keep):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)

    def causal_call(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)

    def gqa_call(q, k, v):
        return F.scaled_dot_product_attention(q, k[:, :2], v[:, :2], enable_gqa=True)

    for fn, args, want in ((masked_call, (q, k, v, keep), dict(bool_masks=1, causal=False)),
                           (causal_call, (q, k, v), dict(causal=True, scale=0.3, bool_masks=0, bias=0)),
                           (gqa_call, (q, k, v), dict(causal=False))):
        torch._dynamo.reset()
        out = torch.compile(fn, backend="memattn")(*args)
        assert torch.equal(out, fn(*args))
        (site,) = attn_compiler.last_report().sites
        assert site.status == "left" and site.pattern == "sdpa", site
        assert "fused SDPA call" in site.reason and "left as it is" in site.reason
        assert {key: site.flags[key] for key in want} == want, site.flags
        if fn is masked_call:
            assert "attn_mask [2, 1, 1, 33]" in site.reason, site.reason
        else:
            assert "no n x n tensor" in site.reason, site.reason
