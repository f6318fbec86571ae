"""Generated Triton blockwise (FlashAttention-2 style) prefill kernels behind ``torch.ops.memattn.attention``.

Same semantics as ``codegen/reference.py`` (read that first); this file is the fast path that dispatch.py calls.

Kernels, in the order they run:
    _attn_fwd        one program per (query block, z*h): online softmax over key blocks, fp32 m_i / l_i / acc,
                     writes out and stats [2, Z, H, M] fp32 (row max, log row sum; natural units)
    _attn_bwd_dq     one program per (query block, z*h): loops over key blocks, recomputes p, accumulates dq and
                     delta_i = sum_j p_ij dp_ij exactly in fp32; writes dq and delta [Z, H, M] fp32
    _attn_bwd_dkdv   one program per (key block, z*hkv): loops over the GQA group's query heads and their query
                     blocks, recomputes p^T from stats, ds with the dq kernel's delta, accumulates dk, dv in fp32
                     (no atomics: the group is summed inside the program); adds ds into dbias with fp32 atomics
                     when the bias needs a gradient
Nothing of size M x N is ever written to memory.

Why delta is summed in the dq kernel rather than taken as FA2's rowsum(dO * O): O is rounded to the input dtype,
and when p is nearly one-hot ds = p (dp - delta) cancels, leaving that rounding (bf16: 2**-9 |dO.O|) in dq, dk and
dbias, ~20x eager's error. The exact delta is only known after the key loop, so the dq kernel accumulates around
the shift d0 = rowsum(dO * O), which it can compute up front (o and dO are one [BLOCK_M, BLOCK_DV] load each):
    dq_i = scale * (sum_j w_ij (dp_ij - d0_i) k_j - (delta_i - d0_i) * sum_j w_ij k_j),  w = p * keep * (1 - t^2)
(keep: the mask, t: the softcap tanh). d0 is delta up to rounding, so w (dp - d0) has the size of ds and can be
rounded to the input dtype for tl.dot like ds always was; (delta - d0) is tiny, so the second dot needs no more
precision either. The cost: one more [BLOCK_M, BLOCK_D] fp32 accumulator and one more dot per tile in the dq kernel.

Kernel flags (tl.constexpr; every one is decided on the host from the call's tensors and Spec):
    BLOCK_M, BLOCK_N   query rows / key columns per tile (autotuned per shape bucket, or forced by tests)
    BLOCK_D, BLOCK_DV  q/k and v head dims padded to a power of two (>= 16); EVEN_D / EVEN_DV say no padding,
                       so the head-dim load masks are compiled out
    EVEN_M, EVEN_N     M % BLOCK_M == 0 / N % BLOCK_N == 0: the row / column bound checks are compiled out
    IS_CAUSAL          key j allowed iff j <= i + causal_offset; key blocks above the diagonal are skipped and
                       blocks wholly below it run without the causal compare (APPLY_CAUSAL is the per-stage flag)
    HAS_BIAS           an additive float bias, read through 4-D strides (0 on broadcast dims, no copy)
    HAS_MASK           a bool mask read through 4-D strides; MASK_KEEP: True keeps (else True drops);
                       dropped positions get mask_fill
    HAS_DROPOUT        drop with the counter hash of codegen/rng.py in uint32 arithmetic (same elements as the CPU
                       reference), scale kept ones by 1 / (1 - dropout_p)
    SOFTCAP            s = softcap * tanh(s / softcap) before bias and mask
    SAFE_SOFTMAX       fully-masked rows give 0 (and zero gradients) instead of eager's NaN
    HAS_DBIAS          backward: accumulate dbias (the gradient of s) into an fp32 buffer shaped like the bias;
                       DB_SUM_M / DB_SUM_N: the bias broadcasts over rows / columns, so the tile is first
                       summed over that axis and one vector (or scalar) is added atomically
    NATURAL            scores kept in natural units (set when there is a bias or a mask): a finite fill or bias
                       of finfo.min would overflow to -inf once scaled by log2(e), and a row masked everywhere
                       with it must still give 1/N; exp(s - m) is then computed as exp2((s - m) * log2(e)), one
                       more multiply per score. Without it log2(e) is folded into the scale (the fast path)
    USE_TMA            forward kernels (this file's _attn_fwd and the decode split kernel): K/V tiles are copied by
                       the TMA unit through 4-D tensor descriptors (KDesc, VDesc) instead of pointer loads; tiles
                       past N or D read as 0, as the masked loads give, so the score masks are unchanged. Set on
                       the host where the layout allows it (see tma_descs; MEMATTN_TMA overrides)
    WARP_SPEC          _attn_fwd with TMA: the K/V loop as tl.range(warp_specialize=True). An experiment, off
                       unless MEMATTN_WS=1 (see _warp_spec_wanted): Triton 3.6 does not compile it on sm_90
    FUSE_SCALE         plain scores (no bias, mask or softcap) and a positive scale: each score is one FMA
                       (qk * qk_scale - m) before exp2; the forward takes its row max on qk and scales it per row
    CAUSAL_LOOP        _attn_fwd with IS_CAUSAL: how a query block walks its keys. 0: the tiles every row may see,
                       then the diagonal ones under the causal mask, two K/V loops. 1: one loop; the mask is taken
                       on a tile only from lo_mask on, a branch uniform over the tile (plain scores; the other paths
                       mask every tile), which saves the second loop's pipeline fill and drain. Chosen per head dim
                       by _causal_loop (MEMATTN_CAUSAL_LOOP overrides)
    DOT_PREC           tl.dot input precision: "ieee" for fp32 inputs (matches eager fp32), "tf32" otherwise
                       (the default; no effect on 16-bit inputs); "upcast" under TRITON_INTERPRET for bf16, whose
                       interpreter matmul is wrong (numpy has no bf16): operands go to fp32 first

Scores are kept in the log2 domain: s2 = s * log2(e); with no softcap the log2(e) is folded into the scale
(qk_scale = scale * log2(e)) so each tile costs one multiply and exp2, unless NATURAL. The stats are stored in natural
units, as codegen/reference.py stores them; the backward takes p = exp((s - m) - log l) from them.
Batch/head offsets are int64; offsets inside one head are int32 (rows * stride < 2**31).
"""
from __future__ import annotations

import contextlib
import functools

import warnings

import torch
import triton
import triton.language as tl

from attn_compiler import config

from . import launch, reference, tune_cache
from .reference import Spec

try:  # host-side TMA descriptors (Triton >= 3.3)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: pointer loads only
    TensorDescriptor = None

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256
_MAX_GRID_Y = 65535  # z*h goes on grid axis 1

# ------------------------------------------------------------------------------------------------ device helpers


@triton.jit
def _fmix32(x):
    # murmur3 finaliser on uint32 (wrapping multiplies); codegen/rng.py spells the same function in int64
    x = x ^ (x >> 16)
    x = x * 0x85EBCA6B
    x = x ^ (x >> 13)
    x = x * 0xC2B2AE35
    return x ^ (x >> 16)


@triton.jit
def _row_hash(seed, zh, rows):
    """rng.row_hash: seed, zh uint32 scalars, rows int32 vector -> uint32 vector."""
    base = _fmix32(seed ^ (zh.to(tl.uint32) * 0x9E3779B1))
    return _fmix32(base ^ (rows.to(tl.uint32) * 0x7FEB352D))


@triton.jit
def _drop_scale(rh, col_mul, dropout_p, inv_keep):
    """rng.keep_mask turned into keep / (1 - p); rh and col_mul already broadcast to the tile's 2-D shape."""
    x = _fmix32(rh ^ col_mul)
    u = (x >> 8).to(tl.float32) * (1.0 / 16777216.0)
    return tl.where(u >= dropout_p, inv_keep, 0.0)


@triton.jit
def _tanh(x):
    # exp2 form: no libdevice, so the same code runs compiled and under TRITON_INTERPRET
    return 1.0 - 2.0 / (tl.exp2(x * (2.0 * 1.4426950408889634)) + 1.0)


@triton.jit
def _load_tile(ptrs, r, c, R, C, EVEN_R: tl.constexpr, EVEN_C: tl.constexpr):
    """ptrs[i, j] where r[i] < R and c[j] < C, else 0 (r, c: index tensors broadcast to the tile's shape); a bound
    known to hold (EVEN_*) is compiled out."""
    if EVEN_R and EVEN_C:
        return tl.load(ptrs)
    elif EVEN_R:
        return tl.load(ptrs, mask=c < C, other=0.0)
    elif EVEN_C:
        return tl.load(ptrs, mask=r < R, other=0.0)
    else:
        return tl.load(ptrs, mask=(r < R) & (c < C), other=0.0)


@triton.jit
def _store_tile(ptrs, x, r, c, R, C, EVEN_R: tl.constexpr, EVEN_C: tl.constexpr):
    """Store x (cast to the pointee type) where r[i] < R and c[j] < C, as _load_tile reads."""
    x = x.to(ptrs.dtype.element_ty)
    if EVEN_R and EVEN_C:
        tl.store(ptrs, x)
    elif EVEN_R:
        tl.store(ptrs, x, mask=c < C)
    elif EVEN_C:
        tl.store(ptrs, x, mask=r < R)
    else:
        tl.store(ptrs, x, mask=(r < R) & (c < C))


@triton.jit
def _apply_mask(x, mask_base, rows, cols, stride_mm, stride_mn, M, N, fill, MASK_KEEP: tl.constexpr,
                EVEN_M: tl.constexpr, EVEN_N: tl.constexpr):
    """x where the bool mask keeps (True keeps when MASK_KEEP, else True drops), ``fill`` elsewhere."""
    mk_ptrs = mask_base + rows * stride_mm + cols * stride_mn
    if EVEN_M and EVEN_N:
        mk = tl.load(mk_ptrs) != 0
    else:
        mk = tl.load(mk_ptrs, mask=(rows < M) & (cols < N), other=0) != 0
    if MASK_KEEP:
        return tl.where(mk, x, fill)
    else:
        return tl.where(mk, fill, x)


