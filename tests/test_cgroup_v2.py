"""cgroup v2 job cgroups: limits, usage and setup against a fake tree, and a job's life for real.

The fake tree is a tmp_path folder in place of cgroupfs. The real tests create a folder
at the top of this machine's cgroup2 hierarchy, put only processes they start into it and remove
it at the end. Tests that need a controller the folder does not get are skipped: on a v1 hybrid
layout, the cgroup2 root offers none of cpu, io, memory and pids.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import children_of

from jupyter_linuxworker.sandbox import cgroupfs, cgroups, syscalls
from jupyter_linuxworker.sandbox.cgroups import (
    PARENT_NAME,
    SERVER_LEAF_NAME,
    CgroupError,
    CgroupLayout,
    JobCgroup,
)
from jupyter_linuxworker.sandbox.manager import JobManager
from jupyter_linuxworker.sandbox.spec import Limits
from jupyter_linuxworker.sandbox.store import JobStatus

MIB = 1024**2
ALL_CONTROLLERS = "cpu io memory pids"
# The files that cgroupfs creates in a new non-root cgroup, as far as the code under test uses them.
INTERFACE_FILES = (
    "memory.max",
    "memory.swap.max",
    "cpu.max",
    "cpu.weight",
    "pids.max",
    "io.max",
    "cgroup.procs",
    "cgroup.kill",
    "cgroup.controllers",
    "cgroup.type",
    "cgroup.subtree_control",
)
LIMITS = {
    "memory": 268435456,
    "cpus": 0.5,
    "cpu_weight": 50,
    "pids": 64,
    "io_read_bps": 10485760,
    "io_write_iops": 100,
    "io_devices": ["254:0"],
}
CPU_STAT = "usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\n"
IO_STAT = (
    "254:0 rbytes=100 wbytes=200 rios=1 wios=2 dbytes=0 dios=0\n"
    "259:0 rbytes=1 wbytes=2 rios=3 wios=4 dbytes=0 dios=0\n"
)
MEMORY_EVENTS = "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n"
# The shell waits for a line on stdin, so the test can join it before it forks.
FORKING_SHELL = "read _; sleep 301 & sleep 302 & wait"
FORK_LOOP = "read _; while :; do sleep 100 & done"
TEST_FOLDER_PREFIX = "jupyter-linuxworker-v2test-"
TIMEOUT = 10.0
POLL_INTERVAL = 0.01


# -- fake cgroupfs --------------------------------------------------------------------------------


def make_fake_cgroup(path: Path, controllers: str = ALL_CONTROLLERS, procs: str = "") -> Path:
    """Create ``path`` with the empty interface files that cgroupfs gives a new cgroup."""
    path.mkdir(parents=True, exist_ok=True)
    for name in INTERFACE_FILES:
        (path / name).touch()
    (path / "cgroup.controllers").write_text(f"{controllers}\n")
    (path / "cgroup.type").write_text("domain\n")
    (path / "cgroup.procs").write_text(procs)
    return path


class FakeCgroupfs:
    """Kernel side of a fake tree. New folders get interface files, and every write is logged.

    Writing a pid to a cgroup.procs file removes it from every other cgroup.procs below ``root``,
    as moving a process does in cgroupfs.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.writes: list[tuple[str, str]] = []

    def make_cgroup(self, path: str) -> None:
        if not os.path.isdir(path):
            cgroupfs.make_cgroup(path)
            # As in cgroupfs, a child has the controllers that its parent hands down.
            handed = Path(path).parent / "cgroup.subtree_control"
            controllers = handed.read_text().strip() if handed.exists() else ALL_CONTROLLERS
            make_fake_cgroup(Path(path), controllers)

    def write(self, path: str, value: str) -> None:
        self.writes.append((path, value))
        cgroupfs.write(path, value)
        if os.path.basename(path) == "cgroup.procs":
            self._remove_pid_elsewhere(path, value)

    def writes_in(self, folder: Path) -> list[tuple[str, str]]:
        """Return (file name, value) of each write to a file directly in ``folder``."""
        return [
            (os.path.basename(path), value)
            for path, value in self.writes
            if os.path.dirname(path) == str(folder)
        ]

    def _remove_pid_elsewhere(self, target: str, pid: str) -> None:
        for procs in self.root.rglob("cgroup.procs"):
            if str(procs) == target:
                continue
            pids = procs.read_text().split()
            if pid in pids:
                procs.write_text("".join(f"{other}\n" for other in pids if other != pid))


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeCgroupfs:
    """A fake cgroupfs below tmp_path, patched in for the make_cgroup and write of cgroups.py."""
    fs = FakeCgroupfs(tmp_path)
    monkeypatch.setattr(cgroups, "make_cgroup", fs.make_cgroup)
    monkeypatch.setattr(cgroups, "write", fs.write)
    return fs


