"""Layout tracking: which axes of which tensor a view/permute/expand chain really reads.

Attention code reshapes q, k and v many ways before the batched matmul (BSHD -> BHSD transposes, merging batch and
heads for ``bmm``, einsum's permutes, ``repeat_kv``'s expand + reshape). Instead of a pattern per spelling, each
dimension of a tensor is described as a list of *factors*: whole axes of a *base* tensor (an earlier value in the
graph) or broadcast factors made by ``expand``. A chain of layout ops is replayed on these lists; when an op splits
one axis of the base into several (``view(B, S, H, D)`` of a projection), tracking restarts with that op's output as
the new base. The result proves what the matmul operand is in terms of its base, so the rewrite can hand the kernel
a strided view of the base instead of the copies the matmul decomposition made.

Scalar ``mul``/``div`` met on the way (scale applied to q or k) are treated as layout-preserving and collected, so
the rewrite can fold them into the kernel's scale.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class Factor:
    axis: Any  # a base axis index, another hashable label, or None for a broadcast factor made by expand
    size: Any  # int or SymInt

    @property
    def broadcast(self) -> bool:
        return self.axis is None


Dims = list  # list[list[Factor]]


def known_eq(a, b) -> bool:
    """a == b for sizes that may be SymInts: provable, or true for the example sizes and then guarded.

    Sympy cannot always prove facts the program relies on (Hkv * (H // Hkv) == H in repeat_kv); when the example
    sizes agree, the equality is installed as a Dynamo guard (a backend may add guards; a graph where it fails is
    recompiled), so the rewrite stays proven for every input the compiled graph will see. When they disagree the
    answer is False and nothing is guarded: the site is just left alone.
    """
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        if statically_known_true(a == b):
            return True
    except Exception:
        return False
    try:
        hint_a = a.node.hint if isinstance(a, torch.SymInt) else a
        hint_b = b.node.hint if isinstance(b, torch.SymInt) else b
        if hint_a is None or hint_b is None or hint_a != hint_b:
            return False
        return bool(a == b)  # adds the guard
    except Exception:
        return False


def same_shape(a, b) -> bool:
    return a is not None and b is not None and len(a) == len(b) and all(known_eq(x, y) for x, y in zip(a, b))


def is_one(x) -> bool:
    return known_eq(x, 1)


def prod(sizes):
    out = 1
    for s in sizes:
        out = out * s
    return out


def val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else node


def shape_of(node):
    v = val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def fresh_dims(node, label=None) -> Dims:
    shape = shape_of(node)
    return [[Factor(i if label is None else (label, i), s)] for i, s in enumerate(shape)]


def drop_unit(factors):
    return [f for f in factors if not is_one(f.size)]


class Untrackable(Exception):
    pass


def _norm(d, rank):
    return d + rank if d < 0 else d


def _empty_view(flat, out_shape) -> Dims:
    """apply_view where an axis is empty: 0 is the product of any run of axes that includes it, so the grouping
    is searched for, and taken only when it is the one grouping whose products are the new sizes."""
    found = []

    def search(idx, k, groups):
        if len(found) > 1:
            return
        if k == len(out_shape):
            if idx == len(flat):
                found.append(list(groups))
            return
        if is_one(out_shape[k]):
            search(idx, k + 1, groups + [[]])
            return
        total = 1
        for end in range(idx + 1, len(flat) + 1):
            total = total * flat[end - 1].size
            if known_eq(total, out_shape[k]):
                search(end, k + 1, groups + [flat[idx:end]])
    search(0, 0, [])
    if len(found) != 1:
        raise Untrackable("a view of an empty tensor whose axes cannot be told apart")
    return found[0]


def apply_view(dims: Dims, out_shape) -> Dims:
    flat = [f for d in dims for f in d if not is_one(f.size)]
    if any(known_eq(f.size, 0) for f in flat):
        return _empty_view(flat, out_shape)
    out, idx = [], 0
    for size in out_shape:
        if is_one(size):
            out.append([])
            continue
        group, total = [], 1
        while not (group and known_eq(total, size)):
            if idx >= len(flat):
                raise Untrackable("view splits an axis")
            group.append(flat[idx])
            total = total * flat[idx].size
            idx += 1
        out.append(group)
    if idx != len(flat):
        raise Untrackable("view does not consume every axis")
    return out


def apply_expand(dims: Dims, out_shape) -> Dims:
    lead = len(out_shape) - len(dims)
    out = [[Factor(None, s)] if not is_one(s) else [] for s in out_shape[:lead]]
    for d, size in zip(dims, out_shape[lead:]):
        cur = prod(f.size for f in d)
        if isinstance(size, int) and size == -1 or known_eq(cur, size):
            out.append(d)
        elif is_one(cur):
            out.append([Factor(None, size)])
        else:
            raise Untrackable("expand of a non-unit axis")
    return out


def apply_layout_op(node: fx.Node, dims: Dims) -> Dims:
    """Replay one layout op on ``dims``; raise Untrackable when the op cannot be expressed."""
    t = node.target
    rank = len(dims)
    if t in (aten.view.default, aten._unsafe_view.default, aten.reshape.default):
        return apply_view(dims, shape_of(node))
    if t is aten.permute.default:
        return [dims[_norm(p, rank)] for p in node.args[1]]
    if t is aten.transpose.int:
        a, b = _norm(node.args[1], rank), _norm(node.args[2], rank)
        out = list(dims)
        out[a], out[b] = out[b], out[a]
        return out
    if t is aten.t.default:
        return list(reversed(dims))
    if t is aten.unsqueeze.default:
        out = list(dims)
        out.insert(_norm(node.args[1], rank + 1), [])
        return out
    if t in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
        if t is aten.squeeze.default:
            which = set(range(rank))
        elif t is aten.squeeze.dim:
            which = {_norm(node.args[1], rank)}
        else:
            which = {_norm(d, rank) for d in node.args[1]}
        return [d for i, d in enumerate(dims) if not (i in which and is_one(prod(f.size for f in d)))]
    if t is aten.expand.default:
        return apply_expand(dims, shape_of(node))
    if is_identity_op(node):
        return dims
    raise Untrackable(f"{t}")


def is_identity_op(node: fx.Node) -> bool:
    """Ops that keep a tensor's logical contents and shape (copies, no-op slices, same-dtype casts)."""
    t = node.target
    if t in (aten.clone.default, aten.alias.default, aten.contiguous.default):
        return True
    if t in (aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout):
        a, b = val(node.args[0]), val(node)
        return isinstance(a, torch.Tensor) and a.dtype == b.dtype and a.device == b.device
    if t is aten.slice.Tensor:
        src = shape_of(node.args[0])
        return src is not None and known_eq(prod(src), prod(shape_of(node))) and (
            len(node.args) < 5 or node.args[4] == 1)
    return False


LAYOUT_OPS = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.permute.default, aten.transpose.int,
    aten.t.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
    aten.expand.default, aten.clone.default, aten.alias.default, aten.contiguous.default, aten._to_copy.default,
    aten.to.dtype, aten.to.dtype_layout, aten.slice.Tensor,
}


def is_layout_op(node) -> bool:
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in LAYOUT_OPS):
        return False
    if node.target in (aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.slice.Tensor):
        return is_identity_op(node)
    return True


