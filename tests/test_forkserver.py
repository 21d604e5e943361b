"""Supervisor start modes: the fork server, its prepared supervisor, and their clean-up."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time

import pytest
from conftest import assert_no_leftovers, children_of, wait_for_exit

from jupyter_linuxworker.sandbox.cgroups import JobCgroup
from jupyter_linuxworker.sandbox.forkserver import PENDING_PREFIX, PREPARED_COUNT
from jupyter_linuxworker.sandbox.manager import JobManager
from jupyter_linuxworker.sandbox.store import JobStatus

READY_TIMEOUT = 10.0


def pending_cgroups(manager: JobManager) -> set[str]:
    """Return the names of the pending cgroups below the manager's cgroup parents."""
    return {name for name in manager.cgroups.job_ids() if name.startswith(PENDING_PREFIX)}


def command_line(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as file:
        return file.read()


def pending_of(manager: JobManager, server: int) -> set[str]:
    """Return the names of the pending cgroups that fork server ``server`` made."""
    return {name for name in pending_cgroups(manager) if name.split("-")[1] == str(server)}


async def prepared_supervisors(manager: JobManager) -> list[int]:
    """Wait until the fork server has its prepared supervisors, each with PID 1 in a pending
    cgroup; return their pids."""
    server = manager.launcher.server_pid
    assert server is not None
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        prepared = [pid for pid in children_of(server) if b"(prepared" in command_line(pid)]
        filled = [
            name for name in pending_of(manager, server) if manager.cgroups.for_job(name).pids()
        ]
        if len(prepared) == PREPARED_COUNT and len(filled) == PREPARED_COUNT:
            return prepared
        assert time.monotonic() < deadline, f"{len(prepared)} prepared supervisors appeared"
        await asyncio.sleep(0.02)


async def run_echo(manager: JobManager) -> None:
    job = await manager.submit({"command": "echo hi; echo oops >&2"})
    record = await manager.wait(job.id, timeout=10)
    assert record.status == JobStatus.COMPLETED
    assert manager.read_output(job.id) in (b"hi\noops\n", b"oops\nhi\n")
    assert manager.stderr_ranges(job.id) != []


@pytest.mark.parametrize("mode", ["prepared", "fork", "exec"])
async def test_each_start_mode_runs_jobs(state_dir: str, mode: str) -> None:
    manager = JobManager(state_dir, supervisor_start=mode)  # type: ignore[arg-type]
    await manager.start()
    try:
        for _ in range(3):
            await run_echo(manager)
        assert_no_leftovers(manager)
    finally:
        await manager.close()
    assert pending_cgroups(manager) == set()


async def test_unknown_start_mode_is_rejected(state_dir: str) -> None:
    with pytest.raises(ValueError, match="invalid supervisor start mode 'spawn'"):
        JobManager(state_dir, supervisor_start="spawn")  # type: ignore[arg-type]


async def test_prepared_supervisor_runs_the_job(manager: JobManager) -> None:
    prepared = await prepared_supervisors(manager)
    pending = pending_cgroups(manager)

    job = await manager.submit({"command": "echo hi; sleep 30"})
    while manager.get(job.id).status != JobStatus.RUNNING:
        await asyncio.sleep(0.02)
    info = manager.store.supervisor(job.id)
    assert info is not None
    assert info[0] in prepared

    # Its pending cgroup became the job's cgroup, with the job's processes in it.
    assert len(pending - pending_cgroups(manager)) == 1
    assert len(manager.cgroups.for_job(job.id).pids()) == 2
    title = command_line(info[0])
    assert title.startswith(b"jupyter-linuxworker-supervisor " + manager.jobs_dir.encode())
    record = await manager.stop(job.id, grace=0)
    assert record.status == JobStatus.STOPPED


async def test_close_removes_prepared_supervisor(state_dir: str) -> None:
    manager = JobManager(state_dir)
    await manager.start()
    prepared = await prepared_supervisors(manager)
    server = manager.launcher.server_pid
    assert server is not None
    await manager.close()

    for pid in prepared:
        wait_for_exit(pid)
    wait_for_exit(server)
    assert pending_cgroups(manager) == set()


async def test_killed_fork_server_is_replaced(manager: JobManager) -> None:
    prepared = await prepared_supervisors(manager)
    first = manager.launcher.server_pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    wait_for_exit(first)
    # The prepared supervisors read the end of their sockets and discard their containers.
    for pid in prepared:
        wait_for_exit(pid)

    await run_echo(manager)
    assert manager.launcher.server_pid not in (None, first)
    deadline = time.monotonic() + READY_TIMEOUT
    while pending_of(manager, first):
        assert time.monotonic() < deadline, "the killed server's pending cgroup stayed"
        await asyncio.sleep(0.02)


async def test_killed_prepared_supervisor_is_replaced(manager: JobManager) -> None:
    prepared = await prepared_supervisors(manager)
    os.kill(prepared[0], signal.SIGKILL)
    wait_for_exit(prepared[0])

    # The killed one's PID 1 ends with it, and the fork server removes its pending cgroup.
    # The next jobs still run, and the fork server prepares a replacement.
    await run_echo(manager)
    await run_echo(manager)
    replaced = await prepared_supervisors(manager)
    assert prepared[0] not in replaced
    assert all(manager.cgroups.for_job(name).pids() for name in pending_cgroups(manager))


async def test_start_removes_stale_pending_cgroup(state_dir: str) -> None:
    probe = JobManager(state_dir)
    # The probe keeps the parents locked, so the stale cgroup has a parent to be created in.
    probe.cgroups.acquire()
    # Pids above any pid_max: no fork server or supervisor runs as them.
    stale = probe.cgroups.for_job(f"{PENDING_PREFIX}99999998-99999999")
    stale.create()
    try:
        manager = JobManager(state_dir)
        await manager.start()
        await manager.close()
        assert not stale.exists()
    finally:
        JobCgroup(stale.version, stale.paths).remove()
        probe.cgroups.release()


async def test_start_keeps_pending_cgroup_of_live_supervisor(state_dir: str) -> None:
    """A supervisor can still rename its pending cgroup for a job after its fork server ended."""
    probe = JobManager(state_dir)
    probe.cgroups.acquire()
    stand_in = subprocess.Popen(["sleep", "60"])
    # The fork server's pid is above any pid_max; the supervisor's is a live process.
    pending = probe.cgroups.for_job(f"{PENDING_PREFIX}99999999-{stand_in.pid}")
    pending.create()
    try:
        manager = JobManager(state_dir)
        await manager.start()
        await manager.close()
        assert pending.exists()

        stand_in.kill()
        assert stand_in.wait(timeout=5) == -signal.SIGKILL
        manager = JobManager(state_dir)
        await manager.start()
        await manager.close()
        assert not pending.exists()
    finally:
        if stand_in.poll() is None:
            stand_in.kill()
            stand_in.wait()
        JobCgroup(pending.version, pending.paths).remove()
        probe.cgroups.release()


async def test_jobs_in_a_burst_all_start(manager: JobManager) -> None:
    jobs = await asyncio.gather(*(manager.submit({"command": "echo $$"}) for _ in range(12)))
    records = [await manager.wait(job.id, timeout=20) for job in jobs]
    assert [record.status for record in records] == [JobStatus.COMPLETED] * 12
    # Each command is the first process after init in a PID namespace of its own.
    assert [manager.read_output(job.id) for job in jobs] == [b"2\n"] * 12


def descriptors(pid: int) -> list[str]:
    """Return what each open descriptor of ``pid`` points to."""
    folder = f"/proc/{pid}/fd"
    return [os.readlink(os.path.join(folder, name)) for name in os.listdir(folder)]


async def test_no_descriptors_leak_between_jobs(manager: JobManager) -> None:
    jobs = []
    for _ in range(3):
        await prepared_supervisors(manager)
        jobs.append(await manager.submit({"command": "sleep 30"}))
    for job in jobs:
        while manager.get(job.id).status != JobStatus.RUNNING:
            await asyncio.sleep(0.02)

    # The fork server keeps its request socket and the prepared supervisors', nothing per job.
    server = manager.launcher.server_pid
    assert server is not None
    await prepared_supervisors(manager)
    sockets = [target for target in descriptors(server) if target.startswith("socket:")]
    assert len(sockets) == 1 + PREPARED_COUNT
    for job in jobs:
        info = manager.store.supervisor(job.id)
        assert info is not None
        targets = descriptors(info[0])
        assert [t for t in targets if t.startswith(("socket:", "anon_inode:"))] == []
        # stdin, the log twice, the output log, and the pipes: the wake-up pipe's two ends and
        # the read ends of stdout, stderr and the status pipe.
        assert len(targets) == 9
    for job in jobs:
        await manager.stop(job.id, grace=0)


async def test_failed_supervisor_start_is_recorded(state_dir: str) -> None:
    missing = os.path.join(state_dir, "no-such-python")
    manager = JobManager(state_dir, supervisor_start="exec", python=missing)
    await manager.start()
    try:
        job = await manager.submit({"command": "true"})
        record = await manager.wait(job.id, timeout=5)
    finally:
        await manager.close()

    assert record.status == JobStatus.FAILED
    assert record.reason == "supervisor-error"
    assert record.detail == (
        f"starting the supervisor failed: [Errno 2] No such file or directory: '{missing}'"
    )


async def test_close_right_after_submit_keeps_job(state_dir: str) -> None:
    first = JobManager(state_dir, grace=1.0)
    await first.start()
    job = await first.submit({"command": "sleep 600"})
    await first.close()

    # The supervisor was started before close returned, so the next manager adopts the job.
    second = JobManager(state_dir, grace=1.0)
    await second.start()
    try:
        assert second.get(job.id).status in (JobStatus.PENDING, JobStatus.RUNNING)
        record = await second.stop(job.id, grace=0)
        assert record.status == JobStatus.STOPPED
        assert_no_leftovers(second)
    finally:
        await second.close()
