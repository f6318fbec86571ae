"""Autotune picks on disk (codegen/tune_cache.py): a later process prunes to an earlier one's pick (no space to
time), only for the same kernel source, Triton, GPU model and key, only a pick the prune still keeps; never a
crash."""
import json
import os
import types

import pytest
import torch
import triton

from attn_compiler.codegen import tune_cache

CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=2, pre_hook=lambda a: None)
           for bm in (64, 128) for bn in (64, 128) for w in (4, 8)]


def keep_all(configs, named_args, **kwargs):
    return [c for c in configs if c.num_warps == 4 or kwargs.get("BUCKET_M", 0) > 0]


class FakeTensor:
    def __init__(self, dtype=torch.bfloat16, device="cuda"):
        self.dtype, self.device = dtype, torch.device(device, 0) if device == "cuda" else torch.device(device)


def kernel_fn(source_hash="abc"):
    return types.SimpleNamespace(cache_key=source_hash, arg_names=["Q", "K", "M"])


@pytest.fixture(autouse=True)
def _disk(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMATTN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("MEMATTN_AUTOTUNE_CACHE", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(tune_cache, "_device_name", lambda index: "Fake GPU")
    return tmp_path


def tune(disk, kwargs, pick, args=None):
    """What a launch through the autotuner does: prune (the disk may answer), time if several are left (here:
    take ``pick``), launch, then the after-launch hook. Returns what the prune left."""
    args = args or (FakeTensor(), FakeTensor(), 4096)
    named = dict(zip(disk.fn.arg_names, args))
    left = disk.prune(keep_all)(CONFIGS, named, **kwargs)
    tuner = types.SimpleNamespace(cache={"k": None}, best_config=left[0] if len(left) == 1 else pick)
    disk.after_launch(tuner, args, kwargs)
    return left


KW = dict(BUCKET_M=2, IS_CAUSAL=True, BLOCK_D=64)


def test_a_later_process_prunes_to_the_pick(_disk):
    first = tune_cache.DiskTuning("fwd", kernel_fn(), ["BUCKET_M", "IS_CAUSAL", "BLOCK_D"])
    assert len(tune(first, KW, CONFIGS[5])) == len(CONFIGS)   # nothing on disk: every candidate is timed
    files = list(_disk.iterdir())
    assert len(files) == 1 and files[0].name.startswith("autotune-fwd-")
    rec = json.loads(files[0].read_text())
    assert list(rec.values()) == [{"kwargs": {"BLOCK_M": 128, "BLOCK_N": 64}, "num_warps": 8, "num_stages": 2}]
    later = tune_cache.DiskTuning("fwd", kernel_fn(), ["BUCKET_M", "IS_CAUSAL", "BLOCK_D"])
    left = tune(later, KW, None)
    assert left == [CONFIGS[5]] and left[0].pre_hook is CONFIGS[5].pre_hook   # the space's own config object


@pytest.mark.parametrize("change", ["key", "dtype", "source", "card", "triton"])
def test_another_key_kernel_gpu_or_triton_tunes_afresh(monkeypatch, change):
    tune(tune_cache.DiskTuning("fwd", kernel_fn(), ["BUCKET_M", "IS_CAUSAL", "BLOCK_D"]), KW, CONFIGS[5])
    kw, args, fn = dict(KW), None, kernel_fn()
    if change == "key":
        kw["BUCKET_M"] = 3
    elif change == "dtype":
        args = (FakeTensor(torch.float16), FakeTensor(torch.float16), 4096)
    elif change == "source":
        fn = kernel_fn("edited")
    elif change == "card":
        monkeypatch.setattr(tune_cache, "_device_name", lambda index: "Other GPU")
    else:
        monkeypatch.setattr(triton, "__version__", "0.0.0")
    later = tune_cache.DiskTuning("fwd", fn, ["BUCKET_M", "IS_CAUSAL", "BLOCK_D"])
    assert len(tune(later, kw, CONFIGS[0], args)) == len(CONFIGS)


def test_a_pick_the_prune_no_longer_keeps_is_ignored():
    kw = dict(KW, BUCKET_M=1)
    tune(tune_cache.DiskTuning("fwd", kernel_fn(), ["BUCKET_M"]), kw, CONFIGS[5])   # an 8-warp pick
    later = tune_cache.DiskTuning("fwd", kernel_fn(), ["BUCKET_M"])
    named = dict(Q=FakeTensor(), K=FakeTensor(), M=4096)
    assert later.prune(keep_all)(CONFIGS, named, **kw) == [CONFIGS[5]]
    narrower = later.prune(lambda configs, named, **k: [c for c in configs if c.num_warps == 4])
    assert len(narrower(CONFIGS, named, **kw)) == 4   # the kept pick is not among them: tune


def test_off_switch_interpreter_cpu_tensors_and_cleared_caches_write_nothing(_disk, monkeypatch):
    disk = tune_cache.DiskTuning("fwd", kernel_fn(), ["BUCKET_M"])
    monkeypatch.setenv("MEMATTN_AUTOTUNE_CACHE", "0")
    tune(disk, KW, CONFIGS[5])
    monkeypatch.setenv("MEMATTN_AUTOTUNE_CACHE", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    tune(tune_cache.DiskTuning("fwd", kernel_fn(), ["BUCKET_M"]), KW, CONFIGS[5])
    monkeypatch.delenv("TRITON_INTERPRET")
    tune(tune_cache.DiskTuning("fwd", kernel_fn(), ["BUCKET_M"]), KW, CONFIGS[5],
         args=(FakeTensor(device="cpu"), FakeTensor(device="cpu"), 7))
    # a test that clears the autotuner's cache and forces one config has tuned nothing
    disk = tune_cache.DiskTuning("fwd", kernel_fn(), ["BUCKET_M"])
    tuner = types.SimpleNamespace(cache={"a": 1, "b": 2}, best_config=CONFIGS[1])
    disk._seen[id(tuner)] = 2
    tuner.cache.clear()
    disk.after_launch(tuner, (FakeTensor(), FakeTensor(), 1), KW)
    assert list(_disk.iterdir()) == []


def test_unreadable_file_is_ignored_then_replaced_and_processes_merge(_disk):
    first = tune_cache.DiskTuning("fwd", kernel_fn(), ["BUCKET_M"])
    tune(first, KW, CONFIGS[5])
    path = next(_disk.iterdir())
    path.write_text("{not json")
    later = tune_cache.DiskTuning("fwd", kernel_fn(), ["BUCKET_M"])
    assert len(tune(later, KW, CONFIGS[6])) == len(CONFIGS)          # unreadable: tune, and write a good file
    other = tune_cache.DiskTuning("fwd", kernel_fn(), ["BUCKET_M"])   # another process, another key
    other._tables[str(path)] = {}
    tune(other, dict(KW, BUCKET_M=4), CONFIGS[7])
    table = json.loads(path.read_text())
    assert len(table) == 2                                            # both processes' picks, merged
    assert not [p for p in os.listdir(_disk) if p.startswith(".autotune-")]   # no temporary file left


def test_the_kernels_autotuners_are_disk_backed():
    from attn_compiler.codegen import autotune
    from attn_compiler.codegen import triton_decode as td
    from attn_compiler.codegen import triton_prefill  # noqa: F401  (registers the prefill autotuners)
    for name, (tuner, prune, _space) in autotune.AUTOTUNED.items():
        assert tuner.memattn_disk.name == name and tuner.memattn_disk.key == tuner.keys
        assert tuner.early_config_prune.__wrapped__ is prune
    assert td.decode_split_tuned.memattn_disk.key == td.decode_split_tuned.keys


class FakeAutotuner:
    """What launch_tuned uses of triton.autotune's Autotuner: tuning a key puts its pick in ``cache`` and
    ``best_config``; ``fn`` is the kernel it launches."""

    def __init__(self, pick):
        self.pick, self.cache, self.calls = pick, {}, []
        self.arg_names = ["Q", "K", "M", "BUCKET_M", "USE_TMA"]
        self.memattn_key, self.memattn_picks = ("BUCKET_M", "USE_TMA"), {}
        self.memattn_disk = types.SimpleNamespace(after_launch=lambda *a: None)
        tuner = self

        class Kernel:
            def __getitem__(self, grid):
                return lambda *args, **kw: tuner.calls.append(("direct", kw))
        self.fn = Kernel()

    def __getitem__(self, grid):
        def run(*args, **kw):
            key = (kw["BUCKET_M"], kw["USE_TMA"], str(args[0].dtype))
            self.cache.setdefault(key, self.pick)
            self.best_config = self.cache[key]
            self.calls.append(("tuner", kw))
        return run


def test_launch_tuned_takes_a_tuned_keys_pick_without_the_autotuner():
    """A key's first launch goes through the autotuner; its later launches go straight to the kernel with the same
    pick (its kwargs and its pre-hook's view of the arguments), until the autotuner forgets it or the key changes."""
    from attn_compiler.codegen.autotune import launch_tuned
    seen = []
    pick = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3, pre_hook=seen.append)
    tuner = FakeAutotuner(pick)
    q = torch.zeros(2, dtype=torch.bfloat16)
    args, kw = (q, q, 7), dict(BUCKET_M=1, USE_TMA=True)
    launch_tuned(tuner, None, args, kw)
    launch_tuned(tuner, None, args, kw)
    assert [c[0] for c in tuner.calls] == ["tuner", "direct"]
    assert tuner.calls[1][1] == {**kw, **pick.all_kwargs()}
    assert seen[-1]["M"] == 7 and seen[-1]["BLOCK_N"] == 32 and seen[-1]["USE_TMA"] is True
    launch_tuned(tuner, None, args, dict(kw, BUCKET_M=2))                 # another key
    launch_tuned(tuner, None, (q.float(), q.float(), 7), kw)              # another dtype
    tuner.cache.clear()                                                    # the autotuner forgot its picks
    launch_tuned(tuner, None, args, kw)
    launch_tuned(tuner, None, args, kw)
    assert [c[0] for c in tuner.calls] == ["tuner", "direct", "tuner", "tuner", "tuner", "direct"]
