"""User namespaces that map a job's ids to an unprivileged range of host ids.

Root inside a job is host id ``host_start``; the job's ids 0 to ``size - 1`` are host ids
``host_start`` to ``host_start + size - 1``. The same maps serve the idmapped mounts that make
image files appear owned by the job's root.
"""

from __future__ import annotations

import contextlib
import os
from typing import Final

from . import syscalls

# A range above the ids that Debian and most distributions hand out to users and to
# /etc/subuid (which starts at 100000), sized like one /etc/subuid entry.
DEFAULT_HOST_START: Final = 1_000_000_000
DEFAULT_SIZE: Final = 65536
MAX_ID: Final = 2**32 - 2


def check_id_map(host_start: int, size: int) -> None:
    """Raise ValueError unless host ids ``host_start`` to ``host_start + size - 1`` are usable."""
    if host_start < 1 or size < 1 or host_start + size - 1 > MAX_ID:
        raise ValueError(
            f"invalid id map: host ids {host_start} to {host_start + size - 1}; use a start "
            f"above 0 and a range that ends at or below {MAX_ID}"
        )


def make_userns(uid_map: str, gid_map: str) -> int:
    """Return a descriptor of a new user namespace with the given maps.

    The maps use the kernel's ``inside outside count`` lines. A short-lived child creates the
    namespace; the caller, root on the host, writes its maps, which the child itself could not.
    """
    ready_read, ready_write = os.pipe2(os.O_CLOEXEC)
    done_read, done_write = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        try:
            os.close(ready_read)
            os.close(done_write)
            syscalls.unshare(syscalls.CLONE_NEWUSER)
            os.write(ready_write, b"1")
            os.read(done_read, 1)
        finally:
            os._exit(0)

    os.close(ready_write)
    os.close(done_read)
    try:
        if os.read(ready_read, 1) != b"1":
            raise OSError(f"creating a user namespace failed in child {pid}")
        return map_and_open(pid, uid_map, gid_map)
    finally:
        os.close(ready_read)
        os.close(done_write)
        # The supervisor's SIGCHLD handler may reap the child first.
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def map_and_open(pid: int, uid_map: str, gid_map: str) -> int:
    """Write the maps of the new user namespace of process ``pid``; return a descriptor of it.

    The caller must be root in the parent user namespace, and ``pid`` must stay alive until
    this returns.
    """
    with open(f"/proc/{pid}/uid_map", "w", encoding="ascii") as file:
        file.write(uid_map)
    with open(f"/proc/{pid}/gid_map", "w", encoding="ascii") as file:
        file.write(gid_map)
    return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