def write_proc_self(folder: Path, cgroup: str, mountinfo: list[str]) -> Path:
    """Create a fake /proc/self with the given ``cgroup`` file and ``mountinfo`` lines."""
    folder.mkdir()
    (folder / "cgroup").write_text(cgroup)
    (folder / "mountinfo").write_text("".join(f"{line}\n" for line in mountinfo))
    return folder


def cgroup2_mount_line(mount_point: Path) -> str:
    return f"41 31 0:38 / {mount_point} rw,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate"


def cgroup1_mount_line(mount_point: Path, options: str) -> str:
    return f"35 31 0:32 / {mount_point} rw,relatime shared:5 - cgroup cgroup rw,{options}"


def own_cgroup(tmp_path: Path, controllers: str, procs: str, enabled: str = "") -> Path:
    """Create the fake cgroup the server runs in, with ``enabled`` in its subtree_control."""
    own = make_fake_cgroup(tmp_path / "own", controllers, procs)
    (own / "cgroup.subtree_control").write_text(enabled)
    return own


# -- limits ---------------------------------------------------------------------------------------


def test_apply_limits_writes_values(tmp_path: Path) -> None:
    job = make_fake_cgroup(tmp_path / "job")

    JobCgroup(2, {"": str(job)}).apply_limits(LIMITS)

    assert (job / "memory.max").read_text() == "268435456"
    assert (job / "memory.swap.max").read_text() == "0"
    assert (job / "cpu.max").read_text() == "50000 100000"
    assert (job / "cpu.weight").read_text() == "50"
    assert (job / "pids.max").read_text() == "64"
    assert (job / "io.max").read_text() == "254:0 rbps=10485760 wiops=100"


@pytest.mark.parametrize(
    ("cpus", "expected"),
    [(1.5, "150000 100000"), (0.333, "33300 100000"), (2, "200000 100000")],
)
def test_apply_limits_cpu_quota(tmp_path: Path, cpus: float, expected: str) -> None:
    job = make_fake_cgroup(tmp_path / "job")

    JobCgroup(2, {"": str(job)}).apply_limits({"cpus": cpus})

    assert (job / "cpu.max").read_text() == expected


def test_apply_limits_io_each_device(fake: FakeCgroupfs, tmp_path: Path) -> None:
    job = make_fake_cgroup(tmp_path / "job")
    limits = {
        "io_read_bps": 1,
        "io_write_bps": 2,
        "io_read_iops": 3,
        "io_write_iops": 4,
        "io_devices": ["254:0", "259:0"],
    }

    JobCgroup(2, {"": str(job)}).apply_limits(limits)

    assert fake.writes_in(job) == [
        ("io.max", "254:0 rbps=1 wbps=2 riops=3 wiops=4"),
        ("io.max", "259:0 rbps=1 wbps=2 riops=3 wiops=4"),
    ]


def test_apply_limits_io_without_devices(fake: FakeCgroupfs, tmp_path: Path) -> None:
    job = make_fake_cgroup(tmp_path / "job")

    JobCgroup(2, {"": str(job)}).apply_limits({"io_read_bps": 1, "io_devices": []})

    assert fake.writes_in(job) == []


