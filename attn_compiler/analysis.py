"""Memory analysis: bytes of every value of a lowered graph as sympy expressions, liveness, and peak bytes.

The model, stated once so the numbers can be judged:

* A value's bytes are numel x element size of its fake tensor (``node.meta["val"]``), a polynomial in the shape
  symbols. Views (ops whose schema says the result aliases an input, plus ``_unsafe_view``) share the storage of
  their base, so an allocation is counted once, and it lives until the last use of any of its aliases.
* Graph inputs (parameters included) are live for the whole call; graph outputs live to its end.
* Inference (forward only): allocate each op's fresh outputs, take the live sum, then free storages whose last use
  was this op. The peak is the largest live sum over the execution order.
* Training step under eager autograd (what runs when no budget is set): an op whose output requires grad keeps the
  tensors that its ATen derivative formula needs (``SAVES`` below; e.g. ``mm`` saves both operands, ``_softmax``
  its output, ``native_layer_norm`` input, weight, bias, mean and rstd, ``memattn.attention`` q, k, v, out and
  stats only). Saved storages stay live until that op's backward has run. The backward runs the ops in reverse;
  each allocates a gradient for every input that requires grad (ops whose backward only reshapes the incoming
  gradient, like views, ``clone`` and ``add``, pass it through without allocating), and frees its incoming
  gradient and its saved tensors afterwards. Gradients of graph inputs (parameter ``.grad``) stay live to the end.
  Ops not in the table are modelled as saving every tensor input and output (conservative) and listed in
  ``Memory.assumed``. Allocator rounding and kernels' private workspaces are not modelled.
* Peaks over symbolic shapes: each candidate live sum is a polynomial; one that is coefficient-wise below another
  is below it at every size and is dropped; the rest form a ``sympy.Max``, exact at any sizes.
"""
from __future__ import annotations

import dataclasses
import fractions
import operator
from typing import Optional

import sympy
import torch
import torch.fx as fx

from attn_compiler.lower import NO_GRAD

aten = torch.ops.aten

# ops that return a view although their schema does not say so
_VIEW_LIKE = {aten._unsafe_view.default, aten.alias.default}
# ops whose backward hands on (a reshaping of) the incoming gradient instead of allocating a new one
_PASS_GRAD = {aten.view, aten._unsafe_view, aten.reshape, aten.t, aten.transpose, aten.permute, aten.unsqueeze,
              aten.squeeze, aten.alias, aten.clone, aten.detach, aten.add, aten.contiguous, aten.flatten,
              aten.unflatten, aten.expand}   # expand: the same-shape expands of matmul lowering
# ops with no gradient even on float outputs
_NO_GRAD_OPS = {aten.detach, aten.zeros_like, aten.ones_like, aten.empty_like, aten.full_like, aten.rand_like,
                aten.randn_like, aten.ones, aten.zeros, aten.empty, aten.full, aten.arange, aten.scalar_tensor,
                aten.empty_strided, aten.new_empty, aten.new_zeros, aten.new_ones, aten.sym_size}

CAVEATS = ("estimates count every allocation of the graph's own tensors; allocator rounding, kernel workspaces "
           "and memory outside the graph (optimizer state) are not modelled")


def _packet(node):
    t = node.target
    return getattr(t, "overloadpacket", t)


# --- what eager autograd saves: derivatives.yaml, for the ops lowered graphs contain --------------------------------
# Each entry: (node, rg) -> the values the backward keeps, as input nodes or ("out", index); rg(i) says whether
# argument i requires grad. Ops absent here save all tensor inputs and outputs (conservative).

def _arg(node, i):
    return node.args[i] if i < len(node.args) else None


def _both_operands(a, b):
    def saves(node, rg):
        out = []
        if rg(a):
            out.append(_arg(node, b))
        if rg(b):
            out.append(_arg(node, a))
        return out
    return saves


def _outs(*idx):
    return lambda node, rg: [("out", i) for i in idx]


def _args(*idx):
    return lambda node, rg: [_arg(node, i) for i in idx]


def _nothing(node, rg):
    return []


def _memattn_attention(node, rg):
    # setup_context in ops.py: q, k, v, bias, mask, seed from the inputs, out and stats from the outputs
    from attn_compiler.ops import ARGS
    return [_arg(node, ARGS.index(name)) for name in ("q", "k", "v", "bias", "mask", "seed")] + [("out", 0), ("out", 1)]


