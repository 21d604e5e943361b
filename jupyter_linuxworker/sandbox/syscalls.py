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
PR_SET_CHILD_SUBREAPER: Final = 36

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
