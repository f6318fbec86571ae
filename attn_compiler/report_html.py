"""The report as one self-contained HTML page: inline CSS, a few lines of inline JS, an inline SVG plot; no URL is
ever fetched, so the file can be mailed, attached to an issue or opened offline.

Anchors the page guarantees (tests rely on them): each site row is ``<tr id="site-G-I">`` (graph G, site I); each
highlighted region of a graph links to its row with ``<a href="#site-G-I">``; formulas sit in ``<td
class="formula">`` as sympy text that ``sympy.sympify`` reads back."""
from __future__ import annotations

import difflib
import html
import logging
import re
from typing import Optional

import sympy

from attn_compiler.analysis import CAVEATS, fmt_bytes
from attn_compiler.report import graph_hints, value_at

log = logging.getLogger("attn_compiler")
esc = html.escape

_ASSIGN = re.compile(r"^\s+(\w+(?:\s*,\s*\w+)*)\s*=")
_ATTENTION = "torch.ops.memattn.attention"


def formula(expr) -> str:
    """How a byte formula is written on the page: factored sympy text (sympify reads it back)."""
    expr = sympy.sympify(expr)
    return str(expr) if expr.is_number else str(sympy.factor(expr))


def _peak_at(b, hints=None) -> Optional[int]:
    if b is None:
        return None
    try:
        return b.at(hints)
    except (ValueError, TypeError) as e:
        log.debug("memattn report: peak not evaluable at %s: %s", hints, e)
        return None


def seq_symbol(g) -> Optional[sympy.Symbol]:
    """The sequence-length symbol of a graph: the query length of its first site when symbolic, else the symbol
    of the before-peak with the highest degree (the n^2 term's), else None (static shapes)."""
    syms = set()
    for b in (g.memory_before and g.memory_before.peak, g.peak_after):
        if b is not None:
            syms |= b.free_symbols
    by_name = {str(s): s for s in syms}
    for s in g.sites:
        q = s.shapes.get("q")
        if q:
            dims = [d.strip(" '\"") for d in q.strip("()").split(",") if d.strip()]
            if len(dims) >= 2 and dims[-2] in by_name:
                return by_name[dims[-2]]
    if not syms:
        return None
    expr = g.memory_before.peak.expr if g.memory_before is not None else g.peak_after.expr

    def degree(sym):
        try:
            return max(sympy.degree(a, sym) for a in (expr.args if isinstance(expr, sympy.Max) else [expr]))
        except Exception:
            return 0
    return max(sorted(syms, key=str), key=degree)


def plot_svg(g, width: int = 440, height: int = 220) -> tuple[str, str]:
    """(svg, note): estimated peak vs sequence length, before and after, on log2 x and linear y axes."""
    before = g.memory_before.peak if g.memory_before is not None else None
    after = g.peak_after
    if before is None and after is None:
        return "", "No memory estimate for this graph (the analysis failed), so no plot."
    sym = seq_symbol(g)
    hints = graph_hints(g)
    if sym is None:
        xs, note = [None], ("Static shapes: the estimate holds at the example sizes only; compile with "
                            "dynamic=True (or mark the sequence axis dynamic) for a curve over sequence length.")
    else:
        n0 = int(hints.get(sym, 0)) or int({str(k): v for k, v in hints.items()}.get(str(sym), 512))
        lo = max(1, n0 // 8)
        xs, x = [], lo
        while x <= n0 * 16:
            xs.append(x)
            x *= 2
        if n0 not in xs:
            xs = sorted(xs + [n0])
        note = f"Sequence length is the symbol {sym} (example value {n0}); other sizes stay at their example values."
    series = {}
    for name, b in (("before", before), ("after", after)):
        if b is None:
            continue
        pts = [(x, _peak_at(b, None if x is None else {str(sym): x})) for x in xs]
        pts = [(x, y) for x, y in pts if y is not None]
        if pts:
            series[name] = pts
    if not series:
        return "", "The memory estimate could not be evaluated over sequence lengths."
    ml, mr, mt, mb = 76, 16, 14, 38
    ymax = max(y for pts in series.values() for _, y in pts) or 1
    if sym is None:
        def px(_x):
            return ml + (width - ml - mr) / 2
    else:
        import math
        a, z = math.log2(xs[0]), math.log2(xs[-1])

        def px(x):
            return ml + (width - ml - mr) * ((math.log2(x) - a) / (z - a) if z > a else 0.5)

    def py(y):
        return mt + (height - mt - mb) * (1 - y / (ymax * 1.05))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="estimated peak memory vs sequence length">',
             f'<rect x="{ml}" y="{mt}" width="{width - ml - mr}" height="{height - mt - mb}" class="frame"/>']
    for k in range(5):
        yv = ymax * 1.05 * k / 4
        parts.append(f'<line x1="{ml}" x2="{width - mr}" y1="{py(yv):.1f}" y2="{py(yv):.1f}" class="grid"/>'
                     f'<text x="{ml - 4}" y="{py(yv) + 4:.1f}" class="ylab">{esc(fmt_bytes(int(yv)))}</text>')
    for x in xs:
        if x is not None:
            parts.append(f'<text x="{px(x):.1f}" y="{height - mb + 14}" class="xlab">{x}</text>')
    parts.append(f'<text x="{ml + (width - ml - mr) / 2:.1f}" y="{height - 4}" class="xlab">'
                 f'{esc("sequence length " + str(sym) if sym is not None else "example sizes")}</text>')
    for name, pts in series.items():
        d = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        if len(pts) > 1:
            parts.append(f'<polyline points="{d}" class="line {name}"/>')
        for x, y in pts:
            parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" class="dot {name}">'
                         f'<title>{name}: {esc(str(x) if x is not None else "example")} -> '
                         f'{esc(fmt_bytes(y))}</title></circle>')
    lx = ml + 10
    for i, name in enumerate(series):
        parts.append(f'<rect x="{lx}" y="{mt + 8 + 16 * i}" width="12" height="4" class="key {name}"/>'
                     f'<text x="{lx + 16}" y="{mt + 13 + 16 * i}" class="legend">{name}</text>')
    parts.append("</svg>")
    return "".join(parts), note


