"""Counter-based dropout randomness shared by the CPU reference and the Triton kernels.

The keep decision for score element (z, h, i, j) is a pure function of (seed, z*H + h, i, j), so the forward
and the recomputing backward see the same mask without storing it, whatever the block sizes are, and the CPU
reference and the GPU kernel drop the same elements. The hash is murmur3's 32-bit finaliser; the torch version
keeps every product below 2**63 by multiplying in 16-bit halves (int64 has no wrapping uint32 multiply).
"""
import torch

MASK32 = 0xFFFFFFFF
C1 = 0x85EBCA6B
C2 = 0xC2B2AE35
ROW_MUL = 0x9E3779B1  # golden-ratio constants spread consecutive indices before mixing
COL_MUL = 0x7FEB352D


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & MASK32


def fmix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, C1)
    x = x ^ (x >> 13)
    x = _mul32(x, C2)
    return x ^ (x >> 16)


def row_hash(seed: int, zh: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Hash of (seed, head index zh, query row i); zh and rows broadcast. int64 tensors holding uint32 values."""
    base = fmix32((zh * 0 + (seed & MASK32)) ^ _mul32(zh & MASK32, ROW_MUL))
    return fmix32(base ^ _mul32(rows & MASK32, COL_MUL))


def keep_mask(row_h: torch.Tensor, cols: torch.Tensor, p: float) -> torch.Tensor:
    """row_h [..., BM, 1] from row_hash, cols [BN] key indices -> bool keep mask [..., BM, BN]."""
    x = fmix32(row_h ^ _mul32(cols & MASK32, ROW_MUL))
    u = (x >> 8).to(torch.float32) * (1.0 / 16777216.0)  # 24 random bits, exact in fp32
    return u >= p
