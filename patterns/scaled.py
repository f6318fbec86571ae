"""Scaled scores: ``mul``/``div`` by a constant or a symbolic scalar (1/sqrt(d) of a dynamic head dim), applied to
the scores, to q or to k. Scaling of q/k is folded by attn_compiler/layout.py; this family handles the scores."""
import math
import operator

import torch
import torch.fx as fx

from attn_compiler.layout import constant_scalar_tensor, scale_of, tensor_literal, val
from attn_compiler.site import Reject

from .common import ScoreState, fold_factors

aten = torch.ops.aten


# ops a 0-d scale tensor may be computed with (``torch.tensor(q.size(-1)).rsqrt()``): exact in Python floats
_UNARY = {aten.rsqrt.default: lambda x: x ** -0.5, aten.sqrt.default: math.sqrt,
          aten.reciprocal.default: lambda x: 1.0 / x, aten.neg.default: lambda x: -x}
_BINARY = {aten.mul.Tensor: operator.mul, aten.mul.Scalar: operator.mul, aten.div.Tensor: operator.truediv,
           aten.div.Scalar: operator.truediv, aten.pow.Tensor_Scalar: operator.pow}
_COPIES = (aten.lift_fresh_copy.default, aten._to_copy.default, aten.to.dtype, aten.clone.default,
           aten.alias.default)


def zero_d_value(x, depth: int = 0):
    """The number a 0-d tensor of the graph holds when it is computed only from numbers and sizes (a literal, a
    scalar_tensor of a size, and the ops above), else None. Each step is rounded to its tensor's dtype, as eager
    computes it (a bf16 scale stays a bf16 number). A size is specialised to its value with a guard, as a scale
    computed from shapes is (common.fold_factors)."""
    value = _zero_d_value(x, depth)
    if value is None or not isinstance(x, fx.Node):
        return value
    dtype = val(x).dtype if isinstance(val(x), torch.Tensor) else torch.float64
    if dtype.is_floating_point:
        return torch.tensor(value, dtype=dtype).item()
    return float(int(value))   # an integer tensor: a float converted to it truncates toward zero


def _zero_d_value(x, depth: int):
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    if not isinstance(x, fx.Node) or depth > 8:
        return None
    if x.op == "get_attr":
        lit = tensor_literal(x)
        return float(lit) if isinstance(lit, (int, float)) and not isinstance(lit, bool) else None
    t = val(x)
    if x.op != "call_function" or not isinstance(t, torch.Tensor) or t.dim() != 0 or t.dtype == torch.bool:
        return None
    s = constant_scalar_tensor(x)
    if s is not None:
        sym = val(s) if isinstance(s, fx.Node) else s
        return float(sym) if isinstance(sym, (int, float, torch.SymInt, torch.SymFloat)) else None
    if x.target in _COPIES and not x.kwargs.get("dtype", torch.float32).is_complex:
        return zero_d_value(x.args[0], depth + 1)
    if x.target in _UNARY:
        a = zero_d_value(x.args[0], depth + 1)
        return None if a is None or (a <= 0 and x.target is not aten.neg.default) else _UNARY[x.target](a)
    if x.target in _BINARY and len(x.args) == 2:
        a, b = (zero_d_value(y, depth + 1) for y in x.args)
        if a is None or b is None or (b == 0 and x.target in (aten.div.Tensor, aten.div.Scalar)):
            return None
        try:
            out = _BINARY[x.target](a, b)
        except (OverflowError, ZeroDivisionError):
            return None
        return out if isinstance(out, float) and math.isfinite(out) else None   # e.g. (-4) ** 0.5 is complex
    return None


def _tensor_scale(node, chain_arg: int):
    """(chain_arg, factor) for scores times or over a 0-d tensor that zero_d_value reads, else None."""
    if len(node.args) != 2 or node.kwargs or node.target not in (aten.mul.Tensor, aten.div.Tensor):
        return None
    if node.target is aten.div.Tensor and chain_arg != 0:
        return None
    value = zero_d_value(node.args[1 - chain_arg])
    if value is None:
        return None
    return chain_arg, ("mul" if node.target is aten.mul.Tensor else "div", value)


