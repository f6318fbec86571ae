"""Chooses the implementation behind ``torch.ops.memattn.attention`` for each call.

"reference" always runs the blockwise torch implementation. "triton" runs the generated Triton kernel (on a CUDA
device, or on the CPU under TRITON_INTERPRET=1). "auto" runs Triton on CUDA when it is importable, else the
reference. A Triton failure (compile error, launch error, unsupported shape) never crashes a training step: the call
falls back to the reference, warns once per reason, and the failure is recorded for the report.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import warnings

import torch

from . import reference

KERNELS = ("auto", "triton", "reference")
DECODE_MAX_Q = 16  # query rows up to which a call is a decode step (split-KV kernel, codegen/triton_decode.py)

# reason -> count of calls that fell back; read by the report.
fallbacks: dict[str, int] = {}
_warned: set[str] = set()


def is_decode(m: int, dropout_p: float) -> bool:
    """A call with at most DECODE_MAX_Q query rows and no dropout is a decode step: split-KV kernel."""
    return m <= DECODE_MAX_Q and dropout_p == 0


_modules: dict = {}


def _triton_module(name: str):
    """The kernel module, imported on first use (Triton is optional) and then looked up: this runs on every call."""
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(f".{name}", __package__)
        except ImportError:
            _modules[name] = None
    return _modules[name]


def _wants_triton(q, kernel: str) -> bool:
    """Kernel "auto" runs Triton on CUDA; "triton" on CUDA or under the interpreter (the environment is read only
    then: each read costs a microsecond or more, on every call)."""
    if kernel == "reference":
        return False
    if q.is_cuda:
        return True
    return kernel == "triton" and os.environ.get("TRITON_INTERPRET") == "1"


def _fallback(reason: str) -> None:
    fallbacks[reason] = fallbacks.get(reason, 0) + 1
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"memattn: Triton attention kernel unavailable ({reason}); using the reference "
                      "implementation for this call", RuntimeWarning, stacklevel=3)


def device_guard(q):
    """Triton launches on the current CUDA device, not on its tensors' one: a model split over GPUs in one process
    (HF's device_map="auto") would otherwise launch a layer's kernel on another GPU than its cache and weights."""
    return torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext()


def _run(kind: str, kernel: str, q, args, ref_fn, module: str = "triton_prefill"):
    if _wants_triton(q, kernel):
        mod = _triton_module(module)
        if mod is None:
            _fallback("the Triton kernel module is not available")
        else:
            ok, reason = mod.supports(*args)
            if not ok:
                _fallback(reason)
            else:
                try:
                    with device_guard(q):
                        return getattr(mod, kind)(*args)
                except Exception as e:  # compile or launch failure: keep training, say why
                    _fallback(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return ref_fn(*args)


def forward(q, k, v, bias, mask, seed, spec, kernel: str):
    module = "triton_decode" if is_decode(q.shape[2], spec.dropout_p) else "triton_prefill"
    return _run("forward", kernel, q, (q, k, v, bias, mask, seed, spec), reference.attention_forward, module)


def backward(dout, q, k, v, out, stats, bias, mask, seed, spec, kernel: str, bias_grad: bool):
    def ref(dout, q, k, v, out, stats, bias, mask, seed, spec, bias_grad):
        return reference.attention_backward(dout, q, k, v, out, stats, bias, mask, seed, spec, bias_grad)

    return _run("backward", kernel, q, (dout, q, k, v, out, stats, bias, mask, seed, spec, bias_grad), ref)
