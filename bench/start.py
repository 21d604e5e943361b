"""Start: time from submit to the first output byte of `echo hi`, for the engine and its peers."""

from __future__ import annotations

import asyncio
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
from jupyter_linuxworker.sandbox.launcher import StartedSupervisor, StartMode

COMMAND = "echo hi"
# The engine runs a string command as `/bin/sh -c COMMAND` in the image; the peers do the same.
PEER_COMMAND = ["/bin/sh", "-c", COMMAND]
EXPECTED = "hi\n"
JOB_TIMEOUT = 30.0
TIMELINE_GAP = 0.1


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
# The engine with the older ways of starting a supervisor, for the before and after figures.
ENGINE_FORK = "engine, fresh fork per job"
ENGINE_EXEC = "engine, new interpreter per job (before)"
ENGINE_MODES = {ENGINE: "prepared", ENGINE_FORK: "fork", ENGINE_EXEC: "exec"}
ORDER_SEED = 1
METHODS = (
    ENGINE,
    ENGINE_FORK,
    ENGINE_EXEC,
    "REST",
    "bwrap",
    "crun",
    "unshare + chroot",
    "plain exec on the host",
)
# A pause after each round, as between the jobs a user submits: a prepared supervisor is
# forked for the next job in it.
ROUND_GAP = 0.1


async def run(
    managers: dict[str, JobManager],
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
        if name in managers:
            return await engine_once(managers[name])
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
        await asyncio.sleep(ROUND_GAP)
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
# Steps shared by every mode: from PID 1's start message to the first chunk.
_PID1_STEPS = (
    ("container_started", "pid1_go", "PID 1: receive the job's folder"),
    (
        "pid1_go",
        "root_ready",
        "PID 1: read launch.json, unshare the cgroup namespace, mount the volumes (PID 1 "
        "built the root when its container was prepared)",
    ),
    ("root_ready", "pivot_root_done", "PID 1: hostname, pivot_root"),
    ("pivot_root_done", "userns_entered", "PID 1: enter the user namespace"),
    (
        "userns_entered",
        "seccomp_start",
        "PID 1: working folder, signal handlers, descriptors, capabilities",
    ),
    ("seccomp_start", "seccomp_done", "PID 1: load the seccomp filter"),
    ("seccomp_done", "exec", "PID 1: find the program"),
    (
        "exec",
        "first_output_pump",
        "posix_spawn and exec of /bin/sh, `echo hi`, the supervisor wakes on the pipe",
    ),
    ("first_output_pump", "first_chunk", "manager: inotify wake-up, read the log"),
)
_MANAGER_STEP = (
    "submit_called",
    "spawn_called",
    "manager: check the spec, write launch.json, insert the record",
)
TIMELINE_STEPS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "exec": (
        _MANAGER_STEP,
        ("spawn_called", "supervisor_entry", "manager: posix_spawn; Python start-up (-I -S)"),
        ("supervisor_entry", "supervisor_imported", "supervisor: imports"),
        (
            "supervisor_imported",
            "supervisor_run",
            "supervisor: read launch.json, set up logging",
        ),
        ("supervisor_run", "container_start", "supervisor: pipes, fork the container child"),
        ("container_start", "namespaces_unshared", "container child: unshare the namespaces"),
        ("namespaces_unshared", "pid1_start", "container child: fork PID 1"),
        (
            "pid1_start",
            "prepared",
            "container child: create the user namespace; supervisor: write its maps, hand it "
            "and the root to build to PID 1",
        ),
        ("prepared", "cgroup_create", "supervisor: signal handlers"),
        ("cgroup_create", "cgroup_limits_done", "supervisor: create the cgroup, write the limits"),
        ("cgroup_limits_done", "cgroup_joined", "supervisor: move PID 1 into the cgroup"),
        ("cgroup_joined", "container_started", "supervisor: output log"),
        *_PID1_STEPS,
    ),
    "prepared": (
        _MANAGER_STEP,
        (
            "spawn_called",
            "job_received",
            "manager → fork server → prepared supervisor: the job's folder",
        ),
        ("job_received", "supervisor_run", "supervisor: read launch.json, set up logging"),
        ("supervisor_run", "cgroup_rename", "supervisor: signal handlers"),
        (
            "cgroup_rename",
            "cgroup_limits_done",
            "supervisor: rename the prepared cgroup, write the limits",
        ),
        ("cgroup_limits_done", "container_started", "supervisor: output log"),
        *_PID1_STEPS,
    ),
}
TIMELINE_STEPS["fork"] = (
    _MANAGER_STEP,
    (
        "spawn_called",
        "supervisor_entry",
        "manager → fork server: request, fork of a fresh supervisor",
    ),
    *TIMELINE_STEPS["exec"][3:],
)


async def timeline(state_dir: str, runs: int, mode: StartMode, warmup: int = 3) -> dict[str, Any]:
    """Run `echo hi` jobs under the traced supervisor; return the median of each step in seconds."""
    traced = os.path.join(os.path.dirname(os.path.abspath(__file__)), "traced_supervisor.py")
    steps = TIMELINE_STEPS[mode]
    durations: dict[str, list[float]] = {step[2]: [] for step in steps}
    totals: list[float] = []
    running_offsets: list[float] = []
    async with JobManager(state_dir, supervisor_start=mode, supervisor_path=traced) as manager:
        start_supervisor = manager.launcher.start_supervisor
        marks: dict[str, int] = {}

        async def traced_start(job_dir: str) -> StartedSupervisor:
            marks["spawn_called"] = time.monotonic_ns()
            return await start_supervisor(job_dir)

        # The benchmark wraps the launcher's method on purpose, to time the call.
        setattr(manager.launcher, "start_supervisor", traced_start)  # noqa: B010
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
            # An idle moment between jobs, as between the rounds of the start benchmark: the
            # fork server prepares the next container then. Back-to-back starts are measured
            # in the scale section.
            await asyncio.sleep(TIMELINE_GAP)
            if index < warmup:
                continue
            for begin, end, label in steps:
                durations[label].append((marks[end] - marks[begin]) / 1e9)
            totals.append((marks["first_chunk"] - marks["submit_called"]) / 1e9)
            running_offsets.append((marks["running_recorded"] - marks["exec"]) / 1e9)
    return {
        "runs": runs,
        "steps": [(label, percentile(values, 50)) for label, values in durations.items()],
        "total": percentile(totals, 50),
        "running_record": percentile(running_offsets, 50),
    }
