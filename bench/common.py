"""Shared pieces of the benchmark harness: percentiles, a small REST client, machine facts."""

from __future__ import annotations

import http.client
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from jupyter_linuxworker.client import UnixHTTPConnection

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
TESTS_DIR = os.path.join(REPO_DIR, "tests")
MB = 1_000_000
GIB = 1024**3
# Tokens of tests/identity_provider.py, which the benchmark server uses.
ALICE = "alice-token"
BOB = "bob-token"


def percentile(values: Sequence[float], p: float) -> float:
    """Return the p-th percentile (0 to 100), linear between the two nearest ranks."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class Samples:
    """Measurements of one figure, in the unit the section chose."""

    values: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.values.append(value)

    def p(self, q: float) -> float:
        return percentile(self.values, q)

    @property
    def count(self) -> int:
        return len(self.values)


def ms(seconds: float) -> str:
    """Format seconds as milliseconds with one decimal."""
    return f"{seconds * 1000:.1f}"


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Return a Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(met: bool | None) -> str:
    if met is None:
        return "not measured"
    return "met" if met else "**missed**"


# -- REST ------------------------------------------------------------------------------------


class Api:
    """A keep-alive HTTP connection to the linuxworker API of one server, as one user."""

    def __init__(self, port: int, token: str, timeout: float = 60, sock: str | None = None) -> None:
        self.port = port
        self.token = token
        self.timeout = timeout
        # The path of the server's Unix socket, for a server that listens on one.
        self.sock = sock
        self.prefix = "/linuxworker/api/"
        self._connection: http.client.HTTPConnection | None = None

    @property
    def address(self) -> str:
        """Return the port on 127.0.0.1, or the socket's path, as the follower takes it."""
        return self.sock if self.sock is not None else str(self.port)

    def _connect(self) -> http.client.HTTPConnection:
        if self._connection is None:
            self._connection = (
                UnixHTTPConnection(self.sock, timeout=self.timeout)
                if self.sock is not None
                else http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            )
        return self._connection

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def request(self, method: str, path: str, body: object = None) -> tuple[int, Any]:
        """Send one request and read the whole response; return the status and decoded JSON."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"token {self.token}"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        connection = self._connect()
        try:
            connection.request(method, self.prefix + path, body=data, headers=headers)
            response = connection.getresponse()
            raw = response.read()
        except (http.client.HTTPException, OSError):
            self.close()
            raise
        if "json" in response.headers.get("Content-Type", "") and raw:
            return response.status, json.loads(raw)
        return response.status, raw

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        status, job = self.request("POST", "jobs", spec)
        if status != 201:
            raise RuntimeError(f"POST jobs returned {status}: {job!r}")
        return dict(job)

    def open_output(self, job_id: str) -> http.client.HTTPResponse:
        """Start GET jobs/ID/output?follow=1; the caller reads the body and then closes it."""
        connection = self._connect()
        connection.request(
            "GET",
            f"{self.prefix}jobs/{job_id}/output?follow=1",
            headers={"Authorization": f"token {self.token}"},
        )
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"GET output of {job_id} returned {response.status}")
        return response

    def stop(self, job_id: str, grace: float = 0) -> dict[str, Any]:
        status, job = self.request("POST", f"jobs/{job_id}/stop", {"grace": grace})
        if status != 200:
            raise RuntimeError(f"POST jobs/{job_id}/stop returned {status}: {job!r}")
        return dict(job)

    def delete(self, job_id: str) -> None:
        status, body = self.request("DELETE", f"jobs/{job_id}")
        if status != 204:
            raise RuntimeError(f"DELETE jobs/{job_id} returned {status}: {body!r}")


def start_server(base: str, extra: Sequence[str] = (), sock: str | None = None) -> Any:
    """Start a `jupyter server` with the extension on 127.0.0.1, state in ``base``/state.

    ``extra`` contains more command line options for the server. With ``sock``, the server
    listens on that Unix socket instead.
    """
    if TESTS_DIR not in sys.path:
        sys.path.insert(0, TESTS_DIR)
    from server import ServerProcess  # tests/server.py

    for name in ("state", "root", "runtime"):
        os.makedirs(os.path.join(base, name), exist_ok=True)
    server = ServerProcess(
        os.path.join(base, "state"),
        os.path.join(base, "root"),
        os.path.join(base, "runtime"),
        extra=list(extra),
        sock=sock,
    )
    return server.start()


# -- the machine and its load ----------------------------------------------------------------


def load_average() -> str:
    with open("/proc/loadavg", encoding="ascii") as file:
        return " ".join(file.read().split()[:3])


def _cpu_times() -> dict[int, tuple[str, int]]:
    """Return user+system clock ticks and the name of every process."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as file:
                stat = file.read()
        except OSError:
            continue
        name = stat[stat.index(b"(") + 1 : stat.rindex(b")")].decode(errors="replace")
        fields = stat[stat.rindex(b")") + 2 :].split()
        found[int(entry)] = (name, int(fields[11]) + int(fields[12]))
    return found


