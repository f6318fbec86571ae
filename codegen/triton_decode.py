"""Split-KV (flash-decoding) Triton kernels for cached decode: a few query rows against a long K/V cache.

Same semantics as ``codegen/reference.py`` and the prefill kernels (this file runs prefill_fwd.kv_loop and the
helpers of tiles.py, so a decode step computes each score exactly as prefill does). dispatch.py routes a call here
when the query length is at most ``DECODE_MAX_Q`` and there is no dropout.

Why another kernel: with M = 1 the prefill grid has one program per (z, h) and each walks the whole cache alone, a
few dozen programs on a 132-SM GPU; and GQA heads each re-read their KV head. Here:

    decode_split    grid (splits, z * hkv, row blocks). A program owns one KV head and one chunk of the cache and
                     handles the rows of *all* query heads of that head's group at once (R = G * M rows: G = H / Hkv
                     query heads times M query positions, padded to BLOCK_R >= 16 for tl.dot). The cache is read
                     once per group, never repeated. Online softmax over the chunk's key tiles; writes the
                     partial (acc [R, Dv], row max m, row sum l) in fp32 to a workspace.
    decode_combine  grid (z * hkv, rows of the group): one program per query row. Rescales the splits' partials
                     to the global row max and sums:
                     out = sum_s acc_s * e^(m_s - m) / sum_s l_s * e^(m_s - m). A split with no keys (past the
                     cache length, above the causal diagonal, or masked everywhere with -inf) has m_s = -inf and
                     contributes exactly 0 (the global max is made finite first: no -inf - -inf). A row with no
                     key anywhere gives 0 / 0 = NaN as eager's softmax does (0 with SAFE_SOFTMAX); its stats are
                     those of prefill, so the backward (prefill's) is unchanged.

Kernel flags (tl.constexpr, decided on the host; the flags shared with prefill mean what its header says):
    BLOCK_R            query rows per program: G * M padded to a power of two, 16 <= BLOCK_R <= 64 (more rows take
                       another row block, which re-reads the chunk)
    BLOCK_N            keys per tile (autotuned; divides the chunk, so no tile straddles two chunks)
    EVEN_N             N % BLOCK_N == 0 (derived from the launched tile): the key bound checks are compiled out
    BLOCK_D/DV, EVEN_D/DV, IS_CAUSAL (applied on every tile: a decode step has at most 16 rows, and keys past the
    last row's diagonal are cut from the chunk's range), HAS_BIAS, HAS_MASK, MASK_KEEP, SOFTCAP, NATURAL, DOT_PREC
                       as in tiles.py's table; dropout is not a decode flag (such calls run the prefill kernel)
    DIRECT             one split: the split kernel normalises its rows and writes out and stats itself (no
                       workspace, no combine launch); SAFE_SOFTMAX as in prefill
    USE_TMA            K/V tiles through TMA descriptors, as in prefill
    PDL                the combine is launched as a programmatic dependent of the split kernel (see pdl_wanted;
                       on by default on Hopper and later)
    BUCKET_N, BUCKET_P autotune key only: the chunk's length bucket and the launch's program-count bucket
    BLOCK_S, ONE_PASS  combine: splits reduced per step; ONE_PASS when that is all of them (while [splits, Dv]
                       fits _COMBINE_ONE_PASS elements): every partial loaded at once

The number of splits is chosen on the host from batch, KV heads, row blocks, cache length and the SM count
(``num_splits``): the fewest evenly sized chunks whose waves are nearly as full as the best count's, never a chunk
shorter than one key tile (chunks are multiples of ``CHUNK_ALIGN`` so that every autotuned BLOCK_N divides them).
"""
from __future__ import annotations

import functools
import warnings

import torch
import triton
import triton.language as tl

from attn_compiler import config

from . import autotune, launch, reference, tma
from . import triton_prefill as tp
from .dispatch import DECODE_MAX_Q
from .prefill_fwd import kv_loop
from .reference import Spec
from .tiles import exp_diff