def test_apply_limits_empty_writes_nothing(fake: FakeCgroupfs, tmp_path: Path) -> None:
    job = make_fake_cgroup(tmp_path / "job")

    JobCgroup(2, {"": str(job)}).apply_limits({"memory": None, "cpus": None, "pids": None})

    assert fake.writes_in(job) == []


def test_apply_limits_without_swap_file(tmp_path: Path) -> None:
    job = make_fake_cgroup(tmp_path / "job")
    (job / "memory.swap.max").unlink()

    JobCgroup(2, {"": str(job)}).apply_limits({"memory": 1048576})

    assert (job / "memory.max").read_text() == "1048576"
    assert not (job / "memory.swap.max").exists()


def test_apply_limits_missing_io_file(tmp_path: Path) -> None:
    job = make_fake_cgroup(tmp_path / "job")
    (job / "io.max").unlink()

    with pytest.raises(CgroupError) as raised:
        JobCgroup(2, {"": str(job)}).apply_limits({"io_read_bps": 1, "io_devices": ["8:0"]})

    assert raised.value.errno == errno.ENOENT
    assert str(job / "io.max") in str(raised.value)
    assert "'8:0 rbps=1'" in str(raised.value)


# -- usage, kill, pids, has -----------------------------------------------------------------------


def test_usage_parses_files(tmp_path: Path) -> None:
    job = make_fake_cgroup(tmp_path / "job")
    (job / "cpu.stat").write_text(CPU_STAT)
    (job / "memory.current").write_text("1048576\n")
    (job / "memory.peak").write_text("2097152\n")
    (job / "pids.current").write_text("3\n")
    (job / "pids.peak").write_text("5\n")
    (job / "io.stat").write_text(IO_STAT)
    (job / "memory.events").write_text(MEMORY_EVENTS)

    usage = JobCgroup(2, {"": str(job)}).usage()

    assert usage["cpu_seconds"] == 1.5
    assert usage["memory_bytes"] == 1048576
    assert usage["memory_peak_bytes"] == 2097152
    assert usage["pids"] == 3
    assert usage["pids_peak"] == 5
    assert usage["io_read_bytes"] == 101
    assert usage["io_write_bytes"] == 202
    assert usage["oom_kills"] == 1


def test_usage_missing_files(tmp_path: Path) -> None:
    job = tmp_path / "job"
    job.mkdir()

    usage = JobCgroup(2, {"": str(job)}).usage()

    assert usage == {
        "cpu_seconds": None,
        "memory_bytes": None,
        "memory_peak_bytes": None,
        "pids": None,
        "pids_peak": None,
        "io_read_bytes": None,
        "io_write_bytes": None,
        "oom_kills": None,
    }


def test_usage_memory_peak_max(tmp_path: Path) -> None:
    job = make_fake_cgroup(tmp_path / "job")
    (job / "memory.peak").write_text("max\n")

    usage = JobCgroup(2, {"": str(job)}).usage()

    assert usage["memory_peak_bytes"] is None


def test_kill_writes_cgroup_kill(tmp_path: Path) -> None:
    job = make_fake_cgroup(tmp_path / "job")

    JobCgroup(2, {"": str(job)}).kill()

    assert (job / "cgroup.kill").read_text() == "1"


def test_kill_missing_folder(tmp_path: Path) -> None:
    job = tmp_path / "job"

    JobCgroup(2, {"": str(job)}).kill()

    assert not job.exists()


def test_kill_fallback_empty_cgroup(fake: FakeCgroupfs, tmp_path: Path) -> None:
    job = make_fake_cgroup(tmp_path / "job")
    (job / "cgroup.kill").unlink()

    JobCgroup(2, {"": str(job)}).kill()

    assert fake.writes_in(job) == []


def test_join_writes_pid(tmp_path: Path) -> None:
    job = make_fake_cgroup(tmp_path / "job")

    JobCgroup(2, {"": str(job)}).join(1234)

    assert (job / "cgroup.procs").read_text() == "1234"


def test_join_missing_folder(tmp_path: Path) -> None:
    job = tmp_path / "job"

    with pytest.raises(CgroupError) as raised:
        JobCgroup(2, {"": str(job)}).join(1234)

    assert raised.value.errno == errno.ENOENT
    assert str(job / "cgroup.procs") in str(raised.value)