SAVES = {
    aten.mm: _both_operands(0, 1), aten.bmm: _both_operands(0, 1), aten.matmul: _both_operands(0, 1),
    aten.addmm: _both_operands(1, 2), aten.baddbmm: _both_operands(1, 2),
    aten.mul: lambda n, rg: ([_arg(n, 1)] if rg(0) else []) + ([_arg(n, 0)] if rg(1) else []),
    aten.div: lambda n, rg: ([_arg(n, 1)] if rg(0) else []) + ([_arg(n, 0), _arg(n, 1)] if rg(1) else []),
    aten._softmax: _outs(0), aten._log_softmax: _outs(0), aten.tanh: _outs(0), aten.sigmoid: _outs(0),
    aten.relu: _outs(0), aten.exp: _outs(0), aten.rsqrt: _outs(0), aten.sqrt: _outs(0),
    aten.gelu: _args(0), aten.silu: _args(0), aten.log: _args(0), aten.pow: _args(0), aten.sin: _args(0),
    aten.cos: _args(0), aten.abs: _args(0), aten.tanh_backward: _args(0, 1),
    aten.native_layer_norm: lambda n, rg: [_arg(n, 0), _arg(n, 2), _arg(n, 3), ("out", 1), ("out", 2)],
    aten.native_dropout: _outs(1),
    aten.masked_fill: _args(1), aten.where: _args(0),
    aten.embedding: _args(1), aten.nll_loss_forward: lambda n, rg: [_arg(n, 0), _arg(n, 1), _arg(n, 2), ("out", 1)],
    aten.mean: _nothing, aten.sum: _nothing, aten.add: _nothing, aten.sub: _nothing, aten.neg: _nothing,
    aten.cat: _nothing, aten.split: _nothing, aten.split_with_sizes: _nothing, aten.clone: _nothing,
    aten._to_copy: _nothing, aten.slice: _nothing, aten.select: _nothing, aten.expand: _nothing,
    aten.view: _nothing, aten._unsafe_view: _nothing, aten.reshape: _nothing, aten.t: _nothing,
    aten.transpose: _nothing, aten.permute: _nothing, aten.unsqueeze: _nothing, aten.squeeze: _nothing,
    aten.alias: _nothing, aten.contiguous: _nothing, aten.flatten: _nothing, aten.unflatten: _nothing,
    aten.unbind: _nothing, aten.repeat: _nothing,
    operator.getitem: _nothing,
}


def _register_custom():
    # the op is registered by ops.py; looked up lazily so importing this module does not import the kernels
    try:
        SAVES[torch.ops.memattn.attention] = _memattn_attention
    except AttributeError:
        pass


# --- values: bytes, storages, aliases --------------------------------------------------------------------------------

def _size(x) -> sympy.Expr:
    return x.node.expr if isinstance(x, torch.SymInt) else sympy.Integer(int(x))


def tensor_bytes(t: torch.Tensor) -> sympy.Expr:
    return sympy.Mul(*[_size(s) for s in t.shape], sympy.Integer(t.element_size()))


def _tensors(v) -> list:
    """A node's value as a flat list aligned with its outputs (None where an output is not a tensor)."""
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (tuple, list)):
        return [x if isinstance(x, torch.Tensor) else None for x in v]
    return []


def _alias_of(node: fx.Node) -> Optional[list]:
    """For a view-producing op: for each output, the input node it aliases (None for a fresh output)."""
    t = node.target
    if t is operator.getitem:
        return None
    if t in _VIEW_LIKE:
        return [node.args[0]]
    schema = getattr(t, "_schema", None)
    if schema is None:
        return None
    found, aliased = [], False
    for ret in schema.returns:
        src = None
        if ret.alias_info is not None:
            want = ret.alias_info.before_set
            for i, arg in enumerate(schema.arguments):
                # a list of views (split, unbind) carries its alias set on the elements: Tensor(a)[]
                if arg.alias_info is not None and (arg.alias_info.before_set & want or not want):
                    src = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
                    break
            aliased = aliased or src is not None
        found.append(src)
    return found if aliased else None


def shape_hints(graph: fx.Graph) -> dict:
    """Symbol -> example value, from the shape environment of the graph's fake values."""
    for node in graph.nodes:
        for t in _tensors(node.meta.get("val")):
            if t is None:
                continue
            env = getattr(getattr(t, "fake_mode", None), "shape_env", None)
            if env is not None:
                src = env.backed_var_to_val if hasattr(env, "backed_var_to_val") else env.var_to_val
                return {s: int(v) for s, v in src.items() if getattr(v, "is_integer", True) and int(v) == v}
    return {}


@dataclasses.dataclass
class Storage:
    sid: int
    bytes: sympy.Expr
    producer: fx.Node
    is_input: bool = False


