"""The engine's supervisor with timestamps at each start-up step, for the start timeline.

The timeline benchmark points the manager at this file instead of supervisor.py. The fork
server imports it once and calls :func:`main` in each forked child. It wraps the
supervisor's, the container's and PID 1's steps so that each records CLOCK_MONOTONIC (one clock
for all processes) the first time it runs. The records live in an anonymous shared mapping,
because the container child, PID 1 and the command are forked from here and the command closes
every descriptor and leaves the host's root before it execs. Just before the supervisor records
the job's end, it writes the records to trace.json in the job's folder.

Every wrapper adds a few microseconds; the figures are a breakdown, not a replacement for the
untraced start figures.
"""

import time

ENTRY_NS = time.monotonic_ns()

import json  # noqa: E402
import mmap  # noqa: E402
import os  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

EVENTS = (
    "supervisor_entry",
    "supervisor_imported",
    "job_received",
    "supervisor_run",
    "container_start",
    "namespaces_unshared",
    "pid1_start",
    "prepared",
    "cgroup_create",
    "cgroup_rename",
    "cgroup_limits_done",
    "cgroup_joined",
    "container_started",
    "pid1_go",
    "root_ready",
    "pivot_root_done",
    "userns_entered",
    "seccomp_start",
    "seccomp_done",
    "exec",
    "running_recorded",
    "first_output_pump",
    "finish",
)
SLOT = struct.Struct("q")
_shared = mmap.mmap(-1, SLOT.size * len(EVENTS))


def mark(event: str, now: int | None = None) -> None:
    """Record ``event`` at the current time unless it was recorded before."""
    offset = SLOT.size * EVENTS.index(event)
    if SLOT.unpack_from(_shared, offset)[0] == 0:
        SLOT.pack_into(_shared, offset, now if now is not None else time.monotonic_ns())


mark("supervisor_entry", ENTRY_NS)

from jupyter_linuxworker.sandbox import (  # noqa: E402
    cgroups,
    container,
    jobdir,
    outputlog,
    seccomp,
    supervisor,
    syscalls,
)

mark("supervisor_imported")


def wrap(owner: object, name: str, before: str | None = None, after: str | None = None) -> None:
    original = getattr(owner, name)

    def wrapper(*args: object, **kwargs: object) -> object:
        if before:
            mark(before)
        result = original(*args, **kwargs)
        if after:
            mark(after)
        return result

    setattr(owner, name, wrapper)


wrap(jobdir, "redirect_output", before="job_received")
wrap(supervisor.Supervisor, "run", before="supervisor_run")
wrap(container, "_run_container", before="container_start")
wrap(container, "_run_pid1", before="pid1_start")
wrap(container, "prepare_container", after="prepared")
wrap(cgroups.JobCgroup, "create", before="cgroup_create")
wrap(cgroups.JobCgroup, "rename", before="cgroup_rename")
wrap(cgroups.JobCgroup, "apply_limits", after="cgroup_limits_done")
wrap(cgroups.JobCgroup, "join", after="cgroup_joined")
wrap(container, "start_container", before="container_started")
wrap(container, "_wait_for_job", after="pid1_go")
wrap(container, "add_volumes", after="root_ready")
wrap(container, "pivot_root", after="pivot_root_done")
wrap(container, "_enter_userns", after="userns_entered")
wrap(seccomp, "install", before="seccomp_start", after="seccomp_done")
wrap(os, "posix_spawn", before="exec")
wrap(outputlog.OutputWriter, "pump", before="first_output_pump")
wrap(supervisor.Supervisor, "_record_running", after="running_recorded")

_unshare = syscalls.unshare


def _traced_unshare(flags: int) -> None:
    _unshare(flags)
    if flags == container.NAMESPACES:
        mark("namespaces_unshared")


syscalls.unshare = _traced_unshare

_finish = supervisor.Supervisor._finish


def _traced_finish(self: supervisor.Supervisor) -> None:
    mark("finish")
    records = {
        event: SLOT.unpack_from(_shared, SLOT.size * index)[0] for index, event in enumerate(EVENTS)
    }
    with open(os.path.join(self.job_dir, "trace.json"), "w", encoding="ascii") as file:
        json.dump(records, file)
    _finish(self)


supervisor.Supervisor._finish = _traced_finish  # type: ignore[method-assign]

READY_MESSAGE = supervisor.READY_MESSAGE


def _fresh_records() -> None:
    global _shared
    _shared = mmap.mmap(-1, SLOT.size * len(EVENTS))


def supervise(job_dir: str) -> int:
    """Supervise a job in a fresh fork of the fork server, with fresh records."""
    _fresh_records()
    mark("supervisor_entry")
    mark("supervisor_imported")
    return supervisor.supervise(job_dir)


def run_prepared(conn: object, id_map: tuple[int, int], pending: object, root: object) -> int:
    """Prepare a container as the fork server's prepared supervisor, with fresh records."""
    _fresh_records()
    return supervisor.run_prepared(conn, id_map, pending, root)  # type: ignore[arg-type]


def main(argv: list[str]) -> int:
    """Supervise the job in ``argv[1]`` as an exec'd supervisor."""
    return supervisor.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
