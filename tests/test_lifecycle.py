"""A job's life through the engine: processes, signals, stop, timeout, restart of the manager."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time

from conftest import assert_no_leftovers, processes_with_cmdline, wait_for_exit

from jupyter_linuxworker.sandbox import outputlog
from jupyter_linuxworker.sandbox.cgroups import CgroupLayout
from jupyter_linuxworker.sandbox.manager import JobManager
from jupyter_linuxworker.sandbox.store import JobStatus

GRACE = 1.0  # the grace period of the manager fixture


async def wait_running(manager: JobManager, job_id: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while manager.get(job_id).status != JobStatus.RUNNING:
        assert time.monotonic() < deadline, f"job {job_id} did not reach RUNNING"
        await asyncio.sleep(0.02)


async def test_stop_reaches_setsid_process(manager: JobManager) -> None:
    """L1: a process that left the process group through setsid is stopped too."""
    job = await manager.submit({"command": "setsid sleep 1000 & exec sleep 1000"})
    await wait_running(manager, job.id)
    await asyncio.sleep(1.0)

    started = time.monotonic()
    record = await manager.stop(job.id)
    elapsed = time.monotonic() - started

    assert record.status == JobStatus.STOPPED
    assert elapsed < GRACE + 1.0
    assert processes_with_cmdline("sleep", "1000") == []
    assert_no_leftovers(manager)


async def test_background_child_ends_with_job(manager: JobManager) -> None:
    """L2: a background child does not outlive the job's main command."""
    started = time.monotonic()
    job = await manager.submit({"command": "(sleep 1000 >/dev/null 2>&1 &); echo ok"})
    record = await manager.wait(job.id, timeout=5)

    assert record.status == JobStatus.COMPLETED
    assert record.exit_code == 0
    assert manager.read_output(job.id) == b"ok\n"
    assert time.monotonic() - started < 1.0
    assert processes_with_cmdline("sleep", "1000") == []
    assert_no_leftovers(manager)


async def test_grandchild_holding_stdout_does_not_block(manager: JobManager) -> None:
    """L3: a background grandchild with stdout open does not keep the job or its readers open."""
    started = time.monotonic()
    job = await manager.submit({"command": "sleep 30 & echo started"})

    async def follow() -> tuple[bytes, float]:
        data = b"".join([chunk async for chunk in manager.follow(job.id)])
        return data, time.monotonic() - started

    results = await asyncio.gather(follow(), follow(), follow())
    record = await manager.wait(job.id, timeout=5)

    assert record.status == JobStatus.COMPLETED
    assert record.exit_code == 0
    assert manager.read_output(job.id) == b"started\n"
    for data, elapsed in results:
        assert data == b"started\n"
        assert elapsed < 1.5
    assert record.ended_at is not None
    assert record.ended_at - record.created_at < 1.5
    assert processes_with_cmdline("sleep", "30") == []


async def test_sigterm_ignored_is_killed_after_grace(manager: JobManager) -> None:
    """L4: a job that ignores SIGTERM is killed with SIGKILL after the grace period."""
    job = await manager.submit({"command": "trap '' TERM; while :; do sleep 1; done"})
    await wait_running(manager, job.id)
    await asyncio.sleep(1.0)

    started = time.monotonic()
    record = await manager.stop(job.id)
    elapsed = time.monotonic() - started

    assert record.status == JobStatus.STOPPED
    assert record.signal == 9
    assert record.exit_code == 137
    assert GRACE <= elapsed < GRACE + 1.0
    assert_no_leftovers(manager)


async def test_stop_right_after_submit(manager: JobManager) -> None:
    """L5: stop called as soon as submit returns, 50 times."""
    for _ in range(50):
        job = await manager.submit({"command": "sleep 1234"})
        started = time.monotonic()
        record = await manager.stop(job.id)
        assert record.status == JobStatus.STOPPED
        assert time.monotonic() - started < 2.0
    assert processes_with_cmdline("sleep", "1234") == []
    assert_no_leftovers(manager)


