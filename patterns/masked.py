"""Masks: an additive float bias (padding masks, ALiBi, relative-position bias) added to the scores, and boolean
masks applied with ``masked_fill`` or ``where`` (fills of -inf, finfo.min or any constant). Masks of any shape that
broadcasts to the scores are passed to the kernel as broadcast views; nothing is expanded."""
import torch
import torch.fx as fx

from attn_compiler.layout import constant_scalar_tensor, scalar_value, val
from attn_compiler.site import Reject

from .common import Operand, ScoreState

aten = torch.ops.aten


def _constant(x):
    """A fill value known at compile time, as a float."""
    s = scalar_value(x)
    if s is None and isinstance(x, fx.Node):
        s = constant_scalar_tensor(x)
    if isinstance(s, (int, float)):
        return float(s)
    return None


def _is_tensor(x):
    return isinstance(x, fx.Node) and isinstance(val(x), torch.Tensor)


def on_add(node, chain_arg: int, st: ScoreState) -> None:
    other = node.args[1 - chain_arg]
    alpha = node.kwargs.get("alpha", 1)
    if alpha != 1 or (chain_arg == 1 and len(node.args) > 2):
        raise Reject("add with alpha != 1 on the scores")
    if not _is_tensor(other) or val(other).dim() == 0:
        raise Reject("adds a scalar to the scores")
    dtype = val(other).dtype
    if dtype.is_complex:
        raise Reject(f"adds a {dtype} tensor to the scores")
    if st.masks and any(m.fill != float("-inf") for m in st.masks):
        raise Reject("a bias is added after a boolean mask with a finite fill")
    # an integer or bool bias (q_idx - kv_idx, a 0/1 mask) is promoted to the scores' float dtype by the add
    promoted = None if dtype.is_floating_point else val(node).dtype
    st.biases.append(Operand(other, [list(d) for d in st.dims], dtype=promoted))
    st.tag("masked(additive)")


def _add_mask(st: ScoreState, mask, keep: bool, fill) -> None:
    if not _is_tensor(mask) or val(mask).dtype != torch.bool:
        raise Reject("masked_fill/where condition is not a boolean tensor")
    if fill is None:
        raise Reject("the mask fill value is not a compile-time constant")
    if st.masks and st.masks[0].fill != fill:
        raise Reject("two boolean masks with different fill values")
    st.masks.append(Operand(mask, [list(d) for d in st.dims], keep=keep, fill=fill))
    st.tag("masked(bool)")


def on_masked_fill(node, chain_arg: int, st: ScoreState) -> None:
    if chain_arg != 0:
        raise Reject("the scores are the mask of a masked_fill")
    _add_mask(st, node.args[1], keep=False, fill=_constant(node.args[2]))


def on_where(node, chain_arg: int, st: ScoreState) -> None:
    cond, a, b = node.args[:3]
    if chain_arg == 0:
        raise Reject("the scores are the condition of a where")
    other = b if chain_arg == 1 else a
    _add_mask(st, cond, keep=(chain_arg == 1), fill=_constant(other))


SCORE_HANDLERS = {aten.add.Tensor: on_add, aten.masked_fill.Scalar: on_masked_fill,
                  aten.masked_fill.Tensor: on_masked_fill, aten.where.self: on_where,
                  aten.where.ScalarOther: on_where, aten.where.ScalarSelf: on_where, aten.where.Scalar: on_where}
# the arguments the scores may flow through: never a where's condition, never a masked_fill's mask
SCORE_OPERANDS = {aten.where.self: (1, 2), aten.where.ScalarOther: (1, 2), aten.where.ScalarSelf: (1, 2),
                  aten.masked_fill.Scalar: (0,), aten.masked_fill.Tensor: (0,)}


# Spellings: mask arguments are built by the tests to broadcast against [B, H, Sq, Sk].
def additive(q, k, v, bias):
    return torch.softmax(q @ k.transpose(-2, -1) * q.size(-1) ** -0.5 + bias, -1) @ v


def additive_then_div(q, k, v, bias):
    # the scale after the bias: (s + bias) / sqrt(d) scales the bias too
    return torch.softmax((q @ k.transpose(-2, -1) + bias) / q.size(-1) ** 0.5, -1) @ v


def masked_fill_neg_inf(q, k, v, keep):
    s = (q @ k.transpose(-2, -1)).masked_fill(~keep, float("-inf"))
    return torch.softmax(s, -1) @ v


def masked_fill_finfo_min(q, k, v, keep):
    s = (q @ k.transpose(-2, -1)).masked_fill(keep.logical_not(), torch.finfo(q.dtype).min)
    return torch.softmax(s, -1) @ v


def where_keep(q, k, v, keep):
    s = torch.where(keep, q @ k.transpose(-2, -1), float("-inf"))
    return torch.softmax(s, -1) @ v


def bool_added(q, k, v, keep):
    # a bool tensor added to the scores: 0 or 1, promoted to the scores' dtype by the add
    return torch.softmax(q @ k.transpose(-2, -1) * q.size(-1) ** -0.5 + keep, -1) @ v


def int_relative(q, k, v, keep):
    # an int64 bias: the clamped relative position j - i (plus the mask as 0/1)
    i = torch.arange(q.shape[-2], device=q.device)[:, None]
    j = torch.arange(k.shape[-2], device=q.device)[None, :]
    return torch.softmax(q @ k.transpose(-2, -1) * q.size(-1) ** -0.5 + ((j - i).clamp(-4, 4) + keep), -1) @ v


SPELLINGS = {"additive": additive, "additive_then_div": additive_then_div,
             "masked_fill_neg_inf": masked_fill_neg_inf, "masked_fill_finfo_min": masked_fill_finfo_min,
             "where_keep": where_keep, "bool_added": bool_added, "int_relative": int_relative}


def example_args(name, q, k, v, shape=None):
    """SPELLINGS[name]'s arguments: a boolean keep mask (or a bias made from one) over [B, 1, M, N] by default,
    keeping key 0 of every row (fully masked rows have tests of their own)."""
    g = torch.Generator().manual_seed(7)
    keep = torch.rand(shape or (q.shape[0], 1, q.shape[2], k.shape[2]), generator=g) > 0.3
    keep[..., 0] = True
    if name.startswith("additive"):
        return q, k, v, torch.where(keep, 0.0, -1e4) + torch.randn(keep.shape, generator=g) * 0.5
    return q, k, v, keep


def check_site(name, site, q, k, v) -> None:
    """What a rewritten site of SPELLINGS[name] must say (tests): one mask, passed to the kernel, not causal."""
    flags = site.flags
    assert flags["bias"] + flags["bool_masks"] == 1 and not flags["causal"], flags
