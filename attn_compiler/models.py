"""A small GPT, built in the package so the demo and tests need no downloads (random weights)."""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclasses.dataclass
class GPTConfig:
    vocab: int = 512
    block: int = 4096
    n_layer: int = 4
    n_head: int = 8
    n_kv_head: int = 8       # < n_head: grouped-query attention with HF-style repeat_kv
    d_model: int = 256
    dropout: float = 0.0
    mask: str = "tril"       # "tril": causal mask built in the graph; "buffer": sliced from a registered buffer
    attention: str = "explicit"  # softmax(QK^T)V written out (what memattn rewrites), or "sdpa" (a baseline)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.head_dim = cfg.d_model // cfg.n_head
        kv = cfg.n_kv_head * self.head_dim
        self.q = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.kv = nn.Linear(cfg.d_model, 2 * kv, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        if cfg.mask == "buffer":
            self.register_buffer("bias", torch.tril(torch.ones(cfg.block, cfg.block)).view(1, 1, cfg.block,
                                                                                            cfg.block))

    def forward(self, x):
        b, t, c = x.shape
        cfg = self.cfg
        q = self.q(x).view(b, t, cfg.n_head, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).split(cfg.n_kv_head * self.head_dim, dim=2)
        k = k.view(b, t, cfg.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(b, t, cfg.n_kv_head, self.head_dim).transpose(1, 2)
        if cfg.attention == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=cfg.dropout if self.training else 0.0,
                                               is_causal=True, enable_gqa=cfg.n_kv_head != cfg.n_head)
            return self.proj(y.transpose(1, 2).contiguous().view(b, t, c))
        rep = cfg.n_head // cfg.n_kv_head
        if rep > 1:
            k = k[:, :, None].expand(b, cfg.n_kv_head, rep, t, self.head_dim).reshape(b, cfg.n_head, t, -1)
            v = v[:, :, None].expand(b, cfg.n_kv_head, rep, t, self.head_dim).reshape(b, cfg.n_head, t, -1)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        if cfg.mask == "buffer":
            att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        else:
            keep = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            att = att.masked_fill(~keep, float("-inf"))
        att = F.dropout(F.softmax(att, dim=-1), cfg.dropout, self.training)
        y = (att @ v).transpose(1, 2).contiguous().view(b, t, c)
        return self.proj(y)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(),
                                 nn.Linear(4 * cfg.d_model, cfg.d_model))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or GPTConfig()
        self.tok = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Embedding(cfg.block, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)

    def forward(self, idx, targets=None):
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        logits = self.head(self.ln(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())
