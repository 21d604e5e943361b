"""The container side of a job: namespaces, the root filesystem, and PID 1.

The supervisor forks :func:`run_container`. That child joins the job's cgroup, unshares the
namespaces and forks PID 1 of the new PID namespace, then exits, so PID 1 is reparented to the
supervisor (a child subreaper). PID 1 builds the root, starts the command, forwards signals to it,
reaps orphans and reports how the command ended on the status pipe. Every message on that pipe
is one JSON line. Nothing here returns to the caller: each process ends with ``os._exit``.
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
from collections.abc import Callable
from typing import Any, Final, NoReturn

from . import syscalls
from .cgroups import JobCgroup

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
DEV_NODES: Final = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS: Final = {
    "fd": "/proc/self/fd",
    "stdin": "/proc/self/fd/0",
    "stdout": "/proc/self/fd/1",
    "stderr": "/proc/self/fd/2",
    "ptmx": "pts/ptmx",
}
DEV_TMPFS_OPTIONS: Final = "mode=755,size=64k"
DEVPTS_OPTIONS: Final = "newinstance,ptmxmode=0666,mode=0620"
SHM_TMPFS_OPTIONS: Final = "mode=1777,size=64m"
TMP_TMPFS_OPTIONS: Final = "mode=1777"
FORWARDED_SIGNALS: Final = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
_SIOCGIFFLAGS: Final = 0x8913
_SIOCSIFFLAGS: Final = 0x8914
_IFF_UP: Final = 0x1


class SetupError(Exception):
    """A container setup step failed; ``step`` names it and ``errno`` is the system error."""

    def __init__(self, step: str, error: OSError) -> None:
        self.step = step
        self.errno = error.errno or 0
        super().__init__(f"{step}: {error}")


def _send(status_fd: int, message: dict[str, Any]) -> None:
    os.write(status_fd, json.dumps(message).encode() + b"\n")


def _step(name: str, action: Callable[..., object], *args: object) -> None:
    try:
        action(*args)
    except OSError as error:
        raise SetupError(name, error) from None


def _fail(status_fd: int, error: SetupError | OSError, step: str = "") -> NoReturn:
    if isinstance(error, SetupError):
        message = {"step": error.step, "errno": error.errno, "message": str(error)}
    else:
        message = {"step": step, "errno": error.errno or 0, "message": f"{step}: {error}"}
    try:
        _send(status_fd, {"setup_error": message})
    finally:
        os._exit(SETUP_FAILED_EXIT)


def run_container(
    launch: dict[str, Any], stdout_fd: int, stderr_fd: int, status_fd: int
) -> NoReturn:
    """Join the cgroup, unshare the namespaces and fork PID 1; never returns."""
    try:
        cgroup = JobCgroup.from_dict(launch["cgroup"])
        _step("join cgroup", cgroup.join)
        _step("unshare namespaces", syscalls.unshare, NAMESPACES)
        pid1 = os.fork()
    except SetupError as error:
        _fail(status_fd, error)
    except OSError as error:
        _fail(status_fd, error, "fork PID 1")

    if pid1 == 0:
        _run_pid1(launch, stdout_fd, stderr_fd, status_fd)
    _send(status_fd, {"pid1": pid1})
    os._exit(0)


def _run_pid1(launch: dict[str, Any], stdout_fd: int, stderr_fd: int, status_fd: int) -> NoReturn:
    try:
        _setup_root(launch)
        _step("set hostname", socket.sethostname, launch["hostname"])
        _step("bring loopback up", _bring_loopback_up)
        _step("enter new root", _pivot_root, launch["root"])
        workdir = launch["workdir"]
        _step(f"enter working directory {workdir}", _enter_workdir, workdir)
    except SetupError as error:
        _fail(status_fd, error)

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
        _exec_command(launch, stdout_fd, stderr_fd, exec_write)
    os.close(exec_write)
    os.close(stdout_fd)
    os.close(stderr_fd)
    for pending in forwarded:
        _signal_quietly(child, pending)

    # The exec pipe closes on a successful exec; a failed one sends its errno first.
    exec_error = os.read(exec_read, 64)
    os.close(exec_read)
    if exec_error:
        code = int(exec_error.decode())
        _send(
            status_fd,
            {
                "exec_error": {
                    "errno": code,
                    "argv0": launch["argv"][0],
                    "message": os.strerror(code),
                }
            },
        )
    else:
        _send(status_fd, {"started": True})

    status = _reap_until(child)
    _send(status_fd, {"exit_status": status})
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


def _exec_command(
    launch: dict[str, Any], stdout_fd: int, stderr_fd: int, exec_write: int
) -> NoReturn:
    try:
        os.setsid()

        # Python ignores SIGPIPE and SIGXFSZ; a shell pipeline like `yes | head` needs the default.
        for signum in signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}:
            with contextlib.suppress(OSError, ValueError):
                signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())

        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(stdout_fd, 1)
        os.dup2(stderr_fd, 2)
        os.closerange(3, exec_write)
        os.closerange(exec_write + 1, 65536)
        argv: list[str] = launch["argv"]
        os.execvpe(argv[0], argv, launch["env"])
    except OSError as error:
        os.write(exec_write, str(error.errno or errno.ENOEXEC).encode())
    os._exit(EXEC_FAILED_EXIT)


def _setup_root(launch: dict[str, Any]) -> None:
    """Build the job's root in ``launch["root"]``: image, writable layer, volumes, /proc, /dev."""
    staging: str = launch["staging"]
    root = os.path.join(staging, "root")
    upper = os.path.join(staging, "upper")
    work = os.path.join(staging, "work")
    launch["root"] = root
    private = syscalls.MS_REC | syscalls.MS_PRIVATE
    no_exec = syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC
    no_dev = syscalls.MS_NOSUID | syscalls.MS_NODEV

    # Host mounts must not see ours, and ours must not see later host mounts.
    _step("make mounts private", syscalls.mount, "none", "/", None, private)

    # The writable layer lives in a tmpfs of this mount namespace, so it dies with the job.
    layer_options = f"mode=755,size={launch['disk']}"
    _step(
        f"mount writable layer on {staging}",
        syscalls.mount,
        "tmpfs",
        staging,
        "tmpfs",
        0,
        layer_options,
    )
    for folder in (root, upper, work):
        _step(f"create {folder}", os.mkdir, folder, 0o755)
    image = launch["image_root"]
    overlay_options = f"lowerdir={image},upperdir={upper},workdir={work}"
    _step(f"mount image {image}", syscalls.mount, "overlay", root, "overlay", 0, overlay_options)

    for volume in launch["volumes"]:
        _step(f"mount volume {volume['source']} on {volume['dest']}", _mount_volume, root, volume)

    proc = _make_dir_beneath(root, "/proc")
    _step("mount /proc", syscalls.mount, "proc", proc, "proc", no_exec)
    sys_dir = _make_dir_beneath(root, "/sys")
    _step("mount /sys", syscalls.mount, "sysfs", sys_dir, "sysfs", no_exec | syscalls.MS_RDONLY)
    tmp = _make_dir_beneath(root, "/tmp")
    _step("mount /tmp", syscalls.mount, "tmpfs", tmp, "tmpfs", no_dev, TMP_TMPFS_OPTIONS)
    _setup_dev(root)


