"""Kernel launches that cost the host microseconds: a call signature is planned once, each of its kernel launches is
bound once to the compiled kernel, and later calls of that signature go straight to the kernels' launchers.

Triton's own launch path (``JITFunction.run``) binds every argument to its parameter, specialises each one
(alignment, divisibility by 16, equality to 1), hashes the result to find the compiled kernel and checks the
globals the kernel read, on every call; an autotuned kernel first builds its own key over the arguments. For
kernels of 60-90 parameters that is tens of microseconds a launch, longer than a short attention kernel runs. For
one *call signature* (the shapes, strides, dtypes and devices of a call's tensors, whether each is 16-byte aligned,
and the op's scalar arguments) every one of those steps comes out the same each time. So:

    dispatch.py    call signature -> plan, looked up in a PlanCache (built once: the implementation chosen, its
                   support checks done, every kernel argument that is not a tensor computed)
    plan           (triton_prefill / triton_decode) allocates the outputs and runs its Launches
    Launch         one kernel launch of a plan. Its first run goes through Triton (through the autotuner, which
                   times the candidates when the shape bucket is new) and keeps what Triton launched: the compiled
                   kernel, its grid and every argument that is not a tensor. Later runs call that kernel's
                   launcher with the call's tensors and nothing else.

A binding is exact: the signature fixes every value Triton specialises on, so the kernel it keeps is the one
Triton's path would find. A Launch goes through Triton again when the autotuner no longer holds the pick its
binding was made with (a test or a benchmark cleared the autotuner's cache), while a profiler's launch hook is
installed (Triton's path calls the hooks), and after a bound launch raised (with one warning). Under
TRITON_INTERPRET there is no compiled kernel: every run goes through the interpreter, and the plan saves the rest.

Plans are dropped all at once (``invalidate``) when what they were planned under changes: a forced tile
(autotune.force_config), TMA or programmatic dependent launch turned off after a failure.
"""
from __future__ import annotations

import collections
import functools
import warnings

import torch

try:
    from triton import knobs as _knobs
    _RUNTIME = _knobs.runtime
except ImportError:  # pragma: no cover - a Triton without knobs has no launch hooks to honour
    _RUNTIME = None
try:
    from triton.runtime.autotuner import Heuristics as _Heuristics
except ImportError:  # pragma: no cover - no Triton: nothing is launched through here
    _Heuristics = ()

# tests count these: a signature binds each of its launches once, a new signature binds again
stats = {"binds": 0, "bound_failures": 0, "plans": 0}
_warned: set = set()
_generation = [0]


def invalidate() -> None:
    """Drop every plan and binding (they are rebuilt on the next call): what they were planned under changed."""
    _generation[0] += 1


def describe(e: Exception) -> str:
    """An exception as one line: its type and the first line of its message (warnings and report notes)."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def hopper_or_later(device) -> bool:
    """A CUDA device of compute capability 9 or more (TMA, programmatic dependent launch)."""
    return device.type == "cuda" and device_properties(device).major >= 9


def device_properties(device):
    """A CUDA device's properties (compute capability, SM count), asked of torch once per device: its query costs
    microseconds, and the launches ask on every call."""
    return _properties(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _properties(index: int):
    return torch.cuda.get_device_properties(index)


def _current_device() -> int:
    return torch.cuda.current_device()


def _stream_getter():
    """device index -> the raw handle of its current CUDA stream (what Triton's own launch passes)."""
    return torch._C._cuda_getCurrentRawStream


def _hook_set(hook) -> bool:
    # Triton 3.4+ keeps each hook as a HookChain (always there, empty unless something was added), older ones as
    # None or a callable
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)
    return bool(calls) if calls is not None else True


def _hooks_installed() -> bool:
    return _RUNTIME is not None and (_hook_set(_RUNTIME.launch_enter_hook) or _hook_set(_RUNTIME.launch_exit_hook))