def scalar_value(x):
    """A Python number, or an FX node producing a SymInt/SymFloat; None for anything else."""
    if isinstance(x, bool):
        return None
    if isinstance(x, numbers.Number):
        return x
    if isinstance(x, fx.Node) and isinstance(val(x), (torch.SymInt, torch.SymFloat, int, float)):
        return x
    return None


def _scalar_operand(x):
    s = scalar_value(x)
    if s is None and isinstance(x, fx.Node):
        s = constant_scalar_tensor(x)
    return s


_INPLACE_SCALE = {aten.mul_.Tensor: aten.mul.Tensor, aten.mul_.Scalar: aten.mul.Scalar,
                  aten.div_.Tensor: aten.div.Tensor, aten.div_.Scalar: aten.div.Scalar}


def scale_of(node: fx.Node, inplace_ok: bool = False):
    """For mul/div of a tensor by a scalar: (index of the tensor argument, ('mul' | 'div', scalar)), else None.

    The scalar is a number or an FX node producing a SymInt/SymFloat (a scale computed from a dynamic head dim).
    ``inplace_ok`` also reads ``mul_``/``div_`` (scaling the tensor itself): only the score chain may, where the
    mutated tensor is proven private to the chain. On q or k it would mutate a tensor the rewrite reads again.
    """
    t = node.target
    if inplace_ok:
        t = _INPLACE_SCALE.get(t, t)
        if t is not node.target and not isinstance(node.args[0], fx.Node):
            return None
    if len(node.args) != 2 or node.kwargs:
        return None
    if t in (aten.mul.Tensor, aten.mul.Scalar):
        for i in ((0,) if t is not node.target else (0, 1)):
            s = _scalar_operand(node.args[1 - i])
            if s is not None and isinstance(node.args[i], fx.Node) and isinstance(val(node.args[i]), torch.Tensor):
                return i, ("mul", s)
        return None
    if t in (aten.div.Tensor, aten.div.Scalar):
        s = _scalar_operand(node.args[1])
        return None if s is None else (0, ("div", s))
    return None