@triton.jit
def _dot(a, b, acc, DOT_PREC: tl.constexpr):
    if DOT_PREC == "upcast":  # TRITON_INTERPRET has no bf16 matmul (numpy): multiply the exact fp32 values
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def _scores(qk, rows, cols, bias_ptr, mask_ptr, stride_bm, stride_bn, stride_mm, stride_mn, M, N,
            qk_scale, softcap_in, softcap_out, fill2, causal_offset,
            HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, MASK_KEEP: tl.constexpr,
            SOFTCAP: tl.constexpr, APPLY_CAUSAL: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr):
    """Raw q.k tile -> scores (and tanh(s/softcap), for the softcap backward).

    The scores are in the log2 domain (log2(e) folded into qk_scale / softcap_out / fill) unless NATURAL, when the
    host passes natural-unit constants and they stay in natural units (see NATURAL in the header).

    rows and cols are 2-D index tensors that broadcast to the tile: [BM, 1] x [1, BN] in the forward and dq
    kernels, [1, BM] x [BN, 1] in the transposed dk/dv kernel, so one helper serves both orientations.
    """
    if SOFTCAP:
        t = _tanh(qk * softcap_in)  # softcap_in = scale / softcap
        s = t * softcap_out  # softcap_out = softcap * log2(e)
    else:
        t = qk
        s = qk * qk_scale
    if HAS_BIAS:
        b = _load_tile(bias_ptr + rows * stride_bm + cols * stride_bn, rows, cols, M, N, EVEN_M, EVEN_N)
        s = s + b.to(tl.float32)  # a bias implies NATURAL: scores stay in natural units
    if HAS_MASK:
        s = _apply_mask(s, mask_ptr, rows, cols, stride_mm, stride_mn, M, N, fill2, MASK_KEEP, EVEN_M, EVEN_N)
    return _key_masks(s, rows, cols, N, causal_offset, APPLY_CAUSAL, EVEN_N), t


@triton.jit
def _key_masks(x, rows, cols, N, causal_offset, APPLY_CAUSAL: tl.constexpr, EVEN_N: tl.constexpr):
    """The score tile's key masks, the ones every path takes: -inf above the causal diagonal and past N."""
    if APPLY_CAUSAL:
        x = tl.where(cols <= rows + causal_offset, x, float("-inf"))
    if not EVEN_N:
        x = tl.where(cols < N, x, float("-inf"))
    return x


@triton.jit
def _exp_diff(s, m, NATURAL: tl.constexpr):
    """exp(s - m) for scores in the kernel's domain; subtracting first keeps finfo.min - finfo.min exact."""
    if NATURAL:
        return tl.exp2((s - m) * 1.4426950408889634)
    else:
        return tl.exp2(s - m)


@triton.jit
def _row_stats(Stats, zh_m, ZHM, offs_m, M, EVEN_M: tl.constexpr, NATURAL: tl.constexpr,
               SAFE_SOFTMAX: tl.constexpr):
    """Backward: per-row (mrow, lrow) with p = exp(s - mrow - lrow) in the kernel's domain, from the forward's
    stats (row max, log row sum; natural units). Rows past M get mrow = +inf, so p = 0 there."""
    if EVEN_M:
        m = tl.load(Stats + zh_m + offs_m)
        logl = tl.load(Stats + ZHM + zh_m + offs_m)
    else:
        m = tl.load(Stats + zh_m + offs_m, mask=offs_m < M, other=float("inf"))
        logl = tl.load(Stats + ZHM + zh_m + offs_m, mask=offs_m < M, other=0.0)
    if NATURAL:  # the same max the forward subtracted, to the bit
        mrow = m
        lrow = logl * 1.4426950408889634
    else:
        mrow = (m + logl) * 1.4426950408889634
        lrow = logl * 0.0
    if SAFE_SOFTMAX:  # rows masked everywhere have m = -inf; their p is 0 and so is their gradient
        dead = mrow == float("-inf")
        mrow = tl.where(dead, float("inf"), mrow)
        lrow = tl.where(dead, 0.0, lrow)  # log l = -inf too: NATURAL's p would be exp2(-inf + inf) = NaN
    return mrow, lrow


@triton.jit
def _plain_prob(qk, rows, cols, N, qk_scale, causal_offset, mrow, APPLY_CAUSAL: tl.constexpr,
                EVEN_N: tl.constexpr):
    """FUSE_SCALE's backward p = exp2(qk * qk_scale - mrow) (plain scores in the log2 domain): one FMA per score,
    masked keys (causal, past N) at -inf before the scale, which is positive."""
    return tl.exp2(_key_masks(qk, rows, cols, N, causal_offset, APPLY_CAUSAL, EVEN_N) * qk_scale - mrow)


@triton.jit
def _prob(s, mrow, lrow, NATURAL: tl.constexpr):
    if NATURAL:
        return tl.exp2((s - mrow) * 1.4426950408889634 - lrow)
    else:
        return tl.exp2(s - mrow)


# ------------------------------------------------------------------------------------------------------ forward


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, tma_z, tma_h, bias_base, mask_base, rh, offs_m,
               offs_n, offs_d, offs_dv,
               lo, hi, stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn, stride_mm, stride_mn,
               M, N, D, DV, qk_scale, softcap_in, softcap_out, fill2, causal_offset, dropout_p, inv_keep,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
               EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
               APPLY_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
               MASK_KEEP: tl.constexpr, HAS_DROPOUT: tl.constexpr, SOFTCAP: tl.constexpr,
               NATURAL: tl.constexpr, DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr,
               WARP_SPEC: tl.constexpr = False, FUSE_SCALE: tl.constexpr = False, causal_from=0,
               CAUSAL_BRANCH: tl.constexpr = False):
    rows = offs_m[:, None]
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPEC):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols_1d = start_n + offs_n
        cols = cols_1d[None, :]
        if USE_TMA:  # TMA copy of the [BLOCK_N, BLOCK_D] tile: keys past N and dims past D read as 0
            kt = tl.trans(k_desc.load([tma_z, tma_h, start_n, 0]).reshape(BLOCK_N, BLOCK_D))
        else:
            kt_ptrs = k_base + cols * stride_kn + offs_d[:, None] * stride_kd  # [BLOCK_D, BLOCK_N]
            kt = _load_tile(kt_ptrs, offs_d[:, None], cols, D, N, EVEN_D, EVEN_N)
        qk = _dot(q, kt, None, DOT_PREC)
        if FUSE_SCALE:
            # plain scores with qk_scale > 0: the scaled tile is never formed. The row max is taken on qk and
            # scaled once per row (rounding is monotonic, so it equals the max of the scaled scores), and each
            # score costs one FMA before exp2 instead of a multiply and a subtract
            if CAUSAL_BRANCH:  # CAUSAL_LOOP == 1: one loop, the causal mask only on tiles from causal_from
                qk = _key_masks(qk, rows, cols, N, causal_offset, False, EVEN_N)
                if start_n >= causal_from:
                    qk = tl.where(cols <= rows + causal_offset, qk, float("-inf"))
            else:
                qk = _key_masks(qk, rows, cols, N, causal_offset, APPLY_CAUSAL, EVEN_N)
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(qk * qk_scale - m_safe[:, None])
        else:
            s, _t = _scores(qk, rows, cols, bias_base, mask_base, stride_bm, stride_bn, stride_mm, stride_mn, M, N,
                            qk_scale, softcap_in, softcap_out, fill2, causal_offset,
                            HAS_BIAS, HAS_MASK, MASK_KEEP, SOFTCAP, APPLY_CAUSAL, EVEN_M, EVEN_N)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # a row still at -inf subtracts 0, not -inf (no inf - inf); a row masked everywhere ends as 0/0 = NaN
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = _exp_diff(s, m_safe[:, None], NATURAL)
        alpha = _exp_diff(m_i, m_safe, NATURAL)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            p = p * _drop_scale(rh[:, None], (cols_1d.to(tl.uint32) * 0x9E3779B1)[None, :], dropout_p, inv_keep)
        if USE_TMA:
            v = v_desc.load([tma_z, tma_h, start_n, 0]).reshape(BLOCK_N, BLOCK_DV)
        else:
            v_ptrs = v_base + cols_1d[:, None] * stride_vn + offs_dv[None, :] * stride_vd  # [BLOCK_N, BLOCK_DV]
            v = _load_tile(v_ptrs, cols_1d[:, None], offs_dv[None, :], N, DV, EVEN_N, EVEN_DV)
        acc = acc * alpha[:, None]
        acc = _dot(p.to(v.dtype), v, acc, DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, Bias, Mask, Seed, Out, Stats, KDesc, VDesc,
              stride_qz, stride_qh, stride_qm, stride_qd,
              stride_kz, stride_kh, stride_kn, stride_kd,
              stride_vz, stride_vh, stride_vn, stride_vd,
              stride_bz, stride_bh, stride_bm, stride_bn,
              stride_mz, stride_mh, stride_mm, stride_mn,
              stride_oz, stride_oh, stride_om, stride_od,
              H, M, N, D, DV, GQA_RATIO, ZHM,
              qk_scale, softcap_in, softcap_out, fill2, causal_offset, dropout_p, inv_keep,
              BUCKET_M, BUCKET_N,
              BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
              EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
              HAS_MASK: tl.constexpr, MASK_KEEP: tl.constexpr, HAS_DROPOUT: tl.constexpr,
              SOFTCAP: tl.constexpr, SAFE_SOFTMAX: tl.constexpr, NATURAL: tl.constexpr,
              DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr, FUSE_SCALE: tl.constexpr,
              CAUSAL_LOOP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    tl.static_assert(BLOCK_D >= 16 and BLOCK_DV >= 16, "head dims are padded to at least 16 for tl.dot")
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16, "tl.dot tiles are at least 16 x 16")
    if IS_CAUSAL:  # the longest rows first: better tail balance across SMs
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        pid_m = tl.program_id(0)
    off_zh = tl.program_id(1)
    off_z = (off_zh // H).to(tl.int64)
    off_h = (off_zh % H).to(tl.int64)
    off_hk = off_h // GQA_RATIO
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q_ptrs = Q + off_z * stride_qz + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = _load_tile(q_ptrs, offs_m[:, None], offs_d[None, :], M, D, EVEN_M, EVEN_D)
    k_base = K + off_z * stride_kz + off_hk * stride_kh
    v_base = V + off_z * stride_vz + off_hk * stride_vh
    tma_z = off_z.to(tl.int32)    # descriptor coordinates (USE_TMA)
    tma_h = off_hk.to(tl.int32)
    bias_base = Bias + off_z * stride_bz + off_h * stride_bh
    mask_base = Mask + off_z * stride_mz + off_h * stride_mh
    if HAS_DROPOUT:
        seed = (tl.load(Seed) & 0xFFFFFFFF).to(tl.uint32)
        rh = _row_hash(seed, off_zh, offs_m)
    else:
        rh = offs_m

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    if IS_CAUSAL:
        # keys past hi are masked for every row of the block; keys below lo_mask are allowed for every row
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + causal_offset, 0), N)
        lo_mask = tl.minimum(tl.maximum(start_m + causal_offset + 1, 0) // BLOCK_N * BLOCK_N, hi)
        lo = 0
        if CAUSAL_LOOP == 0:  # two K/V loops: the unmasked tiles first, with no mask
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, KDesc, VDesc, tma_z, tma_h, bias_base,
                                       mask_base, rh, offs_m, offs_n,
                                       offs_d, offs_dv, 0, lo_mask, stride_kn, stride_kd, stride_vn, stride_vd,
                                       stride_bm, stride_bn, stride_mm, stride_mn, M, N, D, DV, qk_scale, softcap_in,
                                       softcap_out, fill2, causal_offset, dropout_p, inv_keep,
                                       BLOCK_N, BLOCK_D, BLOCK_DV, EVEN_M, EVEN_N, EVEN_D, EVEN_DV, False, HAS_BIAS,
                                       HAS_MASK, MASK_KEEP, HAS_DROPOUT, SOFTCAP, NATURAL, DOT_PREC, USE_TMA,
                                       WARP_SPEC, FUSE_SCALE)
            lo = lo_mask
        # the masked tiles; with CAUSAL_LOOP == 1 every tile in one loop, the mask taken from lo_mask on (a branch
        # uniform per tile)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, KDesc, VDesc, tma_z, tma_h, bias_base,
                                   mask_base, rh, offs_m, offs_n,
                                   offs_d, offs_dv, lo, hi, stride_kn, stride_kd, stride_vn, stride_vd,
                                   stride_bm, stride_bn, stride_mm, stride_mn, M, N, D, DV, qk_scale, softcap_in,
                                   softcap_out, fill2, causal_offset, dropout_p, inv_keep,
                                   BLOCK_N, BLOCK_D, BLOCK_DV, EVEN_M, EVEN_N, EVEN_D, EVEN_DV, True, HAS_BIAS,
                                   HAS_MASK, MASK_KEEP, HAS_DROPOUT, SOFTCAP, NATURAL, DOT_PREC, USE_TMA,
                                   WARP_SPEC, FUSE_SCALE, lo_mask, CAUSAL_LOOP == 1)
    else:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, KDesc, VDesc, tma_z, tma_h, bias_base,
                                   mask_base, rh, offs_m, offs_n,
                                   offs_d, offs_dv, 0, N, stride_kn, stride_kd, stride_vn, stride_vd,
                                   stride_bm, stride_bn, stride_mm, stride_mn, M, N, D, DV, qk_scale, softcap_in,
                                   softcap_out, fill2, causal_offset, dropout_p, inv_keep,
                                   BLOCK_N, BLOCK_D, BLOCK_DV, EVEN_M, EVEN_N, EVEN_D, EVEN_DV, False, HAS_BIAS,
                                   HAS_MASK, MASK_KEEP, HAS_DROPOUT, SOFTCAP, NATURAL, DOT_PREC, USE_TMA,
                                   WARP_SPEC, FUSE_SCALE)
    o = acc / l_i[:, None]  # l_i == 0 (row masked everywhere): 0/0 = NaN, as eager's softmax gives
    if SAFE_SOFTMAX:
        o = tl.where((l_i == 0.0)[:, None], 0.0, o)
    if NATURAL:
        m_nat = m_i
    else:
        m_nat = m_i * 0.6931471805599453
    logl = tl.log2(l_i) * 0.6931471805599453
    o_ptrs = (Out + off_z * stride_oz + off_h * stride_oh + offs_m[:, None] * stride_om
              + offs_dv[None, :] * stride_od)
    st_ptrs = Stats + off_zh.to(tl.int64) * M + offs_m  # stats[0] = row max, stats[1] = log row sum
    _store_tile(o_ptrs, o, offs_m[:, None], offs_dv[None, :], M, DV, EVEN_M, EVEN_DV)
    if EVEN_M:
        tl.store(st_ptrs, m_nat)
        tl.store(st_ptrs + ZHM, logl)
    else:
        tl.store(st_ptrs, m_nat, mask=offs_m < M)
        tl.store(st_ptrs + ZHM, logl, mask=offs_m < M)


