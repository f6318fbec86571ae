"""Rewriting a matched site into one ``torch.ops.memattn.attention`` call.

The op reads strided views of q, k and v's bases (no copies; a repeated K/V is read through its unrepeated base),
masks as broadcast views, and its output is reshaped into the PV matmul's output, whose users are rewired.
Everything between the two matmuls then has no users and is removed by dead-code elimination: that removal is
the memory the rewrite saves.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from attn_compiler import analysis, ops
from attn_compiler.codegen.reference import OUT_ZMHD
from attn_compiler.layout import Factor, drop_unit, is_one, known_eq, prod, shape_of, val
from attn_compiler.match import SHAPE_READERS, SiteMatch
from attn_compiler.patterns.common import Operand, fold_factors
from attn_compiler.site import Reject

aten = torch.ops.aten


class Emitter:
    """Inserts nodes before ``anchor`` and fills in their fake values so later passes can read shapes."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node, fake_mode):
        self.graph, self.anchor, self.fake_mode = graph, anchor, fake_mode

    def call(self, target, *args, **kwargs) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(target, args, kwargs)
        node.meta["stack_trace"] = self.anchor.meta.get("stack_trace")
        vals = fx.node.map_arg((args, kwargs), lambda n: n.meta.get("val"))
        if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            with self.fake_mode:
                node.meta["val"] = target(*vals[0], **vals[1])
        else:
            node.meta["val"] = target(*vals[0], **vals[1])
        return node


def _is_broadcast(f) -> bool:
    return isinstance(f, Factor) and f.broadcast


def _base_axes(f) -> list:
    if f is None or _is_broadcast(f):
        return []
    return [x.axis for x in f] if isinstance(f, tuple) else [f.axis]


def materialize(em: Emitter, base: fx.Node, targets: list, ref: fx.Node | None) -> fx.Node:
    """A view of ``base`` whose axes are ``targets`` (base axes, tuples of base axes to merge, broadcast factors, or
    None for unit axes).

    Broadcast axes are expanded (stride 0, no copy) to the size of the same axis of ``ref``. Merged axes are
    flattened (a view when their strides allow it, else a copy of the operand).
    """
    shape = shape_of(base)
    used = [a for f in targets for a in _base_axes(f)]
    unused = [i for i in range(len(shape)) if i not in used]
    if any(not is_one(shape[i]) for i in unused):
        raise Reject("internal: a non-unit axis of an operand is not used")
    node = base
    if unused:
        node = em.call(aten.squeeze.dims, node, unused)
    remaining = [i for i in range(len(shape)) if i in used]
    order = [remaining.index(a) for a in used]
    if order != list(range(len(order))):
        node = em.call(aten.permute.default, node, order)
    pos = 0
    for f in targets:
        n = len(_base_axes(f))
        if n > 1:
            node = em.call(aten.flatten.using_ints, node, pos, pos + n - 1)
        pos += 1 if n else 0
    for pos, f in enumerate(targets):
        if f is None or _is_broadcast(f):
            node = em.call(aten.unsqueeze.default, node, pos)
    if any(_is_broadcast(f) for f in targets):
        sizes = []
        for i, f in enumerate(targets):
            if not _is_broadcast(f):
                sizes.append(-1)
            elif isinstance(f.size, int):
                sizes.append(f.size)
            elif ref is not None:
                sizes.append(em.call(aten.sym_size.int, ref, i))
            else:
                raise Reject("q is broadcast over a dynamic batch dimension")
        node = em.call(aten.expand.default, node, sizes)
    return node


