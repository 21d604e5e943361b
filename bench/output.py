"""Output: 1 GiB through a job to REST followers, next to a file write and a plain pipe."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from common import BENCH_DIR, GIB, Api, Samples
from transport import TransportRun, deliver

from jupyter_linuxworker.sandbox import outputlog

# The producer is busybox dd with 1 MiB blocks, the same binary in the job and on the host
# (the image's /bin/busybox). The image's busybox head rejects "1G" and copies 4 KiB at a
# time, which caps it near 150 MB/s on a 2-core test machine. It is measured once, as
# HEAD_COMMAND.
PRODUCE_ARGV = ("dd", "if=/dev/zero", "bs=1M", "count=1024")
PRODUCE = " ".join(PRODUCE_ARGV) + " 2>/dev/null"
JOB_COMMAND = PRODUCE
HEAD_COMMAND = f"head -c {GIB} /dev/zero"
OUTPUT_CAP = "2G"
# How often the job-alone run reads the job's record: a bound on how late its end is seen.
ALONE_POLL = 0.01
# How often the machine's busy CPU time is read during a followed run. /proc/stat counts in
# 10 ms ticks per CPU, so reading it more often gains nothing.
CPU_SAMPLE_INTERVAL = 0.01
# How long memory stays free before the runs that show what recycling the page cache avoids.
IDLE_SECONDS = 5
IDLE_RUNS = 3


def host_command(busybox: str, command: str) -> str:
    """Return ``command`` with the image's busybox as the producer, to run on the host."""
    return f"{busybox} {command}"


def file_write_command(busybox: str, path: str) -> str:
    return f"{host_command(busybox, PRODUCE)} > {path}"


def pipe_command(busybox: str) -> str:
    return f"{host_command(busybox, PRODUCE)} | cat > /dev/null"


@dataclass
class CpuSplit:
    """CPU seconds of followed runs by part, one sample per run, from the POST to the last byte."""

    window: Samples = field(default_factory=Samples)  # wall seconds to the last follower's byte
    machine: Samples = field(default_factory=Samples)  # busy seconds of all CPUs together
    followers: Samples = field(default_factory=Samples)  # the follower processes together
    server: Samples = field(default_factory=Samples)
    job: Samples = field(default_factory=Samples)  # the job's cgroup
    # The machine's busy time less the above, which is the supervisor, interrupt handling,
    # kernel threads and this harness.
    rest: Samples = field(default_factory=Samples)
    # System time of the server and the followers together, the part they spend in the kernel.
    delivery_system: Samples = field(default_factory=Samples)
    followers_system: Samples = field(default_factory=Samples)

    def add(self, split: dict[str, float]) -> None:
        self.delivery_system.add(split["server_system"] + split["followers_system"])
        self.followers_system.add(split["followers_system"])
        for name in ("window", "machine", "followers", "server", "job"):
            getattr(self, name).add(split[name])
        self.rest.add(split["machine"] - split["followers"] - split["server"] - split["job"])


@dataclass
class TransportSamples:
    """Runs of the bare transport to one count of readers."""

    seconds: Samples = field(default_factory=Samples)
    sender_cpu: Samples = field(default_factory=Samples)
    reader_cpu: Samples = field(default_factory=Samples)

    def add(self, run: TransportRun) -> None:
        self.seconds.add(run.seconds)
        self.sender_cpu.add(run.sender_cpu)
        self.reader_cpu.add(run.reader_cpu)


@dataclass
class ServerUnderTest:
    """A started server: its API, its process id and its state folder."""

    api: Api
    pid: int
    state_dir: str


