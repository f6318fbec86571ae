"""Device helpers of the attention kernels (prefill forward and backward, decode), one definition each, so that every
kernel computes a score, a probability and a dropout decision the same way.

Same semantics as ``codegen/reference.py`` (read that first). The kernels that use these: prefill_fwd.py,
prefill_bwd.py, triton_decode.py; their hosts: triton_prefill.py and triton_decode.py.

Kernel flags (tl.constexpr; every one is decided on the host from the call's tensors and Spec, or derived from the
tile by the autotuner's heuristics):
    BLOCK_M, BLOCK_N   query rows / key columns per tile (autotuned per shape bucket, or forced by tests)
    BLOCK_D, BLOCK_DV  q/k and v head dims padded to a power of two (>= 16); EVEN_D / EVEN_DV say no padding,
                       so the head-dim load masks are compiled out
    EVEN_M, EVEN_N     M % BLOCK_M == 0 / N % BLOCK_N == 0, derived from the tile being launched
                       (autotune.EVEN_MN): the row / column bound checks are compiled out
    IS_CAUSAL          key j allowed iff j <= i + causal_offset; key blocks above the diagonal are skipped and
                       blocks wholly below it run without the causal compare (APPLY_CAUSAL is the per-loop flag)
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
    USE_TMA            forward kernels (prefill_fwd.attn_fwd and the decode split kernel): K/V tiles are copied by
                       the TMA unit through 4-D tensor descriptors (KDesc, VDesc) instead of pointer loads; tiles
                       past N or D read as 0, as the masked loads give, so the score masks are unchanged. Set on
                       the host where the layout allows it (tma.py; MEMATTN_TMA overrides)
    WARP_SPEC          attn_fwd with TMA: the K/V loop as tl.range(warp_specialize=True). An experiment, off
                       unless MEMATTN_WS=1 (tma.warp_spec_wanted)
    FUSE_SCALE         plain scores (no bias, mask or softcap) and a positive scale: each score is one FMA
                       (qk * qk_scale - m) before exp2; the forward takes its row max on qk and scales it per row
    CAUSAL_LOOP        attn_fwd with IS_CAUSAL: how a query block walks its keys. 0: the tiles every row may see,
                       then the diagonal ones under the causal mask, two K/V loops. 1: one loop; the mask is taken
                       on a tile only from lo_mask on, a branch uniform over the tile (plain scores; the other paths
                       mask every tile), which saves the second loop's pipeline fill and drain. Chosen per head dim
                       on the host (triton_prefill.causal_loop; MEMATTN_CAUSAL_LOOP overrides)
    DOT_PREC           tl.dot input precision: "ieee" for fp32 inputs (matches eager fp32), "tf32" otherwise
                       (the default; no effect on 16-bit inputs); "upcast" under TRITON_INTERPRET for bf16, whose
                       interpreter matmul is wrong (numpy has no bf16): operands go to fp32 first

Scores are kept in the log2 domain: s2 = s * log2(e); with no softcap the log2(e) is folded into the scale
(qk_scale = scale * log2(e)) so each tile costs one multiply and exp2, unless NATURAL. The stats are stored in natural
units, as codegen/reference.py stores them; the backward takes p = exp((s - m) - log l) from them.
Batch/head offsets are int64; offsets inside one head are int32 (rows * stride < 2**31).

Constexprs are passed by keyword at every call, so a helper's flags can be added or reordered without touching the
order of its callers' arguments.
"""
import triton
import triton.language as tl

LOG2E = 1.4426950408889634   # the host's copy of the constant the kernels spell out


@triton.jit
def fmix32(x):
    # murmur3 finaliser on uint32 (wrapping multiplies); codegen/rng.py spells the same function in int64
    x = x ^ (x >> 16)
    x = x * 0x85EBCA6B
    x = x ^ (x >> 13)
    x = x * 0xC2B2AE35
    return x ^ (x >> 16)


@triton.jit
def row_hash(seed, zh, rows):
    """rng.row_hash: seed, zh uint32 scalars, rows int32 vector -> uint32 vector."""
    base = fmix32(seed ^ (zh.to(tl.uint32) * 0x9E3779B1))
    return fmix32(base ^ (rows.to(tl.uint32) * 0x7FEB352D))


