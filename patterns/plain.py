"""Plain attention: softmax(q k^T) v, spelled with any matmul. Every spelling lowers to ``aten.bmm`` (or
``aten.baddbmm``) between view/permute/expand chains that attn_compiler/layout.py sees through.
"""
import torch

aten = torch.ops.aten

QK_MATMULS = (aten.bmm.default, aten.baddbmm.default)
PV_MATMULS = (aten.bmm.default,)
SOFTMAX_OPS = (aten._softmax.default, aten.softmax.int, aten._safe_softmax.default)


def softmax_dim(node):
    return node.args[1]


# Spellings (q, k, v are [B, H, S, D]); tests and docs use them.
def matmul_at(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v


def matmul_fn(q, k, v):
    return torch.matmul(torch.nn.functional.softmax(torch.matmul(q, k.transpose(-1, -2)), dim=-1), v)


def einsum(q, k, v):
    p = torch.einsum("bhqd,bhkd->bhqk", q, k).softmax(-1)
    return torch.einsum("bhqk,bhkd->bhqd", p, v)


def bmm_3d(q, k, v):
    b, h, s, d = q.shape
    q3, k3, v3 = (t.reshape(b * h, t.shape[2], t.shape[3]) for t in (q, k, v))
    out = torch.bmm(torch.bmm(q3, k3.transpose(1, 2)).softmax(dim=-1), v3)
    return out.view(b, h, s, v.shape[-1])


def bshd(q, k, v):
    """Inputs given as [B, S, H, D] by transposing first, as most model code does."""
    qb, kb, vb = (t.transpose(1, 2) for t in (q, k, v))  # BHSD -> BSHD
    q2, k2, v2 = (t.transpose(1, 2) for t in (qb, kb, vb))  # back, through non-contiguous views
    return torch.softmax(q2 @ k2.transpose(-2, -1), -1) @ v2


SPELLINGS = {"matmul_at": matmul_at, "matmul_fn": matmul_fn, "einsum": einsum, "bmm_3d": bmm_3d, "bshd": bshd}


def check_site(name, site, q, k, v) -> None:
    """What a rewritten site of SPELLINGS[name] must say (tests)."""
    assert "matmul" in site.pattern, site.pattern
