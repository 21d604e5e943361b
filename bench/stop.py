"""Stop: from the stop request to STOPPED, for jobs that exit on SIGTERM and that ignore it."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

from common import Samples

from jupyter_linuxworker.sandbox import JobManager, JobStatus

# Each prints a line once its command runs, so the stop is sent to a started job.
EXITS_ON_TERM = "echo ready; exec sleep 600"
IGNORES_TERM = "trap '' TERM; echo ready; while :; do sleep 1; done"
IGNORED_GRACE = 1.0
TERM_GRACE = 5.0  # the default; the job exits on SIGTERM long before it


@dataclass
class StopResults:
    runs: int = 0
    on_term: Samples = field(default_factory=Samples)
    ignored: Samples = field(default_factory=Samples)
    errors: list[str] = field(default_factory=list)


async def stop_once(manager: JobManager, command: str, grace: float) -> float | None:
    job = await manager.submit({"command": command})
    async with contextlib.aclosing(manager.follow(job.id)) as chunks:
        async for _chunk in chunks:
            break
    start = time.perf_counter()
    record = await manager.stop(job.id, grace=grace)
    seconds = time.perf_counter() - start
    await manager.delete(job.id)
    if record.status != JobStatus.STOPPED:
        raise RuntimeError(f"job {job.id} ended {record.status.value}, expected STOPPED")
    return seconds


async def run(state_dir: str, runs: int, warmup: int = 1) -> StopResults:
    """Alternate the two kinds of job, ``runs`` times each after ``warmup`` rounds."""
    results = StopResults(runs=runs)
    async with JobManager(state_dir) as manager:
        for index in range(warmup + runs):
            on_term = await stop_once(manager, EXITS_ON_TERM, TERM_GRACE)
            ignored = await stop_once(manager, IGNORES_TERM, IGNORED_GRACE)
            if index >= warmup and on_term is not None and ignored is not None:
                results.on_term.add(on_term)
                results.ignored.add(ignored)
    return results
