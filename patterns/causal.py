"""Causal masks built in the graph (``tril``/``triu`` of ones or of a filled tensor, ``arange`` comparisons,
``where``/``masked_fill`` turning a predicate into an additive mask, slices of these), proven causal so the kernel
can skip the blocks above the diagonal and the n x n mask is never built.

The proof is an abstract interpretation of the mask's producers: integer tensors are affine functions of their
own indices (``arange`` gives idx + start), boolean tensors are half-planes ``sum(c_a * idx_a) <= c0``, and float
masks are ``select(predicate, a, b)`` of two constants. A mask proves causal when, aligned to the scores, it allows
key j for query i exactly when ``j - i <= offset``; the offset may be symbolic (an FX node) when the mask was
sliced with a dynamic start. Masks read from buffers or inputs are data, not structure: they are passed to the
kernel as tensors, which is always correct.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
import torch.fx as fx

from attn_compiler.layout import known_eq, shape_of, tensor_literal, val

from .common import ScoreState

aten = torch.ops.aten


# Linear expressions over FX scalar nodes: {1: const, node: coef}. Kept symbolic so a dynamic offset can be
# emitted as graph code.
def _lin(x) -> Optional[dict]:
    if isinstance(x, bool):
        return None
    if isinstance(x, int):
        return {1: x}
    if isinstance(x, fx.Node) and isinstance(val(x), (torch.SymInt, int)):
        return {x: 1}
    return None


def _ladd(a: dict, b: dict, sign: int = 1) -> dict:
    out = dict(a)
    for key, c in b.items():
        out[key] = out.get(key, 0) + sign * c
        if out[key] == 0 and key != 1:
            del out[key]
    out.setdefault(1, 0)
    return out


@dataclasses.dataclass(frozen=True)
class Index:  # integer tensor: value = sum(coef[a] * idx_a) + const
    coef: tuple
    const: Any  # linear dict


@dataclasses.dataclass(frozen=True)
class Pred:  # bool tensor: sum(coef[a] * idx_a) <= bound
    coef: tuple
    bound: Any  # linear dict


@dataclasses.dataclass(frozen=True)
class All:  # bool tensor: every predicate holds (a causal mask narrowed by a sliding window)
    preds: tuple


@dataclasses.dataclass(frozen=True)
class Const:
    value: Any  # bool or float, same everywhere


@dataclasses.dataclass(frozen=True)
class Select:  # float tensor: a where pred else b
    pred: Any  # Pred or All
    a: float
    b: float


def _neg(p):
    # not (L <= c)  <=>  L >= c + 1  <=>  -L <= -c - 1   (integer indices). A negated conjunction is a
    # disjunction, which this domain does not hold.
    if not isinstance(p, Pred):
        return None
    return Pred(tuple(-c for c in p.coef), _ladd({1: -1}, p.bound, -1))


def _literal(n: fx.Node):
    """The value of a one-element tensor literal of the traced code: ``torch.tensor(0.0)`` (HF's masks of
    transformers 5.17 fill with it) traces to ``lift_fresh_copy(_tensor_constant<k>)``, a fresh copy of a graph
    constant on every call, so its value is part of the program. Anything else read through get_attr (a buffer, a
    parameter, a tensor the user may change between calls) is data: None."""
    value = tensor_literal(n) if isinstance(n.target, str) else None
    return None if value is None else Const(value)


class _Interp:
    def __init__(self):
        self.memo: dict = {}

    def eval(self, node) -> Any:
        if not isinstance(node, fx.Node):
            if isinstance(node, (bool, int, float)):
                return Const(node)
            return None
        if node in self.memo:
            return self.memo[node]
        try:
            out = self._eval(node)
        except (TypeError, ValueError, IndexError, KeyError):
            out = None
        self.memo[node] = out
        return out

    def _rank(self, node):
        s = shape_of(node)
        return len(s) if s is not None else None

    def _eval(self, n: fx.Node):
        if n.op != "call_function":
            return None
        t, a = n.target, n.args
        if t is aten.lift_fresh_copy.default and isinstance(a[0], fx.Node) and a[0].op == "get_attr":
            return _literal(a[0])
        rank = self._rank(n)
        if t in (aten.arange.default, aten.arange.start, aten.arange.start_step):
            if t is aten.arange.default:
                start = {1: 0}
            else:
                start = _lin(a[0])
            if t is aten.arange.start_step and len(a) > 2 and a[2] != 1:
                return None
            return None if start is None else Index((1,), start)
        if t in (aten.ones.default, aten.new_ones.default, aten.ones_like.default):
            return Const(True if val(n).dtype == torch.bool else 1.0)
        if t in (aten.zeros.default, aten.new_zeros.default, aten.zeros_like.default):
            return Const(False if val(n).dtype == torch.bool else 0.0)
        if t in (aten.full.default, aten.new_full.default, aten.full_like.default):
            v = a[1] if t is not aten.new_full.default else a[2]
            return Const(v) if isinstance(v, (int, float, bool)) else None
        if t is aten.scalar_tensor.default:
            return Const(a[0]) if isinstance(a[0], (int, float, bool)) else None
        if t in (aten.tril.default, aten.triu.default):
            x = self.eval(a[0])
            diag = a[1] if len(a) > 1 else 0
            if not isinstance(x, Const) or not isinstance(diag, int) or rank is None or rank < 2:
                return None
            coef = [0] * rank
            if t is aten.tril.default:  # keep col - row <= diag
                coef[-1], coef[-2] = 1, -1
                p = Pred(tuple(coef), {1: diag})
            else:  # keep col - row >= diag  <=>  row - col <= -diag
                coef[-1], coef[-2] = -1, 1
                p = Pred(tuple(coef), {1: -diag})
            zero = False if isinstance(x.value, bool) else 0.0
            return p if x.value is True else Select(p, float(x.value), float(zero))
        x = self.eval(a[0]) if a else None
        if t is aten.unsqueeze.default:
            d = a[1] + rank if a[1] < 0 else a[1]
            return _insert_axis(x, d)
        if t in (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default,
                 aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.clone.default,
                 aten.alias.default, aten.lift_fresh_copy.default):
            return _reindex(x, shape_of(a[0]), shape_of(n), t is aten.expand.default)
        if t in (aten.permute.default, aten.transpose.int):
            perm = list(range(rank))
            if t is aten.permute.default:
                perm = [p + rank if p < 0 else p for p in a[1]]
            else:
                i, j = (d + rank if d < 0 else d for d in a[1:3])
                perm[i], perm[j] = perm[j], perm[i]
            return _permute(x, perm)
        if t is aten.slice.Tensor:
            dim = a[1] if len(a) > 1 else 0
            dim = dim + rank if dim < 0 else dim
            start = a[2] if len(a) > 2 and a[2] is not None else 0
            step = a[4] if len(a) > 4 else 1
            s = _lin(start)
            if step != 1 or s is None or (isinstance(start, int) and start < 0):
                return None
            return _shift(x, dim, s)
        if t in (aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout):
            return _convert(x, val(n).dtype)
        if t in (aten.logical_not.default, aten.bitwise_not.default):
            return _neg(x) if isinstance(x, (Pred, All)) else (Const(not x.value) if isinstance(x, Const) else None)
        if t in (aten.eq.Scalar, aten.ne.Scalar):
            want = a[1]
            truth = _truth(x)
            if truth is None or not isinstance(want, (int, float, bool)):
                return None
            p, on, off = truth
            hit = (float(want) == on, float(want) == off)
            if hit == (True, False):
                res = p
            elif hit == (False, True):
                res = _neg(p)
            else:
                return None
            return res if t is aten.eq.Scalar else _neg(res)
        if t in (aten.ge.Tensor, aten.le.Tensor, aten.gt.Tensor, aten.lt.Tensor, aten.ge.Scalar, aten.le.Scalar,
                 aten.gt.Scalar, aten.lt.Scalar):
            return _compare(t, x, self.eval(a[1]) if isinstance(a[1], fx.Node) else _lin(a[1]), rank)
        if t in (aten.add.Tensor, aten.sub.Tensor, aten.add.Scalar, aten.sub.Scalar):
            sign = -1 if t in (aten.sub.Tensor, aten.sub.Scalar) else 1
            other = a[1]
            if isinstance(x, Index) and (isinstance(other, (int, fx.Node))) and _lin(other) is not None:
                return Index(x.coef, _ladd(x.const, _lin(other), sign))
            y = self.eval(other) if isinstance(other, fx.Node) else None
            if isinstance(x, Index) and isinstance(y, Index) and len(x.coef) == len(y.coef):
                return Index(tuple(p + sign * q for p, q in zip(x.coef, y.coef)), _ladd(x.const, y.const, sign))
            return None
        if t in (aten.bitwise_and.Tensor, aten.logical_and.default, aten.__and__.Tensor) or (
                t is aten.mul.Tensor and val(n).dtype == torch.bool):
            return _and(x, self.eval(a[1]) if isinstance(a[1], fx.Node) else Const(a[1]))
        if t is aten.rsub.Scalar and isinstance(x, Select):  # c - select(p, a, b)
            c = a[1]
            return Select(x.pred, float(c) - x.a, float(c) - x.b)
        if t in (aten.mul.Tensor, aten.mul.Scalar) and isinstance(x, Select) and isinstance(a[1], (int, float)):
            return Select(x.pred, x.a * a[1], x.b * a[1])
        if t in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
            cond = self.eval(a[1])
            fill = a[2] if not isinstance(a[2], fx.Node) else None
            if isinstance(x, Const) and isinstance(cond, (Pred, All)) and isinstance(fill, (int, float)):
                return Select(cond, float(fill), float(x.value))
            return None
        if t in (aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar):
            cond = x
            av, bv = (self.eval(v) if isinstance(v, fx.Node) else Const(v) for v in a[1:3])
            if isinstance(cond, (Pred, All)) and isinstance(av, Const) and isinstance(bv, Const):
                if isinstance(av.value, bool) and isinstance(bv.value, bool):
                    if av.value and not bv.value:
                        return cond
                    if bv.value and not av.value:
                        return _neg(cond)
                    return None
                return Select(cond, float(av.value), float(bv.value))
            return None
        return None


def _pad(p: Pred, rank: int) -> Pred:
    return Pred((0,) * (rank - len(p.coef)) + p.coef, p.bound)


def _and(x, y):
    """x & y of two bool tensors (broadcast: predicates are aligned on their trailing axes)."""
    for a, b in ((x, y), (y, x)):
        if isinstance(a, Const) and isinstance(a.value, bool):
            return b if a.value else a
    preds = []
    for p in (x, y):
        if isinstance(p, Pred):
            preds.append(p)
        elif isinstance(p, All):
            preds += list(p.preds)
        else:
            return None
    rank = max(len(p.coef) for p in preds)
    return All(tuple(_pad(p, rank) for p in preds))


def _truth(x):
    """(predicate, value where true, value where false) of a bool or 0/1-valued tensor."""
    if isinstance(x, (Pred, All)):
        return x, 1.0, 0.0
    if isinstance(x, Select):
        return x.pred, x.a, x.b
    return None


def _convert(x, dtype):
    if isinstance(x, (Pred, All)) and dtype != torch.bool:
        return Select(x, 1.0, 0.0)
    if isinstance(x, Select) and dtype == torch.bool:
        if x.b == 0 and x.a != 0:
            return x.pred
        if x.a == 0 and x.b != 0:
            return _neg(x.pred)
        return None
    if isinstance(x, Const):
        return Const(bool(x.value) if dtype == torch.bool else float(x.value))
    return x


def _map_coef(x, fn):
    if isinstance(x, Index):
        return Index(fn(x.coef), x.const)
    if isinstance(x, Pred):
        return Pred(fn(x.coef), x.bound)
    if isinstance(x, All):
        return All(tuple(_map_coef(p, fn) for p in x.preds))
    if isinstance(x, Select):
        return Select(_map_coef(x.pred, fn), x.a, x.b)
    if isinstance(x, Const):
        return x
    return None


def _insert_axis(x, d):
    return _map_coef(x, lambda c: c[:d] + (0,) + c[d:])


def _permute(x, perm):
    return _map_coef(x, lambda c: tuple(c[p] for p in perm))


def _reindex(x, src, dst, expand: bool):
    """Views that only add/remove unit axes or broadcast: map each non-unit axis of src to dst in order."""
    if isinstance(x, Const):
        return x
    if x is None or src is None or dst is None:
        return None
    if expand:
        lead = len(dst) - len(src)

        def fn(c):
            # an expanded unit axis always had index 0, so its coefficient no longer matters
            return (0,) * lead + tuple(0 if (known_eq(s, 1) and not known_eq(d, 1)) else k
                                       for k, s, d in zip(c, src, dst))
        return _map_coef(x, fn)
    src_axes = [i for i, s in enumerate(src) if not known_eq(s, 1)]
    dst_axes = [i for i, s in enumerate(dst) if not known_eq(s, 1)]
    if len(src_axes) != len(dst_axes) or not all(known_eq(src[i], dst[j]) for i, j in zip(src_axes, dst_axes)):
        return None

    def fn(c):
        out = [0] * len(dst)
        for i, j in zip(src_axes, dst_axes):
            out[j] = c[i]
        return tuple(out)
    return _map_coef(x, fn)


def _shift(x, dim, start: dict):
    """x[..., start:, ...] along dim: the old index is new index + start."""
    def const_shift(coef, const):
        return _ladd(const, {k: v * coef[dim] for k, v in start.items()})
    if isinstance(x, Index):
        return Index(x.coef, const_shift(x.coef, x.const))
    if isinstance(x, Pred):  # L(old) <= c  <=>  L(new) + coef*start <= c
        return Pred(x.coef, _ladd(x.bound, {k: v * x.coef[dim] for k, v in start.items()}, -1))
    if isinstance(x, All):
        return All(tuple(_shift(p, dim, start) for p in x.preds))
    if isinstance(x, Select):
        return Select(_shift(x.pred, dim, start), x.a, x.b)
    if isinstance(x, Const):
        return x
    return None


_COMPARE = {aten.le.Tensor: "le", aten.le.Scalar: "le", aten.lt.Tensor: "lt", aten.lt.Scalar: "lt",
            aten.ge.Tensor: "ge", aten.ge.Scalar: "ge", aten.gt.Tensor: "gt", aten.gt.Scalar: "gt"}


def _compare(t, x, y, rank):
    if isinstance(y, dict):  # scalar
        y = Index((0,) * (len(x.coef) if isinstance(x, Index) else 0), y)
    if not (isinstance(x, Index) and isinstance(y, Index)):
        return None
    n = max(len(x.coef), len(y.coef))
    xc = (0,) * (n - len(x.coef)) + x.coef
    yc = (0,) * (n - len(y.coef)) + y.coef
    diff = tuple(p - q for p, q in zip(xc, yc))
    c = _ladd(y.const, x.const, -1)  # x - y <= 0  <=>  diff . idx <= y.const - x.const
    op = _COMPARE[t]
    if op == "le":
        return Pred(diff, c)
    if op == "lt":
        return Pred(diff, _ladd(c, {1: -1}))
    if op == "ge":
        return Pred(tuple(-d for d in diff), _ladd({1: 0}, c, -1))
    if op == "gt":
        return Pred(tuple(-d for d in diff), _ladd({1: -1}, c, -1))
    return None


def evaluate(node: fx.Node):
    return _Interp().eval(node)


def _mask_pred(mask_node: fx.Node, keep: bool, additive: bool):
    """(predicate of the kept positions, fill of the others) of a mask proven structural, else None."""
    x = evaluate(mask_node)
    if additive:
        if not isinstance(x, Select):
            return None
        if x.a == 0.0 and x.b < 0:
            return x.pred, x.b
        if x.b == 0.0 and x.a < 0:
            p = _neg(x.pred)
            return (p, x.a) if p is not None else None
        return None
    if not isinstance(x, (Pred, All)):
        return None
    p = x if keep else _neg(x)
    return (p, float("-inf")) if p is not None else None


def _row_key_coefs(pred: Pred, score_dims):
    """(c_m, c_n): the predicate as c_m * i + c_n * j <= bound over query row i and key j; None when it reads a
    batch or head axis."""
    rank = len(pred.coef)
    if rank > len(score_dims):
        return None
    aligned = score_dims[len(score_dims) - rank:]
    c_m = c_n = 0
    for coef, factors in zip(pred.coef, aligned):
        atoms = [f.axis for f in factors if not known_eq(f.size, 1)]
        if coef == 0 or not atoms:  # a unit axis: its index is always 0
            continue
        if atoms == [("m",)]:
            c_m += coef
        elif atoms == [("n",)]:
            c_n += coef
        else:
            return None
    return c_m, c_n


def _has_m(score_dims) -> bool:
    return any(f.axis == ("m",) and not known_eq(f.size, 1) for d in score_dims for f in d)


def _is_causal(coefs, has_m: bool) -> bool:
    return coefs is not None and coefs[1] == 1 and (coefs[0] == -1 or (coefs[0] == 0 and not has_m))


def causal_offset(mask_node: fx.Node, score_dims, keep: bool, additive: bool):
    """If the mask applied at score dims ``score_dims`` allows key j for query i iff j - i <= offset, return
    (offset as linear dict, fill value); else None. For additive masks the fill is the masked value."""
    found = _mask_pred(mask_node, keep, additive)
    if found is None or not isinstance(found[0], Pred):
        return None
    pred, fill = found
    if _is_causal(_row_key_coefs(pred, score_dims), _has_m(score_dims)):  # a single query row is row 0
        return pred.bound, fill
    return None


def implied_causal(mask_node: fx.Node, score_dims, keep: bool, additive: bool):
    """A mask that is causal AND other structural predicates (Mistral's sliding window: j <= i and j > i - w).

    Returns (offset, fill, diagonal) or None. The kernel's causal flag with this offset drops nothing the mask
    keeps, so the flag may be set to skip the tiles above the diagonal, but the mask itself must still be passed
    (the op has no window flag). ``diagonal`` lists linear expressions that are all >= 0 exactly when every other
    predicate keeps key i + offset of row i (None: not provable), which is what keeps rows from being fully
    masked; the caller also needs 0 <= i + offset < N.
    """
    found = _mask_pred(mask_node, keep, additive)
    if found is None or not isinstance(found[0], All):
        return None
    conj, fill = found
    has_m = _has_m(score_dims)
    coefs = [_row_key_coefs(p, score_dims) for p in conj.preds]
    if any(c is None for c in coefs):
        return None
    causal = [p for p, c in zip(conj.preds, coefs) if _is_causal(c, has_m)]
    if not causal:
        return None
    offset = causal[0].bound
    diagonal = []
    for p, (c_m, c_n) in zip(conj.preds, coefs):
        # row i, key i + offset: c_m * i + c_n * (i + offset) <= bound for every i needs c_m + c_n == 0 (or one row)
        if c_m + c_n != 0 and has_m:
            diagonal = None
            break
        diagonal.append(_ladd(p.bound, {k: c_n * v for k, v in offset.items()}, -1))
    return offset, fill, diagonal


# After the walk: the causal flag, from every mask and bias the walk collected

def _lin_value(lin: dict, extra=0):
    expr = extra
    for key, c in lin.items():
        expr = expr + c * (1 if key == 1 else val(key))
    return expr


def _nonneg(expr) -> bool:
    if isinstance(expr, int):
        return expr >= 0
    from torch.fx.experimental.symbolic_shapes import statically_known_true
    return bool(statically_known_true(expr >= 0))


def _known_nonneg(lin: dict) -> bool:
    return _nonneg(_lin_value(lin))


def _big_negative(fill) -> bool:
    return fill == float("-inf") or fill <= -1e30 or fill in (
        torch.finfo(torch.float16).min, torch.finfo(torch.bfloat16).min)


def finish(st: ScoreState, m_size, n_size) -> None:
    """Replace masks proven causal by the kernel's causal flag, when that gives exactly eager's result.

    The flag puts -inf above the diagonal where the mask put its fill. With a -inf fill that is the same thing.
    With a finite fill (finfo.min) it is the same only while every row keeps a key: a row masked everywhere gives
    a uniform row in eager but NaN with the flag. So a finite fill needs a proof that the mask keeps a key in every
    row, and no other mask or bias on the site (one could push a row's kept keys down to the fill: a padding mask).
    A mask that is causal AND more (a sliding window) implies the flag but is still passed as a tensor.
    """
    for group, additive in ((st.masks, False), (st.biases, True)):
        for op in list(group):
            if additive and op.coef != 1:
                continue
            exact = causal_offset(op.node, op.dims, op.keep, additive)
            implied = None if exact is not None else implied_causal(op.node, op.dims, op.keep, additive)
            if exact is None and implied is None:
                continue
            offset, fill = exact if exact is not None else implied[:2]
            if not additive:
                fill = op.fill
            if not _big_negative(fill):
                st.causal_note = f"mask is causal but its fill {fill} is not -inf or the dtype minimum"
                continue
            if fill != float("-inf"):
                if [o for o in st.masks + st.biases if o is not op]:
                    st.causal_note = ("causal mask with a finite fill next to another mask or bias (which could mask "
                                      "whole rows): passed as a tensor")
                    continue
                if exact is not None and not _known_nonneg(offset):
                    st.causal_note = "causal mask with a finite fill may mask whole rows: passed as a tensor"
                    continue
                diagonal = None if exact is not None else implied[2]
                if exact is None and (diagonal is None or not all(_known_nonneg(d) for d in diagonal)
                                      or not _known_nonneg(offset)
                                      or not _nonneg(_lin_value({k: -c for k, c in offset.items()},
                                                                n_size - m_size))):
                    st.causal_note = "mask implies causal but may mask whole rows: passed as a tensor only"
                    continue
            if st.causal is not None and st.causal != offset:
                continue
            st.causal = offset
            if exact is not None:
                group.remove(op)
                st.tag("causal")
            else:
                st.tag("causal(+mask)")


# Spellings
def tril_ones(q, k, v):
    s = q.shape[-2]
    mask = torch.tril(torch.ones(s, s, dtype=torch.bool, device=q.device))
    return torch.softmax((q @ k.transpose(-2, -1)).masked_fill(~mask, float("-inf")), -1) @ v


def triu_fill(q, k, v):
    s = q.shape[-2]
    upper = torch.triu(torch.ones(s, s, device=q.device), diagonal=1).bool()
    return torch.softmax((q @ k.transpose(-2, -1)).masked_fill(upper, float("-inf")), -1) @ v


def arange_compare(q, k, v):
    sq, sk = q.shape[-2], k.shape[-2]
    i = torch.arange(sq, device=q.device)[:, None] + (sk - sq)
    j = torch.arange(sk, device=q.device)[None, :]
    return torch.softmax(torch.where(j <= i, q @ k.transpose(-2, -1), float("-inf")), -1) @ v


def arange_strict(q, k, v):
    # j < i + 1: the strict comparison, one past the diagonal
    sq, sk = q.shape[-2], k.shape[-2]
    i = torch.arange(sq, device=q.device)[:, None] + (sk - sq)
    j = torch.arange(sk, device=q.device)[None, :]
    return torch.softmax((q @ k.transpose(-2, -1)).masked_fill(~(j < i + 1), float("-inf")), -1) @ v


def arange_query_first(q, k, v):
    # i >= j, and the dropped side as i < j: the query index on the left of both comparisons
    sq, sk = q.shape[-2], k.shape[-2]
    i = torch.arange(sq, device=q.device)[:, None] + (sk - sq)
    j = torch.arange(sk, device=q.device)[None, :]
    s = torch.where(i >= j, q @ k.transpose(-2, -1), float("-inf")).masked_fill(i < j, float("-inf"))
    return torch.softmax(s, -1) @ v


def additive_min(q, k, v):
    s = q.shape[-2]
    bias = torch.full((s, s), torch.finfo(q.dtype).min, device=q.device, dtype=q.dtype).triu(1)
    return torch.softmax(q @ k.transpose(-2, -1) + bias, -1) @ v


def tensor_literal_fill(q, k, v):
    # HF masking utils of transformers 5.17: where(allowed, torch.tensor(0.0), finfo.min) added to the scores
    sq, sk = q.shape[-2], k.shape[-2]
    allowed = torch.arange(sk, device=q.device)[None, :] <= torch.arange(sq, device=q.device)[:, None] + (sk - sq)
    zero = torch.tensor(0.0, device=q.device, dtype=q.dtype)
    bias = torch.where(allowed, zero, torch.finfo(q.dtype).min)
    return torch.softmax(q @ k.transpose(-2, -1) + bias, -1) @ v


SPELLINGS = {"tril_ones": tril_ones, "triu_fill": triu_fill, "arange_compare": arange_compare,
             "arange_strict": arange_strict, "arange_query_first": arange_query_first,
             "additive_min": additive_min, "tensor_literal_fill": tensor_literal_fill}


def check_site(name, site, q, k, v) -> None:
    """What a rewritten site of SPELLINGS[name] must say (tests): the causal flag, no mask left."""
    flags = site.flags
    assert flags["causal"] and flags["bias"] == 0 and flags["bool_masks"] == 0, flags
