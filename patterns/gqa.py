"""Grouped-query / multi-query attention: k and v have fewer heads and are repeated to the query heads with
HF's ``repeat_kv`` (expand + reshape), ``repeat_interleave`` or a plain expand. The repeat is folded away: the
kernel reads kv head h // (H / Hkv) for query head h, and no repeated K/V tensor is made."""
import torch

from attn_compiler.layout import Factor, known_eq
from attn_compiler.site import Reject


def align(q_factors, kv_factors, head_pos: int, what: str):
    """Match the batch factors of k or v against those of q.

    Returns one entry per q factor: a Factor of the kv base (same size, or broadcast) or ("group", Factor) for the
    head position when kv heads are repeated (kv head = h // ratio).
    """
    out, j = [], 0
    for i, fq in enumerate(q_factors):
        group, total = [], 1
        if i == len(q_factors) - 1:
            # The matmul needs equal batch sizes at run time, and every earlier group was proven equal, so the
            # remaining factors multiply to this one's size even when sympy cannot show it (s1 vs s2*(s1//s2)).
            group = list(kv_factors[j:])
            j = len(kv_factors)
            if not group:
                raise Reject(f"{what}'s batch/head dims do not line up with q's")
        while not (group and (i == len(q_factors) - 1 or known_eq(total, fq.size))):
            if j >= len(kv_factors):
                raise Reject(f"{what}'s batch/head dims do not line up with q's")
            group.append(kv_factors[j])
            total = total * kv_factors[j].size
            j += 1
        if len(group) == 1:
            f = group[0]
            if f.broadcast and i == head_pos:  # one kv head expanded to all query heads: MQA
                out.append(("group", Factor(None, 1)))
            else:
                out.append(f)
        elif len(group) == 2 and i == head_pos and not group[0].broadcast and group[1].broadcast:
            out.append(("group", group[0]))
        elif len(group) == 2 and group[0].broadcast and not group[1].broadcast:
            raise Reject(f"{what} heads are tiled (kv head = h % Hkv, as torch.repeat gives), "
                         "not grouped (h // ratio)")
        else:
            raise Reject(f"{what}'s batch/head dims do not line up with q's")
    if j != len(kv_factors):
        raise Reject(f"{what}'s batch/head dims do not line up with q's")
    return out


def repeat_kv(x, n_rep):
    """HF transformers' spelling."""
    b, hkv, s, d = x.shape
    if n_rep == 1:
        return x
    return x[:, :, None, :, :].expand(b, hkv, n_rep, s, d).reshape(b, hkv * n_rep, s, d)


def hf_repeat_kv(q, k, v):
    rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, rep), repeat_kv(v, rep)
    return torch.softmax(q @ k.transpose(2, 3) * q.shape[-1] ** -0.5, -1) @ v


def repeat_interleave(q, k, v):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return torch.softmax(q @ k.transpose(2, 3), -1) @ v


SPELLINGS = {"hf_repeat_kv": hf_repeat_kv, "repeat_interleave": repeat_interleave}
