"""The container side of a job: namespaces, user namespace, and PID 1.

:func:`prepare_container` needs no job. It forks a child that unshares the mount, PID, UTS,
IPC and network namespaces, forks PID 1 of the new PID namespace, then unshares a user
namespace for the job, whose maps the supervisor writes. The child then exits, so PID 1 is
reparented to the supervisor (a child subreaper). PID 1 makes its mounts private, brings
loopback up and waits for :func:`start_container` to send it the job's folder. The fork server
prepares a container before a job is submitted, so this work is off the job's start path.

Once started, PID 1 unshares the cgroup namespace (the supervisor has moved it into the job's
cgroup by then), builds the root while still host root, then enters the job's user namespace.
There its root is an unprivileged host id and owns none of the other namespaces, so nothing in
the job can mount, change the network or set the hostname. PID 1 starts the command with a
reduced capability set, no_new_privs and a seccomp filter, forwards signals to it, reaps
orphans and reports how the command ended on the status pipe. Every message on that pipe is one
JSON line. Nothing in the container returns: each process ends with ``os._exit``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import signal
import socket
import struct
from dataclasses import dataclass
from typing import Any, Final, NoReturn

from . import jobdir, outputlog, seccomp, syscalls, userns
from .mounts import (
    RootSpec,
    SetupError,
    add_volumes,
    build_root,
    discard_root,
    make_mounts_private,
    pivot_root,
    step,
)

# The cgroup namespace is left out: PID 1 unshares it once it is in the job's cgroup, so that
# /proc/self/cgroup in the job shows that cgroup as "/".
NAMESPACES: Final = (
    syscalls.CLONE_NEWNS
    | syscalls.CLONE_NEWPID
    | syscalls.CLONE_NEWUTS
    | syscalls.CLONE_NEWIPC
    | syscalls.CLONE_NEWNET
)
# SCM_MAX_FD of Linux: the most descriptors one message can carry: the job's user namespace
# and one per volume owner.
MAX_PASSED_FDS: Final = 253
MAX_START_MESSAGE: Final = 4096
SETUP_FAILED_EXIT: Final = 125
EXEC_FAILED_EXIT: Final = 127
# execvp's search path when the job's environment has no PATH.
DEFAULT_PATH: Final = "/bin:/usr/bin"
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
    """The write ends of the pipes that PID 1 keeps from the supervisor."""

    stdout: int
    stderr: int
    status: int


@dataclass
class PreparedContainer:
    """A PID 1 waiting in fresh namespaces, and the supervisor's ends of its pipes."""

    id_map: tuple[int, int]
    pid1: int
    control: socket.socket
    stdout: int
    stderr: int
    status: int
    # Status lines read past PID 1's pid while waiting for it.
    status_buffer: bytes


def prepare_container(id_map: tuple[int, int], root: RootSpec | None = None) -> PreparedContainer:
    """Create the pipes, PID 1 and the user namespace; raise SetupError naming the failed step.

    With ``root``, PID 1 builds that root now, so a job whose launch data names the same root
    only adds its volumes. The caller must be a child subreaper, so that PID 1 becomes
    its child.
    """
    try:
        stdout_read, stdout_write = os.pipe2(os.O_CLOEXEC)
        stderr_read, stderr_write = os.pipe2(os.O_CLOEXEC)
        status_read, status_write = os.pipe2(os.O_CLOEXEC)
        release_read, release_write = os.pipe2(os.O_CLOEXEC)
        control, pid1_control = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    except OSError as error:
        raise SetupError("create pipes", error) from None
    for fd in (stdout_read, stderr_read):
        outputlog.set_pipe_size(fd)
    fds = ContainerFds(stdout_write, stderr_write, status_write)

    container_pid = os.fork()
    if container_pid == 0:
        # The supervisor's other descriptors, such as its socket to the fork server, must not
        # live on in PID 1 for the whole job.
        syscalls.close_all_but(
            {stdout_write, stderr_write, status_write, pid1_control.fileno(), release_read}
        )
        _run_container(fds, pid1_control, release_read)
    for fd in (stdout_write, stderr_write, status_write, release_read):
        os.close(fd)
    pid1_control.close()

    # The container child reports PID 1's pid, or how it failed, and waits in the job's new
    # user namespace until its maps are written.
    buffer = b""
    while b"\n" not in buffer:
        data = os.read(status_read, 65536)
        if not data:
            break
        buffer += data
    line, _, rest = buffer.partition(b"\n")
    message = json.loads(line) if line else {}
    try:
        if "pid1" not in message:
            failure = message.get("setup_error", {})
            text = failure.get("message", "the container child ended without reporting PID 1")
            cause = OSError(int(failure.get("errno", errno.EIO)), text)
            raise SetupError(failure.get("step", "fork PID 1"), cause)
        pid1 = int(message["pid1"])
        try:
            _hand_over_userns(container_pid, id_map, root, control)
        except SetupError:
            _signal_quietly(pid1, signal.SIGKILL)
            raise
    except SetupError:
        for fd in (stdout_read, stderr_read, status_read):
            os.close(fd)
        control.close()
        raise
    finally:
        os.close(release_write)
        os.waitpid(container_pid, 0)
    return PreparedContainer(id_map, pid1, control, stdout_read, stderr_read, status_read, rest)