async def test_signals_are_reported(manager: JobManager) -> None:
    """L6: a job killed by a signal it raised is FAILED with the signal, never COMPLETED."""
    term = await manager.submit({"command": "kill -TERM $$"})
    kill = await manager.submit({"command": "kill -KILL $$"})
    exit3 = await manager.submit({"command": "exit 3"})

    term_record = await manager.wait(term.id, timeout=5)
    kill_record = await manager.wait(kill.id, timeout=5)
    exit3_record = await manager.wait(exit3.id, timeout=5)

    assert (term_record.status, term_record.exit_code, term_record.signal) == (
        JobStatus.FAILED,
        143,
        15,
    )
    assert term_record.reason == "signal"
    assert (kill_record.status, kill_record.exit_code, kill_record.signal) == (
        JobStatus.FAILED,
        137,
        9,
    )
    assert (exit3_record.status, exit3_record.exit_code, exit3_record.signal) == (
        JobStatus.FAILED,
        3,
        None,
    )
    assert exit3_record.reason == "exit-code"


async def test_stop_is_idempotent(manager: JobManager) -> None:
    job = await manager.submit({"command": "sleep 100"})
    await wait_running(manager, job.id)

    first, second = await asyncio.gather(manager.stop(job.id), manager.stop(job.id))
    third = await manager.stop(job.id)

    assert first.status == second.status == third.status == JobStatus.STOPPED
    assert third.ended_at == first.ended_at


async def test_stop_grace_override(manager: JobManager) -> None:
    job = await manager.submit({"command": "trap '' TERM; while :; do sleep 1; done"})
    await wait_running(manager, job.id)
    await asyncio.sleep(0.3)

    started = time.monotonic()
    record = await manager.stop(job.id, grace=0.2)

    assert record.status == JobStatus.STOPPED
    assert record.signal == 9
    assert 0.2 <= time.monotonic() - started < 1.0


async def test_timeout_fails_job(manager: JobManager) -> None:
    job = await manager.submit({"command": "echo before; sleep 100", "timeout": "1s"})
    record = await manager.wait(job.id, timeout=5)

    assert record.status == JobStatus.FAILED
    assert record.reason == "timeout"
    assert record.detail == "timed out after 1 s"
    assert record.started_at is not None and record.ended_at is not None
    assert 1.0 <= record.ended_at - record.started_at < 1.0 + GRACE + 1.0
    assert manager.read_output(job.id) == b"before\n"


async def test_twenty_jobs_at_once(manager: JobManager) -> None:
    jobs = [
        await manager.submit({"command": f"echo job-{i}; sleep 0.5; echo done-{i}"})
        for i in range(20)
    ]
    records = await asyncio.gather(*(manager.wait(job.id, timeout=30) for job in jobs))

    for i, (job, record) in enumerate(zip(jobs, records, strict=True)):
        assert record.status == JobStatus.COMPLETED
        assert manager.read_output(job.id) == f"job-{i}\ndone-{i}\n".encode()
    assert_no_leftovers(manager)


async def test_exec_error_is_reported(manager: JobManager) -> None:
    job = await manager.submit({"command": ["/usr/bin/no-such-program", "x"]})
    record = await manager.wait(job.id, timeout=5)

    assert record.status == JobStatus.FAILED
    assert record.exit_code == 127
    assert record.reason == "exec-error"
    assert (
        record.detail
        == "could not execute '/usr/bin/no-such-program': No such file or directory (errno 2)"
    )


async def test_argv_command_runs_without_shell(manager: JobManager) -> None:
    job = await manager.submit({"command": ["echo", "a b", "$HOME"]})
    record = await manager.wait(job.id, timeout=5)

    assert record.status == JobStatus.COMPLETED
    assert manager.read_output(job.id) == b"a b $HOME\n"


async def test_job_folder_has_four_files(manager: JobManager) -> None:
    """A job with only stdout leaves four files, since every file costs an inode to allocate."""
    job = await manager.submit({"command": "echo hi"})
    record = await manager.wait(job.id, timeout=5)

    assert record.status == JobStatus.COMPLETED
    assert sorted(os.listdir(os.path.join(manager.jobs_dir, job.id))) == [
        "launch.json",
        "output.log",
        "state.json",
        "supervisor.log",
    ]
    info = manager.store.supervisor(job.id)
    assert info is not None
    assert info[0] > 1
    assert info[1] > 0
    with open(os.path.join(manager.jobs_dir, job.id, "supervisor.log"), encoding="utf-8") as file:
        last_line = file.read().splitlines()[-1]
    assert last_line.endswith(f" INFO job {job.id}: ended COMPLETED (exit code 0)")