class Values:
    """Storages of a graph: which allocation each value lives in, and the bytes of each allocation."""

    def __init__(self, graph: fx.Graph):
        _register_custom()
        self.graph = graph
        self.order = list(graph.nodes)
        self.index = {n: i for i, n in enumerate(self.order)}
        self.storages: list[Storage] = []
        self.of: dict = {}            # node -> list of storage ids aligned with its outputs (None: no tensor)
        for node in self.order:
            self.of[node] = self._assign(node)
        self.last_use = {}            # sid -> index of the last node that reads any alias of it
        for node in self.order:
            i = self.index[node]
            for sid in self.sids(node):
                self.last_use[sid] = max(self.last_use.get(sid, i), i)
            for inp in node.all_input_nodes:
                for sid in self.sids(inp):
                    self.last_use[sid] = max(self.last_use.get(sid, i), i)
        self.dies_at = {}             # index -> storages whose last use is that node
        for sid, i in self.last_use.items():
            self.dies_at.setdefault(i, []).append(sid)
        self.value_bytes = {}         # node -> bytes of its value(s), cached for the backward model

    def _new(self, t, node, is_input=False) -> int:
        self.storages.append(Storage(len(self.storages), tensor_bytes(t), node, is_input))
        return len(self.storages) - 1

    def _assign(self, node: fx.Node) -> list:
        v = node.meta.get("val")
        ts = _tensors(v)
        if node.op == "placeholder":
            return [self._new(t, node, True) if t is not None else None for t in ts]
        if node.op != "call_function" or not ts:
            return [None] * len(ts)
        if node.target is operator.getitem:
            parent = self.of.get(node.args[0], [])
            i = node.args[1]
            return [parent[i] if isinstance(i, int) and i < len(parent) else None]
        alias = _alias_of(node)
        out = []
        for i, t in enumerate(ts):
            src = alias[min(i, len(alias) - 1)] if alias else None
            if t is None:
                out.append(None)
            elif isinstance(src, fx.Node) and self.sids(src):
                out.append(self.sids(src)[0])
            else:
                out.append(self._new(t, node))
        return out

    def sids(self, node) -> list:
        if not isinstance(node, fx.Node):
            return []
        return [s for s in self.of.get(node, []) if s is not None]

    def fresh(self, node) -> list:
        """Storages this node allocates (not views of its inputs)."""
        return [s for s in self.sids(node) if self.storages[s].producer is node]


# --- sums of polynomials, and their maxima --------------------------------------------------------------------------

def _terms(expr) -> dict:
    """{monomial: coefficient}; rational coefficients as Python ints / Fractions, whose arithmetic in the running
    tallies and the dominance tests is far cheaper than sympy numbers'."""
    expr = sympy.expand(sympy.sympify(expr))
    out = {}
    for term in sympy.Add.make_args(expr):
        coeff, rest = term.as_coeff_Mul()
        if coeff.is_Integer:
            coeff = int(coeff)
        elif coeff.is_Rational:
            coeff = fractions.Fraction(int(coeff.p), int(coeff.q))
        out[rest] = out.get(rest, 0) + coeff
    return out


class Tally:
    """A running sum of storage bytes, kept as polynomial terms and as its value at the example sizes."""

    def __init__(self, hints: dict, symbolic: bool = True, cache: Optional[dict] = None):
        self.hints, self.symbolic = hints, symbolic
        self.terms: dict = {}
        self.value = 0
        self._cache: dict = {} if cache is None else cache   # shared between runs over the same graph

    def _parse(self, expr):
        key = id(expr)   # the same expression objects recur (storage bytes), so identity is a cheap key
        hit = self._cache.get(key)
        if hit is None or hit[0] is not expr:
            hit = self._cache[key] = [expr, None, int(sympy.sympify(expr).xreplace(self.hints))]
        if self.symbolic and hit[1] is None:
            hit[1] = _terms(expr)
        return hit[1], hit[2]

    def add(self, expr, sign: int = 1) -> None:
        if not self.symbolic:
            self.value += sign * self._parse(expr)[1]
            return
        terms, value = self._parse(expr)
        self.value += sign * value
        for k, c in terms.items():
            self.terms[k] = self.terms.get(k, 0) + sign * c

    def snapshot(self):
        return {k: c for k, c in self.terms.items() if c != 0}


