"""What the backend did, for people: per-site table, the graph before and after, and the reasons."""
from __future__ import annotations

import dataclasses
import difflib
import logging
from typing import Optional

import sympy

from attn_compiler.analysis import CAVEATS, Bytes, RecomputeSet, fmt_bytes

log = logging.getLogger("attn_compiler")


@dataclasses.dataclass
class GraphReport:
    index: int
    before: str              # lowered ATen graph code before the rewrite
    after: str               # and after
    sites: list
    error: Optional[str] = None   # set when the pass failed and the graph ran unchanged
    inner: Optional[str] = None   # what compiled it: "eager" or "inductor" (options.inner resolved for its device)
    inner_error: Optional[str] = None   # set when the inner compile (Inductor, a recompute plan) failed
    memory_before: object = None  # analysis.Memory of the lowered graph before the rewrite (None: not analysed)
    memory_after: object = None   # and after
    plan: object = None           # plan.Outcome when a memory_budget was given
    model: object = None          # analysis.Model after the rewrite, to evaluate the plan symbolically

    @property
    def peak_after(self) -> Optional[Bytes]:
        """What runs: after the rewrite and, with a plan, measured on the partitioned graphs AOTAutograd made."""
        if self.plan is not None and self.plan.recompute:
            if self.plan.verified is not None:
                return self.plan.verified.bytes
            if self.model is not None:
                return self.model.peak(RecomputeSet(self.plan.recompute), symbolic=True).bytes
        return self.memory_after.peak if self.memory_after is not None else None

    def diff(self, context: int = 2) -> str:
        lines = difflib.unified_diff(self.before.splitlines(), self.after.splitlines(),
                                     f"graph {self.index} before", f"graph {self.index} after", n=context,
                                     lineterm="")
        return "\n".join(lines)


def graph_hints(g) -> dict:
    """Example value of every shape symbol of a graph (from its memory analysis; empty when that failed)."""
    hints = {}
    for mem in (g.memory_before, g.memory_after):
        if mem is not None:
            hints.update(mem.peak.hints)
    return hints


def value_at(expr, hints: dict) -> Optional[int]:
    expr = sympy.sympify(expr)
    by_name = {str(k): v for k, v in hints.items()}
    out = expr.xreplace({s: sympy.Integer(by_name[str(s)]) for s in expr.free_symbols if str(s) in by_name})
    return int(out) if out.is_number else None


