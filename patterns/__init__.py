"""The pattern families, one file each. ``FAMILIES`` lists them; the matcher (attn_compiler/match.py) and the tests
iterate it, so adding a family is one file here, one entry in FAMILIES, and its tests.

A family file exports what it owns, under these names (each optional):

    SCORE_HANDLERS   {aten op: handler(node, chain_arg, st)}: an op between the QK^T matmul and the softmax,
                     folded into the walk's ScoreState (common.py) or refused with ``Reject(reason)``
    SCORE_OPERANDS   {aten op: argument indices}: which of an op's arguments the scores may flow through (default:
                     every tensor argument)
    PROB_HANDLERS    {aten op: handler(node, st) -> nodes taken}: an op between the softmax and the PV matmul; the
                     last node taken carries the chain on
    finish(st, m_size, n_size)
                     after the walk, with the whole chain seen: facts that need all of it (the causal flag)
    align_kv(q_factors, kv_factors, head_pos, what), group_ratio(k_group, v_group, st)
                     how k and v's heads line up with q's (one family: GQA)
    FUSED_SITES      {aten op: describe(node) -> (reason, flags, shapes)}: a fused attention call, reported as a
                     site left alone with what it was given (SDPA)
    SPELLINGS        {name: fn(q, k, v, *extra)}: eager spellings of the family, compiled by the tests
    example_args(name, q, k, v)
                     the arguments of SPELLINGS[name] built from [B, H, S, D] q, k, v (default: (q, k, v))

``plain`` is the anchor: the softmax ops and the matmuls every site starts and ends at.
"""
from __future__ import annotations

from . import causal, dropout, gqa, masked, plain, scaled, sdpa, softcap

FAMILIES = (plain, scaled, masked, softcap, causal, dropout, gqa, sdpa)

QK_MATMULS = plain.QK_MATMULS
PV_MATMULS = plain.PV_MATMULS
SOFTMAX_OPS = plain.SOFTMAX_OPS
softmax_dim = plain.softmax_dim


def name(family) -> str:
    return family.__name__.rsplit(".", 1)[-1]


def _merged(attr: str) -> dict:
    table: dict = {}
    for family in FAMILIES:
        for op, handler in getattr(family, attr, {}).items():
            if op in table:
                raise ValueError(f"{op} is claimed by two pattern families (the second: {name(family)})")
            table[op] = handler
    return table


def _one(attr: str):
    owners = [family for family in FAMILIES if hasattr(family, attr)]
    if len(owners) != 1:
        raise ValueError(f"{attr} must be defined by exactly one pattern family, found {[name(f) for f in owners]}")
    return getattr(owners[0], attr)


SCORE_HANDLERS = _merged("SCORE_HANDLERS")
SCORE_OPERANDS = _merged("SCORE_OPERANDS")
PROB_HANDLERS = _merged("PROB_HANDLERS")
FUSED_SITES = _merged("FUSED_SITES")
FINISHERS = tuple(family.finish for family in FAMILIES if hasattr(family, "finish"))
align_kv = _one("align_kv")
group_ratio = _one("group_ratio")


def finish(st, m_size, n_size) -> None:
    for fn in FINISHERS:
        fn(st, m_size, n_size)


def family(family_name: str):
    """The family module called ``family_name`` (tests that check one family's particulars)."""
    for f in FAMILIES:
        if name(f) == family_name:
            return f
    raise ValueError(f"no pattern family {family_name!r}; the families are {[name(f) for f in FAMILIES]}")


def spellings():
    """(family name, spelling name, fn, example_args) for every spelling of every family."""
    out = []
    for f in FAMILIES:
        args = getattr(f, "example_args", lambda _name, q, k, v: (q, k, v))
        for spelling, fn in getattr(f, "SPELLINGS", {}).items():
            out.append((name(f), spelling, fn, args))
    return out
