"""Triton prefill kernels (codegen/triton_prefill.py) against the fp64 blockwise reference.

Budget: for every output the kernel's error against the truth (codegen.reference on fp64 inputs) must be at most K
times the error of the same attention written in eager torch in the same dtype (plus a tiny floor for the fp32
cases where both errors are at rounding level). Tiny shapes and 16 x 16 tiles so every case crosses block edges.

Where the kernels run: on a CUDA machine, compiled, in this process. Without CUDA they run under TRITON_INTERPRET=1,
which must be set before triton is first imported in a process (``tl.zeros`` and the rest of triton's standard
library are ``triton.jit`` functions, interpreted or not from that moment on). Setting it here at import time would
be too late when another test module imported triton first, and would leak into the other modules (a dispatch test
expecting kernel="triton" on the CPU to fall back would start interpreting). So on a CPU-only machine without the
variable, every test here is skipped in-process and ``test_interpreted_in_subprocess`` runs this file again in a
child pytest with TRITON_INTERPRET=1 (nothing leaks; the child's summary is printed when it fails). Running
``TRITON_INTERPRET=1 pytest tests/test_triton_prefill.py`` directly does the same work in one process.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from attn_compiler.codegen import reference  # noqa: E402
from attn_compiler.codegen.reference import Spec  # noqa: E402
from helpers import (BUDGET, NEAR_ONE_HOT_SPECS, eager, keep_full, mismatch, near_one_hot_bf16_case,  # noqa: E402
                     rel_err)

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


IN_PROCESS = CUDA or os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(autouse=True)
def _where_to_run(request):
    if not IN_PROCESS and not request.node.name.startswith("test_interpreted_in_subprocess"):
        pytest.skip("no CUDA: runs under TRITON_INTERPRET=1 in test_interpreted_in_subprocess")


@pytest.mark.parametrize("tma", [False, True], ids=["pointer_loads", "tma"])
def test_interpreted_in_subprocess(tma):
    """The whole file under the interpreter; then the flag grid and head dims again with the forward kernels'
    K/V tiles read through TMA descriptors (MEMATTN_TMA=1; on a GPU that path is the default from Hopper on)."""
    if IN_PROCESS:
        pytest.skip("kernels run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1", MEMATTN_TMA="1" if tma else "0")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    if tma:
        cmd += ["-k", "flag_grid or head_dims or tma"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"interpreted run failed:\n{res.stdout[-6000:]}\n{res.stderr[-2000:]}"
    assert " passed" in res.stdout and " failed" not in res.stdout, res.stdout[-2000:]


@pytest.fixture(scope="module")
def tp():
    from attn_compiler.codegen import triton_prefill
    return triton_prefill


def _tiles(tp, bm=16, bn=16):
    # 16 x 16 tiles: tiny shapes still cross block edges; on the GPU also keeps the compile count down
    from attn_compiler.codegen import autotune
    return autotune.force_config(bm, bn, num_warps=4, num_stages=2)


# ------------------------------------------------------------------------------------------------- eager + truth


def make(dtype, z=1, h=2, hkv=None, m=17, n=17, d=32, dv=None, strided=False, gen=None):
    hkv = hkv or h
    dv = dv or d
    g = gen or torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device=DEV, dtype=dtype)
    if strided:  # q as [Z, M, H, D] transposed, k every other key, v cut from a wider head dim
        q = r(z, m, h, d).transpose(1, 2)
        k = r(z, hkv, 2 * n, d)[:, :, ::2]
        v = r(z, n, hkv, dv + 8)[..., :dv].transpose(1, 2)
    else:
        q, k, v = r(z, h, m, d), r(z, hkv, n, d), r(z, hkv, n, dv)
    return q, k, v


def check(tp, q, k, v, bias, mask, spec: Spec, seed=None, bias_grad=False, backward=True, eager_truth_bwd=False,
          strided_dout=False):
    """Forward (and backward) of the kernel vs fp64 truth, within the budget set by eager in the same dtype."""
    dtype = q.dtype
    kf, kb, floor = BUDGET[dtype]
    seed = torch.tensor(1234 if seed is None else seed, dtype=torch.int64)
    ok, why = tp.supports(q, k, v, bias, mask, seed, spec)
    assert ok, why
    out, lse = tp.forward(q, k, v, bias, mask, seed, spec)  # lse: the stats [2, Z, H, M] (row max, log row sum)
    assert out.shape == (*q.shape[:3], v.shape[3]) and out.dtype == v.dtype
    assert lse.shape == (2, *q.shape[:3]) and lse.dtype == torch.float32

    d64 = [t.double() if t is not None else None for t in (q, k, v)]
    b64 = bias.double() if bias is not None else None
    # explicit 128-tiles: tests/conftest.py shrinks the reference's default tiles to 16, which is fine for tiny
    # shapes but makes the GPU tests' 4k x 4k truth take minutes of Python loop
    t_out, t_lse = reference.attention_forward(*d64, b64, mask, seed, spec, block_m=128, block_n=128)
    e_out = eager(q, k, v, bias, mask, seed, spec)
    e_err = rel_err(e_out, t_out)
    k_err = rel_err(out, t_out)
    assert k_err <= kf * e_err + floor, (f"out: kernel {k_err:.3g} vs eager {e_err:.3g}\n"
                                         + mismatch("out", out.double(), t_out))
    assert rel_err(lse.sum(0), t_lse.sum(0)) <= 1e-5, mismatch("logsumexp", lse.sum(0).double(), t_lse.sum(0))
    if not backward:
        return
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(out.shape, generator=g).to(device=DEV, dtype=dtype)
    if strided_dout:
        dout = torch.randn(out.shape[0], out.shape[2], out.shape[1], out.shape[3] + 3,
                           generator=g).to(device=DEV, dtype=dtype)[..., :out.shape[3]].transpose(1, 2)
    ok, why = tp.supports(dout, q, k, v, out, lse, bias, mask, seed, spec, bias_grad)
    assert ok, why
    grads = tp.backward(dout, q, k, v, out, lse, bias, mask, seed, spec, bias_grad)
    # truth: the fp64 reference's backward (or fp64 eager autograd where the reference has no defined answer)
    if eager_truth_bwd:
        truth = _eager_grads(*d64, b64, mask, seed, spec, dout.double(), bias_grad)
    else:
        truth = reference.attention_backward(dout.double(), *d64, t_out, t_lse, b64, mask, seed, spec, bias_grad,
                                             block_m=128, block_n=128)
    e_grads = _eager_grads(q, k, v, bias, mask, seed, spec, dout, bias_grad)
    for name, got, want, eg in zip(("dq", "dk", "dv", "dbias"), grads, truth, e_grads):
        if name == "dbias" and not bias_grad:
            assert got is None
            continue
        assert got.shape == want.shape and got.dtype == (bias.dtype if name == "dbias" else q.dtype), name
        e_err = rel_err(eg, want)
        k_err = rel_err(got, want)
        assert k_err <= kb * e_err + floor, (f"{name}: kernel {k_err:.3g} vs eager {e_err:.3g}\n"
                                             + mismatch(name, got.double(), want))


def _eager_grads(q, k, v, bias, mask, seed, spec, dout, bias_grad):
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    b = bias.detach().requires_grad_(bias_grad) if bias is not None else None
    out = eager(*leaves, b, mask, seed, spec)
    wrt = leaves + ([b] if bias_grad else [])
    grads = torch.autograd.grad(out, wrt, dout)
    return (*grads[:3], grads[3] if bias_grad else None)


# ---------------------------------------------------------------------------------------------------- flag grid
# Each kernel flag on at least once, mixed with GQA ratios, odd lengths, odd head dims, all three dtypes.

CASES = {
    # name: (dtype, shape kwargs, spec kwargs, extras)
    "plain_even": (F16, dict(m=32, n=32, d=32), {}, {}),
    "plain_odd_fp32": (F32, dict(m=19, n=23, d=24), {}, {}),
    "gqa2_causal_bf16": (BF16, dict(h=4, hkv=2, m=19, n=23, d=40), dict(causal=True), {}),
    "gqa4_causal_offset": (F32, dict(h=4, hkv=1, m=17, n=29, d=24), dict(causal=True, causal_offset=7), {}),
    "causal_square_even": (F16, dict(m=48, n=48, d=16), dict(causal=True), {}),
    "cross_m_gt_n": (F16, dict(m=33, n=9, d=32, dv=16), {}, {}),
    "softcap": (F32, dict(m=17, n=20, d=32), dict(softcap=2.0), {}),
    "softcap_negative": (F16, dict(m=17, n=17, d=32), dict(softcap=-3.0, causal=True), {}),
    "bias_full_grad": (F32, dict(z=2, m=17, n=19, d=40), {}, dict(bias=(2, 2, 17, 19), bias_grad=True)),
    "bias_bcast_heads_grad_gqa": (BF16, dict(z=2, h=4, hkv=1, m=18, n=21, d=32), {},
                                  dict(bias=(1, 4, 1, 21), bias_grad=True)),
    "bias_rows_grad": (F16, dict(h=2, m=21, n=17, d=32), dict(causal=True),
                       dict(bias=(2, 21, 1), bias_grad=True)),
    "bias_scalar_grad": (F32, dict(m=9, n=11, d=16), {}, dict(bias=(1, 1), bias_grad=True)),
    "bias_2d_nograd": (F16, dict(m=17, n=17, d=32), {}, dict(bias=(17, 17))),
    "bias_mask_even": (F16, dict(m=32, n=48, d=32), {}, dict(bias=(1, 2, 32, 48), bias_grad=True, mask=(32, 48))),
    "mask_keep": (F16, dict(z=2, m=17, n=23, d=32), {}, dict(mask=(2, 1, 17, 23))),
    "mask_drop_fill": (BF16, dict(m=20, n=20, d=32), dict(mask_keep=False, mask_fill=-1e4), dict(mask=(20, 20))),
    "mask_finfo_min_empty_rows": (F32, dict(m=20, n=21, d=16), dict(mask_fill=torch.finfo(torch.float32).min),
                                  dict(mask=(1, 2, 20, 21), empty_rows=3)),
    "bias_finfo_min": (F16, dict(m=17, n=18, d=16), dict(causal=True), dict(bias=(1, 1, 17, 18), min_cols=5)),
    "mask_causal_gqa": (F32, dict(h=4, hkv=2, m=17, n=17, d=32), dict(causal=True),
                        dict(mask=(1, 4, 17, 17), keep_diag=True)),
    "dropout": (F32, dict(m=19, n=23, d=32), dict(dropout_p=0.25), {}),
    "dropout_causal_gqa_fp16": (F16, dict(z=2, h=4, hkv=2, m=17, n=17, d=32), dict(causal=True, dropout_p=0.1), {}),
    "everything": (BF16, dict(z=2, h=4, hkv=2, m=19, n=21, d=48), dict(causal=True, causal_offset=2, softcap=5.0,
                                                                    dropout_p=0.2),
                   dict(bias=(2, 1, 19, 21), bias_grad=True, mask=(19, 21), keep_diag=True)),
    "strided": (F16, dict(z=2, h=4, hkv=2, m=17, n=19, d=32, strided=True), dict(causal=True),
                dict(strided_dout=True)),
    "strided_fp32_bias": (F32, dict(z=1, h=2, m=18, n=18, d=24, dv=40, strided=True), {},
                          dict(bias=(1, 2, 18, 18), bias_grad=True)),
    "negative_scale_causal": (BF16, dict(h=4, hkv=2, m=19, n=23, d=32), dict(causal=True, scale=-0.4), {}),
    "m1": (F16, dict(m=1, n=17, d=32), {}, {}),
    "n1": (F32, dict(m=17, n=1, d=32), dict(causal=True, causal_offset=40), {}),
}


def test_fused_scale_only_for_plain_scores_and_a_positive_scale(tp):
    """FUSE_SCALE (the row max taken on qk, one FMA per score) holds only where the scores are qk * qk_scale with
    qk_scale > 0; a bias, a mask, a softcap or a scale <= 0 take the general path (the flag grid runs both)."""
    q, k, v = make(F32)
    plain = Spec(scale=0.125)
    assert tp.fuse_scale(tp.kernel_args(q, k, v, None, None, None, plain))
    assert tp.fuse_scale(tp.kernel_args(q, k, v, None, None, None, Spec(scale=0.125, causal=True)))
    bias, mask = torch.zeros(17, 17, device=DEV), torch.ones(17, 17, dtype=torch.bool, device=DEV)
    assert not tp.fuse_scale(tp.kernel_args(q, k, v, bias, None, None, plain))
    assert not tp.fuse_scale(tp.kernel_args(q, k, v, None, mask, None, plain))
    assert not tp.fuse_scale(tp.kernel_args(q, k, v, None, None, None, Spec(scale=0.125, softcap=5.0)))
    assert not tp.fuse_scale(tp.kernel_args(q, k, v, None, None, None, Spec(scale=-0.4)))
    assert not tp.fuse_scale(tp.kernel_args(q, k, v, None, None, None, Spec(scale=0.0)))


@pytest.mark.parametrize("name", list(CASES))
def test_flag_grid(tp, name):
    dtype, shape, sk, ex = CASES[name]
    g = torch.Generator().manual_seed(hash(name) % 2 ** 31)
    q, k, v = make(dtype, gen=g, **shape)
    spec = Spec(**{"scale": 1.0 / math.sqrt(q.shape[-1]), **sk})
    bias = mask = None
    if "bias" in ex:
        bias = torch.randn(*ex["bias"], generator=g).to(device=DEV, dtype=dtype)
        if ex.get("min_cols"):  # an additive mask spelled as a bias of finfo.min (HF style)
            bias[..., ex["min_cols"]:ex["min_cols"] + 4] = torch.finfo(dtype).min
    if "mask" in ex:
        mask = (torch.rand(*ex["mask"], generator=g) > 0.3).to(DEV)
        if ex.get("empty_rows"):  # rows masked everywhere with a finite fill: eager gives a uniform row
            mask[..., :ex["empty_rows"], :] = False
        if ex.get("keep_diag"):  # causal + mask: no row loses every key (that backward is NaN, pattern undefined)
            mask = mask | torch.eye(mask.shape[-2], mask.shape[-1], dtype=torch.bool, device=DEV)
    with _tiles(tp):
        check(tp, q, k, v, bias, mask, spec, bias_grad=ex.get("bias_grad", False),
              strided_dout=ex.get("strided_dout", False))


# name: (dtype, shape kwargs, spec kwargs, bias shape or None): causal blocks with every relation of a block to the
# diagonal (offsets shift it right, or left so some rows see no key), a ragged last key tile, and the bias path
CAUSAL_LOOP_CASES = {
    "square": (F32, dict(h=2, m=40, n=40, d=32), dict(causal=True), None),
    "offset_ragged": (F16, dict(h=2, hkv=1, m=23, n=61, d=32), dict(causal=True, causal_offset=38), None),
    "empty_rows_bf16": (BF16, dict(h=2, m=30, n=48, d=16), dict(causal=True, causal_offset=-5), None),
    "bias": (F32, dict(h=2, m=33, n=47, d=16), dict(causal=True, causal_offset=14), (1, 1, 33, 47)),
}


@pytest.mark.parametrize("loop", ["split", "one"])
@pytest.mark.parametrize("name", list(CAUSAL_LOOP_CASES))
def test_causal_loops(tp, monkeypatch, loop, name):
    """Both CAUSAL_LOOPs (MEMATTN_CAUSAL_LOOP: the causal forward's two K/V loops, or one loop masking from
    lo_mask on) against fp64; rows that see no key give NaN forward as eager does."""
    monkeypatch.setenv("MEMATTN_CAUSAL_LOOP", loop)
    assert tp.causal_loop(32) == tp.CAUSAL_LOOPS[loop]
    dtype, shape, sk, bias_shape = CAUSAL_LOOP_CASES[name]
    g = torch.Generator().manual_seed(7)
    q, k, v = make(dtype, gen=g, **shape)
    bias = None if bias_shape is None else torch.randn(*bias_shape, generator=g).to(device=DEV, dtype=dtype)
    with _tiles(tp):
        check(tp, q, k, v, bias, None, Spec(scale=q.shape[-1] ** -0.5, **sk), backward=name != "empty_rows_bf16")


def test_causal_loop_choice(tp, monkeypatch):
    """Unset: one loop for padded head dims of 128 (where it was timed faster), two elsewhere; a bad name is a
    ValueError that lists the names."""
    monkeypatch.delenv("MEMATTN_CAUSAL_LOOP", raising=False)
    assert [tp.causal_loop(d) for d in (16, 64, 128, 256)] == [0, 0, 1, 0]
    monkeypatch.setenv("MEMATTN_CAUSAL_LOOP", "diagonal")
    with pytest.raises(ValueError, match="'one', 'split'"):
        tp.causal_loop(128)


@pytest.mark.parametrize("d", [16, 40, 80, 96, 112, 160, 256])
def test_head_dims(tp, d):
    q, k, v = make(F16, h=2, hkv=1, m=17, n=18, d=d)
    with _tiles(tp):
        check(tp, q, k, v, None, None, Spec(scale=d ** -0.5, causal=d % 32 == 0))


def test_out_layout_zmhd(tp):
    """out_layout=OUT_ZMHD: out written as a [Z, M, H, Dv] buffer, equal to the contiguous write; the backward
    reads it through its strides."""
    from attn_compiler.codegen.reference import OUT_ZMHD
    q, k, v = make(F16, h=4, hkv=2, m=19, n=21, d=32)
    with _tiles(tp):
        sp = Spec(scale=32 ** -0.5, causal=True, out_layout=OUT_ZMHD)
        check(tp, q, k, v, None, None, sp)
        out1, st1 = tp.forward(q, k, v, None, None, None, sp)
        out0, st0 = tp.forward(q, k, v, None, None, None, Spec(scale=32 ** -0.5, causal=True))
    assert out1.transpose(1, 2).is_contiguous() and out0.is_contiguous()
    assert torch.equal(out1, out0) and torch.equal(st1, st0)


def test_fully_masked_rows(tp):
    """causal_offset < 0 leaves the first rows with no key: NaN as eager gives, or 0 with safe_softmax."""
    q, k, v = make(F32, h=2, m=20, n=20, d=16)
    with _tiles(tp):
        check(tp, q, k, v, None, None, Spec(scale=0.25, causal=True, causal_offset=-3), backward=False)
        out, _ = tp.forward(q, k, v, None, None, None, Spec(scale=0.25, causal=True, causal_offset=-3))
        assert torch.isnan(out[:, :, :3]).all() and not torch.isnan(out[:, :, 3:]).any()
        # safe softmax: the reference's backward gives NaN on such rows; the truth is fp64 eager autograd (zeros)
        check(tp, q, k, v, None, None, Spec(scale=0.25, causal=True, causal_offset=-3, safe_softmax=True),
              eager_truth_bwd=True)


@pytest.mark.parametrize("variant", list(NEAR_ONE_HOT_SPECS))
def test_bf16_grads_near_one_hot_few_keys(tp, variant):
    """Nearly one-hot softmax over 3 keys in bf16: ds = p (dp - delta) cancels, so delta must be exact.

    FA2's delta = rowsum(dO * O) carried O's bf16 rounding through the cancellation (dq: 9x eager's error); the
    dq kernel now sums delta from p and dp and the dk/dv kernel reads it. Same case as tests/test_reference.py's
    test of that name, with a stricter budget than the flag grid's: 2x eager. The safe-softmax variant also
    caught NaN gradients on rows with no key when a bias or mask is present (NATURAL: exp2(-inf + inf)).
    """
    spec = Spec(**NEAR_ONE_HOT_SPECS[variant])
    (q, k, v, bias, dout), mask, seed = near_one_hot_bf16_case(DEV)
    with _tiles(tp):
        out, stats = tp.forward(q, k, v, bias, mask, seed, spec)
        grads = tp.backward(dout, q, k, v, out, stats, bias, mask, seed, spec, True)
    # the truth takes the bf16 inputs exactly: the errors measured are the computation's
    truth = _eager_grads(q.double(), k.double(), v.double(), bias.double(), mask, seed, spec, dout.double(), True)
    e_grads = _eager_grads(q, k, v, bias, mask, seed, spec, dout, True)
    for name, got, want, eg in zip(("dq", "dk", "dv", "dbias"), grads, truth, e_grads):
        e_err, k_err = rel_err(eg, want), rel_err(got, want)
        # dv does not read delta: the flag grid's budget. Under TRITON_INTERPRET it needs that slack: the
        # interpreter's fp32 -> bf16 cast truncates (no round to nearest), which biases p ~ 1 in dv's dot by 2**-8
        budget = BUDGET[BF16][1] * e_err + BUDGET[BF16][2] if name == "dv" else 2 * e_err
        assert k_err <= budget, f"{name}: kernel {k_err:.3g} vs eager {e_err:.3g}\n" + mismatch(
            name, got.double(), want)


def test_dropout_drops_the_reference_elements(tp):
    """q = k = 0 makes p uniform and v = I copies p into out: out != 0 exactly where rng.keep_mask keeps."""
    z, h, m, n, p = 2, 3, 20, 24, 0.3
    q = torch.zeros(z, h, m, 16, device=DEV)
    k = torch.zeros(z, h, n, 16, device=DEV)
    v = torch.eye(n, device=DEV).expand(z, h, n, n)
    seed = torch.tensor(987654321987, dtype=torch.int64)
    with _tiles(tp):
        out, _ = tp.forward(q, k, v, None, None, seed, Spec(scale=1.0, dropout_p=p))
    keep = keep_full(z, h, m, n, seed, p, DEV)
    assert torch.equal(out != 0, keep), mismatch("keep", (out != 0).double(), keep.double())
    torch.testing.assert_close(out[keep], torch.full_like(out[keep], 1.0 / (n * (1 - p))))


def test_tma_descriptors_where_the_layout_allows(tp, monkeypatch):
    """With TMA asked for, K/V in a [Z, N, H, D] buffer (permuted, 16-byte aligned strides) are read through
    descriptors, ragged N and a padded head dim included; an unaligned layout falls back to pointer loads. Both
    agree with the fp64 reference."""
    from attn_compiler.codegen import tma
    from attn_compiler.codegen.reference import attention_forward
    if CUDA and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs compute capability >= 9")
    monkeypatch.setenv("MEMATTN_TMA", "1")
    monkeypatch.setattr(tma, "_failed", False)
    used = []
    real = tma.descs
    monkeypatch.setattr(tma, "descs", lambda k, v: (lambda r: used.append(r[2]) or r)(real(k, v)))
    sp = Spec(scale=0.2, softcap=0.0, causal=True, causal_offset=3, mask_fill=float("-inf"), mask_keep=True,
              dropout_p=0.0, safe_softmax=False)
    g = torch.Generator().manual_seed(0)
    for n, d, want_tma in ((29, 40, True), (29, 7, False)):   # d = 7 fp32: 28-byte row strides, not aligned
        q = torch.randn(2, 4, 19, d, generator=g)
        k, v = (torch.randn(2, n, 2, d, generator=g).transpose(1, 2) for _ in range(2))
        truth, _ = attention_forward(q.double(), k.double(), v.double(), None, None, None, sp)
        with _tiles(tp):
            out, _ = tp.forward(*(t.to(DEV) for t in (q, k, v)), None, None, None, sp)
        assert used[-1] is want_tma
        torch.testing.assert_close(out.cpu().double(), truth, atol=1e-5, rtol=1e-4)


def test_warp_spec_is_opt_in_and_keeps_the_result(tp, monkeypatch):
    """MEMATTN_WS=1 asks for the warp-specialised K/V loop (TMA only; off by default). The interpreter ignores the
    specialisation, so here it checks that the flag threads through without changing a result; on a GPU Triton
    3.6 does not compile it for sm_90 (the launch falls back to pointer loads, which would turn TMA off for the
    rest of this process), so it is measured by benchmarks/prefill.py there, not tested."""
    from attn_compiler.codegen import tma
    if CUDA:
        pytest.skip("measured with benchmarks/prefill.py on a GPU (see the docstring)")
    from attn_compiler.codegen.reference import attention_forward
    monkeypatch.delenv("MEMATTN_WS", raising=False)
    assert not tma.warp_spec_wanted()
    monkeypatch.setenv("MEMATTN_WS", "1")
    monkeypatch.setenv("MEMATTN_TMA", "1")
    monkeypatch.setattr(tma, "_failed", False)
    assert tma.warp_spec_wanted()
    sp = Spec(scale=0.3, softcap=0.0, causal=True, causal_offset=0, mask_fill=float("-inf"), mask_keep=True,
              dropout_p=0.0, safe_softmax=False)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 37, 32, generator=g) for _ in range(3))
    truth, _ = attention_forward(q.double(), k.double(), v.double(), None, None, None, sp)
    with _tiles(tp):
        out, _ = tp.forward(q, k, v, None, None, None, sp)
    assert not tma.failed()
    torch.testing.assert_close(out.double(), truth, atol=1e-5, rtol=1e-4)


def test_autotune_timer_waits_for_queued_work_and_times_in_a_graph(tp, monkeypatch):
    """graph_bench, every autotuner's timer: the config is launched first (compiling it, so a config that does
    not fit raises for the autotuner to record), then the device is synchronized before the CUDA-graph timer,
    which runs on a stream of its own, starts; where no graph can be captured, Triton's event timer takes over."""
    import triton.testing

    from attn_compiler.codegen import autotune
    from attn_compiler.codegen import triton_decode  # noqa: F401  (registers the decode autotuner)
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append("sync"))
    graph = [lambda fn, rep, quantiles: calls.append("graph") or [1.0, 0.9, 1.1]]
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", lambda *a, **kw: graph[0](*a, **kw))
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, quantiles: calls.append("events") or [2.0, 1.9, 2.1])
    launch = lambda: calls.append("launch")  # noqa: E731
    assert autotune.graph_bench(launch, quantiles=(0.5, 0.2, 0.8)) == [1.0, 0.9, 1.1]
    assert calls == ["launch", "sync", "graph"]

    def no_capture(fn, rep, quantiles):
        raise RuntimeError("operation not permitted when stream is capturing")
    graph[0], calls[:] = no_capture, []
    assert autotune.graph_bench(launch, quantiles=(0.5, 0.2, 0.8)) == [2.0, 1.9, 2.1]
    assert calls == ["launch", "sync", "events"]

    class DoesNotFit(Exception):
        pass

    def too_big():
        raise DoesNotFit
    with pytest.raises(DoesNotFit):
        autotune.graph_bench(too_big)
    for tuner in [t for t, _, _ in autotune.AUTOTUNED.values()]:
        assert tuner.do_bench is autotune.graph_bench