class Report:
    """One compilation (one Dynamo graph) of the memattn backend."""

    def __init__(self, graph: GraphReport, options, counters: dict):
        self.graphs = [graph]
        self.options = options
        self.counters = counters

    @property
    def sites(self) -> list:
        return [s for g in self.graphs for s in g.sites]

    @property
    def rewritten(self) -> list:
        return [s for s in self.sites if s.status == "rewritten"]

    @property
    def left(self) -> list:
        return [s for s in self.sites if s.status == "left"]

    @property
    def peak_before(self) -> Optional[Bytes]:
        """Estimated peak bytes of the graph before the rewrite (training step when anything requires grad, else
        forward only); a sympy expression in ``.expr``, evaluated by ``.at({"s0": 16384})``."""
        m = self.graphs[0].memory_before
        return m.peak if m is not None else None

    @property
    def peak_after(self) -> Optional[Bytes]:
        """Estimated peak bytes of what runs: after the rewrite and the recompute checkpoints."""
        return self.graphs[0].peak_after

    @property
    def checkpoints(self) -> list:
        """Recompute decisions taken to meet memory_budget (plan.Checkpoint: value, bytes_saved, flops, ...)."""
        return [c for g in self.graphs if g.plan is not None for c in g.plan.checkpoints]

    @property
    def memory_note(self) -> str:
        """Set when memory_budget could not be met."""
        return "; ".join(g.plan.note for g in self.graphs if g.plan is not None and g.plan.note)

    def memory(self) -> str:
        out = []
        for g in self.graphs:
            b, a = g.memory_before, g.memory_after
            if b is None or a is None:
                continue
            kind = "training step" if a.training is not None else "forward only"
            out.append(f"memory (graph {g.index}, {kind}):")
            out.append(f"  peak before: {b.peak}")
            out.append(f"  peak after rewrite: {a.peak}")
            if a.training is not None:
                out.append(f"  forward-only peak before / after: {b.inference.bytes} / {a.inference.bytes}")
                out.append(f"  kept for backward before / after: {b.saved} / {a.saved}")
            out.append(f"  graph inputs (parameters included): {a.inputs}")
            if g.plan is not None:
                p = g.plan
                if p.target is not None and p.target != p.budget:
                    out.append(f"  planned to {fmt_bytes(p.target)}: memory_budget less a reserve for device "
                               "memory outside the model (cuBLAS workspace, kernel temporaries, rounding)")
                out.append(f"  memory_budget: {fmt_bytes(p.budget)}; "
                           + ("fits without recompute" if not p.checkpoints and p.fits else
                              f"{len(p.checkpoints)} recompute checkpoint(s), model peak {fmt_bytes(p.peak)}"))
                for c in p.checkpoints:
                    out.append(f"    {c}")
                if p.verified is not None:
                    out.append(f"  peak of the partitioned forward/backward graphs: {p.verified.bytes} "
                               f"(at {p.verified.phase} {p.verified.at_node})")
                if p.attempts > 1:
                    out.append(f"  re-planned {p.attempts - 1} time(s): the partitioned graphs of the first plan "
                               f"peaked above the model's estimate, so the target was lowered by that error "
                               f"(planned to {fmt_bytes(p.planned_to)})")
                if p.note:
                    out.append(f"  NOTE: {p.note}")
            if a.assumed:
                out.append(f"  modelled as saving all their tensors: {', '.join(a.assumed)}")
        if out:
            out.append(f"  ({CAVEATS})")
        return "\n".join(out)

    def summary(self) -> str:
        return (f"memattn: {len(self.sites)} attention site(s), {len(self.rewritten)} rewritten, "
                f"{len(self.left)} left alone")

    def table(self) -> str:
        rows = [("#", "status", "kernel", "pattern", "location", "n^2 bytes removed")]
        several = len(self.graphs) > 1
        for s in self.sites:
            rows.append((f"{s.graph_index}.{s.index}" if several else str(s.index), s.status, s.kernel or "-",
                         s.pattern or "-", s.location,
                         fmt_bytes(sympy.sympify(s.scores_bytes)) if s.status == "rewritten" else "-"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        out = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        for s in self.sites:
            if s.reason:
                out.append(f"  site {s.index} left: {s.reason}")
            if s.flags:
                out.append(f"  site {s.index} flags: " + ", ".join(f"{k}={v}" for k, v in s.flags.items()))
            if s.cache == "concat":
                g = next((g for g in self.graphs if g.index == s.graph_index), None)
                n = value_at(s.cache_copy_bytes, graph_hints(g)) if g is not None else None
                out.append(f"  site {s.index} cache: concat (torch.cat of past and new K/V) copies "
                           f"{fmt_bytes(sympy.sympify(s.cache_copy_bytes))} per step"
                           + (f" = {fmt_bytes(n)} at the example sizes" if n is not None else "")
                           + "; a static cache written in place avoids the copy")
            elif s.cache:
                out.append(f"  site {s.index} cache: {s.cache} (written before the QK^T matmul, no copy)")
        return "\n".join(out)

    def diff(self) -> str:
        return "\n\n".join(g.diff() for g in self.graphs)

    @property
    def kernel_fallbacks(self) -> dict:
        """Calls that fell back from the Triton kernel to the reference implementation, by reason. Kernels run
        after compilation, so this is read live (process-wide: the kernels do not know which graph called them)."""
        from attn_compiler.codegen import dispatch
        return dict(dispatch.fallbacks)

    def __str__(self) -> str:
        parts = [self.summary(), self.table()]
        inners = sorted({g.inner for g in self.graphs if g.inner})
        if inners:
            parts.append(f"compiled by: {', '.join(inners)} (inner={self.options.inner!r})")
        fb = self.kernel_fallbacks
        if fb:
            parts.append("kernel fallbacks to the reference implementation:\n" + "\n".join(
                f"  {n} call(s): {reason}" for reason, n in fb.items()))
        mem = self.memory()
        if mem:
            parts.append(mem)
        for g in self.graphs:
            if g.error:
                parts.append(f"graph {g.index}: the pass failed and the graph runs unchanged: {g.error}")
            if g.inner_error:
                parts.append(f"graph {g.index}: compiling it failed and it runs op by op: {g.inner_error}")
        d = self.diff()
        if d:
            parts.append(d)
        return "\n\n".join(parts)

    __repr__ = summary

    def write(self, path: str) -> None:
        if str(path).endswith((".html", ".htm")):
            self.to_html(path)
        else:
            with open(path, "w") as f:
                f.write(str(self) + "\n")

    @classmethod
    def merge(cls, reports) -> "Report":
        """One report over several compilations (graph breaks, recompiles): each graph becomes a section."""
        reports = list(reports)
        if not reports:
            raise ValueError("Report.merge needs at least one report")
        out = cls.__new__(cls)
        out.graphs = [g for r in reports for g in r.graphs]
        out.options, out.counters = reports[-1].options, reports[-1].counters
        return out

    def to_html(self, path: str) -> None:
        """A self-contained page (inline CSS, JS and SVG; nothing fetched): summary, site table, memory plot and
        the graph before/after side by side with the rewritten regions linked to their site rows."""
        from attn_compiler import report_html
        with open(path, "w", encoding="utf-8") as f:
            f.write(report_html.render(self))