class MaxOf:
    """Candidate peaks; keeps only those not dominated coefficient-wise (dominated ones are smaller at any sizes,
    because every monomial of sizes is non-negative).

    Past ``LIMIT`` candidates the rest are pruned, but never one that is the largest at a probe: the example sizes
    scaled by 4**k (k = 0..10, up to 2**20), all symbols together and each alone. Keeping only the largest at the
    example sizes would drop the n**2 candidates of a deep model whose example n is small, and the formula would
    then say a fraction of the true peak at a long sequence. Between probes a pruned candidate can still be the
    largest, and the formula is then a lower bound there (only once more than LIMIT candidates survive)."""

    LIMIT = 24
    SCALES = tuple(2 ** k for k in range(0, 21, 2))

    def __init__(self, hints: Optional[dict] = None):
        self.cands: list = []   # [terms, value at example sizes, values at the probes (None until a prune)]
        self.hints = {k: int(v) for k, v in (hints or {}).items()}
        self._probes: Optional[list] = None
        self._mono: dict = {}

    def offer(self, terms: dict, value: int) -> None:
        for other, _, _ in self.cands:
            if all(other.get(k, 0) - c >= 0 for k, c in terms.items()) and \
                    all(c >= 0 for k, c in other.items() if k not in terms):
                return
        self.cands = [cand for cand in self.cands
                      if not (all(terms.get(k, 0) - c >= 0 for k, c in cand[0].items()) and
                              all(c >= 0 for k, c in terms.items() if k not in cand[0]))]
        self.cands.append([terms, value, None])
        if len(self.cands) > self.LIMIT:
            self._prune()

    def _probe_points(self) -> list:
        if self._probes is None:
            syms = list(self.hints)
            pts = [{s: self.hints[s] * f for s in syms} for f in self.SCALES]
            if len(syms) > 1:
                pts += [{**self.hints, s: self.hints[s] * f} for s in syms for f in self.SCALES[1:]]
            self._probes = pts
        return self._probes

    def _mono_values(self, mono) -> tuple:
        vals = self._mono.get(mono)
        if vals is None:
            e = sympy.sympify(mono)
            vals = self._mono[mono] = tuple(int(e.xreplace(p)) if e.free_symbols else int(e)
                                            for p in self._probe_points())
        return vals

    def _values_at_probes(self, cand: list) -> list:
        """The candidate's bytes at every probe, computed once and kept with it: past LIMIT every offer prunes,
        and recomputing every candidate at every probe each time made a 12-layer model's dynamic-shape budget plan
        spend most of its compile there (benchmarks/compile_time.py)."""
        if cand[2] is None:
            vals = [0] * len(self._probe_points())
            for k, c in cand[0].items():
                for i, m in enumerate(self._mono_values(k)):
                    vals[i] += c * m
            cand[2] = vals
        return cand[2]

    def _prune(self) -> None:
        at = [self._values_at_probes(cand) for cand in self.cands]
        keep = {max(range(len(self.cands)), key=lambda j: at[j][i]) for i in range(len(self._probe_points()))}
        by_value = sorted(range(len(self.cands)), key=lambda j: -self.cands[j][1])
        for j in by_value:
            if len(keep) >= self.LIMIT:
                break
            keep.add(j)
        self.cands = [self.cands[j] for j in sorted(keep)]

    def expr(self) -> sympy.Expr:
        """Max of the candidates, unevaluated: sympy's pairwise simplification proves inequalities between the
        polynomials, over a second per call on a 12-layer model with dynamic shapes, and the compile only needs
        values (Bytes.at evaluates it at given sizes); the report's formula (Bytes.simplified) lets sympy drop the
        arguments it proves smaller when it is shown."""
        exprs = [sympy.Add(*[c * k for k, c in t.items()]) for t, _, _ in self.cands] or [sympy.Integer(0)]
        return exprs[0] if len(exprs) == 1 else sympy.Max(*exprs, evaluate=False)