def busiest_processes(seconds: float = 1.0, count: int = 5) -> list[tuple[str, float]]:
    """Sample every process for ``seconds``; return the busiest names with their CPU share in %."""
    before = _cpu_times()
    start = time.monotonic()
    time.sleep(seconds)
    after = _cpu_times()
    elapsed = time.monotonic() - start
    ticks = os.sysconf("SC_CLK_TCK")
    by_name: dict[str, float] = {}
    for pid, (name, used) in after.items():
        previous = before.get(pid, (name, used))[1]
        by_name[name] = by_name.get(name, 0.0) + (used - previous) / ticks / elapsed * 100
    busy = sorted(by_name.items(), key=lambda item: -item[1])
    return [(name, share) for name, share in busy[:count] if share >= 1.0]


def machine_busy_share() -> tuple[float, float]:
    """Return (busy, total) clock ticks of all CPUs since boot, from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as file:
        values = [int(v) for v in file.readline().split()[1:]]
    idle = values[3] + values[4]
    return float(sum(values) - idle), float(sum(values))


class LoadWindow:
    """The load average at the start and end of a section, and how busy all CPUs were."""

    def __init__(self) -> None:
        self.start_load = load_average()
        self._start = machine_busy_share()
        self._started = time.monotonic()
        self.end_load = ""
        self.busy_percent = 0.0
        self.seconds = 0.0

    def close(self) -> LoadWindow:
        self.seconds = time.monotonic() - self._started
        self.end_load = load_average()
        busy, total = machine_busy_share()
        delta_total = total - self._start[1]
        if delta_total > 0:
            self.busy_percent = (busy - self._start[0]) / delta_total * 100
        return self

    def describe(self) -> str:
        return (
            f"load average {self.start_load} at the start, {self.end_load} at the end; "
            f"all CPUs {self.busy_percent:.0f}% busy during the section's "
            f"{self.seconds:.0f} s (this harness included)"
        )


def _first_line(argv: list[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError as error:
        return f"unavailable ({error.strerror})"
    lines = (result.stdout or result.stderr).strip().splitlines()
    return lines[0] if lines else ""


def cgroup_layout() -> str:
    """Describe /sys/fs/cgroup: unified v2, or v1 with or without a v2 hierarchy beside it."""
    root = "/sys/fs/cgroup"
    fs_type = _first_line(["stat", "-f", "-c", "%T", root])
    if fs_type == "cgroup2fs":
        with open(os.path.join(root, "cgroup.controllers"), encoding="ascii") as file:
            return f"cgroup v2 (unified), controllers: {file.read().strip()}"
    v1 = sorted(
        name
        for name in os.listdir(root)
        if name != "unified" and os.path.ismount(os.path.join(root, name))
    )
    text = f"cgroup v1 hierarchies: {', '.join(v1)}"
    unified = os.path.join(root, "unified", "cgroup.controllers")
    if os.path.exists(unified):
        with open(unified, encoding="ascii") as file:
            controllers = file.read().strip() or "none"
        text += f"; hybrid: cgroup v2 at {root}/unified with controllers: {controllers}"
    return text


def file_system(path: str) -> str:
    """Return the type of the file system at ``path``, and for ext4 whether it has a journal."""
    df = subprocess.run(
        ["df", "--output=source,fstype", path], capture_output=True, text=True, check=False
    )
    if df.returncode != 0:
        return "unknown"
    source, fstype = df.stdout.strip().splitlines()[-1].split()
    if fstype != "ext4":
        return fstype
    # jbd2 lists each journal as DEVICE-INODE, such as vda-8.
    device = os.path.basename(os.path.realpath(source))
    journals = os.listdir("/proc/fs/jbd2") if os.path.isdir("/proc/fs/jbd2") else []
    if any(name.rpartition("-")[0] == device for name in journals):
        return "ext4 with a journal"
    return "ext4 without a journal"


# Feature bit of a virtio balloon that reports free guest memory to the host
# (VIRTIO_BALLOON_F_REPORTING in Linux's include/uapi/linux/virtio_balloon.h).
BALLOON_FREE_PAGE_REPORTING = 5
BALLOON_DEVICES = "/sys/bus/virtio/drivers/virtio_balloon"
PAGE_REPORTING_ORDER = "/sys/module/page_reporting/parameters/page_reporting_order"


def free_page_reporting() -> str:
    """Return whether this machine hands free memory back to its host, from its balloon devices."""
    try:
        devices = [name for name in os.listdir(BALLOON_DEVICES) if name.startswith("virtio")]
    except OSError:
        devices = []
    for device in devices:
        try:
            with open(os.path.join(BALLOON_DEVICES, device, "features"), encoding="ascii") as file:
                features = file.read().strip()
        except OSError:
            continue
        if features[BALLOON_FREE_PAGE_REPORTING : BALLOON_FREE_PAGE_REPORTING + 1] == "1":
            try:
                with open(PAGE_REPORTING_ORDER, encoding="ascii") as file:
                    order = int(file.read())
            except (OSError, ValueError):
                return "yes (virtio balloon free page reporting)"
            block = os.sysconf("SC_PAGE_SIZE") * 2**order
            return (
                "yes (virtio balloon free page reporting, in free blocks of "
                f"{block / 1024**2:g} MiB or more)"
            )
    return "no virtio balloon that reports free memory"


def machine_facts(state_dir: str) -> list[tuple[str, str]]:
    """Return (name, value) pairs that describe this machine and the tools compared."""
    model = ""
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as file:
        for line in file:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo", encoding="ascii") as file:
        mem_kib = next(int(line.split()[1]) for line in file if line.startswith("MemTotal:"))
    df = subprocess.run(
        ["df", "--output=source,fstype", state_dir], capture_output=True, text=True, check=False
    )
    disk = df.stdout.strip().splitlines()[-1] if df.returncode == 0 else ""
    os_name = ""
    if os.path.exists("/etc/os-release"):
        with open("/etc/os-release", encoding="utf-8") as file:
            match = re.search(r'^PRETTY_NAME="?([^"\n]*)', file.read(), re.M)
            os_name = match.group(1) if match else ""
    return [
        ("CPU", f"{os.cpu_count()} cores, {model}"),
        ("memory", f"{mem_kib / 1024**2:.1f} GiB"),
        ("kernel", f"{platform.release()} ({os_name})"),
        ("cgroups", cgroup_layout()),
        ("state folder disk", f"{disk.split()[0]} {file_system(state_dir)}" if disk else "unknown"),
        ("free memory handed back to the host", free_page_reporting()),
        ("Python", sys.version.split()[0]),
        ("bwrap", _first_line(["bwrap", "--version"])),
        ("crun", _first_line(["crun", "--version"])),
        ("unshare", _first_line(["unshare", "--version"])),
    ]
