"""Backend options: parsed and validated once, with errors that name what is allowed."""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Optional, Union

from attn_compiler import config

KERNELS = ("auto", "triton", "reference")
INNERS = ("auto", "eager", "inductor")
MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
ALLOWED = ("memory_budget", "report", "kernels", "inner", "mode")

_UNITS = {"b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}
_BUDGET = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


@dataclasses.dataclass(frozen=True)
class Options:
    memory_budget: Union[None, int, float] = None   # bytes (int) or a fraction of the device's memory (float)
    report: Union[bool, str] = False
    kernels: str = "auto"
    inner: str = "auto"
    mode: Optional[str] = None

    def inner_for(self, example_inputs) -> str:
        """The inner compiler of one graph: "auto" is Inductor for a graph on a CUDA device (its fused kernels
        and low host time per op beat running the aten ops one Python call at a time) and eager elsewhere (on a
        CPU the rewritten graph runs as fast op by op, without Inductor's C++ compile)."""
        if self.inner != "auto":
            return self.inner
        on_cuda = any(getattr(x, "is_cuda", False) is True for x in example_inputs)
        return "inductor" if on_cuda else "eager"

    def budget_bytes(self, device_total: Optional[int]) -> Optional[int]:
        if self.memory_budget is None or isinstance(self.memory_budget, int):
            return self.memory_budget
        if device_total is None:
            raise ValueError("memory_budget given as a fraction, but the device's total memory is unknown")
        return int(self.memory_budget * device_total)


def parse_budget(value: Any) -> Union[None, int, float]:
    """int bytes, a string with a unit ("8GiB", "512MB", "1.5 GB"), or a float fraction in (0, 1]."""
    allowed = ("memory_budget must be a positive int (bytes), a string like '8GiB' or '512MB' "
               f"(units: {', '.join(u if u == 'b' else u.upper().replace('I', 'i') for u in _UNITS)}), "
               "or a float fraction of the device's memory in (0, 1]")
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{allowed}; got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"{allowed}; got {value}")
        return value
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"{allowed}; got {value}")
        return value
    if isinstance(value, str):
        m = _BUDGET.match(value)
        unit = (m.group(2) or "b").lower() if m else None
        if not m or unit not in _UNITS:
            raise ValueError(f"{allowed}; got {value!r}")
        nbytes = int(float(m.group(1)) * _UNITS[unit])
        if nbytes <= 0:
            raise ValueError(f"{allowed}; got {value!r}")
        return nbytes
    raise ValueError(f"{allowed}; got {type(value).__name__} {value!r}")


def parse(options: Optional[dict] = None, mode: Optional[str] = None) -> Options:
    options = dict(options or {})
    unknown = sorted(set(options) - set(ALLOWED))
    if unknown:
        raise ValueError(f"memattn: unknown option(s) {', '.join(map(repr, unknown))}; "
                         f"allowed options are {', '.join(ALLOWED)}")
    if mode is not None and options.get("mode") not in (None, mode):
        raise ValueError(f"memattn: mode given twice ({mode!r} and {options['mode']!r})")
    mode = options.pop("mode", None) or mode
    if mode not in MODES:
        raise ValueError(f"memattn: mode must be one of {', '.join(repr(m) for m in MODES)}; got {mode!r}")
    budget = parse_budget(options.get("memory_budget"))
    report = options.get("report", False)
    if not isinstance(report, (bool, str, os.PathLike)) or (isinstance(report, str) and not report.strip()):
        raise ValueError(f"memattn: report must be False, True or a file path; got {report!r}")
    if not isinstance(report, bool):
        folder = os.path.dirname(os.path.abspath(os.fspath(report)))
        if not os.path.isdir(folder):
            raise ValueError(f"memattn: report {os.fspath(report)!r}: the folder {folder!r} does not exist")
        if not os.access(folder, os.W_OK):
            raise ValueError(f"memattn: report {os.fspath(report)!r}: the folder {folder!r} is not writable")
    kernels = options.get("kernels", "auto")
    if kernels not in KERNELS:
        raise ValueError(f"memattn: kernels must be one of {', '.join(map(repr, KERNELS))}; got {kernels!r}")
    if kernels == "triton":
        import torch
        if not torch.cuda.is_available() and not config.interpret():
            raise ValueError("memattn: kernels='triton' needs a CUDA device (or TRITON_INTERPRET=1 to run the "
                             "kernels in Triton's interpreter); use kernels='auto' to pick Triton when a GPU is "
                             "present and the reference implementation otherwise")
    # a mode is an Inductor setting: asking for one (torch.compile(..., mode="reduce-overhead") included) means
    # Inductor compiles the rewritten graph, and with the eager inner it would be silently dropped
    inner = options.get("inner", "auto" if mode in (None, "default") else "inductor")
    if inner not in INNERS:
        raise ValueError(f"memattn: inner must be one of {', '.join(map(repr, INNERS))}; got {inner!r}")
    if inner == "eager" and mode not in (None, "default"):
        raise ValueError(f"memattn: mode {mode!r} is an Inductor mode and applies with inner='inductor' only "
                         "(the default once a mode is given); inner='eager' runs the rewritten graph op by op")
    return Options(budget, os.fspath(report) if isinstance(report, os.PathLike) else report, kernels, inner, mode)
