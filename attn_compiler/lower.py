"""Lowering: Dynamo's torch-level graph -> one canonical ATen graph with fake values and symbolic shapes.

Every spelling of attention reaches ATen as the same ops (``@``, ``matmul``, ``einsum`` and ``bmm`` become
view/permute/expand + ``aten.bmm``; ``F.softmax`` and ``Tensor.softmax`` become ``aten._softmax``), so one matcher
covers them. The trace runs on Dynamo's own fake tensors, so shape symbols (s0, s1, ...) are the ones Dynamo guards
on, and each node keeps the user's stack trace for the report.

Tracing below autograd drops Dynamo's grad-mode switches (``torch._C._set_grad_enabled``); ops that ran with grad
disabled are marked while tracing and the switches are put back around them afterwards, so the lowered graph
keeps eager's autograd behaviour.
"""
from __future__ import annotations


import torch
import torch.fx as fx
from torch._dispatch.python import enable_python_dispatcher
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx import traceback as fx_traceback
from torch.fx.experimental.proxy_tensor import get_proxy_mode, make_fx

NO_GRAD = "memattn_no_grad"


class _MarkingInterpreter(fx.Interpreter):
    """Runs the Dynamo graph under make_fx and tags the ATen nodes each op produced while the grad mode differed
    from the mode at graph entry (Dynamo guards on that one, so it is a constant of this graph)."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.tracer_graph = None
        self.entry_grad = torch.is_grad_enabled()

    def run_node(self, n):
        graph = self.tracer_graph
        mode = torch.is_grad_enabled()
        before = set(graph.nodes) if (graph is not None and mode != self.entry_grad) else None
        result = super().run_node(n)
        if before is not None:
            for new in graph.nodes:
                if new not in before:
                    new.meta[NO_GRAD] = mode
        return result


def placeholders_fake(gm: fx.GraphModule, example_inputs):
    fakes = []
    for node, real in zip((n for n in gm.graph.nodes if n.op == "placeholder"), example_inputs):
        val = node.meta.get("example_value", node.meta.get("val"))
        fakes.append(val if val is not None else real)
    return fakes


def graph_fake_mode(fakes):
    """The fake mode of Dynamo's example values (not the backend's fresh one: those values carry item_memo, the
    symbol Dynamo gave each float it lifted to a tensor, which a re-fakeified copy would lose)."""
    for t in fakes:
        if isinstance(t, FakeTensor):
            return t.fake_mode
    return detect_fake_mode(fakes)


def lower(gm: fx.GraphModule, example_inputs) -> fx.GraphModule:
    fakes = placeholders_fake(gm, example_inputs)
    fake_mode = graph_fake_mode(fakes)
    interp = _MarkingInterpreter(gm)

    def traced(*args):
        mode = get_proxy_mode()  # make_fx's tracer graph, so the interpreter can tag what each op produced
        if mode is not None:
            interp.tracer_graph = mode.tracer.graph
        return interp.run(*args)

    # Dynamo captures .item() of float arguments (dynamic=True) as unbacked scalars; the retrace must allow them.
    saved = fake_mode.allow_scalar_outputs if fake_mode is not None else None
    try:
        if fake_mode is not None:
            fake_mode.allow_scalar_outputs = True
        with fx_traceback.preserve_node_meta(), enable_python_dispatcher():
            if fake_mode is not None:
                # the inputs are already fake: trace them as they are, under their own mode
                with fake_mode:
                    lowered = make_fx(traced, tracing_mode="real")(*fakes)
            else:  # a graph without tensor inputs: symbolic tracing makes the fake values
                lowered = make_fx(traced, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*fakes)
    finally:
        if fake_mode is not None:
            fake_mode.allow_scalar_outputs = saved
    _restore_grad_mode(lowered.graph, interp.entry_grad)
    _drop_identity_dropout_clones(lowered.graph)
    lowered.graph.eliminate_dead_code()
    lowered.recompile()
    carry_dynamo_metadata(gm, lowered)
    return lowered


# What AOTAutograd reads off a Dynamo graph (torch/_functorch/_aot_autograd/frontend_utils.py) to tell its static
# inputs (parameters, buffers, marked static addresses) from the rest. CUDA graphs (mode="reduce-overhead") copy a
# non-static input into graph-owned memory on every replay and refuse a graph that mutates one in place (a KV
# cache buffer written at input_pos), so a lowered graph without them loses both.
_PLACEHOLDER_ATTRS = ("_dynamo_source",)
_PLACEHOLDER_META = ("tensor_dict", "grapharg")


def carry_dynamo_metadata(src: fx.GraphModule, dst: fx.GraphModule) -> None:
    """Give ``dst`` (a retrace of ``src`` with the same inputs in the same order) ``src``'s Dynamo metadata: the
    graph's meta entries it lacks, the parameter-to-source map, and each placeholder's source and tensor attributes.
    All or nothing: AOTAutograd takes a graph with a Dynamo compile id for Dynamo's and then needs every placeholder's
    source, so with a different number of placeholders nothing is carried (the graph is then compiled as a plain
    one, its inputs all non-static)."""
    old = src.graph.find_nodes(op="placeholder")
    new = dst.graph.find_nodes(op="placeholder")
    if len(old) != len(new) or not old or not all(hasattr(n, "_dynamo_source") for n in old):
        return
    for key, value in src.meta.items():
        dst.meta.setdefault(key, value)
    if hasattr(src, "_param_name_to_source"):
        dst._param_name_to_source = _with_constants(src._param_name_to_source, dst)
    for a, b in zip(old, new):
        for attr in _PLACEHOLDER_ATTRS:
            if hasattr(a, attr):
                setattr(b, attr, getattr(a, attr))
        for key in _PLACEHOLDER_META:
            if key in a.meta:
                b.meta[key] = a.meta[key]


def _with_constants(sources: dict, dst: fx.GraphModule) -> dict:
    """Dynamo's parameter-to-source map, plus a source for each tensor constant the retrace lifted into a buffer
    (a ``torch.tensor(...)`` in the model's forward, as HF's LLaMA has): AOTAutograd wants a source for every
    parameter and buffer of a Dynamo graph."""
    from torch._dynamo.source import ConstantSource
    extra = {name: ConstantSource(f"memattn_lifted_{name}")
             for name, _ in (*dst.named_parameters(remove_duplicate=False), *dst.named_buffers(remove_duplicate=False))
             if name not in sources}
    return {**sources, **extra} if extra else sources


def _is_dropout(fn) -> bool:
    if isinstance(fn, type):
        return issubclass(fn, torch.nn.Dropout)
    return fn in (torch.nn.functional.dropout, torch.dropout) or getattr(fn, "__name__", None) == "dropout"


def _drop_identity_dropout_clones(graph: fx.Graph) -> None:
    """A dropout that does nothing (p = 0, or eval mode) returns its input itself in eager, but its decomposition
    traces as ``aten.clone``: a copy of the n x n probabilities that eager never makes, which the backward of the
    following matmul would keep. Such clones (the whole of what a dropout call traced to) are replaced by their
    input, so the graph, its memory estimate and what the rewrite replaces are eager's."""
    by_call = {}   # the dropout call (its Dynamo node name, in source_fn_stack) -> the ATen nodes it traced to
    for node in graph.nodes:
        stack = node.meta.get("source_fn_stack") or []
        if node.op == "call_function" and stack and _is_dropout(stack[-1][1]):
            by_call.setdefault(stack[-1][0], []).append(node)
    for nodes in by_call.values():
        # a dropout that traced to more than a clone (p > 0: native_dropout, bernoulli, ...) is left alone
        if len(nodes) != 1:
            continue
        node = nodes[0]
        if node.target != torch.ops.aten.clone.default or node.kwargs or not isinstance(node.args[0], fx.Node):
            continue
        node.replace_all_uses_with(node.args[0])
        graph.erase_node(node)


def _restore_grad_mode(graph: fx.Graph, entry: bool) -> None:
    """Put grad-mode switches back around each run of nodes that were traced in the other mode."""
    current = entry
    for node in list(graph.nodes):
        if node.op == "placeholder":
            continue
        want = node.meta.get(NO_GRAD, entry) if node.op != "output" else entry
        if want != current:
            with graph.inserting_before(node):
                graph.call_function(torch._C._set_grad_enabled, (want,))
            current = want

