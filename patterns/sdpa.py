"""Fused SDPA calls: ``F.scaled_dot_product_attention`` lowered to one of ATen's fused kernels (flash, efficient,
cuDNN, the CPU flash kernel). They are attention sites the user wrote, so the report lists each with what it is
given (causal, scale, dropout, the mask's shape and bytes); the calls themselves are left as they are for now. A
fused kernel makes no n x n scores, so without a mask there is nothing for memattn to save; with one, the n x n
mask is built as a tensor before the call, and taking it into the kernels needs the mask lifted out of the graph
as code, which memattn does not do yet.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from attn_compiler.layout import constant_scalar_tensor, shape_text, val

aten = torch.ops.aten

_NAMES = ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
          "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
          "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_fused_attention_overrideable")
FUSED_OPS = tuple(getattr(aten, n).default for n in _NAMES if hasattr(aten, n))


def call_args(node: fx.Node) -> dict:
    """The call's arguments by the op's schema names (defaults filled); the mask is ``attn_mask`` whichever name
    the op gives it."""
    schema = node.target._schema
    named = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args) and not arg.kwarg_only:
            named[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            named[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            named[arg.name] = arg.default_value
    named["attn_mask"] = named.pop("attn_bias", named.get("attn_mask"))
    return named


def _bool_source(mask: fx.Node):
    """The bool mask SDPA turned into its float one (``where(keep, 0, -inf)``, as the CPU path lowers), or None."""
    if not (isinstance(mask, fx.Node) and mask.target is aten.where.self):
        return None
    keep, on, off = mask.args[:3]
    if (isinstance(keep, fx.Node) and val(keep).dtype == torch.bool and isinstance(on, fx.Node)
            and isinstance(off, fx.Node) and constant_scalar_tensor(on) == 0
            and constant_scalar_tensor(off) == float("-inf")):
        return keep
    return None


def describe(node: fx.Node) -> tuple[str, dict, dict]:
    """(the report's reason for leaving the call alone, its flags, its shapes)."""
    from attn_compiler.analysis import fmt_bytes, tensor_bytes
    a = call_args(node)
    q, k, mask = a["query"], a["key"], a["attn_mask"]
    hq, hk = val(q).shape[-3], val(k).shape[-3]
    flags = {"causal": bool(a.get("is_causal")), "scale": a.get("scale"), "dropout_p": float(a.get("dropout_p") or 0),
             "bias": 0, "bool_masks": 0, "gqa": 1 if str(hq) == str(hk) else "GQA"}
    shapes = {"q": shape_text(q), "k": shape_text(k), "v": shape_text(a["value"])}
    op = f"aten.{node.target._schema.name.split('::')[-1]}"
    if mask is None:
        return (f"a fused SDPA call ({op}): it makes no n x n tensor, so there is nothing for memattn to save; "
                "left as it is"), flags, shapes
    mask = _bool_source(mask) or mask
    m = val(mask)
    flags["bool_masks" if m.dtype == torch.bool else "bias"] = 1
    shapes["mask"] = shape_text(mask)
    dims = "[" + ", ".join(str(s) for s in m.shape) + "]"
    return (f"a fused SDPA call ({op}) given a {str(m.dtype).replace('torch.', '')} attn_mask {dims} of "
            f"{fmt_bytes(tensor_bytes(m))}, built as a tensor before the call; memattn does not yet take an SDPA "
            "call's mask into its kernels, so the call is left as it is"), flags, shapes


FUSED_SITES = {op: describe for op in FUSED_OPS}