def test_empty_lengths(tp):
    q, k, v = make(F32, m=5, n=0, d=16)
    out, lse = tp.forward(q, k, v, None, None, None, Spec(scale=0.25))
    assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all() and lse.shape == (2, 1, 2, 5)
    dq, dk, dv, db = tp.backward(torch.ones_like(out), q, k, v, out, lse, None, None, None, Spec(scale=0.25), False)
    assert torch.equal(dq, torch.zeros_like(dq)) and dk.numel() == 0 and db is None
    q, k, v = make(F32, m=0, n=5, d=16)
    out, lse = tp.forward(q, k, v, None, None, None, Spec(scale=0.25))
    assert out.shape == (1, 2, 0, 16) and lse.shape == (2, 1, 2, 0)


def test_supports_says_why(tp):
    q, k, v = make(F32, d=16)
    s = Spec(scale=1.0)
    ok, why = tp.supports(q.double(), k.double(), v.double(), None, None, None, s)
    assert not ok and "dtype" in why
    big = torch.zeros(1, 1, 4, 512, device=DEV)
    ok, why = tp.supports(big, big, big, None, None, None, s)
    assert not ok and "head dim" in why
    ok, why = tp.supports(q, k, v, None, (torch.rand(17, 17) > 0.5).float().to(DEV), None, s)
    assert not ok and "bool" in why
    assert tp.supports(q, k, v, None, None, None, s)[0]


