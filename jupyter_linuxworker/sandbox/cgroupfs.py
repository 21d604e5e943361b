"""Reading and writing cgroup files, and finding the block devices that IO limits apply to."""

from __future__ import annotations

import os
import stat
from typing import Final

SYS_DEV_BLOCK: Final = "/sys/dev/block"


class CgroupError(OSError):
    """A cgroup step failed; the message names the path."""


def read_text(path: str) -> str:
    """Return the content of a cgroup file."""
    with open(path, encoding="ascii") as file:
        return file.read()


def read_int(path: str) -> int | None:
    """Return a cgroup file's number, or None when the file is missing or contains ``max``."""
    try:
        text = read_text(path).strip()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if text == "max" else int(text)


def read_keyed(path: str) -> dict[str, int]:
    """Return the ``key value`` lines of a cgroup file (memory.events, cpu.stat) as a dict."""
    try:
        text = read_text(path)
    except FileNotFoundError:
        return {}
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            values[key] = int(value)
    return values


def write(path: str, value: str) -> None:
    """Write ``value`` to a cgroup file; the error names the file and the value."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as error:
        message = f"writing {value!r} to {path} failed: {error.strerror}"
        raise CgroupError(error.errno, message) from None
    try:
        os.write(fd, value.encode())
    except OSError as error:
        message = f"writing {value!r} to {path} failed: {error.strerror}"
        raise CgroupError(error.errno, message) from None
    finally:
        os.close(fd)


def make_cgroup(path: str) -> None:
    """Create cgroup folder ``path``; an existing one is reused."""
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        pass
    except OSError as error:
        message = f"creating cgroup {path} failed: {error.strerror}"
        raise CgroupError(error.errno, message) from None


def block_device(path: str) -> str | None:
    """Return ``MAJOR:MINOR`` of the whole disk holding ``path``, or None for a virtual one.

    Throttling works on whole disks, so a partition is replaced by its disk. A filesystem
    without a block device (tmpfs, overlayfs, NFS) returns None.
    """
    try:
        device = os.stat(path).st_dev
    except FileNotFoundError:
        return None
    number = f"{os.major(device)}:{os.minor(device)}"
    if os.major(device) == 0:
        source = _mount_source(path)
        if source is None or not source.startswith("/dev/"):
            return None
        try:
            device = os.stat(source).st_rdev
        except FileNotFoundError:
            return None
        number = f"{os.major(device)}:{os.minor(device)}"
    sys_path = os.path.join(SYS_DEV_BLOCK, number)
    if not os.path.exists(sys_path):
        return None
    if os.path.exists(os.path.join(sys_path, "partition")):
        parent = os.path.dirname(os.path.realpath(sys_path))
        return read_text(os.path.join(parent, "dev")).strip()
    return number


def device_number(device_path: str) -> str:
    """Return ``MAJOR:MINOR`` of block device file ``device_path``; raise ValueError otherwise."""
    try:
        status = os.stat(device_path)
    except FileNotFoundError:
        raise ValueError(f"device {device_path} does not exist") from None
    if not stat.S_ISBLK(status.st_mode):
        raise ValueError(f"{device_path} is not a block device")
    return f"{os.major(status.st_rdev)}:{os.minor(status.st_rdev)}"


def _mount_source(path: str) -> str | None:
    """Return the source of the mount that contains ``path`` (the longest matching mount point)."""
    real = os.path.realpath(path)
    best: tuple[int, str] | None = None
    with open("/proc/self/mountinfo", encoding="utf-8") as file:
        for line in file:
            left, _, right = line.partition(" - ")
            mount_point = left.split()[4]
            source = right.split()[1]
            inside = real == mount_point or real.startswith(mount_point.rstrip("/") + "/")
            if inside and (best is None or len(mount_point) >= best[0]):
                best = (len(mount_point), source)
    return best[1] if best else None
