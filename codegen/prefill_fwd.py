"""The prefill forward kernel: one program per (query block, z*h), an online softmax over the key blocks in fp32
(m_i, l_i, acc), writing out and stats [2, Z, H, M] fp32 (row max, log row sum; natural units). Nothing of size
M x N is ever written to memory.

``kv_loop`` is the loop over one range of key tiles; the decode split kernel (triton_decode.py) runs it too, so a
decode step computes each score exactly as prefill does. Flags: the table in tiles.py. Host side: triton_prefill.py.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import autotune, tma
from .tiles import drop_scale, dot, exp_diff, key_masks, load_tile, row_hash, scores, store_tile


@triton.jit
def kv_loop(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, tma_z, tma_h, bias_base, mask_base, rh, offs_m,
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
    """The online softmax over key tiles [lo, hi) for one block of query rows (offs_m): returns the running
    (acc, l_i, m_i) after them. APPLY_CAUSAL masks every tile; CAUSAL_BRANCH masks only tiles from causal_from on
    (CAUSAL_LOOP == 1, plain scores)."""
    rows = offs_m[:, None]
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPEC):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols_1d = start_n + offs_n
        cols = cols_1d[None, :]
        if USE_TMA:  # TMA copy of the [BLOCK_N, BLOCK_D] tile: keys past N and dims past D read as 0
            kt = tl.trans(k_desc.load([tma_z, tma_h, start_n, 0]).reshape(BLOCK_N, BLOCK_D))
        else:
            kt_ptrs = k_base + cols * stride_kn + offs_d[:, None] * stride_kd  # [BLOCK_D, BLOCK_N]
            kt = load_tile(kt_ptrs, offs_d[:, None], cols, D, N, EVEN_R=EVEN_D, EVEN_C=EVEN_N)
        qk = dot(q, kt, None, DOT_PREC=DOT_PREC)
        if FUSE_SCALE:
            # plain scores with qk_scale > 0: the scaled tile is never formed. The row max is taken on qk and
            # scaled once per row (rounding is monotonic, so it equals the max of the scaled scores), and each
            # score costs one FMA before exp2 instead of a multiply and a subtract
            if CAUSAL_BRANCH:  # CAUSAL_LOOP == 1: one loop, the causal mask only on tiles from causal_from
                qk = key_masks(qk, rows, cols, N, causal_offset, APPLY_CAUSAL=False, EVEN_N=EVEN_N)
                if start_n >= causal_from:
                    qk = tl.where(cols <= rows + causal_offset, qk, float("-inf"))
            else:
                qk = key_masks(qk, rows, cols, N, causal_offset, APPLY_CAUSAL=APPLY_CAUSAL, EVEN_N=EVEN_N)
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(qk * qk_scale - m_safe[:, None])
        else:
            s, _t = scores(qk, rows, cols, bias_base, mask_base, stride_bm, stride_bn, stride_mm, stride_mn, M, N,
                           qk_scale, softcap_in, softcap_out, fill2, causal_offset, HAS_BIAS=HAS_BIAS,
                           HAS_MASK=HAS_MASK, MASK_KEEP=MASK_KEEP, SOFTCAP=SOFTCAP, APPLY_CAUSAL=APPLY_CAUSAL,
                           EVEN_M=EVEN_M, EVEN_N=EVEN_N)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # a row still at -inf subtracts 0, not -inf (no inf - inf); a row masked everywhere ends as 0/0 = NaN
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = exp_diff(s, m_safe[:, None], NATURAL=NATURAL)
        alpha = exp_diff(m_i, m_safe, NATURAL=NATURAL)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            p = p * drop_scale(rh[:, None], (cols_1d.to(tl.uint32) * 0x9E3779B1)[None, :], dropout_p, inv_keep)
        if USE_TMA:
            v = v_desc.load([tma_z, tma_h, start_n, 0]).reshape(BLOCK_N, BLOCK_DV)
        else:
            v_ptrs = v_base + cols_1d[:, None] * stride_vn + offs_dv[None, :] * stride_vd  # [BLOCK_N, BLOCK_DV]
            v = load_tile(v_ptrs, cols_1d[:, None], offs_dv[None, :], N, DV, EVEN_R=EVEN_N, EVEN_C=EVEN_DV)
        acc = acc * alpha[:, None]
        acc = dot(p.to(v.dtype), v, acc, DOT_PREC=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def attn_fwd(Q, K, V, Bias, Mask, Seed, Out, Stats, KDesc, VDesc,
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
    q = load_tile(q_ptrs, offs_m[:, None], offs_d[None, :], M, D, EVEN_R=EVEN_M, EVEN_C=EVEN_D)
    k_base = K + off_z * stride_kz + off_hk * stride_kh
    v_base = V + off_z * stride_vz + off_hk * stride_vh
    tma_z = off_z.to(tl.int32)    # descriptor coordinates (USE_TMA)
    tma_h = off_hk.to(tl.int32)
    bias_base = Bias + off_z * stride_bz + off_h * stride_bh
    mask_base = Mask + off_z * stride_mz + off_h * stride_mh
    if HAS_DROPOUT:
        seed = (tl.load(Seed) & 0xFFFFFFFF).to(tl.uint32)
        rh = row_hash(seed, off_zh, offs_m)
    else:
        rh = offs_m

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    if IS_CAUSAL:
        # keys past hi are masked for every row of the block; keys below lo_mask are allowed for every row
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + causal_offset, 0), N)
        lo_mask = tl.minimum(tl.maximum(start_m + causal_offset + 1, 0) // BLOCK_N * BLOCK_N, hi)
    else:  # every key is allowed for every row
        hi = N
        lo_mask = N
    lo = 0
    if not IS_CAUSAL or CAUSAL_LOOP == 0:  # the tiles every row may see, without the causal mask
        acc, l_i, m_i = kv_loop(acc, l_i, m_i, q, k_base, v_base, KDesc, VDesc, tma_z, tma_h, bias_base, mask_base,
                                rh, offs_m, offs_n, offs_d, offs_dv, 0, lo_mask, stride_kn, stride_kd, stride_vn,
                                stride_vd, stride_bm, stride_bn, stride_mm, stride_mn, M, N, D, DV, qk_scale,
                                softcap_in, softcap_out, fill2, causal_offset, dropout_p, inv_keep, BLOCK_N=BLOCK_N,
                                BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, EVEN_M=EVEN_M, EVEN_N=EVEN_N, EVEN_D=EVEN_D,
                                EVEN_DV=EVEN_DV, APPLY_CAUSAL=False, HAS_BIAS=HAS_BIAS, HAS_MASK=HAS_MASK,
                                MASK_KEEP=MASK_KEEP, HAS_DROPOUT=HAS_DROPOUT, SOFTCAP=SOFTCAP, NATURAL=NATURAL,
                                DOT_PREC=DOT_PREC, USE_TMA=USE_TMA, WARP_SPEC=WARP_SPEC, FUSE_SCALE=FUSE_SCALE)
        lo = lo_mask
    if IS_CAUSAL:
        # the masked tiles; with CAUSAL_LOOP == 1 every tile in one loop, the mask taken from lo_mask on (a branch
        # uniform per tile)
        acc, l_i, m_i = kv_loop(acc, l_i, m_i, q, k_base, v_base, KDesc, VDesc, tma_z, tma_h, bias_base, mask_base, rh,
                                offs_m, offs_n, offs_d, offs_dv, lo, hi, stride_kn, stride_kd, stride_vn, stride_vd,
                                stride_bm, stride_bn, stride_mm, stride_mn, M, N, D, DV, qk_scale, softcap_in,
                                softcap_out, fill2, causal_offset, dropout_p, inv_keep, BLOCK_N=BLOCK_N,
                                BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, EVEN_M=EVEN_M, EVEN_N=EVEN_N, EVEN_D=EVEN_D,
                                EVEN_DV=EVEN_DV, APPLY_CAUSAL=True, HAS_BIAS=HAS_BIAS, HAS_MASK=HAS_MASK,
                                MASK_KEEP=MASK_KEEP, HAS_DROPOUT=HAS_DROPOUT, SOFTCAP=SOFTCAP, NATURAL=NATURAL,
                                DOT_PREC=DOT_PREC, USE_TMA=USE_TMA, WARP_SPEC=WARP_SPEC, FUSE_SCALE=FUSE_SCALE,
                                causal_from=lo_mask, CAUSAL_BRANCH=CAUSAL_LOOP == 1)
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
    store_tile(o_ptrs, o, offs_m[:, None], offs_dv[None, :], M, DV, EVEN_R=EVEN_M, EVEN_C=EVEN_DV)
    if EVEN_M:
        tl.store(st_ptrs, m_nat)
        tl.store(st_ptrs + ZHM, logl)
    else:
        tl.store(st_ptrs, m_nat, mask=offs_m < M)
        tl.store(st_ptrs + ZHM, logl, mask=offs_m < M)


# ---------------------------------------------------------------------------------------------------- autotune
# Every candidate carries the TMA box hook: the descriptors' box is the tile being launched.

FWD_CONFIGS = [autotune.tile(bm, bn, w, s, tma.block_hook)
               for bm in (64, 128) for bn in (32, 64, 128) for w in (4, 8) for s in (2, 3, 4)]
_FP32_TILE = autotune.tile(64, 32, 8, 2, tma.block_hook)


def prune_fwd(configs, named_args, **kwargs):
    """The candidates for a head dim, query-length bucket and causality: the tiles without register spills (ptxas
    -v, benchmarks/kernel_resources.py) next to those measured fastest (benchmarks/results/tuning_notes.md)."""
    d = max(autotune.arg(named_args, kwargs, "BLOCK_D"), autotune.arg(named_args, kwargs, "BLOCK_DV"))
    bucket = autotune.arg(named_args, kwargs, "BUCKET_M")
    causal = autotune.arg(named_args, kwargs, "IS_CAUSAL")
    # causal rows up to 4k: a 128-row block carries a 128 x 128 diagonal tile of mostly masked work, so 64-row
    # blocks are worth a try
    small_m = bucket == 0 or (bucket <= 2 and causal)
    if autotune.fp32_dots(named_args, kwargs):
        return [_FP32_TILE]

    def keep(c):
        bm, bn, w, s = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages
        if bucket == 0 and bm == 128:
            return False
        if bm == 64 and not small_m and d < 256:
            return False
        if d <= 64:
            # 128 x 128 spills a little on 4 warps and not on 8: both are timed
            return (bn in (64, 128) and w == 4 and s in (3, 4)) or (bm == 128 and bn == 128 and w == 8 and s == 3)
        if d <= 128:
            # short causal rows also try 64-row blocks on 4 warps (the 8-warp tiles alone lag flash there)
            return ((bn in (64, 128) and w == 8 and s in (2, 3)) or (bm == 128 and bn == 64 and w == 8 and s == 4)
                    or (causal and bucket <= 1 and bm == 64 and bn in (64, 128) and w == 4 and s == 3))
        return bn in (32, 64) and w == 8 and s == 2
    return [c for c in configs if keep(c)] or [autotune.tile(64, 32, 4, 2, tma.block_hook)]


attn_fwd_tuned = autotune.autotuned("fwd", attn_fwd, FWD_CONFIGS,
                                    autotune.PREFILL_KEY + ["USE_TMA", "WARP_SPEC", "CAUSAL_LOOP"], prune_fwd,
                                    derived=autotune.EVEN_MN)