def _hand_over_userns(
    container_pid: int, id_map: tuple[int, int], root: RootSpec | None, control: socket.socket
) -> None:
    """Map the user namespace that the container child made, and send it to PID 1 with ``root``."""
    start, size = id_map
    id_line = f"0 {start} {size}"
    try:
        job_userns = userns.map_and_open(container_pid, id_line, id_line)
    except OSError as error:
        raise SetupError("create user namespace", error) from None
    try:
        root_message = json.dumps(dataclasses.asdict(root) if root is not None else None)
        socket.send_fds(control, [root_message.encode()], [job_userns])
    except OSError as error:
        raise SetupError("prepare PID 1", error) from None
    finally:
        os.close(job_userns)


def start_container(prepared: PreparedContainer, job_dir: str, volume_userns: list[int]) -> None:
    """Send PID 1 the job's folder and the volumes' user namespaces; PID 1 takes it from there.

    The caller has moved PID 1 into the job's cgroup. Raises SetupError if PID 1 is gone.
    """
    try:
        socket.send_fds(prepared.control, [os.fsencode(job_dir)], volume_userns)
    except OSError as error:
        raise SetupError("start PID 1", error) from None
    finally:
        prepared.control.close()


def discard_container(prepared: PreparedContainer) -> None:
    """End a PID 1 that was never started, and close the supervisor's ends of its pipes."""
    prepared.control.close()
    with contextlib.suppress(ProcessLookupError):
        os.kill(prepared.pid1, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(prepared.pid1, 0)
    for fd in (prepared.stdout, prepared.stderr, prepared.status):
        with contextlib.suppress(OSError):
            os.close(fd)


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


def _run_container(fds: ContainerFds, control: socket.socket, release: int) -> NoReturn:
    """Unshare the namespaces, fork PID 1, then hold the job's user namespace; never returns.

    The user namespace is created here, after the fork, so PID 1 stays host root to build the
    root. The supervisor writes its maps and opens it before this process exits.
    """
    try:
        step("unshare namespaces", syscalls.unshare, NAMESPACES)
        pid1 = os.fork()
    except SetupError as error:
        _fail(fds.status, error)
    except OSError as error:
        _fail(fds.status, error, "fork PID 1")

    if pid1 == 0:
        os.close(release)
        _run_pid1(fds, control)
    try:
        step("create user namespace", syscalls.unshare, syscalls.CLONE_NEWUSER)
    except SetupError as error:
        _signal_quietly(pid1, signal.SIGKILL)
        _fail(fds.status, error)
    _send(fds.status, {"pid1": pid1})
    os.read(release, 1)
    os._exit(0)


def _receive(control: socket.socket) -> tuple[bytes, list[int]]:
    message, fds, _flags, _address = socket.recv_fds(control, MAX_START_MESSAGE, MAX_PASSED_FDS)
    if not message:
        # The supervisor discarded this container, or ended.
        os._exit(0)
    return message, fds


def _wait_for_job(control: socket.socket) -> tuple[str, list[int]]:
    """Return the job's folder and the volumes' user namespaces, once the supervisor sends them."""
    message, volume_userns = _receive(control)
    control.close()
    return os.fsdecode(message), volume_userns


def _prepare_root(message: bytes, job_userns: int) -> RootSpec | None:
    """Build the root that the supervisor's prepare message names; None if there is none."""
    data = json.loads(message)
    if data is None:
        return None
    spec = RootSpec(**data)
    try:
        build_root(spec, job_userns)
    except SetupError:
        # The job's own launch data gets a fresh try, which reports the failure.
        with contextlib.suppress(SetupError):
            discard_root(spec)
        return None
    return spec


def _run_pid1(fds: ContainerFds, control: socket.socket) -> NoReturn:
    try:
        step("name PID 1", syscalls.set_process_title, INIT_TITLE)
        make_mounts_private()
        step("bring loopback up", _bring_loopback_up)
    except SetupError as error:
        _fail(fds.status, error)

    message, userns_fds = _receive(control)
    job_userns = userns_fds[0]
    prepared_root = _prepare_root(message, job_userns)

    job_dir, volume_userns = _wait_for_job(control)
    try:
        launch = jobdir.read_json(os.path.join(job_dir, jobdir.LAUNCH_FILE))
        if launch is None:
            raise FileNotFoundError(errno.ENOENT, "no launch file", job_dir)
    except (OSError, ValueError) as error:
        _fail(fds.status, OSError(errno.EIO, str(error)), "read the launch file")
    try:
        step("unshare the cgroup namespace", syscalls.unshare, syscalls.CLONE_NEWCGROUP)
        spec = RootSpec.from_launch(launch)
        if prepared_root is not None and prepared_root != spec:
            discard_root(prepared_root)
            prepared_root = None
        if prepared_root is None:
            build_root(spec, job_userns)
        root = os.path.join(spec.staging, "root")
        add_volumes(root, launch["volumes"], volume_userns)
        step("set hostname", socket.sethostname, launch["hostname"])
        step("enter new root", pivot_root, root)
        step("enter user namespace", _enter_userns, job_userns)
        workdir = launch["workdir"]
        step(f"enter working directory {workdir}", _enter_workdir, workdir)
    except SetupError as error:
        _fail(fds.status, error)
    for fd in (job_userns, *volume_userns):
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
    # A prepared PID 1 was forked while the supervisor still blocked its stop signals.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)

    # The last steps before the command: a small capability set, no way to gain privileges
    # through setuid files, and the seccomp filter. PID 1 takes them on itself, so the command
    # can be started with posix_spawn (a vfork, far cheaper than forking Python) and inherits
    # them. PID 1 needs nothing they take away: it only waits, signals and writes its pipe.
    try:
        syscalls.close_range_cloexec(3)
        syscalls.limit_capabilities(KEPT_CAPABILITIES, int(launch["last_capability"]))
        syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
        if launch["seccomp"]:
            seccomp.install()
    except OSError as error:
        _fail(fds.status, error, "restrict PID 1 before the command")

    try:
        child = _spawn_command(launch, fds)
    except OSError as error:
        code = error.errno or errno.ENOEXEC
        failure = {"errno": code, "argv0": launch["argv"][0], "message": os.strerror(code)}
        _send(fds.status, {"exec_error": failure})
        _send(fds.status, {"exit_status": EXEC_FAILED_EXIT << 8})
        os._exit(EXEC_FAILED_EXIT)
    os.close(fds.stdout)
    os.close(fds.stderr)
    for pending in forwarded:
        _signal_quietly(child, pending)
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


def _spawn_command(launch: dict[str, Any], fds: ContainerFds) -> int:
    """Start the command in a session of its own; return its pid or raise the exec error."""
    argv: list[str] = launch["argv"]
    env: dict[str, str] = launch["env"]
    # Python ignores SIGPIPE and SIGXFSZ; a shell pipeline like `yes | head` needs the default.
    default_signals = signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}
    return os.posix_spawn(
        _find_program(argv[0], env.get("PATH", DEFAULT_PATH)),
        argv,
        env,
        file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, fds.stdout, 1),
            (os.POSIX_SPAWN_DUP2, fds.stderr, 2),
        ],
        setsid=True,
        setsigmask=(),
        setsigdef=default_signals,
    )


def _find_program(name: str, search_path: str) -> str:
    """Return the path that execvp would run for ``name``; raise its error if there is none."""
    if "/" in name:
        return name
    denied: OSError | None = None
    for folder in search_path.split(":"):
        candidate = os.path.join(folder or ".", name)
        if os.path.isfile(candidate):
            if os.access(candidate, os.X_OK):
                return candidate
            denied = PermissionError(errno.EACCES, os.strerror(errno.EACCES), candidate)
    if denied is not None:
        raise denied
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)


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
