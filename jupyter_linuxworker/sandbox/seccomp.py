"""A seccomp filter that keeps a job's processes away from the kernel's riskiest syscalls.

The filter is a classic BPF program over ``struct seccomp_data`` (``<linux/seccomp.h>``). It
rejects every syscall made through a foreign ABI (i386's ``int 0x80`` and x32 on x86_64) with
EPERM, and denies with EPERM the syscalls in :data:`DENIED_SYSCALLS`. It also denies
``clone`` when its flags ask for a new namespace and ``socket`` for ``AF_VSOCK``. ``clone3``
fails with ENOSYS, because BPF cannot read the flags in its argument struct and glibc falls
back to ``clone`` on ENOSYS. Every other syscall is allowed.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from .syscalls import (
    CLONE_NEWCGROUP,
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWUSER,
    CLONE_NEWUTS,
)


class SeccompError(OSError):
    """Building or loading the seccomp filter failed."""


# Classic BPF instruction classes and fields from <linux/bpf_common.h>.
BPF_LD: Final = 0x00
BPF_JMP: Final = 0x05
BPF_RET: Final = 0x06
BPF_W: Final = 0x00
BPF_ABS: Final = 0x20
BPF_JEQ: Final = 0x10
BPF_JSET: Final = 0x40
BPF_K: Final = 0x00
BPF_MAXINSNS: Final = 4096
# The jt and jf fields of struct sock_filter are u8.
BPF_MAX_JUMP: Final = 0xFF

# Filter return values and modes from <linux/seccomp.h>.
SECCOMP_RET_ALLOW: Final = 0x7FFF0000
SECCOMP_RET_ERRNO: Final = 0x00050000
SECCOMP_RET_DATA: Final = 0x0000FFFF
SECCOMP_MODE_FILTER: Final = 2

# prctl options from <linux/prctl.h>.
PR_SET_SECCOMP: Final = 22
PR_SET_NO_NEW_PRIVS: Final = 38

# AUDIT_ARCH_* from <linux/audit.h>: the ELF machine (EM_X86_64 = 62, EM_AARCH64 = 183) ORed
# with __AUDIT_ARCH_64BIT (0x80000000) and __AUDIT_ARCH_LE (0x40000000).
AUDIT_ARCH_X86_64: Final = 0xC000003E
AUDIT_ARCH_AARCH64: Final = 0xC00000B7

# x86_64 numbers x32 syscalls with this bit set (__X32_SYSCALL_BIT in <asm/unistd.h>).
X32_SYSCALL_BIT: Final = 0x40000000

# CLONE_NEWTIME from <linux/sched.h>. clone() reads its low byte as the exit signal, so the
# flag can only arrive through clone3 and unshare, which the filter handles on their own.
# No valid signal number (1 to 64) has this bit set, so denying it costs clone callers nothing.
CLONE_NEWTIME: Final = 0x00000080
CLONE_NAMESPACE_FLAGS: Final = (
    CLONE_NEWNS
    | CLONE_NEWCGROUP
    | CLONE_NEWUTS
    | CLONE_NEWIPC
    | CLONE_NEWUSER
    | CLONE_NEWPID
    | CLONE_NEWNET
    | CLONE_NEWTIME
)

# AF_VSOCK from <linux/socket.h>. Its sockets connect a virtual machine to its hypervisor host.
AF_VSOCK: Final = 40

# Offsets in struct seccomp_data: int nr, __u32 arch, __u64 instruction_pointer, __u64 args[6].
SECCOMP_DATA_NR: Final = 0
SECCOMP_DATA_ARCH: Final = 4
# The low 32 bits of args[0] on a little-endian machine. That half is enough, because
# kernel/fork.c (Linux 6.18) keeps only lower_32_bits() of clone's flags and socket's
# domain is an int.
SECCOMP_DATA_ARG0_LOW: Final = 16

# struct sock_filter: __u16 code, __u8 jt, __u8 jf, __u32 k.
SOCK_FILTER: Final = struct.Struct("=HBBI")

DENIED_SYSCALLS: Final[tuple[str, ...]] = (
    # Mounts: the job's file tree is fixed before the command starts.
    "mount",
    "umount2",
    "pivot_root",
    "open_tree",
    "move_mount",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    # Namespaces: a job stays in the namespaces its container gave it.
    "unshare",
    "setns",
    # Kernel attack surface that a shell job has no use for.
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    # Kernel modules, kexec and reboot.
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
    "reboot",
    # Host-wide state: swap, process accounting, disk quotas.
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    # The kernel keyring is not namespaced.
    "add_key",
    "request_key",
    "keyctl",
    # Access to other processes' memory and to files by handle, which bypasses path checks.
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "open_by_handle_at",
)

# Syscalls that the filter checks by argument (clone, socket) or fails with ENOSYS (clone3).
_CHECKED_SYSCALLS: Final = ("clone", "clone3", "socket")


@dataclass(frozen=True)
class _Architecture:
    """The values of one machine that the filter needs."""

    audit_arch: int
    # None where the machine has no second ABI on the same audit arch.
    x32_syscall_bit: int | None
    syscall_numbers: Mapping[str, int]


# From /usr/include/x86_64-linux-gnu/asm/unistd_64.h (linux-libc-dev 6.1.187, Debian 12).
_X86_64_SYSCALLS: Final = MappingProxyType(
    {
        "ptrace": 101,
        "pivot_root": 155,
        "acct": 163,
        "mount": 165,
        "umount2": 166,
        "swapon": 167,
        "swapoff": 168,
        "reboot": 169,
        "init_module": 175,
        "delete_module": 176,
        "quotactl": 179,
        "kexec_load": 246,
        "add_key": 248,
        "request_key": 249,
        "keyctl": 250,
        "unshare": 272,
        "perf_event_open": 298,
        "open_by_handle_at": 304,
        "setns": 308,
        "process_vm_readv": 310,
        "process_vm_writev": 311,
        "finit_module": 313,
        "kexec_file_load": 320,
        "bpf": 321,
        "userfaultfd": 323,
        "io_uring_setup": 425,
        "io_uring_enter": 426,
        "io_uring_register": 427,
        "open_tree": 428,
        "move_mount": 429,
        "fsopen": 430,
        "fsconfig": 431,
        "fsmount": 432,
        "fspick": 433,
        "mount_setattr": 442,
        "clone": 56,
        "clone3": 435,
        "socket": 41,
    }
)

# From /usr/include/asm-generic/unistd.h (linux-libc-dev 6.1.187, Debian 12), which arm64 uses.
# NOTE: not tested on real aarch64 hardware; the tests only run this program in a BPF emulator.
_AARCH64_SYSCALLS: Final = MappingProxyType(
    {
        "umount2": 39,
        "mount": 40,
        "pivot_root": 41,
        "quotactl": 60,
        "acct": 89,
        "unshare": 97,
        "kexec_load": 104,
        "init_module": 105,
        "delete_module": 106,
        "ptrace": 117,
        "reboot": 142,
        "add_key": 217,
        "request_key": 218,
        "keyctl": 219,
        "swapon": 224,
        "swapoff": 225,
        "perf_event_open": 241,
        "open_by_handle_at": 265,
        "setns": 268,
        "process_vm_readv": 270,
        "process_vm_writev": 271,
        "finit_module": 273,
        "bpf": 280,
        "userfaultfd": 282,
        "kexec_file_load": 294,
        "io_uring_setup": 425,
        "io_uring_enter": 426,
        "io_uring_register": 427,
        "open_tree": 428,
        "move_mount": 429,
        "fsopen": 430,
        "fsconfig": 431,
        "fsmount": 432,
        "fspick": 433,
        "mount_setattr": 442,
        "clone": 220,
        "clone3": 435,
        "socket": 198,
    }
)

# Keyed by os.uname().machine.
_ARCHITECTURES: Final = MappingProxyType(
    {
        "x86_64": _Architecture(AUDIT_ARCH_X86_64, X32_SYSCALL_BIT, _X86_64_SYSCALLS),
        "aarch64": _Architecture(AUDIT_ARCH_AARCH64, None, _AARCH64_SYSCALLS),
    }
)


def _statement(code: int, k: int) -> bytes:
    return SOCK_FILTER.pack(code, 0, 0, k)


def _jump(code: int, k: int, jump_true: int, jump_false: int) -> bytes:
    if not (0 <= jump_true <= BPF_MAX_JUMP and 0 <= jump_false <= BPF_MAX_JUMP):
        raise SeccompError(f"BPF jump offset {jump_true}/{jump_false} does not fit in a u8")
    return SOCK_FILTER.pack(code, jump_true, jump_false, k)


def _load(offset: int) -> bytes:
    return _statement(BPF_LD | BPF_W | BPF_ABS, offset)


def _return(action: int) -> bytes:
    return _statement(BPF_RET | BPF_K, action)


def _return_errno(error: int) -> bytes:
    return _return(SECCOMP_RET_ERRNO | (error & SECCOMP_RET_DATA))


def _if_equal_return(value: int, action: bytes) -> list[bytes]:
    # Each check skips only its own return, so no jump grows with the length of the list.
    return [_jump(BPF_JMP | BPF_JEQ | BPF_K, value, 0, 1), action]


def _if_arg0_matches_return_eperm(number: int, arg0_test: int, value: int) -> list[bytes]:
    # Loading arg0 overwrites the syscall number in A, so both ends of this block return.
    return [
        _jump(BPF_JMP | BPF_JEQ | BPF_K, number, 0, 4),
        _load(SECCOMP_DATA_ARG0_LOW),
        _jump(BPF_JMP | arg0_test | BPF_K, value, 0, 1),
        _return_errno(errno.EPERM),
        _return(SECCOMP_RET_ALLOW),
    ]


@functools.lru_cache(maxsize=len(_ARCHITECTURES))
def build_filter(machine: str | None = None) -> bytes:
    """Build the packed ``struct sock_filter`` array for ``machine`` (default: this machine).

    The result is cached, so a process forked from one that built it skips the work.

    Raises SeccompError naming the machine when there is no syscall table for it.
    """
    if machine is None:
        machine = os.uname().machine
    architecture = _ARCHITECTURES.get(machine)
    if architecture is None:
        supported = ", ".join(sorted(_ARCHITECTURES))
        raise SeccompError(
            f"no seccomp syscall table for machine {machine!r}; supported machines: {supported}"
        )
    numbers = architecture.syscall_numbers
    missing = [name for name in (*DENIED_SYSCALLS, *_CHECKED_SYSCALLS) if name not in numbers]
    if missing:
        raise SeccompError(f"the syscall table for {machine!r} is missing {', '.join(missing)}")

    deny = _return_errno(errno.EPERM)
    program = [
        _load(SECCOMP_DATA_ARCH),
        _jump(BPF_JMP | BPF_JEQ | BPF_K, architecture.audit_arch, 1, 0),
        deny,
        _load(SECCOMP_DATA_NR),
    ]
    if architecture.x32_syscall_bit is not None:
        program += [_jump(BPF_JMP | BPF_JSET | BPF_K, architecture.x32_syscall_bit, 0, 1), deny]
    for name in DENIED_SYSCALLS:
        program += _if_equal_return(numbers[name], deny)
    program += _if_equal_return(numbers["clone3"], _return_errno(errno.ENOSYS))
    program += _if_arg0_matches_return_eperm(numbers["clone"], BPF_JSET, CLONE_NAMESPACE_FLAGS)
    program += _if_arg0_matches_return_eperm(numbers["socket"], BPF_JEQ, AF_VSOCK)
    program.append(_return(SECCOMP_RET_ALLOW))

    if len(program) > BPF_MAXINSNS:
        raise SeccompError(
            f"the seccomp filter has {len(program)} instructions, over {BPF_MAXINSNS}"
        )
    return b"".join(program)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_libc = ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, arg2: int, arg3: int, step: str) -> None:
    result = _libc.prctl(
        ctypes.c_int(option),
        ctypes.c_ulong(arg2),
        ctypes.c_ulong(arg3),
        ctypes.c_ulong(0),
        ctypes.c_ulong(0),
    )
    if result != 0:
        error = ctypes.get_errno()
        raise SeccompError(error, f"{step} failed: {os.strerror(error)}")


def install(machine: str | None = None) -> None:
    """Set no_new_privs and load the filter for ``machine`` into the calling thread.

    ``machine`` must be the machine this process runs on (the default), because the filter
    rejects every syscall of any other audit arch. The filter applies to the calling thread and
    to every process it execs or forks afterwards, not to other threads that already exist, so
    call it in a single-threaded process such as a child right after fork. A failed load leaves
    no_new_privs set. Raises SeccompError with the errno on failure.
    """
    program = build_filter(machine)
    instructions = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // SOCK_FILTER.size, ctypes.addressof(instructions))

    # Without CAP_SYS_ADMIN the kernel loads a filter only after no_new_privs is set.
    _prctl(PR_SET_NO_NEW_PRIVS, 1, 0, "prctl(PR_SET_NO_NEW_PRIVS)")
    _prctl(
        PR_SET_SECCOMP,
        SECCOMP_MODE_FILTER,
        ctypes.addressof(fprog),
        "prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER)",
    )