async def test_manager_restart_adopts_running_job(state_dir: str) -> None:
    """X1 at the engine level: a new manager on the same state folder adopts running jobs."""
    first = JobManager(state_dir, grace=1.0)
    await first.start()
    sleeper = await first.submit({"command": "echo begin; sleep 600"})
    failing = await first.submit({"command": "sleep 2; echo e >&2; exit 3"})
    await wait_running(first, sleeper.id)
    await asyncio.sleep(0.5)
    await first.close()

    second = JobManager(state_dir, grace=1.0)
    started = time.monotonic()
    await second.start()
    try:
        assert second.get(sleeper.id).status == JobStatus.RUNNING
        assert time.monotonic() - started < 5.0
        assert second.read_output(sleeper.id) == b"begin\n"

        failed = await second.wait(failing.id, timeout=10)
        assert failed.status == JobStatus.FAILED
        assert failed.exit_code == 3
        assert second.read_output(failing.id) == b"e\n"

        stopped = await second.stop(sleeper.id)
        assert stopped.status == JobStatus.STOPPED
        assert_no_leftovers(second)
    finally:
        await second.close()


async def test_supervisor_killed_job_is_lost(manager: JobManager) -> None:
    job = await manager.submit({"command": "sleep 600"})
    await wait_running(manager, job.id)
    supervisor = manager.store.supervisor(job.id)
    assert supervisor is not None

    os.kill(supervisor[0], signal.SIGKILL)
    record = await manager.wait(job.id, timeout=5)

    assert record.status == JobStatus.LOST
    assert record.reason == "lost"
    assert not manager.cgroups.for_job(job.id).exists()
    assert processes_with_cmdline("sleep", "600") == []


async def test_lost_job_keeps_no_blocks_past_its_log(manager: JobManager) -> None:
    size = 3 * 1024**2
    job = await manager.submit({"command": "dd if=/dev/zero bs=1M count=3 2>/dev/null; sleep 600"})
    log_path = os.path.join(manager.jobs_dir, job.id, outputlog.LOG_NAME)
    deadline = time.monotonic() + 5
    while manager.get(job.id).output_size < size and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    # The supervisor allocated the log's blocks ahead of its bytes.
    assert os.stat(log_path).st_blocks * 512 > size + 4096
    supervisor = manager.store.supervisor(job.id)
    assert supervisor is not None

    os.kill(supervisor[0], signal.SIGKILL)
    record = await manager.wait(job.id, timeout=5)

    assert record.status == JobStatus.LOST
    assert record.output_size == size
    assert manager.read_output(job.id) == bytes(size)
    assert size <= os.stat(log_path).st_blocks * 512 <= size + 4 * 4096
    assert processes_with_cmdline("sleep", "600") == []
    assert_no_leftovers(manager)


async def test_lost_while_no_manager_runs(state_dir: str) -> None:
    first = JobManager(state_dir, grace=1.0)
    await first.start()
    job = await first.submit({"command": "sleep 600"})
    await wait_running(first, job.id)
    supervisor = first.store.supervisor(job.id)
    await first.close()
    assert supervisor is not None
    os.kill(supervisor[0], signal.SIGKILL)
    wait_for_exit(supervisor[0])

    second = JobManager(state_dir, grace=1.0)
    await second.start()
    try:
        record = second.get(job.id)
        assert record.status == JobStatus.LOST
        assert processes_with_cmdline("sleep", "600") == []
        assert_no_leftovers(second)
    finally:
        await second.close()


async def test_start_removes_leftover_cgroup(state_dir: str) -> None:
    # Holding the parents keeps them after the first manager closes, as a crash would.
    holder = CgroupLayout.detect()
    holder.acquire()
    first = JobManager(state_dir, grace=1.0)
    await first.start()
    job = await first.submit({"command": "true"})
    await first.wait(job.id, timeout=5)
    await first.close()

    # As if a crash had left the ended job's cgroup behind with a process in it.
    cgroup = first.cgroups.for_job(job.id)
    cgroup.create()
    straggler = subprocess.Popen(["sleep", "2345"])
    try:
        cgroup.join(straggler.pid)
        second = JobManager(state_dir, grace=1.0)
        await second.start()
        await second.close()
        assert straggler.wait(timeout=5) == -signal.SIGKILL
        assert not cgroup.exists()
    finally:
        if straggler.poll() is None:
            straggler.kill()
            straggler.wait()
        if cgroup.exists():
            cgroup.remove()
        holder.release()
