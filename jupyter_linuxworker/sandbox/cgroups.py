"""Job cgroups on cgroup v2 (unified) and v1 (one hierarchy per controller) behind one interface.

The project only creates and removes cgroups below ``PARENT_NAME`` inside the cgroup that the
creating process (the job manager) runs in. It never writes to any cgroup it did not create.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Final

CGROUP_ROOT: Final = "/sys/fs/cgroup"
PARENT_NAME: Final = "jupyter-linuxworker"
# v1 controllers a job cgroup is created in. cpuset is left out: its children start with no
# CPUs or memory nodes and would need copying from the parent before any task can join.
V1_CONTROLLERS: Final = ("memory", "cpu", "cpuacct", "pids", "blkio", "freezer")
FREEZE_TIMEOUT: Final = 2.0
FREEZE_POLL_INTERVAL: Final = 0.002
REMOVE_ATTEMPTS: Final = 50
REMOVE_RETRY_INTERVAL: Final = 0.01


class CgroupError(OSError):
    """A cgroup step failed; the message names the path."""


def _read(path: str) -> str:
    with open(path, encoding="ascii") as file:
        return file.read()


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    except OSError as error:
        raise CgroupError(
            error.errno, f"writing {value!r} to {path} failed: {error.strerror}"
        ) from None
    finally:
        os.close(fd)


def _mountinfo_cgroup_mounts() -> list[tuple[str, str, set[str]]]:
    """Return (mount point, filesystem type, controllers) for each cgroup mount of this process."""
    mounts = []
    with open("/proc/self/mountinfo", encoding="utf-8") as file:
        for line in file:
            left, _, right = line.partition(" - ")
            fstype, _source, options = right.split()[:3]
            if fstype not in ("cgroup", "cgroup2"):
                continue
            mount_point = left.split()[4]
            controllers = {opt for opt in options.split(",") if opt in V1_CONTROLLERS}
            mounts.append((mount_point, fstype, controllers))
    return mounts


def _own_cgroups() -> dict[str, str]:
    """Return this process's cgroup path per v1 controller, and under ``""`` its v2 path."""
    paths: dict[str, str] = {}
    with open("/proc/self/cgroup", encoding="utf-8") as file:
        for line in file:
            _hierarchy, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                paths[controller] = path
    return paths


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

    def create(self) -> None:
        """Create every folder of this cgroup; an existing one is reused."""
        for path in self.paths.values():
            _make_cgroup(path)

    def join(self, pid: int = 0) -> None:
        """Move process ``pid`` (0: the caller) into this cgroup."""
        for path in self.paths.values():
            _write(os.path.join(path, "cgroup.procs"), str(pid))

    def pids(self) -> set[int]:
        """Return the host pids in this cgroup (an empty set once it is gone)."""
        found: set[int] = set()
        for path in self.paths.values():
            try:
                text = _read(os.path.join(path, "cgroup.procs"))
            except FileNotFoundError:
                continue
            found.update(int(pid) for pid in text.split())
        return found

    def kill(self) -> None:
        """SIGKILL every process in the cgroup, also those forking while it runs."""
        if self.version == 2:
            self._kill_v2()
        else:
            self._kill_v1()

    def _kill_v2(self) -> None:
        path = self.paths[""]
        if not os.path.isdir(path):
            return
        if os.path.exists(os.path.join(path, "cgroup.kill")):
            _write(os.path.join(path, "cgroup.kill"), "1")
            return
        # Kernels before 5.14 have no cgroup.kill: freeze, kill each process, thaw.
        self._freeze_and_kill(os.path.join(path, "cgroup.freeze"), "1", "0", path)

    def _kill_v1(self) -> None:
        freezer = self.paths.get("freezer")
        if freezer is not None and os.path.isdir(freezer):
            self._freeze_and_kill(
                os.path.join(freezer, "freezer.state"), "FROZEN", "THAWED", freezer
            )
            return
        # NOTE: without a freezer a process that forks fast can create a child between the read
        # of cgroup.procs and the kills; the loop repeats until the cgroup is empty.
        for _attempt in range(REMOVE_ATTEMPTS):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                _kill_quietly(pid)
            time.sleep(REMOVE_RETRY_INTERVAL)

    def _freeze_and_kill(self, state_file: str, frozen: str, thawed: str, folder: str) -> None:
        for _attempt in range(REMOVE_ATTEMPTS):
            pids = self.pids()
            if not pids:
                return
            _write(state_file, frozen)
            deadline = time.monotonic() + FREEZE_TIMEOUT
            # A v1 freezer reports FREEZING until every task stopped; there is no event for it.
            while frozen not in _read(state_file) and time.monotonic() < deadline:
                time.sleep(FREEZE_POLL_INTERVAL)
            for pid in _read_procs(folder):
                _kill_quietly(pid)
            _write(state_file, thawed)
            time.sleep(REMOVE_RETRY_INTERVAL)

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
                    # Exiting tasks leave the cgroup a moment after their SIGKILL.
                    if error.errno != errno.EBUSY:
                        raise CgroupError(
                            error.errno, f"removing cgroup {path} failed: {error.strerror}"
                        ) from None
                    time.sleep(REMOVE_RETRY_INTERVAL)
            else:
                raise CgroupError(errno.EBUSY, f"removing cgroup {path} failed: still busy")

    def exists(self) -> bool:
        """Return whether any folder of this cgroup still exists."""
        return any(os.path.isdir(path) for path in self.paths.values())