class Bytes:
    """A byte count as a sympy expression over the shape symbols, evaluable at the example sizes or any others."""

    def __init__(self, expr, hints: Optional[dict] = None, value: Optional[int] = None):
        self.expr = sympy.sympify(expr)
        self.hints = dict(hints or {})
        self._value = value

    def at(self, hints: Optional[dict] = None) -> int:
        """Bytes at the given sizes ({"s0": 16384} or {sympy.Symbol("s0"): 16384}); unnamed symbols keep their
        example values."""
        if not hints and self._value is not None:
            return self._value
        by_name = {str(s): s for s in self.expr.free_symbols}
        subs = dict(self.hints)
        for k, v in (hints or {}).items():
            sym = by_name.get(str(k), sympy.Symbol(str(k)) if not isinstance(k, sympy.Symbol) else k)
            subs[sym] = v
        out = self.expr.xreplace({s: sympy.Integer(int(v)) for s, v in subs.items()})
        if out.free_symbols:
            raise ValueError(f"no size given for {', '.join(sorted(map(str, out.free_symbols)))}")
        return int(out)

    @property
    def free_symbols(self):
        return self.expr.free_symbols

    def simplified(self) -> sympy.Expr:
        expr = self.expr
        if isinstance(expr, sympy.Max):  # built unevaluated (MaxOf.expr): sympy drops the arguments it proves smaller
            expr = sympy.Max(*expr.args)
        if isinstance(expr, sympy.Max):
            return sympy.Max(*[sympy.factor(a) for a in expr.args], evaluate=False)
        return sympy.factor(expr)

    def __int__(self) -> int:
        return self.at()

    def __index__(self) -> int:
        return self.at()

    def __float__(self) -> float:
        return float(self.at())

    def __lt__(self, other): return self.at() < int(other)
    def __le__(self, other): return self.at() <= int(other)
    def __gt__(self, other): return self.at() > int(other)
    def __ge__(self, other): return self.at() >= int(other)

    def __str__(self) -> str:
        return f"{self.simplified()} = {fmt_bytes(self.at())}" if self.expr.free_symbols else fmt_bytes(self.at())

    __repr__ = __str__


def fmt_bytes(n) -> str:
    """A byte count as people read it: a number (int, float or a sympy number) in B/KiB/MiB/GiB, a symbolic
    formula factored and in B, None as "?"."""
    if n is None:
        return "?"
    if isinstance(n, sympy.Basic):
        if not n.is_number:
            return f"{sympy.factor(n)} B"
    n = int(n)
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


# --- the models -----------------------------------------------------------------------------------------------------

def _requires_grad(values: Values, example_inputs: Optional[list], entry_grad: bool) -> dict:
    placeholders = [n for n in values.order if n.op == "placeholder"]
    rg = {}
    for i, node in enumerate(placeholders):
        real = example_inputs[i] if example_inputs is not None and i < len(example_inputs) else None
        v = real if isinstance(real, torch.Tensor) else node.meta.get("val")
        rg[node] = bool(isinstance(v, torch.Tensor) and v.requires_grad and v.dtype.is_floating_point)
    for node in values.order:
        if node.op != "call_function":
            continue
        if node.target is operator.getitem:
            v = node.meta.get("val")
            rg[node] = rg.get(node.args[0], False) and isinstance(v, torch.Tensor) and v.dtype.is_floating_point
            continue
        ts = [t for t in _tensors(node.meta.get("val")) if t is not None]
        grad_on = node.meta.get(NO_GRAD, entry_grad)
        rg[node] = bool(grad_on and ts and any(t.dtype.is_floating_point or t.dtype.is_complex for t in ts)
                        and _packet(node) not in _NO_GRAD_OPS
                        and any(rg.get(a, False) for a in node.all_input_nodes))
    return rg


@dataclasses.dataclass
class Saved:
    """What the backward of each op keeps: node -> storages, and for each storage the ops whose backward reads it."""
    by_node: dict
    readers: dict     # sid -> set of nodes
    assumed: set      # op names modelled conservatively


def saved_for_backward(values: Values, rg: dict) -> Saved:
    by_node, readers, assumed = {}, {}, set()
    for node in values.order:
        if node.op != "call_function" or not rg.get(node):
            continue
        args = [a for a in node.args]

        def arg_rg(i, args=args):
            return i < len(args) and isinstance(args[i], fx.Node) and rg.get(args[i], False)

        rule = SAVES.get(_packet(node))
        if rule is None:
            assumed.add(str(_packet(node)))
            refs = list(node.all_input_nodes) + [("out", i) for i in range(len(values.of[node]))]
        else:
            refs = rule(node, arg_rg)
        sids = []
        for ref in refs:
            if isinstance(ref, tuple):
                outs = values.of[node]
                if ref[1] < len(outs) and outs[ref[1]] is not None:
                    sids.append(outs[ref[1]])
            elif isinstance(ref, fx.Node):
                sids += values.sids(ref)
        sids = [s for s in dict.fromkeys(sids) if not values.storages[s].is_input]
        if sids:
            by_node[node] = sids
            for s in sids:
                readers.setdefault(s, set()).add(node)
    return Saved(by_node, readers, assumed)


@dataclasses.dataclass
class Peak:
    bytes: Bytes
    at_node: str          # where the peak is at the example sizes
    phase: str            # "forward" | "backward"


def _graph_outputs(values: Values) -> set:
    out = set()
    for node in values.order:
        if node.op == "output":
            for a in node.all_input_nodes:
                out.update(values.sids(a))
    return out


