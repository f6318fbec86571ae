import os

import pytest
import torch

import attn_compiler  # noqa: F401  (registers the ops)
from attn_compiler.codegen import launch, reference

# (atol, error multiple): compiled error vs the fp64 truth may be at most MULT x eager's error in the same dtype,
# plus ATOL (eager can be exact on tiny inputs, which would make a pure ratio meaningless).
TOL = {
    torch.float64: (1e-9, 2.0),
    torch.float32: (3e-5, 4.0),  # GPU fp32 dots round differently from eager's; values here are O(1)
    torch.bfloat16: (1e-2, 2.0),
    torch.float16: (2e-3, 2.0),
}


def pytest_configure(config):
    # autotune picks on disk (codegen/tune_cache.py) go to a directory of this run, not the user's cache: a test
    # run neither reads picks timed elsewhere nor leaves its own behind (subprocesses inherit it)
    import tempfile
    if "MEMATTN_CACHE_DIR" not in os.environ:
        os.environ["MEMATTN_CACHE_DIR"] = tempfile.mkdtemp(prefix="memattn-test-cache-")


@pytest.fixture(autouse=True)
def _fresh_dynamo(monkeypatch):
    """Every test compiles and plans from scratch (no plan of an earlier test's call signatures, made under its
    monkeypatches, is reused), with reference tiles small enough that short sequences cross tiles."""
    torch._dynamo.reset()
    launch.invalidate()
    monkeypatch.setattr(reference, "BLOCK_M", 16)
    monkeypatch.setattr(reference, "BLOCK_N", 16)
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _seeded(request):
    """Every test draws the same inputs on every run (a bug caught by one draw and missed by the next is a flaky
    test), and each test its own: torch's global generator is seeded from the test's id."""
    import zlib
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true", default=False,
                     help="run the long hypothesis profile of tests/test_fuzz.py (>= 10,000 examples)")
