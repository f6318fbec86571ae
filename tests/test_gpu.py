"""End to end on a CUDA device: compiled models run the Triton kernels (no fallback) and match eager."""
import pytest
import torch

import attn_compiler
from attn_compiler.codegen import dispatch
from attn_compiler.models import GPT, GPTConfig
from attn_compiler import patterns
from helpers import check_against_eager, check_model

pytestmark = pytest.mark.gpu

SPELLINGS = patterns.spellings()
scaled = patterns.family("scaled")   # one spelling for the tests of other things


@pytest.fixture(autouse=True)
def _no_fallbacks():
    dispatch.fallbacks.clear()
    yield
    assert not dispatch.fallbacks, f"the Triton kernel fell back: {dispatch.fallbacks}"


def _qkv(s, d, h=8, hkv=8, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randn(2, n, s, d, device="cuda", generator=g, dtype=torch.float32)
            for n in (h, hkv, hkv)]


@pytest.mark.parametrize("s,d", [(1, 64), (300, 128)])
@pytest.mark.parametrize("family,name,fn,example_args", SPELLINGS, ids=[f"{f}.{n}" for f, n, _, _ in SPELLINGS])
def test_spellings_on_cuda(family, name, fn, example_args, s, d):
    if name == "einsum" and s == 1:
        pytest.skip("einsum contracts a single key without a matmul (tested on CPU)")
    args = [t.cuda() if isinstance(t, torch.Tensor) else t for t in example_args(name, *_qkv(s, d))]
    check_against_eager(fn, args, torch.bfloat16, dynamic=(s == 300))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("s,d", [(1, 64), (127, 64), (513, 80), (257, 256)])
def test_dtypes_and_head_dims_on_cuda(s, d, dtype):
    check_against_eager(scaled.div_scores, _qkv(s, d), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_masks_on_cuda(dtype):
    q, k, v = _qkv(200, 64)
    keep = torch.rand(2, 1, 200, 200, device="cuda") > 0.3
    keep[..., 0] = True
    for name, fn in patterns.family("masked").SPELLINGS.items():
        extra = torch.where(keep, 0.0, -1e4) if name == "additive" else keep
        check_against_eager(lambda q, k, v, m, fn=fn: fn(q, k, v, m), [q, k, v, extra], dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpt_training_on_cuda(dtype):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab=128, block=1024, n_layer=2, n_head=8, n_kv_head=2, d_model=256)
    gpt = GPT(cfg).cuda()
    idx = torch.randint(0, 128, (2, 777), device="cuda")

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt = gpt

        def forward(self, x):
            return self.gpt(idx) * x

    report = check_model(Logits(), [torch.ones((), device="cuda")], dtype, rewritten=2)
    assert all(s.flags["causal"] and s.flags["gqa"] == "GQA" for s in report.sites)


def test_inductor_inner_on_cuda():
    q, k, v = _qkv(256, 64)
    check_against_eager(scaled.div_scores, [q, k, v], torch.bfloat16, options={"inner": "inductor"})


def _merge_heads(q, k, v):
    y = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1) @ v
    b, h, n, d = y.shape
    return y.transpose(1, 2).contiguous().view(b, n, h * d)[..., :-3] * 2


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_output_in_transposed_order_on_cuda(inner):
    """The kernels write out as [Z, M, H, Dv] where the model copies it into that order (the copy is dropped)."""
    report = check_against_eager(_merge_heads, _qkv(200, 64), torch.bfloat16, options={"inner": inner})
    assert report.rewritten[0].flags["out_layout"].startswith("zmhd")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("m", [1, 300], ids=["decode", "prefill"])
def test_kernels_run_on_the_tensors_gpu_not_the_current_one(m):
    """A layer whose tensors sit on cuda:1 while cuda:0 is current (a model split over GPUs in one process): the
    kernels launch on cuda:1 (forward and backward) and match the reference computed there."""
    g = torch.Generator(device="cuda:1").manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 64, device="cuda:1", generator=g, dtype=torch.bfloat16).requires_grad_()
               for n in (m, 300, 300))
    with torch.cuda.device(0):
        out, _ = torch.ops.memattn.attention(q, k, v, None, None, None, 0.125, 0.0, False, 0, float("-inf"), True,
                                             0.0, False, "triton")
        out.float().sum().backward()
    want = torch.nn.functional.scaled_dot_product_attention(*(t.detach().float() for t in (q, k, v)), scale=0.125)
    assert out.device == torch.device("cuda:1") and q.grad.device == torch.device("cuda:1")
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)


def test_training_under_cuda_graphs_on_cuda():
    """mode="reduce-overhead": forward and backward of a rewritten site captured in CUDA graphs (no cudagraph
    skip) and replayed on new inputs each step, matching eager and the fp64 truth step by step."""
    from torch._dynamo.utils import counters
    from helpers import assert_close_to_truth
    counters.clear()
    f = torch.compile(scaled.div_scores, backend="memattn", mode="reduce-overhead")
    g = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(4):
        base = [torch.randn(2, 8, 300, 64, device="cuda", generator=g, dtype=torch.float64) for _ in range(3)]
        dout = torch.randn(2, 8, 300, 64, device="cuda", generator=g).to(torch.bfloat16)
        results = []
        for fn, dtype in ((f, torch.bfloat16), (scaled.div_scores, torch.bfloat16),
                          (scaled.div_scores, torch.float64)):
            qkv = [t.to(dtype).requires_grad_() for t in base]
            torch.compiler.cudagraph_mark_step_begin()
            out = fn(*qkv)
            out.backward(dout.to(dtype))
            results.append([out.detach().clone()] + [t.grad.clone() for t in qkv])
        for got, eager, truth in zip(*results):
            assert_close_to_truth(got, eager, truth, torch.bfloat16)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    report = attn_compiler.last_report()
    assert report.options.inner == "inductor" and len(report.rewritten) == 1
