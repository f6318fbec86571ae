"""Dropout on the probabilities (training). The kernel drops with its own counter-based RNG seeded from the
global generator, with eager's keep-probability scaling; which elements drop differs from eager's draw, the
distribution does not."""
import operator

import torch
import torch.nn.functional as F

from attn_compiler.site import Reject

from .common import ScoreState

aten = torch.ops.aten


def on_native_dropout(node):
    """Returns (p, next chain node) for native_dropout(x, p, train); the mask output must be unused."""
    p, train = node.args[1], node.args[2]
    if not isinstance(p, (int, float)):
        # Dynamo with dynamic=True (specialize_float=False) passes float attributes as run-time tensors
        raise Reject("the dropout probability is a run-time value (a float made dynamic by Dynamo), not a constant")
    p = float(p)
    outs = list(node.users)
    firsts = [u for u in outs if u.target is operator.getitem and u.args[1] == 0]
    others = [u for u in outs if u not in firsts]
    if len(firsts) != 1 or others:
        raise Reject("the dropout mask is used elsewhere")
    if train is False or train is None:
        p = 0.0
    if not 0.0 <= p < 1.0:
        raise Reject(f"dropout probability {p} is not in [0, 1)")
    return p, firsts[0]


def on_dropout(node, st: ScoreState) -> list:
    """The probabilities' dropout: its p goes to the kernel. Returns the nodes it takes (the last one carries the
    chain on)."""
    p, after = on_native_dropout(node)
    if p > 0:
        if st.dropout_p > 0:
            raise Reject("dropout applied twice to the probabilities")
        st.dropout_p = p
        st.tag("dropout")
    return [node, after]


PROB_HANDLERS = {aten.native_dropout.default: on_dropout}


def train_dropout(q, k, v, p=0.1, training=True):
    s = q @ k.transpose(-2, -1) / q.size(-1) ** 0.5
    return F.dropout(torch.softmax(s, -1), p, training) @ v


SPELLINGS = {"train_dropout": train_dropout}


def example_args(name, q, k, v):
    """In eval mode: a comparison with eager needs the same result (training dropout has tests of its own)."""
    return q, k, v, 0.3, False


def check_site(name, site, q, k, v) -> None:
    """What a rewritten site of SPELLINGS[name] must say (tests): eval-mode dropout is no dropout."""
    assert site.flags["dropout_p"] == 0.0, site.flags
