"""The HTML report: its structure matches the Report object, it is self-contained, the CLI writes it, and a real
browser renders it without console errors."""
import html.parser
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import sympy
import torch

import attn_compiler
from attn_compiler import report_html
from attn_compiler.models import GPT, GPTConfig
from attn_compiler.report import Report

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.path.join(HERE, "report_models.py")


class Page(html.parser.HTMLParser):
    """Elements by id, every <tr> with its cells' text and classes, every link, and the raw SVG text."""

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.ids, self.links, self.urls, self.rows, self.stack = {}, [], [], [], []
        self.cell = None
        self.row = None
        self.in_site_line = None       # data-site of the highlighted code line we are inside
        self.site_links = []           # (data-site, href) of each highlighted code line's link
        self.svgs = re.findall(r"<svg\b.*?</svg>", text, flags=re.S)
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids[a["id"]] = (tag, a)
        for key in ("src", "href"):
            if key in a:
                self.urls.append(a[key])
        if tag == "a" and "href" in a:
            self.links.append(a["href"])
            if self.in_site_line:
                self.site_links.append((self.in_site_line, a["href"]))
        if tag == "div" and "data-site" in a:
            self.in_site_line = a["data-site"]
        if tag == "tr":
            self.row = {"id": a.get("id"), "cells": []}
        if tag == "td" and self.row is not None:
            self.cell = {"class": a.get("class", ""), "text": ""}

    def handle_endtag(self, tag):
        if tag == "td" and self.cell is not None and self.row is not None:
            self.row["cells"].append(self.cell)
            self.cell = None
        if tag == "tr" and self.row is not None:
            self.rows.append(self.row)
            self.row = None
        if tag == "div":
            self.in_site_line = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell["text"] += data


def _gpt_report(tmp_path, budget=None, seq=48):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_kv_head=1, d_model=32, block=128, vocab=64))
    idx = torch.randint(0, 64, (2, seq))
    torch._dynamo.maybe_mark_dynamic(idx, 1)
    opts = {"report": str(tmp_path / "r.html")}
    if budget:
        opts["memory_budget"] = budget
    torch.compile(model, backend="memattn", options=opts)(idx, idx).backward()
    return attn_compiler.last_report(), tmp_path / "r.html"


def _no_external_urls(page):
    bad = [u for u in page.urls if re.match(r"\s*(https?:)?//", u)]
    assert not bad, bad


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    torch._dynamo.reset()
    rep, path = _gpt_report(tmp_path_factory.mktemp("gpt"), budget="450KiB")
    return rep, path.read_text()


@pytest.mark.filterwarnings("ignore:no recompute plan fits")
def test_html_structure_matches_report(gpt):
    rep, text = gpt
    page = Page(text)
    assert text.startswith("<!doctype html>")
    # summary cards: counts, peaks at the example sizes, budget, checkpoints
    cards = {k: v for k, v in page.ids.items() if k.startswith("summary-")}
    assert set(cards) >= {"summary-found", "summary-rewritten", "summary-left", "summary-peak", "summary-budget",
                          "summary-checkpoints"}

    def card(key):
        m = re.search(rf'id="summary-{key}"><div class="n">(.*?)</div>', text)
        return m.group(1)
    assert card("found") == str(len(rep.sites)) == "2"
    assert card("rewritten") == str(len(rep.rewritten)) and card("left") == str(len(rep.left))
    assert card("checkpoints") == str(len(rep.checkpoints)) and rep.checkpoints
    from attn_compiler.analysis import fmt_bytes
    assert card("peak") == f"{fmt_bytes(rep.peak_before.at())} &rarr; {fmt_bytes(rep.peak_after.at())}"
    assert card("budget") == fmt_bytes(450 * 1024)
    # one row per site, its formula reads back as the Report's sympy expression and its value is that at the hints
    g = rep.graphs[0]
    hints = report_html.graph_hints(g)
    assert hints
    site_rows = {r["id"]: r for r in page.rows if r["id"] and r["id"].startswith("site-")}
    assert len(site_rows) == len(rep.sites)
    for s in rep.sites:
        row = site_rows[f"site-{s.graph_index}-{s.index}"]
        cells = {c["class"]: c["text"] for c in row["cells"]}
        names = {str(x): x for x in s.scores_bytes.free_symbols}   # the shape symbols carry assumptions
        assert sympy.expand(sympy.sympify(cells["formula"], locals=names) - s.scores_bytes) == 0
        assert s.scores_bytes.free_symbols, "dynamic sequence length should stay a symbol"
        assert cells["value"] == fmt_bytes(int(s.scores_bytes.xreplace(hints)))
        assert s.location in "".join(c["text"] for c in row["cells"])
        assert all(dim in "".join(c["text"] for c in row["cells"]) for dim in s.shapes["q"].strip("()")
                   .replace("'", "").split(", "))
    # every rewritten site is linked from a highlighted line of the after graph (the memattn.attention call), and
    # every highlight links to an existing row
    after_links = {href for _, href in page.site_links}
    for s in rep.rewritten:
        assert f"#site-{s.graph_index}-{s.index}" in after_links
    calls = re.findall(r'data-site="(site-\d+-\d+)"><a href="#\1"[^>]*>[^<]*torch\.ops\.memattn\.attention', text)
    assert sorted(calls) == sorted(f"site-{s.graph_index}-{s.index}" for s in rep.rewritten)
    for anchor, href in page.site_links:
        assert href == "#" + anchor and anchor in page.ids
    # the plot: a well-formed SVG with a before and an after series
    assert len(page.svgs) == 1
    svg = ET.fromstring(page.svgs[0])
    assert svg.tag.endswith("svg")
    classes = [e.get("class", "") for e in svg.iter()]
    assert any("line before" in c for c in classes) and any("line after" in c for c in classes)
    _no_external_urls(page)
    assert "<link" not in text and "@import" not in text


