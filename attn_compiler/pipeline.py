"""The ``memattn`` torch.compile backend: lower -> match -> rewrite -> compile, with a report of every decision."""
from __future__ import annotations

import functools
import logging
import traceback
import warnings
from typing import Optional

import sympy
import torch
import torch.fx as fx

from attn_compiler import analysis, kv_cache, plan as plan_mod
from attn_compiler.codegen.launch import describe
from attn_compiler import options as options_mod
from attn_compiler import ops  # also registers torch.ops.memattn.*
from attn_compiler.layout import is_layout_op, shape_text, val
from attn_compiler.lower import graph_fake_mode, lower, placeholders_fake
from attn_compiler.match import find_candidates
from attn_compiler.report import GraphReport, Report
from attn_compiler.rewrite import emit, output_layout
from attn_compiler.site import Reject, Site, user_location, user_stacklevel

log = logging.getLogger("attn_compiler")

_reports: list = []
counters = {"graphs": 0, "rewritten": 0, "left": 0}

# Raised by AOTAutograd's passes for Dynamo to catch and trace the frame again (a float scalar that must be
# specialised): control flow, not a failure, so it passes through every fallback here.
_RESTART = (torch._dynamo.exc.RestartAnalysis,)


def last_report() -> Optional[Report]:
    """The Report of the most recent memattn compilation in this process (None before the first)."""
    return _reports[-1] if _reports else None


def reports() -> list:
    """Every Report made in this process, oldest first."""
    return list(_reports)


def _scores_bytes(chain) -> sympy.Expr:
    total = sympy.Integer(0)
    for node in chain:
        if is_layout_op(node) and node.target is not torch.ops.aten.clone.default:
            continue
        v = val(node)
        for part in (v if isinstance(v, (tuple, list)) else [v]):
            if isinstance(part, torch.Tensor):
                total += analysis.tensor_bytes(part)
    return sympy.simplify(total)


def _describe(plan) -> tuple[str, dict]:
    st = plan.st
    fams = list(st.families)
    flags = {
        "causal": st.causal is not None,
        "bias": len(st.biases),
        "bool_masks": len(st.masks),
        "dropout_p": st.dropout_p,
        "gqa": plan.gqa_ratio,
    }
    if st.causal_note:
        flags["note"] = st.causal_note
    return "+".join(fams), flags


def _shapes(plan) -> dict:
    return {"q": shape_text(plan.q.base), "k": shape_text(plan.k.base), "v": shape_text(plan.v.base),
            "out": shape_text(plan.pv)}


def rewrite_graph(gm: fx.GraphModule, fake_mode, opts, graph_index: int = 0) -> list:
    sites = []
    for i, (softmax, found) in enumerate(find_candidates(gm)):
        loc, code = user_location(softmax)
        site = Site(index=i, location=loc, source_line=code, graph_index=graph_index)
        sites.append(site)
        if isinstance(found, Reject):
            site.reason = str(found)
            site.pattern, site.flags, site.shapes = found.pattern, found.flags, found.shapes
            continue
        plan = found
        site.pattern, site.flags = _describe(plan)
        site.shapes = _shapes(plan)
        try:
            site.scores_bytes = _scores_bytes(plan.chain)
            cache_info = kv_cache.cache_pattern(plan.k.base, plan.v.base, plan.qk)  # before emit erases the chain
            att = emit(plan, fake_mode, opts.kernels)
            named = ops.node_args(att)
            site.flags = {"scale": named["scale"], "softcap": named["softcap"], **site.flags,
                          "out_layout": output_layout(att, fake_mode)}
        except Reject as e:
            site.reason = str(e)
            continue
        except Exception as e:  # nodes emitted before the failure have no users and are removed below
            site.reason = f"internal error while rewriting ({type(e).__name__}: {e}); left alone"
            continue
        site.status = "rewritten"
        site.kernel = kv_cache.kernel_kind(val(named["q"]).shape[2], plan.st.dropout_p)
        site.cache, site.cache_copy_bytes = cache_info
        site.nodes = [n.name for n in plan.chain]
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return sites