def canonical_operand(em: Emitter, op: Operand, canon_atoms: list, atom_size) -> fx.Node:
    """A mask/bias broadcast against the scores at op.dims, as a 4-D view broadcastable to [Z, H, M, N].

    Unit axes are squeezed, an axis holding several atoms (a mask on merged batch*heads) is unflattened, then the
    axes are permuted to canonical order and unit axes inserted for the atoms the mask broadcasts over.
    ``atom_size(atom)`` gives an int or a graph node for an atom's size (needed to unflatten symbolic axes).
    """
    node = op.node
    tshape = list(shape_of(node))
    dims = op.dims
    if len(tshape) > len(dims) and any(not is_one(s) for s in tshape[:len(tshape) - len(dims)]):
        raise Reject("the mask has more dims than the scores")
    pad = [[]] * max(0, len(tshape) - len(dims))
    aligned = pad + dims[max(0, len(dims) - len(tshape)):]
    unit = [i for i, size in enumerate(tshape) if is_one(size)]
    if unit:
        node = em.call(aten.squeeze.dims, node, unit)
    atoms = []
    pos = 0
    for i, (size, factors) in enumerate(zip(tshape, aligned)):
        if i in unit:
            continue
        fs = drop_unit(factors)
        if not fs or not known_eq(size, prod(f.size for f in fs)):
            # the product is still guaranteed by broadcasting at run time when it is the only factor
            if len(fs) != 1:
                raise Reject("the mask does not broadcast against the scores")
        if len(fs) > 1:
            node = em.call(aten.unflatten.int, node, pos, [atom_size(f.axis) for f in fs])
        atoms += [f.axis for f in fs]
        pos += len(fs)
    order = [atoms.index(a) for a in canon_atoms if a in atoms]
    if order != list(range(len(order))):
        node = em.call(aten.permute.default, node, order)
    for p, a in enumerate(canon_atoms):
        if a not in atoms:
            node = em.call(aten.unsqueeze.default, node, p)
    if op.dtype is not None:   # the promotion eager's add makes (an integer or bool bias to the scores' dtype)
        node = em.call(aten._to_copy.default, node, dtype=op.dtype)
    if op.coef != 1:
        node = em.call(aten.mul.Tensor, node, op.coef)
    return node


def _linear(em: Emitter, lin: dict):
    out = lin.get(1, 0)
    for key, c in lin.items():
        if key == 1:
            continue
        term = key if c == 1 else em.call(operator.mul, key, c)
        out = em.call(operator.add, term, out) if not (isinstance(out, int) and out == 0) else term
    return out


def emit(plan: SiteMatch, fake_mode, kernel: str) -> fx.Node:
    graph = plan.pv.graph
    em = Emitter(graph, plan.pv, fake_mode)
    st = plan.st
    q4 = materialize(em, plan.q.base, plan.q_targets, None)
    k4 = materialize(em, plan.k.base, plan.k_targets, q4)
    v4 = materialize(em, plan.v.base, plan.v_targets, q4)
    def atom_size(atom):
        pos = plan.canon_atoms.index(atom)
        ref, axis = (k4, 2) if atom == ("n",) else (q4, pos)
        size = shape_of(ref)[axis]
        return size if isinstance(size, int) else em.call(aten.sym_size.int, ref, axis)

    bias = None
    for op in st.biases:
        b = canonical_operand(em, op, plan.canon_atoms, atom_size)
        bias = b if bias is None else em.call(aten.add.Tensor, bias, b)
    mask = None
    keep = True
    fill = float("-inf")
    for op in st.masks:
        m = canonical_operand(em, op, plan.canon_atoms, atom_size)
        if len(st.masks) > 1 and not op.keep:
            m = em.call(aten.logical_not.default, m)
        mask = m if mask is None else em.call(aten.logical_and.default, mask, m)
        fill = op.fill
        keep = op.keep if len(st.masks) == 1 else True
    if st.softcap_post is not None:
        cap = fold_factors(st.softcap_post)  # s = cap * tanh(pre * qk) = cap * tanh((pre * cap) * qk / cap)
        if cap == 0:
            raise Reject("the soft-cap multiplier is zero")
        scale = fold_factors(st.scale + [("mul", cap)])
        softcap = cap
    else:
        scale = fold_factors(st.scale)
        softcap = 0.0
    seed = None
    if st.dropout_p > 0:
        seed = em.call(aten.randint.low, 0, 2 ** 31 - 1, [], dtype=torch.int64, device=val(q4).device)
    causal = st.causal is not None
    offset = _linear(em, st.causal) if causal else 0
    att = em.call(torch.ops.memattn.attention.default, *ops.attention_args(
        q=q4, k=k4, v=v4, bias=bias, mask=mask, seed=seed, scale=scale, softcap=softcap, causal=causal,
        causal_offset=offset, mask_fill=fill, mask_keep=keep, dropout_p=st.dropout_p, safe_softmax=st.safe_softmax,
        kernel=kernel))
    out = em.call(operator.getitem, att, 0)
    if plan.n_batch == 2:
        out = em.call(aten.flatten.using_ints, out, 0, 1)
    else:
        out = em.call(aten.squeeze.dim, out, 0)
    if out.meta["val"].dtype != val(plan.pv).dtype:
        raise Reject("internal: output dtype differs")
    _redirect_shape_reads(plan)
    plan.pv.replace_all_uses_with(out)
    _erase_chain(plan)
    return att


