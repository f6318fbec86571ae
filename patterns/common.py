"""State shared by the pattern families while the matcher walks one candidate site.

The matcher (attn_compiler/match.py) walks from the QK^T matmul to the softmax and from the softmax to the PV
matmul; every op on the way is handed to the family that owns it (a handler table per family file), which folds
it into this state or raises Reject with the reason the report will show.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
import torch.fx as fx

from attn_compiler.layout import Dims, val
from attn_compiler.site import Reject

aten = torch.ops.aten


@dataclasses.dataclass
class Operand:
    """A tensor applied to the scores (bias or boolean mask), with the score dims at the point it was applied."""
    node: fx.Node
    dims: Dims
    coef: Any = 1.0          # bias multiplier (baddbmm's beta)
    keep: bool = True        # boolean masks: True keeps the score where the mask is True
    fill: float = float("-inf")
    dtype: Any = None        # an integer or bool bias: the float dtype the add promotes it to (cast first)


@dataclasses.dataclass
class ScoreState:
    dims: Dims                                    # current score dims as factor lists over atoms b*, m, n
    scale: list = dataclasses.field(default_factory=list)         # factors applied before any tanh
    softcap_post: Optional[list] = None           # factors applied after tanh (None: no softcap)
    biases: list = dataclasses.field(default_factory=list)        # additive Operands
    masks: list = dataclasses.field(default_factory=list)         # boolean Operands
    families: list = dataclasses.field(default_factory=list)
    dropout_p: float = 0.0
    safe_softmax: bool = False
    causal: Optional[Any] = None                  # proven causal offset (int or FX node), set by causal.py
    causal_note: str = ""

    def tag(self, family: str) -> None:
        if family not in self.families:
            self.families.append(family)


def fold_factors(factors, start=1.0) -> float:
    """Multiply out ('mul'|'div', value) factors into a float.

    A factor computed from shapes (1/sqrt(d) of a symbolic head dim) is specialised to its value with a guard: the
    kernel takes the scale as a constant, and a new head dim recompiles. A factor read from tensor data at run time
    (an unbacked scalar) cannot be, and the site is left alone.
    """
    out = float(start)
    for kind, v in factors:
        if isinstance(v, fx.Node):
            sym = val(v)
            try:
                v = float(sym)  # guards on the shape expression
            except Exception:
                raise Reject(f"the scale {v.name} is a value read from a tensor at run time, not a constant")
        out = out * v if kind == "mul" else out / v
    return out