@pytest.mark.parametrize("d", [64, 128, 256])
def test_fp32_dots_get_one_small_tile(tp, d):
    """fp32 takes FMA dots: each kernel's prune keeps one small tile (16-bit inputs keep a real choice, and the
    dtype's precision is part of the autotune key so the two never share a tuned config)."""
    from attn_compiler.codegen import autotune, prefill_bwd, prefill_fwd
    for prune, space in ((prefill_fwd.prune_fwd, prefill_fwd.FWD_CONFIGS),
                         (prefill_bwd.prune_dkdv, prefill_bwd.DKDV_CONFIGS),
                         (prefill_bwd.prune_dq, prefill_bwd.DQ_CONFIGS)):
        args = {"BLOCK_D": d, "BLOCK_DV": d, "BUCKET_M": 2, "IS_CAUSAL": False}
        (only,) = prune(space, {}, **args, DOT_PREC="ieee")
        tile = only.kwargs["BLOCK_M"] * only.kwargs["BLOCK_N"]
        assert tile <= 64 * 32 and only.num_warps == 8 and only.num_stages == 2
        wide = prune(space, {}, **args, DOT_PREC="tf32")
        assert len(wide) > 1 and any(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > tile for c in wide)
    assert "DOT_PREC" in autotune.PREFILL_KEY


