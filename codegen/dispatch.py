"""Chooses the implementation behind ``torch.ops.memattn.attention`` for each call signature, and keeps the choice.

"reference" always runs the blockwise torch implementation. "triton" runs the generated Triton kernel (on a CUDA
device, or on the CPU under TRITON_INTERPRET=1). "auto" runs Triton on CUDA when it is importable, else the
reference. A Triton failure (compile error, launch error, unsupported shape) never crashes a training step: the call
falls back to the reference, warns once per reason, and the failure is recorded for the report.

The op calls ``attention`` / ``attention_backward`` with its own arguments. A call's *signature* (shapes, strides,
dtypes, devices and 16-byte alignment of its tensors, and every scalar argument) decides everything but the data:
which implementation runs, whether the kernels support it, the Spec, every kernel argument that is not a tensor,
and (after the first call) the compiled kernels themselves (codegen/launch.py). So the first call of a signature
makes a plan and keeps it in a PlanCache; later calls look the plan up and run it. ``forward`` / ``backward`` take
a Spec and plan afresh on every call (tests, benchmarks).
"""
from __future__ import annotations

import contextlib
import importlib
import warnings

import torch

from attn_compiler import config

from . import launch, reference
from .reference import Spec

DECODE_MAX_Q = 16  # query rows up to which a call is a decode step (split-KV kernel, codegen/triton_decode.py)

# reason -> count of calls that fell back; read by the report.
fallbacks: dict[str, int] = {}
_warned: set[str] = set()


def is_decode(m: int, dropout_p: float) -> bool:
    """A call with at most DECODE_MAX_Q query rows and no dropout is a decode step: split-KV kernel."""
    return m <= DECODE_MAX_Q and dropout_p == 0


_modules: dict = {}


def _triton_module(name: str):
    """The kernel module, imported on first use (Triton is optional) and then looked up."""
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(f".{name}", __package__)
        except ImportError:
            _modules[name] = None
    return _modules[name]


def _wants_triton(q, kernel: str) -> bool:
    """Kernel "auto" runs Triton on CUDA; "triton" on CUDA or under the interpreter."""
    if kernel == "reference":
        return False
    if q.is_cuda:
        return True
    return kernel == "triton" and config.interpret()


def _fallback(reason: str) -> None:
    fallbacks[reason] = fallbacks.get(reason, 0) + 1
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"memattn: Triton attention kernel unavailable ({reason}); using the reference "
                      "implementation for this call", RuntimeWarning, stacklevel=4)


def device_guard(q):
    """Triton launches on the current CUDA device, not on its tensors' one: a model split over GPUs in one process
    (HF's device_map="auto") would otherwise launch a layer's kernel on another GPU than its cache and weights."""
    return torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext()


# --- plans -------------------------------------------------------------------------------------------------------

class _Reference:
    """The blockwise torch implementation; ``reason``: why Triton does not run this signature (counted per call
    for the report), or None when the reference is what was asked for."""

    __slots__ = ("fn", "spec", "reason", "extra")

    def __init__(self, fn, spec, reason=None, extra=()):
        self.fn, self.spec, self.reason, self.extra = fn, spec, reason, extra

    def __call__(self, *tensors):
        if self.reason is not None:
            _fallback(self.reason)
        return self.fn(*tensors, self.spec, *self.extra)


class _Triton:
    """A Triton module's plan, entered on its tensors' device; if it raises, the call and every later one of the
    signature run the reference instead (with the failure recorded), so a failing compile is not retried per
    call."""

    __slots__ = ("inner", "ref", "device_index")

    def __init__(self, inner, ref, device):
        self.inner, self.ref = inner, ref
        self.device_index = device.index if device.type == "cuda" else None

    def __call__(self, *tensors):
        if self.inner is None:
            return self.ref(*tensors)
        try:
            if self.device_index is None or torch.cuda.current_device() == self.device_index:
                return self.inner(*tensors)
            with device_guard(tensors[0]):
                return self.inner(*tensors)
        except Exception as e:  # compile or launch failure: keep training, say why
            self.inner = None
            self.ref.reason = launch.describe(e)
            return self.ref(*tensors)


def _plan(kind: str, kernel: str, tensors: tuple, spec: Spec, ref: _Reference, module: str):
    """The plan of a call: Triton's (the module's ``plan_<kind>`` over ``tensors``, the Spec and ``ref.extra``)
    where it is wanted and supported, else ``ref`` with the reason."""
    q = tensors[0] if kind == "forward" else tensors[1]
    if not _wants_triton(q, kernel):
        return ref
    mod = _triton_module(module)
    if mod is None:
        ref.reason = "the Triton kernel module is not available"
        return ref
    args = (*tensors, spec, *ref.extra)
    ok, reason = mod.supports(*args)
    if not ok:
        ref.reason = reason
        return ref
    try:
        with device_guard(q):
            inner = getattr(mod, f"plan_{kind}")(*args)
    except Exception as e:  # noqa: BLE001 - planning failed (an unsupported layout, say): the reference runs it
        ref.reason = launch.describe(e)
        return ref
    return _Triton(inner, ref, q.device)


def _in_layout(fn, layout):
    def forward(*tensors):
        out, stats = fn(*tensors)
        return reference.in_layout(out, layout), stats
    return forward


