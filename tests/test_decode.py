"""Cached decode (issue 4): the split-KV kernel (codegen/triton_decode.py) against the fp64 reference, its dispatch,
and decode sites in real generation loops (HF transformers dynamic and static caches; the gpt-fast-style loop with
a cache written in place is tests/test_hf_models.py::test_gpt_fast_prefill_and_decode).

The kernel tests run on CUDA in this process, or on a CPU-only machine under TRITON_INTERPRET=1 in a child pytest
(see tests/test_triton_prefill.py for why the variable cannot be set in this process), once with pointer loads and
once with K/V read through TMA descriptors (MEMATTN_TMA=1). The interpreter's SM count is 16 and its key tiles are
16 wide, so tiny caches are still split into several chunks, with ragged last chunks and chunks left empty by the
causal bound. The model tests run in this process on any machine (the reference path on
the CPU, the decode kernel on CUDA).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import sympy
import torch

import attn_compiler
from attn_compiler.codegen import dispatch, reference
from attn_compiler.codegen.reference import Spec
from helpers import BUDGET, eager, rel_err  # the same eager attention and error measure as prefill's

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
IN_PROCESS = CUDA or os.environ.get("TRITON_INTERPRET") == "1"
kernel_test = pytest.mark.skipif(not IN_PROCESS, reason="no CUDA: runs under TRITON_INTERPRET=1 in "
                                                        "test_kernels_interpreted_in_subprocess")
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


@pytest.mark.parametrize("tma", [False, True], ids=["pointer_loads", "tma"])
def test_kernels_interpreted_in_subprocess(tma):
    if IN_PROCESS:
        pytest.skip("kernels run in this process")
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", MEMATTN_TMA="1" if tma else "0")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "kernel", __file__]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"interpreted run failed:\n{res.stdout[-6000:]}\n{res.stderr[-2000:]}"
    assert " passed" in res.stdout and " failed" not in res.stdout, res.stdout[-2000:]


def spec(**kw) -> Spec:
    base = dict(scale=0.125, softcap=0.0, causal=False, causal_offset=0, mask_fill=float("-inf"), mask_keep=True,
                dropout_p=0.0, safe_softmax=False)
    return Spec(**{**base, **kw})


def run_case(z, h, hkv, m, n, d, dtype=F32, *, bias=None, mask=None, layout="bhsd", sp=None, cache_len=None):
    """Decode kernel vs the fp64 reference and eager; K/V are views of a larger cache buffer when cache_len."""
    from attn_compiler.codegen import autotune
    from attn_compiler.codegen import triton_decode
    sp = sp or spec()
    g = torch.Generator().manual_seed(z * 1000 + h * 100 + m * 10 + n)
    q = torch.randn(z, h, m, d, generator=g)
    total = cache_len or n
    if layout == "bshd":  # heads after the sequence axis: non-contiguous views in the op's [Z, H, N, D] order
        kb, vb = (torch.randn(z, total, hkv, d, generator=g).transpose(1, 2) for _ in range(2))
    else:
        kb, vb = (torch.randn(z, hkv, total, d, generator=g) for _ in range(2))
    k, v = kb[:, :, :n], vb[:, :, :n]
    def dev(t, dt=dtype):
        return None if t is None else t.to(DEV, dt if t.dtype.is_floating_point else t.dtype)
    truth, _ = reference.attention_forward(q.double(), k.double(), v.double(),
                                                None if bias is None else bias.double(), mask, None, sp)
    want = eager(dev(q), dev(k), dev(v), dev(bias, F32), dev(mask), None, sp)
    # fixed tiles (the autotuner is exercised by benchmarks/decode.py): 16-key tiles under the interpreter so tiny
    # caches split into several chunks, 32 on a GPU
    with autotune.force_config(16, 32 if CUDA else 16, 4, 2):
        ok, why = triton_decode.supports(dev(q), dev(k), dev(v), dev(bias, F32), dev(mask), None, sp)
        assert ok, why
        out, stats = triton_decode.forward(dev(q), dev(k), dev(v), dev(bias, F32), dev(mask), None, sp)
    assert out.shape == (z, h, m, d) and out.dtype == dtype
    assert (out.transpose(1, 2) if sp.out_layout == reference.OUT_ZMHD else out).is_contiguous(), out.stride()
    kmul, _, floor = BUDGET[dtype]  # the prefill kernel's forward budget
    err, base = rel_err(out.cpu(), truth), rel_err(want.cpu(), truth)
    assert err <= kmul * base + floor, f"decode kernel error {err:.3g} vs eager's {base:.3g} ({dtype})"
    # stats (row max, log row sum) from the same rounded inputs in fp64: only the kernel's fp32 arithmetic differs
    _, tstats = reference.attention_forward(*(t.to(dtype).double() for t in (q, k, v)),
                                            None if bias is None else bias.double(), mask, None, sp)
    fin = torch.isfinite(tstats)
    assert torch.equal(fin, torch.isfinite(stats.cpu())), "stats: inf pattern differs"
    torch.testing.assert_close(stats.cpu().double()[fin], tstats[fin], atol=1e-4, rtol=1e-4)
    return out


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@kernel_test
@pytest.mark.parametrize("n", [40, 300], ids=["one_split", "splits"])
def test_kernel_writes_the_zmhd_out_layout(n):
    """out_layout=OUT_ZMHD: both the direct write and the combine store through out's strides."""
    a = run_case(2, 8, 2, 3, n, 32, sp=spec(out_layout=reference.OUT_ZMHD))
    b = run_case(2, 8, 2, 3, n, 32)
    assert torch.equal(a, b)


