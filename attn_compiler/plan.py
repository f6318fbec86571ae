"""Recompute planning: when a training step's estimated peak exceeds ``memory_budget``, choose forward values to
rebuild in backward instead of keeping them, and compile so AOTAutograd's partitioner honours the choice.

The choice is a covering knapsack: each candidate is a kept activation with a recompute group (its producer and,
through cheap producers, what that needs), a number of bytes it stops keeping (the activation minus whatever its
group newly needs kept) and the FLOPs to rebuild it; sizes and FLOPs are the sympy formulas evaluated at the
example sizes. Candidates are taken greedily by FLOPs per byte (a classic approximation of the knapsack), and the
full training model (analysis.training_peak) is re-run after each, until the peak fits.

The plan is applied as ``node.meta["recompute"] = MUST_RECOMPUTE`` on the lowered graph and compiled through
``aot_autograd`` with ``min_cut_rematerialization_partition``; the forward and backward graphs it produces are
measured again (analysis.split_peak), and that figure is what the report shows.
"""
from __future__ import annotations

import dataclasses
import heapq
import logging
import os
import warnings
from typing import Optional

import networkx as nx
import sympy
import torch
import torch.fx as fx

from attn_compiler import analysis
from attn_compiler.analysis import Bytes, RecomputeSet, fmt_bytes
from attn_compiler.site import user_location, user_stacklevel

log = logging.getLogger("attn_compiler")
aten = torch.ops.aten

# producers cheap enough to rebuild along with what they feed (no matmul, no attention)
_CHEAP = {aten.view, aten._unsafe_view, aten.t, aten.transpose, aten.permute, aten.expand, aten.unsqueeze,
          aten.squeeze, aten.clone, aten.add, aten.sub, aten.mul, aten.div, aten.gelu, aten.silu, aten.relu,
          aten.native_layer_norm, aten.split, aten.split_with_sizes, aten.slice, aten.select, aten._to_copy,
          aten.masked_fill, aten.where, aten.embedding, aten.neg, aten.tanh, aten.exp, aten.pow, aten.rsqrt,
          aten.mean, aten.sum, aten.alias, aten.cat, aten.contiguous}


@dataclasses.dataclass
class Checkpoint:
    """One recompute decision, as the report shows it."""
    value: str               # the forward value no longer kept for backward
    op: str                  # what produces it
    location: str            # user file:line
    nodes: list              # forward nodes re-run in backward
    bytes_saved: Bytes       # bytes no longer kept (net of what the recompute needs kept)
    flops: Bytes             # extra FLOPs in backward (a count, shown with the same formula machinery)

    def __str__(self) -> str:
        return (f"recompute {self.value} ({self.op}, {self.location}): saves {self.bytes_saved}, "
                f"+{_fmt_flops(self.flops.at())} FLOPs")