# ----------------------------------------------------------------------------------------------------- backward


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, Stats, zh_m, ZHM, delta_base, bias_base, mask_base, dbias_base, seed,
                off_zh, col_mul, offs_n, offs_m0, offs_d, offs_dv, lo, hi,
                stride_qm, stride_qd, stride_dom, stride_dod, stride_bm, stride_bn, stride_mm, stride_mn,
                stride_dbm, stride_dbn, M, N, D, DV,
                qk_scale, softcap_in, softcap_out, fill2, causal_offset, dropout_p, inv_keep, scale,
                BLOCK_M: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
                EVEN_DV: tl.constexpr, APPLY_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                HAS_MASK: tl.constexpr, MASK_KEEP: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                SOFTCAP: tl.constexpr, SAFE_SOFTMAX: tl.constexpr, HAS_DBIAS: tl.constexpr,
                DB_SUM_M: tl.constexpr, DB_SUM_N: tl.constexpr, NATURAL: tl.constexpr, DOT_PREC: tl.constexpr,
                FUSE_SCALE: tl.constexpr = False):
    cols = offs_n[:, None]  # tile is [BLOCK_N, BLOCK_M]: keys down, queries across
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + offs_m0
        rows = offs_m[None, :]
        qt_ptrs = q_base + rows * stride_qm + offs_d[:, None] * stride_qd  # [BLOCK_D, BLOCK_M]
        do_ptrs = do_base + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod  # [BLOCK_M, BLOCK_DV]
        qt = _load_tile(qt_ptrs, rows, offs_d[:, None], M, D, EVEN_M, EVEN_D)
        do = _load_tile(do_ptrs, offs_m[:, None], offs_dv[None, :], M, DV, EVEN_M, EVEN_DV)
        # rows past M: p = 0, so they add nothing (and nothing to dbias sums)
        mrow, lrow = _row_stats(Stats, zh_m, ZHM, offs_m, M, EVEN_M, NATURAL, SAFE_SOFTMAX)
        if EVEN_M:
            delta = tl.load(delta_base + offs_m)
        else:
            delta = tl.load(delta_base + offs_m, mask=offs_m < M, other=0.0)
        qkt = _dot(k, qt, None, DOT_PREC)
        if FUSE_SCALE:
            pt = _plain_prob(qkt, rows, cols, N, qk_scale, causal_offset, mrow[None, :], APPLY_CAUSAL, EVEN_N)
            tt = pt  # no softcap: unused
        else:
            st, tt = _scores(qkt, rows, cols, bias_base, mask_base, stride_bm, stride_bn, stride_mm, stride_mn, M,
                             N, qk_scale, softcap_in, softcap_out, fill2, causal_offset,
                             HAS_BIAS, HAS_MASK, MASK_KEEP, SOFTCAP, APPLY_CAUSAL, EVEN_M, EVEN_N)
            pt = _prob(st, mrow[None, :], lrow[None, :], NATURAL)
        if HAS_DROPOUT:
            drop = _drop_scale(_row_hash(seed, off_zh, offs_m)[None, :], col_mul, dropout_p, inv_keep)
            dv = _dot((pt * drop).to(do.dtype), do, dv, DOT_PREC)
        else:
            dv = _dot(pt.to(do.dtype), do, dv, DOT_PREC)
        dpt = _dot(v, tl.trans(do), None, DOT_PREC)
        if HAS_DROPOUT:
            dpt = dpt * drop
        dst = pt * (dpt - delta[None, :])
        if HAS_MASK:  # filled positions are constants: no gradient flows through them
            dst = _apply_mask(dst, mask_base, rows, cols, stride_mm, stride_mn, M, N, 0.0, MASK_KEEP, EVEN_M, EVEN_N)
        if HAS_DBIAS:
            if DB_SUM_M and DB_SUM_N:
                tl.atomic_add(dbias_base, tl.sum(tl.sum(dst, 1), 0))
            elif DB_SUM_M:
                tl.atomic_add(dbias_base + offs_n * stride_dbn, tl.sum(dst, 1), mask=offs_n < N)
            elif DB_SUM_N:
                tl.atomic_add(dbias_base + offs_m * stride_dbm, tl.sum(dst, 0), mask=offs_m < M)
            else:
                tl.atomic_add(dbias_base + rows * stride_dbm + cols * stride_dbn, dst, mask=(rows < M) & (cols < N))
        if SOFTCAP:
            dst = dst * (1.0 - tt * tt)
        dst = dst * scale
        dk = _dot(dst.to(qt.dtype), tl.trans(qt), dk, DOT_PREC)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, Bias, Mask, Seed, DO, Stats, Delta, DK, DV_, DBias,
                   stride_qz, stride_qh, stride_qm, stride_qd,
                   stride_kz, stride_kh, stride_kn, stride_kd,
                   stride_vz, stride_vh, stride_vn, stride_vd,
                   stride_bz, stride_bh, stride_bm, stride_bn,
                   stride_mz, stride_mh, stride_mm, stride_mn,
                   stride_doz, stride_doh, stride_dom, stride_dod,
                   stride_dkz, stride_dkh, stride_dkn, stride_dkd,
                   stride_dvz, stride_dvh, stride_dvn, stride_dvd,
                   stride_dbz, stride_dbh, stride_dbm, stride_dbn,
                   H, HKV, M, N, D, DV, GQA_RATIO, ZHM,
                   qk_scale, softcap_in, softcap_out, fill2, causal_offset, dropout_p, inv_keep, scale,
                   BUCKET_M, BUCKET_N,
                   BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
                   EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                   HAS_MASK: tl.constexpr, MASK_KEEP: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                   SOFTCAP: tl.constexpr, SAFE_SOFTMAX: tl.constexpr, HAS_DBIAS: tl.constexpr,
                   DB_SUM_M: tl.constexpr, DB_SUM_N: tl.constexpr, NATURAL: tl.constexpr,
                   DOT_PREC: tl.constexpr, FUSE_SCALE: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16, "tl.dot tiles are at least 16 x 16")
    pid_n = tl.program_id(0)
    off_zhk = tl.program_id(1)
    off_z = (off_zhk // HKV).to(tl.int64)
    off_hk = (off_zhk % HKV).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    k_ptrs = K + off_z * stride_kz + off_hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + off_z * stride_vz + off_hk * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    k = _load_tile(k_ptrs, offs_n[:, None], offs_d[None, :], N, D, EVEN_N, EVEN_D)
    v = _load_tile(v_ptrs, offs_n[:, None], offs_dv[None, :], N, DV, EVEN_N, EVEN_DV)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    if IS_CAUSAL:
        # rows below lo see none of this key block; rows from mid on see all of it
        lo = tl.minimum(tl.maximum(start_n - causal_offset, 0) // BLOCK_M * BLOCK_M, M)
        mid = tl.maximum(tl.minimum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - causal_offset, 0), BLOCK_M)
                                    * BLOCK_M, M), lo)
    else:
        lo = 0
        mid = 0
    if HAS_DROPOUT:
        seed = (tl.load(Seed) & 0xFFFFFFFF).to(tl.uint32)
        col_mul = (offs_n.to(tl.uint32) * 0x9E3779B1)[:, None]
    else:
        seed = 0
        col_mul = offs_n[:, None]
    # the GQA group's query heads all read this kv head: sum their contributions here, no atomics
    for g in range(0, GQA_RATIO):
        off_h = off_hk * GQA_RATIO + g
        off_zh = off_z * H + off_h
        q_base = Q + off_z * stride_qz + off_h * stride_qh
        do_base = DO + off_z * stride_doz + off_h * stride_doh
        zh_m = off_zh * M
        delta_base = Delta + off_zh * M
        bias_base = Bias + off_z * stride_bz + off_h * stride_bh
        mask_base = Mask + off_z * stride_mz + off_h * stride_mh
        dbias_base = DBias + off_z * stride_dbz + off_h * stride_dbh
        if IS_CAUSAL:
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, Stats, zh_m, ZHM, delta_base, bias_base, mask_base,
                                 dbias_base, seed, off_zh, col_mul, offs_n, offs_m0, offs_d, offs_dv, lo, mid,
                                 stride_qm, stride_qd, stride_dom, stride_dod, stride_bm, stride_bn, stride_mm,
                                 stride_mn, stride_dbm, stride_dbn, M, N, D, DV,
                                 qk_scale, softcap_in, softcap_out, fill2, causal_offset, dropout_p, inv_keep, scale,
                                 BLOCK_M, EVEN_M, EVEN_N, EVEN_D, EVEN_DV, True, HAS_BIAS, HAS_MASK, MASK_KEEP,
                                 HAS_DROPOUT, SOFTCAP, SAFE_SOFTMAX, HAS_DBIAS, DB_SUM_M, DB_SUM_N, NATURAL,
                                 DOT_PREC, FUSE_SCALE)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, Stats, zh_m, ZHM, delta_base, bias_base, mask_base,
                             dbias_base, seed, off_zh, col_mul, offs_n, offs_m0, offs_d, offs_dv, mid, M,
                             stride_qm, stride_qd, stride_dom, stride_dod, stride_bm, stride_bn, stride_mm,
                             stride_mn, stride_dbm, stride_dbn, M, N, D, DV,
                             qk_scale, softcap_in, softcap_out, fill2, causal_offset, dropout_p, inv_keep, scale,
                             BLOCK_M, EVEN_M, EVEN_N, EVEN_D, EVEN_DV, False, HAS_BIAS, HAS_MASK, MASK_KEEP,
                             HAS_DROPOUT, SOFTCAP, SAFE_SOFTMAX, HAS_DBIAS, DB_SUM_M, DB_SUM_N, NATURAL,
                             DOT_PREC, FUSE_SCALE)
    dk_ptrs = (DK + off_z * stride_dkz + off_hk * stride_dkh + offs_n[:, None] * stride_dkn
               + offs_d[None, :] * stride_dkd)
    dv_ptrs = (DV_ + off_z * stride_dvz + off_hk * stride_dvh + offs_n[:, None] * stride_dvn
               + offs_dv[None, :] * stride_dvd)
    _store_tile(dk_ptrs, dk, offs_n[:, None], offs_d[None, :], N, D, EVEN_N, EVEN_D)
    _store_tile(dv_ptrs, dv, offs_n[:, None], offs_dv[None, :], N, DV, EVEN_N, EVEN_DV)