def test_peak_plot_follows_the_formulas(gpt):
    rep, _ = gpt
    g = rep.graphs[0]
    sym = report_html.seq_symbol(g)
    assert sym is not None and report_html.graph_hints(g)[sym] == 48
    # the before peak grows with n^2, the after peak (attention rewritten, checkpoints) more slowly
    b = [rep.peak_before.at({str(sym): n}) for n in (512, 1024)]
    a = [rep.peak_after.at({str(sym): n}) for n in (512, 1024)]
    assert b[1] - b[0] > a[1] - a[0]


def test_static_shapes_say_so(tmp_path):
    from attn_compiler import patterns
    scaled = patterns.family("scaled")
    path = tmp_path / "s.html"
    q, k, v = (torch.randn(2, 4, 17, 16) for _ in range(3))
    torch.compile(scaled.div_scores, backend="memattn", options={"report": str(path)})(q, k, v)
    text = path.read_text()
    assert "Static shapes" in text
    page = Page(text)
    for s in page.svgs:
        ET.fromstring(s)
    _no_external_urls(page)


def test_merge_puts_each_graph_in_a_section(tmp_path):
    sys.path.insert(0, HERE)
    try:
        import report_models
    finally:
        sys.path.remove(HERE)
    first = len(attn_compiler.reports())
    model, inputs = report_models.two_graphs()
    torch.compile(model, backend="memattn")(*inputs)
    made = attn_compiler.reports()[first:]
    assert len(made) == 2
    rep = Report.merge(made)
    assert len(rep.sites) == 2 and len(rep.rewritten) == 1 and len(rep.left) == 1
    rep.to_html(tmp_path / "m.html")
    page = Page((tmp_path / "m.html").read_text())
    sections = [k for k, (tag, _) in page.ids.items() if tag == "section"]
    assert len(sections) == 2
    reasons = [c["text"] for r in page.rows for c in r["cells"] if c["class"] == "reason" and c["text"]]
    assert reasons == [rep.left[0].reason]
    with pytest.raises(ValueError):
        Report.merge([])


def _cli(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "attn_compiler", "report", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd, env=env)