@dataclass
class OutputResults:
    runs: int = 0
    many_runs: int = 0
    followers: int = 0
    file_write: Samples = field(default_factory=Samples)
    pipe: Samples = field(default_factory=Samples)
    # Seconds from POST to the end seen in the job's record, when no one follows the job.
    no_follower: Samples = field(default_factory=Samples)
    # Seconds from POST until the log contains every byte, so without the supervisor's fsync.
    no_follower_logged: Samples = field(default_factory=Samples)
    one_follower: Samples = field(default_factory=Samples)  # seconds from POST to the last byte
    one_follower_end: Samples = field(default_factory=Samples)  # seconds to the response's end
    one_follower_job: Samples = field(default_factory=Samples)  # the job's run time, its record
    many_slowest: Samples = field(default_factory=Samples)  # the slowest follower of each run
    many_each: Samples = field(default_factory=Samples)  # every follower of every run
    many_job: Samples = field(default_factory=Samples)
    # The same through a server that listens on a Unix socket.
    unix_one: Samples = field(default_factory=Samples)
    unix_many_slowest: Samples = field(default_factory=Samples)
    unix_one_server_cpu: Samples = field(default_factory=Samples)
    # The same through a server with sendfile turned off: the figures before sendfile.
    plain_one: Samples = field(default_factory=Samples)
    plain_many_slowest: Samples = field(default_factory=Samples)
    plain_one_server_cpu: Samples = field(default_factory=Samples)
    # The same through a server whose supervisors splice from the job's pipe into the log,
    # without the relay pipe: the figures before the relay.
    direct_alone: Samples = field(default_factory=Samples)
    direct_logged: Samples = field(default_factory=Samples)
    direct_one: Samples = field(default_factory=Samples)
    # CPU seconds the server process spends per GiB delivered to one follower.
    one_server_cpu: Samples = field(default_factory=Samples)
    many_server_cpu: Samples = field(default_factory=Samples)
    one_cpu: CpuSplit = field(default_factory=CpuSplit)
    many_cpu: CpuSplit = field(default_factory=CpuSplit)
    errors: list[str] = field(default_factory=list)
    file_path: str = ""
    head_pipe: float | None = None  # busybox head piped to cat on the host, seconds
    head_one: float | None = None  # busybox head in a job to one follower, seconds
    # CPU seconds of the supervisor's log writer alone on 1 GiB, with the log's blocks
    # allocated ahead of its bytes (the default) and without: the figures before that change.
    writer_cpu: Samples = field(default_factory=Samples)
    writer_cpu_unreserved: Samples = field(default_factory=Samples)
    # The same, with blocks allocated ahead, after memory stayed free for IDLE_SECONDS.
    writer_cpu_idle: Samples = field(default_factory=Samples)
    # sendfile of a cached 1 GiB file over loopback TCP to one reader and to as many as there
    # are followers, with no server and no job: a floor for the followed paths.
    transport_one: TransportSamples = field(default_factory=TransportSamples)
    transport_many: TransportSamples = field(default_factory=TransportSamples)
    # The same over a Unix socket.
    transport_unix_one: TransportSamples = field(default_factory=TransportSamples)
    transport_unix_many: TransportSamples = field(default_factory=TransportSamples)


def time_shell(command: str) -> float:
    start = time.perf_counter()
    subprocess.run(["/bin/sh", "-c", command], check=True)
    return time.perf_counter() - start


