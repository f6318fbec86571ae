"""Finding attention sites in the lowered ATen graph.

Anchor: every softmax. From it the matcher walks back to the QK^T matmul and forward to the PV matmul, handing
each op on the way to the pattern family that owns it (patterns/*.py). A candidate becomes a ``SiteMatch`` only when
every step is proven equivalent; otherwise the first reason it cannot be is kept for the report.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx as fx

from attn_compiler.layout import (Factor, Traced, Untrackable, apply_layout_op, drop_unit, is_layout_op, known_eq,
                                  shape_of, trace_back, val)
from attn_compiler import patterns
from attn_compiler.patterns.common import Operand, ScoreState
from attn_compiler.site import Reject

aten = torch.ops.aten

# In-place spellings on the scores (Falcon's ``scores /= sqrt(d)``, ``scores.masked_fill_(...)``). Folded like their
# functional forms when the tensor they mutate is the previous chain value and has no other user: then the
# mutation is invisible outside the chain, and the chain (in-place nodes included) is removed by the rewrite.
INPLACE = {aten.mul_.Tensor: aten.mul.Tensor, aten.mul_.Scalar: aten.mul.Scalar, aten.div_.Tensor: aten.div.Tensor,
           aten.div_.Scalar: aten.div.Scalar, aten.add_.Tensor: aten.add.Tensor,
           aten.masked_fill_.Scalar: aten.masked_fill.Scalar, aten.masked_fill_.Tensor: aten.masked_fill.Tensor,
           aten.tanh_.default: aten.tanh.default}
SCORE_CASTS = (aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.clone.default,
               aten.alias.default)
MAX_DEPTH = 40
# Users that read only a tensor's metadata: they do not keep the n x n tensor alive, and the rewrite re-points them
# at a surviving tensor with the same symbolic size (rewrite._redirect_shape_reads).
SHAPE_READERS = (aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default, aten.sym_storage_offset.default)


@dataclasses.dataclass
class SiteMatch:
    softmax: fx.Node
    qk: fx.Node
    pv: fx.Node
    q: Traced
    k: Traced
    v: Traced
    q_targets: list        # canonical [Z, H, M, D] factors of q's base (None = unit axis)
    k_targets: list        # canonical [Z, Hkv, N, D]
    v_targets: list        # canonical [Z, Hkv, N, Dv]
    n_batch: int           # 0, 1 or 2 batch factors in the matmuls' batch dim
    st: ScoreState
    chain: list            # every node from QK^T to the PV matmul's probability operand
    canon_atoms: list      # atoms of canonical [Z, H, M, N] (None where the axis is a unit)
    gqa_ratio: Any = 1
    prob_dtype: Any = None


def _tensor_args(node: fx.Node):
    return [(i, a) for i, a in enumerate(node.args) if isinstance(a, fx.Node)
            and isinstance(val(a), torch.Tensor)]


def _score_paths(x: fx.Node):
    """All paths x <- ... <- QK matmul through ops the score families know, as lists [(node, chain_arg)]."""
    paths = []

    def walk(node, path, depth):
        if depth > MAX_DEPTH or len(paths) > 8:
            return
        if node.op != "call_function":
            return
        if node.target in patterns.QK_MATMULS:
            paths.append([(node, None)] + path)
            return
        if is_layout_op(node) or node.target in SCORE_CASTS:
            walk(node.args[0], [(node, 0)] + path, depth + 1)
            return
        if node.target in INPLACE and _tensor_args(node) and _tensor_args(node)[0][0] == 0:
            walk(node.args[0], [(node, 0)] + path, depth + 1)  # only the mutated self may be the chain
            return
        if node.target in patterns.SCORE_HANDLERS:
            through = patterns.SCORE_OPERANDS.get(node.target)
            for i, a in _tensor_args(node):
                if through is None or i in through:
                    walk(a, [(node, i)] + path, depth + 1)

    walk(x, [], 0)
    return paths


def data_users(node: fx.Node) -> list:
    return [u for u in node.users if u.target not in SHAPE_READERS]


def _only_user(node: fx.Node, nxt: fx.Node) -> None:
    users = data_users(node)
    if users != [nxt]:
        others = [u for u in users if u is not nxt]
        names = ", ".join(f"{u.name} ({getattr(u.target, '__name__', u.target)})" for u in others[:3])
        raise Reject(f"the intermediate {node.name} is also used by {names or 'the graph output'}: "
                     "the n x n tensor must exist, rewriting would not save it")


def _atoms(factors):
    return [f.axis for f in drop_unit(factors)]


def _single(factors, what):
    """The base axis an operand axis reads, or a tuple of base axes it merges (gpt-fast's RoPE flattens
    [..., D/2, 2] into the head dim): the rewrite flattens those, a copy of q/k/v at worst, never of the scores."""
    f = drop_unit(factors)
    if len(f) > 1:
        if any(x.broadcast for x in f):
            raise Reject(f"{what} merges a broadcast axis with others")
        return tuple(f)
    return f[0] if f else None


def _walk_scores(path, softmax: fx.Node) -> tuple[ScoreState, list, int]:
    qk = path[0][0]
    q_batch = drop_unit(trace_back(qk.args[1] if qk.target is aten.baddbmm.default else qk.args[0]).dims[0])
    n_b = len(q_batch)
    bdims = [Factor(("b", i), f.size) for i, f in enumerate(q_batch)]
    out_shape = shape_of(qk)
    st = ScoreState(dims=[bdims, [Factor(("m",), out_shape[1])], [Factor(("n",), out_shape[2])]])
    st.tag("matmul")
    if qk.target is aten.baddbmm.default:
        beta = qk.kwargs.get("beta", 1)
        alpha = qk.kwargs.get("alpha", 1)
        st.scale.append(("mul", alpha))
        if beta != 0:
            st.biases.append(Operand(qk.args[0], [list(d) for d in st.dims], coef=beta))
            st.tag("masked(additive)")
    nodes = [qk]
    for (prev, _), (node, arg) in zip(path, path[1:]):
        _only_user(prev, node)
        nodes.append(node)
        if is_layout_op(node) or node.target in SCORE_CASTS:
            if node.target is aten.expand.default:
                raise Reject("the scores are expanded before the softmax")
            if node.target in SCORE_CASTS and not is_layout_op(node):
                if not val(node).dtype.is_floating_point:
                    raise Reject("the scores are cast to a non-float dtype")
                continue
            try:
                st.dims = apply_layout_op(node, st.dims)
            except Untrackable as e:
                raise Reject(f"the scores are reshaped in a way that mixes axes ({e})")
            continue
        patterns.SCORE_HANDLERS[INPLACE.get(node.target, node.target)](node, arg, st)
    _only_user(path[-1][0], softmax)
    return st, nodes, n_b


def _walk_probs(softmax: fx.Node, st: ScoreState):
    """softmax -> casts, layout and the families' probability ops (dropout) -> PV matmul. Returns (pv, prob
    operand, nodes, dims)."""
    dims = st.dims
    node = softmax
    nodes = [softmax]
    for _ in range(MAX_DEPTH):
        users = data_users(node)
        if len(users) != 1:
            _only_user(node, None)
        nxt = users[0]
        if nxt.target in patterns.PV_MATMULS:
            if nxt.args[0] is not node:
                raise Reject("the probabilities are the right operand of the PV matmul")
            return nxt, node, nodes, dims
        if nxt.target in patterns.PROB_HANDLERS:
            taken = patterns.PROB_HANDLERS[nxt.target](nxt, st)
            nodes += taken
            node = taken[-1]
            continue
        if is_layout_op(nxt) or nxt.target in (aten._to_copy.default, aten.to.dtype):
            if not is_layout_op(nxt) and not val(nxt).dtype.is_floating_point:
                raise Reject("the probabilities are cast to a non-float dtype")
            if is_layout_op(nxt):
                try:
                    dims = apply_layout_op(nxt, dims)
                except Untrackable as e:
                    raise Reject(f"the probabilities are reshaped in a way that mixes axes ({e})")
            nodes.append(nxt)
            node = nxt
            continue
        raise Reject(f"the probabilities go through {getattr(nxt.target, '__name__', nxt.target)} "
                     "before the PV matmul")
    raise Reject("the probability chain is too long")


def _canonical_q(q: Traced, n_b: int):
    batch = drop_unit(q.dims[0])
    if len(batch) > 2:
        raise Reject("more than two batch/head axes are merged into the matmul's batch")
    zh = [None] * (2 - len(batch)) + batch
    return zh + [_single(q.dims[1], "the query length"), _single(q.dims[2], "the head dim")]


def _canonical_kv(t: Traced, q_batch, head_pos: int, seq_dim: int, feat_dim: int, what: str):
    aligned = patterns.align_kv(q_batch, drop_unit(t.dims[0]), head_pos, what)
    grouped = None
    out = []
    for entry in aligned:
        if isinstance(entry, tuple):
            grouped = entry[1]
            out.append(None if entry[1].broadcast else entry[1])
        else:
            out.append(entry)
    zh = [None] * (2 - len(out)) + out
    return zh + [_single(t.dims[seq_dim], f"{what}'s length"), _single(t.dims[feat_dim], f"{what}'s head dim")], \
        grouped


def _check_no_mutation(graph: fx.Graph, first: fx.Node, last: fx.Node, chain: set) -> None:
    inside = False
    for node in graph.nodes:
        if node is first:
            inside = True
        elif node is last:
            return
        elif (inside and node not in chain and node.op == "call_function"
              and isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable):
            raise Reject(f"{node.name} ({node.target}) mutates a tensor between the two matmuls")


def match_at(softmax: fx.Node) -> SiteMatch:
    x = softmax.args[0]
    dim = patterns.softmax_dim(softmax)
    paths = _score_paths(x)
    if not paths:
        raise Reject("no q @ k^T matmul feeds this softmax through ops the pattern families know")
    first_reason = None
    for path in paths:
        try:
            return _plan(path, softmax, dim)
        except Reject as e:
            first_reason = first_reason or str(e)
    raise Reject(first_reason)


def _plan(path, softmax: fx.Node, dim: int) -> SiteMatch:
    st, score_nodes, n_b = _walk_scores(path, softmax)
    rank = len(st.dims)
    d = dim + rank if dim < 0 else dim
    m_size, n_size = shape_of(path[0][0])[1:]
    # a softmax over any unit axis is all ones, so with a single key the axis need not be told apart
    if _atoms(st.dims[d]) != [("n",)] and not (known_eq(n_size, 1) and _atoms(st.dims[d]) == []):
        raise Reject(f"softmax over dim {dim}, which is not the key axis of q @ k^T")
    st.safe_softmax = softmax.target is aten._safe_softmax.default
    pv, prob, prob_nodes, pdims = _walk_probs(softmax, st)
    want = [[("b", i) for i in range(n_b)], [] if known_eq(m_size, 1) else [("m",)],
            [] if known_eq(n_size, 1) else [("n",)]]
    if [_atoms(f) for f in pdims] != want:
        raise Reject("the probabilities reach the PV matmul in another layout than the scores")
    qk = path[0][0]
    a_arg, b_arg = (1, 2) if qk.target is aten.baddbmm.default else (0, 1)
    q = trace_back(qk.args[a_arg], allow_scale=True)
    k = trace_back(qk.args[b_arg], allow_scale=True)
    v = trace_back(pv.args[1])
    q_targets = _canonical_q(q, n_b)
    q_batch = drop_unit(q.dims[0])
    head_pos = len(q_batch) - 1
    k_targets, k_group = _canonical_kv(k, q_batch, head_pos, 2, 1, "k")
    v_targets, v_group = _canonical_kv(v, q_batch, head_pos, 1, 2, "v")
    ratio = patterns.group_ratio(k_group, v_group, st)
    st.scale = q.scale + k.scale + st.scale
    if q.scale or k.scale:
        st.tag("scaled")
    _check_no_mutation(softmax.graph, qk, pv, {n for n in score_nodes if n.target in INPLACE})
    canon = [None] * (2 - n_b) + [("b", i) for i in range(n_b)] + [("m",), ("n",)]
    patterns.finish(st, m_size, n_size)
    return SiteMatch(softmax, qk, pv, q, k, v, q_targets, k_targets, v_targets, n_b, st,
                score_nodes + prob_nodes, canon, ratio, val(prob).dtype)


def _is_weight(node) -> bool:
    """A graph input or attribute, seen through layout ops (a linear layer's ``t(weight)``)."""
    while isinstance(node, fx.Node) and node.op == "call_function" and is_layout_op(node):
        node = node.args[0]
    return isinstance(node, fx.Node) and node.op in ("placeholder", "get_attr")


def _attention_like(softmax: fx.Node, depth: int = 12) -> bool:
    """Whether a softmax could be attention: its input is computed from a product of two activations (a batched
    matmul, or a 2-D one where neither side is a weight), or its output feeds a batched matmul. A softmax over the
    output of a linear layer (an MoE router, a classifier head) is neither, and is not a candidate site."""
    seen = set()
    frontier = [softmax.args[0]]
    for _ in range(depth):
        nxt = []
        for node in frontier:
            if not isinstance(node, fx.Node) or node in seen or node.op != "call_function":
                continue
            seen.add(node)
            if node.target in patterns.QK_MATMULS:
                return True
            if node.target in (aten.mm.default, aten.addmm.default):
                a, b = node.args[-2:]
                if not (_is_weight(a) or _is_weight(b)):
                    return True
            nxt += [a for a in node.args if isinstance(a, fx.Node)]
        frontier = nxt
        if len(seen) > 400:
            return True  # too far to tell: keep it a candidate, so its reason is reported
    node = softmax
    for _ in range(depth):
        if any(u.target in patterns.PV_MATMULS for u in data_users(node)):
            return True
        if len(data_users(node)) != 1:
            return False
        node = next(iter(data_users(node)))
    return False


def find_candidates(gm: fx.GraphModule):
    """Yields (softmax node, SiteMatch or Reject) for every softmax in the graph that could be attention, and
    (node, Reject) for every fused attention call (reported as a site, left alone)."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in patterns.FUSED_SITES:
            try:
                reason, flags, shapes = patterns.FUSED_SITES[node.target](node)
                yield node, Reject(reason, pattern="sdpa", flags=flags, shapes=shapes)
            except Exception as e:  # noqa: BLE001 - describing it is for the report; it never costs the graph
                yield node, Reject(f"a fused attention call ({node.target}), left as it is ({type(e).__name__}: "
                                   f"{e})", pattern="sdpa")
        elif node.op == "call_function" and node.target in patterns.SOFTMAX_OPS and _attention_like(node):
            try:
                yield node, match_at(node)
            except Reject as e:
                yield node, e
            except Exception as e:  # a matcher bug costs this site, never the graph or the user's program
                yield node, Reject(f"internal error while matching ({type(e).__name__}: {e}); left alone")
