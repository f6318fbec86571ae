"""attn_compiler: the ``memattn`` torch.compile backend, which removes the O(n^2) memory of attention.

    model = torch.compile(model, backend="memattn", options={"memory_budget": "8GiB"})
    print(attn_compiler.last_report())
"""
import logging as _logging
import os as _os
import warnings as _warnings


def _log_from_env() -> None:
    """MEMATTN_LOG=info|debug (also warning, error) puts a stderr handler on the ``attn_compiler`` logger."""
    from attn_compiler import config
    levels = {"debug": _logging.DEBUG, "info": _logging.INFO, "warning": _logging.WARNING, "error": _logging.ERROR}
    try:
        want = config.read("MEMATTN_LOG")
    except ValueError as e:
        _warnings.warn(f"{e}; logging left unchanged", RuntimeWarning, stacklevel=3)
        return
    if not want:
        return
    logger = _logging.getLogger("attn_compiler")
    if not any(getattr(h, "_memattn_env", False) for h in logger.handlers):
        handler = _logging.StreamHandler()
        handler.setFormatter(_logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        handler._memattn_env = True
        logger.addHandler(handler)
    logger.setLevel(levels[want])


_log_from_env()

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
