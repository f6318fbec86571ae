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


align_kv = align   # the matcher's hook (patterns/__init__.py)


def group_ratio(k_group, v_group, st) -> object:
    """The op's GQA argument from the head groups align found for k and v: 1 (no repeat), "GQA" or "MQA"."""
    if (k_group is None) != (v_group is None) or (
            k_group is not None and not known_eq(k_group.size, v_group.size)):
        raise Reject("k and v are repeated to the query heads differently")
    if k_group is None:
        return 1
    st.tag("gqa")
    return "MQA" if k_group.broadcast else "GQA"


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


def example_args(name, q, k, v):
    """Half as many k/v heads as query heads (one when there is one query head)."""
    hkv = max(1, q.shape[1] // 2)
    return q, k[:, :hkv], v[:, :hkv]


def check_site(name, site, q, k, v) -> None:
    """What a rewritten site of SPELLINGS[name] must say (tests), for example_args's k and v."""
    hkv, h = k.shape[1], q.shape[1]
    assert ("gqa" in site.pattern) == (hkv != h), site.pattern
    assert site.flags["gqa"] == ("MQA" if hkv == 1 and h > 1 else "GQA" if hkv != h else 1), site.flags
