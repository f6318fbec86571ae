"""How memattn's Triton kernels are autotuned and launched through their autotuners.

Each kernel module declares a small space next to its kernel (a comprehension over tile shapes, then a prune that
keeps the few that suit the head dim, the length bucket and the dtype) and wraps the kernel with ``autotuned``:

    triton.autotune        times the pruned candidates once per key (``graph_bench``), picks kept on disk
                           (tune_cache.py) so that another process on this machine takes the pick untimed
    triton.heuristics      constexprs that follow from the tile being launched (``EVEN_MN``, ``EVEN_N``), so they
                           are right for every candidate, forced tiles included
    the raw @triton.jit kernel

``AUTOTUNED`` lists every autotuned kernel with its prune and space, for what inspects the spaces
(benchmarks/prefill.py --configs, benchmarks/kernel_resources.py, the every-candidate GPU test). Under the
interpreter, and inside ``force_config``, one fixed tile is launched instead (``fixed_config``).
"""
from __future__ import annotations

import contextlib

import torch
import triton

from attn_compiler import config

from . import launch, tune_cache

# name -> (autotuned kernel, its prune, its config space); filled by ``autotuned``
AUTOTUNED: dict = {}

# constexprs derived from the launched tile: the bound checks they remove are exact for that tile and no other
EVEN_MN = {"EVEN_M": lambda args: args["M"] % args["BLOCK_M"] == 0,
           "EVEN_N": lambda args: args["N"] % args["BLOCK_N"] == 0}
EVEN_N = {"EVEN_N": EVEN_MN["EVEN_N"]}

# the autotune key every prefill kernel shares (each adds its own flags)
PREFILL_KEY = ["BUCKET_M", "BUCKET_N", "BLOCK_D", "BLOCK_DV", "IS_CAUSAL", "HAS_BIAS", "HAS_MASK", "HAS_DROPOUT",
               "SOFTCAP", "DOT_PREC"]


def bucket(n: int) -> int:
    """Shape bucket for the autotune key: short (<= 128), medium (<= 1024), long (<= 4096), very long."""
    return 0 if n <= 128 else 1 if n <= 1024 else 2 if n <= 4096 else 3


def tile(bm, bn, w, s, pre_hook=None):
    """A candidate of a BLOCK_M x BLOCK_N space."""
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s, pre_hook=pre_hook)


def arg(named_args, kwargs, name):
    """A prune's view of one argument, wherever the autotuner put it."""
    return kwargs[name] if name in kwargs else named_args[name]


def fp32_dots(named_args, kwargs) -> bool:
    """fp32 inputs take "ieee" dots, which Triton lowers to unrolled FMA loops rather than tensor-core MMAs: the
    code, and with it ptxas's time, grows with the tile per thread (minutes for one 16-bit tile at d = 256), so
    such launches get one small 8-warp tile per kernel (benchmarks/results/tuning_notes.md)."""
    return arg(named_args, kwargs, "DOT_PREC") == "ieee"


def graph_bench(fn, quantiles=None):
    """The autotuners' timer: each config's launch captured in a CUDA graph and replayed
    (triton.testing.do_bench_cudagraph), so the host's launch overhead is not part of its time. Triton's default
    timer brackets every launch with events, and a launch through the autotuner's Python path costs the host tens
    of microseconds: a decode kernel of 5 to 30 us would then measure the launcher, not the config, and the pick
    would be noise. Falls back to the default timer where a graph cannot be captured.

    do_bench_cudagraph runs on a stream of its own that does not wait for the caller's: kernels still queued there
    (the model's previous ops) could then run while the configs' launches write this call's outputs and
    workspace, whose memory the caching allocator may just have taken back from those kernels' temporaries. Hence
    the synchronize first; autotuning happens once per key, and Triton's own timer synchronizes as well."""
    from triton.testing import do_bench, do_bench_cudagraph
    fn()  # compiles the config: a config that does not fit raises here, for the autotuner to record as such
    torch.cuda.synchronize()
    try:
        return do_bench_cudagraph(fn, rep=20, quantiles=quantiles)
    except Exception:  # noqa: BLE001  no capture possible here (e.g. inside another capture): time eagerly
        return do_bench(fn, quantiles=quantiles)


