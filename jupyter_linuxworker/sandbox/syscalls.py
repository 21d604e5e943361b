"""The few Linux system calls that Python 3.11's standard library lacks, through ctypes.

Every wrapper raises ``OSError`` with the errno and the path or value involved, so callers can
name the failing step without looking at ``ctypes.get_errno()`` themselves.
"""

from __future__ import annotations

import ctypes
import os
from typing import Final

_libc = ctypes.CDLL(None, use_errno=True)

# Namespace flags from <linux/sched.h>.
CLONE_NEWNS: Final = 0x00020000
CLONE_NEWCGROUP: Final = 0x02000000
CLONE_NEWUTS: Final = 0x04000000
CLONE_NEWIPC: Final = 0x08000000
CLONE_NEWUSER: Final = 0x10000000
CLONE_NEWPID: Final = 0x20000000
CLONE_NEWNET: Final = 0x40000000

# Mount flags from <sys/mount.h>.
MS_RDONLY: Final = 0x1
MS_NOSUID: Final = 0x2
MS_NODEV: Final = 0x4
MS_NOEXEC: Final = 0x8
MS_REMOUNT: Final = 0x20
MS_BIND: Final = 0x1000
MS_REC: Final = 0x4000
MS_PRIVATE: Final = 0x40000
MNT_DETACH: Final = 0x2

# prctl options from <linux/prctl.h>.
PR_SET_PDEATHSIG: Final = 1
PR_CAPBSET_DROP: Final = 24
PR_SET_CHILD_SUBREAPER: Final = 36
PR_SET_NO_NEW_PRIVS: Final = 38
PR_CAP_AMBIENT: Final = 47
PR_CAP_AMBIENT_CLEAR_ALL: Final = 4

# The new mount API (Linux 5.2, idmapped mounts 5.12). These numbers are the same on every
# architecture because they were added after the syscall tables were unified.
_SYS_OPEN_TREE: Final = 428
_SYS_MOVE_MOUNT: Final = 429
_SYS_MOUNT_SETATTR: Final = 442
OPEN_TREE_CLONE: Final = 1
AT_FDCWD: Final = -100
AT_EMPTY_PATH: Final = 0x1000
AT_RECURSIVE: Final = 0x8000
MOVE_MOUNT_F_EMPTY_PATH: Final = 0x4
MOUNT_ATTR_RDONLY: Final = 0x1
MOUNT_ATTR_NOSUID: Final = 0x2
MOUNT_ATTR_NODEV: Final = 0x4
MOUNT_ATTR_IDMAP: Final = 0x00100000
_CAPABILITY_VERSION_3: Final = 0x20080522
# close_range (Linux 5.9; the CLOEXEC flag 5.11), also the same on every architecture.
_SYS_CLOSE_RANGE: Final = 436
CLOSE_RANGE_CLOEXEC: Final = 0x4
_MAX_FD: Final = 0xFFFFFFFF
# The end of os.closerange, which takes a C int: past any open descriptor.
_MAX_INT_FD: Final = 0x7FFFFFFF

_SYS_PIVOT_ROOT: Final = 155  # x86_64; the other architectures are listed below.
_PIVOT_ROOT_NUMBERS: Final = {
    "x86_64": 155,
    "aarch64": 41,
    "riscv64": 41,
    "ppc64le": 203,
    "s390x": 217,
}


def _check(result: int, what: str) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")
    return result


def close_all_but(keep: set[int]) -> None:
    """Close every descriptor from 3 up that is not in ``keep``.

    For a child right after fork, which gets a copy of every descriptor of its parent.
    """
    first = 3
    for fd in sorted(fd for fd in keep if fd >= first):
        os.closerange(first, fd)
        first = fd + 1
    os.closerange(first, _MAX_INT_FD)


def close_range_cloexec(first: int) -> None:
    """Set close-on-exec on every descriptor from ``first`` up, so no exec'd program gets one."""
    result = _libc.syscall(
        ctypes.c_long(_SYS_CLOSE_RANGE),
        ctypes.c_uint(first),
        ctypes.c_uint(_MAX_FD),
        ctypes.c_uint(CLOSE_RANGE_CLOEXEC),
    )
    _check(result, f"close_range({first}, ~0, CLOSE_RANGE_CLOEXEC)")


def unshare(flags: int) -> None:
    """Move the calling process into new namespaces given by ``CLONE_NEW*`` flags."""
    _check(_libc.unshare(ctypes.c_int(flags)), f"unshare(0x{flags:x})")


def mount(
    source: str, target: str, fstype: str | None, flags: int = 0, data: str | None = None
) -> None:
    """Mount ``source`` on ``target``; the error names both."""
    result = _libc.mount(
        source.encode(),
        target.encode(),
        fstype.encode() if fstype is not None else None,
        ctypes.c_ulong(flags),
        data.encode() if data is not None else None,
    )
    _check(result, f"mount {source!r} on {target!r} (type {fstype})")


def umount2(target: str, flags: int = 0) -> None:
    """Unmount ``target``."""
    _check(_libc.umount2(target.encode(), ctypes.c_int(flags)), f"umount {target!r}")