def _inner_compile(gm: fx.GraphModule, example_inputs, opts, outcome=None):
    if opts.inner_for(example_inputs) == "inductor":
        # with recompute tags too: Inductor partitions with the min-cut partitioner itself, which honours them
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, example_inputs, config_patches=_mode_config(opts.mode))
    if outcome is not None and outcome.recompute:
        return plan_mod.compile_with_plan(gm, example_inputs, outcome, plan_mod.eager_inner)
    return gm


def _mode_config(mode):
    """Inductor's config patches for a torch.compile mode (None for the default)."""
    if mode in (None, "default"):
        return None
    from torch._inductor import list_mode_options
    return list_mode_options(mode) or None


def _analyse(gm: fx.GraphModule, example_inputs, what: str):
    """The memory model of a graph, or None (with a debug log) if it cannot be built: it informs, never blocks."""
    try:
        return analysis.analyse(gm.graph, example_inputs)
    except Exception as e:
        log.debug("memattn: memory analysis of the graph %s the rewrite failed: %s\n%s", what, e,
                  traceback.format_exc(limit=4))
        return None, None


def _plan(lowered: fx.GraphModule, example_inputs, opts, memory, model):
    """Over budget? Choose and tag recompute checkpoints (plan.py). None when there is no budget or it fits."""
    if opts.memory_budget is None or memory is None:
        return None
    budget = opts.budget_bytes(plan_mod.device_total_bytes(example_inputs))
    target = budget - plan_mod.reserve_bytes(budget, example_inputs)
    peak = memory.peak.at()
    if peak <= target:
        return plan_mod.Outcome(budget, [], peak, True, target=target)
    if memory.training is None:
        outcome = plan_mod.Outcome(budget, [], peak, False, note=(
            f"the forward-only peak {analysis.fmt_bytes(peak)} exceeds memory_budget {analysis.fmt_bytes(budget)}; "
            "recompute cannot lower a graph that keeps nothing for backward"))
    else:
        outcome = plan_mod.choose(model, target, peak)
        outcome.budget, outcome.target, outcome.planned_to = budget, target, target
        plan_mod.apply(lowered, outcome)
    if not outcome.fits:
        inputs = memory.inputs.at()
        if inputs > target:  # nothing the planner does can help: say what the budget is up against
            outcome.note = (f"the graph's inputs alone (parameters included) take {analysis.fmt_bytes(inputs)}, "
                            f"more than memory_budget {analysis.fmt_bytes(budget)} allows; " + (outcome.note or ""))
        plan_mod.warn_no_fit(outcome)
    return outcome


def _replan(lowered, example_inputs, opts, outcome, compiled, memory, model):
    """The partitioned graphs of a plan peaked above the target though the model said they fit: plan again
    against a target lowered by the model's error, at most plan_mod.REPLANS times, and compile that. Returns the
    last (outcome, compiled); its ``fits`` says whether the partitioned graphs now meet the target."""
    for _ in range(plan_mod.REPLANS):
        lower_to = plan_mod.replan_target(outcome)
        if lower_to is None:
            break
        new = plan_mod.choose(model, lower_to, memory.peak.at())
        if not new.fits:   # the model cannot reach the lowered target: keep the plan compiled already
            break
        new.budget, new.target, new.planned_to = outcome.budget, outcome.target, lower_to
        new.attempts = outcome.attempts + 1
        plan_mod.apply(lowered, new)
        try:
            compiled = _inner_compile(lowered, example_inputs, opts, new)
        except _RESTART:
            raise
        except Exception as e:  # keep the plan compiled already; the report says why no better one was tried
            outcome.note = (f"planning again below {analysis.fmt_bytes(lower_to)} failed to compile "
                            f"({describe(e)}); the first plan is kept. " + (outcome.note or ""))
            log.debug("memattn replan compile failure:\n%s", traceback.format_exc(limit=8))
            break
        outcome = new
        if not outcome.mismatch:
            break
    return outcome, compiled


