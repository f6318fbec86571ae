"""Logit soft-capping (Gemma-2): s = cap * tanh(s / cap), taken by the kernels as a flag."""
import torch

from attn_compiler.site import Reject

from .common import ScoreState

aten = torch.ops.aten


def on_tanh(node, chain_arg: int, st: ScoreState) -> None:
    if st.softcap_post is not None or st.biases or st.masks:
        raise Reject("tanh applied to the scores twice or after a mask")
    st.softcap_post = []
    st.tag("softcap")


SCORE_HANDLERS = {aten.tanh.default: on_tanh}


CAP = 20.0  # Gemma-2's attn_logit_softcapping


def gemma2(q, k, v):
    cap = CAP
    s = q @ k.transpose(-2, -1) * q.size(-1) ** -0.5
    s = torch.tanh(s / cap) * cap
    return torch.softmax(s, -1) @ v


SPELLINGS = {"gemma2": gemma2}


def check_site(name, site, q, k, v) -> None:
    """What a rewritten site of SPELLINGS[name] must say (tests)."""
    assert "softcap" in site.pattern and site.flags["softcap"] == CAP, site.flags
