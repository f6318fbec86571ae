"""The record of one attention site: what was matched, where, what was decided, and why."""
from __future__ import annotations

import dataclasses
import functools
import os
import re
import sys
from typing import Any, Optional

import torch
import torch.fx as fx



class Reject(Exception):
    """Raised by the matcher when a candidate cannot be proven equivalent; the message is the report's reason.
    ``pattern``, ``flags`` and ``shapes``: what the report shows of a site left alone by design (a fused call)."""

    def __init__(self, reason: str, pattern: str = "softmax", flags: Optional[dict] = None,
                 shapes: Optional[dict] = None):
        super().__init__(reason)
        self.pattern, self.flags, self.shapes = pattern, flags or {}, shapes or {}


@dataclasses.dataclass
class Site:
    index: int
    status: str = "left"                 # "rewritten" | "left"
    kernel: Optional[str] = None         # "prefill" | "decode" | "prefill/decode" (by query length) | None
    reason: Optional[str] = None         # why it was left alone
    pattern: str = ""                    # families that matched, e.g. "matmul+scaled+masked(bool)+causal+dropout"
    location: str = "<unknown>"          # user's file:line of the softmax
    source_line: str = ""
    scores_bytes: Any = 0                # sympy expression: bytes of the n^2 tensors the rewrite removes
    shapes: dict = dataclasses.field(default_factory=dict)   # q/k/v/out shapes with symbols, as strings
    flags: dict = dataclasses.field(default_factory=dict)    # scale, causal, mask kind, dropout, gqa ratio, ...
    cache: Optional[str] = None          # "concat" | "in-place" | None: where K/V come from (attn_compiler/kv_cache.py)
    cache_copy_bytes: Any = 0            # sympy: bytes a concat cache copies per step (0 otherwise)
    graph_index: int = 0
    nodes: list = dataclasses.field(default_factory=list)    # names of the graph nodes the site replaced

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["scores_bytes"] = str(self.scores_bytes)
        d["cache_copy_bytes"] = str(self.cache_copy_bytes)
        return d


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)')


_TORCH = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


@functools.lru_cache(maxsize=None)
def _backend_folders() -> tuple:
    """torch's folder and this package's (codegen/ and patterns/ too, wherever they are installed)."""
    import attn_compiler.codegen
    import attn_compiler.patterns
    packages = (attn_compiler, attn_compiler.codegen, attn_compiler.patterns)
    return (_TORCH,) + tuple(os.path.dirname(os.path.abspath(pkg.__file__)) + os.sep for pkg in packages)


def _in(path: str, folders: tuple) -> bool:
    return os.path.abspath(path).startswith(folders)


def user_location(node: fx.Node) -> tuple[str, str]:
    """(file:line, source line) of the innermost frame of model code in a node's stack trace: torch's own frames
    are skipped (torch.set_default_device's mode puts torch/utils/_device.py innermost in every traced op)."""
    trace = node.meta.get("stack_trace") or ""
    frames = _FRAME.findall(trace)
    if not frames:
        return "<unknown>", ""
    path, line, _fn, code = next((f for f in reversed(frames) if not _in(f[0], (_TORCH,))), frames[-1])
    return f"{path}:{line}", code.strip()


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning raised by the caller of this function point at the innermost
    frame of the user's own code (the call that compiled), past torch's and this package's frames."""
    frame, level = sys._getframe(1), 1
    while frame is not None and _in(frame.f_code.co_filename, _backend_folders()):
        frame, level = frame.f_back, level + 1
    return level if frame is not None else 2
