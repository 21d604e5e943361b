"""Live notebook views of jobs: one job (JobView) and the user's job list (JobList).

The views follow their jobs from the browser, through the server's REST API and Server-Sent
Events, not through the kernel. So a view keeps updating, and its Stop button keeps working,
while other cells run. Output never lands in another cell, and a reloaded page shows the job
again from the start of its output.

Example::

    from jupyter_linuxworker.client import Client
    from jupyter_linuxworker.widgets import JobView

    JobView.for_job(Client().submit("for i in 1 2 3; do echo $i; sleep 1; done"))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import anywidget
import traitlets

from .client import Job

TAIL_LINES: Final = 200
STATS_INTERVAL_MS: Final = 1000
LIST_INTERVAL_MS: Final = 2000
_STATIC = Path(__file__).parent / "static"


def _module(name: str) -> str:
    # An anywidget module is loaded from a string, so it cannot import a file beside it:
    # the shared helpers are prepended instead.
    return (_STATIC / "common.js").read_text() + (_STATIC / name).read_text()


class JobView(anywidget.AnyWidget):
    """A live view of one job: status, usage over time, a bounded output tail and Stop."""

    _esm = _module("job_view.js")
    _css = _STATIC / "widgets.css"

    job_id = traitlets.Unicode("").tag(sync=True)
    name = traitlets.Unicode("").tag(sync=True)
    tail_lines = traitlets.Int(TAIL_LINES).tag(sync=True)
    stats_interval = traitlets.Int(STATS_INTERVAL_MS).tag(sync=True)

    @classmethod
    def for_job(cls, job: Job, **kwargs: Any) -> JobView:
        """Return a view of ``job``."""
        return cls(job_id=job.id, name=str(job.data.get("name", "")), **kwargs)

    def __repr__(self) -> str:
        return f"<JobView {self.job_id[:12]} {self.name!r}>"


class JobList(anywidget.AnyWidget):
    """The user's jobs with status, times and a Stop button each, refreshed live."""

    _esm = _module("job_list.js")
    _css = _STATIC / "widgets.css"

    status = traitlets.Unicode("").tag(sync=True)
    limit = traitlets.Int(20).tag(sync=True)
    interval = traitlets.Int(LIST_INTERVAL_MS).tag(sync=True)

    def __repr__(self) -> str:
        return f"<JobList status={self.status or 'any'} limit={self.limit}>"