def shape_text(node) -> str:
    """A node's tensor shape as the report shows it (symbols by name), or "?" when it holds no tensor."""
    t = val(node) if isinstance(node, fx.Node) else None
    return str(tuple(str(s) for s in t.shape)) if isinstance(t, torch.Tensor) else "?"


def tensor_literal(node: fx.Node):
    """The value of a one-element tensor literal of the traced code, read through get_attr: ``torch.tensor(0.0)``
    traces to ``lift_fresh_copy(_tensor_constant<k>)``, a fresh copy of a graph constant on every call, so its value
    is part of the program. Anything else read through get_attr (a buffer, a parameter, a tensor the user may
    change between calls) is data: None."""
    if node.op != "get_attr" or not node.target.rsplit(".", 1)[-1].startswith("_tensor_constant"):
        return None
    obj = node.graph.owning_module
    for part in node.target.split("."):
        obj = getattr(obj, part, None)
    if type(obj) is not torch.Tensor or obj.numel() != 1 or obj.device.type == "meta":  # not fake, not a subclass
        return None
    value = obj.item()
    return bool(value) if obj.dtype == torch.bool else value


def constant_scalar_tensor(node: fx.Node):
    """A 0-d tensor made in the graph from a number (scalar_tensor / full([])), as that number or sym node."""
    if node.op != "call_function":
        return None
    if node.target is aten.scalar_tensor.default:
        return scalar_value(node.args[0])
    if node.target is aten.full.default and list(node.args[0]) == []:
        return scalar_value(node.args[1])
    return None


@dataclasses.dataclass
class Traced:
    base: fx.Node
    dims: Dims
    scale: list  # factors ('mul'|'div', number or sym node) applied between base and the traced node


def trace_back(node: fx.Node, allow_scale: bool = False) -> Traced:
    """Walk back from ``node`` through layout ops (and scalar scaling if allowed) and describe ``node``'s dims."""
    chain = []
    cur = node
    while isinstance(cur, fx.Node) and cur.op == "call_function":
        if is_layout_op(cur):
            chain.append(("layout", cur))
            cur = cur.args[0]
            continue
        sc = scale_of(cur) if allow_scale else None
        if sc is not None and same_shape(shape_of(cur), shape_of(cur.args[sc[0]])):
            chain.append(("scale", cur))
            cur = cur.args[sc[0]]
            continue
        break
    base = cur
    dims = fresh_dims(base)
    scale: list = []
    for kind, op in reversed(chain):
        if kind == "scale":
            scale.append(scale_of(op)[1])
            continue
        try:
            dims = apply_layout_op(op, dims)
        except Untrackable:
            base, dims, scale = op, fresh_dims(op), []
    return Traced(base, dims, scale)