@triton.jit
def _dq_inner(dq, dq_corr, delta, q, do, mrow, lrow, shift, k_base, v_base, bias_base, mask_base, rh, offs_m,
              offs_n, offs_d, offs_dv, lo, hi, stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn,
              stride_mm, stride_mn, M, N, D, DV, qk_scale, softcap_in, softcap_out, fill2, causal_offset, dropout_p,
              inv_keep,
              BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
              EVEN_DV: tl.constexpr, APPLY_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
              MASK_KEEP: tl.constexpr, HAS_DROPOUT: tl.constexpr, SOFTCAP: tl.constexpr,
              NATURAL: tl.constexpr, DOT_PREC: tl.constexpr, FUSE_SCALE: tl.constexpr = False):
    rows = offs_m[:, None]
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols_1d = start_n + offs_n
        cols = cols_1d[None, :]
        kt_ptrs = k_base + cols * stride_kn + offs_d[:, None] * stride_kd  # [BLOCK_D, BLOCK_N]
        vt_ptrs = v_base + cols * stride_vn + offs_dv[:, None] * stride_vd  # [BLOCK_DV, BLOCK_N]
        kt = _load_tile(kt_ptrs, offs_d[:, None], cols, D, N, EVEN_D, EVEN_N)
        vt = _load_tile(vt_ptrs, offs_dv[:, None], cols, DV, N, EVEN_DV, EVEN_N)
        qk = _dot(q, kt, None, DOT_PREC)
        if FUSE_SCALE:
            p = _plain_prob(qk, rows, cols, N, qk_scale, causal_offset, mrow[:, None], APPLY_CAUSAL, EVEN_N)
            t = p  # no softcap: unused
        else:
            s, t = _scores(qk, rows, cols, bias_base, mask_base, stride_bm, stride_bn, stride_mm, stride_mn, M, N,
                           qk_scale, softcap_in, softcap_out, fill2, causal_offset,
                           HAS_BIAS, HAS_MASK, MASK_KEEP, SOFTCAP, APPLY_CAUSAL, EVEN_M, EVEN_N)
            p = _prob(s, mrow[:, None], lrow[:, None], NATURAL)
        dp = _dot(do, vt, None, DOT_PREC)
        if HAS_DROPOUT:
            dp = dp * _drop_scale(rh[:, None], (cols_1d.to(tl.uint32) * 0x9E3779B1)[None, :], dropout_p, inv_keep)
        delta += tl.sum(p * dp, 1)
        w = p  # the weight of k_j in dq (see the header): p, 0 where the mask fills, times the softcap derivative
        if HAS_MASK:
            w = _apply_mask(w, mask_base, rows, cols, stride_mm, stride_mn, M, N, 0.0, MASK_KEEP, EVEN_M, EVEN_N)
        if SOFTCAP:
            w = w * (1.0 - t * t)
        dq = _dot((w * (dp - shift[:, None])).to(kt.dtype), tl.trans(kt), dq, DOT_PREC)
        dq_corr = _dot(w.to(kt.dtype), tl.trans(kt), dq_corr, DOT_PREC)
    return dq, dq_corr, delta