def _fmt_flops(n: int) -> str:
    for unit, size in (("T", 10 ** 12), ("G", 10 ** 9), ("M", 10 ** 6), ("K", 10 ** 3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)


def reserve_bytes(budget: int, example_inputs) -> int:
    """Bytes of the budget kept back for device memory the graph model does not see. On CUDA that is the cuBLAS
    workspace, the Triton kernels' temporaries and allocator rounding, which the model misses by a fraction of a
    GiB (benchmarks/results/tuning_notes.md): the planner aims 128 MiB + 2% below the budget there. On CPU the
    model matches exact accounting: no reserve."""
    cuda = any(isinstance(t, torch.Tensor) and t.device.type == "cuda" for t in example_inputs)
    return (128 * 2 ** 20 + budget // 50) if cuda else 0


@dataclasses.dataclass
class Outcome:
    budget: int
    checkpoints: list
    peak: int                 # the model's training peak with the plan, at the example sizes
    fits: bool
    note: str = ""
    verified: Optional[analysis.Peak] = None   # measured on the partitioned forward/backward graphs
    recompute: set = dataclasses.field(default_factory=set)
    target: Optional[int] = None   # what the plan aims at: budget minus the reserve (reserve_bytes)
    mismatch: bool = False    # the model said it fits; the partitioned graphs said no (compile_with_plan)
    attempts: int = 1         # plans compiled for this graph (a mismatch re-plans, see replan_target)
    planned_to: Optional[int] = None   # what choose() aimed at: target, or lower after a re-plan


REPLANS = 2   # re-plans after a mismatch, each against a target lowered by the last plan's model error


def replan_target(outcome: Outcome) -> Optional[int]:
    """After a mismatch: the target for the next plan, lowered by how far the partitioned graphs overshot the
    model's estimate for this one (the model's error on graphs like it). None if there is nothing to correct."""
    if not outcome.mismatch or outcome.verified is None:
        return None
    error = outcome.verified.bytes.at() - outcome.peak
    target = outcome.target if outcome.target is not None else outcome.budget
    return target - error if error > 0 else None


def device_total_bytes(example_inputs) -> int:
    """Total memory of the device the graph's tensors live on: the GPU's, or the machine's RAM on CPU."""
    for t in example_inputs:
        if isinstance(t, torch.Tensor) and t.device.type == "cuda":
            return torch.cuda.get_device_properties(t.device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _dag(values: analysis.Values) -> nx.DiGraph:
    g = nx.DiGraph()
    for node in values.order:
        if node.op == "call_function":
            g.add_node(node)
            for inp in node.all_input_nodes:
                if inp.op == "call_function":
                    g.add_edge(inp, node)
    return g


def _group(model: analysis.Model, dag: nx.DiGraph, sid: int, recompute: set, kept: set) -> tuple:
    """(nodes to re-run, storages newly kept) to stop keeping storage ``sid``: its producer, the views between
    it and its readers, and cheap producers up to values that are kept anyway or graph inputs."""
    values = model.values
    producer = values.storages[sid].producer
    nodes = {producer}
    nodes |= {n for n in nx.descendants(dag, producer) if values.sids(n) == [sid] and
              analysis._alias_of(n) is not None}
    need, stack, seen = set(), [producer], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for inp in node.all_input_nodes:
            for s in values.sids(inp):
                st = values.storages[s]
                if st.is_input or s in kept or st.producer in recompute or st.producer in nodes:
                    continue
                p = st.producer
                if analysis._packet(p) in _CHEAP and len(seen) < 8:
                    nodes.add(p)
                    stack.append(p)
                else:
                    need.add(s)
    return nodes - recompute, need


def choose(model: analysis.Model, budget: int, peak_now: int) -> Outcome:
    """Greedy covering knapsack over kept activations (see the module doc)."""
    values, hints = model.values, model.hints
    dag = _dag(values)
    num = lambda e: int(sympy.sympify(e).xreplace(hints)) if not isinstance(e, int) else e  # noqa: E731
    recompute: set = set()
    kept = set(model.saved.readers)
    heap = []
    for sid in kept:
        st = values.storages[sid]
        if st.producer is None or st.producer.op != "call_function":
            continue
        heap.append((0.0, sid))
    heapq.heapify(heap)
    chosen, peak = [], peak_now

    def score(sid):
        nodes, need = _group(model, dag, sid, recompute, kept)
        gain = num(values.storages[sid].bytes) - sum(num(values.storages[s].bytes) for s in need)
        cost = sum(num(analysis.flops(n)) for n in nodes)
        return nodes, need, gain, cost

    # lazy greedy: re-score the best candidate; accept it if it still beats the next one
    scored = {}
    for _, sid in heap:
        scored[sid] = score(sid)
    heap = [((c + 1) / g, sid) for sid, (_, _, g, c) in scored.items() if g > 0]
    heapq.heapify(heap)
    # The full training model is re-run only when the running estimate (peak minus the bytes taken so far) says
    # the budget is met: the peak may sit where a taken value was already freed, so the estimate is optimistic.
    estimate = peak
    while heap and peak > budget:
        ratio, sid = heapq.heappop(heap)
        if sid not in kept:
            continue
        nodes, need, gain, cost = score(sid)
        if gain <= 0:
            continue
        new_ratio = (cost + 1) / gain
        if heap and new_ratio > heap[0][0] * 1.0001:
            heapq.heappush(heap, (new_ratio, sid))
            continue
        recompute = recompute | nodes
        kept.discard(sid)
        kept |= need
        estimate -= gain
        if estimate <= budget or not heap:
            peak = estimate = model.peak(RecomputeSet(recompute)).bytes.at()
        producer = values.storages[sid].producer
        chosen.append(Checkpoint(
            value=producer.name, op=str(analysis._packet(producer)), location=user_location(producer)[0],
            nodes=sorted(n.name for n in nodes),
            bytes_saved=Bytes(values.storages[sid].bytes - sympy.Add(*[values.storages[s].bytes for s in need]),
                              hints),
            flops=Bytes(sympy.Add(*[analysis.flops(n) for n in nodes]), hints)))
    peak = model.peak(RecomputeSet(recompute)).bytes.at() if chosen else peak
    if peak > budget and chosen and peak >= peak_now:
        # nothing fits and recomputing does not even lower the peak (the values it must keep alive for the
        # recompute outweigh what it frees): a plan worse than none is never compiled
        out = Outcome(budget, [], peak_now, False, recompute=set())
        out.note = (f"no recompute plan fits {fmt_bytes(budget)} (memory_budget less any device reserve), and "
                    f"the best one found would peak at {fmt_bytes(peak)}, not below the {fmt_bytes(peak_now)} "
                    "without recompute; the graph is compiled without recompute")
        return out
    out = Outcome(budget, chosen, peak, peak <= budget, recompute=recompute)
    if not out.fits:
        out.note = (f"no recompute plan fits {fmt_bytes(budget)} (memory_budget less any device reserve): "
                    f"the smallest training-step peak reachable by recomputing is {fmt_bytes(peak)} "
                    f"(without recompute {fmt_bytes(peak_now)}); the graph is compiled with that plan")
    return out


def apply(gm: fx.GraphModule, outcome: Outcome) -> None:
    """Tag the chosen nodes (and only them: an earlier plan's tags go); one ac_graph_id for all, so adjacent
    groups are not split at their boundary."""
    names = {n.name for n in outcome.recompute}
    for node in gm.graph.nodes:
        node.meta.pop("recompute", None)
        node.meta.pop("ac_graph_id", None)
        if node.name in names:
            node.meta["recompute"] = torch.utils.checkpoint.CheckpointPolicy.MUST_RECOMPUTE
            node.meta["ac_graph_id"] = 1


def _boxed(gm: fx.GraphModule):
    """Run a graph with the boxed calling convention, so its inputs (the saved tensors, in backward) are freed
    after their last use rather than when the call returns."""
    from torch._functorch.aot_autograd import make_boxed_func
    try:
        from torch.fx.graph import _BoxedCodeGen
    except ImportError:   # older torch: inputs live until the call returns
        return make_boxed_func(gm), False
    gm.graph.set_codegen(_BoxedCodeGen())
    gm.recompile()   # the boxed codegen marks the module as taking its arguments as one list
    return gm, True


def compile_with_plan(gm: fx.GraphModule, example_inputs, outcome: Outcome, inner_compile):
    """AOTAutograd with the min-cut partitioner honouring the tags; the partitioned graphs are measured."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    state = {"boxed": hasattr(torch.fx.graph, "_BoxedCodeGen")}

    def partition(joint, joint_inputs, **kwargs):
        fw, bw = min_cut_rematerialization_partition(joint, joint_inputs, **kwargs)
        try:
            outcome.verified = analysis.split_peak(fw, bw, kwargs.get("num_fwd_outputs", 1), state["boxed"])
            got = outcome.verified.bytes.at()
            if outcome.fits and got > (outcome.target or outcome.budget):
                # the partitioner kept more than the eager-autograd model predicted: do not claim a fit (the
                # caller may re-plan against a lower target, see replan_target, and warns if that fails too)
                outcome.fits = False
                outcome.mismatch = True
                outcome.note = (f"the recompute plan was expected to peak at {fmt_bytes(outcome.peak)}, but the "
                                f"partitioned forward/backward graphs peak at {fmt_bytes(got)}, above the "
                                f"{fmt_bytes(outcome.target or outcome.budget)} planned for memory_budget "
                                f"{fmt_bytes(outcome.budget)}")
        except Exception as e:  # the measurement is for the report; the plan stands without it
            log.debug("memattn: could not measure the partitioned graphs: %s", e)
        return fw, bw

    def fw_compiler(g, ex):
        return inner_compile(g, ex, boxed=False)

    def bw_compiler(g, ex):
        return inner_compile(g, ex, boxed=True)

    return aot_autograd(fw_compiler=fw_compiler, bw_compiler=bw_compiler, partition_fn=partition)(gm,
                                                                                                example_inputs)


def eager_inner(g: fx.GraphModule, ex, boxed: bool):
    if boxed:
        compiled, _ = _boxed(g)
        return compiled
    from torch._functorch.aot_autograd import make_boxed_func
    return make_boxed_func(g)


def warn_no_fit(outcome: Outcome) -> None:
    warnings.warn(f"memattn: {outcome.note}", RuntimeWarning, stacklevel=user_stacklevel())
