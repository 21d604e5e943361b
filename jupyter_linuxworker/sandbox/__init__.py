"""The job engine: containers, supervisors, output logs and job records. Knows Linux, not Jupyter.

Names are imported lazily so that the per-job supervisor, which imports this package, starts
without loading the manager's modules.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "JobManager": "manager",
    "JobRecord": "store",
    "JobStatus": "store",
    "JobSpec": "spec",
    "Limits": "spec",
    "Volume": "spec",
    "SpecError": "spec",
    "JobNotFound": "manager",
    "JobConflict": "manager",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
