"""attn_compiler: the ``memattn`` torch.compile backend, which removes the O(n^2) memory of attention.

    model = torch.compile(model, backend="memattn", options={"memory_budget": "8GiB"})
    print(attn_compiler.last_report())
"""
import os as _os

# In a source checkout patterns/ and codegen/ sit beside this folder; an install maps them to
# attn_compiler.patterns / attn_compiler.codegen. When the checkout itself is first on sys.path (python -m pytest
# from the repo root) the install's mapping is shadowed, so the checkout's root is searched for them too.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "codegen", "reference.py")) and _root not in __path__:
    __path__.append(_root)

from attn_compiler.pipeline import backend, last_report, memattn, reports  # noqa: F401
from attn_compiler.pipeline import counters as _counters
from attn_compiler.options import Options  # noqa: F401

__version__ = "0.1.0"


def backend_counters() -> dict:
    """Graphs compiled, sites rewritten and sites left by memattn in this process."""
    return dict(_counters)
__all__ = ["backend", "last_report", "memattn", "reports", "Options", "backend_counters", "__version__"]