def test_pids_reads_procs(tmp_path: Path) -> None:
    job = make_fake_cgroup(tmp_path / "job", procs="12\n34\n")

    assert JobCgroup(2, {"": str(job)}).pids() == {12, 34}


def test_pids_missing_folder(tmp_path: Path) -> None:
    assert JobCgroup(2, {"": str(tmp_path / "job")}).pids() == set()


def test_has_maps_v1_names(tmp_path: Path) -> None:
    job = JobCgroup(2, {"": str(make_fake_cgroup(tmp_path / "job"))})

    assert job.has("io")
    assert job.has("blkio")
    assert job.has("cpu")
    assert job.has("cpuacct")
    assert not job.has("hugetlb")


def test_has_partial_controllers(tmp_path: Path) -> None:
    job = JobCgroup(2, {"": str(make_fake_cgroup(tmp_path / "job", "memory"))})

    assert job.has("memory")
    assert not job.has("cpu")
    assert not job.has("blkio")


def test_to_dict_round_trip(tmp_path: Path) -> None:
    job = JobCgroup(2, {"": str(tmp_path / "job")})

    assert JobCgroup.from_dict(job.to_dict()) == job


# -- layout ---------------------------------------------------------------------------------------


def test_detect_v2_session(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    proc_self = write_proc_self(
        tmp_path / "proc-self", "0::/user.slice/session\n", [cgroup2_mount_line(root)]
    )

    layout = CgroupLayout.detect(root=str(root), proc_self=str(proc_self))

    assert layout.version == 2
    assert layout.parents == {"": f"{root}/user.slice/session/{PARENT_NAME}"}
    assert layout.own == f"{root}/user.slice/session"


def test_detect_v2_root_cgroup(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    proc_self = write_proc_self(tmp_path / "proc-self", "0::/\n", [cgroup2_mount_line(root)])

    layout = CgroupLayout.detect(root=str(root), proc_self=str(proc_self))

    assert layout.version == 2
    assert layout.parents == {"": f"{root}/{PARENT_NAME}"}
    assert layout.own == str(root)


def test_detect_hybrid_uses_v1(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    proc_self = write_proc_self(
        tmp_path / "proc-self",
        "4:memory:/session\n1:cpu,cpuacct:/\n0::/\n",
        [
            "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755",
            cgroup1_mount_line(root / "memory", "memory"),
            cgroup1_mount_line(root / "cpu,cpuacct", "cpu,cpuacct"),
            cgroup2_mount_line(root / "unified"),
        ],
    )

    layout = CgroupLayout.detect(root=str(root), proc_self=str(proc_self))

    assert layout.version == 1
    assert layout.parents == {
        "memory": f"{root}/memory/session/{PARENT_NAME}",
        "cpu": f"{root}/cpu,cpuacct/{PARENT_NAME}",
        "cpuacct": f"{root}/cpu,cpuacct/{PARENT_NAME}",
    }


def test_enable_moves_server_to_leaf(fake: FakeCgroupfs, tmp_path: Path) -> None:
    own = own_cgroup(tmp_path, "cpuset cpu io memory hugetlb pids rdma", f"{os.getpid()}\n")
    leaf = own / SERVER_LEAF_NAME
    parent = own / PARENT_NAME

    CgroupLayout.v2(str(own))._enable_v2_controllers()

    assert (leaf / "cgroup.procs").read_text() == str(os.getpid())
    assert (own / "cgroup.procs").read_text() == ""
    assert (own / "cgroup.subtree_control").read_text() == "+cpu +io +memory +pids"
    assert (parent / "cgroup.subtree_control").read_text() == "+cpu +io +memory +pids"
    assert fake.writes_in(leaf) == [("cgroup.procs", str(os.getpid()))]


def test_enable_rejects_other_pids(fake: FakeCgroupfs, tmp_path: Path) -> None:
    # 4242 is only a line in a fake file, so no process is signalled or moved.
    own = own_cgroup(tmp_path, ALL_CONTROLLERS, f"{os.getpid()}\n4242\n")

    with pytest.raises(CgroupError) as raised:
        CgroupLayout.v2(str(own))._enable_v2_controllers()

    assert raised.value.errno == errno.EBUSY
    assert "Delegate=yes" in str(raised.value)
    assert "[4242]" in str(raised.value)
    assert (own / "cgroup.subtree_control").read_text() == ""
    assert not (own / PARENT_NAME).exists()


def test_enable_skips_enabled(fake: FakeCgroupfs, tmp_path: Path) -> None:
    # The server's pid is listed so that only the enabled controllers can explain a skipped move.
    own = own_cgroup(tmp_path, ALL_CONTROLLERS, f"{os.getpid()}\n", enabled="cpu io memory pids")
    parent = own / PARENT_NAME

    CgroupLayout.v2(str(own))._enable_v2_controllers()

    assert fake.writes_in(own) == []
    assert not (own / SERVER_LEAF_NAME).exists()
    assert (own / "cgroup.subtree_control").read_text() == "cpu io memory pids"
    assert (parent / "cgroup.subtree_control").read_text() == "+cpu +io +memory +pids"


def test_enable_root_moves_nobody(fake: FakeCgroupfs, tmp_path: Path) -> None:
    own = own_cgroup(tmp_path, ALL_CONTROLLERS, f"{os.getpid()}\n4242\n")
    (own / "cgroup.type").unlink()

    CgroupLayout.v2(str(own))._enable_v2_controllers()

    assert not (own / SERVER_LEAF_NAME).exists()
    assert (own / "cgroup.procs").read_text() == f"{os.getpid()}\n4242\n"
    assert (own / "cgroup.subtree_control").read_text() == "+cpu +io +memory +pids"


def test_enable_available_only(fake: FakeCgroupfs, tmp_path: Path) -> None:
    own = own_cgroup(tmp_path, "cpu memory", "")
    parent = own / PARENT_NAME

    CgroupLayout.v2(str(own))._enable_v2_controllers()

    assert (own / "cgroup.subtree_control").read_text() == "+cpu +memory"
    assert (parent / "cgroup.subtree_control").read_text() == "+cpu +memory"


def test_enable_partly_enabled(fake: FakeCgroupfs, tmp_path: Path) -> None:
    own = own_cgroup(tmp_path, ALL_CONTROLLERS, "", enabled="cpu memory")

    CgroupLayout.v2(str(own))._enable_v2_controllers()

    assert fake.writes_in(own) == [("cgroup.subtree_control", "+io +pids")]


def test_ensure_parents_sets_totals(fake: FakeCgroupfs, tmp_path: Path) -> None:
    own = own_cgroup(tmp_path, ALL_CONTROLLERS, "", enabled="cpu io memory pids")
    parent = own / PARENT_NAME

    CgroupLayout.v2(str(own)).ensure_parents({"memory": 8 * 1024 * MIB, "pids": 1000})

    assert (parent / "memory.max").read_text() == "8589934592"
    assert (parent / "memory.swap.max").read_text() == "0"
    assert (parent / "pids.max").read_text() == "1000"


def test_ensure_parents_skips_missing_controller(
    fake: FakeCgroupfs, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    own = own_cgroup(tmp_path, "cpu pids", "", enabled="cpu pids")
    parent = own / PARENT_NAME

    CgroupLayout.v2(str(own)).ensure_parents({"memory": 8 * 1024 * MIB, "pids": 1000})

    assert (parent / "pids.max").read_text() == "1000"
    assert (parent / "memory.max").read_text() == ""
    assert "the memory controller is not available in" in caplog.text


def test_for_job_and_job_ids(fake: FakeCgroupfs, tmp_path: Path) -> None:
    own = own_cgroup(tmp_path, ALL_CONTROLLERS, "", enabled="cpu io memory pids")
    layout = CgroupLayout.v2(str(own))
    layout.ensure_parents()

    first = layout.for_job("job-a")
    first.create()
    layout.for_job("job-b").create()

    assert first.paths == {"": str(own / PARENT_NAME / "job-a")}
    assert first.exists()
    assert layout.job_ids() == {"job-a", "job-b"}


# -- the real cgroup2 hierarchy -------------------------------------------------------------------


def cgroup2_mount() -> str | None:
    """Return the mount point of this machine's cgroup2 hierarchy, or None without one."""
    with open("/proc/self/mountinfo", encoding="utf-8") as file:
        for line in file:
            left, _, right = line.partition(" - ")
            if right.split()[0] == "cgroup2":
                return left.split()[4]
    return None


def writable_cgroup2_mount() -> str:
    """Return the mount point of a writable cgroup2 hierarchy, or skip the test."""
    mount = cgroup2_mount()
    if mount is None:
        pytest.skip("no cgroup2 hierarchy is mounted")
    if os.statvfs(mount).f_flag & os.ST_RDONLY:
        pytest.skip(f"the cgroup2 hierarchy at {mount} is read-only")
    return mount


def wait_until(condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL)


class RealJob:
    """A job cgroup in the real cgroup2 hierarchy and the processes a test started for it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.cgroup = JobCgroup(2, {"": path})
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, *argv: str, gated: bool = False) -> subprocess.Popen[bytes]:
        """Start ``argv``. A gated process gets a stdin pipe that :meth:`release` writes to."""
        stdin = subprocess.PIPE if gated else subprocess.DEVNULL
        process = subprocess.Popen(argv, stdin=stdin)
        self.processes.append(process)
        return process

    @staticmethod
    def release(process: subprocess.Popen[bytes]) -> None:
        assert process.stdin is not None
        process.stdin.write(b"go\n")
        process.stdin.close()

    def started_pids(self) -> set[int]:
        return {process.pid for process in self.processes}

    def reap_orphans(self) -> dict[int, int]:
        """Wait for the children adopted as child subreaper, and return their wait statuses.

        Only descendants of the test's processes can be adopted, and they have all been killed
        by the time this runs, so the wait has a deadline instead of blocking.
        """
        statuses: dict[int, int] = {}
        deadline = time.monotonic() + TIMEOUT
        while orphans := children_of(os.getpid()) - self.started_pids() - set(statuses):
            for pid in orphans:
                try:
                    done, status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    continue
                if done:
                    statuses[pid] = status
            assert time.monotonic() < deadline, f"adopted processes {orphans} did not end"
            time.sleep(POLL_INTERVAL)
        return statuses

    def clean_up(self) -> None:
        """Kill what the test left running, reap it and remove the test's cgroup folder."""
        if os.path.isdir(self.path):
            with open(os.path.join(self.path, "cgroup.kill"), "w", encoding="ascii") as file:
                file.write("1")
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=TIMEOUT)
            if process.stdin is not None:
                process.stdin.close()
        self.reap_orphans()
        deadline = time.monotonic() + TIMEOUT
        while os.path.isdir(self.path):
            try:
                os.rmdir(self.path)
            except OSError as error:
                # Killed processes leave the cgroup a moment after their SIGKILL.
                if error.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(POLL_INTERVAL)


@pytest.fixture
def real_job() -> Iterator[RealJob]:
    """A not yet created job cgroup at the top of the real cgroup2 hierarchy.

    This process is a child subreaper while the test runs, so the children that a killed shell
    leaves behind are reaped here and their exit status can be checked.
    """
    if os.geteuid() != 0:
        pytest.skip("creating cgroups needs root")
    mount = writable_cgroup2_mount()

    path = os.path.join(mount, f"{TEST_FOLDER_PREFIX}{uuid.uuid4().hex}")
    job = RealJob(path)
    syscalls.prctl(syscalls.PR_SET_CHILD_SUBREAPER, 1)
    try:
        yield job
    finally:
        try:
            job.clean_up()
        finally:
            syscalls.prctl(syscalls.PR_SET_CHILD_SUBREAPER, 0)
    assert not os.path.exists(path)


def start_family(job: RealJob) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes], set[int]]:
    """Start and join ``sleep 300`` and a shell that then forks two sleeps, and return them."""
    sleeper = job.start("sleep", "300")
    shell = job.start("sh", "-c", FORKING_SHELL, gated=True)
    job.cgroup.join(sleeper.pid)
    job.cgroup.join(shell.pid)
    job.release(shell)

    wait_until(lambda: len(children_of(shell.pid)) == 2)
    children = children_of(shell.pid)
    assert len(children) == 2, f"the shell forked {children}, expected two sleeps"
    return sleeper, shell, children


def test_real_create_and_join(real_job: RealJob) -> None:
    real_job.cgroup.create()
    sleeper = real_job.start("sleep", "300")

    real_job.cgroup.join(sleeper.pid)

    assert real_job.cgroup.exists()
    assert real_job.cgroup.pids() == {sleeper.pid}


def test_real_pids_include_forks(real_job: RealJob) -> None:
    real_job.cgroup.create()
    sleeper, shell, children = start_family(real_job)
    expected = {sleeper.pid, shell.pid, *children}

    wait_until(lambda: real_job.cgroup.pids() == expected)

    assert real_job.cgroup.pids() == expected


def test_real_kill_ends_tree(real_job: RealJob) -> None:
    real_job.cgroup.create()
    sleeper, shell, children = start_family(real_job)

    real_job.cgroup.kill()

    assert sleeper.wait(timeout=TIMEOUT) == -9
    assert shell.wait(timeout=TIMEOUT) == -9
    statuses = real_job.reap_orphans()
    assert set(statuses) == children
    for pid, status in statuses.items():
        assert os.WIFSIGNALED(status), f"child {pid} exited with status {status}"
        assert os.WTERMSIG(status) == signal.SIGKILL
        assert not os.path.exists(f"/proc/{pid}")
    wait_until(lambda: real_job.cgroup.pids() == set())
    assert real_job.cgroup.pids() == set()


def test_real_remove_after_kill(real_job: RealJob) -> None:
    real_job.cgroup.create()
    start_family(real_job)
    real_job.cgroup.kill()

    real_job.cgroup.remove()

    assert not os.path.exists(real_job.path)
    assert not real_job.cgroup.exists()


def test_real_remove_kills_processes(real_job: RealJob) -> None:
    real_job.cgroup.create()
    sleeper = real_job.start("sleep", "300")
    real_job.cgroup.join(sleeper.pid)

    real_job.cgroup.remove()

    assert sleeper.wait(timeout=TIMEOUT) == -9
    assert not real_job.cgroup.exists()


def test_real_remove_twice(real_job: RealJob) -> None:
    real_job.cgroup.create()
    real_job.cgroup.remove()

    real_job.cgroup.remove()

    assert not real_job.cgroup.exists()


def test_real_kill_fork_loop(real_job: RealJob) -> None:
    real_job.cgroup.create()
    shell = real_job.start("sh", "-c", FORK_LOOP, gated=True)
    real_job.cgroup.join(shell.pid)
    real_job.release(shell)
    wait_until(lambda: len(real_job.cgroup.pids()) >= 50)
    assert len(real_job.cgroup.pids()) >= 50, "the fork loop did not reach 50 processes"

    real_job.cgroup.kill()

    assert shell.wait(timeout=TIMEOUT) == -9
    wait_until(lambda: real_job.cgroup.pids() == set())
    assert real_job.cgroup.pids() == set()
    statuses = real_job.reap_orphans()
    assert len(statuses) >= 49
    not_killed = {
        pid: status
        for pid, status in statuses.items()
        if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL)
    }
    assert not_killed == {}
    assert children_of(os.getpid()) - real_job.started_pids() == set()