def autotuned(name: str, fn, configs: list, key: list, prune, derived: dict | None = None, **kw):
    """``fn`` (a raw @triton.jit kernel) under triton.heuristics(``derived``) and triton.autotune over
    ``configs`` pruned by ``prune``, keyed by ``key``, with the picks kept on disk; registered in AUTOTUNED."""
    kernel = triton.heuristics(derived)(fn) if derived else fn
    disk = tune_cache.DiskTuning(name, fn, key)
    tuner = triton.autotune(configs, key=key, do_bench=graph_bench,
                            prune_configs_by={"early_config_prune": disk.prune(prune)}, **kw)(kernel)
    tuner.memattn_disk = disk
    tuner.memattn_key = tuple(key)
    tuner.memattn_picks = {}   # see launch_tuned
    AUTOTUNED[name] = (tuner, prune, configs)
    return tuner


def jit_function(kernel):
    """The raw @triton.jit function under an autotuner and its heuristics."""
    while not isinstance(kernel, triton.runtime.JITFunction):
        kernel = kernel.fn
    return kernel


# Fixed tiles for the interpreter (autotuning there would only multiply the run time) and for tests that want
# tiny shapes to cross block boundaries.
_forced: dict | None = None
_INTERPRET_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}


@contextlib.contextmanager
def force_config(block_m: int = 16, block_n: int = 16, num_warps: int = 4, num_stages: int = 2):
    """Use one fixed tile shape for every kernel inside the block (no autotuning)."""
    global _forced
    old, _forced = _forced, {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": num_warps,
                             "num_stages": num_stages}
    launch.invalidate()   # plans made under another tile
    try:
        yield
    finally:
        _forced = old
        launch.invalidate()


def fixed_config() -> dict | None:
    """The tile every launch takes instead of the autotuner's pick (force_config, the interpreter), or None."""
    if _forced is not None:
        return _forced
    if config.interpret():
        return _INTERPRET_BLOCKS
    return None


def launch_tuned(tuned, grid, args, kwargs):
    """Launch through an autotuner built by ``autotuned``, and keep a pick it tuned in this call on disk. Returns
    (the compiled kernel Triton launched, the config it ran with), which launch.Launch binds.

    A key's later launches skip the autotuner's own path, which rebuilds dicts of every argument and looks each
    name up in a list to make its key on every call: they launch the kernel with the pick this launcher
    remembers. Its key is the autotuner's (the key arguments' values and the tensor arguments' dtypes), and a
    pick is taken only while the autotuner still holds it, so clearing the autotuner's cache (as tests and
    tune_afresh do) re-tunes. (A call signature seen before does not come here at all: its launch is bound.)"""
    picks = tuned.memattn_picks
    try:
        key = (tuple(kwargs[name] for name in tuned.memattn_key),
               tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
    except KeyError:  # a key argument passed positionally: the autotuner's path
        key = None
    pick = picks.get(key) if key is not None else None
    if pick is not None and any(c is pick[0] for c in tuned.cache.values()):
        cfg, cfg_kwargs = pick
        if cfg.pre_hook is not None:
            cfg.pre_hook({**dict(zip(tuned.arg_names, args)), **kwargs, **cfg_kwargs})
        return tuned.fn[grid](*args, **kwargs, **cfg_kwargs), cfg
    kernel = tuned[grid](*args, **kwargs)
    tuned.memattn_disk.after_launch(tuned, args, kwargs)
    if key is not None and any(c is tuned.best_config for c in tuned.cache.values()):
        picks[key] = (tuned.best_config, tuned.best_config.all_kwargs())
    return kernel, tuned.best_config


def kernel_launch(tuned, grid, args: tuple, named: dict, n_tensors: int, fixed: dict | None = None) -> launch.Launch:
    """The Launch of ``tuned`` (an autotuner of ``autotuned``) for a planned call: ``args`` are the kernel's
    positional arguments, its first ``n_tensors`` the call's tensors (given at each launch), and ``named`` the
    rest by name. Under a fixed tile (``fixed``, default fixed_config()) that tile is launched instead of the
    pick, with the space's pre-hook."""
    fixed = fixed_config() if fixed is None else fixed
    return launch.Launch(tuned, grid, args[n_tensors:], named, config=fixed, pre_hook=tuned.configs[0].pre_hook,
                         tuned_launch=launch_tuned, bindable=not config.interpret())