class Launch:
    """One kernel launch of a planned call.

    ``kernel``: an autotuner (autotune.autotuned; its ``fn`` is the kernel under its heuristics, if any) or a raw
    JIT function.
    ``grid``: meta -> grid tuple, meta holding ``named`` and the config's values. ``args``: the kernel's positional
    arguments after the call's tensors (strides, sizes); ``named``: the rest, by name (scalars and constexprs).
    ``config``: a fixed tile (BLOCK_* and num_warps / num_stages) instead of the autotuner's pick; ``pre_hook``:
    called with the named arguments before a fixed-tile launch (the TMA descriptors' box). ``tuned_launch``: how
    an autotuned kernel is launched through Triton, returning (compiled kernel, config). ``bindable``: False
    where no compiled kernel exists (the interpreter)."""

    __slots__ = ("tuned", "raw", "derived", "grid", "args", "named", "config", "pre_hook", "tuned_launch",
                 "bindable", "_bound", "_pick", "_tune_key")

    def __init__(self, kernel, grid, args: tuple, named: dict, *, config: dict | None = None, pre_hook=None,
                 tuned_launch=None, bindable: bool = True):
        self.tuned = kernel if hasattr(kernel, "configs") else None
        self.raw = kernel.fn if self.tuned is not None else kernel
        # triton.heuristics under the autotuner: constexprs computed from the other arguments at each launch
        self.derived = self.raw.values if isinstance(self.raw, _Heuristics) else None
        self.grid, self.args, self.named = grid, tuple(args), named
        self.config, self.pre_hook, self.tuned_launch, self.bindable = config, pre_hook, tuned_launch, bindable
        self._bound = None
        self._pick = None
        self._tune_key = None

    def __call__(self, *tensors) -> None:
        bound = self._bound
        if bound is not None:
            if self._pick is not None and self.tuned.cache.get(self._tune_key) is not self._pick:
                self._bound = None     # the autotuner forgot the pick: tune again
            elif not _hooks_installed():
                try:
                    return bound(tensors)
                except Exception as e:  # noqa: BLE001 - Triton's path below either works or says why
                    self._drop(e)
        kernel, pick = self._through_triton(tensors)
        if self.bindable:
            self._bind(kernel, pick, tensors)

    @property
    def bound(self) -> bool:
        return self._bound is not None

    def _through_triton(self, tensors):
        """Launch through Triton: the autotuner, or the fixed tile. Returns (compiled kernel, the pick or None)."""
        args = tensors + self.args
        if self.tuned is not None and self.config is None:
            return self.tuned_launch(self.tuned, self.grid, args, self.named)
        cfg = self.config or {}
        if self.pre_hook is not None:
            self.pre_hook({**dict(zip(self.raw.arg_names, args)), **self.named, **cfg})
        return self.raw[self.grid({**self.named, **cfg})](*args, **self.named, **cfg), None

    def _bind(self, kernel, pick, tensors: tuple) -> None:
        if kernel is None:
            return
        if hasattr(kernel, "result"):  # an asynchronous compile's future
            kernel = kernel.result()
        if not hasattr(kernel, "packed_metadata"):
            return
        meta = {**self.named, **(pick.all_kwargs() if pick is not None else (self.config or {}))}
        for name, rule in (self.derived or {}).items():   # as triton.heuristics computes them, in order
            meta[name] = rule({**dict(zip(self.raw.arg_names, tensors + self.args)), **meta})
        # the launcher takes every parameter in signature order, constexprs too (it skips those)
        try:
            tail = self.args + tuple(meta[n] for n in self.raw.arg_names[len(tensors) + len(self.args):])
        except KeyError:  # a parameter left at its default: not a launch this binding knows how to repeat
            return
        g0, g1, g2 = (tuple(self.grid(meta)) + (1, 1))[:3]
        run, function, packed = kernel.run, kernel.function, kernel.packed_metadata
        device, stream_of = _current_device(), _stream_getter()

        def bound(tensors):
            run(g0, g1, g2, stream_of(device), function, packed, None, None, None, *tensors, *tail)
        self._bound = bound
        self._pick = pick
        self._tune_key = next((k for k, c in self.tuned.cache.items() if c is pick), None) if pick else None
        stats["binds"] += 1

    def _drop(self, e: Exception) -> None:
        self._bound = None
        self.bindable = False   # binding again would fail the same way on every call
        stats["bound_failures"] += 1
        reason = describe(e)
        if reason not in _warned:
            _warned.add(reason)
            warnings.warn(f"memattn: a bound kernel launch failed ({reason}); launching through Triton from now "
                          "on", RuntimeWarning, stacklevel=3)


class PlanCache:
    """Call signature -> plan, the most recently used ``size`` kept (a cache growing a token a step makes a new
    signature each step); everything is dropped when ``invalidate`` was called since the last lookup."""

    def __init__(self, size: int = 512):
        self.size = size
        self._plans: collections.OrderedDict = collections.OrderedDict()
        self._generation = _generation[0]

    def get(self, key):
        if self._generation != _generation[0]:
            self._plans.clear()
            self._generation = _generation[0]
            return None
        plan = self._plans.get(key)
        if plan is not None and len(self._plans) > 1:
            self._plans.move_to_end(key)
        return plan

    def put(self, key, plan) -> None:
        self._plans[key] = plan
        stats["plans"] += 1
        if len(self._plans) > self.size:
            self._plans.popitem(last=False)

    def clear(self) -> None:
        self._plans.clear()

    def __len__(self) -> int:
        return len(self._plans)
