"""Scaled scores: ``mul``/``div`` by a constant or a symbolic scalar (1/sqrt(d) of a dynamic head dim), applied to
the scores, to q or to k. Scaling of q/k is folded by attn_compiler/layout.py; this family handles the scores."""
import math

import torch

from attn_compiler.layout import scale_of
from attn_compiler.site import Reject

from .common import ScoreState, fold_factors

aten = torch.ops.aten


def on_scale(node, chain_arg: int, st: ScoreState) -> None:
    sc = scale_of(node, inplace_ok=True)
    if sc is None or sc[0] != chain_arg:
        raise Reject(f"the scores are multiplied by a tensor ({node.format_node()}), not a scalar")
    if st.biases or st.masks:
        _scale_applied_terms(st, sc[1])
    (st.softcap_post if st.softcap_post is not None else st.scale).append(sc[1])
    st.tag("scaled")


def _scale_applied_terms(st: ScoreState, factor) -> None:
    """(s + bias) * c = s * c + bias * c, and where(m, s, fill) * c = where(m, s * c, fill * c): a scale after the
    bias or mask (Falcon's ALiBi: ``(scores + alibi) * inv_norm``) moves onto those terms. c must be a nonzero
    number: 0 * -inf fills would be NaN. One computed from shapes (1/sqrt(d) of a dynamic head dim) is specialised
    with a guard, as the rewrite does for the scale; a value read from a tensor at run time cannot be."""
    kind, value = factor
    c = fold_factors([("mul", value)])  # a shape-derived value is guarded; a run-time one raises Reject
    if c == 0:
        raise Reject("the scores are scaled after a mask or bias by zero")
    c = c if kind == "mul" else 1.0 / c
    if st.softcap_post is not None:
        raise Reject("the scores are scaled after the soft-cap and a mask or bias")
    for op in st.biases:
        op.coef = op.coef * c
    for op in st.masks:
        op.fill = op.fill * c


SCORE_HANDLERS = {aten.mul.Tensor: on_scale, aten.mul.Scalar: on_scale, aten.div.Tensor: on_scale,
                  aten.div.Scalar: on_scale}


def falcon_inplace(q, k, v):
    """Falcon's spelling: the scores are scaled in place (``scores /= sqrt(d)``), then masked in place."""
    s = q @ k.transpose(-2, -1)
    s /= math.sqrt(q.size(-1))
    n = s.shape[-1]
    s.masked_fill_(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v


def mul_scores(q, k, v):
    return torch.softmax((q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1])), -1) @ v


def div_scores(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)), -1) @ v


def scale_q(q, k, v):
    return torch.softmax((q * q.size(-1) ** -0.5) @ k.transpose(-2, -1), -1) @ v


def scale_qk_split(q, k, v):
    s = q.size(-1) ** -0.25
    return torch.softmax((q * s) @ (k * s).transpose(-2, -1), -1) @ v


def softmax_fp32(q, k, v):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    return torch.softmax(s.float(), dim=-1).to(q.dtype) @ v


SPELLINGS = {"mul_scores": mul_scores, "div_scores": div_scores, "scale_q": scale_q,
             "scale_qk_split": scale_qk_split, "softmax_fp32": softmax_fp32,
             "falcon_inplace": falcon_inplace}


def check_site(name, site, q, k, v) -> None:
    """What a rewritten site of SPELLINGS[name] must say (tests): every spelling scales by 1/sqrt(d)."""
    assert "scaled" in site.pattern, site.pattern
    assert abs(site.flags["scale"] * math.sqrt(q.shape[-1]) - 1) < 1e-6, site.flags
