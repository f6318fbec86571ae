"""codegen/launch.py and dispatch's plans: a call signature is planned once and each of its launches bound once;
a new signature plans and binds again; a stale binding tunes again; a failing one falls back with one warning.

CUDA-free: the Triton side is a fake autotuner whose launches return a fake compiled kernel recording what its
launcher was given (what launch.Launch binds to on a GPU), and the stream getter is stubbed."""
import warnings

import pytest
import torch
import triton

from attn_compiler import ops  # also registers torch.ops.memattn.attention
from attn_compiler.codegen import dispatch, launch, reference


class Compiled:
    """A compiled kernel: its launcher records (grid, stream, arguments); ``fail`` makes it raise."""

    function, packed_metadata = "function", "packed"

    def __init__(self):
        self.runs, self.fail = [], False

    def run(self, g0, g1, g2, stream, function, packed, meta, enter, exit_, *args):
        if self.fail:
            raise RuntimeError("launcher refused")
        assert (function, packed, meta, enter, exit_) == ("function", "packed", None, None, None)
        self.runs.append(((g0, g1, g2), stream, args))


class Tuned:
    """An autotuner: ``configs``, its raw kernel ``fn`` (whose parameter names the binding reads) and ``cache``."""

    def __init__(self, compiled):
        self.configs = [triton.Config({"BLOCK": 32}, num_warps=4)]
        self.fn = type("Raw", (), {"arg_names": ["x", "y", "stride", "n", "BLOCK", "num_warps"]})()
        self.cache = {}
        self.compiled, self.through_triton = compiled, []

    def launch(self, tuned, grid, args, named):  # launch_tuned's contract: (compiled kernel, the config it ran)
        assert tuned is self
        self.through_triton.append(args)
        pick = self.cache.setdefault(("key",), self.configs[0])
        return self.compiled, pick


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(launch, "_current_device", lambda: 0)
    monkeypatch.setattr(launch, "_stream_getter", lambda: (lambda device: 1234))
    monkeypatch.setattr(launch, "_hooks_installed", lambda: False)
    launch.stats.update(binds=0, bound_failures=0, plans=0)
    launch._warned.clear()


