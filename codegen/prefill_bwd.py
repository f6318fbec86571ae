"""The prefill backward kernels, which recompute the probabilities blockwise from the forward's stats:

    attn_bwd_dq      one program per (query block, z*h): loops over key blocks, recomputes p, accumulates dq and
                     delta_i = sum_j p_ij dp_ij exactly in fp32; writes dq and delta [Z, H, M] fp32
    attn_bwd_dkdv    one program per (key block, z*hkv): loops over the GQA group's query heads and their query
                     blocks, recomputes p^T from stats, ds with the dq kernel's delta, accumulates dk, dv in fp32
                     (no atomics: the group is summed inside the program); adds ds into dbias with fp32 atomics
                     when the bias needs a gradient

The dq kernel runs first. Why delta is summed there rather than taken as FA2's rowsum(dO * O): O is rounded to the
input dtype, and when p is nearly one-hot ds = p (dp - delta) cancels, leaving that rounding (bf16: 2**-9 |dO.O|)
in dq, dk and dbias, ~20x eager's error. The exact delta is only known after the key loop, so the dq kernel
accumulates around the shift d0 = rowsum(dO * O), which it can compute up front (o and dO are one
[BLOCK_M, BLOCK_DV] load each):
    dq_i = scale * (sum_j w_ij (dp_ij - d0_i) k_j - (delta_i - d0_i) * sum_j w_ij k_j),  w = p * keep * (1 - t^2)
(keep: the mask, t: the softcap tanh). d0 is delta up to rounding, so w (dp - d0) has the size of ds and can be
rounded to the input dtype for tl.dot like ds always was; (delta - d0) is tiny, so the second dot needs no more
precision either. The cost: one more [BLOCK_M, BLOCK_D] fp32 accumulator and one more dot per tile in the dq kernel.

Flags: the table in tiles.py. Host side: triton_prefill.py.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import autotune
from .tiles import apply_mask, dot, drop_scale, load_tile, plain_prob, prob, row_hash, row_stats, scores, store_tile


@triton.jit
def dkdv_loop(dk, dv, k, v, q_base, do_base, Stats, zh_m, ZHM, delta_base, bias_base, mask_base, dbias_base, seed,
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
        qt = load_tile(qt_ptrs, rows, offs_d[:, None], M, D, EVEN_R=EVEN_M, EVEN_C=EVEN_D)
        do = load_tile(do_ptrs, offs_m[:, None], offs_dv[None, :], M, DV, EVEN_R=EVEN_M, EVEN_C=EVEN_DV)
        # rows past M: p = 0, so they add nothing (and nothing to dbias sums)
        mrow, lrow = row_stats(Stats, zh_m, ZHM, offs_m, M, EVEN_M=EVEN_M, NATURAL=NATURAL, SAFE_SOFTMAX=SAFE_SOFTMAX)
        if EVEN_M:
            delta = tl.load(delta_base + offs_m)
        else:
            delta = tl.load(delta_base + offs_m, mask=offs_m < M, other=0.0)
        qkt = dot(k, qt, None, DOT_PREC=DOT_PREC)
        if FUSE_SCALE:
            pt = plain_prob(qkt, rows, cols, N, qk_scale, causal_offset, mrow[None, :], APPLY_CAUSAL=APPLY_CAUSAL,
                            EVEN_N=EVEN_N)
            tt = pt  # no softcap: unused
        else:
            st, tt = scores(qkt, rows, cols, bias_base, mask_base, stride_bm, stride_bn, stride_mm, stride_mn, M, N,
                            qk_scale, softcap_in, softcap_out, fill2, causal_offset, HAS_BIAS=HAS_BIAS,
                            HAS_MASK=HAS_MASK, MASK_KEEP=MASK_KEEP, SOFTCAP=SOFTCAP, APPLY_CAUSAL=APPLY_CAUSAL,
                            EVEN_M=EVEN_M, EVEN_N=EVEN_N)
            pt = prob(st, mrow[None, :], lrow[None, :], NATURAL=NATURAL)
        if HAS_DROPOUT:
            drop = drop_scale(row_hash(seed, off_zh, offs_m)[None, :], col_mul, dropout_p, inv_keep)
            dv = dot((pt * drop).to(do.dtype), do, dv, DOT_PREC=DOT_PREC)
        else:
            dv = dot(pt.to(do.dtype), do, dv, DOT_PREC=DOT_PREC)
        dpt = dot(v, tl.trans(do), None, DOT_PREC=DOT_PREC)
        if HAS_DROPOUT:
            dpt = dpt * drop
        dst = pt * (dpt - delta[None, :])
        if HAS_MASK:  # filled positions are constants: no gradient flows through them
            dst = apply_mask(dst, mask_base, rows, cols, stride_mm, stride_mn, M, N, 0.0, MASK_KEEP=MASK_KEEP,
                             EVEN_M=EVEN_M, EVEN_N=EVEN_N)
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
        dk = dot(dst.to(qt.dtype), tl.trans(qt), dk, DOT_PREC=DOT_PREC)
    return dk, dv


@triton.jit
def attn_bwd_dkdv(Q, K, V, Bias, Mask, Seed, DO, Stats, Delta, DK, DV_, DBias,
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
    k = load_tile(k_ptrs, offs_n[:, None], offs_d[None, :], N, D, EVEN_R=EVEN_N, EVEN_C=EVEN_D)
    v = load_tile(v_ptrs, offs_n[:, None], offs_dv[None, :], N, DV, EVEN_R=EVEN_N, EVEN_C=EVEN_DV)
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
            dk, dv = dkdv_loop(dk, dv, k, v, q_base, do_base, Stats, zh_m, ZHM, delta_base, bias_base, mask_base,
                               dbias_base, seed, off_zh, col_mul, offs_n, offs_m0, offs_d, offs_dv, lo, mid, stride_qm,
                               stride_qd, stride_dom, stride_dod, stride_bm, stride_bn, stride_mm, stride_mn,
                               stride_dbm, stride_dbn, M, N, D, DV, qk_scale, softcap_in, softcap_out, fill2,
                               causal_offset, dropout_p, inv_keep, scale, BLOCK_M=BLOCK_M, EVEN_M=EVEN_M, EVEN_N=EVEN_N,
                               EVEN_D=EVEN_D, EVEN_DV=EVEN_DV, APPLY_CAUSAL=True, HAS_BIAS=HAS_BIAS, HAS_MASK=HAS_MASK,
                               MASK_KEEP=MASK_KEEP, HAS_DROPOUT=HAS_DROPOUT, SOFTCAP=SOFTCAP, SAFE_SOFTMAX=SAFE_SOFTMAX,
                               HAS_DBIAS=HAS_DBIAS, DB_SUM_M=DB_SUM_M, DB_SUM_N=DB_SUM_N, NATURAL=NATURAL,
                               DOT_PREC=DOT_PREC, FUSE_SCALE=FUSE_SCALE)
        dk, dv = dkdv_loop(dk, dv, k, v, q_base, do_base, Stats, zh_m, ZHM, delta_base, bias_base, mask_base,
                           dbias_base, seed, off_zh, col_mul, offs_n, offs_m0, offs_d, offs_dv, mid, M, stride_qm,
                           stride_qd, stride_dom, stride_dod, stride_bm, stride_bn, stride_mm, stride_mn, stride_dbm,
                           stride_dbn, M, N, D, DV, qk_scale, softcap_in, softcap_out, fill2, causal_offset, dropout_p,
                           inv_keep, scale, BLOCK_M=BLOCK_M, EVEN_M=EVEN_M, EVEN_N=EVEN_N, EVEN_D=EVEN_D,
                           EVEN_DV=EVEN_DV, APPLY_CAUSAL=False, HAS_BIAS=HAS_BIAS, HAS_MASK=HAS_MASK,
                           MASK_KEEP=MASK_KEEP, HAS_DROPOUT=HAS_DROPOUT, SOFTCAP=SOFTCAP, SAFE_SOFTMAX=SAFE_SOFTMAX,
                           HAS_DBIAS=HAS_DBIAS, DB_SUM_M=DB_SUM_M, DB_SUM_N=DB_SUM_N, NATURAL=NATURAL,
                           DOT_PREC=DOT_PREC, FUSE_SCALE=FUSE_SCALE)
    dk_ptrs = (DK + off_z * stride_dkz + off_hk * stride_dkh + offs_n[:, None] * stride_dkn
               + offs_d[None, :] * stride_dkd)
    dv_ptrs = (DV_ + off_z * stride_dvz + off_hk * stride_dvh + offs_n[:, None] * stride_dvn
               + offs_dv[None, :] * stride_dvd)
    store_tile(dk_ptrs, dk, offs_n[:, None], offs_d[None, :], N, D, EVEN_R=EVEN_N, EVEN_C=EVEN_D)
    store_tile(dv_ptrs, dv, offs_n[:, None], offs_dv[None, :], N, DV, EVEN_R=EVEN_N, EVEN_C=EVEN_DV)


@triton.jit
def dq_loop(dq, dq_corr, delta, q, do, mrow, lrow, shift, k_base, v_base, bias_base, mask_base, rh, offs_m,
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
        kt = load_tile(kt_ptrs, offs_d[:, None], cols, D, N, EVEN_R=EVEN_D, EVEN_C=EVEN_N)
        vt = load_tile(vt_ptrs, offs_dv[:, None], cols, DV, N, EVEN_R=EVEN_DV, EVEN_C=EVEN_N)
        qk = dot(q, kt, None, DOT_PREC=DOT_PREC)
        if FUSE_SCALE:
            p = plain_prob(qk, rows, cols, N, qk_scale, causal_offset, mrow[:, None], APPLY_CAUSAL=APPLY_CAUSAL,
                           EVEN_N=EVEN_N)
            t = p  # no softcap: unused
        else:
            s, t = scores(qk, rows, cols, bias_base, mask_base, stride_bm, stride_bn, stride_mm, stride_mn, M, N,
                          qk_scale, softcap_in, softcap_out, fill2, causal_offset, HAS_BIAS=HAS_BIAS, HAS_MASK=HAS_MASK,
                          MASK_KEEP=MASK_KEEP, SOFTCAP=SOFTCAP, APPLY_CAUSAL=APPLY_CAUSAL, EVEN_M=EVEN_M, EVEN_N=EVEN_N)
            p = prob(s, mrow[:, None], lrow[:, None], NATURAL=NATURAL)
        dp = dot(do, vt, None, DOT_PREC=DOT_PREC)
        if HAS_DROPOUT:
            dp = dp * drop_scale(rh[:, None], (cols_1d.to(tl.uint32) * 0x9E3779B1)[None, :], dropout_p, inv_keep)
        delta += tl.sum(p * dp, 1)
        w = p  # the weight of k_j in dq (see the header): p, 0 where the mask fills, times the softcap derivative
        if HAS_MASK:
            w = apply_mask(w, mask_base, rows, cols, stride_mm, stride_mn, M, N, 0.0, MASK_KEEP=MASK_KEEP,
                           EVEN_M=EVEN_M, EVEN_N=EVEN_N)
        if SOFTCAP:
            w = w * (1.0 - t * t)
        dq = dot((w * (dp - shift[:, None])).to(kt.dtype), tl.trans(kt), dq, DOT_PREC=DOT_PREC)
        dq_corr = dot(w.to(kt.dtype), tl.trans(kt), dq_corr, DOT_PREC=DOT_PREC)
    return dq, dq_corr, delta


@triton.jit
def attn_bwd_dq(Q, K, V, Bias, Mask, Seed, DO, Out, Stats, Delta, DQ,
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
    q = load_tile(q_ptrs, offs_m[:, None], offs_d[None, :], M, D, EVEN_R=EVEN_M, EVEN_C=EVEN_D)
    do = load_tile(do_ptrs, offs_m[:, None], offs_dv[None, :], M, DV, EVEN_R=EVEN_M, EVEN_C=EVEN_DV)
    o = load_tile(o_ptrs, offs_m[:, None], offs_dv[None, :], M, DV, EVEN_R=EVEN_M, EVEN_C=EVEN_DV)
    shift = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # d0 = rowsum(dO * O): delta up to O's rounding
    mrow, lrow = row_stats(Stats, off_zh.to(tl.int64) * M, ZHM, offs_m, M, EVEN_M=EVEN_M, NATURAL=NATURAL,
                           SAFE_SOFTMAX=SAFE_SOFTMAX)
    k_base = K + off_z * stride_kz + off_hk * stride_kh
    v_base = V + off_z * stride_vz + off_hk * stride_vh
    bias_base = Bias + off_z * stride_bz + off_h * stride_bh
    mask_base = Mask + off_z * stride_mz + off_h * stride_mh
    if HAS_DROPOUT:
        seed = (tl.load(Seed) & 0xFFFFFFFF).to(tl.uint32)
        rh = row_hash(seed, off_zh, offs_m)
    else:
        rh = offs_m
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # sum_j w (dp - d0) k_j
    dq_corr = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # sum_j w k_j
    delta = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum_j p dp
    if IS_CAUSAL:
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + causal_offset, 0), N)
        lo_mask = tl.minimum(tl.maximum(start_m + causal_offset + 1, 0) // BLOCK_N * BLOCK_N, hi)
    else:  # every key is allowed for every row
        hi = N
        lo_mask = N
    dq, dq_corr, delta = dq_loop(dq, dq_corr, delta, q, do, mrow, lrow, shift, k_base, v_base, bias_base, mask_base,
                                 rh, offs_m, offs_n, offs_d, offs_dv, 0, lo_mask, stride_kn, stride_kd, stride_vn,
                                 stride_vd, stride_bm, stride_bn, stride_mm, stride_mn, M, N, D, DV, qk_scale,
                                 softcap_in, softcap_out, fill2, causal_offset, dropout_p, inv_keep,
                                 BLOCK_N=BLOCK_N, EVEN_M=EVEN_M, EVEN_N=EVEN_N, EVEN_D=EVEN_D, EVEN_DV=EVEN_DV,
                                 APPLY_CAUSAL=False, HAS_BIAS=HAS_BIAS, HAS_MASK=HAS_MASK, MASK_KEEP=MASK_KEEP,
                                 HAS_DROPOUT=HAS_DROPOUT, SOFTCAP=SOFTCAP, NATURAL=NATURAL, DOT_PREC=DOT_PREC,
                                 FUSE_SCALE=FUSE_SCALE)
    if IS_CAUSAL:  # the diagonal tiles, under the causal mask
        dq, dq_corr, delta = dq_loop(dq, dq_corr, delta, q, do, mrow, lrow, shift, k_base, v_base, bias_base, mask_base,
                                     rh, offs_m, offs_n, offs_d, offs_dv, lo_mask, hi, stride_kn, stride_kd, stride_vn,
                                     stride_vd, stride_bm, stride_bn, stride_mm, stride_mn, M, N, D, DV, qk_scale,
                                     softcap_in, softcap_out, fill2, causal_offset, dropout_p, inv_keep,
                                     BLOCK_N=BLOCK_N, EVEN_M=EVEN_M, EVEN_N=EVEN_N, EVEN_D=EVEN_D, EVEN_DV=EVEN_DV,
                                     APPLY_CAUSAL=True, HAS_BIAS=HAS_BIAS, HAS_MASK=HAS_MASK, MASK_KEEP=MASK_KEEP,
                                     HAS_DROPOUT=HAS_DROPOUT, SOFTCAP=SOFTCAP, NATURAL=NATURAL, DOT_PREC=DOT_PREC,
                                     FUSE_SCALE=FUSE_SCALE)
    dq = (dq - (delta - shift)[:, None] * dq_corr) * scale
    dq_ptrs = (DQ + off_z * stride_dqz + off_h * stride_dqh + offs_m[:, None] * stride_dqm
               + offs_d[None, :] * stride_dqd)
    delta_ptrs = Delta + off_zh.to(tl.int64) * M + offs_m
    store_tile(dq_ptrs, dq, offs_m[:, None], offs_d[None, :], M, D, EVEN_R=EVEN_M, EVEN_C=EVEN_D)
    if EVEN_M:
        tl.store(delta_ptrs, delta)
    else:
        tl.store(delta_ptrs, delta, mask=offs_m < M)


# ---------------------------------------------------------------------------------------------------- autotune
# Register spills steer these spaces: the dk/dv kernel keeps two [BLOCK_N, D] fp32 accumulators and the dq kernel two
# [BLOCK_M, D], so each head dim's candidates are the tiles that compile without spill stores (ptxas -v,
# benchmarks/kernel_resources.py) next to the ones measured fastest (benchmarks/results/tuning_notes.md).
_tile = autotune.tile

DKDV_CONFIGS = [_tile(bm, bn, w, s) for bm in (32, 64) for bn in (32, 64, 128) for w in (4, 8) for s in (2, 3, 4, 5)]
DQ_CONFIGS = [_tile(bm, bn, w, s) for bm in (32, 64, 128) for bn in (32, 64, 128) for w in (4, 8) for s in (2, 3, 4, 5)]


def _head_dim(named_args, kwargs) -> int:
    return max(autotune.arg(named_args, kwargs, "BLOCK_D"), autotune.arg(named_args, kwargs, "BLOCK_DV"))


def prune_dkdv(configs, named_args, **kwargs):
    d = _head_dim(named_args, kwargs)
    if autotune.fp32_dots(named_args, kwargs):
        return [_tile(32, 64 if d <= 128 else 32, 8, 2)]

    def keep(c):
        bm, bn, w, s = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages
        if d <= 64:
            return bn == 128 and w == 4 and ((bm == 32 and s in (3, 5)) or (bm == 64 and s == 3))
        if d <= 128:
            return ((bn == 128 and ((w == 8 and bm == 64 and s in (2, 3)) or (w == 4 and bm == 32 and s == 3)))
                    or (w == 8 and s in (2, 3) and (bm, bn) in ((32, 128), (64, 64))))
        return w == 8 and ((bn == 64 and ((bm == 32 and s in (2, 3)) or (bm == 64 and s == 2)))
                           or (bn == 32 and bm in (32, 64) and s == 2))
    return [c for c in configs if keep(c)] or [_tile(32, 64, 4, 2)]


def prune_dq(configs, named_args, **kwargs):
    d = _head_dim(named_args, kwargs)
    if autotune.fp32_dots(named_args, kwargs):
        return [_tile(64, 32, 8, 2)]

    def keep(c):
        bm, bn, w, s = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages
        # two [BLOCK_M, BLOCK_D] fp32 accumulators (dq and its delta correction): every config keeps
        # BLOCK_M * BLOCK_D / threads at or below 64 registers each
        if d <= 64:
            return ((bm == 128 and w == 4 and ((bn == 64 and s in (3, 4)) or (bn == 32 and s == 5)))
                    or (bm == 128 and bn == 64 and w == 8 and s == 3) or (bm == 64 and bn == 64 and w == 4 and s == 3))
        if d <= 128:
            return ((bm == 128 and bn == 64 and w == 8 and s in (2, 3))
                    or (bm == 64 and bn in (32, 64) and w == 4 and s == 3)
                    or (w == 8 and ((bm == 64 and bn == 64 and s in (2, 3)) or (bm == 128 and bn == 32 and s == 2))))
        return s == 2 and bm in (32, 64) and bn in (32, 64) and w == 8
    return [c for c in configs if keep(c)] or [_tile(64, 32, 4, 2)]


attn_bwd_dq_tuned = autotune.autotuned("dq", attn_bwd_dq, DQ_CONFIGS, autotune.PREFILL_KEY, prune_dq,
                                       derived=autotune.EVEN_MN)
attn_bwd_dkdv_tuned = autotune.autotuned("dkdv", attn_bwd_dkdv, DKDV_CONFIGS, autotune.PREFILL_KEY + ["HAS_DBIAS"],
                                         prune_dkdv, derived=autotune.EVEN_MN, reset_to_zero=["DBias"])
