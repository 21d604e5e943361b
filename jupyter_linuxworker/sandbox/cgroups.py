"""Job cgroups on cgroup v2 (unified) and v1 (one hierarchy per controller) behind one interface.

The project creates and removes cgroups only below ``PARENT_NAME`` inside the cgroup that the
job manager runs in. On v2 the manager may also have to enable controllers in its own cgroup,
which the kernel allows only once no process is left in it: the manager then moves itself
into a leaf of its own (``SERVER_LEAF_NAME``) first.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from .cgroupfs import (
    CgroupError,
    make_cgroup,
    read_int,
    read_keyed,
    read_text,
    write,
)

CGROUP_ROOT: Final = "/sys/fs/cgroup"
PARENT_NAME: Final = "jupyter-linuxworker"
SERVER_LEAF_NAME: Final = "jupyter-linuxworker-server"
# v1 controllers a job cgroup is created in. cpuset is left out: its children start with no
# CPUs or memory nodes and would need copying from the parent before any task can join.
V1_CONTROLLERS: Final = ("memory", "cpu", "cpuacct", "pids", "blkio", "freezer")
V2_CONTROLLERS: Final = ("cpu", "io", "memory", "pids")
CPU_PERIOD_US: Final = 100_000
MIN_QUOTA_US: Final = 1000
V1_SHARES_PER_WEIGHT: Final = 1024 / 100  # v2 weight 100 (the default) is v1 shares 1024
V1_MIN_SHARES: Final = 2
FREEZE_TIMEOUT: Final = 2.0
FREEZE_POLL_INTERVAL: Final = 0.002
KILL_ATTEMPTS: Final = 50
REMOVE_ATTEMPTS: Final = 200
# Attempts to lock the parent folders, which a closing manager may remove meanwhile.
PARENT_LOCK_ATTEMPTS: Final = 5
RETRY_INTERVAL: Final = 0.01
IO_LIMIT_KEYS: Final = {
    "io_read_bps": ("read_bps_device", "rbps"),
    "io_write_bps": ("write_bps_device", "wbps"),
    "io_read_iops": ("read_iops_device", "riops"),
    "io_write_iops": ("write_iops_device", "wiops"),
}

__all__ = ["CgroupError", "CgroupLayout", "JobCgroup"]


log = logging.getLogger("jupyter_linuxworker.cgroups")
# The controller that each key of a limits dict needs.
LIMIT_CONTROLLERS: Final = {"memory": "memory", "pids": "pids", "cpus": "cpu", "cpu_weight": "cpu"}


@dataclass
class JobCgroup:
    """The cgroup of one job: one folder on v2, one folder per controller on v1."""

    version: int
    paths: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready form for the supervisor's launch file."""
        return {"version": self.version, "paths": dict(self.paths)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobCgroup:
        """Rebuild a cgroup from :meth:`to_dict`."""
        return cls(int(data["version"]), {str(k): str(v) for k, v in data["paths"].items()})

    def _file(self, controller: str, name: str) -> str:
        key = "" if self.version == 2 else controller
        return os.path.join(self.paths[key], name)

    def has(self, controller: str) -> bool:
        """Return whether the cgroup has ``controller`` (a v1 name such as blkio, or v2 io)."""
        if self.version == 1:
            return controller in self.paths
        controllers = read_text(self._file("", "cgroup.controllers")).split()
        return {"blkio": "io", "cpuacct": "cpu"}.get(controller, controller) in controllers

    # -- life -------------------------------------------------------------------------------

    def create(self) -> None:
        """Create every folder of this cgroup; an existing one is reused."""
        for path in self.paths.values():
            make_cgroup(path)

    def join(self, pid: int = 0) -> None:
        """Move process ``pid`` (0: the caller) into this cgroup."""
        for path in self.paths.values():
            write(os.path.join(path, "cgroup.procs"), str(pid))

    def rename(self, target: JobCgroup) -> None:
        """Rename every folder of this cgroup to the matching folder of ``target``.

        The processes stay in it. Only cgroup v1 renames, and only within the same parent.
        """
        if self.version != 1 or target.version != 1 or set(self.paths) != set(target.paths):
            raise CgroupError(
                f"cannot rename cgroup {self.paths} to {target.paths}: only v1 cgroups with the "
                "same controllers can be renamed"
            )
        for controller, path in self.paths.items():
            try:
                os.rename(path, target.paths[controller])
            except OSError as error:
                raise CgroupError(
                    error.errno,
                    f"renaming cgroup {path} to {target.paths[controller]} failed: "
                    f"{error.strerror}",
                ) from None

    def exists(self) -> bool:
        """Return whether any folder of this cgroup still exists."""
        return any(os.path.isdir(path) for path in self.paths.values())

    def pids(self) -> set[int]:
        """Return the host pids in this cgroup (an empty set once it is gone)."""
        found: set[int] = set()
        for path in self.paths.values():
            found.update(_read_procs(path))
        return found

    def kill(self) -> None:
        """SIGKILL every process in the cgroup, also those that fork while this runs."""
        if self.version == 2:
            path = self.paths[""]
            if not os.path.isdir(path):
                return
            if os.path.exists(os.path.join(path, "cgroup.kill")):
                write(os.path.join(path, "cgroup.kill"), "1")
                return
            # Kernels before 5.14 have no cgroup.kill: freeze, kill each process, thaw.
            freeze = os.path.join(path, "cgroup.freeze")
            events = os.path.join(path, "cgroup.events")
            self._freeze_and_kill(freeze, "1", "0", path, lambda: _has_line(events, "frozen 1"))
            return
        freezer = self.paths.get("freezer")
        if freezer is not None and os.path.isdir(freezer):
            state = os.path.join(freezer, "freezer.state")
            self._freeze_and_kill(
                state, "FROZEN", "THAWED", freezer, lambda: _has_line(state, "FROZEN")
            )
            return
        # NOTE: without a freezer, a process that forks fast can create a child between the
        # read of cgroup.procs and the kills. The loop repeats until the cgroup is empty.
        for _attempt in range(KILL_ATTEMPTS):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                _kill_quietly(pid)
            time.sleep(RETRY_INTERVAL)

    def _freeze_and_kill(
        self, control: str, freeze: str, thaw: str, folder: str, is_frozen: Callable[[], bool]
    ) -> None:
        for _attempt in range(KILL_ATTEMPTS):
            if not self.pids():
                return
            write(control, freeze)
            deadline = time.monotonic() + FREEZE_TIMEOUT
            # Freezing completes a moment after the write, and v1 has no event for it.
            while not is_frozen() and time.monotonic() < deadline:
                time.sleep(FREEZE_POLL_INTERVAL)
            for pid in _read_procs(folder):
                _kill_quietly(pid)
            write(control, thaw)
            time.sleep(RETRY_INTERVAL)

    def remove(self) -> None:
        """Kill what is left and remove every folder of the cgroup; a missing one is skipped."""
        self.kill()
        for path in self.paths.values():
            for _attempt in range(REMOVE_ATTEMPTS):
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError as error:
                    # Killed tasks leave the cgroup a moment after their SIGKILL.
                    if error.errno != errno.EBUSY:
                        message = f"removing cgroup {path} failed: {error.strerror}"
                        raise CgroupError(error.errno, message) from None
                    time.sleep(RETRY_INTERVAL)
            else:
                raise CgroupError(errno.EBUSY, f"removing cgroup {path} failed: still busy")

    # -- limits -----------------------------------------------------------------------------

    def apply_limits(self, limits: dict[str, Any]) -> None:
        """Write the limits (bytes, CPUs, weight, pids, IO per device) into the cgroup's files."""
        if self.version == 2:
            self._apply_v2(limits)
        else:
            self._apply_v1(limits)

    def _apply_v1(self, limits: dict[str, Any]) -> None:
        memory = limits.get("memory")
        if memory is not None:
            write(self._file("memory", "memory.limit_in_bytes"), str(memory))
            # Memory plus swap equal to memory: the job cannot use swap beyond its limit.
            memsw = self._file("memory", "memory.memsw.limit_in_bytes")
            if os.path.exists(memsw):
                write(memsw, str(memory))
        cpus = limits.get("cpus")
        if cpus is not None:
            write(self._file("cpu", "cpu.cfs_period_us"), str(CPU_PERIOD_US))
            write(self._file("cpu", "cpu.cfs_quota_us"), str(_quota_us(cpus)))
        weight = limits.get("cpu_weight")
        if weight is not None:
            shares = max(V1_MIN_SHARES, round(weight * V1_SHARES_PER_WEIGHT))
            write(self._file("cpu", "cpu.shares"), str(shares))
        if limits.get("pids") is not None:
            write(self._file("pids", "pids.max"), str(limits["pids"]))
        for key, (v1_name, _v2_name) in IO_LIMIT_KEYS.items():
            if limits.get(key) is None:
                continue
            for device in limits.get("io_devices", ()):
                line = f"{device} {limits[key]}"
                write(self._file("blkio", f"blkio.throttle.{v1_name}"), line)

    def _apply_v2(self, limits: dict[str, Any]) -> None:
        memory = limits.get("memory")
        if memory is not None:
            write(self._file("memory", "memory.max"), str(memory))
            swap = self._file("memory", "memory.swap.max")
            if os.path.exists(swap):
                write(swap, "0")
        cpus = limits.get("cpus")
        if cpus is not None:
            write(self._file("cpu", "cpu.max"), f"{_quota_us(cpus)} {CPU_PERIOD_US}")
        if limits.get("cpu_weight") is not None:
            write(self._file("cpu", "cpu.weight"), str(limits["cpu_weight"]))
        if limits.get("pids") is not None:
            write(self._file("pids", "pids.max"), str(limits["pids"]))
        settings = [
            f"{v2_name}={limits[key]}"
            for key, (_v1_name, v2_name) in IO_LIMIT_KEYS.items()
            if limits.get(key) is not None
        ]
        if settings:
            for device in limits.get("io_devices", ()):
                write(self._file("io", "io.max"), f"{device} {' '.join(settings)}")

    # -- usage ------------------------------------------------------------------------------

    def usage(self) -> dict[str, Any]:
        """Return CPU seconds, memory current and peak, pids, IO bytes and OOM kills so far."""
        if self.version == 2:
            return self._usage_v2()
        return self._usage_v1()

    def _usage_v1(self) -> dict[str, Any]:
        cpu_ns = (
            read_int(self._file("cpuacct", "cpuacct.usage")) if "cpuacct" in self.paths else None
        )
        oom = _oom_kills(self._file("memory", "memory.oom_control"))
        io_read, io_write = _blkio_bytes(
            self._file("blkio", "blkio.throttle.io_service_bytes_recursive")
        )
        return {
            "cpu_seconds": cpu_ns / 1e9 if cpu_ns is not None else None,
            "memory_bytes": read_int(self._file("memory", "memory.usage_in_bytes")),
            "memory_peak_bytes": read_int(self._file("memory", "memory.max_usage_in_bytes")),
            "pids": read_int(self._file("pids", "pids.current")),
            "pids_peak": read_int(self._file("pids", "pids.peak")),
            "io_read_bytes": io_read,
            "io_write_bytes": io_write,
            "oom_kills": oom,
        }

    def _usage_v2(self) -> dict[str, Any]:
        cpu = read_keyed(self._file("cpu", "cpu.stat"))
        io_read, io_write = _io_stat_bytes(self._file("io", "io.stat"))
        return {
            "cpu_seconds": cpu["usage_usec"] / 1e6 if "usage_usec" in cpu else None,
            "memory_bytes": read_int(self._file("memory", "memory.current")),
            "memory_peak_bytes": read_int(self._file("memory", "memory.peak")),
            "pids": read_int(self._file("pids", "pids.current")),
            "pids_peak": read_int(self._file("pids", "pids.peak")),
            "io_read_bytes": io_read,
            "io_write_bytes": io_write,
            "oom_kills": _oom_kills(self._file("memory", "memory.events")),
        }


def _blkio_bytes(path: str) -> tuple[int | None, int | None]:
    """Sum the Read and Write lines of a v1 blkio io_service_bytes file."""
    try:
        text = read_text(path)
    except FileNotFoundError:
        return None, None
    totals = {"Read": 0, "Write": 0}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in totals:
            totals[parts[1]] += int(parts[2])
    return totals["Read"], totals["Write"]


def _io_stat_bytes(path: str) -> tuple[int | None, int | None]:
    """Sum rbytes and wbytes over the devices of a v2 io.stat file."""
    try:
        text = read_text(path)
    except FileNotFoundError:
        return None, None
    read_bytes = write_bytes = 0
    for line in text.splitlines():
        for item in line.split()[1:]:
            key, _, value = item.partition("=")
            if key == "rbytes":
                read_bytes += int(value)
            elif key == "wbytes":
                write_bytes += int(value)
    return read_bytes, write_bytes


def _has_line(path: str, line: str) -> bool:
    return line in read_text(path).splitlines()


def _quota_us(cpus: float) -> int:
    # The kernel rejects a CFS quota below 1 ms.
    return max(MIN_QUOTA_US, round(cpus * CPU_PERIOD_US))


def _oom_kills(path: str) -> int | None:
    """Return the oom_kill count of memory.events or memory.oom_control; None without the file."""
    events = read_keyed(path)
    return events.get("oom_kill", 0) if events else None


def _read_procs(folder: str) -> list[int]:
    try:
        return [int(pid) for pid in read_text(os.path.join(folder, "cgroup.procs")).split()]
    except FileNotFoundError:
        return []


def _kill_quietly(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _cgroup_mounts(mountinfo: str) -> list[tuple[str, str, set[str]]]:
    """Return (mount point, filesystem type, v1 controllers) for each cgroup mount."""
    mounts = []
    with open(mountinfo, encoding="utf-8") as file:
        for line in file:
            left, _, right = line.partition(" - ")
            fstype, _source, options = right.split()[:3]
            if fstype not in ("cgroup", "cgroup2"):
                continue
            mount_point = left.split()[4]
            controllers = {opt for opt in options.split(",") if opt in V1_CONTROLLERS}
            mounts.append((mount_point, fstype, controllers))
    return mounts


def _own_cgroups(proc_cgroup: str) -> dict[str, str]:
    """Return this process's cgroup path per v1 controller, and under ``""`` its v2 path."""
    paths: dict[str, str] = {}
    with open(proc_cgroup, encoding="utf-8") as file:
        for line in file:
            _hierarchy, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                paths[controller] = path
    return paths


@dataclass
class CgroupLayout:
    """The parent folders of job cgroups: one per v1 controller, or one on v2.

    ``own`` is the cgroup folder the manager ran in when detected (v2 only).
    """

    version: int
    parents: dict[str, str]
    own: str = ""
    # Descriptors of the parent folders that this manager keeps open with a shared flock, by path.
    _locks: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def detect(cls, root: str = CGROUP_ROOT, proc_self: str = "/proc/self") -> CgroupLayout:
        """Find the cgroup hierarchies this process is in and the job parent inside each."""
        own = _own_cgroups(os.path.join(proc_self, "cgroup"))
        mounts = _cgroup_mounts(os.path.join(proc_self, "mountinfo"))
        if any(fstype == "cgroup2" and point == root for point, fstype, _ in mounts):
            folder = os.path.join(root, own.get("", "/").lstrip("/"))
            return cls(2, {"": os.path.join(folder, PARENT_NAME)}, own=folder.rstrip("/"))
        return cls.v1(mounts, own)

    @classmethod
    def v2(cls, own_folder: str) -> CgroupLayout:
        """Return a v2 layout for a manager that runs in cgroup folder ``own_folder``."""
        return cls(2, {"": os.path.join(own_folder, PARENT_NAME)}, own=own_folder.rstrip("/"))

    @classmethod
    def v1(cls, mounts: list[tuple[str, str, set[str]]], own: dict[str, str]) -> CgroupLayout:
        """Return the v1 layout for the given cgroup mounts and own cgroup paths."""
        parents: dict[str, str] = {}
        for mount_point, fstype, controllers in mounts:
            if fstype != "cgroup":
                continue
            for controller in sorted(controllers):
                if controller in own and controller not in parents:
                    folder = os.path.join(mount_point, own[controller].lstrip("/"))
                    parents[controller] = os.path.join(folder, PARENT_NAME)
        if not parents:
            raise CgroupError(
                errno.ENOENT, f"no cgroup v1 or v2 hierarchy is mounted at {CGROUP_ROOT}"
            )
        return cls(1, parents)

    def acquire(self, totals: dict[str, Any] | None = None) -> None:
        """Create the job parent folders, set the totals and hold a shared lock on each folder.

        Every manager of the same cgroup shares the parents. The lock, a flock on the folder,
        lets :meth:`release` remove them only when no other manager has them locked.
        """
        for _attempt in range(PARENT_LOCK_ATTEMPTS):
            self.ensure_parents(totals)
            if self._lock_parents():
                return
        raise CgroupError(
            errno.EAGAIN,
            f"cannot lock the job parent cgroups {sorted(set(self.parents.values()))}: they were "
            f"removed {PARENT_LOCK_ATTEMPTS} times while this manager started; start it again",
        )

    def _lock_parents(self) -> bool:
        """Lock every parent folder; return False if one was removed or replaced meanwhile."""
        for path in sorted(set(self.parents.values())):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except FileNotFoundError:
                self._unlock_parents()
                return False
            self._locks[path] = fd
            # A closing manager holds the lock exclusively only while it removes the folder.
            fcntl.flock(fd, fcntl.LOCK_SH)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                self._unlock_parents()
                return False
        return True

    def _unlock_parents(self) -> None:
        for fd in self._locks.values():
            os.close(fd)
        self._locks.clear()

    def release(self, remove: bool = True) -> None:
        """Drop the locks of :meth:`acquire`; remove each parent that no one else uses.

        A parent stays while another manager has it locked or a job cgroup is left in it, such
        as the cgroup of a job that outlives the manager. With ``remove`` False, all stay.
        """
        for path, fd in self._locks.items():
            try:
                if remove:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    os.rmdir(path)
                    log.info("removed the job parent cgroup %s", path)
            except BlockingIOError:
                log.debug("job parent cgroup %s stays: another manager uses it", path)
            except OSError as error:
                if error.errno not in (errno.EBUSY, errno.ENOTEMPTY, errno.ENOENT):
                    log.warning("removing the job parent cgroup %s failed: %s", path, error)
            finally:
                os.close(fd)
        self._locks.clear()

    def ensure_parents(self, totals: dict[str, Any] | None = None) -> None:
        """Create the job parent folders and set the limits that all jobs together share."""
        if self.version == 2:
            self._enable_v2_controllers()
        else:
            for path in self.parents.values():
                make_cgroup(path)
        if totals:
            parent = JobCgroup(self.version, dict(self.parents))
            usable = {}
            for key, value in totals.items():
                controller = LIMIT_CONTROLLERS.get(key, key)
                if parent.has(controller):
                    usable[key] = value
                else:
                    log.warning(
                        "the %s controller is not available in %s, so the %s limit of all jobs "
                        "together is not set; delegate the controller to this cgroup to set it",
                        controller,
                        self.parents.get("", next(iter(self.parents.values()))),
                        key,
                    )
            parent.apply_limits(usable)

    def _enable_v2_controllers(self) -> None:
        own = self.own
        parent = self.parents[""]
        available = set(read_text(os.path.join(own, "cgroup.controllers")).split())
        requested = [c for c in V2_CONTROLLERS if c in available]
        enabled = set(read_text(os.path.join(own, "cgroup.subtree_control")).split())
        missing = [c for c in requested if c not in enabled]

        # No internal processes: a non-root cgroup with processes cannot hand controllers to
        # its children, so the manager moves itself into a leaf first.
        if missing and _read_procs(own) and os.path.exists(os.path.join(own, "cgroup.type")):
            leaf = os.path.join(own, SERVER_LEAF_NAME)
            make_cgroup(leaf)
            write(os.path.join(leaf, "cgroup.procs"), str(os.getpid()))
            others = _read_procs(own)
            if others:
                raise CgroupError(
                    errno.EBUSY,
                    f"cannot enable the {', '.join(missing)} controllers in {own}: it still holds "
                    f"processes {others} that are not the server's; run the server in a cgroup "
                    "of its own, such as a systemd unit with Delegate=yes",
                )
        if missing:
            write(os.path.join(own, "cgroup.subtree_control"), " ".join(f"+{c}" for c in missing))

        make_cgroup(parent)
        if requested:
            write(
                os.path.join(parent, "cgroup.subtree_control"), " ".join(f"+{c}" for c in requested)
            )

    def for_job(self, job_id: str) -> JobCgroup:
        """Return (without creating) the cgroup of job ``job_id``."""
        return JobCgroup(
            self.version, {c: os.path.join(p, job_id) for c, p in self.parents.items()}
        )

    def job_ids(self) -> set[str]:
        """Return the ids of the job cgroups that exist below the parents."""
        found: set[str] = set()
        for path in self.parents.values():
            with contextlib.suppress(FileNotFoundError):
                found.update(entry.name for entry in os.scandir(path) if entry.is_dir())
        return found