def _launch(tuned):
    return launch.Launch(tuned, lambda meta: (-(-100 // meta["BLOCK"]), 3), (8,), {"n": 100},
                         tuned_launch=tuned.launch)


def test_triton_s_default_hooks_are_not_installed_hooks():
    """Triton keeps empty HookChains for its launch hooks: only a hook added to them sends launches back through
    Triton's path (which calls them)."""
    from triton import knobs
    assert not launch._hooks_installed()
    hook = knobs.runtime.launch_enter_hook
    if not hasattr(hook, "add"):
        pytest.skip("this Triton keeps launch hooks as plain callables")
    hook.add(print)
    try:
        assert launch._hooks_installed()
    finally:
        hook.remove(print)
    assert not launch._hooks_installed()


def test_a_launch_binds_once_then_calls_the_launcher_with_the_tensors(fake_cuda):
    compiled = Compiled()
    tuned = Tuned(compiled)
    lnch = _launch(tuned)
    x, y = torch.zeros(2), torch.ones(2)
    for _ in range(4):
        lnch(x, y)
    assert len(tuned.through_triton) == 1 and launch.stats["binds"] == 1 and lnch.bound
    assert len(compiled.runs) == 3
    grid, stream, args = compiled.runs[-1]
    # the grid from the pick's BLOCK; the tensors, the positional scalars, then the named ones and the pick's, in
    # the kernel's parameter order (constexprs too: the launcher skips them)
    assert grid == (4, 3, 1) and stream == 1234
    assert args[0] is x and args[1] is y and args[2:] == (8, 100, 32, 4)


@pytest.mark.parametrize("n", [100, 96])
def test_a_binding_computes_the_kernel_s_heuristics_for_the_pick(fake_cuda, n):
    """An autotuner over triton.heuristics (EVEN_M / EVEN_N from the launched tile, codegen/autotune.py): the
    bound launch passes the value the heuristic gives for the pick's tile, as Triton's own path would."""
    from triton.runtime.autotuner import Heuristics
    compiled = Compiled()
    tuned = Tuned(compiled)
    raw = type("Raw", (), {"arg_names": ["x", "y", "stride", "n", "BLOCK", "EVEN", "num_warps"]})()
    tuned.fn = Heuristics(raw, raw.arg_names, {"EVEN": lambda args: args["n"] % args["BLOCK"] == 0})
    lnch = launch.Launch(tuned, lambda meta: (-(-meta["n"] // meta["BLOCK"]), 3), (8,), {"n": n},
                         tuned_launch=tuned.launch)
    x = torch.zeros(2)
    lnch(x, x)
    lnch(x, x)
    assert lnch.bound and len(compiled.runs) == 1
    assert compiled.runs[0][2][2:] == (8, n, 32, n % 32 == 0, 4)


def test_a_forgotten_pick_tunes_again_and_binds_again(fake_cuda):
    tuned = Tuned(Compiled())
    lnch = _launch(tuned)
    x = torch.zeros(2)
    lnch(x, x)
    lnch(x, x)
    tuned.cache.clear()   # what a test or tune_afresh does to an autotuner: the binding's pick is stale
    lnch(x, x)
    lnch(x, x)
    assert len(tuned.through_triton) == 2 and launch.stats["binds"] == 2


def test_a_failing_bound_launch_warns_once_and_goes_through_triton(fake_cuda):
    compiled = Compiled()
    tuned = Tuned(compiled)
    lnch, other = _launch(tuned), _launch(tuned)
    x = torch.zeros(2)
    lnch(x, x)
    other(x, x)
    compiled.fail = True
    with pytest.warns(RuntimeWarning, match="bound kernel launch failed.*launcher refused") as caught:
        for _ in range(3):
            lnch(x, x)
            other(x, x)
    assert len([w for w in caught if "bound kernel launch" in str(w.message)]) == 1
    # each Launch fell back once and stays on Triton's path (no bind, no exception per call)
    assert launch.stats["bound_failures"] == 2 and not lnch.bound and not other.bound
    assert len(tuned.through_triton) == 2 + 3 * 2


def test_an_unbindable_launch_always_goes_through_triton(fake_cuda):
    """The interpreter has no compiled kernel: every run is Triton's (the plan still saves the rest)."""
    tuned = Tuned(Compiled())
    lnch = launch.Launch(tuned, lambda meta: (1,), (8,), {"n": 1}, tuned_launch=tuned.launch, bindable=False)
    for _ in range(3):
        lnch(torch.zeros(1), torch.zeros(1))
    assert len(tuned.through_triton) == 3 and launch.stats["binds"] == 0


# --- through the op: one plan per call signature -------------------------------------------------------------------

class _Plan:
    def __init__(self, lnch):
        self.lnch = lnch

    def __call__(self, q, k, v, bias, mask, seed):
        self.lnch(q, k)
        return reference.attention_forward(q, k, v, bias, mask, seed, _SPEC)


_SPEC = reference.Spec(0.25, 0.0, False, 0, float("-inf"), True, 0.0, False, 0)


def test_the_op_plans_and_binds_once_per_call_signature(fake_cuda, monkeypatch):
    compiled = Compiled()
    tuned = Tuned(compiled)
    planned = []

    def plan_forward(q, k, v, bias, mask, seed, spec):
        planned.append(tuple(q.shape))
        return _Plan(_launch(tuned))
    mod = type("Module", (), {"supports": staticmethod(lambda *a: (True, "")),
                              "plan_forward": staticmethod(plan_forward)})
    monkeypatch.setattr(dispatch, "_triton_module", lambda name: mod)
    monkeypatch.setattr(dispatch, "_wants_triton", lambda q, kernel: True)

    def call(m):
        q = torch.randn(1, 2, m, 16)
        k = torch.randn(1, 2, 32, 16)
        return torch.ops.memattn.attention(q, k, k, None, None, None, 0.25, 0.0, False, 0, float("-inf"), True,
                                           0.0, False, "triton")
    for _ in range(3):
        call(20)
    assert planned == [(1, 2, 20, 16)] and launch.stats == dict(binds=1, bound_failures=0, plans=1)
    call(24)      # a new shape: a new signature, planned and bound again
    call(24)
    call(20)      # the first signature's plan is still kept
    assert planned == [(1, 2, 20, 16), (1, 2, 24, 16)]
    assert launch.stats["binds"] == 2 and launch.stats["plans"] == 2 and len(compiled.runs) == 4
    launch.invalidate()   # what force_config or a TMA failure does: every signature plans again
    call(20)
    assert len(planned) == 3


def test_the_reference_is_planned_once_per_signature_too():
    before = launch.stats["plans"]
    q = torch.randn(1, 2, 8, 16, dtype=torch.float64)
    args = (None, None, None, 0.25, 0.0, True, 0, float("-inf"), True, 0.0, False, "reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        outs = [torch.ops.memattn.attention(q, q, q, *args)[0] for _ in range(3)]
    assert launch.stats["plans"] == before + 1
    assert all(torch.equal(o, outs[0]) for o in outs)
    torch.ops.memattn.attention(q.transpose(1, 2).contiguous().transpose(1, 2), q, q, *args)   # new strides
    assert launch.stats["plans"] == before + 2


@pytest.mark.parametrize("change", [dict(scale=0.5), dict(softcap=2.0), dict(causal=False), dict(causal_offset=3),
                                    dict(mask_keep=False), dict(causal_offset=-3, safe_softmax=True)],
                         ids=lambda c: "-".join(c))
def test_every_scalar_of_the_call_is_part_of_its_signature(change):
    """Two calls on the same tensors that differ in one scalar are two signatures: the second call's forward and
    backward equal those of a plan made afresh for it, not the first call's plan run again."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 16, dtype=torch.float64, generator=g) for _ in range(3))
    mask = torch.rand(1, 1, 8, 8, generator=g) > 0.3
    mask.diagonal(dim1=-2, dim2=-1).fill_(True)
    base = dict(scale=0.25, softcap=0.0, causal=True, causal_offset=0, mask_fill=float("-inf"), mask_keep=True,
                dropout_p=0.0, safe_softmax=False)

    def call(**over):
        s = {**base, **over}
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = torch.ops.memattn.attention(*ops.attention_args(q=leaves[0], k=leaves[1], v=leaves[2], bias=None,
                                                              mask=mask, seed=None, kernel="reference", **s))[0]
        out.backward(torch.ones_like(out))
        return [out.detach().nan_to_num(7.0)] + [t.grad.nan_to_num(7.0) for t in leaves]
    first = call(**({"causal_offset": -3} if "safe_softmax" in change else {}))
    second = call(**change)
    launch.invalidate()
    fresh = call(**change)
    assert not all(torch.equal(a, b) for a, b in zip(first, fresh)), "the change must change the result"
    for a, b in zip(second, fresh):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
