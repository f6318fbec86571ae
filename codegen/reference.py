"""Blockwise attention in plain torch ops: the CPU path of ``torch.ops.memattn.attention`` and the reference the
Triton kernels are tested against.

It runs the FlashAttention-2 algorithm with torch ops: queries in blocks of ``block_m`` rows, keys in blocks of
``block_n`` columns, an online softmax with running max ``m_i`` and sum ``l_i`` in fp32, and a backward that
recomputes each block of probabilities from the saved logsumexp. No tensor of size M x N is ever allocated; the
largest intermediate is one (block_m x block_n) tile per head.

Semantics (shared with the kernels; see ``attn_compiler/ops.py`` for the argument list):

    s = scale * (q @ k^T)                        in fp32
    s = softcap * tanh(s / softcap)               if softcap != 0 (even in softcap)
    s = s + bias                                  if bias is given (float, broadcast to [Z, H, M, N])
    s = where(keep, s, mask_fill)                 if mask is given; keep = mask if mask_keep else ~mask
    s = where(j <= i + causal_offset, s, -inf)    if causal
    p = softmax(s, -1)                            fully-masked rows: NaN as eager gives, or 0 if safe_softmax
    p = p * keep_dropout / (1 - dropout_p)        if dropout_p > 0 (codegen/rng.py decides keep_dropout)
    out = p @ v
    stats = (m, log l): the row max of s and the log of sum(exp(s - m)), stacked as [2, Z, H, M]

The backward recomputes p = exp((s - m) - log l). Keeping the two apart (rather than lse = m + log l) matters when
m is huge: a row masked everywhere with finfo.min has m = -3.4e38, where log l is absorbed into lse and
exp(s - lse) would give 1 instead of 1/N.

GQA: q has H heads, k and v have Hkv heads, H % Hkv == 0, query head h reads kv head h // (H // Hkv).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from . import rng

# Tile sizes. Tests shrink them so that tiny shapes still cross block boundaries.
BLOCK_M = 128
BLOCK_N = 128


@dataclasses.dataclass(frozen=True)
class Spec:
    scale: float
    softcap: float = 0.0
    causal: bool = False
    causal_offset: int = 0
    mask_fill: float = float("-inf")
    mask_keep: bool = True
    dropout_p: float = 0.0
    safe_softmax: bool = False
    out_layout: int = 0  # OUT_ZHMD or OUT_ZMHD: the memory order of ``out`` (its shape is [Z, H, M, Dv] in both)


OUT_ZHMD = 0  # out contiguous as [Z, H, M, Dv]
OUT_ZMHD = 1  # out a [Z, H, M, Dv] view of a contiguous [Z, M, H, Dv] buffer: its transpose(1, 2) is contiguous,
              # as a model's ``y.transpose(1, 2).contiguous()`` wants (the rewrite proves when it is asked for)
OUT_LAYOUTS = (OUT_ZHMD, OUT_ZMHD)


def out_strides(z, h, m, dv, layout: int) -> tuple:
    """The strides of the output [Z, H, M, Dv] in ``layout``: the one definition of the layouts."""
    if layout == OUT_ZMHD:
        return (m * h * dv, dv, h * dv, 1)
    if layout != OUT_ZHMD:
        raise ValueError(f"memattn: out_layout must be one of {OUT_LAYOUTS}; got {layout!r}")
    return (h * m * dv, m * dv, dv, 1)


def empty_out(z, h, m, dv, dtype, device, layout: int) -> torch.Tensor:
    """The uninitialised output [Z, H, M, Dv] in ``layout`` (every implementation and the fake allocate it here)."""
    return torch.empty_strided((z, h, m, dv), out_strides(z, h, m, dv, layout), dtype=dtype, device=device)


def in_layout(out: torch.Tensor, layout: int) -> torch.Tensor:
    """``out`` itself when its strides are ``layout``'s, else a copy that has them."""
    z, h, m, dv = out.shape
    want = out_strides(z, h, m, dv, layout)
    if all(st == w or n <= 1 for st, w, n in zip(out.stride(), want, out.shape)):
        return out
    return empty_out(z, h, m, dv, out.dtype, out.device, layout).copy_(out)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as5(t: Optional[torch.Tensor], h: int, hkv: int) -> Optional[torch.Tensor]:
    """View a tensor broadcastable to [Z, H, M, N] as broadcastable to [Z, Hkv, rep, M, N] (no copy)."""
    if t is None:
        return None
    while t.dim() < 4:
        t = t.unsqueeze(0)
    if t.shape[1] == 1:
        return t.unsqueeze(2)
    return t.unflatten(1, (hkv, h // hkv))


def _narrow(t: Optional[torch.Tensor], axis: int, start: int, stop: int) -> Optional[torch.Tensor]:
    """Slice a broadcastable operand along one axis, leaving broadcast (size-1) axes alone."""
    if t is None or t.shape[axis] == 1:
        return t
    return t.narrow(axis, start, stop - start)


class _Problem:
    """Shapes, 5-D views ([Z, Hkv, rep, S, D], no copies) and per-tile score computation for one call."""

    def __init__(self, q, k, v, bias, mask, seed, spec: Spec):
        z, h, m, _ = q.shape
        hkv, n = k.shape[1], k.shape[2]
        if h % hkv:
            raise ValueError(f"memattn: {h} query heads is not a multiple of {hkv} key/value heads")
        rep = h // hkv
        self.spec, self.m, self.n, self.dv = spec, m, n, v.shape[3]
        # fp32 accumulation as in the kernels; fp64 inputs stay fp64 so the op can serve as an fp64 reference.
        self.acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        self.shape5 = (z, hkv, rep)
        self.q5 = q.unflatten(1, (hkv, rep))
        self.k5 = k.unsqueeze(2)
        self.v5 = v.unsqueeze(2)
        self.bias5 = _as5(bias, h, hkv)
        self.mask5 = _as5(mask, h, hkv)
        self.seed = int(seed.item()) if (seed is not None and spec.dropout_p > 0) else 0
        dev = q.device
        self.zh = (torch.arange(z, device=dev).view(z, 1, 1) * h
                   + torch.arange(hkv, device=dev).view(1, hkv, 1) * rep
                   + torch.arange(rep, device=dev).view(1, 1, rep)).view(z, hkv, rep, 1, 1)
        self.neg_inf = torch.full((), float("-inf"), device=dev, dtype=self.acc)
        self.fill = torch.full((), spec.mask_fill, device=dev, dtype=self.acc)

    def key_stop(self, i1: int) -> int:
        """Keys past this index are masked for every row of a query block ending at i1: their tiles are skipped."""
        if not self.spec.causal:
            return self.n
        return max(0, min(self.n, i1 + self.spec.causal_offset))

    def scores(self, qi, i0, i1, j0, j1):
        """fp32 scores of tile rows [i0, i1) x cols [j0, j1), and tanh(s/softcap) for the softcap backward."""
        spec = self.spec
        s = torch.matmul(qi, self.k5[..., j0:j1, :].to(self.acc).transpose(-1, -2)) * spec.scale
        t = None
        if spec.softcap != 0:
            t = torch.tanh(s / spec.softcap)
            s = t * spec.softcap
        if self.bias5 is not None:
            s = s + _narrow(_narrow(self.bias5, -2, i0, i1), -1, j0, j1).to(self.acc)
        if self.mask5 is not None:
            mk = _narrow(_narrow(self.mask5, -2, i0, i1), -1, j0, j1)
            s = torch.where(mk if spec.mask_keep else ~mk, s, self.fill)
        if spec.causal:
            rows = torch.arange(i0, i1, device=s.device)
            cols = torch.arange(j0, j1, device=s.device)
            s = torch.where(cols[None, :] <= rows[:, None] + spec.causal_offset, s, self.neg_inf)
        return s, t

    def dropout_scale(self, i0, i1, j0, j1):
        """keep / (1 - p) for the tile, or None without dropout."""
        p = self.spec.dropout_p
        if p <= 0:
            return None
        dev = self.zh.device
        rows = torch.arange(i0, i1, device=dev).view(-1, 1)
        keep = rng.keep_mask(rng.row_hash(self.seed, self.zh, rows), torch.arange(j0, j1, device=dev), p)
        return keep.to(self.acc) * (1.0 / (1.0 - p))


def attention_forward(q, k, v, bias, mask, seed, spec: Spec, block_m: int | None = None,
                      block_n: int | None = None):
    """Returns (out [Z, H, M, Dv] in v.dtype and spec.out_layout, stats [2, Z, H, M] fp32: row max and log of the
    row sum)."""
    bm, bn = block_m or BLOCK_M, block_n or BLOCK_N
    pb = _Problem(q, k, v, bias, mask, seed, spec)
    z, hkv, rep = pb.shape5
    out = empty_out(z, hkv * rep, pb.m, pb.dv, v.dtype, q.device, spec.out_layout).unflatten(1, (hkv, rep))
    stats = torch.empty(2, z, hkv, rep, pb.m, dtype=stats_dtype(q.dtype), device=q.device)
    for i0 in range(0, pb.m, bm):
        i1 = min(pb.m, i0 + bm)
        qi = pb.q5[..., i0:i1, :].to(pb.acc)
        m_i = torch.full((z, hkv, rep, i1 - i0), float("-inf"), device=q.device, dtype=pb.acc)
        l_i = torch.zeros_like(m_i)
        acc = torch.zeros(z, hkv, rep, i1 - i0, pb.dv, device=q.device, dtype=pb.acc)
        for j0 in range(0, pb.key_stop(i1), bn):
            j1 = min(pb.n, j0 + bn)
            s, _ = pb.scores(qi, i0, i1, j0, j1)
            m_new = torch.maximum(m_i, s.amax(-1))
            # A row that is -inf so far keeps exp() finite: subtract 0 instead of -inf (no inf - inf = NaN here;
            # a row masked everywhere still ends as 0/0 = NaN below, which is what eager's softmax gives).
            m_safe = torch.where(m_new == float("-inf"), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - m_safe[..., None])
            alpha = torch.exp(m_i - m_safe)
            l_i = l_i * alpha + p.sum(-1)
            drop = pb.dropout_scale(i0, i1, j0, j1)
            if drop is not None:
                p = p * drop
            acc = acc * alpha[..., None] + torch.matmul(p, pb.v5[..., j0:j1, :].to(pb.acc))
            m_i = m_new
        o = acc / l_i[..., None]
        if pb.n == 0:  # softmax over no keys is empty and p @ v sums nothing: eager gives zeros
            o = torch.zeros_like(o)
        if spec.safe_softmax:
            o = torch.where((l_i == 0)[..., None], torch.zeros_like(o), o)
        out[..., i0:i1, :] = o.to(v.dtype)
        stats[0, ..., i0:i1] = m_i
        stats[1, ..., i0:i1] = torch.log(l_i)
    return out.flatten(1, 2), stats.flatten(2, 3)


def _reduce_to(g: torch.Tensor, shape) -> torch.Tensor:
    """Sum a gradient over the axes where ``shape`` broadcasts (size 1)."""
    dims = [i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1]
    return g.sum(dims, keepdim=True) if dims else g


def attention_backward(dout, q, k, v, out, stats, bias, mask, seed, spec: Spec, bias_grad: bool = False,
                       block_m: int | None = None, block_n: int | None = None):
    """Returns (dq, dk, dv, dbias or None); probabilities are recomputed tile by tile from the stats.

    Two passes over the key tiles of each query tile, as the kernels do (dq kernel, then dk/dv kernel):

    1. delta_i = sum_j p_ij dp_ij exactly (dp: the gradient of the dropped-and-scaled probabilities, dO v^T times
       the dropout scale), in the same loop as dq. FA2 takes delta = rowsum(dO * O) instead, which is the same
       number in exact arithmetic, but O is rounded to the input dtype: when p is nearly one-hot,
       ds = p (dp - delta) cancels and that rounding dominates dq, dk and dbias (bf16: ~20x eager's error).
       delta is only known at the end of the loop, so dq is accumulated around a shift known up front,
       d0 = rowsum(dO * O):  dq_i = scale * (sum_j w_ij (dp_ij - d0_i) k_j - (delta_i - d0_i) sum_j w_ij k_j)
       with w = p * keep * (1 - t^2) (keep: the mask, t: the softcap tanh). d0 is close to delta, so the first
       sum holds values of the size of ds (the kernel can round them to bf16 for its dot) and the second term is
       a small correction; for any finite d0 the result is the same.
    2. ds = p (dp - delta) with the exact delta, for dk, dv and dbias.
    """
    bm, bn = block_m or BLOCK_M, block_n or BLOCK_N
    pb = _Problem(q, k, v, bias, mask, seed, spec)
    z, hkv, rep = pb.shape5
    acc = pb.acc
    zero = torch.zeros((), device=q.device, dtype=acc)
    do5 = dout.unflatten(1, (hkv, rep)).to(acc)
    m5 = stats[0].unflatten(1, (hkv, rep)).to(acc)
    logl5 = stats[1].unflatten(1, (hkv, rep)).to(acc)
    shift = (do5 * out.unflatten(1, (hkv, rep)).to(acc)).sum(-1)  # d0 = rowsum(dO * O), delta up to rounding
    dq = torch.zeros(z, hkv, rep, pb.m, q.shape[-1], device=q.device, dtype=acc)
    dk = torch.zeros(z, hkv, pb.n, k.shape[-1], device=q.device, dtype=acc)
    dv = torch.zeros(z, hkv, pb.n, pb.dv, device=q.device, dtype=acc)
    dbias5 = None
    if bias_grad:
        dbias5 = torch.zeros(pb.bias5.shape, device=q.device, dtype=acc)

    def tile(qi, doi, m_i, logl_i, i0, i1, j0, j1):
        """p, p * dropout scale, dp (the gradient of p), the mask's keep or None, and tanh(s/softcap) or None."""
        s, t = pb.scores(qi, i0, i1, j0, j1)
        p = torch.exp((s - m_i) - logl_i)
        if spec.safe_softmax:  # rows masked everywhere output 0 and pass no gradient, as eager's _safe_softmax
            p = torch.where(m_i == float("-inf"), zero, p)
        dp = torch.matmul(doi, pb.v5[..., j0:j1, :].to(acc).transpose(-1, -2))
        drop = pb.dropout_scale(i0, i1, j0, j1)
        pd = p
        if drop is not None:
            pd, dp = p * drop, dp * drop
        keep = None
        if pb.mask5 is not None:  # filled positions are constants: no gradient flows through them
            mk = _narrow(_narrow(pb.mask5, -2, i0, i1), -1, j0, j1)
            keep = mk if spec.mask_keep else ~mk
        return p, pd, dp, keep, t

    for i0 in range(0, pb.m, bm):
        i1 = min(pb.m, i0 + bm)
        qi = pb.q5[..., i0:i1, :].to(acc)
        doi = do5[..., i0:i1, :]
        rows = (qi, doi, m5[..., i0:i1, None], logl5[..., i0:i1, None])
        shift_i = shift[..., i0:i1, None]
        delta_i = torch.zeros_like(shift_i)
        dq_shift = torch.zeros_like(qi)  # sum_j w (dp - d0) k_j
        dq_corr = torch.zeros_like(qi)  # sum_j w k_j
        for j0 in range(0, pb.key_stop(i1), bn):
            j1 = min(pb.n, j0 + bn)
            p, _, dp, keep, t = tile(*rows, i0, i1, j0, j1)
            delta_i = delta_i + (p * dp).sum(-1, keepdim=True)
            w = p if keep is None else torch.where(keep, p, zero)
            if t is not None:
                w = w * (1 - t * t)
            kj = pb.k5[..., j0:j1, :].to(acc)
            dq_shift += torch.matmul(w * (dp - shift_i), kj)
            dq_corr += torch.matmul(w, kj)
        dq[..., i0:i1, :] = (dq_shift - (delta_i - shift_i) * dq_corr) * spec.scale
        for j0 in range(0, pb.key_stop(i1), bn):
            j1 = min(pb.n, j0 + bn)
            p, pd, dp, keep, t = tile(*rows, i0, i1, j0, j1)
            dv[..., j0:j1, :] += torch.matmul(pd.transpose(-1, -2), doi).sum(2)
            ds = p * (dp - delta_i)
            if keep is not None:
                ds = torch.where(keep, ds, zero)
            if dbias5 is not None:
                g = _reduce_to(ds, _narrow(_narrow(dbias5, -2, i0, i1), -1, j0, j1).shape)
                _narrow(_narrow(dbias5, -2, i0, i1), -1, j0, j1).add_(g)
            if t is not None:
                ds = ds * (1 - t * t)
            ds = ds * spec.scale
            dk[..., j0:j1, :] += torch.matmul(ds.transpose(-1, -2), qi).sum(2)
    dbias = None
    if dbias5 is not None:
        dbias = dbias5.flatten(1, 2) if dbias5.shape[2] != 1 else dbias5.squeeze(2)
        dbias = dbias.reshape(bias.shape) if dbias.numel() == bias.numel() else dbias
        dbias = dbias.to(bias.dtype)
    return dq.flatten(1, 2).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias
