"""Decode sites: which kernel a site gets, and where its keys and values come from.

A site whose query length is at most ``DECODE_MAX_Q`` is a decode step: its op call runs the split-KV kernel
(codegen/triton_decode.py). The dispatcher decides per call from the run-time length, so the report's kernel is
"decode" when the compile-time length proves it (a static length, or a symbolic one bounded by the threshold),
"prefill" when it proves the opposite, and "prefill/decode" when the length is symbolic and either can happen.

Cache patterns (reported, never needed for correctness: the op reads whatever K/V tensor the graph holds):
    concat    K/V are ``torch.cat([past, new], dim=seq)`` (HF DynamicCache, hand-written caches). Every step copies
              the whole cache into a new tensor: the report shows those bytes as a formula in the cache length.
    in-place  K/V are a buffer written in place before the QK^T matmul (``index_copy_``, ``cache[:, :, pos] = k``,
              ``copy_`` of a slice: HF StaticCache, gpt-fast). Nothing is copied beyond the new tokens.
"""
from __future__ import annotations

from typing import Optional

import sympy
import torch
import torch.fx as fx

from attn_compiler.analysis import tensor_bytes
from attn_compiler.codegen.dispatch import DECODE_MAX_Q
from attn_compiler.layout import val

aten = torch.ops.aten


def kernel_kind(q_len, dropout_p: float) -> str:
    if dropout_p > 0:
        return "prefill"
    if isinstance(q_len, int):
        return "decode" if q_len <= DECODE_MAX_Q else "prefill"
    node = q_len.node
    try:
        bounds = node.shape_env.bound_sympy(node.expr)
        lower, upper = bounds.lower, bounds.upper
    except Exception:
        return "prefill/decode"
    if upper.is_finite and upper <= DECODE_MAX_Q:
        return "decode"
    if lower > DECODE_MAX_Q:
        return "prefill"
    return "prefill/decode"


def _mutates(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.is_mutable:
        return False
    first = schema.arguments[0] if schema.arguments else None
    return first is not None and first.alias_info is not None and first.alias_info.is_write


def _alias_root(node: fx.Node) -> fx.Node:
    """Through views and in-place ops (which return their first argument) to the tensor that owns the storage."""
    seen = 0
    while node.op == "call_function" and seen < 16 and isinstance(node.args[0], fx.Node) and (
            _mutates(node) or (getattr(node.target, "is_view", False))):
        node = node.args[0]
        seen += 1
    return node


def _written_before(root: fx.Node, before: fx.Node, order: dict) -> bool:
    stack, seen = [root], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        for u in n.users:
            if order.get(u, 1 << 60) >= order[before]:
                continue
            if _mutates(u) and u.args and u.args[0] is n:
                return True
            if getattr(u.target, "is_view", False) and u.args and u.args[0] is n:
                stack.append(u)
    return False


def cache_pattern(k_base: fx.Node, v_base: fx.Node, qk: fx.Node) -> tuple[Optional[str], sympy.Expr]:
    """("concat" | "in-place" | None, bytes a concat cache copies per step)."""
    if k_base.target is aten.cat.default and v_base.target is aten.cat.default:
        return "concat", sympy.simplify(tensor_bytes(val(k_base)) + tensor_bytes(val(v_base)))
    order = {n: i for i, n in enumerate(qk.graph.nodes)}
    if all(_written_before(_alias_root(b), qk, order) for b in (k_base, v_base)):
        return "in-place", sympy.Integer(0)
    return None, sympy.Integer(0)