def _graph_lines(g):
    """Rows of (left, right) code lines aligned side by side, each (text, site anchor or None, changed)."""
    before, after = g.before.splitlines(), g.after.splitlines()
    owner = {n: s for s in g.sites if s.status == "rewritten" for n in s.nodes}
    rewritten = sorted((s for s in g.sites if s.status == "rewritten"), key=lambda s: s.index)
    calls = iter(rewritten)   # the op calls appear in site order: sites are found and emitted in graph order

    def left_site(line):
        m = _ASSIGN.match(line)
        if m:
            for name in m.group(1).split(","):
                if name.strip() in owner:
                    return owner[name.strip()]
        return None

    after_sites = []
    for line in after:
        after_sites.append(next(calls, None) if _ATTENTION in line else None)
    rows = []
    sm = difflib.SequenceMatcher(a=before, b=after, autojunk=False)
    for tag, i1, i2, j1, j2 in sm.get_opcodes():
        n = max(i2 - i1, j2 - j1)
        for k in range(n):
            li, rj = i1 + k, j1 + k
            left = (before[li], left_site(before[li]), tag != "equal") if li < i2 else None
            right = (after[rj], after_sites[rj], tag != "equal") if rj < j2 else None
            rows.append((left, right))
    return rows


def _code_cell(cell, gi: int, side: str) -> str:
    if cell is None:
        return '<td><div class="ln pad">&nbsp;</div></td>'
    text, site, changed = cell
    body = esc(text) or "&nbsp;"
    cls = ["ln"]
    if changed:
        cls.append("del" if side == "before" else "ins")
    if site is not None:
        cls.append("site")
        anchor = f"site-{gi}-{site.index}"
        return (f'<td><div class="{" ".join(cls)}" data-site="{anchor}"><a href="#{anchor}" class="hl" '
                f'title="site {site.index}: {esc(site.pattern)}">{body}</a></div></td>')
    return f'<td><div class="{" ".join(cls)}">{body}</div></td>'


def _shapes(site) -> str:
    if not site.shapes:
        return "-"
    return "<br>".join(f"{esc(k)}: <code>[{esc(', '.join(d.strip(chr(39)) for d in v.strip('()').split(', ')))}]"
                       f"</code>" for k, v in site.shapes.items())


def _cache_note(s, hints) -> str:
    if s.cache == "concat":
        return (f'<br><span class="cache">concat cache: copies <span class="formula">{esc(formula(s.cache_copy_bytes))}'
                f'</span> B = {esc(fmt_bytes(value_at(s.cache_copy_bytes, hints)))} per step</span>')
    return f'<br><span class="cache">{esc(s.cache)} cache</span>' if s.cache else ""


def _site_rows(g) -> str:
    hints = graph_hints(g)
    rows = []
    for s in g.sites:
        f = formula(s.scores_bytes)
        v = value_at(s.scores_bytes, hints)
        src = f"<br><code class='src'>{esc(s.source_line)}</code>" if s.source_line else ""
        rows.append(
            f'<tr id="site-{g.index}-{s.index}" class="{esc(s.status)}"><td>{s.index}</td>'
            f'<td><span class="badge {esc(s.status)}">{esc(s.status)}</span></td>'
            f'<td class="loc">{esc(s.location)}{src}</td><td>{esc(s.pattern or "-")}</td>'
            f'<td class="shapes">{_shapes(s)}</td>'
            f'<td class="formula">{esc(f)}</td><td class="value">{esc(fmt_bytes(v))}</td>'
            f'<td>{esc(s.kernel or "-")}{_cache_note(s, hints)}</td><td class="reason">{esc(s.reason or "")}</td></tr>')
    if not rows:
        rows.append('<tr><td colspan="9" class="none">no attention site in this graph</td></tr>')
    return "".join(rows)