def _size_source(graph: fx.Graph, value):
    """A node (or int) that gives ``value`` (a SymInt) without reading any chain tensor: a SymInt input with the
    same expression, or a sym_size of an input tensor's dim. Inserted after the placeholders."""
    if not isinstance(value, torch.SymInt):
        return int(value)
    expr = value.node.expr
    if expr.is_number:
        return int(expr)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for ph in placeholders:
        v = ph.meta.get("val")
        if isinstance(v, torch.SymInt) and known_eq(v, value):
            return ph
    for ph in placeholders:
        v = ph.meta.get("val")
        if isinstance(v, torch.Tensor):
            for i, s in enumerate(v.shape):
                if isinstance(s, torch.SymInt) and known_eq(s, value):
                    with graph.inserting_after(placeholders[-1]):
                        node = graph.call_function(aten.sym_size.int, (ph, i))
                    node.meta["val"] = s
                    return node
    raise Reject(f"the size {expr} is read from the scores and no input has it; left alone")


def _redirect_shape_reads(plan: SiteMatch) -> None:
    """Shape reads of chain tensors (sym_size of the scores, left by a reshape) read an input's size instead."""
    readers = [u for n in [plan.qk] + plan.chain + [plan.pv] for u in n.users if u.target in SHAPE_READERS]
    sources = [_size_source(plan.pv.graph, u.meta.get("val")) for u in readers]  # all found before any change
    for reader, src in zip(readers, sources):
        if isinstance(src, fx.Node):
            reader.replace_all_uses_with(src)
        else:
            for user in list(reader.users):
                user.args = fx.node.map_arg(user.args, lambda a: src if a is reader else a)
                user.kwargs = fx.node.map_arg(user.kwargs, lambda a: src if a is reader else a)
        reader.graph.erase_node(reader)


def _erase_chain(plan: SiteMatch) -> None:
    """Remove the replaced chain now: dead-code elimination keeps in-place nodes (they look impure), and an
    in-place op left on the scores would keep the n x n tensors alive. Every chain node mutates only chain-internal
    storage (the matcher proved each mutated tensor private to the chain), so erasing them is safe."""
    nodes = list(dict.fromkeys([plan.qk] + plan.chain + [plan.pv]))
    for node in reversed(nodes):
        if not getattr(node, "_erased", False) and not node.users and node.op == "call_function":
            node.graph.erase_node(node)


_RESHAPES = (aten.flatten.using_ints, aten.view.default, aten._unsafe_view.default, aten.reshape.default,
             aten.unflatten.int, aten.squeeze.dim, aten.unsqueeze.default)


_SIZE_READERS = (aten.sym_size.int, aten.sym_numel.default)   # read sizes only; strides would change (sym_stride)


