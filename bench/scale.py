"""Scale: many concurrent `sleep 600` jobs: start rate, host memory per job, REST latency."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import statistics
import subprocess
import time
from dataclasses import dataclass, field

from common import ALICE, BOB, Api, Samples, file_system, start_server
from output import Followers, process_cpu_seconds

from jupyter_linuxworker.sandbox import JobManager, JobNotFound, JobStatus, jobdir

COMMAND = "sleep 600"
# The job the followers stream during the latency test: 64 KiB about 20 times a second.
STREAM_COMMAND = "while :; do head -c 65536 /dev/zero; sleep 0.05; done"
RUNNING_TIMEOUT = 300.0
# Bursts of `count` jobs whose start rate is measured. The report gives their median, because
# the rate of a single burst of 200 ranged from 72 to 138 starts/s across full runs on a 2-core
# test machine. The last burst stays up for the memory and latency figures.
START_BURSTS = 3
# The same bursts again with the state folder on a tmpfs, alternating with the others. To
# allocate an inode, ext4 without a journal passes over each free inode deleted in the last
# 60 s, or 360 s while its inode table block is dirty. It checks the deletion time of each in
# the buffer cache, in recently_deleted() of fs/ext4/ialloc.c. Each burst but the first follows the
# deletion of the jobs before it, so there the next burst's job files cost more to create. A
# tmpfs has no such check.
TMPFS_SIZE = "1g"
# The bursts also run on ext4 with a journal, the default of mkfs.ext4, in a sparse image file
# mounted through a loop device. With a journal, ext4 skips that check.
JOURNAL_IMAGE_SIZE = "2G"


@dataclass
class ScaleResults:
    jobs: int = 0
    followers: int = 0
    requests: int = 0
    submit_seconds: float = 0.0  # the submit() calls alone, in the last burst
    all_running_seconds: float = 0.0  # first submit to the last job's started_at, last burst
    start_rates: Samples = field(default_factory=Samples)  # starts per second of each burst
    tmpfs_rates: Samples = field(default_factory=Samples)  # the same, state folder on a tmpfs
    tmpfs_error: str = ""
    journal_rates: Samples = field(default_factory=Samples)  # the same, on ext4 with a journal
    journal_error: str = ""
    journal_file_system: str = ""  # what file_system() reports for that mount
    state_file_system: str = ""  # the file system of the state folder of the other bursts
    # CPU seconds of each supervisor and of each job's cgroup, read 2 s after the last start.
    supervisor_cpu: Samples = field(default_factory=Samples)
    job_cpu: Samples = field(default_factory=Samples)
    pss: Samples = field(default_factory=Samples)  # bytes per supervisor
    # PSS bytes of the fork server and of its prepared supervisors and their PID 1, which
    # serve every job.
    shared_pss: int = 0
    rss: Samples = field(default_factory=Samples)
    private: Samples = field(default_factory=Samples)
    host_delta_per_job: float | None = None  # bytes: used memory growth minus the jobs' cgroups
    cgroup_per_job: float | None = None  # bytes charged to each job's own cgroup
    server_start_seconds: float = 0.0
    get_latency: Samples = field(default_factory=Samples)
    stream_bytes: list[int] = field(default_factory=list)
    stop_all_seconds: float = 0.0
    left_running: list[str] = field(default_factory=list)
    left_cgroups: list[str] = field(default_factory=list)
    left_supervisors: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def pss_mean(self) -> float:
        return statistics.fmean(self.pss.values) if self.pss.values else float("nan")

    @property
    def rss_mean(self) -> float:
        return statistics.fmean(self.rss.values) if self.rss.values else float("nan")

    @property
    def private_mean(self) -> float:
        return statistics.fmean(self.private.values) if self.private.values else float("nan")


def memory_used() -> int:
    """Return MemTotal - MemAvailable in bytes."""
    values = {}
    with open("/proc/meminfo", encoding="ascii") as file:
        for line in file:
            name, rest = line.split(":", 1)
            values[name] = int(rest.split()[0]) * 1024
    return values["MemTotal"] - values["MemAvailable"]


def smaps_rollup(pid: int) -> dict[str, int]:
    """Return the fields of /proc/PID/smaps_rollup in bytes."""
    found = {}
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as file:
        for line in file:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                found[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return found


def supervisor_pid(manager: JobManager, job_id: str) -> int | None:
    info = manager.store.supervisor(job_id)
    return info[0] if info else None


def cgroup_memory(manager: JobManager, job_id: str) -> int:
    path = manager.cgroups.for_job(job_id).paths.get("memory")
    if path is None:  # cgroup v2: one folder
        path = manager.cgroups.for_job(job_id).paths.get("", "")
        name = "memory.current"
    else:
        name = "memory.usage_in_bytes"
    try:
        with open(os.path.join(path, name), encoding="ascii") as file:
            return int(file.read())
    except OSError:
        return 0


async def submit_burst(manager: JobManager, count: int, ids: list[str]) -> tuple[float, float]:
    """Submit ``count`` jobs, adding their ids to ``ids``, and wait until all run.

    Return the seconds the submit calls took, and from the first submit to the last start.
    """
    first_submit = time.time()
    for _ in range(count):
        record = await manager.submit({"command": COMMAND}, owner="alice")
        ids.append(record.id)
    submit_seconds = time.time() - first_submit

    deadline = time.monotonic() + RUNNING_TIMEOUT
    started: dict[str, float] = {}
    while len(started) < count and time.monotonic() < deadline:
        # started_at comes from the supervisors, so a slow poll does not change the figure.
        await asyncio.sleep(0.25)
        for job_id in ids:
            if job_id in started:
                continue
            job = manager.get(job_id)
            if job.status == JobStatus.RUNNING and job.started_at is not None:
                started[job_id] = job.started_at
            elif job.status.ended:
                raise RuntimeError(f"job {job_id} ended early: {job.status} {job.detail}")
    if len(started) < count:
        raise RuntimeError(f"{count - len(started)} jobs not RUNNING after {RUNNING_TIMEOUT} s")
    return submit_seconds, max(started.values()) - first_submit


async def rate_burst(state_dir: str, count: int, rates: Samples) -> None:
    """Start ``count`` jobs for their start rate alone, add it to ``rates``, stop, delete them."""
    ids: list[str] = []
    async with JobManager(state_dir) as manager:
        try:
            _submit, running = await submit_burst(manager, count, ids)
            rates.add(count / running)
        finally:
            pids = [supervisor_pid(manager, job_id) for job_id in ids]
            await asyncio.gather(*(manager.stop(job_id, grace=0) for job_id in ids))
            await wait_for_exit([pid for pid in pids if pid is not None])
            for job_id in ids:
                await manager.delete(job_id)


async def start_jobs(state_dir: str, count: int, ids: list[str], results: ScaleResults) -> None:
    """Submit ``count`` jobs in-process, adding their ids to ``ids``; wait until all run."""
    async with JobManager(state_dir) as manager:
        used_before = memory_used()
        results.submit_seconds, results.all_running_seconds = await submit_burst(
            manager, count, ids
        )
        results.start_rates.add(count / results.all_running_seconds)

        # Let the last starts settle before memory is read.
        await asyncio.sleep(2)
        used_after = memory_used()
        charged = 0
        for job_id in ids:
            pid = supervisor_pid(manager, job_id)
            if pid is None:
                continue
            results.supervisor_cpu.add(process_cpu_seconds(pid))
            job_cpu = manager.cgroups.for_job(job_id).usage().get("cpu_seconds")
            if job_cpu is not None:
                results.job_cpu.add(job_cpu)
            rollup = smaps_rollup(pid)
            results.pss.add(rollup.get("Pss", 0))
            results.rss.add(rollup.get("Rss", 0))
            results.private.add(rollup.get("Private_Clean", 0) + rollup.get("Private_Dirty", 0))
            charged += cgroup_memory(manager, job_id)
        results.cgroup_per_job = charged / count
        results.shared_pss = shared_pss(manager)
        results.host_delta_per_job = (used_after - used_before - charged) / count


def shared_pss(manager: JobManager) -> int:
    """Return the PSS of the fork server and of its prepared supervisors with their PID 1."""
    server = manager.launcher.server_pid
    if server is None:
        return 0
    total = smaps_rollup(server).get("Pss", 0)
    # A supervisor that runs a job is counted with its job. The prepared one and its PID 1
    # have no job yet, so they count as overhead shared by all jobs.
    for pid in children_of(server):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as file:
                title = file.read()
        except OSError:
            continue
        if b"(prepared" in title:
            for member in (pid, *descendants(pid)):
                total += smaps_rollup(member).get("Pss", 0)
    return total


def children_of(pid: int) -> list[int]:
    """Return the pids whose parent is ``pid``."""
    return [child for child, parent in _parents().items() if parent == pid]


def _parents() -> dict[int, int]:
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as file:
                stat = file.read()
        except OSError:
            continue
        parents[int(entry.name)] = int(stat[stat.rindex(b")") + 2 :].split()[1])
    return parents


def descendants(pid: int) -> list[int]:
    """Return the pids below ``pid`` in the process tree."""
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found: list[int] = []
    queue = [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def get_latency(api: Api, ids: list[str], requests: int, results: ScaleResults) -> None:
    rng = random.Random(1)
    for _ in range(requests):
        job_id = rng.choice(ids)
        start = time.perf_counter()
        status, _job = api.request("GET", f"jobs/{job_id}")
        results.get_latency.add(time.perf_counter() - start)
        if status != 200:
            results.errors.append(f"GET jobs/{job_id} returned {status}")
            return


async def wait_for_exit(pids: list[int], timeout: float = 10.0) -> list[int]:
    """Reap or wait for the supervisors, which exit just after they record the job's end.

    Return the pids still running a supervisor after ``timeout`` seconds. The harness spawned
    them through its first manager, so it reaps those that are its children.
    """
    deadline = time.monotonic() + timeout
    left = set(pids)
    while left and time.monotonic() < deadline:
        for pid in list(left):
            try:
                reaped, _status = os.waitpid(pid, os.WNOHANG)
                if reaped == pid:
                    left.discard(pid)
                    continue
            except ChildProcessError:
                pass
            if not _is_supervisor(pid):
                left.discard(pid)
        if left:
            await asyncio.sleep(0.05)
    return sorted(left)


def _is_supervisor(pid: int) -> bool:
    """Return whether ``pid`` is alive and runs supervisor.py (a reused pid runs something else)."""
    if jobdir.process_start_ticks(pid) is None:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return b"supervisor.py" in file.read()
    except OSError:
        return False


async def stop_jobs(
    state_dir: str, ids: list[str], others: list[str], results: ScaleResults
) -> None:
    """Stop every job at once with grace 0, then check that none is left.

    ``others`` are jobs left behind by a failed run, such as the streaming job; they are
    stopped and deleted but not counted.
    """
    async with JobManager(state_dir) as manager:
        for job_id in others:
            with contextlib.suppress(JobNotFound):
                await manager.stop(job_id, grace=0)
                await manager.delete(job_id)
        pids = [supervisor_pid(manager, job_id) for job_id in ids]
        start = time.monotonic()
        records = await asyncio.gather(*(manager.stop(job_id, grace=0) for job_id in ids))
        results.stop_all_seconds = time.monotonic() - start
        results.left_running = [r.id for r in records if not r.status.ended]
        results.left_cgroups = [job_id for job_id in manager.cgroups.job_ids() if job_id in ids]
        results.left_supervisors = await wait_for_exit([pid for pid in pids if pid is not None])
        for job_id in ids:
            await manager.delete(job_id)


def mount_tmpfs(path: str) -> str:
    """Mount a tmpfs of TMPFS_SIZE on ``path``. Return an error message, or "" on success."""
    mount = ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0711", "bench", path]
    mounted = subprocess.run(mount, capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        return f"mounting a tmpfs on {path} failed: {mounted.stderr.strip()}"
    return ""


def mount_journaled_ext4(image: str, path: str) -> str:
    """Create ext4 with a journal in the file ``image`` and mount it on ``path``.

    Return an error message, or "" on success.
    """
    steps = [
        ["truncate", "-s", JOURNAL_IMAGE_SIZE, image],
        ["mkfs.ext4", "-q", "-F", "-O", "has_journal", image],
        ["mount", "-o", "loop", image, path],
    ]
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True, check=False)
        except FileNotFoundError:
            return f"{step[0]} is not installed"
        if done.returncode != 0:
            return f"{' '.join(step)} failed: {done.stderr.strip()}"
    return ""


def file_system_bursts(base: str, count: int, results: ScaleResults) -> None:
    """Time start bursts on the state folder in ``base``, on a tmpfs and on ext4 with a journal.

    The bursts alternate between the three. The state folder gets one burst fewer, since the
    caller's last burst there stays up for the memory and latency figures.
    """
    state_dir = os.path.join(base, "state")
    tmpfs = os.path.join(base, "tmpfs")
    journaled = os.path.join(base, "ext4-journal")
    image = os.path.join(base, "ext4-journal.img")
    os.makedirs(tmpfs)
    os.makedirs(journaled)
    results.state_file_system = file_system(base)
    results.tmpfs_error = mount_tmpfs(tmpfs)
    results.journal_error = mount_journaled_ext4(image, journaled)
    mounts = []
    if not results.tmpfs_error:
        mounts.append((tmpfs, results.tmpfs_rates))
    if not results.journal_error:
        mounts.append((journaled, results.journal_rates))
        results.journal_file_system = file_system(journaled)
    try:
        for index in range(START_BURSTS):
            if index < START_BURSTS - 1:
                asyncio.run(rate_burst(state_dir, count, results.start_rates))
            for mount_point, rates in mounts:
                os.sync()
                asyncio.run(rate_burst(os.path.join(mount_point, "state"), count, rates))
    finally:
        # Every mount is tried, so that one failed unmount does not leave the other mounted.
        for mount_point, _rates in mounts:
            unmounted = subprocess.run(
                ["umount", mount_point], capture_output=True, text=True, check=False
            )
            if unmounted.returncode != 0:
                results.errors.append(
                    f"unmounting {mount_point} failed: {unmounted.stderr.strip()}; "
                    f"unmount it by hand with 'umount {mount_point}'"
                )
        with contextlib.suppress(FileNotFoundError):
            os.remove(image)


def run(base: str, count: int, followers: int, requests: int) -> ScaleResults:
    """Start ``count`` jobs, serve them from a server, measure, stop them; return the results."""
    results = ScaleResults(jobs=count, followers=followers, requests=requests)
    state_dir = os.path.join(base, "state")
    ids: list[str] = []
    others: list[str] = []
    server = None
    try:
        # The output section before this one leaves gigabytes to write back: not this one's.
        os.sync()
        file_system_bursts(base, count, results)
        asyncio.run(start_jobs(state_dir, count, ids, results))
        start = time.monotonic()
        server = start_server(base)  # adopts the running jobs
        results.server_start_seconds = time.monotonic() - start
        api = Api(server.port, ALICE)
        streamer = Api(server.port, BOB)
        stream_job = streamer.submit({"command": STREAM_COMMAND, "name": "bench-stream"})
        others.append(stream_job["id"])
        readers = Followers(streamer.address, BOB, followers)
        readers.start(stream_job["id"])
        time.sleep(1)
        get_latency(api, ids, requests, results)
        streamer.stop(stream_job["id"], grace=0)
        for report in readers.results():
            results.stream_bytes.append(int(report.get("bytes", -1)))
        streamer.delete(stream_job["id"])
        others.remove(stream_job["id"])
        api.close()
        streamer.close()
    finally:
        if server is not None:
            server.stop()
        if ids or others:
            asyncio.run(stop_jobs(state_dir, ids, others, results))
    return results
