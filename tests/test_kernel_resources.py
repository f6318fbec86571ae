"""benchmarks/kernel_resources.py: every kernel parameter is classified for the offline compile, and a compile for
sm_90a on this machine (no GPU) reports registers, spills and the cp.async pipelining of a real launch's
specialisation."""
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import kernel_resources as kr  # noqa: E402


@pytest.mark.parametrize("name", list(kr.KERNELS))
def test_every_parameter_is_classified_and_specialised_like_a_launch(name):
    kernel = kr.KERNELS[name][0]
    consts = dict(kr.flags(128, False), BLOCK_M=64, BLOCK_N=64, BLOCK_R=16)
    sig, values, attrs = kr.signature(kernel, consts, 128)
    assert list(sig) == kernel.arg_names
    contiguous = [n for n in kernel.arg_names if n.startswith("stride_") and n.endswith("d")]
    assert contiguous and all(sig[n] == "constexpr" and values[n] == 1 for n in contiguous)
    pointers = [i for i, n in enumerate(kernel.arg_names) if n in kr.POINTERS]
    assert all(attrs[(i,)] == [["tt.divisibility", 16]] for i in pointers)


def test_compile_for_hopper_reports_registers_spills_and_pipelining():
    consts = dict(kr.flags(64, False), BLOCK_M=16, BLOCK_N=64, BLOCK_R=16)
    r = kr.resources(kr.KERNELS["decode"][0], consts, 4, 3, 90)
    assert 0 < r["regs"] <= 255 and r["spill_bytes"] >= 0
    assert r["cp_async"] > 0, "the K/V loop's loads should be pipelined in a specialised compile"
    assert r["shared"] > 2 * 64 * 64 * 2  # K and V tiles, at least one stage each


def test_unknown_parameter_names_fail_loudly(monkeypatch):
    monkeypatch.delitem(kr.POINTERS, "Q")
    with pytest.raises(ValueError, match="'Q' is not classified"):
        kr.signature(kr.KERNELS["fwd"][0], dict(kr.flags(64, False), BLOCK_M=64, BLOCK_N=64), 64)


def test_sass_counts_show_what_fused_scale_removes():
    """--sass with --set: the forward's plain-score path (FUSE_SCALE) compiles to fewer instructions than the
    general one for the same tile, with fewer FMULs (the scaled tile is never formed), and the same MMAs and exp2s."""
    kernel = kr.KERNELS["fwd"][0]
    counts = {}
    for fuse in (False, True):
        consts = dict(kr.flags(64, True), **kr.parse_overrides([f"FUSE_SCALE={int(fuse)}"]), BLOCK_M=128, BLOCK_N=64)
        counts[fuse] = kr.resources(kernel, consts, 4, 3, 90, sass=True)["sass"]
    assert counts[True]["all"] < counts[False]["all"], counts
    assert counts[True]["FMUL"] < counts[False]["FMUL"]
    assert counts[True]["HGMMA"] == counts[False]["HGMMA"] > 0
    assert counts[True]["MUFU"] == counts[False]["MUFU"] > 0


def test_set_rejects_unknown_flags():
    with pytest.raises(ValueError, match="want NAME=VALUE with NAME one of"):
        kr.parse_overrides(["FUSE_SCALES=1"])
    assert kr.parse_overrides(["FUSE_SCALE=0", "DOT_PREC=ieee"]) == {"FUSE_SCALE": False, "DOT_PREC": "ieee"}