def _only_user(node: fx.Node):
    """The one user of ``node`` that reads its data (size reads aside: the layout does not change sizes)."""
    users = [u for u in node.users if u.target not in _SIZE_READERS]
    return users[0] if len(users) == 1 else None


def _swaps_1_2(node: fx.Node) -> bool:
    if node.target is aten.transpose.int:
        return sorted(d % 4 for d in node.args[1:3]) == [1, 2]
    return node.target is aten.permute.default and [d % 4 for d in node.args[1]] == [0, 2, 1, 3]


def _mutated_or_returned(node: fx.Node) -> str | None:
    """Why ``node`` (or a view of it, transitively) may not alias another tensor: an in-place user, or a graph
    output (whose aliasing the caller sees). None if neither."""
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        for u in n.users:
            if u.op == "output":
                return "it is a graph output"
            schema = getattr(u.target, "_schema", None)
            if schema is not None and schema.is_mutable:
                return f"{u.target} writes to it in place"
            # every alias, as the memory model finds them (the op schema's alias sets; getitem of a list of views)
            alias = analysis._alias_of(u)
            if u.target is operator.getitem or (alias is not None and any(a is n for a in alias)):
                todo.append(u)
    return None


def output_layout(att: fx.Node, fake_mode) -> str:
    """Let the op write ``out`` in [Z, M, H, Dv] order when a model's ``y.transpose(1, 2).contiguous()`` (or
    ``.reshape``) copies it into that order anyway: that copy then goes. Returns what was done, for the report.

    The pattern, after the PV matmul's output was redirected to the op: getitem(att, 0), reshapes that end where
    they began (flatten(0, 1) then view back: the identity on values), a transpose of dims 1 and 2, and a clone to
    contiguous format. The transpose of the op's output is then contiguous with the clone's values; the clone is
    replaced by it. Left as is when the clone (or a view of it) is written in place or returned, where aliasing
    the op's output would be visible."""
    get = next((u for u in att.users if u.target is operator.getitem and u.args[1] == 0), None)
    if get is None or _only_user(get) is None:
        return "zhmd (the output has several uses)"
    shape = shape_of(get)
    last, node = get, get
    # the reshapes bypassed must have no other user, size reads included: one left behind would keep a reshape of
    # the [Z, M, H, Dv]-ordered output alive, and that reshape may copy
    while (nxt := _only_user(node)) is not None and nxt.target in _RESHAPES and len(nxt.users) == 1:
        node = nxt
        s = shape_of(node)
        if s is not None and len(s) == 4 and all(known_eq(a, b) for a, b in zip(s, shape)):
            last = node
    tr = _only_user(last)
    if tr is None or not _swaps_1_2(tr) or (last is not get and len(last.users) != 1):
        return "zhmd (the output is not transposed to [Z, M, H, Dv])"
    clone = _only_user(tr)
    if clone is None or clone.target is not aten.clone.default \
            or clone.kwargs.get("memory_format") is not torch.contiguous_format:
        return "zhmd (no contiguous copy of the transposed output)"
    why = _mutated_or_returned(clone)
    if why is not None:
        return f"zhmd (the contiguous copy cannot alias the output: {why})"
    new_args = ops.replace_args(att, out_layout=OUT_ZMHD)
    with fake_mode:
        new_val = att.target(*fx.node.map_arg(new_args, lambda n: n.meta.get("val")))
        tr_val = tr.target(new_val[0], *tr.args[1:])
    if not tr_val.is_contiguous():
        return "zhmd (internal: the transposed [Z, M, H, Dv] output would not be contiguous)"
    att.args = new_args
    att.meta["val"] = new_val
    get.meta["val"] = new_val[0]
    tr.args = (get,) + tuple(tr.args[1:])
    tr.meta["val"] = tr_val
    clone.replace_all_uses_with(tr)
    clone.graph.erase_node(clone)
    return "zmhd (written in the model's transposed order: its contiguous copy is gone)"