def _graph_section(g) -> str:
    b = g.memory_before.peak if g.memory_before is not None else None
    a = g.peak_after
    pb, pa = _peak_at(b), _peak_at(a)
    kind = ("training step" if g.memory_after is not None and g.memory_after.training is not None
            else "forward only")
    plan = ""
    if g.plan is not None:
        p = g.plan
        cps = "".join(f"<li>{esc(str(c))}</li>" for c in p.checkpoints)
        fold = " open" if len(p.checkpoints) <= 6 else ""
        plan = (f"<p>memory_budget {esc(fmt_bytes(p.budget))}: "
                + ("fits without recompute" if not p.checkpoints and p.fits else
                   f"{len(p.checkpoints)} recompute checkpoint(s), model peak {esc(fmt_bytes(p.peak))}")
                + "</p>" + (f"<details{fold}><summary>{len(p.checkpoints)} recompute "
                   f"checkpoint(s)</summary><ul class='cps'>{cps}</ul></details>" if cps else "")
                + (f"<p class='note'>{esc(p.note)}</p>" if p.note else ""))
    svg, note = plot_svg(g)
    err = (f"<p class='error'>The pass failed on this graph and it runs unchanged: {esc(g.error)}</p>"
           if g.error else "")
    if g.inner_error:
        err += f"<p class='error'>Compiling this graph failed and it runs op by op: {esc(g.inner_error)}</p>"
    formulas = ""
    if b is not None or a is not None:
        formulas = ("<details><summary>peak formulas</summary><table class='kv'>"
                    + (f"<tr><th>before</th><td class='formula peak-before'>{esc(str(b.simplified()))}</td></tr>"
                       if b is not None else "")
                    + (f"<tr><th>after</th><td class='formula peak-after'>{esc(str(a.simplified()))}</td></tr>"
                       if a is not None else "")
                    + "</table></details>")
    rows = "".join(f"<tr>{_code_cell(left, g.index, 'before')}{_code_cell(right, g.index, 'after')}</tr>"
                   for left, right in _graph_lines(g))
    return f"""<section class="graph" id="graph-{g.index}">
<h2>Graph {g.index}</h2>{err}
<div class="mem"><div><p class="peak">estimated peak ({kind}) at the example sizes:
<b>{esc(fmt_bytes(pb))}</b> &rarr; <b>{esc(fmt_bytes(pa))}</b></p>{plan}{formulas}</div>
<figure>{svg}<figcaption>{esc(note)}</figcaption></figure></div>
<h3>Attention sites</h3>
<table class="sites"><thead><tr><th>#</th><th>status</th><th>source</th><th>pattern</th><th>shapes</th>
<th>n&sup2; bytes removed (formula)</th><th>at example sizes</th><th>kernel</th><th>reason left</th></tr></thead>
<tbody>{_site_rows(g)}</tbody></table>
<h3>Graph before and after</h3>
<p class="hint">Highlighted lines are rewritten regions; click one to jump to its site.
<label><input type="checkbox" class="fold"> show only changed lines</label></p>
<table class="code"><thead><tr><th>before</th><th>after</th></tr></thead><tbody>{rows}</tbody></table>
</section>"""