def plan_forward(q, k, v, bias, mask, seed, spec: Spec, kernel: str):
    """The forward of one call signature: a callable (q, k, v, bias, mask, seed) -> (out in spec.out_layout,
    stats)."""
    module = "triton_decode" if is_decode(q.shape[2], spec.dropout_p) else "triton_prefill"
    ref = _Reference(_in_layout(reference.attention_forward, spec.out_layout), spec)
    return _plan("forward", kernel, (q, k, v, bias, mask, seed), spec, ref, module)


def plan_backward(dout, q, k, v, out, stats, bias, mask, seed, spec: Spec, kernel: str, bias_grad: bool):
    """The backward of one call signature: a callable (dout, q, k, v, out, stats, bias, mask, seed) -> (dq, dk,
    dv, dbias or None)."""
    ref = _Reference(reference.attention_backward, spec, extra=(bias_grad,))
    return _plan("backward", kernel, (dout, q, k, v, out, stats, bias, mask, seed), spec, ref, "triton_prefill")


def forward(q, k, v, bias, mask, seed, spec: Spec, kernel: str):
    """One forward call, planned afresh: (out, stats)."""
    return plan_forward(q, k, v, bias, mask, seed, spec, kernel)(q, k, v, bias, mask, seed)


def backward(dout, q, k, v, out, stats, bias, mask, seed, spec: Spec, kernel: str, bias_grad: bool):
    """One backward call, planned afresh: (dq, dk, dv, dbias or None)."""
    return plan_backward(dout, q, k, v, out, stats, bias, mask, seed, spec, kernel, bias_grad)(
        dout, q, k, v, out, stats, bias, mask, seed)


# --- the op's entry points: plans kept by call signature ---------------------------------------------------------

_forward_plans = launch.PlanCache()
_backward_plans = launch.PlanCache()


def _sig(t):
    """What a planned call assumes of an optional tensor argument."""
    if t is None:
        return None
    return t.shape, t.stride(), t.dtype, t.device, t.data_ptr() & 15


def _spec(scale, softcap, causal, causal_offset, mask_fill, mask_keep, dropout_p, safe_softmax,
          out_layout=0) -> Spec:
    """The op's scalar arguments as a Spec (the schema's floats and SymInts as Python numbers)."""
    return Spec(float(scale), float(softcap), bool(causal), int(causal_offset), float(mask_fill), bool(mask_keep),
                float(dropout_p), bool(safe_softmax), int(out_layout))


def _interpreted(q) -> bool:
    """TRITON_INTERPRET decides CPU tensors' plans (it is read only for them)."""
    return not q.is_cuda and config.interpret()


def attention(q, k, v, bias, mask, seed, scale, softcap, causal, causal_offset, mask_fill, mask_keep, dropout_p,
              safe_softmax, kernel, out_layout):
    """torch.ops.memattn.attention's implementation: (out, stats) by the plan of the call's signature."""
    key = (q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), q.dtype, k.dtype, v.dtype, q.device,
           k.device, v.device, q.data_ptr() & 15, k.data_ptr() & 15, v.data_ptr() & 15, _sig(bias), _sig(mask),
           _sig(seed), scale, softcap, causal, causal_offset, mask_fill, mask_keep, dropout_p, safe_softmax,
           kernel, out_layout, _interpreted(q))
    plan = _forward_plans.get(key)
    if plan is None:
        if out_layout not in reference.OUT_LAYOUTS:
            raise ValueError(f"memattn.attention: out_layout must be one of {reference.OUT_LAYOUTS}; got "
                             f"{out_layout!r}")
        spec = _spec(scale, softcap, causal, causal_offset, mask_fill, mask_keep, dropout_p, safe_softmax,
                     out_layout)
        plan = plan_forward(q, k, v, bias, mask, seed, spec, kernel)
        _forward_plans.put(key, plan)
    return plan(q, k, v, bias, mask, seed)


def attention_backward(dout, q, k, v, out, stats, bias, mask, seed, scale, softcap, causal, causal_offset,
                       mask_fill, mask_keep, dropout_p, safe_softmax, kernel, bias_grad):
    """torch.ops.memattn.attention_backward's implementation: (dq, dk, dv, dbias or None) by the plan of the
    call's signature."""
    key = (dout.shape, dout.stride(), q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), out.shape,
           out.stride(), stats.shape, stats.stride(), q.dtype, k.dtype, v.dtype, dout.dtype, out.dtype, stats.dtype,
           q.device, k.device, v.device, dout.device, out.device, stats.device,
           q.data_ptr() & 15, k.data_ptr() & 15, v.data_ptr() & 15, dout.data_ptr() & 15, out.data_ptr() & 15,
           _sig(bias), _sig(mask), _sig(seed), scale, softcap, causal, causal_offset, mask_fill, mask_keep,
           dropout_p, safe_softmax, kernel, bias_grad, _interpreted(q))
    plan = _backward_plans.get(key)
    if plan is None:
        spec = _spec(scale, softcap, causal, causal_offset, mask_fill, mask_keep, dropout_p, safe_softmax)
        plan = plan_backward(dout, q, k, v, out, stats, bias, mask, seed, spec, kernel, bool(bias_grad))
        _backward_plans.put(key, plan)
    return plan(dout, q, k, v, out, stats, bias, mask, seed)