def test_real_usage_cpu(real_job: RealJob) -> None:
    real_job.cgroup.create()
    assert real_job.cgroup.usage()["cpu_seconds"] == 0.0

    counter = real_job.start(
        "sh", "-c", "read _; i=0; while [ $i -lt 200000 ]; do i=$((i + 1)); done", gated=True
    )
    real_job.cgroup.join(counter.pid)
    real_job.release(counter)

    assert counter.wait(timeout=60) == 0
    assert real_job.cgroup.usage()["cpu_seconds"] > 0.0


@pytest.mark.parametrize(
    ("controller", "keys"),
    [
        ("memory", ("memory_bytes", "memory_peak_bytes")),
        ("pids", ("pids", "pids_peak")),
        ("io", ("io_read_bytes", "io_write_bytes")),
    ],
)
def test_real_usage_absent_controller(
    real_job: RealJob, controller: str, keys: tuple[str, str]
) -> None:
    real_job.cgroup.create()
    if real_job.cgroup.has(controller):
        pytest.skip(f"the {controller} controller is enabled for cgroups at this level")

    usage = real_job.cgroup.usage()

    for key in keys:
        assert usage[key] is None, f"{key} is {usage[key]!r} without the {controller} controller"
    if controller == "memory":
        assert usage["oom_kills"] is None