CHUNK_ALIGN = 128        # chunk lengths are multiples of this (the largest BLOCK_N)
_MAX_ROWS = 64           # query rows (G * M) per program; more rows take another row block
_MAX_SPLITS = 256
_WAVES = 2               # programs resident per SM that the split count plans for (see num_splits)
_MIN_CHUNK = 128         # keys per split at least (the best of 128/256/512 in the sweep of tuning_notes.md)
_WAVE_EFF = 0.95         # take the fewest splits whose efficiency is at least this times the best count's
_COMBINE_ONE_PASS = 8192 # the combine loads every split's partial at once while [splits, Dv] in fp32 is at most
                         # this many elements (64 x 128: 64 registers a thread in 4 warps)
_COMBINE_STEP = 32       # more splits than that: reduced this many at a time, in two passes


@triton.jit
def decode_split(Q, K, V, Bias, Mask, Acc, ML, Out, Stats, KDesc, VDesc,
                  stride_qz, stride_qh, stride_qm, stride_qd,
                  stride_kz, stride_kh, stride_kn, stride_kd,
                  stride_vz, stride_vh, stride_vn, stride_vd,
                  stride_bz, stride_bh, stride_bm, stride_bn,
                  stride_mz, stride_mh, stride_mm, stride_mn,
                  stride_oz, stride_oh, stride_om, stride_od,
                  HKV, G, M, N, D, DV, R, CHUNK, SPLITS, ROWS_PAD, ZHM,
                  qk_scale, softcap_in, softcap_out, fill2, causal_offset,
                  BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                  EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, IS_CAUSAL: tl.constexpr,
                  HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, MASK_KEEP: tl.constexpr,
                  SOFTCAP: tl.constexpr, NATURAL: tl.constexpr, DOT_PREC: tl.constexpr, DIRECT: tl.constexpr,
                  SAFE_SOFTMAX: tl.constexpr, USE_TMA: tl.constexpr, PDL: tl.constexpr, BUCKET_N, BUCKET_P,
                  BLOCK_N: tl.constexpr):
    tl.static_assert(BLOCK_R >= 16 and BLOCK_N >= 16, "tl.dot tiles are at least 16 x 16")
    if PDL:  # the combine grid may be scheduled once every split program has started (it waits for our writes)
        tl.extra.cuda.gdc_launch_dependents()
    pid_s = tl.program_id(0)
    pid_zk = tl.program_id(1)
    pid_r = tl.program_id(2)
    off_z = (pid_zk // HKV).to(tl.int64)
    off_hk = (pid_zk % HKV).to(tl.int64)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)    # row r of the group: query head hk * G + r // M, position r % M
    valid = r < R
    off_h = off_hk * G + (r // M).to(tl.int64)
    rows = tl.where(valid, r % M, M)               # padded rows get position M: every bound check drops them
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q_ptrs = (Q + off_z * stride_qz + off_h[:, None] * stride_qh + rows[:, None] * stride_qm
              + offs_d[None, :] * stride_qd)
    if EVEN_D:
        q = tl.load(q_ptrs, mask=valid[:, None], other=0.0)
    else:
        q = tl.load(q_ptrs, mask=valid[:, None] & (offs_d[None, :] < D), other=0.0)
    k_base = K + off_z * stride_kz + off_hk * stride_kh
    v_base = V + off_z * stride_vz + off_hk * stride_vh
    bias_base = Bias + off_z * stride_bz + off_h[:, None] * stride_bh   # per-row heads: a [BLOCK_R, 1] pointer
    mask_base = Mask + off_z * stride_mz + off_h[:, None] * stride_mh

    lo = pid_s * CHUNK
    hi = tl.minimum(lo + CHUNK, N)
    if IS_CAUSAL:  # keys past the last row's diagonal are masked for every row
        hi = tl.minimum(hi, tl.maximum(M + causal_offset, 0))
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
    acc, l_i, m_i = kv_loop(acc, l_i, m_i, q, k_base, v_base, KDesc, VDesc, off_z.to(tl.int32), off_hk.to(tl.int32),
                            bias_base, mask_base, rows, rows, offs_n, offs_d, offs_dv, lo, hi, stride_kn, stride_kd,
                            stride_vn, stride_vd, stride_bm, stride_bn, stride_mm, stride_mn, M, N, D, DV, qk_scale,
                            softcap_in, softcap_out, fill2, causal_offset, 0.0, 1.0, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
                            BLOCK_DV=BLOCK_DV, EVEN_M=False, EVEN_N=EVEN_N, EVEN_D=EVEN_D, EVEN_DV=EVEN_DV,
                            APPLY_CAUSAL=IS_CAUSAL, HAS_BIAS=HAS_BIAS, HAS_MASK=HAS_MASK, MASK_KEEP=MASK_KEEP,
                            HAS_DROPOUT=False, SOFTCAP=SOFTCAP, NATURAL=NATURAL, DOT_PREC=DOT_PREC, USE_TMA=USE_TMA)
    if DIRECT:  # one split: this program saw every key of its rows, so it writes the output itself
        o_ptrs = (Out + off_z * stride_oz + off_h[:, None] * stride_oh + rows[:, None] * stride_om
                  + offs_dv[None, :] * stride_od)
        st = (off_z * (HKV * G) + off_h) * M + rows   # stats [2, Z, H, M]
        write_rows(acc, l_i[:, None], l_i, m_i, o_ptrs, valid[:, None] & (offs_dv[None, :] < DV), Stats + st, valid,
                   ZHM, SAFE_SOFTMAX=SAFE_SOFTMAX, NATURAL=NATURAL)
    else:
        # workspace rows: ((zk * SPLITS + s) * ROWS_PAD + r); every program writes all its rows, empty splits too
        ws_row = (pid_zk.to(tl.int64) * SPLITS + pid_s) * ROWS_PAD + r
        a_ptrs = Acc + ws_row[:, None] * BLOCK_DV + offs_dv[None, :]
        tl.store(a_ptrs, acc, mask=valid[:, None])
        tl.store(ML + 2 * ws_row, m_i, mask=valid)
        tl.store(ML + 2 * ws_row + 1, l_i, mask=valid)


@triton.jit
def write_rows(acc, l_b, l_row, m, o_ptrs, o_mask, st_ptrs, st_mask, ZHM, SAFE_SOFTMAX: tl.constexpr,
                NATURAL: tl.constexpr):
    """out = acc / l and the stats (row max in natural units, log l) of finished rows. ``l_b`` is ``l_row`` shaped
    to broadcast against ``acc``. l == 0 (no key anywhere): 0/0 = NaN, as eager's softmax gives (0 with
    SAFE_SOFTMAX)."""
    o = acc / l_b
    if SAFE_SOFTMAX:
        o = tl.where(l_b == 0.0, 0.0, o)
    if NATURAL:
        m_nat = m
    else:
        m_nat = m * 0.6931471805599453
    tl.store(o_ptrs, o.to(o_ptrs.dtype.element_ty), mask=o_mask)
    tl.store(st_ptrs, m_nat, mask=st_mask)
    tl.store(st_ptrs + ZHM, tl.log2(l_row) * 0.6931471805599453, mask=st_mask)


@triton.jit
def decode_combine(Acc, ML, Out, Stats,
                    stride_oz, stride_oh, stride_om, stride_od,
                    HKV, G, M, DV, R, SPLITS, ROWS_PAD, ZHM,
                    BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr, SAFE_SOFTMAX: tl.constexpr,
                    NATURAL: tl.constexpr, PDL: tl.constexpr, ONE_PASS: tl.constexpr):
    """One program per query row (z, kv head, group row r). ONE_PASS (SPLITS <= BLOCK_S): every split's partial
    (m, l, acc) is loaded at once, one round trip to memory; else the splits are reduced BLOCK_S at a time, the row
    max first, then the weighted sums."""
    if PDL:  # launched early (programmatic dependent launch): wait until the split kernel's writes are visible
        tl.extra.cuda.gdc_wait()
    pid_zk = tl.program_id(0)
    r = tl.program_id(1)
    off_z = (pid_zk // HKV).to(tl.int64)
    off_h = (pid_zk % HKV).to(tl.int64) * G + r // M
    row = r % M
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    base = pid_zk.to(tl.int64) * SPLITS * ROWS_PAD + r   # workspace row of split s: base + s * ROWS_PAD

    if ONE_PASS:  # no load waits on another: one memory latency, where the loop pays two per step
        ws = base + offs_s * ROWS_PAD
        live = offs_s < SPLITS
        m_s = tl.load(ML + 2 * ws, mask=live, other=float("-inf"))
        l_s = tl.load(ML + 2 * ws + 1, mask=live, other=0.0)
        a = tl.load(Acc + ws[:, None] * BLOCK_DV + offs_dv[None, :], mask=live[:, None], other=0.0)
        m = tl.max(m_s, 0)
        w = exp_diff(m_s, tl.where(m == float("-inf"), 0.0, m), NATURAL=NATURAL)  # an empty split weighs exactly 0
        l_sum = tl.sum(l_s * w, 0)
        acc = tl.sum(a * w[:, None], 0)
    else:
        m_blk = tl.full([BLOCK_S], float("-inf"), dtype=tl.float32)
        for s0 in range(0, SPLITS, BLOCK_S):
            s = s0 + offs_s
            m_blk = tl.maximum(m_blk, tl.load(ML + 2 * (base + s * ROWS_PAD), mask=s < SPLITS, other=float("-inf")))
        m = tl.max(m_blk, 0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)  # the global max made finite first: no -inf - -inf
        l_blk = tl.zeros([BLOCK_S], dtype=tl.float32)
        acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
        for s0 in range(0, SPLITS, BLOCK_S):
            s = s0 + offs_s
            ws = base + s * ROWS_PAD
            m_s = tl.load(ML + 2 * ws, mask=s < SPLITS, other=float("-inf"))
            w = exp_diff(m_s, m_safe, NATURAL=NATURAL)   # an empty split (m_s = -inf) weighs exactly 0
            l_blk += tl.load(ML + 2 * ws + 1, mask=s < SPLITS, other=0.0) * w
            a = tl.load(Acc + ws[:, None] * BLOCK_DV + offs_dv[None, :], mask=(s < SPLITS)[:, None], other=0.0)
            acc += tl.sum(a * w[:, None], 0)
        l_sum = tl.sum(l_blk, 0)
    o_ptrs = Out + off_z * stride_oz + off_h * stride_oh + row * stride_om + offs_dv * stride_od
    st = (off_z * (HKV * G) + off_h) * M + row   # stats [2, Z, H, M]
    write_rows(acc, l_sum, l_sum, m, o_ptrs, offs_dv < DV, Stats + st, True, ZHM, SAFE_SOFTMAX=SAFE_SOFTMAX,
               NATURAL=NATURAL)


def _cfg(bn, w, s):
    return triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s, pre_hook=tma.block_hook)


_SPLIT_CONFIGS = [_cfg(bn, w, s) for bn in (32, 64, 128) for w in (4, 8) for s in (2, 3, 4, 5)]


def _prune_split(configs, named_args, **kwargs):
    d = max(autotune.arg(named_args, kwargs, "BLOCK_D"), autotune.arg(named_args, kwargs, "BLOCK_DV"))
    elt = 4 if autotune.arg(named_args, kwargs, "DOT_PREC") == "ieee" else 2

    def keep(c):
        # a memory-bound stream: as many K/V tiles in flight as shared memory (~200 KB used of 228) allows
        bn, s = c.kwargs["BLOCK_N"], c.num_stages
        return 2 * bn * d * elt * s <= 200 * 1024 and (bn >= 64 or d * elt >= 1024)
    return [c for c in configs if keep(c)] or [_cfg(64, 4, 2)]


# The key holds what decides the best tile of a memory-bound stream: the keys each program walks (BUCKET_N, the
# chunk's length bucket) and how many programs share the machine (BUCKET_P, see _programs_bucket): a tile tuned for
# half the programs falls well short of HBM peak (benchmarks/results/tuning_notes.md).
decode_split_tuned = autotune.autotuned(
    "decode", decode_split, _SPLIT_CONFIGS,
    ["BLOCK_R", "BLOCK_D", "BLOCK_DV", "BUCKET_N", "BUCKET_P", "IS_CAUSAL", "HAS_BIAS", "HAS_MASK", "SOFTCAP",
     "DIRECT", "USE_TMA", "DOT_PREC"],  # fp32 tiles take twice the shared memory (see the prune)
    _prune_split, derived=autotune.EVEN_N)


def _programs_bucket(programs: int, sms: int) -> int:
    """Autotune bucket of a launch's program count: within one program per SM, two, four, or more."""
    return 0 if programs <= sms else 1 if programs <= 2 * sms else 2 if programs <= 4 * sms else 3


def pdl_wanted(device) -> bool:
    """Programmatic dependent launch of the combine (Hopper and later): its grid is launched while the split kernel
    still runs and waits in-kernel (griddepcontrol) for the partials, instead of starting after a kernel boundary.
    On by default on such a device, where it was faster at every measured point (benchmarks/results/
    tuning_notes.md); MEMATTN_PDL=0 turns it off. Never under the interpreter (no griddepcontrol there), nor after
    a PDL launch failed in this process (forward() then warns once and launches plainly)."""
    if config.read("MEMATTN_PDL") == "0" or config.interpret() or _pdl_failed:
        return False
    return launch.hopper_or_later(device)


_pdl_failed = False


def _sm_count(device) -> int:
    if device.type == "cuda":
        return launch.device_properties(device).multi_processor_count
    return 16  # the interpreter: a few splits for a test's handful of heads, so tests cross chunk edges


def num_splits(programs: int, n: int, sms: int, align: int = CHUNK_ALIGN,
               min_chunk: int | None = None) -> tuple[int, int]:
    """(splits, chunk) for ``programs`` = batch x KV heads x row blocks over a cache of ``n`` keys.

    The machine runs ``slots`` = ``_WAVES * sms`` programs at once. Splitting the cache's ``tiles`` (aligned key
    tiles) into chunks of ``per`` tiles makes programs * splits programs, run in ceil(programs * splits / slots)
    waves, each as long as its longest chunk. Their efficiency is the tile work done over the slot time held:
    programs * tiles / (slots * waves * per). It counts both a partly idle last wave and a ragged split (at 64k
    keys, 29 chunks of 18 tiles and a last of 8 hold every slot for 18 tiles, where 32 chunks of 16 finish two tiles
    sooner). Take the fewest splits within ``_WAVE_EFF`` of the best count's efficiency: with programs enough to
    fill the machine that is 1 (no workspace and no combine launch), with a few it is enough evenly sized splits to
    fill it; fewer splits are never slower at equal efficiency, as each split adds a partial to write and combine
    (benchmarks/results/tuning_notes.md). Chunks are a multiple of ``align`` (no key tile straddles two chunks) and
    at least ``min_chunk`` keys (default ``_MIN_CHUNK``) unless the cache is shorter; the last chunk never starts
    past the cache's end.

    Runs on every decode step's launch, so it is plain integer arithmetic (Triton's cdiv is a constexpr function
    whose host call costs microseconds, and there are up to 256 candidate counts), stops at a count of efficiency 1
    (no later one can be better), and is cached. The answer depends on n only through its number of aligned tiles
    and of least-size chunks (ceil(ceil(n/s)/a) = ceil(ceil(n/a)/s)), so a cache growing by a token a step asks anew
    once every ``align`` tokens."""
    min_chunk = max(align, _MIN_CHUNK if min_chunk is None else min_chunk)
    tiles = -(-n // align)
    return _num_splits(max(programs, 1), tiles, n // min_chunk, max(1, _WAVES * sms), align, _MAX_SPLITS, _WAVE_EFF)


@functools.lru_cache(maxsize=4096)
def _num_splits(programs, tiles, most, slots, align, max_splits, wave_eff):
    """num_splits over ``tiles`` aligned key tiles, at most ``most`` splits by the least chunk."""
    options = []
    best = 0.0
    for s in range(1, min(max_splits, max(1, most)) + 1):
        per = -(-tiles // s)                        # tiles per chunk; fewer splits than s may then cover the cache
        splits = -(-tiles // per)
        started = -(-(programs * splits) // slots)  # waves started, the last one maybe partly idle
        eff = programs * tiles / (slots * started * per)
        options.append((eff, splits, per * align))
        best = max(best, eff)
        if eff >= 1.0:
            break
    return next((splits, chunk) for eff, splits, chunk in options if eff >= wave_eff * best)


def supports(*args):
    """(ok, reason) for ``forward``'s 7 arguments: prefill's conditions, plus those of a decode step."""
    ok, reason = tp.supports(*args)
    if not ok:
        return ok, reason
    q, k, _v, _bias, _mask, _seed, spec = args
    if q.shape[2] > DECODE_MAX_Q:
        return False, f"{q.shape[2]} query rows is not a decode step (at most {DECODE_MAX_Q})"
    if spec.dropout_p > 0:
        return False, "dropout in a decode step (the prefill kernel implements it)"
    if q.shape[0] * k.shape[1] > tp.MAX_GRID_Y:
        return False, f"batch * kv heads = {q.shape[0] * k.shape[1]} exceeds the grid limit {tp.MAX_GRID_Y}"
    return True, ""


class _Decode:
    """A planned decode step: allocates out, stats and the splits' workspace, launches the split kernel and (with
    more than one split) the combine (see plan_forward)."""

    __slots__ = ("split", "combine", "spec", "pdl", "out_shape", "out_strides", "stats_shape", "ws_shapes",
                 "dtype", "device", "dummy", "tma")

    def __call__(self, q, k, v, bias, mask, seed):
        dev = self.device
        out = torch.empty_strided(self.out_shape, self.out_strides, dtype=self.dtype, device=dev)
        stats = torch.empty(self.stats_shape, dtype=torch.float32, device=dev)
        if self.ws_shapes is None:   # one split: the split kernel writes out and stats (no workspace is read)
            acc = ml = stats
        else:
            acc = torch.empty(self.ws_shapes[0], dtype=torch.float32, device=dev)
            ml = torch.empty(self.ws_shapes[1], dtype=torch.float32, device=dev)
        d = self.dummy
        b = d if bias is None else bias
        mk = d if mask is None else mask.view(torch.uint8)
        if self.tma is None:
            kd, vd = k, v
        else:
            kd, vd = tma.desc_like(self.tma[0], k), tma.desc_like(self.tma[1], v)
        try:
            self.split(q, k, v, b, mk, acc, ml, out, stats, kd, vd)
            if self.combine is not None:
                self.combine(acc, ml, out, stats)
        except Exception as e:  # noqa: BLE001 - TMA's or PDL's fault, or neither (then it propagates)
            return self._after_failure(e, q, k, v, bias, mask, seed)
        return out, stats

    def _after_failure(self, e, q, k, v, bias, mask, seed):
        global _pdl_failed
        if self.pdl:
            tma_before = tma.failed()
            result = plan_forward(q, k, v, bias, mask, seed, self.spec, pdl=False)(q, k, v, bias, mask, seed)
            if tma.failed() == tma_before:   # the plain launch worked with the same loads: PDL's fault
                _pdl_failed = True
                launch.invalidate()
                warnings.warn(f"memattn: the decode kernels' programmatic dependent launch failed "
                              f"({type(e).__name__}: {e}); launching without it from now on", RuntimeWarning,
                              stacklevel=3)
            return result
        if self.tma is not None:
            tma.failure(e)
            return plan_forward(q, k, v, bias, mask, seed, self.spec)(q, k, v, bias, mask, seed)
        raise e


def plan_forward(q, k, v, bias, mask, seed, spec: Spec, pdl: bool | None = None):
    """The decode step of one call signature, as a callable (q, k, v, bias, mask, seed) -> (out [Z, H, M, Dv] in
    v.dtype and spec.out_layout, stats [2, Z, H, M] fp32), like triton_prefill.plan_forward. ``pdl``: launch the
    combine as a programmatic dependent (default: where pdl_wanted says so)."""
    c = tp.kernel_args(q, k, v, bias, mask, seed, spec)
    z, h, m, n, hkv, dv = c["z"], c["h"], c["m"], c["n"], c["hkv"], c["dv"]
    out_shape, out_strides = (z, h, m, dv), reference.out_strides(z, h, m, dv, spec.out_layout)
    stats_shape = (2, z, h, m)
    if m == 0 or z * h == 0 or n == 0:
        return tp.Empty(out_shape, out_strides, stats_shape, v.dtype, q.device, no_keys=m > 0 and z * h > 0)
    g = h // hkv
    rows = g * m
    block_r = min(_MAX_ROWS, max(16, tp.next_pow2(rows)))
    row_blocks = -(-rows // block_r)
    fixed = autotune.fixed_config()
    align = CHUNK_ALIGN if fixed is None else fixed["BLOCK_N"]
    sms = _sm_count(q.device)
    splits, chunk = num_splits(z * hkv * row_blocks, n, sms, align, None if fixed is None else align)
    buckets = dict(BUCKET_N=autotune.bucket(chunk), BUCKET_P=_programs_bucket(splits * z * hkv * row_blocks, sms))
    rows_pad = row_blocks * block_r
    block_dv = c["flags"]["BLOCK_DV"]
    direct = splits == 1
    pdl = (not direct and pdl_wanted(q.device)) if pdl is None else (pdl and not direct)
    scal = {k_: c["scal"][k_] for k_ in ("qk_scale", "softcap_in", "softcap_out", "fill2", "causal_offset")}
    grid = (splits, z * hkv, row_blocks)
    all_splits = max(2, tp.next_pow2(splits))   # a block holding every split's partial
    one_pass = all_splits * block_dv <= _COMBINE_ONE_PASS
    flags = {k_: c["flags"][k_] for k_ in ("BLOCK_D", "BLOCK_DV", "EVEN_D", "EVEN_DV", "IS_CAUSAL", "HAS_BIAS",
                                           "HAS_MASK", "MASK_KEEP", "SOFTCAP", "NATURAL", "DOT_PREC", "SAFE_SOFTMAX")}
    kd, vd, use_tma = tma.descs(k, v)
    args = (hkv, g, m, n, c["d"], dv, rows, chunk, splits, rows_pad, z * h * m)
    strides = (*q.stride(), *k.stride(), *v.stride(), *c["b_strides"], *c["m_strides"], *out_strides)
    named = dict(scal, BLOCK_R=block_r, **flags, PDL=pdl, DIRECT=direct, USE_TMA=use_tma, **buckets)
    tile = None if fixed is None else {k_: fixed[k_] for k_ in ("BLOCK_N", "num_warps", "num_stages")}
    split = autotune.kernel_launch(decode_split_tuned, lambda meta: grid, strides + args, named, n_tensors=0,
                                   fixed=tile)
    plan = _Decode()
    plan.split = split
    if direct:
        plan.combine, plan.ws_shapes = None, None
    else:
        plan.ws_shapes = ((z * hkv, splits, rows_pad, block_dv), (z * hkv, splits, rows_pad, 2))
        plan.combine = launch.Launch(
            decode_combine, lambda meta: (z * hkv, rows), (*out_strides, hkv, g, m, dv, rows, splits, rows_pad,
                                                            z * h * m),
            dict(BLOCK_S=all_splits if one_pass else _COMBINE_STEP, BLOCK_DV=block_dv,
                 SAFE_SOFTMAX=flags["SAFE_SOFTMAX"], NATURAL=flags["NATURAL"], PDL=pdl, ONE_PASS=one_pass,
                 **({"launch_pdl": True} if pdl else {})),
            bindable=not config.interpret())
    plan.spec, plan.pdl, plan.out_shape, plan.out_strides, plan.stats_shape = spec, pdl, out_shape, out_strides, \
        stats_shape
    plan.dtype, plan.device, plan.dummy = v.dtype, q.device, q.new_empty(1)
    plan.tma = (kd, vd) if use_tma else None
    return plan


def forward(q, k, v, bias, mask, seed, spec: Spec):
    """One decode step, planned afresh (dispatch.py keeps plans by call signature): (out, stats) like
    triton_prefill.forward."""
    return plan_forward(q, k, v, bias, mask, seed, spec)(q, k, v, bias, mask, seed)
