"""Model factories for the ``python -m attn_compiler report`` tests (the CLI imports this file by path)."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from attn_compiler.models import GPT, GPTConfig


def tiny_gpt():
    """A model only: the CLI makes token ids from its config's vocab size."""
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_kv_head=1, d_model=32, block=128, vocab=64))


class TwoGraphs(nn.Module):
    """Attention, a graph break, attention again (left alone: its probabilities are returned as well)."""

    def forward(self, q, k, v):
        a = F.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)), dim=-1) @ v
        torch._dynamo.graph_break()
        p = F.softmax(a @ k.transpose(-2, -1), dim=-1)
        return p @ v, p


def two_graphs():
    """(model, example_inputs): the CLI calls the model with these."""
    g = torch.Generator().manual_seed(0)
    return TwoGraphs(), tuple(torch.randn(1, 2, 24, 8, generator=g) for _ in range(3))


class NoTokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(x)


def no_tokens():
    """A model the CLI cannot make inputs for (no vocab size, no embedding)."""
    return NoTokens()


def broken():
    raise RuntimeError("factory exploded")
