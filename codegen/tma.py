"""TMA (Hopper and later): the forward kernels' K/V tiles copied by the tensor memory accelerator.

A descriptor of the whole [Z, Hkv, N, D] tensor replaces the pointer loads (USE_TMA in tiles.py's flag table); rows
past N and dims past D read as 0, exactly what the masked loads give, so nothing else in the kernels changes.
MEMATTN_TMA=0 turns it off, =1 turns it on wherever the layout allows (the interpreter included, which is how CPU
tests reach it); the default is on for compute capability >= 9. A TMA launch that fails to compile or encode turns
it off for the rest of the process (``failure``); the pointer-load kernels compute the same.
"""
from __future__ import annotations

import warnings

from attn_compiler import config

from . import launch

try:  # host-side TMA descriptors (Triton >= 3.3)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: pointer loads only
    TensorDescriptor = None

_failed = False


def failed() -> bool:
    """Whether a TMA launch failed in this process (TMA is then off)."""
    return _failed


def wanted(device) -> bool:
    mode = config.read("MEMATTN_TMA")
    if TensorDescriptor is None or mode == "0" or _failed:
        return False
    if config.interpret():
        return mode == "1"
    return launch.hopper_or_later(device)


def warp_spec_wanted() -> bool:
    """Warp specialisation of the forward's K/V loop (Triton's ``tl.range(warp_specialize=True)``: producer warps
    issue the TMA copies, consumer warps do the math), with TMA only. An experiment, off unless MEMATTN_WS=1:
    Triton 3.6 does not compile it for sm_90 (the launch then falls back to pointer loads without it, as any TMA
    failure does). Kept so that a later Triton can be measured with one variable (benchmarks/prefill.py) before it
    becomes a default or an autotune choice."""
    return config.read("MEMATTN_WS") == "1"


def block_hook(nargs):
    """Autotune pre-hook: a TMA descriptor's box is the tile of the config about to run."""
    if nargs.get("USE_TMA"):
        nargs["KDesc"].block_shape = [1, 1, nargs["BLOCK_N"], nargs["BLOCK_D"]]
        nargs["VDesc"].block_shape = [1, 1, nargs["BLOCK_N"], nargs["BLOCK_DV"]]


def _desc(t):
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


def descs(k, v):
    """(k descriptor, v descriptor, True), or (k, v, False) when TMA is off or either layout rules it out."""
    if wanted(k.device) and min(k.shape) > 0:
        kd, vd = _desc(k), _desc(v)
        if kd is not None and vd is not None:
            return kd, vd, True
    return k, v, False


def desc_like(template, base):
    """``template`` (a TensorDescriptor planned for this call signature) over ``base``: the checks its constructor
    makes were made when the plan was (the signature fixes shape, strides and alignment)."""
    d = object.__new__(type(template))
    d.__dict__.update(template.__dict__)
    d.base = base
    return d


def failure(e: Exception) -> None:
    """A TMA launch failed to compile or encode: warn once, use pointer loads for the rest of the process, and drop
    every plan (the pointer-load kernels compute the same)."""
    global _failed
    _failed = True
    launch.invalidate()
    warnings.warn(f"memattn: the TMA variant of the attention kernels failed ({type(e).__name__}: {e}); "
                  "using pointer loads from now on", RuntimeWarning, stacklevel=4)