def test_real_memory_limit(real_job: RealJob) -> None:
    real_job.cgroup.create()
    if not real_job.cgroup.has("memory"):
        pytest.skip("no cgroup v2 memory controller on this machine (hybrid layout)")
    sleeper = real_job.start("sleep", "300")
    real_job.cgroup.join(sleeper.pid)

    real_job.cgroup.apply_limits({"memory": 64 * MIB})

    path = Path(real_job.path)
    assert (path / "memory.max").read_text() == "67108864\n"
    if (path / "memory.swap.max").exists():
        assert (path / "memory.swap.max").read_text() == "0\n"
    assert real_job.cgroup.usage()["memory_bytes"] > 0


def test_real_detect_hybrid() -> None:
    mount = cgroup2_mount()
    if mount == cgroups.CGROUP_ROOT:
        pytest.skip("/sys/fs/cgroup is a cgroup2 mount here, not a hybrid layout")
    if mount is None:
        pytest.skip("no cgroup2 hierarchy is mounted")

    layout = CgroupLayout.detect()

    assert layout.version == 1
    assert "" not in layout.parents


# -- a whole job on the real cgroup2 hierarchy ----------------------------------------------------


def own_v2_cgroup(mount: str) -> str:
    """Return the folder of this process's cgroup in the cgroup2 hierarchy at ``mount``."""
    with open("/proc/self/cgroup", encoding="ascii") as file:
        for line in file:
            if line.startswith("0::"):
                return os.path.join(mount, line.strip()[3:].lstrip("/"))
    raise AssertionError("this process has no cgroup2 line in /proc/self/cgroup")


