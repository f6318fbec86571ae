"""Every environment variable memattn reads, in one place; the README's table lists the same ones.

Each is read when asked (not at import), so a test or a launcher can set one at run time. A value outside the
allowed ones raises ValueError naming them; the log level is the exception, which warns and is ignored instead
(it is read while ``import attn_compiler`` runs, where an error would take the user's program down for a typo)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Variable:
    name: str
    default: str
    allowed: Optional[tuple]   # the values it takes; None for free text (a path)
    meaning: str
    fold_case: bool = False   # compared stripped and lower-case ("INFO " is "info")


VARIABLES = {v.name: v for v in (
    Variable("MEMATTN_LOG", "", ("", "debug", "info", "warning", "error"),
             "a stderr handler on the attn_compiler logger at this level", fold_case=True),
    Variable("MEMATTN_CACHE_DIR", "", None,
             "where autotune picks are kept across processes (unset: ~/.cache/memattn)"),
    Variable("MEMATTN_AUTOTUNE_CACHE", "1", ("0", "1"), "0: neither read nor write autotune picks on disk"),
    Variable("MEMATTN_TMA", "auto", ("auto", "0", "1"),
             "K/V tiles through TMA descriptors: auto (compute capability >= 9), 0 off, 1 wherever the layout "
             "allows (the interpreter included)"),
    Variable("MEMATTN_PDL", "1", ("0", "1"),
             "0: the split-KV decode's combine is not a programmatic dependent launch on Hopper"),
    Variable("MEMATTN_WS", "0", ("0", "1"), "1: warp-specialised K/V loop in the prefill forward (TMA only)"),
    Variable("MEMATTN_CAUSAL_LOOP", "", ("", "split", "one"),
             "how the causal prefill forward walks its K/V tiles (unset: chosen by head dim)"),
    Variable("TRITON_INTERPRET", "", None,
             "Triton's own; 1: kernels on CPU tensors run in Triton's interpreter (kernels='triton' on a CPU)"),
)}


def read(name: str) -> str:
    """The variable's value, or its default when unset; ValueError when it is not one of the allowed values."""
    var = VARIABLES[name]
    value = os.environ.get(name)
    if value is None:
        return var.default
    if var.fold_case:
        value = value.strip().lower()
    if var.allowed is not None and value not in var.allowed:
        shown = ", ".join(repr(a) for a in sorted(a for a in var.allowed if a))
        raise ValueError(f"{name}={value!r}: expected one of {shown}" + (" or unset" if "" in var.allowed else ""))
    return value


def interpret() -> bool:
    """Triton kernels on CPU tensors run in Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def cache_dir() -> str:
    return read("MEMATTN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "memattn")