def _setup_dev(root: str) -> None:
    """Give the job a /dev of its own with only the harmless devices, bound from the host's."""
    dev = _make_dir_beneath(root, "/dev")
    no_exec = syscalls.MS_NOSUID | syscalls.MS_NOEXEC
    _step("mount /dev", syscalls.mount, "tmpfs", dev, "tmpfs", no_exec, DEV_TMPFS_OPTIONS)

    for name in DEV_NODES:
        node = os.path.join(dev, name)
        _step(f"create /dev/{name}", _create_file, node)
        _step(f"bind /dev/{name}", syscalls.mount, f"/dev/{name}", node, None, syscalls.MS_BIND)
    for name, target in DEV_LINKS.items():
        _step(f"link /dev/{name}", os.symlink, target, os.path.join(dev, name))

    pts = os.path.join(dev, "pts")
    _step("create /dev/pts", os.mkdir, pts, 0o755)
    _step("mount /dev/pts", syscalls.mount, "devpts", pts, "devpts", no_exec, DEVPTS_OPTIONS)
    shm = os.path.join(dev, "shm")
    _step("create /dev/shm", os.mkdir, shm, 0o1777)
    no_dev = syscalls.MS_NOSUID | syscalls.MS_NODEV
    _step("mount /dev/shm", syscalls.mount, "shm", shm, "tmpfs", no_dev, SHM_TMPFS_OPTIONS)


def _create_file(path: str) -> None:
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o666))


def _make_dir_beneath(root: str, path: str) -> str:
    """Create ``path`` inside ``root`` without following any symlink; return the host path.

    An image may hold a link such as ``/mnt -> /``; resolving it on the host would mount over
    a host folder, so each component is opened with ``O_NOFOLLOW`` relative to its parent.
    """
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in [p for p in path.split("/") if p]:
            try:
                os.mkdir(part, 0o755, dir_fd=fd)
            except FileExistsError:
                pass
            except OSError as error:
                raise SetupError(f"create {path}", error) from None
            try:
                next_fd = os.open(
                    part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
                )
            except OSError as error:
                if error.errno in (errno.ELOOP, errno.ENOTDIR):
                    error = OSError(
                        error.errno, f"{path} is a symlink or not a folder in the image"
                    )
                raise SetupError(f"create {path}", error) from None
            os.close(fd)
            fd = next_fd
        return os.readlink(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def _mount_volume(root: str, volume: dict[str, Any]) -> None:
    # Bind from an O_PATH descriptor so a symlink swapped in after the manager's checks
    # cannot redirect the mount: the descriptor's real path is checked against the roots.
    source_fd = os.open(volume["source"], os.O_PATH | os.O_CLOEXEC)
    try:
        real = os.readlink(f"/proc/self/fd/{source_fd}")
        if not any(real == r or real.startswith(r.rstrip("/") + "/") for r in volume["roots"]):
            raise OSError(
                errno.EACCES, f"{volume['source']} resolves to {real}, outside the volume roots"
            )
        target = _make_dir_beneath(root, volume["dest"])
        syscalls.mount(f"/proc/self/fd/{source_fd}", target, None, syscalls.MS_BIND)
        if volume["read_only"]:
            flags = (
                syscalls.MS_BIND
                | syscalls.MS_REMOUNT
                | syscalls.MS_RDONLY
                | syscalls.MS_NOSUID
                | syscalls.MS_NODEV
            )
            syscalls.mount("none", target, None, flags)
    finally:
        os.close(source_fd)


def _bring_loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock.fileno(), _SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock.fileno(), _SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | _IFF_UP))


def _pivot_root(root: str) -> None:
    # pivot_root(".", ".") stacks the old root under the new one; detaching the old one leaves
    # only the job's root.
    os.chdir(root)
    syscalls.pivot_root(".", ".")
    syscalls.umount2(".", syscalls.MNT_DETACH)
    os.chdir("/")


def _enter_workdir(workdir: str) -> None:
    os.makedirs(workdir, exist_ok=True)
    os.chdir(workdir)