async def test_real_v2_job_through_manager(tmp_path: Path) -> None:
    """A prepared supervisor on cgroup v2 moves PID 1 into the job's cgroup when it starts."""
    if os.geteuid() != 0:
        pytest.skip("jobs need root")
    mount = writable_cgroup2_mount()
    own = own_v2_cgroup(mount)
    parent = os.path.join(own, PARENT_NAME)
    parent_existed = os.path.isdir(parent)

    # No limits: this hybrid machine's cgroup2 hierarchy has no memory or pids controller.
    manager = JobManager(str(tmp_path / "state"), default_limits=Limits())
    manager.cgroups = CgroupLayout.v2(own)
    await manager.start()
    try:
        job = await manager.submit({"command": "grep '^0::' /proc/self/cgroup; sleep 30"})
        cgroup = manager.cgroups.for_job(job.id)
        deadline = time.monotonic() + TIMEOUT
        while manager.read_output(job.id) == b"":
            assert time.monotonic() < deadline, "the job printed nothing"
            await asyncio.sleep(POLL_INTERVAL)

        # The cgroup namespace starts at the job's cgroup, and PID 1 and the command are in it.
        assert manager.read_output(job.id) == b"0::/\n"
        assert len(cgroup.pids()) == 2
        assert [name for name in os.listdir(parent) if name.startswith("pending-")] == []
        record = await manager.stop(job.id, grace=0)
        assert record.status == JobStatus.STOPPED
        assert not os.path.exists(cgroup.paths[""])
    finally:
        await manager.close()

    # The manager removes the parent it created when it closes.
    assert parent_existed or not os.path.exists(parent)
