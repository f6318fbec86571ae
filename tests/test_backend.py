"""The backend as users meet it: entry point, options, reports, training, graph breaks, inner compilers."""
import logging
import math
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attn_compiler
from attn_compiler import options, patterns
from helpers import LargestTensor, check_against_eager, check_model

scaled = patterns.family("scaled")   # one spelling for the tests of other things


def qkv(s=17, d=16, b=2, h=4, grad=False):
    g = torch.Generator().manual_seed(11)
    return [torch.randn(b, h, s, d, generator=g).requires_grad_(grad) for _ in range(3)]


def test_entry_point_in_a_fresh_interpreter():
    code = ("import sys, torch\n"
            "f = torch.compile(lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2), -1) @ v, backend='memattn')\n"
            "q = torch.randn(1, 2, 8, 4)\n"
            "f(q, q, q)\n"
            "import attn_compiler\n"
            "print(len(attn_compiler.last_report().rewritten))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "1"


@pytest.mark.parametrize("bad,needle", [
    ({"memory_buget": "8GiB"}, "unknown option"),
    ({"memory_budget": "lots"}, "memory_budget must be"),
    ({"memory_budget": -5}, "memory_budget must be"),
    ({"memory_budget": 0}, "memory_budget must be"),
    ({"memory_budget": "0GiB"}, "memory_budget must be"),
    ({"memory_budget": 1.5}, "memory_budget must be"),
    ({"memory_budget": True}, "memory_budget must be"),
    ({"kernels": "cuda"}, "kernels must be one of"),
    ({"inner": "tvm"}, "inner must be one of"),
    ({"report": ""}, "report must be"),
    ({"report": "/no/such/folder/r.html"}, "does not exist"),
    ({"mode": "fast"}, "mode must be one of"),
])
def test_bad_options_raise_value_error_naming_what_is_allowed(bad, needle):
    with pytest.raises(ValueError, match=needle):
        attn_compiler.backend(**bad)
    f = torch.compile(scaled.div_scores, backend="memattn", options=bad)
    with pytest.raises(Exception) as info:
        f(*qkv())
    assert needle in str(info.value)


def test_a_report_that_cannot_be_written_warns_and_the_step_runs(tmp_path, monkeypatch):
    """The report's folder is checked when the options are parsed; if writing fails later anyway (the folder
    removed meanwhile), the compiled function still runs, with one warning."""
    from attn_compiler.report import Report

    def refuse(self, path):
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(Report, "write", refuse)
    f = torch.compile(scaled.div_scores, backend="memattn", options={"report": str(tmp_path / "r.txt")})
    q, k, v = qkv()
    with pytest.warns(RuntimeWarning, match="report could not be written"):
        out = f(q, k, v)
    torch.testing.assert_close(out, scaled.div_scores(q, k, v), atol=1e-5, rtol=1e-5)


def test_version_on_the_command_line():
    out = subprocess.run([sys.executable, "-m", "attn_compiler", "--version"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"attn_compiler {attn_compiler.__version__}", out


def test_triton_kernels_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        attn_compiler.backend(kernels="triton")


def test_budget_parsing():
    assert options.parse_budget("8GiB") == 8 * 2 ** 30
    assert options.parse_budget("512MB") == 512 * 10 ** 6
    assert options.parse_budget("1.5 gib") == int(1.5 * 2 ** 30)
    assert options.parse_budget(4096) == 4096
    assert options.parse_budget(0.5) == 0.5
    assert options.parse({"memory_budget": 0.25}).budget_bytes(1000) == 250


def test_mode_and_options_accepted():
    """torch.compile takes mode or options, not both; options may carry the mode too."""
    torch.compile(scaled.div_scores, backend="memattn", mode="max-autotune-no-cudagraphs")(*qkv())
    assert attn_compiler.last_report().options.mode == "max-autotune-no-cudagraphs"
    torch._dynamo.reset()
    f = torch.compile(scaled.div_scores, backend="memattn", options={"kernels": "reference", "mode": "default"})
    f(*qkv())
    assert attn_compiler.last_report().options.kernels == "reference"


def test_a_mode_means_inductor():
    """A mode is an Inductor setting: given one, the rewritten graph goes to Inductor (not silently dropped by the
    eager inner); asked for together with inner='eager' it is an error that says so."""
    assert options.parse().inner == "auto"
    assert options.parse({"mode": "default"}).inner == "auto"
    assert options.parse(mode="reduce-overhead").inner == "inductor"
    assert options.parse({"mode": "max-autotune", "kernels": "reference"}).inner == "inductor"
    assert options.parse({"mode": "reduce-overhead", "inner": "inductor"}).mode == "reduce-overhead"
    with pytest.raises(ValueError, match="Inductor mode and applies with inner='inductor'"):
        options.parse({"inner": "eager", "mode": "reduce-overhead"})


def test_auto_inner_is_inductor_on_cuda_and_eager_elsewhere():
    import types
    cuda_input = types.SimpleNamespace(is_cuda=True)   # what a CUDA example input answers
    auto = options.parse()
    assert auto.inner_for([torch.zeros(2), 3]) == "eager"
    assert auto.inner_for([torch.zeros(2), cuda_input]) == "inductor"
    assert options.parse({"inner": "eager"}).inner_for([cuda_input]) == "eager"
    assert options.parse({"inner": "inductor"}).inner_for([torch.zeros(2)]) == "inductor"
    q, k, v = qkv()
    torch.compile(scaled.div_scores, backend="memattn")(q, k, v)
    assert attn_compiler.last_report().graphs[0].inner == "eager"


@pytest.mark.parametrize("recompute", [False, True])
def test_inductor_gets_the_mode_with_or_without_recompute(monkeypatch, recompute):
    """The mode's config patches (CUDA graphs for reduce-overhead) reach Inductor whether or not the budget
    planner tagged values for recompute (that path once compiled without them)."""
    import types

    import torch._inductor.compile_fx as cfx
    from attn_compiler import pipeline
    seen = []
    monkeypatch.setattr(cfx, "compile_fx", lambda gm, inputs, config_patches=None: seen.append(config_patches) or gm)
    outcome = types.SimpleNamespace(recompute=["x"]) if recompute else None
    gm = torch.fx.symbolic_trace(lambda x: x + 1)
    for mode, want in (("reduce-overhead", {"triton.cudagraphs": True}), (None, None)):
        assert pipeline._inner_compile(gm, [], options.parse({"inner": "inductor", "mode": mode}), outcome) is gm
        assert seen.pop() == want


def test_report_text_and_location(tmp_path):
    path = tmp_path / "r.txt"
    out = torch.compile(scaled.div_scores, backend="memattn", options={"report": str(path)})(*qkv())
    rep = attn_compiler.last_report()
    site = rep.sites[0]
    assert site.location.endswith("patterns/scaled.py:" + str(scaled.div_scores.__code__.co_firstlineno + 1))
    assert "softmax" in site.source_line
    assert int(site.scores_bytes) == 3 * (2 * 4 * 17 * 17 * 4)  # QK^T, its scaled copy and the softmax, fp32
    text = path.read_text()
    assert "1 rewritten" in text and "memattn.attention" in text and "-    _softmax" in text
    assert text == str(rep) + "\n"
    assert out.shape == (2, 4, 17, 16)


def test_report_true_logs(caplog):
    with caplog.at_level(logging.WARNING, logger="attn_compiler"):
        torch.compile(scaled.div_scores, backend="memattn", options={"report": True})(*qkv())
    assert "1 rewritten" in caplog.text


def test_report_html(tmp_path):
    path = tmp_path / "r.html"
    torch.compile(scaled.div_scores, backend="memattn", options={"report": str(path)})(*qkv())
    page = path.read_text()
    assert page.startswith("<!doctype html>") and "memattn.attention" in page and "rewritten" in page


def test_symbolic_formula_with_dynamic_shapes():
    torch.compile(scaled.div_scores, backend="memattn", dynamic=True)(*qkv())
    expr = attn_compiler.last_report().sites[0].scores_bytes
    assert expr.free_symbols, expr  # the n^2 bytes stay a formula in the shape symbols
    degrees = [sum(m.values()) for m in [dict(zip(expr.free_symbols, t)) for t in expr.as_poly().monoms()]]
    assert max(degrees) == 4  # B * H * S * S


def test_compiled_model_has_no_n_by_n_tensor():
    s = 256
    q, k, v = (torch.randn(1, 2, s, 16, requires_grad=True) for _ in range(3))
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(attn_compiler.memattn(gm, example_inputs))
        return graphs[-1]

    torch.compile(scaled.div_scores, backend=capture)(q, k, v)
    # Dynamo runs frames eagerly under a dispatch mode, so the probe calls the compiled graph itself
    with LargestTensor() as probe:
        graphs[0](q, k, v)[0].sum().backward()
    assert probe.largest < s * s, (probe.largest, probe.op)
    with LargestTensor() as eager_probe:
        scaled.div_scores(q, k, v).sum().backward()
    assert eager_probe.largest >= 2 * s * s


class Block(nn.Module):
    def __init__(self, d=32, h=4, p=0.0):
        super().__init__()
        self.h, self.p = h, p
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.h, c // self.h).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~mask, float("-inf"))
        att = F.dropout(F.softmax(att, dim=-1), self.p, self.training)
        y = (att @ v).transpose(1, 2).contiguous().view(b, t, c)
        return self.proj(y)


def test_fullgraph_two_layers_one_graph_training():
    model = nn.Sequential(Block(), nn.GELU(), Block())
    x = torch.randn(2, 19, 32)
    before = attn_compiler.backend_counters()["graphs"]
    report = check_model(model, [x], torch.float32, rewritten=2, fullgraph=True)
    assert attn_compiler.backend_counters()["graphs"] == before + 1
    assert all(s.flags["causal"] for s in report.sites)


def test_parameter_gradients_match_eager():
    torch.manual_seed(0)
    model = Block()
    x = torch.randn(2, 21, 32)
    compiled = torch.compile(model, backend="memattn")
    model.zero_grad()
    model(x).square().sum().backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled(x).square().sum().backward()
    for a, b in zip((p.grad for p in model.parameters()), want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    assert len(attn_compiler.last_report().rewritten) == 1


def test_training_dropout_matches_the_op_on_the_same_seed():
    """p > 0: the kernel's own RNG, seeded from the global generator. Same torch seed -> same result; and the
    result equals dense attention with the op's drop decisions (checked in test_reference)."""
    model = Block(p=0.2).train()
    compiled = torch.compile(model, backend="memattn")
    x = torch.randn(2, 19, 32)
    torch.manual_seed(5)
    a = compiled(x)
    torch.manual_seed(5)
    b = compiled(x)
    c = compiled(x)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert attn_compiler.last_report().sites[0].flags["dropout_p"] == 0.2
    model.eval()
    torch.testing.assert_close(torch.compile(model, backend="memattn")(x), model(x), atol=1e-5, rtol=1e-5)


def test_no_grad_region_inside_the_graph_keeps_its_semantics():
    w = torch.randn(16, 16, requires_grad=True)

    def fn(q, k, v, w):
        with torch.no_grad():
            k2 = k @ w  # no gradient may reach w through here
        return scaled.div_scores(q, k2, v) + (q @ w).sum()

    q, k, v = qkv(grad=True)
    out = torch.compile(fn, backend="memattn")(q, k, v, w)
    gw, = torch.autograd.grad(out.sum(), [w])
    ref, = torch.autograd.grad(fn(q, k, v, w).sum(), [w])
    torch.testing.assert_close(gw, ref)
    assert torch.is_grad_enabled()


def test_graph_break_gives_two_reports_and_both_rewrite():
    def fn(q, k, v):
        a = scaled.div_scores(q, k, v)
        torch._dynamo.graph_break()
        return scaled.div_scores(a, k, v)

    n = len(attn_compiler.reports())
    torch.compile(fn, backend="memattn")(*qkv())
    new = attn_compiler.reports()[n:]
    assert [len(r.rewritten) for r in new] == [1, 1]


def test_recompile_on_new_shapes_keeps_rewriting():
    f = torch.compile(scaled.div_scores, backend="memattn")
    for s in (8, 13):
        q, k, v = qkv(s=s)
        torch.testing.assert_close(f(q, k, v), scaled.div_scores(q, k, v), atol=1e-5, rtol=1e-5)
        assert len(attn_compiler.last_report().rewritten) == 1


def test_inner_inductor():
    q, k, v = qkv(grad=True)
    report = check_against_eager(scaled.div_scores, [q, k, v], torch.float32, options={"inner": "inductor"})
    assert report.options.inner == "inductor"


def test_pass_failure_runs_the_graph_unchanged(monkeypatch):
    import attn_compiler.pipeline as be

    def boom(*a, **k):
        raise RuntimeError("injected")

    monkeypatch.setattr(be, "rewrite_graph", boom)
    q, k, v = qkv()
    with pytest.warns(RuntimeWarning, match="runs unchanged"):
        out = torch.compile(scaled.div_scores, backend="memattn")(q, k, v)
    torch.testing.assert_close(out, scaled.div_scores(q, k, v))
    assert "injected" in attn_compiler.last_report().graphs[0].error


def test_inner_compile_failure_runs_the_rewritten_graph_op_by_op(monkeypatch):
    """Inductor raising on the rewritten graph does not take the step down: one warning, the rewritten graph runs
    eagerly (attention still through the op), the report says why, and gradients still flow."""
    import torch._inductor.compile_fx as cfx

    def boom(*a, **k):
        raise RuntimeError("injected inductor failure")
    monkeypatch.setattr(cfx, "compile_fx", boom)
    q, k, v = qkv(grad=True)
    with pytest.warns(RuntimeWarning, match="runs op by op.*injected inductor failure") as caught:
        out = torch.compile(scaled.div_scores, backend="memattn", options={"inner": "inductor"})(q, k, v)
    assert len([w for w in caught if "memattn" in str(w.message)]) == 1
    out.sum().backward()
    ref = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    scaled.div_scores(*ref).sum().backward()
    torch.testing.assert_close(out, scaled.div_scores(*ref))
    torch.testing.assert_close(q.grad, ref[0].grad)
    report = attn_compiler.last_report()
    assert "injected inductor failure" in report.graphs[0].inner_error and len(report.rewritten) == 1
    assert "runs op by op" in str(report)


def test_dynamo_restarting_analysis_is_not_taken_for_a_failure():
    """Under dynamic shapes AOTAutograd's scalar tensorification raises TensorifyScalarRestartAnalysis for Dynamo
    to trace the frame again (here inside the recompute partition a budget asks for). That is control flow: no
    fallback warning, the restarted compile is rewritten and planned, and the abandoned attempt leaves no report."""
    import warnings

    from attn_compiler.models import GPT, GPTConfig
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=1, d_model=32, n_head=2, n_kv_head=2, block=32)
    model, x = GPT(cfg), torch.randint(0, cfg.vocab, (2, 32))
    before, graphs = len(attn_compiler.reports()), attn_compiler.pipeline.counters["graphs"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out = torch.compile(model, backend="memattn", dynamic=True, options={"memory_budget": 600_000})(x)
        (out[0] if isinstance(out, tuple) else out).float().sum().backward()
    reports = attn_compiler.reports()[before:]
    assert len(reports) == 1 and attn_compiler.pipeline.counters["graphs"] == graphs + 1
    graph = reports[0].graphs[0]
    assert graph.inner_error is None and graph.plan is not None and len(reports[0].rewritten) == 1


def test_kernel_failure_falls_back_once_with_a_warning_and_a_report_note(monkeypatch):
    """An injected Triton failure: the call still returns eager's result via the reference, warns once, and the
    report lists the fallback."""
    import types

    from attn_compiler.codegen import dispatch

    def plan_forward(*_args):   # the launch fails, as a kernel that does not compile does
        return lambda *t: (_ for _ in ()).throw(RuntimeError("injected compile error"))
    broken = types.SimpleNamespace(supports=lambda *a: (True, ""), plan_forward=plan_forward)
    monkeypatch.setattr(dispatch, "_triton_module", lambda name: broken)
    monkeypatch.setattr(dispatch, "_wants_triton", lambda q, kernel: True)
    monkeypatch.setattr(dispatch, "fallbacks", {})
    monkeypatch.setattr(dispatch, "_warned", set())
    q, k, v = qkv()
    f = torch.compile(scaled.div_scores, backend="memattn")
    with pytest.warns(RuntimeWarning, match="injected compile error") as rec:
        out1 = f(q, k, v)
        out2 = f(q, k, v)
    assert len([w for w in rec if "injected" in str(w.message)]) == 1
    torch.testing.assert_close(out1, scaled.div_scores(q, k, v), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out2, out1)
    report = attn_compiler.last_report()
    assert report.kernel_fallbacks == {"RuntimeError: injected compile error": 2}
    assert "kernel fallbacks to the reference implementation" in str(report)


def test_kernels_launch_under_their_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device: the dispatcher enters the query's device around the kernel call
    (a model split over GPUs in one process keeps each layer's kernel on its own GPU). CUDA-free: the guard is
    recorded, not entered."""
    import contextlib
    import types

    from attn_compiler.codegen import dispatch

    entered = []

    @contextlib.contextmanager
    def guard(q):
        entered.append(q.device)
        yield
    monkeypatch.setattr(dispatch, "device_guard", guard)
    mod = types.SimpleNamespace(supports=lambda *a: (True, ""),
                                plan_forward=lambda *a: (lambda *t: ("kernel", entered[-1])))
    monkeypatch.setattr(dispatch, "_triton_module", lambda name: mod)
    monkeypatch.setattr(dispatch, "_wants_triton", lambda q, kernel: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # the process sits on GPU 0, the layer on GPU 1
    q = types.SimpleNamespace(device=torch.device("cuda", 1), is_cuda=True, shape=(1, 2, 64, 16))
    spec = types.SimpleNamespace(dropout_p=0.0, out_layout=0)
    assert dispatch.forward(q, q, q, None, None, None, spec, "triton") == ("kernel", torch.device("cuda", 1))
    monkeypatch.undo()  # the real guard: CUDA tensors enter their device (not entered here), others nothing
    assert dispatch.device_guard(q).idx == 1
    assert isinstance(dispatch.device_guard(torch.zeros(1)), contextlib.nullcontext)


# --- the op's output layout (out_layout) and where the rewrite asks for [Z, M, H, Dv] -------------------------

def _attn(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v


def _merge_heads(q, k, v):          # the model's spelling: y.transpose(1, 2).contiguous().view(B, N, C)
    y = _attn(q, k, v)
    b, h, n, d = y.shape
    return y.transpose(1, 2).contiguous().view(b, n, h * d) * 2


def _merge_heads_reshape(q, k, v):  # HF's: y.transpose(1, 2).reshape(B, N, -1)
    y = _attn(q, k, v)
    return torch.tanh(y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1))


def _returns_the_copy(q, k, v):     # the copy is a graph output: aliasing the op's output would be visible
    return _attn(q, k, v).transpose(1, 2).contiguous()


def _copy_written_in_place(q, k, v):
    y = _attn(q, k, v).transpose(1, 2).contiguous()
    y.mul_(3)
    return y.sum(-1)


def _copy_diagonal_written_in_place(q, k, v):   # through a view op that is no reshape or transpose
    y = _attn(q, k, v).transpose(1, 2).contiguous()
    y.diagonal(dim1=2, dim2=3).mul_(3)
    return y.sum(-1)


def _no_transpose(q, k, v):
    return _attn(q, k, v).reshape(q.shape[0], -1) * 2


@pytest.mark.parametrize("fn,layout", [(_merge_heads, "zmhd"), (_merge_heads_reshape, "zmhd"),
                                       (_returns_the_copy, "zhmd"), (_copy_written_in_place, "zhmd"),
                                       (_copy_diagonal_written_in_place, "zhmd"),
                                       (_no_transpose, "zhmd")], ids=lambda x: getattr(x, "__name__", x))
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_output_layout_where_the_model_copies_it_transposed(fn, layout, dynamic):
    """Outputs and gradients match eager in every spelling; the layout is asked for only where the model's own
    contiguous copy of the transposed output can be dropped (the report says which, and why not)."""
    report = check_against_eager(fn, qkv(s=13, grad=True), torch.float32, dynamic=dynamic)
    flag = report.rewritten[0].flags["out_layout"]
    assert flag.startswith(layout), flag
    why = {_returns_the_copy: "graph output", _copy_written_in_place: "in place",
           _copy_diagonal_written_in_place: "in place", _no_transpose: "not transposed"}
    assert why.get(fn, "") in flag, flag


@pytest.mark.parametrize("kernel", ["reference", "auto"])
def test_op_out_layout_strides_and_values(kernel):
    import attn_compiler.ops  # noqa: F401
    from torch._subclasses.fake_tensor import FakeTensorMode
    q, k, v = qkv(s=9, d=8, h=4)
    args = (q, k, v, None, None, None, 0.3, 0.0, True, 0, float("-inf"), True, 0.0, False, kernel)
    out0, st0 = torch.ops.memattn.attention(*args)
    out1, st1 = torch.ops.memattn.attention(*args, 1)
    assert out0.is_contiguous() and not out1.is_contiguous() and out1.transpose(1, 2).is_contiguous()
    assert torch.equal(out0, out1) and torch.equal(st0, st1)
    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        fake1, _ = torch.ops.memattn.attention(fq, fk, fv, *args[3:], 1)
        fake0, _ = torch.ops.memattn.attention(fq, fk, fv, *args[3:])
    assert fake1.stride() == out1.stride() and fake0.stride() == out0.stride()
    with pytest.raises(ValueError, match="out_layout must be one of"):
        torch.ops.memattn.attention(*args, 2)


def test_output_layout_under_inductor():
    """Inductor plans buffers from the fake's strides: the [Z, M, H, Dv] output must be what the op returns."""
    report = check_against_eager(_merge_heads, qkv(s=13, grad=True), torch.float32, options={"inner": "inductor"})
    assert report.rewritten[0].flags["out_layout"].startswith("zmhd")


def test_warnings_and_locations_point_at_the_user_s_code():
    """A budget warning names the line of the user's code that ran the compiled function (not the backend's
    own), and a site's location skips torch's frames: under torch.set_default_device, torch/utils/_device.py is
    innermost in every traced op's stack."""
    q, k, v = (t.requires_grad_() for t in qkv(s=64))
    f = torch.compile(scaled.div_scores, backend="memattn", options={"memory_budget": "1KiB"})
    with pytest.warns(RuntimeWarning, match="memory_budget") as caught:
        f(q, k, v).sum().backward()
    assert {w.filename for w in caught if "memory_budget" in str(w.message)} == {__file__}
    def attend(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.25, -1) @ v

    torch._dynamo.reset()
    with torch.device("cpu"):
        torch.compile(attend, backend="memattn")(q, k, v)
    (site,) = attn_compiler.last_report().sites
    assert site.location.startswith(__file__ + ":") and "softmax" in site.source_line, site.location
