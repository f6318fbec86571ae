"""Autotune picks kept on disk, so a process meeting a shape bucket that an earlier process on this machine tuned
takes the earlier pick instead of compiling and timing every candidate again (seconds per bucket and kernel: a
training restart or a new generation server would otherwise pay them again on its first calls).

How it rides on ``triton.autotune``: the autotuner calls its early prune only for a key it has not tuned in this
process. The prune wrapped by ``DiskTuning.prune`` looks the key up on disk first; on a hit that is still among the
candidates the prune keeps, it returns that one config, so the autotuner compiles and times that one instead of the
whole pruned space (Triton 3.6 still times a lone candidate once; later versions take it untimed). After
each launch through the autotuner, ``DiskTuning.after_launch`` notices a key tuned in this process (the autotuner's
cache grew) and writes its pick. Triton's own disk cache of autotune results (``cache_results``) skips every config
space with a pre-hook, which the forward kernels' TMA block-shape hook is.

The key on disk is the autotuner's: the values of its key arguments and the dtypes of the tensor arguments, under a
file per kernel source (Triton's hash of the function and what it calls), Triton version and GPU model, so an edited
kernel, another Triton or another card starts afresh. A pick is only a speed choice (every candidate computes the
same result), so a stale or lost entry costs time, never correctness; any I/O or parse problem is logged and ignored.
Writes replace the file atomically, merging what other processes wrote meanwhile.

MEMATTN_AUTOTUNE_CACHE=0 turns it off (the benchmarks do, to time every candidate); MEMATTN_CACHE_DIR moves it
(default ``~/.cache/memattn``).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile

from attn_compiler import config

log = logging.getLogger("attn_compiler")


def enabled() -> bool:
    return config.read("MEMATTN_AUTOTUNE_CACHE") == "1" and not config.interpret()


def cache_dir() -> str:
    return config.cache_dir()


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    import torch
    return torch.cuda.get_device_name(index)


def _config_record(cfg) -> dict:
    return {"kwargs": dict(cfg.kwargs), "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def _matches(cfg, rec: dict) -> bool:
    return (dict(cfg.kwargs) == rec.get("kwargs") and cfg.num_warps == rec.get("num_warps")
            and cfg.num_stages == rec.get("num_stages"))


class DiskTuning:
    """The disk side of one autotuned kernel: ``fn`` the raw JIT function, ``key`` the autotuner's key names."""

    def __init__(self, name: str, fn, key: list):
        self.name, self.fn, self.key = name, fn, list(key)
        self._tables: dict = {}      # file path -> {key string: config record}, as last read or written
        self._seen: dict = {}        # id(autotuner) -> the size of its cache when last looked at

    # the key and the file ------------------------------------------------------------------------------------
    def key_of(self, named: dict) -> tuple[str, str] | None:
        """(file path, key string) for a call's named arguments (positional and constexpr alike), or None when
        the call is not on a CUDA device."""
        device = next((v.device for v in named.values() if hasattr(v, "dtype") and hasattr(v, "device")), None)
        if device is None or device.type != "cuda":
            return None
        import triton
        space = "|".join([self.name, triton.__version__, self.fn.cache_key, _device_name(device.index or 0)])
        digest = hashlib.sha256(space.encode()).hexdigest()[:24]
        path = os.path.join(cache_dir(), f"autotune-{self.name}-{digest}.json")
        values = [repr(named[k]) for k in self.key if k in named]
        values += [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
        return path, "|".join(values)

    def _table(self, path: str) -> dict:
        if path not in self._tables:
            self._tables[path] = self._read(path)
        return self._tables[path]

    @staticmethod
    def _read(path: str) -> dict:
        try:
            with open(path) as f:
                table = json.load(f)
            return table if isinstance(table, dict) else {}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.debug("memattn: autotune cache %s unreadable (%s); ignored", path, e)
            return {}

    def _write(self, path: str, key: str, rec: dict) -> None:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            table = self._read(path)     # what other processes wrote since this one last looked
            table[key] = rec
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".autotune-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(table, f, indent=0, sort_keys=True)
            os.replace(tmp, path)
            self._tables[path] = table
        except OSError as e:
            log.debug("memattn: autotune cache %s not written (%s)", path, e)

    # the two hooks -------------------------------------------------------------------------------------------
    def prune(self, prune_fn):
        """``prune_fn`` (the autotuner's early prune) that returns the pick on disk alone when there is one."""
        @functools.wraps(prune_fn)
        def pruned(configs, named_args, **kwargs):
            kept = prune_fn(configs, named_args, **kwargs)
            if len(kept) < 2 or not enabled():
                return kept
            where = self.key_of({**named_args, **kwargs})
            if where is None:
                return kept
            rec = self._table(where[0]).get(where[1])
            hit = next((c for c in kept if rec is not None and _matches(c, rec)), None)
            if hit is None:
                return kept
            log.debug("memattn: %s autotune pick from disk for %s: %s", self.name, where[1], rec)
            return [hit]
        return pruned

    def after_launch(self, tuner, args: tuple, kwargs: dict) -> None:
        """Called after a launch through ``tuner``: writes the pick of a key tuned in this call (the autotuner's
        cache grew, and its best_config is that key's pick), if any. A length and a dict lookup otherwise."""
        size, before = len(tuner.cache), self._seen.get(id(tuner), 0)
        if size == before:
            return
        self._seen[id(tuner)] = size
        if size < before or not enabled():  # a cleared cache (tests force configs that way): nothing was tuned
            return
        where = self.key_of({**dict(zip(self.fn.arg_names, args)), **kwargs})
        if where is None:
            return
        rec = _config_record(tuner.best_config)
        if self._table(where[0]).get(where[1]) != rec:
            self._write(where[0], where[1], rec)