@triton.jit
def _attn_bwd_dq(Q, K, V, Bias, Mask, Seed, DO, Out, Stats, Delta, DQ,
                 stride_qz, stride_qh, stride_qm, stride_qd,
                 stride_kz, stride_kh, stride_kn, stride_kd,
                 stride_vz, stride_vh, stride_vn, stride_vd,
                 stride_bz, stride_bh, stride_bm, stride_bn,
                 stride_mz, stride_mh, stride_mm, stride_mn,
                 stride_doz, stride_doh, stride_dom, stride_dod,
                 stride_oz, stride_oh, stride_om, stride_od,
                 stride_dqz, stride_dqh, stride_dqm, stride_dqd,
                 H, M, N, D, DV, GQA_RATIO, ZHM,
                 qk_scale, softcap_in, softcap_out, fill2, causal_offset, dropout_p, inv_keep, scale,
                 BUCKET_M, BUCKET_N,
                 BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
                 EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                 HAS_MASK: tl.constexpr, MASK_KEEP: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                 SOFTCAP: tl.constexpr, SAFE_SOFTMAX: tl.constexpr, NATURAL: tl.constexpr,
                 DOT_PREC: tl.constexpr, FUSE_SCALE: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16, "tl.dot tiles are at least 16 x 16")
    if IS_CAUSAL:
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        pid_m = tl.program_id(0)
    off_zh = tl.program_id(1)
    off_z = (off_zh // H).to(tl.int64)
    off_h = (off_zh % H).to(tl.int64)
    off_hk = off_h // GQA_RATIO
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q_ptrs = Q + off_z * stride_qz + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    do_ptrs = (DO + off_z * stride_doz + off_h * stride_doh + offs_m[:, None] * stride_dom
               + offs_dv[None, :] * stride_dod)
    o_ptrs = Out + off_z * stride_oz + off_h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od
    q = _load_tile(q_ptrs, offs_m[:, None], offs_d[None, :], M, D, EVEN_M, EVEN_D)
    do = _load_tile(do_ptrs, offs_m[:, None], offs_dv[None, :], M, DV, EVEN_M, EVEN_DV)
    o = _load_tile(o_ptrs, offs_m[:, None], offs_dv[None, :], M, DV, EVEN_M, EVEN_DV)
    shift = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # d0 = rowsum(dO * O): delta up to O's rounding
    mrow, lrow = _row_stats(Stats, off_zh.to(tl.int64) * M, ZHM, offs_m, M, EVEN_M, NATURAL, SAFE_SOFTMAX)
    k_base = K + off_z * stride_kz + off_hk * stride_kh
    v_base = V + off_z * stride_vz + off_hk * stride_vh
    bias_base = Bias + off_z * stride_bz + off_h * stride_bh
    mask_base = Mask + off_z * stride_mz + off_h * stride_mh
    if HAS_DROPOUT:
        seed = (tl.load(Seed) & 0xFFFFFFFF).to(tl.uint32)
        rh = _row_hash(seed, off_zh, offs_m)
    else:
        rh = offs_m
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # sum_j w (dp - d0) k_j
    dq_corr = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # sum_j w k_j
    delta = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum_j p dp
    if IS_CAUSAL:
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + causal_offset, 0), N)
        lo_mask = tl.minimum(tl.maximum(start_m + causal_offset + 1, 0) // BLOCK_N * BLOCK_N, hi)
        dq, dq_corr, delta = _dq_inner(dq, dq_corr, delta, q, do, mrow, lrow, shift, k_base, v_base, bias_base,
                                       mask_base, rh, offs_m, offs_n, offs_d, offs_dv, 0, lo_mask, stride_kn,
                                       stride_kd, stride_vn, stride_vd, stride_bm, stride_bn, stride_mm, stride_mn,
                                       M, N, D, DV, qk_scale, softcap_in, softcap_out, fill2, causal_offset,
                                       dropout_p, inv_keep, BLOCK_N, EVEN_M, EVEN_N, EVEN_D, EVEN_DV, False,
                                       HAS_BIAS, HAS_MASK, MASK_KEEP, HAS_DROPOUT, SOFTCAP, NATURAL, DOT_PREC,
                                       FUSE_SCALE)
        dq, dq_corr, delta = _dq_inner(dq, dq_corr, delta, q, do, mrow, lrow, shift, k_base, v_base, bias_base,
                                       mask_base, rh, offs_m, offs_n, offs_d, offs_dv, lo_mask, hi, stride_kn,
                                       stride_kd, stride_vn, stride_vd, stride_bm, stride_bn, stride_mm, stride_mn,
                                       M, N, D, DV, qk_scale, softcap_in, softcap_out, fill2, causal_offset,
                                       dropout_p, inv_keep, BLOCK_N, EVEN_M, EVEN_N, EVEN_D, EVEN_DV, True,
                                       HAS_BIAS, HAS_MASK, MASK_KEEP, HAS_DROPOUT, SOFTCAP, NATURAL, DOT_PREC,
                                       FUSE_SCALE)
    else:
        dq, dq_corr, delta = _dq_inner(dq, dq_corr, delta, q, do, mrow, lrow, shift, k_base, v_base, bias_base,
                                       mask_base, rh, offs_m, offs_n, offs_d, offs_dv, 0, N, stride_kn,
                                       stride_kd, stride_vn, stride_vd, stride_bm, stride_bn, stride_mm, stride_mn,
                                       M, N, D, DV, qk_scale, softcap_in, softcap_out, fill2, causal_offset,
                                       dropout_p, inv_keep, BLOCK_N, EVEN_M, EVEN_N, EVEN_D, EVEN_DV, False,
                                       HAS_BIAS, HAS_MASK, MASK_KEEP, HAS_DROPOUT, SOFTCAP, NATURAL, DOT_PREC,
                                       FUSE_SCALE)
    dq = (dq - (delta - shift)[:, None] * dq_corr) * scale
    dq_ptrs = (DQ + off_z * stride_dqz + off_h * stride_dqh + offs_m[:, None] * stride_dqm
               + offs_d[None, :] * stride_dqd)
    delta_ptrs = Delta + off_zh.to(tl.int64) * M + offs_m
    _store_tile(dq_ptrs, dq, offs_m[:, None], offs_d[None, :], M, D, EVEN_M, EVEN_D)
    if EVEN_M:
        tl.store(delta_ptrs, delta)
    else:
        tl.store(delta_ptrs, delta, mask=offs_m < M)


# ------------------------------------------------------------------------------------------------------ autotune
# Small spaces: a comprehension over tile shapes, then a prune that keeps the few that suit the head dim (registers
# for the fp32 accumulators, shared memory for the pipelined K/V tiles) and the length bucket.

def _bucket(n: int) -> int:
    """Shape bucket for the autotune key: short (<= 128), medium (<= 1024), long (<= 4096), very long."""
    return 0 if n <= 128 else 1 if n <= 1024 else 2 if n <= 4096 else 3


def _cfg(bm, bn, w, s):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)


def _arg(named_args, kwargs, name):
    return kwargs[name] if name in kwargs else named_args[name]


def _fp32_dots(named_args, kwargs) -> bool:
    """fp32 inputs take "ieee" dots, which Triton lowers to unrolled FMA loops rather than tensor-core MMAs. The
    code grows with the tile per thread: sm_90 compiles of the dk/dv kernel at d=256 took 242 s for 32x64 tiles on
    4 warps, 25 s on 8 warps and 6 s for 32x32 on 8 warps (ptxas on a 2-core machine; on the H100 the fp32 d=80
    test did not finish inside a run's time limit with the 16-bit spaces, which also overflow shared memory in
    fp32). Such launches get one small 8-warp tile per kernel."""
    return _arg(named_args, kwargs, "DOT_PREC") == "ieee"


def tma_block_hook(nargs):
    """Autotune pre-hook: a TMA descriptor's box is the tile of the config about to run."""
    if nargs.get("USE_TMA"):
        nargs["KDesc"].block_shape = [1, 1, nargs["BLOCK_N"], nargs["BLOCK_D"]]
        nargs["VDesc"].block_shape = [1, 1, nargs["BLOCK_N"], nargs["BLOCK_DV"]]


_FWD_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s, pre_hook=tma_block_hook)
                for bm in (64, 128) for bn in (32, 64, 128) for w in (4, 8) for s in (2, 3, 4)]


_FWD_FP32 = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=2, pre_hook=tma_block_hook)


def _prune_fwd(configs, named_args, **kwargs):
    d = max(_arg(named_args, kwargs, "BLOCK_D"), _arg(named_args, kwargs, "BLOCK_DV"))
    bucket = _arg(named_args, kwargs, "BUCKET_M")
    causal = _arg(named_args, kwargs, "IS_CAUSAL")
    # causal rows up to 4k: a 128-row block carries a 128 x 128 diagonal tile of mostly masked work, so 64-row
    # blocks are worth a try (H200: d=64 causal at 2k ran 1.28x flash with 128-row blocks, 1.33x at 4k)
    small_m = bucket == 0 or (bucket <= 2 and causal)
    if _fp32_dots(named_args, kwargs):
        return [_FWD_FP32]

    def keep(c):
        bm, bn, w, s = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages
        if bucket == 0 and bm == 128:
            return False
        if bm == 64 and not small_m and d < 256:
            return False
        if d <= 64:
            # 128 x 128 on 4 warps spills (Triton 3.6, sm_90a: 8 B a thread, 28 B before FUSE_SCALE; ptxas -v via
            # benchmarks/kernel_resources.py), on 8 warps it does not: both are timed
            return (bn in (64, 128) and w == 4 and s in (3, 4)) or (bm == 128 and bn == 128 and w == 8 and s == 3)
        if d <= 128:
            # short causal rows also try 64-row blocks on 4 warps (H200, d=128 causal: 0.55x flash at n=512 and
            # 0.73x at 1k with the 8-warp tiles alone)
            return ((bn in (64, 128) and w == 8 and s in (2, 3)) or (bm == 128 and bn == 64 and w == 8 and s == 4)
                    or (causal and bucket <= 1 and bm == 64 and bn in (64, 128) and w == 4 and s == 3))
        return bn in (32, 64) and w == 8 and s == 2
    return [c for c in configs if keep(c)] or [_cfg(64, 32, 4, 2)]


_DKDV_CONFIGS = [_cfg(bm, bn, w, s) for bm in (32, 64) for bn in (32, 64, 128) for w in (4, 8) for s in (2, 3, 4, 5)]

# Register spills steer the backward spaces (benchmarks/kernel_resources.py: ptxas -v on Triton 3.6's sm_90a code for
# a typical bf16 call, compiled on a CPU machine). The dk/dv kernel keeps two [BLOCK_N, D] fp32 accumulators and the
# dq kernel two [BLOCK_M, D]; spill stores per thread, d=128: dk/dv 64x128 w8 0 B (255 registers), 32x128 w4
# 1172 B, 32x128 w8 0, 64x64 w8 0; dq 128x64 w8 32-112 B, 64x64 w4 192 B, 64x64 w8 0, 128x32 w8 0. d=256: dk/dv
# 32x64 w8 0, 64x64 w8 116 B, 32x32 w8 0, 64x32 w8 0; dq 64x32 w8 0, 64x64 w8 324 B, 32x32 w8 0, 32x64 w8 0. The
# spill-free tiles are candidates next to the ones measured fastest on the H100.


