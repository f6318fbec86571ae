"""``torch.ops.memattn.attention``: the op every rewritten site becomes.

Arguments (the semantics are spelled out in ``attn_compiler/codegen/reference.py``):
    q [Z, H, M, D], k [Z, Hkv, N, D], v [Z, Hkv, N, Dv]   any strides; H % Hkv == 0 (GQA reads kv head h // (H/Hkv))
    bias   float tensor broadcastable to [Z, H, M, N], added to the scores, or None
    mask   bool tensor broadcastable to [Z, H, M, N], or None; ``mask_keep`` says whether True keeps or drops
    seed   int64 0-d tensor for dropout, or None
    scale, softcap, causal, causal_offset, mask_fill, mask_keep, dropout_p, safe_softmax   see the reference
    kernel "auto" | "triton" | "reference"
    out_layout   OUT_ZHMD (0, the default): out is contiguous; OUT_ZMHD (1): out is the [Z, H, M, Dv] view of a
                 contiguous [Z, M, H, Dv] buffer (what ``out.transpose(1, 2).contiguous()`` needs no copy for)
Returns (out [Z, H, M, Dv] in v.dtype with exactly out_layout's strides, stats [2, Z, H, M] fp32 (fp64 for fp64
inputs): each row's max score and the log of its sum of exp(s - max); logsumexp = stats[0] + stats[1]). The
backward recomputes blockwise from (q, k, v, out, stats): nothing of size M x N is saved.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from attn_compiler.codegen import dispatch
from attn_compiler.codegen.reference import OUT_LAYOUTS, empty_out, stats_dtype

_SCHEMA_ARGS = ("scale", "softcap", "causal", "causal_offset", "mask_fill", "mask_keep", "dropout_p",
                "safe_softmax")


def _check_shapes(q: Tensor, k: Tensor, v: Tensor) -> None:
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: "memattn.attention takes 4-D q, k, v")
    torch._check(q.shape[0] == k.shape[0] and k.shape[0] == v.shape[0], lambda: "batch sizes differ")
    torch._check(k.shape[1] == v.shape[1] and k.shape[2] == v.shape[2], lambda: "k and v disagree")
    torch._check(q.shape[3] == k.shape[3], lambda: "q and k head dims differ")
    torch._check(q.shape[1] % k.shape[1] == 0, lambda: "query heads must be a multiple of kv heads")


# Registered with torch.library.Library, not torch.library.custom_op: the op runs once per attention layer per step
# (eager-inner graphs, users' own calls), and custom_op's generated wrappers (an output-aliasing check on every call,
# an autograd wrapper whose fill_defaults re-parses the schema each time) cost host time on each (the measurement:
# benchmarks/results/tuning_notes.md). The pieces custom_op made are written out below: the schema, the
# implementation, the fake, and an autograd kernel that builds a node only when a gradient is wanted.
_lib = torch.library.Library("memattn", "DEF")  # noqa: TOR901 - kept alive for the life of the process
_TAGS = (torch.Tag.pt2_compliant_tag,)
_lib.define("attention(Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor? mask, Tensor? seed, float scale, "
            "float softcap, bool causal, SymInt causal_offset, float mask_fill, bool mask_keep, float dropout_p, "
            "bool safe_softmax, str kernel, SymInt out_layout=0) -> (Tensor, Tensor)", tags=_TAGS)
_lib.define("attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor stats, Tensor? bias, "
            "Tensor? mask, Tensor? seed, float scale, float softcap, bool causal, SymInt causal_offset, "
            "float mask_fill, bool mask_keep, float dropout_p, bool safe_softmax, str kernel, bool bias_grad) "
            "-> (Tensor, Tensor, Tensor, Tensor)", tags=_TAGS)

# The op's arguments by name. Graph passes build and read memattn.attention nodes through these helpers, never by
# position, so the schema above is the one place that orders them.
_SCHEMA = torch.ops.memattn.attention.default._schema
ARGS = tuple(a.name for a in _SCHEMA.arguments)


def attention_args(**named) -> tuple:
    """memattn.attention's positional arguments from their names; those with a default may be left out (and are
    left out of the call when no later argument is given, as the graph would print them)."""
    unknown = set(named) - set(ARGS)
    if unknown:
        raise TypeError(f"memattn.attention has no argument(s) {sorted(unknown)}; its arguments: {ARGS}")
    out, given = [], 0
    for a in _SCHEMA.arguments:
        if a.name in named:
            out.append(named[a.name])
            given = len(out)
        elif a.has_default_value():
            out.append(a.default_value)
        else:
            raise TypeError(f"memattn.attention: argument {a.name!r} is required")
    return tuple(out[:given])


def node_args(node) -> dict:
    """name -> value of a memattn.attention call in a graph, defaults filled in."""
    values = dict(zip(ARGS, node.args), **node.kwargs)
    return {a.name: values[a.name] if a.name in values else a.default_value for a in _SCHEMA.arguments}


def replace_args(node, **changes) -> tuple:
    """The positional arguments of a memattn.attention call with some of them changed by name."""
    return attention_args(**{**node_args(node), **changes})


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], mask: Optional[Tensor],
              seed: Optional[Tensor], scale: float, softcap: float, causal: bool, causal_offset: int,
              mask_fill: float, mask_keep: bool, dropout_p: float, safe_softmax: bool,
              kernel: str, out_layout: int = 0) -> tuple[Tensor, Tensor]:
    # out has the fake's strides exactly, whatever ran (dispatch's plans make sure of it)
    return dispatch.attention(q, k, v, bias, mask, seed, scale, softcap, causal, causal_offset, mask_fill, mask_keep,
                              dropout_p, safe_softmax, kernel, out_layout)


_lib.impl("attention", attention, "CompositeExplicitAutograd")


def _check_layout(out_layout: int) -> None:
    if out_layout not in OUT_LAYOUTS:
        raise ValueError(f"memattn.attention: out_layout must be one of {OUT_LAYOUTS}; got {out_layout!r}")


@torch.library.register_fake("memattn::attention", lib=_lib)
def _attention_fake(q, k, v, bias, mask, seed, scale, softcap, causal, causal_offset, mask_fill, mask_keep,
                    dropout_p, safe_softmax, kernel, out_layout=0):
    _check_shapes(q, k, v)
    _check_layout(out_layout)
    z, h, m, _ = q.shape
    out = empty_out(z, h, m, v.shape[3], v.dtype, q.device, out_layout)
    stats = q.new_empty((2, z, h, m), dtype=stats_dtype(q.dtype))
    return out, stats


def attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, stats: Tensor,
                       bias: Optional[Tensor], mask: Optional[Tensor], seed: Optional[Tensor], scale: float,
                       softcap: float, causal: bool, causal_offset: int, mask_fill: float, mask_keep: bool,
                       dropout_p: float, safe_softmax: bool, kernel: str,
                       bias_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, dbias = dispatch.attention_backward(dout, q, k, v, out, stats, bias, mask, seed, scale, softcap,
                                                    causal, causal_offset, mask_fill, mask_keep, dropout_p,
                                                    safe_softmax, kernel, bias_grad)
    if dbias is None:
        dbias = q.new_empty((0,))
    # contiguous whatever the implementation returns, so the fake below describes the strides exactly
    # (AOTAutograd traces views of these gradients against the fake's strides)
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dbias.contiguous()


_lib.impl("attention_backward", attention_backward, "CompositeExplicitAutograd")


@torch.library.register_fake("memattn::attention_backward", lib=_lib)
def _attention_backward_fake(dout, q, k, v, out, stats, bias, mask, seed, scale, softcap, causal, causal_offset,
                             mask_fill, mask_keep, dropout_p, safe_softmax, kernel, bias_grad):
    dbias = bias.new_empty(bias.shape) if (bias_grad and bias is not None) else q.new_empty((0,))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


_BACKENDS = (torch._C.DispatchKey.CPU, torch._C.DispatchKey.CUDA)


def _below_autograd(op, impl, keyset, inputs):
    """Run the op's kernels below autograd. Where the next key is the tensors' device itself (CPU or CUDA: no mode,
    tensor subclass, transform or autocast sits between autograd and the device kernel, which is ``impl``, the
    CompositeExplicitAutograd registration), ``impl`` is called directly: a redispatch would convert the 16
    arguments to C++ and back again for the same call (about a third of the op's own host time). Anything else
    (fake tensors, tracing, functionalization, a Meta tensor whose kernel is the fake) goes through the
    dispatcher."""
    keyset = keyset & torch._C._after_autograd_keyset
    with torch._C._AutoDispatchBelowAutograd():
        if keyset.highestPriorityTypeId() in _BACKENDS:
            return impl(*inputs)
        return op.redispatch(keyset, *inputs)


class _Attention(torch.autograd.Function):
    """The autograd node of one forward call: saves q, k, v, out and the row stats (nothing M x N) and runs
    attention_backward, which recomputes the probabilities blockwise. The op's scalar arguments travel as one
    tuple: autograd.Function.apply inspects every argument it is given, at a host cost per argument."""

    @staticmethod
    def forward(ctx, q, k, v, bias, mask, seed, keyset, params):
        out, stats = _below_autograd(torch.ops.memattn.attention.default, attention, keyset,
                                     (q, k, v, bias, mask, seed, *params))
        ctx.params = params[:len(_SCHEMA_ARGS) + 1]   # through ``kernel``; the backward ignores out_layout
        ctx.bias_grad = bias is not None and bias.requires_grad
        ctx.save_for_backward(q, k, v, out, stats, bias, mask, seed)
        ctx.mark_non_differentiable(stats)
        return out, stats

    @staticmethod
    def backward(ctx, dout, _dstats):
        q, k, v, out, stats, bias, mask, seed = ctx.saved_tensors
        dq, dk, dv, dbias = torch.ops.memattn.attention_backward(dout.contiguous(), q, k, v, out, stats, bias, mask,
                                                                  seed, *ctx.params, ctx.bias_grad)
        return dq, dk, dv, (dbias if ctx.bias_grad else None), None, None, None, None


def _attention_autograd(keyset, *inputs):
    if torch.is_grad_enabled() and torch._C._any_requires_grad(*inputs[:5]):
        return _Attention.apply(*inputs[:6], keyset, inputs[6:])
    return _below_autograd(torch.ops.memattn.attention.default, attention, keyset, inputs)


class _NoDoubleBackward(torch.autograd.Function):
    """attention_backward under a graph that wants its gradient (create_graph=True): a second derivative is not
    implemented, and saying so beats returning gradients that silently miss that path."""

    @staticmethod
    def forward(ctx, keyset, *inputs):
        return _below_autograd(torch.ops.memattn.attention_backward.default, attention_backward, keyset, inputs)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("memattn.attention: double backward (a gradient of the attention gradient) is not "
                           "implemented")


def _attention_backward_autograd(keyset, *inputs):
    if torch.is_grad_enabled() and torch._C._any_requires_grad(*inputs[:9]):
        return _NoDoubleBackward.apply(keyset, *inputs)
    return _below_autograd(torch.ops.memattn.attention_backward.default, attention_backward, keyset, inputs)


_lib.impl("attention", _attention_autograd, "Autograd", with_keyset=True)
_lib.impl("attention_backward", _attention_backward_autograd, "Autograd", with_keyset=True)