_CSS = """
:root{--ok:#1f7a3a;--okbg:#e6f5ea;--left:#9a5b00;--leftbg:#fff3df;--hl:#fff0a0;--del:#fde8e8;--ins:#e8f7ec}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:1em 1.5em}header h1{margin:0;font-size:1.4em}
main{padding:1em 1.5em;max-width:1600px}
.cards{display:flex;flex-wrap:wrap;gap:.8em;margin:.5em 0 1em}
.card{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:.6em 1em;min-width:9em}
.card .n{font-size:1.6em;font-weight:600}.card .l{color:#5a6272;font-size:.85em}
section.graph{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:.5em 1.2em 1.2em;margin:1em 0}
.mem{display:flex;flex-wrap:wrap;gap:2em;align-items:flex-start}.mem>div{flex:1;min-width:20em}
table{border-collapse:collapse}table.sites{width:100%}
table.sites td,table.sites th,table.kv td,table.kv th{border-bottom:1px solid #e4e7ec;padding:.3em .5em;
text-align:left;vertical-align:top}
table.sites tr:target{outline:3px solid #f0b400;background:var(--hl)}
.badge{border-radius:4px;padding:0 .4em;font-size:.85em}.badge.rewritten{background:var(--okbg);color:var(--ok)}
.badge.left{background:var(--leftbg);color:var(--left)}
.formula,code,.code{font-family:ui-monospace,"SFMono-Regular",Menlo,Consolas,monospace;font-size:.85em}
td.shapes{white-space:nowrap}.src{color:#5a6272}.loc{word-break:break-all;max-width:22em}.reason{max-width:24em}
table.code{width:100%;table-layout:fixed;border:1px solid #dde1e7}
table.code td{vertical-align:top;padding:0 .4em;border-left:1px solid #dde1e7;overflow:hidden}
.ln{white-space:pre;overflow:hidden;text-overflow:ellipsis}.ln.del{background:var(--del)}.ln.ins{background:var(--ins)}
.ln.site{background:var(--hl)}.ln.site a{color:inherit;text-decoration:none;display:block}
.ln.site a:hover{text-decoration:underline}
table.code.folded tr.same{display:none}
svg.plot .frame{fill:#fbfcfd;stroke:#c9ced6}svg.plot .grid{stroke:#e8ebef}
svg.plot text{font-size:10px;fill:#5a6272}svg.plot .ylab{text-anchor:end}svg.plot .xlab{text-anchor:middle}
svg.plot .line{fill:none;stroke-width:2}svg.plot .before{stroke:#c0392b;fill:#c0392b}
svg.plot .after{stroke:#1f7a3a;fill:#1f7a3a}svg.plot .line.before,svg.plot .line.after{fill:none}
figure{margin:0}figcaption{color:#5a6272;font-size:.85em;max-width:440px}
.error,.note{color:#a32020}.hint{color:#5a6272}.caveat{color:#5a6272;font-size:.85em}
"""

_JS = """
document.querySelectorAll('table.code tbody tr').forEach(function (tr) {
  if (!tr.querySelector('.del, .ins, .site')) tr.classList.add('same');
});
document.querySelectorAll('input.fold').forEach(function (box) {
  box.addEventListener('change', function () {
    var table = box.closest('section').querySelector('table.code');
    table.classList.toggle('folded', box.checked);
  });
});
"""


def render(report) -> str:
    sites = report.sites
    nrew, nleft = len(report.rewritten), len(report.left)
    budget = getattr(report.options, "memory_budget", None)
    cps = report.checkpoints
    peaks = []
    for g in report.graphs:
        b = _peak_at(g.memory_before.peak if g.memory_before is not None else None)
        peaks.append((g.index, b, _peak_at(g.peak_after)))
    if len(peaks) == 1:
        peak_card = f"{fmt_bytes(peaks[0][1])} &rarr; {fmt_bytes(peaks[0][2])}"
    else:
        peak_card = "<br>".join(f"graph {i}: {fmt_bytes(b)} &rarr; {fmt_bytes(a)}" for i, b, a in peaks)
    cards = [
        (len(sites), "sites found", "found"), (nrew, "rewritten", "rewritten"), (nleft, "left alone", "left"),
        (peak_card, "estimated peak before &rarr; after (example sizes)", "peak"),
        (esc(fmt_bytes(budget) if isinstance(budget, int) else str(budget)) if budget is not None else "none",
         "memory budget", "budget"),
        (len(cps), "recompute checkpoints", "checkpoints"),
    ]
    card_html = "".join(f'<div class="card" id="summary-{key}"><div class="n">{n}</div><div class="l">{label}</div>'
                        f'</div>' for n, label, key in cards)
    toc = ""
    if len(report.graphs) > 1:
        toc = ("<p>Graphs (graph breaks or recompiles): " + ", ".join(
            f'<a href="#graph-{g.index}">graph {g.index}</a>' for g in report.graphs) + "</p>")
    notes = []
    if report.memory_note and len(report.graphs) > 1:
        notes.append(f"<p class='note'>{esc(report.memory_note)}</p>")
    fb = report.kernel_fallbacks
    if fb:
        notes.append("<p class='note'>Kernel fallbacks to the reference implementation: " + "; ".join(
            f"{n} call(s): {esc(r)}" for r, n in fb.items()) + "</p>")
    body = "".join(_graph_section(g) for g in report.graphs)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>memattn report</title><style>{_CSS}</style></head>
<body><header><h1>memattn report</h1><div>{esc(report.summary())}</div></header><main>
<div class="cards">{card_html}</div>{toc}{''.join(notes)}
{body}
<p class="caveat">{esc(CAVEATS)}</p>
</main><script>{_JS}</script></body></html>
"""
