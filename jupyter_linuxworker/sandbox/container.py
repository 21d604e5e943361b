"""The container side of a job: namespaces, user namespace, and PID 1.

The supervisor forks :func:`run_container`. That child joins the job's cgroup, unshares the
namespaces and forks PID 1 of the new PID namespace, then exits, so PID 1 is reparented to the
supervisor (a child subreaper). PID 1 builds the root while still host root, then enters the
job's user namespace. There its root is an unprivileged host id and owns none of the other
namespaces, so nothing in the job can mount, change the network or set the hostname. PID 1
starts the command with a reduced capability set, no_new_privs and a seccomp filter, forwards
signals to it, reaps orphans and reports how the command ended on the status pipe. Every
message on that pipe is one JSON line. Nothing here returns: each process ends with
``os._exit``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import socket
import struct
from dataclasses import dataclass
from typing import Any, Final, NoReturn

from . import seccomp, syscalls
from .cgroups import JobCgroup
from .mounts import SetupError, pivot_root, setup_root, step

NAMESPACES: Final = (
    syscalls.CLONE_NEWNS
    | syscalls.CLONE_NEWPID
    | syscalls.CLONE_NEWUTS
    | syscalls.CLONE_NEWIPC
    | syscalls.CLONE_NEWNET
    | syscalls.CLONE_NEWCGROUP
)
SETUP_FAILED_EXIT: Final = 125
EXEC_FAILED_EXIT: Final = 127
MAX_FD: Final = 65536
INIT_TITLE: Final = "init"
FORWARDED_SIGNALS: Final = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
# Kept so that a job's root can manage the job's own files and processes as root would:
# change owners and modes, override permissions, send signals, switch ids, bind low ports.
# In a user namespace they act only on ids mapped into it, never on host-owned files.
KEPT_CAPABILITIES: Final = frozenset(
    {
        0,  # CAP_CHOWN
        1,  # CAP_DAC_OVERRIDE
        3,  # CAP_FOWNER
        4,  # CAP_FSETID
        5,  # CAP_KILL
        6,  # CAP_SETGID
        7,  # CAP_SETUID
        10,  # CAP_NET_BIND_SERVICE
    }
)
_SIOCGIFFLAGS: Final = 0x8913
_SIOCSIFFLAGS: Final = 0x8914
_IFF_UP: Final = 0x1


@dataclass(frozen=True)
class ContainerFds:
    """The descriptors the supervisor hands to the container."""

    stdout: int
    stderr: int
    status: int
    job_userns: int
    volume_userns: list[int]


def _send(status_fd: int, message: dict[str, Any]) -> None:
    os.write(status_fd, json.dumps(message).encode() + b"\n")


def _fail(status_fd: int, error: SetupError | OSError, step_name: str = "") -> NoReturn:
    if isinstance(error, SetupError):
        message = {"step": error.step, "errno": error.errno, "message": str(error)}
    else:
        text = f"{step_name}: {error}"
        message = {"step": step_name, "errno": error.errno or 0, "message": text}
    try:
        _send(status_fd, {"setup_error": message})
    finally:
        os._exit(SETUP_FAILED_EXIT)


def run_container(launch: dict[str, Any], fds: ContainerFds) -> NoReturn:
    """Join the cgroup, unshare the namespaces and fork PID 1; never returns."""
    try:
        cgroup = JobCgroup.from_dict(launch["cgroup"])
        step("join cgroup", cgroup.join)
        step("unshare namespaces", syscalls.unshare, NAMESPACES)
        pid1 = os.fork()
    except SetupError as error:
        _fail(fds.status, error)
    except OSError as error:
        _fail(fds.status, error, "fork PID 1")

    if pid1 == 0:
        _run_pid1(launch, fds)
    _send(fds.status, {"pid1": pid1})
    os._exit(0)


def _run_pid1(launch: dict[str, Any], fds: ContainerFds) -> NoReturn:
    try:
        step("name PID 1", syscalls.set_process_title, INIT_TITLE)
        root = setup_root(launch, fds.job_userns, fds.volume_userns)
        step("set hostname", socket.sethostname, launch["hostname"])
        step("bring loopback up", _bring_loopback_up)
        step("enter new root", pivot_root, root)
        step("enter user namespace", _enter_userns, fds.job_userns)
        workdir = launch["workdir"]
        step(f"enter working directory {workdir}", _enter_workdir, workdir)
    except SetupError as error:
        _fail(fds.status, error)
    for fd in (fds.job_userns, *fds.volume_userns):
        os.close(fd)

    forwarded: list[int] = []
    child = 0

    def forward(signum: int, _frame: object) -> None:
        if child:
            _signal_quietly(child, signum)
        else:
            forwarded.append(signum)

    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, forward)

    exec_read, exec_write = os.pipe2(os.O_CLOEXEC)
    child = os.fork()
    if child == 0:
        os.close(exec_read)
        _exec_command(launch, fds, exec_write)
    os.close(exec_write)
    os.close(fds.stdout)
    os.close(fds.stderr)
    for pending in forwarded:
        _signal_quietly(child, pending)

    # The exec pipe closes on a successful exec; a failed one sends its errno first.
    exec_error = os.read(exec_read, 64)
    os.close(exec_read)
    if exec_error:
        code = int(exec_error.decode())
        failure = {"errno": code, "argv0": launch["argv"][0], "message": os.strerror(code)}
        _send(fds.status, {"exec_error": failure})
    else:
        _send(fds.status, {"started": True})

    status = _reap_until(child)
    _send(fds.status, {"exit_status": status})
    os._exit(_exit_code(status))


def _reap_until(child: int) -> int:
    """Reap every process that ends in the namespace until ``child`` does; return its status."""
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return 0
        if pid == child:
            return status


def _exit_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status)


def _signal_quietly(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _exec_command(launch: dict[str, Any], fds: ContainerFds, exec_write: int) -> NoReturn:
    try:
        os.setsid()

        # Python ignores SIGPIPE and SIGXFSZ; a shell pipeline like `yes | head` needs the default.
        for signum in signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}:
            with contextlib.suppress(OSError, ValueError):
                signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())

        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(fds.stdout, 1)
        os.dup2(fds.stderr, 2)
        os.closerange(3, exec_write)
        os.closerange(exec_write + 1, MAX_FD)

        # The last steps before exec: a small capability set, no way to gain privileges
        # through setuid files, and the seccomp filter.
        syscalls.limit_capabilities(KEPT_CAPABILITIES, int(launch["last_capability"]))
        syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
        if launch["seccomp"]:
            seccomp.install()
        argv: list[str] = launch["argv"]
        os.execvpe(argv[0], argv, launch["env"])
    except OSError as error:
        os.write(exec_write, str(error.errno or errno.ENOEXEC).encode())
    os._exit(EXEC_FAILED_EXIT)


def _bring_loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock.fileno(), _SIOCGIFFLAGS, request))[1]
        request = struct.pack("16sH14x", b"lo", flags | _IFF_UP)
        fcntl.ioctl(sock.fileno(), _SIOCSIFFLAGS, request)


def _enter_userns(userns_fd: int) -> None:
    # After this, PID 1 is root only in a namespace that owns no other namespace: its
    # capabilities reach nothing outside the job's own files and processes.
    syscalls.setns(userns_fd, syscalls.CLONE_NEWUSER)
    os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)


def _enter_workdir(workdir: str) -> None:
    os.makedirs(workdir, exist_ok=True)
    os.chdir(workdir)