@triton.jit
def drop_scale(rh, col_mul, dropout_p, inv_keep):
    """rng.keep_mask turned into keep / (1 - p); rh and col_mul already broadcast to the tile's 2-D shape."""
    x = fmix32(rh ^ col_mul)
    u = (x >> 8).to(tl.float32) * (1.0 / 16777216.0)
    return tl.where(u >= dropout_p, inv_keep, 0.0)


@triton.jit
def tanh(x):
    # exp2 form: no libdevice, so the same code runs compiled and under TRITON_INTERPRET
    return 1.0 - 2.0 / (tl.exp2(x * (2.0 * 1.4426950408889634)) + 1.0)


@triton.jit
def load_tile(ptrs, r, c, R, C, EVEN_R: tl.constexpr, EVEN_C: tl.constexpr):
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
def store_tile(ptrs, x, r, c, R, C, EVEN_R: tl.constexpr, EVEN_C: tl.constexpr):
    """Store x (cast to the pointee type) where r[i] < R and c[j] < C, as load_tile reads."""
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
def apply_mask(x, mask_base, rows, cols, stride_mm, stride_mn, M, N, fill, MASK_KEEP: tl.constexpr,
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
def dot(a, b, acc, DOT_PREC: tl.constexpr):
    if DOT_PREC == "upcast":  # TRITON_INTERPRET has no bf16 matmul (numpy): multiply the exact fp32 values
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def scores(qk, rows, cols, bias_ptr, mask_ptr, stride_bm, stride_bn, stride_mm, stride_mn, M, N,
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
        t = tanh(qk * softcap_in)  # softcap_in = scale / softcap
        s = t * softcap_out  # softcap_out = softcap * log2(e)
    else:
        t = qk
        s = qk * qk_scale
    if HAS_BIAS:
        b = load_tile(bias_ptr + rows * stride_bm + cols * stride_bn, rows, cols, M, N, EVEN_R=EVEN_M, EVEN_C=EVEN_N)
        s = s + b.to(tl.float32)  # a bias implies NATURAL: scores stay in natural units
    if HAS_MASK:
        s = apply_mask(s, mask_ptr, rows, cols, stride_mm, stride_mn, M, N, fill2, MASK_KEEP=MASK_KEEP, EVEN_M=EVEN_M,
                       EVEN_N=EVEN_N)
    return key_masks(s, rows, cols, N, causal_offset, APPLY_CAUSAL=APPLY_CAUSAL, EVEN_N=EVEN_N), t


@triton.jit
def key_masks(x, rows, cols, N, causal_offset, APPLY_CAUSAL: tl.constexpr, EVEN_N: tl.constexpr):
    """The score tile's key masks, the ones every path takes: -inf above the causal diagonal and past N."""
    if APPLY_CAUSAL:
        x = tl.where(cols <= rows + causal_offset, x, float("-inf"))
    if not EVEN_N:
        x = tl.where(cols < N, x, float("-inf"))
    return x


@triton.jit
def exp_diff(s, m, NATURAL: tl.constexpr):
    """exp(s - m) for scores in the kernel's domain; subtracting first keeps finfo.min - finfo.min exact."""
    if NATURAL:
        return tl.exp2((s - m) * 1.4426950408889634)
    else:
        return tl.exp2(s - m)


@triton.jit
def row_stats(Stats, zh_m, ZHM, offs_m, M, EVEN_M: tl.constexpr, NATURAL: tl.constexpr,
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
def plain_prob(qk, rows, cols, N, qk_scale, causal_offset, mrow, APPLY_CAUSAL: tl.constexpr,
               EVEN_N: tl.constexpr):
    """FUSE_SCALE's backward p = exp2(qk * qk_scale - mrow) (plain scores in the log2 domain): one FMA per score,
    masked keys (causal, past N) at -inf before the scale, which is positive."""
    qk = key_masks(qk, rows, cols, N, causal_offset, APPLY_CAUSAL=APPLY_CAUSAL, EVEN_N=EVEN_N)
    return tl.exp2(qk * qk_scale - mrow)


@triton.jit
def prob(s, mrow, lrow, NATURAL: tl.constexpr):
    if NATURAL:
        return tl.exp2((s - mrow) * 1.4426950408889634 - lrow)
    else:
        return tl.exp2(s - mrow)