def test_cli_end_to_end(tmp_path):
    out = _cli(f"{MODELS}:tiny_gpt", "--seq", "40", "--batch", "2", "--train", "--budget", "64MiB",
               "--html", str(tmp_path / "r.html"), "--text", str(tmp_path / "r.txt"))
    assert out.returncode == 0, out.stderr
    assert "2 rewritten" in out.stdout
    text = (tmp_path / "r.html").read_text()
    page = Page(text)
    assert len([r for r in page.rows if (r["id"] or "").startswith("site-")]) == 2
    assert "memory budget" in text and "64.00 MiB" in text
    assert "sequence length" in text and "Static shapes" not in text
    assert "2 rewritten" in (tmp_path / "r.txt").read_text()
    # a dotted module from the current directory, with (model, inputs) from the factory: two graphs, one report
    out = _cli("report_models:two_graphs", "--html", str(tmp_path / "two.html"), cwd=HERE)
    assert out.returncode == 0, out.stderr
    assert "1 rewritten, 1 left alone" in out.stdout
    assert (tmp_path / "two.html").read_text().count('<section class="graph"') == 2


@pytest.mark.parametrize("target,needle", [
    ("no_colon", "MODULE:FACTORY"),
    ("no_such_module_xyz:f", "cannot import"),
    (f"{MODELS}:missing", "no callable"),
    (f"{MODELS}:broken", "factory exploded"),
    (f"{MODELS}:no_tokens", "return (model, example_inputs)"),
    ("/nonexistent/m.py:f", "no such file"),
])
def test_cli_bad_target_is_one_line_exit_2(target, needle, capsys):
    from attn_compiler.__main__ import main
    assert main(["report", target]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err


def test_cli_bad_target_in_a_real_process():
    out = _cli(f"{MODELS}:broken")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        f"python -m attn_compiler report: error: {MODELS}:broken() failed: RuntimeError: factory exploded"]


def test_cli_help_documents_every_flag(capsys):
    from attn_compiler.__main__ import main
    with pytest.raises(SystemExit) as info:
        main(["report", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--seq", "--batch", "--budget", "--html", "--text", "--train", "--static", "MODULE:FACTORY",
                 "MEMATTN_LOG"):
        assert flag in text
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert "report" in top and "demo" in top


@pytest.mark.parametrize("value,expect", [("info", "INFO"), ("debug", "DEBUG")])
def test_memattn_log_env(value, expect):
    code = ("import torch, attn_compiler\n"
            "f = torch.compile(lambda q: torch.softmax(q @ q.transpose(-1, -2), -1) @ q, backend='memattn')\n"
            "f(torch.randn(1, 2, 8, 4))\n")
    env = dict(os.environ, MEMATTN_LOG=value)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert expect in out.stderr
    if value == "info":
        assert "1 rewritten" in out.stderr and "DEBUG" not in out.stderr


def test_memattn_log_env_invalid_value_warns(monkeypatch):
    monkeypatch.setenv("MEMATTN_LOG", "loud")
    with pytest.warns(RuntimeWarning,
                      match="MEMATTN_LOG='loud': expected one of 'debug', 'error', 'info', 'warning' or unset"):
        attn_compiler._log_from_env()


CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "", shutil.which("chromium-browser")
                             or "") if p and os.path.exists(p)), None)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
@pytest.mark.parametrize("broken", [False, True])
def test_renders_in_headless_chromium(gpt, tmp_path, broken):
    """No console errors; the broken page (a script error on purpose) proves the check would catch one."""
    _, text = gpt
    if broken:
        text = text.replace("</body>", "<script>undefined_function_memattn();</script></body>")
    page = tmp_path / "page.html"
    page.write_text(text)
    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,2000", f"--screenshot={shot}",
           "--enable-logging=stderr", "--v=0", page.as_uri()]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)  # cold Chromium, loaded 2-core machine
    console = [ln for ln in out.stderr.splitlines() if "CONSOLE" in ln]
    if broken:
        assert any("undefined_function_memattn" in ln for ln in console), out.stderr[-2000:]
        return
    assert out.returncode == 0, out.stderr[-2000:]
    assert not console, console
    assert shot.exists() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    keep = os.environ.get("MEMATTN_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)


def test_page_for_a_failed_pass(tmp_path):
    """No memory analysis and no sites: the page still renders and says why there is no plot."""
    from attn_compiler import options
    from attn_compiler.report import GraphReport
    code = "def forward(self, x):\n    return x\n"
    rep = Report(GraphReport(0, code, code, [], error="Boom: x"), options.parse({}), {})
    rep.to_html(tmp_path / "e.html")
    text = (tmp_path / "e.html").read_text()
    assert "the pass failed" in text.lower() and "Boom: x" in text and "analysis failed" in text
    assert Page(text).svgs == []
