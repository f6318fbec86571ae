"""Dropout on the probabilities (training). The kernel drops with its own counter-based RNG seeded from the
global generator, with eager's keep-probability scaling; which elements drop differs from eager's draw, the
distribution does not."""
import operator

import torch
import torch.nn.functional as F

from attn_compiler.site import Reject

aten = torch.ops.aten

DROPOUT_OPS = (aten.native_dropout.default,)


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


def train_dropout(q, k, v, p=0.1, training=True):
    s = q @ k.transpose(-2, -1) / q.size(-1) ** 0.5
    return F.dropout(torch.softmax(s, -1), p, training) @ v


SPELLINGS = {"train_dropout": train_dropout}