def _prune_dkdv(configs, named_args, **kwargs):
    d = max(_arg(named_args, kwargs, "BLOCK_D"), _arg(named_args, kwargs, "BLOCK_DV"))
    if _fp32_dots(named_args, kwargs):
        return [_cfg(32, 64 if d <= 128 else 32, 8, 2)]

    def keep(c):
        bm, bn, w, s = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages
        if d <= 64:
            return bn == 128 and w == 4 and ((bm == 32 and s in (3, 5)) or (bm == 64 and s == 3))
        if d <= 128:
            return ((bn == 128 and ((w == 8 and bm == 64 and s in (2, 3)) or (w == 4 and bm == 32 and s == 3)))
                    or (w == 8 and s in (2, 3) and (bm, bn) in ((32, 128), (64, 64))))
        return w == 8 and ((bn == 64 and ((bm == 32 and s in (2, 3)) or (bm == 64 and s == 2)))
                           or (bn == 32 and bm in (32, 64) and s == 2))
    return [c for c in configs if keep(c)] or [_cfg(32, 64, 4, 2)]


_DQ_CONFIGS = [_cfg(bm, bn, w, s) for bm in (32, 64, 128) for bn in (32, 64, 128) for w in (4, 8)
               for s in (2, 3, 4, 5)]


def _prune_dq(configs, named_args, **kwargs):
    d = max(_arg(named_args, kwargs, "BLOCK_D"), _arg(named_args, kwargs, "BLOCK_DV"))
    if _fp32_dots(named_args, kwargs):
        return [_cfg(64, 32, 8, 2)]

    def keep(c):
        bm, bn, w, s = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages
        # two [BLOCK_M, BLOCK_D] fp32 accumulators (dq and its delta correction): every config keeps
        # BLOCK_M * BLOCK_D / threads at or below 64 registers each (one accumulator was allowed 128 before)
        if d <= 64:
            return ((bm == 128 and w == 4 and ((bn == 64 and s in (3, 4)) or (bn == 32 and s == 5)))
                    or (bm == 128 and bn == 64 and w == 8 and s == 3) or (bm == 64 and bn == 64 and w == 4 and s == 3))
        if d <= 128:
            return ((bm == 128 and bn == 64 and w == 8 and s in (2, 3))
                    or (bm == 64 and bn in (32, 64) and w == 4 and s == 3)
                    or (w == 8 and ((bm == 64 and bn == 64 and s in (2, 3)) or (bm == 128 and bn == 32 and s == 2))))
        return s == 2 and bm in (32, 64) and bn in (32, 64) and w == 8
    return [c for c in configs if keep(c)] or [_cfg(64, 32, 4, 2)]


def graph_bench(fn, quantiles=None):
    """The autotuners' timer: each config's launch captured in a CUDA graph and replayed
    (triton.testing.do_bench_cudagraph), so the host's launch overhead is not part of its time. Triton's default
    timer brackets every launch with events, and a launch through the autotuner's Python path costs the host tens
    of microseconds: a decode kernel of 5 to 30 us then measures the launcher, not the config, and the pick is noise
    (H200, one batch-1 decode shape and split count: 1.15x or 0.78x of SDPA's time depending on the tile the tuner
    happened to pick). Falls back to the default timer where a graph cannot be captured.

    do_bench_cudagraph runs on a stream of its own that does not wait for the caller's: kernels still queued there
    (the model's previous ops) could then run while the configs' launches write this call's outputs and
    workspace, whose memory the caching allocator may just have taken back from those kernels' temporaries (seen
    on the H200: the fp32 reference computed just before a first decode call came out wrong). Hence the
    synchronize first; autotuning happens once per key, and Triton's own timer synchronizes as well."""
    from triton.testing import do_bench, do_bench_cudagraph
    fn()  # compiles the config: a config that does not fit raises here, for the autotuner to record as such
    torch.cuda.synchronize()
    try:
        return do_bench_cudagraph(fn, rep=20, quantiles=quantiles)
    except Exception:  # noqa: BLE001  no capture possible here (e.g. inside another capture): time eagerly
        return do_bench(fn, quantiles=quantiles)


_KEY = ["BUCKET_M", "BUCKET_N", "BLOCK_D", "BLOCK_DV", "IS_CAUSAL", "HAS_BIAS", "HAS_MASK", "HAS_DROPOUT", "SOFTCAP",
        "DOT_PREC"]


def _autotuned(name, fn, configs, key, prune, **kw):
    """triton.autotune with the picks kept on disk (codegen/tune_cache.py)."""
    disk = tune_cache.DiskTuning(name, fn, key)
    tuner = triton.autotune(configs, key=key, do_bench=graph_bench,
                            prune_configs_by={"early_config_prune": disk.prune(prune)}, **kw)(fn)
    tuner.memattn_disk = disk
    tuner.memattn_key = tuple(key)
    tuner.memattn_picks = {}   # see launch_tuned
    return tuner


_attn_fwd_tuned = _autotuned("fwd", _attn_fwd, _FWD_CONFIGS, _KEY + ["USE_TMA", "WARP_SPEC", "CAUSAL_LOOP"],
                             _prune_fwd)
_attn_bwd_dkdv_tuned = _autotuned("dkdv", _attn_bwd_dkdv, _DKDV_CONFIGS, _KEY + ["HAS_DBIAS"], _prune_dkdv,
                                  reset_to_zero=["DBias"])
_attn_bwd_dq_tuned = _autotuned("dq", _attn_bwd_dq, _DQ_CONFIGS, _KEY, _prune_dq)

# name -> (autotuned kernel, its prune, its config space): one table for what inspects the spaces
# (benchmarks/prefill.py --configs, benchmarks/kernel_resources.py, the every-candidate GPU test)
AUTOTUNED = {"fwd": (_attn_fwd_tuned, _prune_fwd, _FWD_CONFIGS),
             "dq": (_attn_bwd_dq_tuned, _prune_dq, _DQ_CONFIGS),
             "dkdv": (_attn_bwd_dkdv_tuned, _prune_dkdv, _DKDV_CONFIGS)}

# Fixed tiles for the interpreter (autotuning there would only multiply the run time) and for tests that want
# tiny shapes to cross block boundaries.
_forced: dict | None = None
_INTERPRET_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}


@contextlib.contextmanager
def force_config(block_m: int = 16, block_n: int = 16, num_warps: int = 4, num_stages: int = 2):
    """Use one fixed tile shape for every kernel inside the block (no autotuning)."""
    global _forced
    old, _forced = _forced, {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": num_warps,
                             "num_stages": num_stages}
    launch.invalidate()   # plans made under another tile
    try:
        yield
    finally:
        _forced = old
        launch.invalidate()


def _fixed_config():
    if _forced is not None:
        return _forced
    if config.interpret():
        return _INTERPRET_BLOCKS
    return None


