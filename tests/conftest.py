"""Fixtures shared by the engine tests: a real manager on a fresh state folder, leftover checks."""

from __future__ import annotations

import os
import select
from collections.abc import AsyncIterator

import pytest

from jupyter_linuxworker.sandbox.manager import JobManager

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="jobs need root")


def processes_with_cmdline(*argv: str) -> list[int]:
    """Return the pids on the host whose command line is exactly ``argv``."""
    expected = "\0".join(argv).encode() + b"\0"
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as file:
                if file.read() == expected:
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def children_of(pid: int) -> set[int]:
    """Return the pids whose parent is ``pid``, read from /proc/<pid>/stat."""
    found = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="utf-8") as file:
                stat = file.read()
        except OSError:
            continue
        # The command name in brackets may contain spaces, so fields are counted after it.
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            found.add(int(entry.name))
    return found


def wait_for_exit(pid: int, timeout: float = 10.0) -> None:
    """Wait until process ``pid`` has ended, also when it is not a child; fail after ``timeout``."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        readable, _, _ = select.select([pidfd], [], [], timeout)
        assert readable, f"process {pid} still runs after {timeout} s"
    finally:
        os.close(pidfd)


def mounts_below(path: str) -> list[str]:
    """Return the mount points of this mount namespace that lie below ``path``."""
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as file:
        for line in file:
            mount_point = line.split()[4]
            if mount_point == path or mount_point.startswith(path.rstrip("/") + "/"):
                found.append(mount_point)
    return found


def assert_no_leftovers(manager: JobManager) -> None:
    """Assert that no job of ``manager`` left a cgroup, a process or a mount behind."""
    for record in manager.store.list(limit=1000):
        cgroup = manager.cgroups.for_job(record.id)
        assert not cgroup.exists(), (
            f"job {record.id} ({record.status}) left its cgroup {cgroup.paths}"
        )
        assert record.status.ended, f"job {record.id} is still {record.status}"
    assert mounts_below(manager.state_dir) == []


@pytest.fixture
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("state"))


@pytest.fixture
async def manager(
    state_dir: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[JobManager]:
    """A started manager whose jobs are all stopped and checked for leftovers at the end."""
    volume_root = str(tmp_path_factory.mktemp("volumes"))
    job_manager = JobManager(state_dir, volume_roots=[volume_root], grace=1.0)
    await job_manager.start()
    try:
        yield job_manager
    finally:
        for record in job_manager.store.list(limit=1000):
            if not record.status.ended:
                await job_manager.stop(record.id, grace=0)
        assert_no_leftovers(job_manager)
        await job_manager.close()