@kernel_test
@pytest.mark.parametrize("z,h,hkv,m,n", [
    (2, 4, 4, 1, 77),     # no GQA, a ragged last chunk
    (1, 8, 2, 1, 100),    # GQA 4
    (2, 16, 2, 2, 45),    # GQA 8, two query positions: 16 rows per program
    (1, 8, 1, 1, 50),     # MQA
    (1, 16, 1, 5, 40),    # 80 rows: two row blocks of the group
], ids=["mha", "gqa4", "gqa8_m2", "mqa", "rowblocks"])
def test_kernel_gqa_ratios(z, h, hkv, m, n):
    run_case(z, h, hkv, m, n, 32)


@kernel_test
@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("d", [64, 80, 128, 256])
def test_kernel_head_dims_and_dtypes(dtype, d):
    run_case(1, 4, 2, 1, 33, d, dtype)


@kernel_test
def test_kernel_batch_of_different_lengths_via_mask():
    """Each batch row has its own valid cache length (padding of a static cache): a bool key mask [Z, 1, 1, N]."""
    lengths = torch.tensor([5, 63, 30])
    mask = (torch.arange(64)[None, :] < lengths[:, None])[:, None, None, :]
    out = run_case(3, 4, 2, 1, 64, 32, BF16, mask=mask, cache_len=96)
    assert torch.isfinite(out).all()


@kernel_test
def test_kernel_additive_position_mask_and_bshd_cache():
    """HF's static-cache mask: finfo.min added past each row's position; K/V cache stored [Z, N, Hkv, D]."""
    lengths = torch.tensor([9, 40])
    bias = torch.where(torch.arange(48)[None, :] < lengths[:, None], 0.0, torch.finfo(torch.float32).min)
    run_case(2, 8, 2, 1, 48, 64, F32, bias=bias[:, None, None, :], layout="bshd", cache_len=64)


@kernel_test
def test_kernel_causal_with_empty_chunks():
    """q_len 3 at positions 10..12 of a 64-key cache: keys past 12 are masked for every row, so the chunks after
    the first are empty (m = -inf, l = 0) and must contribute exactly nothing."""
    run_case(1, 4, 2, 3, 64, 16, sp=spec(causal=True, causal_offset=10))
    run_case(1, 4, 2, 3, 50, 16, sp=spec(causal=True, causal_offset=47))  # bottom-right aligned


@kernel_test
def test_kernel_softcap():
    run_case(2, 4, 2, 1, 40, 16, sp=spec(softcap=2.0, scale=0.5))


@kernel_test
@pytest.mark.parametrize("fill,safe", [(float("-inf"), False), (-1e30, False), (float("-inf"), True)],
                         ids=["neg_inf_nan", "finite_fill_uniform", "safe_softmax_zero"])