class Followers:
    """Follower processes, connected and waiting for a job id."""

    def __init__(self, address: str, token: str, count: int) -> None:
        script = os.path.join(BENCH_DIR, "follower.py")
        self.processes = [
            subprocess.Popen(
                [sys.executable, script, address, token],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(count)
        ]
        # Give each one time to import and connect before the job starts.
        time.sleep(0.5 + 0.05 * count)

    def start(self, job_id: str) -> None:
        for process in self.processes:
            assert process.stdin is not None
            process.stdin.write(job_id + "\n")
            process.stdin.close()

    def results(self, timeout: float = 600) -> list[dict[str, Any]]:
        found = []
        for process in self.processes:
            assert process.stdout is not None
            output = process.stdout.read()
            process.wait(timeout=timeout)
            found.append(json.loads(output) if output.strip() else {"status": process.returncode})
        return found


def job_seconds(job: dict[str, Any]) -> float | None:
    if not job.get("started_at") or not job.get("ended_at"):
        return None
    started = datetime.fromisoformat(job["started_at"].replace("Z", "+00:00"))
    ended = datetime.fromisoformat(job["ended_at"].replace("Z", "+00:00"))
    return (ended - started).total_seconds()


def machine_busy_seconds() -> float:
    """Return the CPU seconds all CPUs together have been busy since boot.

    Busy time is user, nice, system, irq and softirq time. Idle time, I/O wait and time stolen
    by the hypervisor are left out.
    """
    with open("/proc/stat", encoding="ascii") as file:
        fields = [int(value) for value in file.readline().split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


class BusySampler:
    """Read the machine's busy CPU time every CPU_SAMPLE_INTERVAL in a thread."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while True:
            self.samples.append((time.monotonic(), machine_busy_seconds()))
            if self._stop.wait(CPU_SAMPLE_INTERVAL):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def between(self, start: float, end: float) -> float:
        """Return the busy CPU seconds from ``start`` to ``end``, widened to the nearest samples."""
        before = [busy for moment, busy in self.samples if moment <= start]
        after = [busy for moment, busy in self.samples if moment >= end]
        first = before[-1] if before else self.samples[0][1]
        last = after[0] if after else self.samples[-1][1]
        return last - first


def process_cpu_seconds(pid: int, system_only: bool = False) -> float:
    """Return the CPU time of process ``pid`` itself, children not included.

    That is user and system time, or only system time with ``system_only``.
    """
    with open(f"/proc/{pid}/stat", "rb") as file:
        stat = file.read()
    fields = stat[stat.rindex(b")") + 2 :].split()
    user, system = int(fields[11]), int(fields[12])
    return (system if system_only else user + system) / os.sysconf("SC_CLK_TCK")


def stream_once(
    api: Api, command: str, count: int, results: OutputResults, server_pid: int
) -> list[dict[str, Any]] | None:
    """Run a 1 GiB job with ``count`` followers; return their reports, timed from the POST."""
    followers = Followers(api.address, api.token, count)
    sampler = BusySampler()
    cpu_before = process_cpu_seconds(server_pid)
    system_before = process_cpu_seconds(server_pid, system_only=True)
    posted = time.monotonic()
    job = api.submit({"command": command, "output_cap": OUTPUT_CAP, "name": "bench-output"})
    followers.start(job["id"])
    reports = followers.results()
    server_cpu = process_cpu_seconds(server_pid) - cpu_before
    server_system = process_cpu_seconds(server_pid, system_only=True) - system_before
    sampler.stop()
    _status, record = api.request("GET", f"jobs/{job['id']}")
    api.delete(job["id"])
    for report in reports:
        if report.get("status") != 200 or report.get("bytes") != GIB:
            results.errors.append(
                f"job {job['id']} ({command}): a follower got {report.get('bytes')} bytes "
                f"(HTTP {report.get('status')}), expected {GIB}"
            )
            return None
        report["to_last_byte"] = report["last"] - posted
        report["to_end"] = report["ended"] - posted
        report["job_seconds"] = job_seconds(record)
        report["server_cpu_per_gib"] = server_cpu / count
    last_byte = max(report["last"] for report in reports)
    reports[0]["split"] = {
        "window": last_byte - posted,
        "machine": sampler.between(posted, last_byte),
        "followers": sum(report["cpu"] for report in reports),
        "followers_system": sum(report["cpu_system"] for report in reports),
        "server": server_cpu,
        "server_system": server_system,
        "job": record.get("usage", {}).get("cpu_seconds") or 0.0,
    }
    return reports


def job_alone(api: Api, state_dir: str, results: OutputResults) -> tuple[float, float] | None:
    """Run a 1 GiB job that no one follows; return seconds from the POST to its end.

    The first figure is the time until the log in ``state_dir`` contains every byte, the second
    the time until the job's record shows its end.
    """
    posted = time.monotonic()
    job = api.submit({"command": JOB_COMMAND, "output_cap": OUTPUT_CAP, "name": "bench-output"})
    log_path = os.path.join(state_dir, "jobs", job["id"], "output.log")
    logged = None
    while True:
        if logged is None and os.path.exists(log_path) and os.stat(log_path).st_size >= GIB:
            logged = time.monotonic() - posted
        _status, record = api.request("GET", f"jobs/{job['id']}")
        if record["status"] not in ("PENDING", "RUNNING"):
            break
        time.sleep(ALONE_POLL)
    ended = time.monotonic() - posted
    api.delete(job["id"])
    if record["status"] != "COMPLETED" or record["output_size"] != GIB:
        results.errors.append(
            f"job {job['id']} ({JOB_COMMAND}) without followers: {record['status']}, "
            f"{record['output_size']} bytes"
        )
        return None
    return (ended if logged is None else logged), ended


def log_writer_cpu(busybox: str, folder: str, reserve: bool) -> float:
    """Return the CPU seconds the supervisor's log writer takes to log 1 GiB of busybox dd.

    The writer runs in this thread, fed through a pipe the size of a job's, so the thread's
    CPU time is the writer's alone. The final fsync is not timed.
    """
    job_dir = os.path.join(folder, "bench-log-writer")
    os.makedirs(job_dir)
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    outputlog.set_pipe_size(write_fd)
    producer = subprocess.Popen(
        [busybox, *PRODUCE_ARGV], stdout=write_fd, stderr=subprocess.DEVNULL
    )
    os.close(write_fd)
    try:
        writer = outputlog.OutputWriter(job_dir, 2 * GIB, reserve=reserve)
        started = time.thread_time()
        while writer.pump(read_fd, outputlog.STDOUT):
            pass
        seconds = time.thread_time() - started
        writer.close()
        if writer.size != GIB:
            raise RuntimeError(f"the log writer logged {writer.size} bytes, expected {GIB}")
        return seconds
    finally:
        os.close(read_fd)
        producer.wait()
        shutil.rmtree(job_dir)


def recycle_page_cache(busybox: str, folder: str) -> None:
    """Write 1 GiB to a file in ``folder`` and delete it, so that the next gigabyte of page
    cache reuses the memory this frees.

    A virtual machine may report free memory to its host (virtio free page reporting). There,
    writing into memory that stayed free for a few seconds costs several times as much as
    writing into memory freed just before, and the output section measures both. How long memory
    stayed free differs from one run to the next, so every timed path that fills the page
    cache starts right after this.
    """
    path = os.path.join(folder, "bench-recycle")
    subprocess.run(["/bin/sh", "-c", file_write_command(busybox, path)], check=True)
    os.remove(path)


def idle_log_writer_cpu(busybox: str, folder: str) -> float:
    """Return the log writer's CPU seconds on 1 GiB after memory stayed free for a while."""
    recycle_page_cache(busybox, folder)
    time.sleep(IDLE_SECONDS)
    return log_writer_cpu(busybox, folder, reserve=True)


def one_then_many(
    server: ServerUnderTest,
    results: OutputResults,
    settle: Callable[[], None],
    samples: tuple[Samples, Samples, Samples],
    followers: int,
) -> None:
    """Stream to one follower, then to ``followers`` unless that is 0, each after ``settle``.

    ``samples`` receive the one follower's time and the server's CPU per GiB, then the
    slowest of the many followers' times.
    """
    one, server_cpu, many_slowest = samples
    settle()
    reports = stream_once(server.api, JOB_COMMAND, 1, results, server.pid)
    if reports:
        one.add(reports[0]["to_last_byte"])
        server_cpu.add(reports[0]["server_cpu_per_gib"])
    if followers:
        settle()
        reports = stream_once(server.api, JOB_COMMAND, followers, results, server.pid)
        if reports:
            many_slowest.add(max(report["to_last_byte"] for report in reports))


def alone_then_one(
    server: ServerUnderTest, results: OutputResults, settle: Callable[[], None]
) -> tuple[tuple[float, float] | None, list[dict[str, Any]] | None]:
    """Time a job that no one follows, then one with one follower, each after ``settle``."""
    settle()
    alone = job_alone(server.api, server.state_dir, results)
    settle()
    return alone, stream_once(server.api, JOB_COMMAND, 1, results, server.pid)


def run(
    server: ServerUnderTest,
    busybox: str,
    runs: int,
    many_runs: int,
    followers: int,
    plain: ServerUnderTest | None = None,
    direct: ServerUnderTest | None = None,
    unix: ServerUnderTest | None = None,
) -> OutputResults:
    """Alternate the file write, the pipe, one follower and ``followers`` followers.

    ``plain`` is a second server that sends output without sendfile. With it, each run also
    streams to one follower and to ``followers`` followers through it. ``direct`` is a server
    without the relay pipe: each run also times a job with no follower and with one through it.
    ``unix`` is a server on a Unix socket: each run also streams to the followers through it.
    """
    results = OutputResults(runs=runs, many_runs=many_runs, followers=followers)
    results.file_path = os.path.join(server.state_dir, "bench-write-test")
    transport_path = os.path.join(server.state_dir, "bench-transport")
    subprocess.run(["/bin/sh", "-c", file_write_command(busybox, transport_path)], check=True)
    os.sync()
    # A warm-up delivery, not kept.
    deliver(transport_path, 1)

    def settle() -> None:
        # The sync keeps the writeback of the gigabyte before out of the next time, and the
        # recycled page cache keeps the host's page faults out of it.
        os.sync()
        recycle_page_cache(busybox, server.state_dir)

    for index in range(runs):
        settle()
        results.file_write.add(time_shell(file_write_command(busybox, results.file_path)))
        os.remove(results.file_path)
        os.sync()
        results.pipe.add(time_shell(pipe_command(busybox)))

        for reserve in (True, False) if index % 2 else (False, True):
            settle()
            samples = results.writer_cpu if reserve else results.writer_cpu_unreserved
            samples.add(log_writer_cpu(busybox, server.state_dir, reserve))

        alone, reports = alone_then_one(server, results, settle)
        if alone is not None:
            results.no_follower_logged.add(alone[0])
            results.no_follower.add(alone[1])
        if reports:
            results.one_follower.add(reports[0]["to_last_byte"])
            results.one_follower_end.add(reports[0]["to_end"])
            if reports[0]["job_seconds"] is not None:
                results.one_follower_job.add(reports[0]["job_seconds"])
            results.one_server_cpu.add(reports[0]["server_cpu_per_gib"])
            results.one_cpu.add(reports[0]["split"])
        if index < many_runs:
            settle()
            reports = stream_once(server.api, JOB_COMMAND, followers, results, server.pid)
            if reports:
                times = [report["to_last_byte"] for report in reports]
                results.many_slowest.add(max(times))
                for value in times:
                    results.many_each.add(value)
                if reports[0]["job_seconds"] is not None:
                    results.many_job.add(reports[0]["job_seconds"])
                results.many_server_cpu.add(reports[0]["server_cpu_per_gib"])
                results.many_cpu.add(reports[0]["split"])

        for other, figures in (
            (plain, (results.plain_one, results.plain_one_server_cpu, results.plain_many_slowest)),
            (unix, (results.unix_one, results.unix_one_server_cpu, results.unix_many_slowest)),
        ):
            if other is not None:
                one_then_many(
                    other, results, settle, figures, followers if index < many_runs else 0
                )

        if direct is not None:
            alone, reports = alone_then_one(direct, results, settle)
            if alone is not None:
                results.direct_logged.add(alone[0])
                results.direct_alone.add(alone[1])
            if reports:
                results.direct_one.add(reports[0]["to_last_byte"])

        # The file stays in the page cache, so these runs allocate no page cache to recycle.
        results.transport_one.add(deliver(transport_path, 1))
        results.transport_unix_one.add(deliver(transport_path, 1, unix=True))
        if index < many_runs:
            results.transport_many.add(deliver(transport_path, followers))
            results.transport_unix_many.add(deliver(transport_path, followers, unix=True))
    os.remove(transport_path)

    # What recycling avoids: the log writer after memory stayed free, as without it.
    for _ in range(IDLE_RUNS):
        os.sync()
        results.writer_cpu_idle.add(idle_log_writer_cpu(busybox, server.state_dir))

    # `head -c` as the producer, once, in the job and on the host: slow, but a common command.
    settle()
    results.head_pipe = time_shell(f"{host_command(busybox, HEAD_COMMAND)} | cat > /dev/null")
    reports = stream_once(server.api, HEAD_COMMAND, 1, results, server.pid)
    if reports:
        results.head_one = reports[0]["to_last_byte"]
    return results
