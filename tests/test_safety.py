"""Negative tests: when equivalence is not proven the site is left alone, with the reason, and results are eager's."""
import math

import pytest
import torch

from helpers import check_against_eager


def qkv(s=17, d=16, b=2, h=4):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(b, h, s, d, generator=g) for _ in range(3)]


def _left(fn, inputs, reason_part, rewritten=0, left=1):
    report = check_against_eager(fn, inputs, torch.float32, rewritten=rewritten, left=left)
    reasons = [s.reason for s in report.left]
    assert any(reason_part in r for r in reasons), reasons
    return report


def test_probabilities_returned():
    def fn(q, k, v):
        p = torch.softmax(q @ k.transpose(-2, -1), -1)
        return p @ v + p.sum()  # p read again: it must exist, nothing to save

    _left(fn, qkv(), "also used")


def test_scores_used_elsewhere():
    def fn(q, k, v):
        s = q @ k.transpose(-2, -1) / 4
        return torch.softmax(s, -1) @ v + s.mean()

    _left(fn, qkv(), "also used")


def test_softmax_over_query_axis():
    def fn(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1), dim=-2) @ v

    _left(fn, qkv(), "not the key axis")


def test_probabilities_scaled_by_a_head_mask():
    def fn(q, k, v, head_mask):
        return (torch.softmax(q @ k.transpose(-2, -1), -1) * head_mask) @ v

    _left(fn, qkv() + [torch.rand(1, 4, 1, 1)], "before the PV matmul")


def test_a_0d_scale_read_from_a_buffer_is_data():
    """torch.tensor(d).rsqrt() is part of the program (a literal and a size: folded into the scale); the same
    0-d value read from a module buffer is data the user may change between calls: left alone."""
    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("d", torch.tensor(16.0))

        def forward(self, q, k, v):
            return torch.softmax((q @ k.transpose(-2, -1)) * self.d.rsqrt(), -1) @ v

    _left(Attn(), qkv(), "multiplied by a tensor")


def test_scale_by_a_learned_tensor():
    temp = torch.tensor(0.7)

    def fn(q, k, v, t):
        return torch.softmax((q @ k.transpose(-2, -1)) * t, -1) @ v

    _left(fn, qkv() + [temp], "multiplied by a tensor")


def test_tiled_kv_heads_are_not_grouped_heads():
    """Tiling kv heads with a broadcast pairs query head h with kv head h % Hkv; the kernel's grouping is
    h // ratio, so this must not be folded."""
    q = qkv(h=4)[0]
    k, v = qkv(h=2)[1:]

    def tile(x):
        b, h, s, d = x.shape
        return x[:, None].expand(b, 2, h, s, d).reshape(b, 2 * h, s, d)

    def fn(q, k, v):
        return torch.softmax(q @ tile(k).transpose(-2, -1), -1) @ tile(v)

    _left(fn, [q, k, v], "tiled")


def test_repeat_is_read_as_a_full_tensor():
    """k.repeat() is a real copy in the graph: the site reads the repeated tensor as plain heads (correct, no
    grouping claimed)."""
    q = qkv(h=4)[0]
    k, v = qkv(h=2)[1:]

    def fn(q, k, v):
        return torch.softmax(q @ k.repeat(1, 2, 1, 1).transpose(-2, -1), -1) @ v.repeat(1, 2, 1, 1)

    report = check_against_eager(fn, [q, k, v], torch.float32)
    assert report.sites[0].flags["gqa"] == 1


def test_in_place_update_between_the_matmuls():
    def fn(q, k, v):
        v = v.clone()
        s = q @ k.transpose(-2, -1)
        v.mul_(2)
        return torch.softmax(s, -1) @ v

    _left(fn, qkv(), "mutates")


def test_scale_after_the_mask_is_folded_into_the_bias_and_fill():
    """(s + bias) / 3 and where(keep, s, fill) * 0.5: the scale moves onto the bias and the fill (Falcon ALiBi)."""
    def fn(q, k, v, bias):
        return torch.softmax((q @ k.transpose(-2, -1) + bias) / 3, -1) @ v

    report = check_against_eager(fn, qkv() + [torch.randn(17, 17)], torch.float32)
    assert report.sites[0].flags["bias"] == 1 and report.sites[0].flags["scale"] == pytest.approx(1 / 3)

    def fn2(q, k, v, keep):
        return torch.softmax((q @ k.transpose(-2, -1)).masked_fill(~keep, -1e4) * 0.5, -1) @ v

    keep = torch.rand(17, 17) > 0.3
    keep[:, 0] = True
    report = check_against_eager(fn2, qkv() + [keep], torch.float32)
    assert report.sites[0].flags["bool_masks"] == 1


def test_scale_after_the_mask_by_a_tensor():
    def fn(q, k, v, bias, t):
        return torch.softmax((q @ k.transpose(-2, -1) + bias) * t, -1) @ v

    _left(fn, qkv() + [torch.randn(17, 17), torch.tensor(0.3)], "multiplied by a tensor")


def test_log_softmax_is_not_attention():
    def fn(q, k, v):
        return torch.log_softmax(q @ k.transpose(-2, -1), -1) @ v

    report = check_against_eager(fn, qkv(), torch.float32, rewritten=0, left=0)
    assert report.sites == []


def test_two_layers_counted_exactly_and_one_left():
    """One graph, three softmaxes: two attentions and one whose probabilities are also returned."""
    def fn(q, k, v):
        a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(16), -1) @ v
        b = torch.softmax(a @ k.transpose(-2, -1), -1) @ v
        p = torch.softmax(b @ q.transpose(-2, -1), -1)
        return p @ v + p.mean()

    report = check_against_eager(fn, qkv(), torch.float32, rewritten=2, left=1)
    assert [s.status for s in report.sites] == ["rewritten", "rewritten", "left"]