def launch_tuned(tuned, grid, args, kwargs):
    """Launch through an autotuner built by _autotuned, and keep a pick it tuned in this call on disk. Returns
    (the compiled kernel Triton launched, the config it ran with), which launch.Launch binds.

    A key's later launches skip the autotuner's own path, which rebuilds dicts of every argument and looks each
    name up in a list to make its key on every call: they launch the kernel with the pick this launcher
    remembers. Its key is the autotuner's (the key arguments' values and the tensor arguments' dtypes), and a
    pick is taken only while the autotuner still holds it, so clearing the autotuner's cache (as tests and
    tune_afresh do) re-tunes. (A call signature seen before does not come here at all: its launch is bound.)"""
    picks = tuned.memattn_picks
    try:
        key = (tuple(kwargs[name] for name in tuned.memattn_key),
               tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
    except KeyError:  # a key argument passed positionally: the autotuner's path
        key = None
    pick = picks.get(key) if key is not None else None
    if pick is not None and any(c is pick[0] for c in tuned.cache.values()):
        cfg, cfg_kwargs = pick
        if cfg.pre_hook is not None:
            cfg.pre_hook({**dict(zip(tuned.arg_names, args)), **kwargs, **cfg_kwargs})
        return tuned.fn[grid](*args, **kwargs, **cfg_kwargs), cfg
    kernel = tuned[grid](*args, **kwargs)
    tuned.memattn_disk.after_launch(tuned, args, kwargs)
    if key is not None and any(c is tuned.best_config for c in tuned.cache.values()):
        picks[key] = (tuned.best_config, tuned.best_config.all_kwargs())
    return kernel, tuned.best_config


def kernel_launch(tuned, grid, args: tuple, named: dict, n_tensors: int) -> launch.Launch:
    """The Launch of ``tuned`` (an autotuner of _autotuned) for a planned call: ``args`` are the kernel's
    positional arguments, its first ``n_tensors`` the call's tensors (given at each launch), and ``named`` the
    rest by name. Under a fixed tile (the interpreter, force_config) that tile is launched instead of the pick."""
    return launch.Launch(tuned, grid, args[n_tensors:], named, config=_fixed_config(), pre_hook=tma_block_hook,
                         tuned_launch=launch_tuned, bindable=not config.interpret())


# TMA (Hopper and later): the forward kernels' K/V tiles are copied by the tensor memory accelerator through a
# descriptor of the whole [Z, Hkv, N, D] tensor instead of pointer loads; rows past N and dims past D read as 0,
# exactly what the masked loads give. MEMATTN_TMA=0 turns it off, =1 turns it on wherever the layout allows (the
# interpreter included, which is how CPU tests reach it); the default is on for compute capability >= 9.
_tma_failed = False


def _tma_wanted(device) -> bool:
    mode = config.read("MEMATTN_TMA")
    if TensorDescriptor is None or mode == "0" or _tma_failed:
        return False
    if config.interpret():
        return mode == "1"
    return hopper_or_later(device)


def hopper_or_later(device) -> bool:
    """A CUDA device of compute capability 9 or more (TMA, programmatic dependent launch)."""
    return device.type == "cuda" and device_properties(device).major >= 9


def device_properties(device):
    """A CUDA device's properties (compute capability, SM count), asked of torch once per device: its query costs
    microseconds, and the launches ask on every call."""
    return _properties(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _properties(index: int):
    return torch.cuda.get_device_properties(index)


def _warp_spec_wanted() -> bool:
    """Warp specialisation of the forward's K/V loop (Triton's ``tl.range(warp_specialize=True)``: producer warps
    issue the TMA copies, consumer warps do the math), with TMA only. An experiment, off unless MEMATTN_WS=1: with
    Triton 3.6 on the H200 (sm_90) the kernel does not compile ("PassManager::run failed"; the launch then falls
    back to pointer loads without it, as any TMA failure does). Kept so that a later Triton can be measured with
    one variable (benchmarks/prefill.py) before it becomes a default or an autotune choice."""
    return config.read("MEMATTN_WS") == "1"


_CAUSAL_LOOPS = {"split": 0, "one": 1}


def _causal_loop(block_d: int) -> int:
    """CAUSAL_LOOP (see the header): how the causal forward walks its K/V tiles. MEMATTN_CAUSAL_LOOP names one;
    unset, one loop for padded head dims of 128 and two otherwise, as timed on the H200 (Triton 3.6, bf16, causal
    forward, autotuned, benchmarks/prefill.py): d = 128 one loop 0.65 ms vs two 0.70 at 2k (1.46x flash vs
    1.34x), 1.52x vs 1.40x at 4k; d = 64 level at 2k (1.31x / 1.30x) and behind at 4k (1.30x vs 1.35x). (A third
    walk, the masked tiles first, was within 2% of two loops everywhere and was dropped.) d = 256: level (the
    kernel alone, CUDA-graph timer: 1.286 vs 1.294 ms at 2k, 4.285 vs 4.302 ms at 8k), so it keeps two loops."""
    name = config.read("MEMATTN_CAUSAL_LOOP")   # ValueError naming the loops for another name
    return _CAUSAL_LOOPS[name or ("one" if block_d == 128 else "split")]


def _tma_desc(t):
    """A 4-D descriptor of ``t`` (box set later, per config), or None when TMA cannot address it: the last dim
    must be contiguous and the base and every other stride 16-byte aligned (a size-1 dim's stride is never
    stepped, so an unaligned one is replaced)."""
    elt = t.element_size()
    if t.dim() != 4 or t.stride(-1) != 1 or t.data_ptr() % 16:
        return None
    strides = []
    for size, st in zip(t.shape[:-1], t.stride()[:-1]):
        if size == 1 and (st <= 0 or st * elt % 16):
            st = 16 // elt
        if st <= 0 or st * elt % 16:
            return None
        strides.append(st)
    return TensorDescriptor(t, list(t.shape), strides + [1], [1, 1, 16, 16])


def tma_descs(k, v):
    """(k descriptor, v descriptor, True), or (k, v, False) when TMA is off or either layout rules it out."""
    if _tma_wanted(k.device) and min(k.shape) > 0:
        kd, vd = _tma_desc(k), _tma_desc(v)
        if kd is not None and vd is not None:
            return kd, vd, True
    return k, v, False


# ------------------------------------------------------------------------------------------------------- host side


def next_pow2(n: int) -> int:
    """The least power of two >= n (n >= 1), in plain Python: Triton's next_power_of_2 is a constexpr function
    whose host calls cost microseconds each, on every launch."""
    return 1 << (n - 1).bit_length()


def _pow2(n: int) -> int:
    return max(16, next_pow2(n))


def _as4(t, shape):
    """Broadcast view of a bias/mask (any broadcastable shape) as 4-D: broadcast dims get stride 0, no copy."""
    return t.expand(shape)


def supports(*args):
    """(ok, reason). Takes the positional arguments of ``forward`` (7) or ``backward`` (11)."""
    if len(args) == 7:
        q, k, v, bias, mask, seed, spec = args
        bias_grad = False
    elif len(args) == 11:
        _dout, q, k, v, _out, _stats, bias, mask, seed, spec, bias_grad = args
    else:
        return False, f"triton_prefill.supports takes 7 or 11 arguments, got {len(args)}"
    if not (q.is_cuda or config.interpret()):
        return False, "tensors are not on a CUDA device (and TRITON_INTERPRET is not set)"
    if q.dtype not in _DTYPES:
        return False, f"unsupported dtype {q.dtype} (fp16, bf16, fp32 only)"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return False, f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return False, "q, k, v must be 4-D"
    if q.shape[3] > _MAX_HEAD_DIM or v.shape[3] > _MAX_HEAD_DIM:
        return False, f"unsupported head dim {q.shape[3]}/{v.shape[3]} (at most {_MAX_HEAD_DIM})"
    if q.shape[1] % k.shape[1]:
        return False, "query heads are not a multiple of kv heads"
    if q.shape[0] * q.shape[1] > _MAX_GRID_Y:
        return False, f"batch * heads = {q.shape[0] * q.shape[1]} exceeds the grid limit {_MAX_GRID_Y}"
    devs = {t.device for t in (q, k, v, bias, mask) if t is not None}
    if len(devs) > 1:
        return False, f"tensors on several devices {sorted(map(str, devs))}"
    if bias is not None and bias.dtype not in _DTYPES:
        return False, f"unsupported bias dtype {bias.dtype}"
    if mask is not None and mask.dtype != torch.bool:
        return False, f"mask must be bool, got {mask.dtype}"
    if abs(spec.causal_offset) >= 2 ** 31 - 2 ** 20:
        return False, "causal_offset does not fit int32"
    if bias_grad and bias is None:
        return False, "bias_grad without a bias"
    return True, ""


def _dot_precision(dtype) -> str:
    if dtype == torch.float32:
        return "ieee"
    if dtype == torch.bfloat16 and config.interpret():
        return "upcast"
    return "tf32"


def _common(q, k, v, bias, mask, seed, spec: Spec):
    z, h, m, d = q.shape
    hkv, n, dv = k.shape[1], k.shape[2], v.shape[3]
    full = (z, h, m, n)
    dummy = q.new_empty(1)
    if bias is not None:
        b4 = _as4(bias, full)
        b_strides = b4.stride()
    else:
        b4, b_strides = dummy, (0, 0, 0, 0)
    if mask is not None:
        m4 = _as4(mask, full).view(torch.uint8)
        m_strides = m4.stride()
    else:
        m4, m_strides = dummy, (0, 0, 0, 0)
    has_drop = spec.dropout_p > 0
    if has_drop:
        sd = seed if seed is not None else torch.zeros((), dtype=torch.int64)
        sd = sd.reshape(1).to(device=q.device, dtype=torch.int64)
    else:
        sd = dummy
    softcap = spec.softcap != 0  # even in softcap: a negative cap is the same function as its absolute value
    natural = bias is not None or mask is not None
    unit = 1.0 if natural else LOG2E  # scores in natural units or with log2(e) folded in
    scal = dict(
        qk_scale=spec.scale * unit,
        softcap_in=(spec.scale / spec.softcap) if softcap else 0.0,
        softcap_out=(spec.softcap * unit) if softcap else 0.0,
        fill2=spec.mask_fill * unit,
        causal_offset=int(spec.causal_offset),
        dropout_p=float(spec.dropout_p),
        inv_keep=(1.0 / (1.0 - spec.dropout_p)) if has_drop else 1.0,
    )
    flags = dict(
        BLOCK_D=_pow2(d), BLOCK_DV=_pow2(dv), EVEN_D=_pow2(d) == d, EVEN_DV=_pow2(dv) == dv,
        IS_CAUSAL=bool(spec.causal), HAS_BIAS=bias is not None, HAS_MASK=mask is not None,
        MASK_KEEP=bool(spec.mask_keep), HAS_DROPOUT=has_drop, SOFTCAP=softcap,
        SAFE_SOFTMAX=bool(spec.safe_softmax), NATURAL=natural, DOT_PREC=_dot_precision(q.dtype),
    )
    return dict(z=z, h=h, m=m, n=n, d=d, hkv=hkv, dv=dv, b4=b4, b_strides=b_strides, m4=m4, m_strides=m_strides,
                seed=sd, scal=scal, flags=flags)


def _fuse_scale(c) -> bool:
    """The kernels' plain-score path (FUSE_SCALE, forward and backward): no bias, mask or softcap (so scores stay
    in the log2 domain), and a positive scale (a negative one would turn the forward's row max of qk into the min
    of the scores, and the -inf of a masked key into +inf)."""
    f = c["flags"]
    return not (f["HAS_BIAS"] or f["HAS_MASK"] or f["SOFTCAP"]) and c["scal"]["qk_scale"] > 0


def _even(c, bm, bn):
    return dict(EVEN_M=c["m"] % bm == 0, EVEN_N=c["n"] % bn == 0)


def _even_all(c, fixed):
    if fixed is not None:
        return _even(c, fixed["BLOCK_M"], fixed["BLOCK_N"])
    return dict(EVEN_M=c["m"] % 128 == 0, EVEN_N=c["n"] % 128 == 0)


def _seed_arg(seed, device):
    """The dropout seed as the kernels read it: a one-element int64 tensor on the device."""
    sd = seed if seed is not None else torch.zeros((), dtype=torch.int64)
    if sd.device != device or sd.dtype != torch.int64 or sd.dim() != 1:
        sd = sd.reshape(1).to(device=device, dtype=torch.int64)
    return sd


def _desc_like(template, base):
    """``template`` (a TensorDescriptor planned for this call signature) over ``base``: the checks its constructor
    makes were made when the plan was (the signature fixes shape, strides and alignment)."""
    d = object.__new__(type(template))
    d.__dict__.update(template.__dict__)
    d.base = base
    return d


def tma_failure(e: Exception) -> None:
    """A TMA launch failed to compile or encode: warn once, use pointer loads for the rest of the process, and drop
    every plan (the pointer-load kernels compute the same)."""
    global _tma_failed
    _tma_failed = True
    launch.invalidate()
    warnings.warn(f"memattn: the TMA variant of the attention kernels failed ({type(e).__name__}: {e}); "
                  "using pointer loads from now on", RuntimeWarning, stacklevel=4)


class _Empty:
    """The plan of a call with nothing to compute: no query rows or heads (empty outputs), or no keys (eager's
    p @ v sums nothing: zeros, and row max -inf)."""

    def __init__(self, out_shape, out_strides, stats_shape, dtype, device, no_keys: bool):
        self.out_shape, self.out_strides, self.stats_shape = out_shape, out_strides, stats_shape
        self.dtype, self.device, self.no_keys = dtype, device, no_keys

    def __call__(self, *_tensors):
        out = torch.empty_strided(self.out_shape, self.out_strides, dtype=self.dtype, device=self.device)
        stats = torch.empty(self.stats_shape, dtype=torch.float32, device=self.device)
        if self.no_keys:
            return out.zero_(), stats.fill_(float("-inf"))
        return out, stats


class _Forward:
    """A planned prefill forward: allocates out and stats and launches _attn_fwd (see plan_forward)."""

    __slots__ = ("launch", "spec", "out_shape", "out_strides", "stats_shape", "dtype", "device", "dummy",
                 "has_drop", "tma")

    def __call__(self, q, k, v, bias, mask, seed):
        out = torch.empty_strided(self.out_shape, self.out_strides, dtype=self.dtype, device=self.device)
        stats = torch.empty(self.stats_shape, dtype=torch.float32, device=self.device)
        d = self.dummy
        b = d if bias is None else bias                 # the kernel reads bias and mask through their planned
        mk = d if mask is None else mask.view(torch.uint8)   # strides: a broadcast view needs no expand
        sd = _seed_arg(seed, self.device) if self.has_drop else d
        if self.tma is None:
            self.launch(q, k, v, b, mk, sd, out, stats, k, v)
            return out, stats
        try:
            self.launch(q, k, v, b, mk, sd, out, stats, _desc_like(self.tma[0], k), _desc_like(self.tma[1], v))
        except Exception as e:  # noqa: BLE001 - a TMA compile/encode failure: the pointer-load plan computes the same
            tma_failure(e)
            return plan_forward(q, k, v, bias, mask, seed, self.spec)(q, k, v, bias, mask, seed)
        return out, stats


def plan_forward(q, k, v, bias, mask, seed, spec: Spec):
    """The prefill forward of one call signature, as a callable (q, k, v, bias, mask, seed) -> (out [Z, H, M, Dv]
    in v.dtype and spec.out_layout, stats [2, Z, H, M] fp32: row max, log row sum). Everything but the tensors
    is decided here, once: the kernel's flags, scalars and strides, TMA, the launch (bound after its first run)."""
    c = _common(q, k, v, bias, mask, seed, spec)
    z, h, m, n = c["z"], c["h"], c["m"], c["n"]
    out_shape, out_strides = (z, h, m, c["dv"]), reference.out_strides(z, h, m, c["dv"], spec.out_layout)
    stats_shape = (2, z, h, m)
    if m == 0 or z * h == 0 or n == 0:
        return _Empty(out_shape, out_strides, stats_shape, v.dtype, q.device, no_keys=m > 0 and z * h > 0)
    fixed = _fixed_config()
    kd, vd, use_tma = tma_descs(k, v)
    named = dict(**c["scal"], BUCKET_M=_bucket(m), BUCKET_N=_bucket(n), **c["flags"], **_even_all(c, fixed),
                 FUSE_SCALE=_fuse_scale(c),
                 CAUSAL_LOOP=_causal_loop(max(c["flags"]["BLOCK_D"], c["flags"]["BLOCK_DV"])) if spec.causal else 0,
                 USE_TMA=use_tma, WARP_SPEC=use_tma and _warp_spec_wanted())

    def grid(meta):
        return (-(-m // meta["BLOCK_M"]), z * h)
    args = (q, k, v, c["b4"], c["m4"], c["seed"], None, None, kd, vd,
            *q.stride(), *k.stride(), *v.stride(), *c["b_strides"], *c["m_strides"], *out_strides,
            h, m, n, c["d"], c["dv"], h // c["hkv"], z * h * m)
    plan = _Forward()
    plan.launch = kernel_launch(_attn_fwd_tuned, grid, args, named, n_tensors=10)
    plan.spec, plan.out_shape, plan.out_strides, plan.stats_shape = spec, out_shape, out_strides, stats_shape
    plan.dtype, plan.device, plan.dummy = v.dtype, q.device, q.new_empty(1)
    plan.has_drop = c["flags"]["HAS_DROPOUT"]
    plan.tma = (kd, vd) if use_tma else None
    return plan


def forward(q, k, v, bias, mask, seed, spec: Spec):
    """One forward call, planned afresh (dispatch.py keeps plans by call signature); returns (out, stats)."""
    return plan_forward(q, k, v, bias, mask, seed, spec)(q, k, v, bias, mask, seed)


class _Backward:
    """A planned prefill backward: allocates the gradients and launches _attn_bwd_dq, then _attn_bwd_dkdv (see
    plan_backward)."""

    __slots__ = ("dq_launch", "dkdv_launch", "q_shape", "k_shape", "v_shape", "delta_shape", "dtype", "device",
                 "dummy", "has_drop", "bias_grad", "bias_shape", "bias_dtype", "stats32")

    def __call__(self, dout, q, k, v, out, stats, bias, mask, seed):
        dev = self.device
        dq = torch.empty(self.q_shape, dtype=self.dtype, device=dev)
        dk = torch.empty(self.k_shape, dtype=self.dtype, device=dev)
        dv = torch.empty(self.v_shape, dtype=self.dtype, device=dev)
        delta = torch.empty(self.delta_shape, dtype=torch.float32, device=dev)
        d = self.dummy
        b = d if bias is None else bias
        mk = d if mask is None else mask.view(torch.uint8)
        sd = _seed_arg(seed, dev) if self.has_drop else d
        if self.stats32:
            stats = stats.to(torch.float32).contiguous()
        # dq first: it sums the exact delta that the dk/dv kernel's ds (and dbias) needs (see the header)
        self.dq_launch(q, k, v, b, mk, sd, dout, out, stats, delta, dq)
        if self.bias_grad:
            dbias32 = torch.zeros(self.bias_shape, dtype=torch.float32, device=dev)
            self.dkdv_launch(q, k, v, b, mk, sd, dout, stats, delta, dk, dv, dbias32)
            return dq, dk, dv, dbias32.to(self.bias_dtype)
        self.dkdv_launch(q, k, v, b, mk, sd, dout, stats, delta, dk, dv, d)
        return dq, dk, dv, None


class _EmptyBackward:
    """No rows, keys or heads: the gradients are zeros (and dbias too, when asked for)."""

    def __init__(self, bias_grad: bool):
        self.bias_grad = bias_grad

    def __call__(self, dout, q, k, v, out, stats, bias, mask, seed):
        dbias = torch.zeros(bias.shape, dtype=bias.dtype, device=q.device) if self.bias_grad else None
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dbias


def plan_backward(dout, q, k, v, out, stats, bias, mask, seed, spec: Spec, bias_grad: bool):
    """The backward of one call signature, as a callable (dout, q, k, v, out, stats, bias, mask, seed) ->
    (dq, dk, dv, dbias or None), recomputing the probabilities blockwise from the stats."""
    c = _common(q, k, v, bias, mask, seed, spec)
    z, h, m, n, hkv = c["z"], c["h"], c["m"], c["n"], c["hkv"]
    if m == 0 or n == 0 or z * h == 0:
        return _EmptyBackward(bias_grad)
    fixed = _fixed_config()
    stats32 = stats.dtype != torch.float32 or not stats.is_contiguous()   # the kernels read it contiguous
    named = dict(**c["scal"], scale=float(spec.scale), BUCKET_M=_bucket(m), BUCKET_N=_bucket(n),
                 **c["flags"], **_even_all(c, fixed), FUSE_SCALE=_fuse_scale(c))
    dq_strides, dk_strides, dv_strides = (_contiguous_strides(t.shape) for t in (q, k, v))
    dq_args = (q, k, v, c["b4"], c["m4"], c["seed"], dout, out, stats, None, None,
               *q.stride(), *k.stride(), *v.stride(), *c["b_strides"], *c["m_strides"], *dout.stride(),
               *out.stride(), *dq_strides, h, m, n, c["d"], c["dv"], h // hkv, z * h * m)

    def grid_q(meta):
        return (-(-m // meta["BLOCK_M"]), z * h)

    if bias_grad:
        db_strides = torch.empty(bias.shape, device="meta").expand(z, h, m, n).stride()  # dbias32's, broadcast
        db_sum = dict(HAS_DBIAS=True, DB_SUM_M=db_strides[2] == 0 and m > 1, DB_SUM_N=db_strides[3] == 0 and n > 1)
    else:
        db_strides = (0, 0, 0, 0)
        db_sum = dict(HAS_DBIAS=False, DB_SUM_M=False, DB_SUM_N=False)
    dkdv_args = (q, k, v, c["b4"], c["m4"], c["seed"], dout, stats, None, None, None, None,
                 *q.stride(), *k.stride(), *v.stride(), *c["b_strides"], *c["m_strides"], *dout.stride(),
                 *dk_strides, *dv_strides, *db_strides,
                 h, hkv, m, n, c["d"], c["dv"], h // hkv, z * h * m)

    def grid_kv(meta):
        return (-(-n // meta["BLOCK_N"]), z * hkv)
    plan = _Backward()
    plan.dq_launch = kernel_launch(_attn_bwd_dq_tuned, grid_q, dq_args, named, n_tensors=11)
    plan.dkdv_launch = kernel_launch(_attn_bwd_dkdv_tuned, grid_kv, dkdv_args, dict(**named, **db_sum),
                                     n_tensors=12)
    plan.q_shape, plan.k_shape, plan.v_shape, plan.delta_shape = q.shape, k.shape, v.shape, (z, h, m)
    plan.dtype, plan.device, plan.dummy = q.dtype, q.device, q.new_empty(1)
    plan.has_drop, plan.bias_grad, plan.stats32 = c["flags"]["HAS_DROPOUT"], bias_grad, stats32
    plan.bias_shape = bias.shape if bias is not None else None
    plan.bias_dtype = bias.dtype if bias is not None else None
    return plan


def _contiguous_strides(shape) -> tuple:
    strides, acc = [], 1
    for size in reversed(shape):
        strides.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(strides))


def backward(dout, q, k, v, out, stats, bias, mask, seed, spec: Spec, bias_grad: bool):
    """One backward call, planned afresh (dispatch.py keeps plans by call signature): (dq, dk, dv, dbias or
    None)."""
    return plan_backward(dout, q, k, v, out, stats, bias, mask, seed, spec, bias_grad)(dout, q, k, v, out, stats,
                                                                                      bias, mask, seed)