def test_through_the_op(tp):
    """torch.ops.memattn.attention(kernel="triton") reaches these kernels (no fallback) and trains."""
    import attn_compiler.ops  # noqa: F401  registers the op
    from attn_compiler.codegen import dispatch

    q, k, v = make(F32, h=4, hkv=2, m=17, n=19, d=32)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    before = dict(dispatch.fallbacks)
    with _tiles(tp):
        out, _ = torch.ops.memattn.attention(*leaves, None, None, None, 0.2, 0.0, True, 0, float("-inf"), True, 0.0,
                                             False, "triton")
        out.sum().backward()
    assert dispatch.fallbacks == before
    d64 = [t.double() for t in (q, k, v)]
    spec = Spec(scale=0.2, causal=True)
    want, lse = reference.attention_forward(*d64, None, None, None, spec)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    grads = reference.attention_backward(torch.ones_like(want), *d64, want, lse, None, None, None, spec)
    for got, w in zip((t.grad for t in leaves), grads):
        torch.testing.assert_close(got.double(), w, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------- GPU-only grid


@gpu
@needs_cuda
@pytest.mark.parametrize("d", [40, 64, 80, 96, 112, 128, 160, 256])
def test_gpu_head_dims_odd_lengths(tp, d):
    from attn_compiler.codegen import autotune
    dtype = BF16 if d in (64, 96, 160, 256) else F16
    q, k, v = make(dtype, z=2, h=4, hkv=2, m=333, n=1000, d=d)
    with autotune.force_config(64, 64, num_warps=8 if d > 64 else 4, num_stages=2):
        check(tp, q, k, v, None, None, Spec(scale=d ** -0.5, causal=d % 2 == 0, causal_offset=667))


@gpu
@needs_cuda
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_autotuned(tp, d, causal):
    """The autotuned configs (the ones the benchmark times) on the benchmark's layout."""
    q, k, v = make(BF16, z=2, h=4, m=1024, n=1024, d=d)
    check(tp, q, k, v, None, None, Spec(scale=d ** -0.5, causal=causal))


@gpu
@needs_cuda
@pytest.mark.parametrize("loop", ["split", "one"])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_causal_loops(tp, monkeypatch, loop, d):
    """Both causal loops (benchmarks/prefill.py times them) autotuned on the benchmark's layout, with a causal
    offset that puts the diagonal inside a tile."""
    monkeypatch.setenv("MEMATTN_CAUSAL_LOOP", loop)
    q, k, v = make(BF16, z=2, h=4, m=1000, n=1090, d=d)
    check(tp, q, k, v, None, None, Spec(scale=d ** -0.5, causal=True, causal_offset=90))


def _candidates(tp, name, d, causal):
    from attn_compiler.codegen import autotune
    tuner, prune, space = autotune.AUTOTUNED[name]
    picked = set()
    for bucket in (1, 2):  # the short and long rows' spaces (bucket 0 is the 64-row subset of bucket 1's)
        picked.update(prune(space, {}, BLOCK_D=d, BLOCK_DV=d, BUCKET_M=bucket, IS_CAUSAL=causal, DOT_PREC="tf32"))
    return tuner, sorted(picked, key=str)


@gpu
@needs_cuda
@pytest.mark.parametrize("name", ["fwd", "dq", "dkdv"])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gpu_every_candidate_tile(tp, monkeypatch, name, d):
    """Every tile an autotuner may pick (not only the one it picked on this card) computes the right answer:
    each candidate of the kernel's pruned spaces, alone in its tuner, on a ragged causal GQA shape and a full one."""
    from attn_compiler.codegen import autotune
    try:
        for causal in (False, True):
            tuner, cands = _candidates(tp, name, d, causal)
            assert cands
            for cfg in cands:
                monkeypatch.setattr(tuner, "configs", [cfg])  # one config: the tuner runs it, no prune, no timing
                tuner.cache.clear()
                q, k, v = make(BF16, z=1, h=4, hkv=2, m=333 if causal else 256, n=777 if causal else 256, d=d)
                check(tp, q, k, v, None, None,
                      Spec(scale=d ** -0.5, causal=causal, causal_offset=444 if causal else 0),
                      backward=name != "fwd")
                assert tuner.best_config is cfg
    finally:  # no forced pick may outlive the test in a tuner's cache
        for t, _, _ in autotune.AUTOTUNED.values():
            t.cache.clear()


@gpu
@needs_cuda
def test_gpu_long_odd_gqa_features(tp):
    q, k, v = make(BF16, z=1, h=8, hkv=2, m=4095, n=4095, d=128)
    g = torch.Generator().manual_seed(3)
    bias = torch.randn(1, 8, 1, 4095, generator=g).to(DEV, BF16)
    check(tp, q, k, v, bias, None, Spec(scale=128 ** -0.5, causal=True, dropout_p=0.1), bias_grad=True)


@gpu
@needs_cuda
def test_gpu_int64_offsets(tp):
    """Z*H*M*D past 2**31 elements: batch/head offsets must be int64."""
    z, h, m, d = 1, 4100, 4096, 128  # 2.15e9 elements of q
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2 ** 30:
        pytest.skip("not enough GPU memory")
    q = torch.randn(z, h, m, d, device=DEV, dtype=F16)
    k = q[:, :, :128]
    v = q[:, :, :128]
    out, _ = tp.forward(q, k, v, None, None, None, Spec(scale=d ** -0.5))
    last = slice(h - 1, h)
    want, _ = reference.attention_forward(q[:, last].float(), k[:, last].float(), v[:, last].float(), None, None,
                                          None, Spec(scale=d ** -0.5), block_m=128, block_n=128)
    torch.testing.assert_close(out[:, last].float(), want, rtol=2e-2, atol=2e-2)


@gpu
@needs_cuda
def test_gpu_autotune_pick_from_disk(tp, tmp_path, monkeypatch):
    """A later process takes the pick an earlier one timed (codegen/tune_cache.py): here the autotuner's memory and
    the disk tables are cleared between two calls. The first times every candidate the prune keeps; the second at
    most the one from disk (Triton 3.6 times even a lone candidate once; later versions take it untimed), and
    computes the same output with the same tile."""
    from attn_compiler.codegen import prefill_fwd
    monkeypatch.setenv("MEMATTN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("MEMATTN_AUTOTUNE_CACHE", raising=False)
    tuner = prefill_fwd.attn_fwd_tuned
    disk = tuner.memattn_disk
    timed = []
    real = tuner._bench  # one call per candidate timed (do_bench is a cached_property: patching _do_bench misses)
    monkeypatch.setattr(tuner, "_bench", lambda *a, **kw: timed.append(1) or real(*a, **kw))

    def forget():
        tuner.cache.clear()
        disk._tables.clear()
        disk._seen.clear()
    q, k, v = make(BF16, z=2, h=4, m=1000, n=1000, d=64)
    spec = Spec(scale=0.125, causal=True)
    forget()
    try:
        out, _ = tp.forward(q, k, v, None, None, None, spec)
        assert list(tmp_path.glob("autotune-fwd-*.json")) and len(timed) > 1
        pick = tuner.best_config
        forget()
        timed.clear()
        again, _ = tp.forward(q, k, v, None, None, None, spec)
        assert len(timed) <= 1, f"{len(timed)} candidates timed although the pick was on disk"
        assert str(tuner.best_config) == str(pick)
        assert torch.equal(out, again)
    finally:
        forget()