def _walk_forward(values: Values, tally: Tally, offer) -> set:
    """Tally a forward graph in execution order: its inputs live throughout, each op's fresh storages added and the
    dead ones freed, ``offer(node)`` after each op. Returns the storages still live when it returns."""
    keep = _graph_outputs(values)
    for s in values.storages:
        if s.is_input:
            tally.add(s.bytes)
    live = set()
    for node in values.order:
        if node.op == "call_function":
            for sid in values.fresh(node):
                tally.add(values.storages[sid].bytes)
                live.add(sid)
            offer(node)
        _free_dead(values, node, live, keep, (), tally)
    return live


def inference_peak(values: Values, hints: dict, symbolic: bool = True) -> Peak:
    tally, best = Tally(hints, symbolic), MaxOf(hints)
    top = [-1, ""]

    def offer(node):
        if symbolic:
            best.offer(tally.snapshot(), tally.value)
        if tally.value > top[0]:
            top[:] = [tally.value, node.name]
    _walk_forward(values, tally, offer)
    expr = best.expr() if symbolic else sympy.Integer(max(top[0], 0))
    return Peak(Bytes(expr, hints, max(top[0], 0)), top[1], "forward")


def _free_dead(values: Values, node, live: set, keep, hold, tally: Tally) -> None:
    """Free the storages whose last use is this node (unless kept as outputs or held for backward)."""
    for sid in values.dies_at.get(values.index[node], ()):
        if sid in live and sid not in keep and sid not in hold:
            tally.add(values.storages[sid].bytes, -1)
            live.discard(sid)


@dataclasses.dataclass
class RecomputeSet:
    """Recompute decisions as the training model sees them: values rebuilt in backward instead of kept."""
    recompute: set = dataclasses.field(default_factory=set)   # forward nodes re-run in backward


def _recompute_closure(values: Values, node: fx.Node, recompute: set, held: set, first_reader) -> None:
    """The inputs a recomputed node needs become held until its first backward reader (recursively through
    recomputed producers)."""
    for inp in node.all_input_nodes:
        for sid in values.sids(inp):
            st = values.storages[sid]
            if st.is_input:
                continue
            if st.producer in recompute:
                _recompute_closure(values, st.producer, recompute, held, first_reader)
            else:
                held.add((sid, first_reader))


def training_peak(values: Values, rg: dict, saved: Saved, hints: dict, plan: Optional[RecomputeSet] = None,
                  symbolic: bool = True) -> Peak:
    """Forward with saved tensors kept, then eager autograd's backward, in reverse op order (see module doc)."""
    recompute = plan.recompute if plan else set()
    fwd_nodes = [n for n in values.order if n.op == "call_function"]
    pos = values.index
    # sid -> the backward readers (ops whose backward reads it); the last one in backward order frees it
    hold = {}
    remat = {}        # sid recomputed in backward: materialised at its first reader, freed after its last
    for sid, readers in saved.readers.items():
        st = values.storages[sid]
        if st.producer in recompute:
            remat[sid] = set(readers)
            first = max(readers, key=lambda n: pos[n])   # backward runs in reverse: the latest forward op first
            extra = set()
            _recompute_closure(values, st.producer, recompute, extra, first)
            for s2, reader in extra:
                if s2 in remat or values.storages[s2].producer in recompute:
                    continue
                hold.setdefault(s2, set()).add(reader)
        else:
            hold.setdefault(sid, set()).update(readers)
    keep = _graph_outputs(values)
    tally, best = Tally(hints, symbolic, values.__dict__.setdefault("tally_cache", {})), MaxOf(hints)
    top = [-1, "", ""]

    def offer(where, phase):
        if symbolic:
            best.offer(tally.snapshot(), tally.value)
        if tally.value > top[0]:
            top[:] = [tally.value, where, phase]

    for s in values.storages:
        if s.is_input:
            tally.add(s.bytes)
    live = set()
    for node in values.order:
        if node.op == "call_function":
            for sid in values.fresh(node):
                tally.add(values.storages[sid].bytes)
                live.add(sid)
            offer(node.name, "forward")
        _free_dead(values, node, live, keep, hold, tally)
    if not any(rg.get(n) for n in fwd_nodes):
        expr = best.expr() if symbolic else sympy.Integer(top[0])
        return Peak(Bytes(expr, hints, top[0]), top[1], top[2])

    # backward: incoming gradients, one pending allocation per value that receives a gradient
    grad_bytes = {}   # node -> bytes expr of its pending gradient (allocated), or 0 when passed through
    for node in values.order:
        if node.op == "output":
            for a in node.all_input_nodes:
                if rg.get(a):
                    grad_bytes[a] = _value_bytes(a, values.value_bytes)
                    tally.add(grad_bytes[a])
    free_after = {}   # node -> sids whose last backward reader is node
    for sid, readers in hold.items():
        if sid in live:
            last = min(readers, key=lambda n: pos[n])
            free_after.setdefault(last, []).append(sid)
    remat_first, remat_last = {}, {}
    for sid, readers in remat.items():
        remat_first.setdefault(max(readers, key=lambda n: pos[n]), []).append(sid)
        remat_last.setdefault(min(readers, key=lambda n: pos[n]), []).append(sid)
    offer("backward start", "backward")
    for node in reversed(fwd_nodes):
        for sid in remat_first.get(node, []):
            tally.add(values.storages[sid].bytes)
        if rg.get(node) and node in grad_bytes:
            incoming = grad_bytes.pop(node)
            passes = _packet(node) in _PASS_GRAD or node.target is operator.getitem
            transient = []
            for inp in dict.fromkeys(node.all_input_nodes):
                if not rg.get(inp):
                    continue
                new = 0 if passes else _value_bytes(inp, values.value_bytes)
                if new:
                    tally.add(new)
                if inp in grad_bytes:
                    if new:
                        transient.append(new)    # accumulated into the pending gradient, then freed
                else:
                    grad_bytes[inp] = new if not passes else incoming
                    if passes and incoming:
                        incoming = 0             # ownership moves to the input's gradient
            offer(node.name, "backward")
            for b in transient:
                tally.add(b, -1)
            if incoming:
                tally.add(incoming, -1)
        for sid in free_after.get(node, []) + remat_last.get(node, []):
            tally.add(values.storages[sid].bytes, -1)
    expr = best.expr() if symbolic else sympy.Integer(top[0])
    return Peak(Bytes(expr, hints, top[0]), top[1], top[2])