def test_kernel_fully_masked_rows(fill, safe):
    """A batch row whose keys are all masked: NaN with a -inf fill (eager's softmax), the uniform average with a
    finite fill, 0 with _safe_softmax. The other rows are unaffected."""
    mask = torch.ones(2, 1, 1, 40, dtype=torch.bool)
    mask[1] = False
    out = run_case(2, 4, 2, 1, 40, 16, mask=mask, sp=spec(mask_fill=fill, safe_softmax=safe))
    assert torch.isfinite(out[0]).all()
    if fill == float("-inf") and not safe:
        assert out[1].isnan().all()
    elif safe:
        assert (out[1] == 0).all()


def _on_combine(monkeypatch, hook):
    """Route triton_decode's combine launches through ``hook(args, kwargs)`` (which may record them, or raise)
    before the real kernel runs."""
    from attn_compiler.codegen import triton_decode as td
    real = td.decode_combine

    class _Hooked:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                hook(args, kw)
                return real[grid](*args, **kw)
            return launch
    monkeypatch.setattr(td, "decode_combine", _Hooked())


@kernel_test
@pytest.mark.parametrize("case", ["ragged", "rowblocks", "causal", "bf16_d80", "masked_nan", "masked_safe"])
def test_kernel_one_split_writes_the_output_itself(monkeypatch, case):
    """With one split (many programs already, or a short cache) the split kernel normalises and writes out and
    stats itself: no workspace and no combine launch. Same answers as the combine path, fully-masked rows too."""
    from attn_compiler.codegen import triton_decode as td

    def no_combine(args, kw):
        raise AssertionError("the combine kernel ran for a single split")
    monkeypatch.setattr(td, "_sm_count", lambda device: 0)  # no programs wanted beyond batch x kv heads: 1 split
    _on_combine(monkeypatch, no_combine)
    mask = torch.ones(2, 1, 1, 40, dtype=torch.bool)
    mask[1] = False
    if case == "ragged":
        run_case(2, 4, 4, 1, 77, 32)
    elif case == "rowblocks":
        run_case(1, 16, 1, 5, 40, 32)
    elif case == "causal":
        run_case(1, 4, 2, 3, 64, 16, sp=spec(causal=True, causal_offset=10))
    elif case == "bf16_d80":
        run_case(1, 4, 2, 1, 33, 80, BF16)
    elif case == "masked_nan":
        out = run_case(2, 4, 2, 1, 40, 16, mask=mask)
        assert out[1].isnan().all() and torch.isfinite(out[0]).all()
    else:
        out = run_case(2, 4, 2, 1, 40, 16, mask=mask, sp=spec(safe_softmax=True))
        assert (out[1] == 0).all() and torch.isfinite(out[0]).all()


@kernel_test
@pytest.mark.parametrize("one_pass", [True, False], ids=["one_pass", "loop"])
def test_kernel_combine_one_pass_and_loop(monkeypatch, one_pass):
    """The combine reduces every split's partial in one pass when they fit one block, else in steps of
    _COMBINE_STEP splits (here 2, so every case takes several steps, ragged last ones too): the same answers,
    empty chunks and fully-masked rows included. The launches are checked to take the path under test."""
    from attn_compiler.codegen import triton_decode as td
    seen = []
    _on_combine(monkeypatch, lambda args, kw: seen.append((kw["ONE_PASS"], kw["BLOCK_S"], args[13])))  # 13: SPLITS
    if not one_pass:
        monkeypatch.setattr(td, "_COMBINE_ONE_PASS", 1)
        monkeypatch.setattr(td, "_COMBINE_STEP", 2)
    # caches long enough for several chunks of the GPU's 32-key tiles too
    mask = torch.ones(2, 1, 1, 100, dtype=torch.bool)
    mask[1] = False
    run_case(2, 4, 4, 1, 300, 32)                                        # ragged last chunk
    run_case(1, 4, 2, 3, 200, 16, sp=spec(causal=True, causal_offset=40))  # chunks past key 42 are empty
    out = run_case(2, 4, 2, 1, 100, 16, mask=mask)                       # a row with no key: NaN
    assert out[1].isnan().all() and torch.isfinite(out[0]).all()
    out = run_case(2, 4, 2, 1, 100, 16, mask=mask, sp=spec(safe_softmax=True))
    assert (out[1] == 0).all() and torch.isfinite(out[0]).all()
    assert len(seen) == 4 and all(p == one_pass for p, _, _ in seen), seen
    for _, block_s, splits in seen:
        assert splits >= 2 and (block_s >= splits if one_pass else block_s == 2), seen
    assert max(splits for _, _, splits in seen) > 2, seen  # the loop takes several steps, a ragged last one


