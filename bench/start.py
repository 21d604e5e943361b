"""Start: time from submit to the first output byte of `echo hi`, for the engine and its peers."""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

from common import Api, Samples, percentile
from peers import CrunPeer, bwrap_argv, time_first_byte, unshare_argv

from jupyter_linuxworker.sandbox import JobManager
from jupyter_linuxworker.sandbox import manager as manager_module

COMMAND = "echo hi"
# The engine runs a string command as `/bin/sh -c COMMAND` in the image; the peers do the same.
PEER_COMMAND = ["/bin/sh", "-c", COMMAND]
EXPECTED = "hi\n"
JOB_TIMEOUT = 30.0


@dataclass
class StartResults:
    rounds: int = 0
    warmup: int = 0
    samples: dict[str, Samples] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    commands: dict[str, str] = field(default_factory=dict)
    idle_get: Samples = field(default_factory=Samples)


async def engine_once(manager: JobManager) -> float:
    """Submit `echo hi` in-process and follow it until the first chunk; return the seconds."""
    start = time.perf_counter()
    job = await manager.submit({"command": COMMAND})
    first = b""
    async with contextlib.aclosing(manager.follow(job.id)) as chunks:
        async for chunk in chunks:
            first = chunk
            break
    seconds = time.perf_counter() - start
    record = await manager.wait(job.id, timeout=JOB_TIMEOUT)
    await manager.delete(job.id)
    if not first.startswith(b"h") or record.status.value != "COMPLETED":
        raise RuntimeError(f"engine job {job.id}: {record.status.value}, output {first!r}")
    return seconds


def rest_once(api: Api, follower: Api) -> float:
    """POST `echo hi`, then GET its output (follow=1) up to the first byte; return seconds."""
    start = time.perf_counter()
    job = api.submit({"command": COMMAND})
    response = follower.open_output(job["id"])
    first = response.read1(65536)
    seconds = time.perf_counter() - start
    response.read()
    api.delete(job["id"])
    if not first.startswith(b"h"):
        raise RuntimeError(f"REST job {job['id']}: first output {first!r}")
    return seconds


def check_peer(name: str, result: dict[str, Any], results: StartResults) -> float | None:
    if result["rc"] == 0 and result["output"] == EXPECTED:
        return float(result["seconds"])
    results.failures.setdefault(
        name, f"exit code {result['rc']}, output {result['output']!r}: {result['errors'].strip()}"
    )
    return None


ENGINE = "engine (in-process)"
ORDER_SEED = 1
METHODS = (ENGINE, "REST", "bwrap", "crun", "unshare + chroot", "plain exec on the host")


async def run(
    manager: JobManager,
    api: Api,
    rootfs: str,
    crun: CrunPeer | None,
    crun_error: str | None,
    rounds: int,
    warmup: int,
) -> StartResults:
    """Run every method once per round, so that a change in load reaches them all.

    Each round has its own random order (seeded, so reruns repeat it). A method then does not
    always follow the same one, whose clean-up, such as a network namespace's teardown in the
    kernel, may still be running.
    """
    results = StartResults(rounds=rounds, warmup=warmup)
    follower = Api(api.port, api.token)
    peers = {
        "bwrap": bwrap_argv(rootfs, PEER_COMMAND),
        "unshare + chroot": unshare_argv(rootfs, PEER_COMMAND),
        "plain exec on the host": PEER_COMMAND,
    }
    results.samples = {name: Samples() for name in METHODS}
    if crun is None:
        results.failures["crun"] = crun_error or "crun is not available"

    async def run_method(name: str) -> float | None:
        if name == ENGINE:
            return await engine_once(manager)
        if name == "REST":
            return rest_once(api, follower)
        if name == "crun":
            if crun is None or "crun" in results.failures:
                return None
            return check_peer(name, crun.run(), results)
        return check_peer(name, time_first_byte(peers[name]), results)

    order = random.Random(ORDER_SEED)
    for index in range(warmup + rounds):
        for name in order.sample(METHODS, len(METHODS)):
            seconds = await run_method(name)
            if index >= warmup and seconds is not None:
                results.samples[name].add(seconds)
    follower.close()
    results.idle_get = idle_get_latency(api)
    return results


def idle_get_latency(api: Api, count: int = 300) -> Samples:
    """Time GET jobs/ID of one running job on an otherwise idle server, as a baseline."""
    job = api.submit({"command": "sleep 600"})
    samples = Samples()
    try:
        for _ in range(count):
            start = time.perf_counter()
            status, _body = api.request("GET", f"jobs/{job['id']}")
            samples.add(time.perf_counter() - start)
            if status != 200:
                raise RuntimeError(f"GET jobs/{job['id']} returned {status}")
    finally:
        api.stop(job["id"], grace=0)
        api.delete(job["id"])
    return samples