def _make_cgroup(path: str) -> None:
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        pass
    except OSError as error:
        message = f"creating cgroup {path} failed: {error.strerror}"
        raise CgroupError(error.errno, message) from None


def _read_procs(folder: str) -> list[int]:
    try:
        return [int(pid) for pid in _read(os.path.join(folder, "cgroup.procs")).split()]
    except FileNotFoundError:
        return []


def _kill_quietly(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@dataclass
class CgroupLayout:
    """Where this process's job cgroups go: the parent folder per v1 controller, or the v2 one."""

    version: int
    parents: dict[str, str]

    @classmethod
    def detect(cls) -> CgroupLayout:
        """Find the cgroup hierarchies this process is in and the job parent inside each."""
        own = _own_cgroups()
        mounts = _mountinfo_cgroup_mounts()
        unified = [m for m in mounts if m[1] == "cgroup2" and m[0] == CGROUP_ROOT]
        if unified:
            parent = os.path.join(CGROUP_ROOT, own.get("", "/").lstrip("/"), PARENT_NAME)
            return cls(2, {"": parent})
        parents: dict[str, str] = {}
        for mount_point, fstype, controllers in mounts:
            if fstype != "cgroup":
                continue
            for controller in controllers:
                if controller in own and controller not in parents:
                    parents[controller] = os.path.join(
                        mount_point, own[controller].lstrip("/"), PARENT_NAME
                    )
        if not parents:
            raise CgroupError(
                errno.ENOENT, f"no cgroup v1 or v2 hierarchy is mounted under {CGROUP_ROOT}"
            )
        return cls(1, parents)

    def ensure_parents(self) -> None:
        """Create the job parent folder in each hierarchy (our own folder, below our cgroup)."""
        for path in self.parents.values():
            _make_cgroup(path)

    def for_job(self, job_id: str) -> JobCgroup:
        """Return (without creating) the cgroup of job ``job_id``."""
        return JobCgroup(
            self.version, {c: os.path.join(p, job_id) for c, p in self.parents.items()}
        )

    def job_ids(self) -> set[str]:
        """Return the ids of the job cgroups that exist below the parents."""
        found: set[str] = set()
        for path in self.parents.values():
            try:
                found.update(entry.name for entry in os.scandir(path) if entry.is_dir())
            except FileNotFoundError:
                continue
        return found