@kernel_test
def test_kernel_stats_feed_the_prefill_backward():
    """A decode call's stats drive the (prefill) backward: gradients through the op equal the reference's."""
    from attn_compiler.codegen import autotune
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, s, 16, generator=g, dtype=torch.float64).to(DEV, F32) for s in (1, 37, 37))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with autotune.force_config(16, 16, 4, 2) if not CUDA else _nullcontext():
        out, _ = torch.ops.memattn.attention(q, k, v, None, None, None, 0.25, 0.0, False, 0, float("-inf"), True,
                                             0.0, False, "triton")
        out.sum().backward()
    qd, kd, vd = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    want = eager(qd, kd, vd, None, None, None, spec(scale=0.25))
    want.sum().backward()
    for got, ref in ((q.grad, qd.grad), (k.grad, kd.grad), (v.grad, vd.grad)):
        torch.testing.assert_close(got.cpu().double(), ref, atol=1e-5, rtol=1e-4)


@kernel_test
def test_kernel_dispatch_routes_by_query_length(monkeypatch):
    """kernel="triton": <= 16 query rows without dropout run the decode kernel, longer or with dropout prefill."""
    from attn_compiler.codegen import autotune
    from attn_compiler.codegen import triton_decode, triton_prefill
    calls = []
    for mod, name in ((triton_decode, "decode"), (triton_prefill, "prefill")):
        real = mod.plan_forward
        monkeypatch.setattr(mod, "plan_forward", lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    k = torch.randn(1, 2, 20, 16, device=DEV)
    with autotune.force_config(16, 16, 4, 2) if not CUDA else _nullcontext():
        for m, p in ((1, 0.0), (16, 0.0), (17, 0.0), (1, 0.5)):
            q = torch.randn(1, 2, m, 16, device=DEV)
            seed = torch.tensor(3) if p else None
            torch.ops.memattn.attention(q, k, k, None, None, seed, 0.25, 0.0, False, 0, float("-inf"), True, p,
                                        False, "triton")
    assert calls == ["decode", "decode", "prefill", "prefill"]


def test_num_splits_fill_the_machine_and_cover_the_cache():
    """Chunks cover the cache in aligned pieces; the split count is the fewest whose waves are nearly as full as
    the best count's: one split once batch x heads fill the machine, enough to fill it otherwise."""
    import math
    from attn_compiler.codegen import triton_decode as td
    slots = td._WAVES * 132

    def eff(programs, n, splits, chunk):  # tile work done over slot time held (num_splits' docstring)
        tiles, per = math.ceil(n / td.CHUNK_ALIGN), chunk // td.CHUNK_ALIGN
        return programs * tiles / (slots * math.ceil(programs * splits / slots) * per)
    for programs, n in ((8, 1024), (8, 131072), (512, 4096), (1, 100), (64, 16384), (64, 1024), (1, 300),
                        (264, 65536), (140, 8192), (8, 4096), (3, 1000)):
        splits, chunk = td.num_splits(programs, n, 132)
        assert chunk % td.CHUNK_ALIGN == 0 and (splits - 1) * chunk < n <= splits * chunk
        assert splits <= 256 and (splits == 1 or chunk >= td._MIN_CHUNK)
        if n // td._MIN_CHUNK >= 256:  # any split count was possible: the machine is (nearly) full every wave
            assert eff(programs, n, splits, chunk) >= 0.9, (programs, n, splits)
    assert td.num_splits(264, 65536, 132) == (1, 65536)  # 2 programs per SM already: one split, no combine
    assert td.num_splits(512, 4096, 132) == (1, 4096)
    assert td.num_splits(8, 1024, 132) == (8, 128)       # 8 programs: as many splits as the cache has tiles
    assert td.num_splits(64, 1024, 132) == (4, 256)      # 256 of 264 slots
    assert td.num_splits(1, 100, 132) == (1, 128)
    assert td.num_splits(8, 65536, 132) == (32, 2048)    # even chunks: not 29 of 18 tiles and a last of 8


def _num_splits_by_definition(programs, n, sms, align, min_chunk, waves, wave_eff, max_splits):
    """num_splits as its docstring states it: every count from 1 to the most allowed, then the fewest within
    wave_eff of the best efficiency, tile work over slot time held (no early stop, no cache)."""
    import math
    slots = waves * sms
    options = []
    for s in range(1, min(max_splits, max(1, n // max(align, min_chunk))) + 1):
        chunk = math.ceil(math.ceil(n / s) / align) * align
        splits = math.ceil(n / chunk)
        waves = math.ceil(programs * splits / slots)
        options.append((programs * math.ceil(n / align) * align / (slots * waves * chunk), splits, chunk))
    best = max(o[0] for o in options)
    return next((sp, ch) for e, sp, ch in options if e >= wave_eff * best)


def test_num_splits_is_its_definition_and_follows_the_knobs(monkeypatch):
    """The per-launch version (integer arithmetic, stop at the first full-wave count, cached) picks what the
    definition picks, for machines of 16 to 132 SMs, and a change of a tuning knob (benchmarks/decode.py --sweep
    sets them) is not hidden by the cache."""
    from attn_compiler.codegen import triton_decode as td
    for sms in (16, 78, 132):
        for programs in (1, 3, 8, 32, 64, 100, 264, 1000):
            for n in (1, 100, 128, 1000, 4096, 4097, 65536, 131072, 200_000):
                for align, min_chunk in ((128, None), (64, 64), (16, 512)):
                    got = td.num_splits(programs, n, sms, align, min_chunk)
                    want = _num_splits_by_definition(programs, n, sms, align, min_chunk or td._MIN_CHUNK, td._WAVES,
                                                     td._WAVE_EFF, td._MAX_SPLITS)
                    assert got == want, (sms, programs, n, align, min_chunk)
    base = td.num_splits(8, 65536, 132)
    monkeypatch.setattr(td, "_WAVE_EFF", 0.5)
    assert td.num_splits(8, 65536, 132) == _num_splits_by_definition(8, 65536, 132, 128, td._MIN_CHUNK, td._WAVES,
                                                                     0.5, td._MAX_SPLITS) != base
    monkeypatch.setattr(td, "_MAX_SPLITS", 4)
    assert td.num_splits(8, 65536, 132)[0] <= 4


def test_pdl_is_the_default_on_hopper_and_never_on_the_cpu_or_the_interpreter(monkeypatch):
    """The combine is a programmatic dependent launch on Hopper and later by default: MEMATTN_PDL=0 turns it off;
    never for a CPU tensor, under TRITON_INTERPRET, or after a PDL launch failed in this process."""
    from attn_compiler.codegen import launch
    from attn_compiler.codegen import triton_decode as td
    monkeypatch.delenv("MEMATTN_PDL", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not td.pdl_wanted(torch.device("cpu"))
    monkeypatch.setattr(launch, "hopper_or_later", lambda device: device.type == "cuda")  # an H100/H200 in name
    cuda = torch.device("cuda")
    assert td.pdl_wanted(cuda)
    monkeypatch.setenv("MEMATTN_PDL", "0")
    assert not td.pdl_wanted(cuda)
    monkeypatch.setenv("MEMATTN_PDL", "1")
    assert td.pdl_wanted(cuda)
    monkeypatch.setattr(td, "_pdl_failed", True)
    assert not td.pdl_wanted(cuda)
    monkeypatch.setattr(td, "_pdl_failed", False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not td.pdl_wanted(cuda)


@kernel_test
def test_kernel_a_failed_pdl_launch_warns_and_launches_plainly(monkeypatch):
    """A PDL launch that fails (a Triton or driver without griddepcontrol) costs a warning, not the step: the same
    call is launched without PDL, and later calls do not try again."""
    from attn_compiler.codegen import tma
    from attn_compiler.codegen import triton_decode as td
    seen = []

    def no_pdl(args, kw):
        seen.append(kw["PDL"])
        if kw["PDL"]:
            raise RuntimeError("griddepcontrol is not supported here")
    _on_combine(monkeypatch, no_pdl)
    monkeypatch.setattr(td, "_pdl_failed", False)
    monkeypatch.setattr(tma, "_failed", False)
    monkeypatch.setattr(td, "pdl_wanted", lambda device: not td._pdl_failed)
    with pytest.warns(RuntimeWarning, match="programmatic dependent launch failed"):
        run_case(1, 8, 2, 1, 100, 16)
    assert td._pdl_failed and seen[-1] is False
    assert not tma.failed()  # the failure is PDL's, not put on TMA (which the plain launch used)
    n_seen = len(seen)
    run_case(1, 8, 2, 1, 100, 16)
    assert seen[n_seen:] == [False]


def test_autotune_key_holds_the_chunk_and_the_program_count():
    """The split kernel's best tile depends on the keys each program walks and on how many programs share the
    machine (benchmarks/results/tuning_notes.md): both are in the autotune key, as buckets."""
    from attn_compiler.codegen import triton_decode as td
    assert {"BUCKET_N", "BUCKET_P"} <= set(td.decode_split_tuned.keys)
    assert [td._programs_bucket(p, 132) for p in (1, 132, 133, 264, 265, 528, 529, 10 ** 6)] == [0, 0, 1, 1, 2, 2,
                                                                                                    3, 3]


# ---------------------------------------------------------------------------------------------- generation loops

def _hf_model(kind: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=8, num_key_value_heads=2, vocab_size=128,
                                       max_position_embeddings=64, attn_implementation="eager")
        return transformers.LlamaForCausalLM(cfg).eval(), 2
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, attn_pdrop=0.0,
                                  resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=None, eos_token_id=None,
                                  attn_implementation="eager")
    return transformers.GPT2LMHeadModel(cfg).eval(), 2


# fp32 logits of O(1): eager's and the kernels' rounding differ by ~1e-6 on a CPU; a GPU's fp32 dots (TF32 in
# cuBLAS's and Triton's defaults) by more
LOGIT_ATOL = 2e-3 if CUDA else 1e-4


def _assert_same_generation(got, want, prompt: int, atol=LOGIT_ATOL):
    """Greedy generations agree step by step: the logits within atol, hence the tokens. Random tiny models can
    have near-ties, which another CPU's rounding may break the other way: tokens may differ only where eager's
    two best logits are within atol, and the steps after that (conditioned on different tokens) are not compared."""
    for step, (a, b) in enumerate(zip(got.logits, want.logits)):
        torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=lambda m: f"step {step}: {m}")
        same = got.sequences[:, prompt + step] == want.sequences[:, prompt + step]
        if not same.all():
            top2 = b.float().topk(2, dim=-1).values
            gap = (top2[:, 0] - top2[:, 1])[~same]
            assert (gap <= atol).all(), f"step {step}: tokens differ where eager's best logit leads by {gap}"
            return
    assert torch.equal(got.sequences, want.sequences)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generate_same_tokens_and_every_decode_site_rewritten(kind, cache, tmp_path):
    """model.generate (greedy) compiled with memattn gives eager's logits at every step, so eager's tokens; every
    layer's decode-step site is rewritten to the decode kernel; the report names the cache pattern (a concat
    cache with the bytes it copies per step as a formula in the cache length)."""
    model, layers = _hf_model(kind)
    model.to(DEV)
    ids = torch.randint(0, 128, (2, 19), generator=torch.Generator().manual_seed(1)).to(DEV)  # prefill > 16 rows
    # disable_compile: HF would torch.compile a static-cache model itself on CUDA; eager must stay eager
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, disable_compile=True, output_logits=True,
              return_dict_in_generate=True)
    if cache == "static":
        kw["cache_implementation"] = "static"
    dispatch.fallbacks.clear()
    with torch.no_grad():
        want = model.generate(ids, **kw)
        before = len(attn_compiler.reports())
        model.forward = torch.compile(model.forward, backend="memattn")
        got = model.generate(ids, **kw)
    _assert_same_generation(got, want, ids.shape[1])
    assert not (CUDA and dispatch.fallbacks), f"the Triton kernels fell back: {dispatch.fallbacks}"
    reports = attn_compiler.reports()[before:]
    assert reports, "nothing was compiled"
    prefill, decode_steps = reports[0], reports[1:]  # the prompt's graph, then the one-token steps' graphs
    assert all(s.status == "rewritten" and s.kernel == "prefill" for s in prefill.sites), prefill.table()
    assert decode_steps, [r.table() for r in reports]
    for r in decode_steps:
        assert len(r.sites) == layers and all(s.status == "rewritten" and s.kernel == "decode" for s in r.sites), \
            r.table()
        for s in r.sites:
            if cache == "static":
                assert s.cache == "in-place" and s.cache_copy_bytes == 0, r.table()
            else:
                assert s.cache == "concat", r.table()
                # K and V: [B, Hkv, N, D] each, fp32: the copy grows with the cache length N
                b, hkv, n, d = (sympy.sympify(x.strip(" '")) for x in s.shapes["k"].strip("()").split(","))
                got_bytes = sympy.sympify(str(s.cache_copy_bytes))  # same symbol names, plain assumptions
                assert sympy.expand(got_bytes - 2 * b * hkv * n * d * 4) == 0, s.cache_copy_bytes
                assert "copies" in r.table() and "per step" in r.table()
    if cache == "dynamic":  # from the recompile that makes the cache length dynamic on, one graph serves all steps
        assert any(sympy.sympify(str(s.cache_copy_bytes)).free_symbols for r in decode_steps for s in r.sites)
        html = tmp_path / "decode.html"
        decode_steps[-1].to_html(str(html))
        assert "concat cache: copies" in html.read_text()


def test_kernel_kind_from_symbolic_query_length():
    """The report's kernel from the query length's bounds: static <= 16 decode, a symbolic length that may be
    either prefill/decode (the dispatcher decides per call), a dropout site always prefill."""
    from attn_compiler import kv_cache
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    env = ShapeEnv()
    s = env.create_unbacked_symint()
    assert kv_cache.kernel_kind(1, 0.0) == "decode" and kv_cache.kernel_kind(16, 0.0) == "decode"
    assert kv_cache.kernel_kind(17, 0.0) == "prefill" and kv_cache.kernel_kind(1, 0.1) == "prefill"
    assert kv_cache.kernel_kind(s, 0.0) == "prefill/decode"
    torch._check(s <= 8)
    torch._check(s >= 1)
    assert kv_cache.kernel_kind(s, 0.0) == "decode"


class SliceCache(torch.nn.Module):
    """A hand-written static cache written by slice assignment (``cache[:, :, pos:pos + 1] = k``), attention over the
    whole buffer with a position mask; GQA by HF's repeat_kv."""

    def __init__(self, b=2, hkv=2, h=4, max_len=40, d=16):
        super().__init__()
        self.h = h
        self.register_buffer("k_cache", torch.zeros(b, hkv, max_len, d))
        self.register_buffer("v_cache", torch.zeros(b, hkv, max_len, d))

    def forward(self, q, k, v, pos: int):
        self.k_cache[:, :, pos:pos + 1] = k
        self.v_cache[:, :, pos:pos + 1] = v
        b, hkv, n, d = self.k_cache.shape
        rep = self.h // hkv
        keys = self.k_cache[:, :, None].expand(b, hkv, rep, n, d).reshape(b, self.h, n, d)
        vals = self.v_cache[:, :, None].expand(b, hkv, rep, n, d).reshape(b, self.h, n, d)
        s = q @ keys.transpose(-2, -1) / d ** 0.5
        s = s.masked_fill(torch.arange(n, device=q.device) > pos, float("-inf"))
        return torch.softmax(s, -1) @ vals


def test_slice_assigned_static_cache_is_an_in_place_decode_site():
    torch.manual_seed(0)
    model, ref = SliceCache().to(DEV), SliceCache().to(DEV)
    compiled = torch.compile(model, backend="memattn", fullgraph=True)
    before = len(attn_compiler.reports())
    for pos in (0, 1, 2):
        q = torch.randn(2, 4, 1, 16, device=DEV)
        k, v = torch.randn(2, 2, 1, 16, device=DEV), torch.randn(2, 2, 1, 16, device=DEV)
        torch.testing.assert_close(compiled(q, k, v, pos), ref(q, k, v, pos), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(model.k_cache, ref.k_cache)  # the cache writes happened, in place
    sites = [s for r in attn_compiler.reports()[before:] for s in r.sites]
    assert sites and all(s.status == "rewritten" and s.kernel == "decode" and s.cache == "in-place"
                         for s in sites), [r.table() for r in attn_compiler.reports()[before:]]