# -- where the engine's start time goes ------------------------------------------------------

# Consecutive events on the way from submit to the first byte, with what happens in between.
TIMELINE_STEPS = (
    (
        "submit_called",
        "spawn_called",
        "manager: check the spec, write launch.json, insert the record",
    ),
    ("spawn_called", "spawn_returned", "manager: posix_spawn of the supervisor"),
    ("spawn_returned", "supervisor_entry", "supervisor: exec and Python start-up (-I -S)"),
    ("supervisor_entry", "supervisor_imported", "supervisor: imports"),
    (
        "supervisor_imported",
        "supervisor_run",
        "supervisor: read launch.json, write supervisor.json",
    ),
    ("supervisor_run", "cgroup_create", "supervisor: signal handlers, subreaper"),
    ("cgroup_create", "cgroup_limits_done", "supervisor: create the cgroup, write the limits"),
    ("cgroup_limits_done", "userns_done", "supervisor: create the user namespace"),
    ("userns_done", "container_start", "supervisor: output writer, pipes, fork"),
    ("container_start", "cgroup_joined", "container child: join the cgroup"),
    ("cgroup_joined", "namespaces_unshared", "container child: unshare the namespaces"),
    ("namespaces_unshared", "pid1_start", "container child: fork PID 1"),
    ("pid1_start", "root_ready", "PID 1: build the root (tmpfs, idmapped image, overlay, mounts)"),
    ("root_ready", "pivot_root_done", "PID 1: hostname, loopback, pivot_root"),
    ("pivot_root_done", "userns_entered", "PID 1: enter the user namespace"),
    ("userns_entered", "command_child_start", "PID 1: working folder, signal handlers, fork"),
    ("command_child_start", "seccomp_start", "command: signals, descriptors, capabilities"),
    ("seccomp_start", "seccomp_done", "command: build and load the seccomp filter"),
    ("seccomp_done", "exec", "command: until exec"),
    ("exec", "first_output_pump", "exec /bin/sh, `echo hi`, supervisor wakes on the pipe"),
    ("first_output_pump", "first_chunk", "manager: inotify wake-up, read the log"),
)


async def timeline(state_dir: str, runs: int, warmup: int = 3) -> dict[str, Any]:
    """Run `echo hi` jobs under the traced supervisor; return the median of each step in seconds."""
    traced = os.path.join(os.path.dirname(os.path.abspath(__file__)), "traced_supervisor.py")
    durations: dict[str, list[float]] = {step[2]: [] for step in TIMELINE_STEPS}
    totals: list[float] = []
    running_offsets: list[float] = []
    original_path = manager_module.SUPERVISOR_PATH
    # SUPERVISOR_PATH is Final for the engine's own code; the benchmark swaps it on purpose.
    setattr(manager_module, "SUPERVISOR_PATH", traced)  # noqa: B010
    try:
        async with JobManager(state_dir) as manager:
            spawn = manager._spawn_supervisor
            marks: dict[str, int] = {}

            def traced_spawn(job_dir: str) -> int:
                marks["spawn_called"] = time.monotonic_ns()
                pid: int = spawn(job_dir)
                marks["spawn_returned"] = time.monotonic_ns()
                return pid

            manager._spawn_supervisor = traced_spawn
            for index in range(warmup + runs):
                marks.clear()
                marks["submit_called"] = time.monotonic_ns()
                job = await manager.submit({"command": COMMAND})
                async with contextlib.aclosing(manager.follow(job.id)) as chunks:
                    async for _chunk in chunks:
                        marks["first_chunk"] = time.monotonic_ns()
                        break
                await manager.wait(job.id, timeout=JOB_TIMEOUT)
                trace_path = os.path.join(manager.jobs_dir, job.id, "trace.json")
                with open(trace_path, encoding="ascii") as file:
                    marks.update(json.load(file))
                await manager.delete(job.id)
                if index < warmup:
                    continue
                for begin, end, label in TIMELINE_STEPS:
                    durations[label].append((marks[end] - marks[begin]) / 1e9)
                totals.append((marks["first_chunk"] - marks["submit_called"]) / 1e9)
                running_offsets.append((marks["running_recorded"] - marks["pid1_message"]) / 1e9)
    finally:
        setattr(manager_module, "SUPERVISOR_PATH", original_path)  # noqa: B010
    return {
        "runs": runs,
        "steps": [(label, percentile(values, 50)) for label, values in durations.items()],
        "total": percentile(totals, 50),
        "running_record": percentile(running_offsets, 50),
    }
