"""attn_compiler: the ``memattn`` torch.compile backend, which removes the O(n^2) memory of attention.

    model = torch.compile(model, backend="memattn", options={"memory_budget": "8GiB"})
    print(attn_compiler.last_report())
"""
from attn_compiler.pipeline import backend, last_report, memattn, reports  # noqa: F401
from attn_compiler.pipeline import counters as _counters
from attn_compiler.options import Options  # noqa: F401

__version__ = "0.1.0"


def backend_counters() -> dict:
    """Graphs compiled, sites rewritten and sites left by memattn in this process."""
    return dict(_counters)
__all__ = ["backend", "last_report", "memattn", "reports", "Options", "backend_counters", "__version__"]