def _value_bytes(node: fx.Node, cache: Optional[dict] = None):
    if cache is not None and node in cache:
        return cache[node]
    ts = [t for t in _tensors(node.meta.get("val")) if t is not None]
    out = sympy.Add(*[tensor_bytes(t) for t in ts]) if ts else 0
    if cache is not None:
        cache[node] = out
    return out


# --- FLOPs, for the planner's cost ----------------------------------------------------------------------------------

def flops(node: fx.Node) -> sympy.Expr:
    """A FLOP estimate of one op: 2MNK for matmuls, 4*Z*H*M*N*D (half when causal) for attention, one per output
    element (five for normalisations) for the rest; views are free."""
    v = node.meta.get("val")
    p = _packet(node)
    shape = lambda a: [_size(s) for s in a.meta["val"].shape]  # noqa: E731
    try:
        if p in (aten.mm, aten.addmm):
            a, b = (node.args[1], node.args[2]) if p is aten.addmm else (node.args[0], node.args[1])
            (m, k), (_, n) = shape(a), shape(b)
            return 2 * m * n * k
        if p in (aten.bmm, aten.baddbmm):
            a, b = (node.args[1], node.args[2]) if p is aten.baddbmm else (node.args[0], node.args[1])
            (z, m, k), (_, _, n) = shape(a), shape(b)
            return 2 * z * m * n * k
        if node.target is getattr(getattr(torch.ops, "memattn", None), "attention", None) or \
                p is getattr(getattr(torch.ops, "memattn", None), "attention", None):
            z, h, m, d = shape(node.args[0])
            n = shape(node.args[1])[2]
            causal = node.args[8] if len(node.args) > 8 else False
            return 4 * z * h * m * n * d / (2 if causal else 1)
    except (KeyError, ValueError, AttributeError, TypeError):
        pass
    if _alias_of(node) is not None or node.target is operator.getitem:
        return sympy.Integer(0)
    ts = [t for t in _tensors(v) if t is not None]
    per = 5 if p in (aten.native_layer_norm, aten._softmax, aten._log_softmax) else 1
    return per * sympy.Add(*[sympy.Mul(*[_size(s) for s in t.shape]) for t in ts]) if ts else sympy.Integer(0)


# --- the record the report shows ------------------------------------------------------------------------------------

@dataclasses.dataclass
class Memory:
    """Estimated peak bytes of one graph: forward only and for a training step."""
    inference: Peak
    training: Optional[Peak]          # None when nothing in the graph requires grad
    inputs: Bytes                     # bytes of the graph's inputs (parameters included), live throughout
    saved: Bytes                      # bytes kept for backward at the end of the forward
    assumed: list                     # ops modelled as saving all their tensors

    @property
    def peak(self) -> Bytes:
        return (self.training or self.inference).bytes