def on_scale(node, chain_arg: int, st: ScoreState) -> None:
    sc = scale_of(node, inplace_ok=True) or _tensor_scale(node, chain_arg)
    if sc is None or sc[0] != chain_arg:
        raise Reject(f"the scores are multiplied by a tensor ({node.format_node()}), not a scalar")
    if st.biases or st.masks:
        _scale_applied_terms(st, sc[1])
    (st.softcap_post if st.softcap_post is not None else st.scale).append(sc[1])
    st.tag("scaled")


def _scale_applied_terms(st: ScoreState, factor) -> None:
    """(s + bias) * c = s * c + bias * c, and where(m, s, fill) * c = where(m, s * c, fill * c): a scale after the
    bias or mask (Falcon's ALiBi: ``(scores + alibi) * inv_norm``) moves onto those terms. c must be a nonzero
    number: 0 * -inf fills would be NaN. One computed from shapes (1/sqrt(d) of a dynamic head dim) is specialised
    with a guard, as the rewrite does for the scale; a value read from a tensor at run time cannot be."""
    kind, value = factor
    c = fold_factors([("mul", value)])  # a shape-derived value is guarded; a run-time one raises Reject
    if c == 0:
        raise Reject("the scores are scaled after a mask or bias by zero")
    c = c if kind == "mul" else 1.0 / c
    if st.softcap_post is not None:
        raise Reject("the scores are scaled after the soft-cap and a mask or bias")
    for op in st.biases:
        op.coef = op.coef * c
    for op in st.masks:
        op.fill = op.fill * c


SCORE_HANDLERS = {aten.mul.Tensor: on_scale, aten.mul.Scalar: on_scale, aten.div.Tensor: on_scale,
                  aten.div.Scalar: on_scale}


def falcon_inplace(q, k, v):
    """Falcon's spelling: the scores are scaled in place (``scores /= sqrt(d)``), then masked in place."""
    s = q @ k.transpose(-2, -1)
    s /= math.sqrt(q.size(-1))
    n = s.shape[-1]
    s.masked_fill_(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v


def mul_scores(q, k, v):
    return torch.softmax((q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1])), -1) @ v


def div_scores(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)), -1) @ v


def scale_q(q, k, v):
    return torch.softmax((q * q.size(-1) ** -0.5) @ k.transpose(-2, -1), -1) @ v


def scale_qk_split(q, k, v):
    s = q.size(-1) ** -0.25
    return torch.softmax((q * s) @ (k * s).transpose(-2, -1), -1) @ v


def softmax_fp32(q, k, v):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    return torch.softmax(s.float(), dim=-1).to(q.dtype) @ v


def tensor_scale(q, k, v):
    """The scale as a 0-d tensor computed from a size (a 0-d float32 tensor times the scores)."""
    return torch.softmax(q @ k.transpose(-2, -1) * torch.tensor(q.size(-1)).rsqrt(), -1) @ v


def tensor_literal_div(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) / torch.sqrt(torch.tensor(q.shape[-1], dtype=torch.float32)),
                         -1) @ v


SPELLINGS = {"mul_scores": mul_scores, "div_scores": div_scores, "scale_q": scale_q,
             "scale_qk_split": scale_qk_split, "softmax_fp32": softmax_fp32,
             "falcon_inplace": falcon_inplace, "tensor_scale": tensor_scale, "tensor_literal_div": tensor_literal_div}


def check_site(name, site, q, k, v) -> None:
    """What a rewritten site of SPELLINGS[name] must say (tests): every spelling scales by 1/sqrt(d)."""
    assert "scaled" in site.pattern, site.pattern
    assert abs(site.flags["scale"] * math.sqrt(q.shape[-1]) - 1) < 1e-6, site.flags