def compile_graph(gm: fx.GraphModule, example_inputs, opts) -> tuple:
    graph_index = counters["graphs"]
    counters["graphs"] += 1
    outcome = None
    try:
        lowered = lower(gm, example_inputs)
        before = lowered.code
        mem_before, _ = _analyse(lowered, example_inputs, "before")
        fake_mode = graph_fake_mode(placeholders_fake(gm, example_inputs))
        sites = rewrite_graph(lowered, fake_mode, opts, graph_index)
        mem_after, model = _analyse(lowered, example_inputs, "after")
        outcome = _plan(lowered, example_inputs, opts, mem_after, model)
        greport = GraphReport(graph_index, before, lowered.code, sites, memory_before=mem_before,
                              memory_after=mem_after, plan=outcome, model=model)
        compiled_gm = lowered
    except _RESTART:
        raise
    except Exception as e:  # a bug in the pass must not take the user's model down: run the graph unchanged
        tb = traceback.format_exc(limit=4)
        warnings.warn(f"memattn: the attention pass failed on graph {graph_index} and the graph runs "
                      f"unchanged: {type(e).__name__}: {e}", RuntimeWarning, stacklevel=user_stacklevel())
        log.debug("memattn pass failure:\n%s", tb)
        greport = GraphReport(graph_index, gm.code, gm.code, [], error=f"{type(e).__name__}: {e}")
        compiled_gm, outcome = gm, None
    report = Report(greport, opts, counters)
    log.info("memattn: graph %d: %s", graph_index, report.summary().removeprefix("memattn: "))
    for s in greport.sites:
        log.debug("memattn: graph %d site %d %s at %s: %s", graph_index, s.index, s.status, s.location,
                  s.reason or s.pattern)
    counters["rewritten"] += len(report.rewritten)
    counters["left"] += len(report.left)
    _reports.append(report)
    greport.inner = opts.inner_for(example_inputs)
    try:
        compiled = _inner_compile(compiled_gm, example_inputs, opts, outcome)   # fills outcome.verified
    except _RESTART:   # Dynamo traces the frame again and calls the backend anew: this graph never existed
        _reports.remove(report)
        counters["graphs"] -= 1
        counters["rewritten"] -= len(report.rewritten)
        counters["left"] -= len(report.left)
        raise
    except Exception as e:  # Inductor or the recompute partition failed: the graph still runs, op by op
        greport.inner_error = describe(e)
        warnings.warn(f"memattn: compiling graph {graph_index} failed and it runs op by op (inner=\"eager\", no "
                      f"recompute plan): {greport.inner_error}", RuntimeWarning, stacklevel=user_stacklevel())
        log.debug("memattn inner compile failure:\n%s", traceback.format_exc(limit=8))
        greport.plan = None   # the graph runs as traced: no recompute plan applies (its tags are inert eagerly)
        return compiled_gm, report
    if outcome is not None and outcome.mismatch:
        outcome, compiled = _replan(compiled_gm, example_inputs, opts, outcome, compiled, mem_after, model)
        greport.plan = outcome
        if not outcome.fits:
            plan_mod.warn_no_fit(outcome)
    if opts.report is True:
        log.warning("%s", report)
    elif opts.report:
        try:
            report.write(opts.report)
        except OSError as e:   # the folder was checked when the options were parsed; a report never costs the step
            warnings.warn(f"memattn: the report could not be written to {opts.report!r} ({describe(e)})",
                          RuntimeWarning, stacklevel=user_stacklevel())
    return compiled, report


def memattn(gm: fx.GraphModule, example_inputs, options: Optional[dict] = None, mode: Optional[str] = None,
            **kwargs):
    """The torch.compile backend. ``torch.compile(m, backend="memattn", options={...})``."""
    if kwargs:
        raise ValueError(f"memattn: unexpected backend argument(s) {', '.join(map(repr, kwargs))}; "
                         f"pass options=dict(...) with keys {', '.join(options_mod.ALLOWED)}")
    opts = options_mod.parse(options, mode)
    compiled, _ = compile_graph(gm, example_inputs, opts)
    return compiled


def backend(**options):
    """``torch.compile(model, backend=attn_compiler.backend(memory_budget="8GiB"))``; options validated now."""
    options_mod.parse(options)

    @functools.wraps(memattn)
    def compiler(gm, example_inputs):
        return memattn(gm, example_inputs, options=options)

    compiler.__name__ = "memattn"
    return compiler
