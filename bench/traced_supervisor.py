"""The engine's supervisor with timestamps at each start-up step, for the start timeline.

The timeline benchmark points the manager at this file instead of supervisor.py. It wraps the
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
    "supervisor_run",
    "cgroup_create",
    "cgroup_limits_done",
    "userns_done",
    "container_start",
    "cgroup_joined",
    "namespaces_unshared",
    "pid1_start",
    "root_ready",
    "pivot_root_done",
    "userns_entered",
    "command_child_start",
    "seccomp_start",
    "seccomp_done",
    "exec",
    "pid1_message",
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


wrap(supervisor.Supervisor, "run", before="supervisor_run")
wrap(cgroups.JobCgroup, "create", before="cgroup_create")
wrap(cgroups.JobCgroup, "apply_limits", after="cgroup_limits_done")
wrap(cgroups.JobCgroup, "join", after="cgroup_joined")
wrap(supervisor.Supervisor, "_make_user_namespaces", after="userns_done")
wrap(container, "run_container", before="container_start")
wrap(container, "_run_pid1", before="pid1_start")
wrap(container, "setup_root", after="root_ready")
wrap(container, "pivot_root", after="pivot_root_done")
wrap(container, "_enter_userns", after="userns_entered")
wrap(container, "_exec_command", before="command_child_start")
wrap(seccomp, "install", before="seccomp_start", after="seccomp_done")
wrap(os, "execvpe", before="exec")
wrap(outputlog.OutputWriter, "pump", before="first_output_pump")

_unshare = syscalls.unshare


def _traced_unshare(flags: int) -> None:
    _unshare(flags)
    if flags == container.NAMESPACES:
        mark("namespaces_unshared")


syscalls.unshare = _traced_unshare

_on_status_line = supervisor.Supervisor._on_status_line


def _traced_status_line(self: supervisor.Supervisor, line: bytes) -> None:
    is_pid1 = b'"pid1"' in line
    if is_pid1:
        mark("pid1_message")
    _on_status_line(self, line)
    if is_pid1:
        mark("running_recorded")


supervisor.Supervisor._on_status_line = _traced_status_line  # type: ignore[method-assign]

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

if __name__ == "__main__":
    sys.exit(supervisor.main(sys.argv))
