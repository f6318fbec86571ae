"""The embedded GPT end to end, and the demo command."""
import re
import subprocess
import sys

import pytest
import torch

from attn_compiler.models import GPT, GPTConfig
from helpers import check_model


class Logits(torch.nn.Module):
    """Wraps the GPT so its float output is what check_model compares (token ids are not differentiable)."""

    def __init__(self, gpt, idx):
        super().__init__()
        self.gpt = gpt
        self.register_buffer("idx", idx)

    def forward(self, x):
        return self.gpt(self.idx) * x


@pytest.mark.parametrize("mask,kv_heads,dynamic", [("tril", 4, False), ("tril", 2, True), ("buffer", 4, False)])
def test_gpt_training_matches_eager(mask, kv_heads, dynamic):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab=64, block=64, n_layer=2, n_head=4, n_kv_head=kv_heads, d_model=32, mask=mask)
    idx = torch.randint(0, 64, (2, 37))
    model = Logits(GPT(cfg), idx)
    # eval mode: with dynamic=True Dynamo turns the float dropout attribute into a run-time value (see below)
    report = check_model(model, [torch.ones(())], torch.float32, dynamic=dynamic, rewritten=2, train=False)
    import attn_compiler.models as models_mod
    line = next(i for i, text in enumerate(open(models_mod.__file__), 1) if "F.softmax(att" in text)
    for site in report.sites:
        assert site.location.endswith(f"attn_compiler/models.py:{line}")  # the user's softmax line
        # a causal mask built in the graph is proven; one read from a buffer is data, passed as a tensor
        assert site.flags["causal"] == (mask == "tril")
        assert site.flags["bool_masks"] == (mask == "buffer")
        assert site.flags["gqa"] == ("GQA" if kv_heads < 4 else 1)


def test_demo_command():
    out = subprocess.run([sys.executable, "-m", "attn_compiler", "demo", "--seq", "64", "--layers", "2",
                          "--d-model", "32", "--heads", "4", "--kv-heads", "2", "--steps", "1"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "2 attention site(s), 2 rewritten, 0 left alone" in out.stdout
    errors = re.search(r"against fp64: memattn (\S+), eager (\S+), allowed (\S+) \(ok\)", out.stdout)
    assert errors, out.stdout
    err, eager_err, allowed = map(float, errors.groups())
    assert err <= allowed and allowed < 1e-2, errors.group(0)   # fp32 logits of O(1): a real bound
    assert re.search(r"ratio\s+\d+\.\d+\s+\d+\.\d+", out.stdout), out.stdout


def test_demo_exits_non_zero_when_memattn_differs_from_eager(monkeypatch, capsys):
    """Logits off by 1e-3 (what a wrong mask or scale gives) fail the demo: exit code 1 and MISMATCH printed."""
    from attn_compiler import __main__ as cli
    real = torch.compile

    def off(model, **kw):
        compiled = real(model, **kw)
        return lambda *a: compiled(*a) + 1e-3
    monkeypatch.setattr(torch, "compile", off)
    code = cli.main(["demo", "--seq", "16", "--layers", "1", "--d-model", "32", "--heads", "2", "--kv-heads", "2",
                     "--steps", "0", "--device", "cpu"])
    assert code == 1 and "MISMATCH" in capsys.readouterr().out


def test_dynamic_float_attributes_stay_constants():
    """Dynamo (specialize_float=False) lifts float attributes (cfg.dropout, LayerNorm eps) to tensors under
    dynamic=True; the lowering keeps the value Dynamo memoised for them, so the site is still rewritten."""
    cfg = GPTConfig(vocab=64, block=64, n_layer=1, n_head=4, n_kv_head=4, d_model=32)
    model = Logits(GPT(cfg), torch.randint(0, 64, (2, 17)))
    report = check_model(model, [torch.ones(())], torch.float32, dynamic=True, rewritten=1, train=True)
    assert report.sites[0].flags["dropout_p"] == 0.0