def analyse(graph: fx.Graph, example_inputs=None, entry_grad: Optional[bool] = None,
            symbolic: bool = True) -> tuple:
    """(Memory, model state) of a lowered graph; the state lets the planner re-run the training model quickly."""
    hints = shape_hints(graph)
    values = Values(graph)
    rg = _requires_grad(values, example_inputs, torch.is_grad_enabled() if entry_grad is None else entry_grad)
    inf = inference_peak(values, hints, symbolic)
    inputs = sympy.Add(*[s.bytes for s in values.storages if s.is_input])
    training, saved_bytes, assumed = None, sympy.Integer(0), []
    saved = saved_for_backward(values, rg)
    if any(rg.get(n) for n in values.order if n.op == "call_function"):
        training = training_peak(values, rg, saved, hints, symbolic=symbolic)
        saved_bytes = sympy.Add(*[values.storages[s].bytes for s in saved.readers])
        assumed = sorted(saved.assumed)
    mem = Memory(inf, training, Bytes(inputs, hints), Bytes(saved_bytes, hints), assumed)
    return mem, Model(values, rg, saved, hints)


@dataclasses.dataclass
class Model:
    values: Values
    rg: dict
    saved: Saved
    hints: dict

    def peak(self, plan: Optional[RecomputeSet] = None, symbolic: bool = False) -> Peak:
        return training_peak(self.values, self.rg, self.saved, self.hints, plan, symbolic)


# --- the graphs AOTAutograd runs (after a recompute plan) -----------------------------------------------------------

def split_peak(fw: fx.GraphModule, bw: fx.GraphModule, num_fwd_outputs: int, bw_frees_inputs: bool) -> Peak:
    """Peak of a partitioned training step: the forward graph with its saved outputs kept, then the backward
    graph, whose saved inputs are freed after their last use when ``bw_frees_inputs`` (boxed calling convention)."""
    hints = shape_hints(fw.graph) or shape_hints(bw.graph)
    fv, bv = Values(fw.graph), Values(bw.graph)
    tally, best = Tally(hints), MaxOf(hints)
    top = [-1, "", ""]

    def offer(where, phase):
        best.offer(tally.snapshot(), tally.value)
        if tally.value > top[0]:
            top[:] = [tally.value, where, phase]

    live = _walk_forward(fv, tally, lambda node: offer(node.name, "forward"))
    # map the backward's inputs to forward storages by name (AOTAutograd names saved values after fw nodes)
    out_node = next(n for n in fv.order if n.op == "output")
    fw_outs = [a for a in out_node.args[0]]
    by_name = {a.name: a for a in fw_outs if isinstance(a, fx.Node)}
    user_out = {s for a in fw_outs[:num_fwd_outputs] if isinstance(a, fx.Node) for s in fv.sids(a)}
    fw_param = {s.producer.name for s in fv.storages if s.is_input}
    bw_to_fw, tangents = {}, []
    for node in bv.order:
        if node.op != "placeholder":
            continue
        src = by_name.get(node.name)
        if src is not None and fv.sids(src):
            for b, f in zip(bv.sids(node), fv.sids(src)):
                bw_to_fw[b] = f
        elif node.name not in fw_param:
            tangents += bv.sids(node)
    # saved storages that the backward never reads are freed when the forward returns
    read = set(bw_to_fw.values())
    for sid in list(live):
        if sid not in read and sid not in user_out:
            tally.add(fv.storages[sid].bytes, -1)
            live.discard(sid)
    for sid in tangents:
        tally.add(bv.storages[sid].bytes)
    offer("backward start", "backward")
    bkeep = _graph_outputs(bv)
    blive = set(tangents)
    freed_fw = set()
    for node in bv.order:
        if node.op == "call_function":
            for sid in bv.fresh(node):
                tally.add(bv.storages[sid].bytes)
                blive.add(sid)
            offer(node.name, "backward")
        i = bv.index[node]
        for sid in set(bv.sids(node)) | {s for a in node.all_input_nodes for s in bv.sids(a)}:
            if bv.last_use.get(sid, i) > i or sid in bkeep:
                continue
            if sid in blive:
                tally.add(bv.storages[sid].bytes, -1)
                blive.discard(sid)
            elif bw_frees_inputs and sid in bw_to_fw:
                f = bw_to_fw[sid]
                # a forward storage read through several backward inputs is freed at the last of them
                if f in live and f not in freed_fw and f not in user_out and all(
                        bv.last_use.get(b, -1) <= i for b, ff in bw_to_fw.items() if ff == f):
                    tally.add(fv.storages[f].bytes, -1)
                    freed_fw.add(f)
    return Peak(Bytes(best.expr(), hints, top[0]), top[1], top[2])
