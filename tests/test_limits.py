"""Resource limits on this machine's cgroups: memory, CPU, pids, block IO, usage, defaults."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from conftest import assert_no_leftovers
from test_lifecycle import wait_running

from jupyter_linuxworker.sandbox.cgroupfs import block_device, read_text
from jupyter_linuxworker.sandbox.manager import DEFAULT_MEMORY, DEFAULT_PIDS, JobManager
from jupyter_linuxworker.sandbox.store import JobStatus

MIB = 1024**2


def cgroup_file(manager: JobManager, job_id: str, controller: str, name: str) -> str:
    cgroup = manager.cgroups.for_job(job_id)
    key = "" if cgroup.version == 2 else controller
    return os.path.join(cgroup.paths[key], name)


async def test_out_of_memory_is_reported(manager: JobManager) -> None:
    """R1: an OOM kill is FAILED with reason out-of-memory, read before the cgroup is removed."""
    job = await manager.submit(
        {"command": "dd if=/dev/zero of=/dev/null bs=100M count=1", "memory": "32M"}
    )
    record = await manager.wait(job.id, timeout=10)

    assert record.status == JobStatus.FAILED
    assert record.reason == "out-of-memory"
    assert record.signal == 9
    assert record.exit_code == 137
    assert record.usage["oom_kills"] >= 1
    assert_no_leftovers(manager)


async def test_memory_under_limit_completes(manager: JobManager) -> None:
    small = await manager.submit(
        {"command": "dd if=/dev/zero of=/dev/null bs=48M count=1", "memory": "64M"}
    )
    large = await manager.submit(
        {"command": "dd if=/dev/zero of=/dev/null bs=200M count=1", "memory": "64M"}
    )
    small_record = await manager.wait(small.id, timeout=10)
    large_record = await manager.wait(large.id, timeout=10)

    assert small_record.status == JobStatus.COMPLETED
    assert small_record.usage["oom_kills"] == 0
    assert 48 * MIB <= small_record.usage["memory_peak_bytes"] <= 64 * MIB
    assert large_record.status == JobStatus.FAILED
    assert large_record.reason == "out-of-memory"


async def test_swap_not_usable_beyond_limit(manager: JobManager) -> None:
    job = await manager.submit({"command": "sleep 30", "memory": "64M"})
    await wait_running(manager, job.id)

    limit = read_text(cgroup_file(manager, job.id, "memory", "memory.limit_in_bytes"))
    assert int(limit) == 64 * MIB
    memsw = cgroup_file(manager, job.id, "memory", "memory.memsw.limit_in_bytes")
    if os.path.exists(memsw):
        assert int(read_text(memsw)) == 64 * MIB
    await manager.stop(job.id, grace=0)


async def test_fork_bomb_is_contained(manager: JobManager) -> None:
    """R2: a fork bomb stays within its pids limit and is stopped completely."""
    job = await manager.submit({"command": "f(){ f|f& }; f; sleep 30", "pids": 64})
    await wait_running(manager, job.id)

    # The manager keeps serving requests while the bomb runs.
    latencies = []
    for _ in range(30):
        started = time.monotonic()
        manager.get(job.id)
        latencies.append(time.monotonic() - started)
        await asyncio.sleep(0.1)
    assert max(latencies) < 0.5

    started = time.monotonic()
    record = await manager.stop(job.id)
    # The bomb may hold every pid when the shell forks `sleep`. busybox sh then exits with 2
    # ("can't fork"), so the job ends before the stop.
    if record.status == JobStatus.FAILED:
        assert record.reason == "exit-code"
        assert record.exit_code == 2
    else:
        assert record.status == JobStatus.STOPPED
        assert record.reason == "stopped"
    assert time.monotonic() - started < 1.0 + 2.0
    assert record.usage["pids_peak"] <= 64
    assert_no_leftovers(manager)

    follow_up = await manager.submit({"command": "echo ok"})
    follow_up_record = await manager.wait(follow_up.id, timeout=5)
    assert follow_up_record.status == JobStatus.COMPLETED
    assert manager.read_output(follow_up.id) == b"ok\n"


async def test_cpu_quota_half_a_cpu(manager: JobManager) -> None:
    job = await manager.submit({"command": "while :; do :; done", "cpus": 0.5})
    await wait_running(manager, job.id)
    await asyncio.sleep(0.5)

    first = manager.stats(job.id)["cpu_seconds"]
    started = time.monotonic()
    await asyncio.sleep(3.0)
    second = manager.stats(job.id)["cpu_seconds"]
    rate = (second - first) / (time.monotonic() - started)
    await manager.stop(job.id, grace=0)

    assert 0.4 <= rate <= 0.6


async def test_cpu_weight_written(manager: JobManager) -> None:
    job = await manager.submit({"command": "sleep 30", "cpu_weight": 50, "cpus": 1.5})
    await wait_running(manager, job.id)

    assert read_text(cgroup_file(manager, job.id, "cpu", "cpu.shares")).strip() == "512"
    assert read_text(cgroup_file(manager, job.id, "cpu", "cpu.cfs_quota_us")).strip() == "150000"
    await manager.stop(job.id, grace=0)


async def test_defaults_bound_memory_and_pids(manager: JobManager) -> None:
    job = await manager.submit({"command": "sleep 30"})
    await wait_running(manager, job.id)

    memory = read_text(cgroup_file(manager, job.id, "memory", "memory.limit_in_bytes"))
    pids = read_text(cgroup_file(manager, job.id, "pids", "pids.max"))
    assert int(memory) == DEFAULT_MEMORY
    assert int(pids) == DEFAULT_PIDS
    await manager.stop(job.id, grace=0)


async def test_io_read_rate_limited(manager: JobManager) -> None:
    root = Path(manager.volume_roots[0])
    data = root / "data"
    data.mkdir()
    (data / "blob").write_bytes(os.urandom(8 * MIB))
    device = block_device(str(data))
    assert device is not None

    job = await manager.submit(
        {
            "command": "dd if=/data/blob of=/dev/null bs=1M iflag=direct 2>/dev/null; echo done",
            "volumes": [f"{data}:/data:ro"],
            "io_read_bps": "2M",
        }
    )
    await wait_running(manager, job.id)
    throttle = cgroup_file(manager, job.id, "blkio", "blkio.throttle.read_bps_device")
    assert f"{device} {2 * MIB}" in read_text(throttle)
    record = await manager.wait(job.id, timeout=30)

    assert record.status == JobStatus.COMPLETED
    assert manager.read_output(job.id) == b"done\n"
    assert record.started_at is not None and record.ended_at is not None
    # 8 MiB at 2 MiB/s: about 4 s; the first second may pass before throttling starts.
    assert record.ended_at - record.started_at >= 2.5
    assert record.usage["io_read_bytes"] >= 8 * MIB


async def test_usage_live_and_final(manager: JobManager) -> None:
    job = await manager.submit({"command": "sleep 1; echo x; sleep 30"})
    await wait_running(manager, job.id)
    live = manager.stats(job.id)

    assert live["pids"] >= 2
    assert live["memory_bytes"] > 0
    assert live["cpu_seconds"] >= 0.0

    record = await manager.stop(job.id, grace=0)
    assert set(record.usage) == {
        "cpu_seconds",
        "memory_bytes",
        "memory_peak_bytes",
        "pids",
        "pids_peak",
        "io_read_bytes",
        "io_write_bytes",
        "oom_kills",
    }
    assert manager.stats(job.id) == record.usage