def pivot_root(new_root: str, put_old: str) -> None:
    """Make ``new_root`` the root of the calling process's mount namespace."""
    number = _PIVOT_ROOT_NUMBERS.get(os.uname().machine, _SYS_PIVOT_ROOT)
    result = _libc.syscall(ctypes.c_long(number), new_root.encode(), put_old.encode())
    _check(result, f"pivot_root {new_root!r}")


def prctl(option: int, arg2: int = 0) -> None:
    """Call prctl with one argument."""
    result = _libc.prctl(
        ctypes.c_int(option),
        ctypes.c_ulong(arg2),
        ctypes.c_ulong(0),
        ctypes.c_ulong(0),
        ctypes.c_ulong(0),
    )
    _check(result, f"prctl({option})")


def setns(fd: int, nstype: int) -> None:
    """Move the calling process into the namespace that ``fd`` refers to."""
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), f"setns(0x{nstype:x})")


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def open_tree_clone(path: str) -> int:
    """Return a descriptor of a detached, not yet attached bind mount of ``path``."""
    flags = OPEN_TREE_CLONE | os.O_CLOEXEC
    result = _libc.syscall(
        ctypes.c_long(_SYS_OPEN_TREE), ctypes.c_int(AT_FDCWD), path.encode(), ctypes.c_uint(flags)
    )
    return _check(result, f"open_tree {path!r}")


def set_idmap(tree_fd: int, userns_fd: int, what: str, attributes: int = 0) -> None:
    """Make the detached mount ``tree_fd`` show owners through the id map of ``userns_fd``.

    ``attributes`` adds more MOUNT_ATTR_* flags, such as MOUNT_ATTR_RDONLY.
    """
    attr = _MountAttr(MOUNT_ATTR_IDMAP | attributes, 0, 0, userns_fd)
    result = _libc.syscall(
        ctypes.c_long(_SYS_MOUNT_SETATTR),
        ctypes.c_int(tree_fd),
        b"",
        ctypes.c_uint(AT_EMPTY_PATH),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    _check(result, f"idmapped mount of {what!r}")


def move_mount(tree_fd: int, target: str) -> None:
    """Attach the detached mount ``tree_fd`` at ``target``."""
    result = _libc.syscall(
        ctypes.c_long(_SYS_MOVE_MOUNT),
        ctypes.c_int(tree_fd),
        b"",
        ctypes.c_int(AT_FDCWD),
        target.encode(),
        ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH),
    )
    _check(result, f"move_mount to {target!r}")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def limit_capabilities(keep: frozenset[int], last_cap: int) -> None:
    """Drop every capability not in ``keep`` from the bounding, ambient and current sets."""
    for cap in range(last_cap + 1):
        if cap not in keep:
            _check(
                _libc.prctl(
                    ctypes.c_int(PR_CAPBSET_DROP),
                    ctypes.c_ulong(cap),
                    ctypes.c_ulong(0),
                    ctypes.c_ulong(0),
                    ctypes.c_ulong(0),
                ),
                f"drop capability {cap}",
            )
    _check(
        _libc.prctl(
            ctypes.c_int(PR_CAP_AMBIENT),
            ctypes.c_ulong(PR_CAP_AMBIENT_CLEAR_ALL),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
        ),
        "clear ambient capabilities",
    )
    mask = sum(1 << cap for cap in keep)
    data = (_CapData * 2)()
    data[0] = _CapData(mask & 0xFFFFFFFF, mask & 0xFFFFFFFF, 0)
    data[1] = _CapData(mask >> 32, mask >> 32, 0)
    header = _CapHeader(_CAPABILITY_VERSION_3, 0)
    _check(_libc.capset(ctypes.byref(header), data), "capset")


# fallocate modes from <linux/falloc.h>.
FALLOC_FL_KEEP_SIZE: Final = 0x1


def reserve_blocks(fd: int, offset: int, length: int) -> None:
    """Allocate the blocks of ``length`` bytes at ``offset`` of file ``fd``, keeping its size."""
    result = _libc.fallocate64(
        ctypes.c_int(fd),
        ctypes.c_int(FALLOC_FL_KEEP_SIZE),
        ctypes.c_int64(offset),
        ctypes.c_int64(length),
    )
    _check(result, f"fallocate(fd {fd}, FALLOC_FL_KEEP_SIZE, {offset}, {length})")


PR_SET_NAME: Final = 15
_STAT_ARG_START: Final = 45  # fields 48 and 49 of /proc/self/stat, counted after the ')'


def set_process_title(title: str) -> None:
    """Show ``title`` as the process's name and command line, in place of its real argv.

    PID 1 of a job is a fork of the supervisor, whose command line names host paths. The
    argv memory is overwritten in place, so nothing about it reaches the job.
    """
    encoded = title.encode()
    _libc.prctl(ctypes.c_int(PR_SET_NAME), ctypes.c_char_p(encoded[:15]), 0, 0, 0)
    with open("/proc/self/stat", "rb") as file:
        stat = file.read()
    fields = stat[stat.rindex(b")") + 2 :].split()
    start, end = int(fields[_STAT_ARG_START]), int(fields[_STAT_ARG_START + 1])
    size = end - start
    if size <= 0:
        return
    text = encoded[: size - 1]
    ctypes.memset(start, 0, size)
    ctypes.memmove(start, text, len(text))
