"""The fork server: a pre-imported process that forks one supervisor per job.

Starting a fresh interpreter for each supervisor costs tens of milliseconds of start-up and
imports on every job's latency path. The manager instead starts this process once, as
``python -I -S forkserver.py SOCKET_FD SUPERVISOR_FILE CONFIG_JSON``, in a session of its own
and with SIGUSR1 and SIGTERM blocked. It imports the supervisor module and then serves requests
on a ``SOCK_SEQPACKET`` socket: each request is a job folder, and each reply names the
supervisor and carries a pidfd of it. A forked supervisor shares the server's pages copy on
write, so it costs the host far less memory than an interpreter of its own.

The server keeps two supervisors forked ahead of time, each of which prepares a container (see
``supervisor.run_prepared``) and waits for a job. A request goes to a ready one, or else to
one still preparing, and a replacement is forked shortly after. When there is none, the
request gets a fresh fork, which prepares its container on the job's start path.

The server exits when the manager closes the socket. A prepared supervisor that has no job then
discards its container; the supervisors of jobs keep running, as they do when the manager exits.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import os
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Final, NoReturn

if __name__ == "__main__":
    # Started with -I -S, so neither site-packages nor this folder is on the path; the
    # package lives three levels up from this file.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from jupyter_linuxworker.sandbox import jobdir, seccomp, syscalls
from jupyter_linuxworker.sandbox.cgroups import CgroupError, JobCgroup
from jupyter_linuxworker.sandbox.mounts import RootSpec

# A job folder path, with room to spare: longer requests are rejected.
MAX_REQUEST: Final = 4096
REPLY_OK: Final = b"ok"
REPLY_ERROR: Final = b"error"
SUPERVISOR_MODULE: Final = "jupyter_linuxworker_supervisor"
PREPARED_TITLE: Final = "jupyter-linuxworker-supervisor (prepared, no job yet)"
# Prefix of the cgroups that prepared containers wait in. The rest of the name is the fork
# server's pid and the prepared supervisor's pid: the cgroup is stale only once both are gone.
PENDING_PREFIX: Final = "pending-"
# Prepared supervisors kept at once, so that two jobs in quick succession both find one.
PREPARED_COUNT: Final = 2
# After this many prepared supervisors in a row fail, jobs get fresh forks only.
MAX_PREPARE_FAILURES: Final = 3
# How long after handing out a prepared supervisor the next one is forked. Preparing would
# compete with the job that just started, for the CPU and for the kernel's cgroup locks that
# its move into a cgroup and the job's cgroup rename both take.
PREPARE_DELAY: Final = 0.01


def load_supervisor(path: str) -> ModuleType:
    """Import the supervisor module from ``path`` once, before any fork."""
    spec = importlib.util.spec_from_file_location(SUPERVISOR_MODULE, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import the supervisor from {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[SUPERVISOR_MODULE] = module
    spec.loader.exec_module(module)
    return module


def encode_reply(pid: int, start_ticks: int | None) -> bytes:
    """Return the reply that names a forked supervisor."""
    return b"%s %d %d" % (REPLY_OK, pid, -1 if start_ticks is None else start_ticks)


def decode_reply(reply: bytes) -> tuple[int, int | None]:
    """Return the pid and start ticks in a reply; raise OSError for an error reply."""
    kind, _, rest = reply.partition(b" ")
    if kind == REPLY_ERROR:
        code, _, message = rest.partition(b" ")
        raise OSError(int(code), f"the fork server failed: {message.decode(errors='replace')}")
    if kind != REPLY_OK:
        raise OSError(f"invalid reply from the fork server: {reply[:80]!r}")
    pid, start_ticks = (int(field) for field in rest.split())
    return pid, None if start_ticks < 0 else start_ticks


@dataclass
class Prepared:
    """A supervisor forked ahead of time, and the socket it waits on."""

    pid: int
    pidfd: int
    start_ticks: int | None
    sock: socket.socket
    pending: JobCgroup | None
    ready: bool = False


class ForkServer:
    """Serve fork requests on one socket until the manager closes it."""

    def __init__(self, sock: socket.socket, supervisor: ModuleType, config: dict[str, Any]) -> None:
        self.sock = sock
        self.supervisor = supervisor
        self.id_map = (int(config["id_map"][0]), int(config["id_map"][1]))
        # Pending cgroups exist only where they can become a job's cgroup by a rename.
        layout = config.get("cgroup")
        self.cgroup_parents: dict[str, str] | None = (
            dict(layout["parents"]) if layout and int(layout["version"]) == 1 else None
        )
        root = config.get("root")
        self.root = RootSpec(**root) if root else None
        self.wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_write = wake_write
        self.poller = select.poll()
        # Oldest first.
        self.prepared: list[Prepared] = []
        # Without preparing, every job gets a fresh fork.
        self.prepare_failures = 0 if config.get("prepare", True) else MAX_PREPARE_FAILURES
        self.pid = os.getpid()
        self.prepare_at: float | None = None
        # Sockets of supervisors that have been sent a job but have not closed their end yet.
        self.handed: dict[int, socket.socket] = {}
        # Pending cgroups of prepared supervisors, to remove if one dies without a job.
        self.pending_by_pid: dict[int, JobCgroup] = {}

    def serve(self) -> None:
        """Fork a supervisor per request and reap the ones that end."""
        signal.set_wakeup_fd(self._wake_write, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, _ignore_signal)
        # Objects that exist now are shared with every child: keep the collector from writing
        # to them, which would copy their pages into each supervisor.
        gc.freeze()

        self.poller.register(self.sock.fileno(), select.POLLIN)
        self.poller.register(self.wake_read, select.POLLIN)
        self._prepare_next()
        try:
            self._serve_requests()
        finally:
            self._end_prepared()

    def _serve_requests(self) -> None:
        while True:
            timeout_ms = None
            if self.prepare_at is not None:
                timeout_ms = max(0, int((self.prepare_at - time.monotonic()) * 1000))
            events = self.poller.poll(timeout_ms)
            if self.prepare_at is not None and time.monotonic() >= self.prepare_at:
                self.prepare_at = None
                self._prepare_next()
            for fd, _events in events:
                if fd == self.wake_read:
                    _drain(self.wake_read)
                    self._reap_children()
                elif any(fd == prepared.sock.fileno() for prepared in self.prepared):
                    self._on_prepared_message(fd)
                elif fd in self.handed:
                    self._on_handed_message(fd)
                elif fd == self.sock.fileno():
                    request = self.sock.recv(MAX_REQUEST)
                    if not request:
                        return
                    self._handle(request)

    def _handle(self, request: bytes) -> None:
        job_dir = request.decode("utf-8", errors="surrogateescape")
        if not os.path.isabs(job_dir) or not os.path.isdir(job_dir):
            self._send_error(2, f"job folder {job_dir!r} is not an existing absolute path")
            return
        if self._hand_to_prepared(request):
            self._schedule_prepare(PREPARE_DELAY)
            return

        try:
            pid = os.fork()
        except OSError as error:
            self._send_error(error.errno or 0, f"fork failed: {error}")
            return
        if pid == 0:
            self._run_child(lambda: self.supervisor.supervise(job_dir), job_dir)

        # The child is not reaped before this point, so its pid cannot name another process
        # while the pidfd is opened.
        pidfd = os.pidfd_open(pid)
        try:
            self._send_reply(pid, jobdir.process_start_ticks(pid), pidfd)
        finally:
            os.close(pidfd)
        self._schedule_prepare(PREPARE_DELAY)

    def _hand_to_prepared(self, request: bytes) -> bool:
        if not self.prepared:
            return False
        # A ready one if there is one, else the one that started preparing first.
        prepared = next((p for p in self.prepared if p.ready), self.prepared[0])
        self._forget_prepared(prepared)
        try:
            prepared.sock.send(request)
        except OSError:
            prepared.sock.close()
            os.close(prepared.pidfd)
            return False
        # Closing now would reset the connection if the supervisor's report is still unread,
        # and a reset loses the job folder queued for it. The socket is closed when the
        # supervisor closes its end, after it has read the job folder.
        prepared.sock.shutdown(socket.SHUT_WR)
        self.handed[prepared.sock.fileno()] = prepared.sock
        self.poller.register(prepared.sock.fileno(), select.POLLIN)
        try:
            self._send_reply(prepared.pid, prepared.start_ticks, prepared.pidfd)
        finally:
            os.close(prepared.pidfd)
        return True

    def _send_reply(self, pid: int, start_ticks: int | None, pidfd: int) -> None:
        socket.send_fds(self.sock, [encode_reply(pid, start_ticks)], [pidfd])

    def _send_error(self, code: int, message: str) -> None:
        self.sock.send(b"%s %d %s" % (REPLY_ERROR, code, message.encode(errors="replace")))

    # -- prepared supervisors -------------------------------------------------------------

    def _schedule_prepare(self, delay: float) -> None:
        """Fork another prepared supervisor after ``delay`` seconds, if the pool is not full."""
        if len(self.prepared) >= PREPARED_COUNT:
            return
        at = time.monotonic() + delay
        if self.prepare_at is None or at < self.prepare_at:
            self.prepare_at = at

    def _prepare_next(self) -> None:
        if len(self.prepared) >= PREPARED_COUNT or self.prepare_failures >= MAX_PREPARE_FAILURES:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = os.fork()
        except OSError as error:
            sys.stderr.write(f"forking a prepared supervisor failed: {error}\n")
            ours.close()
            theirs.close()
            self.prepare_failures += 1
            return
        if pid == 0:
            ours.close()
            pending = self._pending_cgroup(os.getpid())
            self._run_child(
                lambda: self.supervisor.run_prepared(theirs, self.id_map, pending, self.root),
                None,
            )
        theirs.close()
        pidfd = os.pidfd_open(pid)
        pending = self._pending_cgroup(pid)
        self.prepared.append(Prepared(pid, pidfd, jobdir.process_start_ticks(pid), ours, pending))
        if pending is not None:
            self.pending_by_pid[pid] = pending
        self.poller.register(ours.fileno(), select.POLLIN)

    def _on_prepared_message(self, fd: int) -> None:
        prepared = next(p for p in self.prepared if p.sock.fileno() == fd)
        message = prepared.sock.recv(MAX_REQUEST)
        if message == self.supervisor.READY_MESSAGE:
            prepared.ready = True
            self.prepare_failures = 0
            # One at a time: two preparing at once would compete for the same locks.
            self._schedule_prepare(0.0)
            return
        # Preparing failed (the reason is in this server's log), or the supervisor ended.
        # Closing the socket makes it exit.
        self._forget_prepared(prepared)
        prepared.sock.close()
        os.close(prepared.pidfd)
        self.prepare_failures += 1
        self._schedule_prepare(PREPARE_DELAY)

    def _on_handed_message(self, fd: int) -> None:
        sock = self.handed[fd]
        try:
            if sock.recv(MAX_REQUEST):
                return
        except OSError:
            pass
        self.poller.unregister(fd)
        del self.handed[fd]
        sock.close()

    def _forget_prepared(self, prepared: Prepared) -> None:
        self.poller.unregister(prepared.sock.fileno())
        self.prepared.remove(prepared)

    def _end_prepared(self) -> None:
        """Make the prepared supervisors discard their containers, and wait for them to exit."""
        ending = list(self.prepared)
        for prepared in ending:
            self._forget_prepared(prepared)
            prepared.sock.close()
        for prepared in ending:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(prepared.pid, 0)
            os.close(prepared.pidfd)
            self._remove_pending(prepared.pid)

    def _reap_children(self) -> None:
        while True:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._remove_pending(pid)

    def _pending_cgroup(self, supervisor_pid: int) -> JobCgroup | None:
        """Return the pending cgroup of prepared supervisor ``supervisor_pid``; None on v2."""
        if self.cgroup_parents is None:
            return None
        name = f"{PENDING_PREFIX}{self.pid}-{supervisor_pid}"
        return JobCgroup(
            1, {key: os.path.join(path, name) for key, path in self.cgroup_parents.items()}
        )

    def _remove_pending(self, pid: int) -> None:
        # A prepared supervisor removes its pending cgroup or renames it for its job; this
        # covers one that was killed or failed in between.
        pending = self.pending_by_pid.pop(pid, None)
        if pending is not None and pending.exists():
            try:
                pending.remove()
            except CgroupError as error:
                sys.stderr.write(f"{error}\n")

    def _run_child(self, target: Callable[[], int], job_dir: str | None) -> NoReturn:
        status = 1
        try:
            # The supervisor installs its own handlers; it starts from the defaults.
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            # A fork copies every descriptor: keep none of the server's.
            self.sock.close()
            for prepared in self.prepared:
                prepared.sock.close()
                os.close(prepared.pidfd)
            for handed in self.handed.values():
                handed.close()
            os.close(self.wake_read)
            os.close(self._wake_write)
            os.setsid()
            os.chdir("/")
            if job_dir is not None:
                jobdir.redirect_output(job_dir)
            else:
                syscalls.set_process_title(PREPARED_TITLE)
            status = target()
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)


def _ignore_signal(_signum: int, _frame: object) -> None:
    pass


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def main(argv: list[str]) -> int:
    """Serve on socket descriptor ``argv[1]``, forking supervisors from file ``argv[2]``.

    ``argv[3]`` is a JSON object with the manager's ``id_map``, ``cgroup`` layout, whether to
    ``prepare`` supervisors, and the ``root`` that prepared containers build.
    """
    if len(argv) != 4:
        sys.stderr.write("usage: forkserver.py SOCKET_FD SUPERVISOR_FILE CONFIG_JSON\n")
        return 2
    sock = socket.socket(fileno=int(argv[1]))
    os.set_inheritable(sock.fileno(), False)
    # Descriptors that the manager's process left inheritable would live on in every job.
    syscalls.close_all_but({sock.fileno()})
    supervisor = load_supervisor(argv[2])
    # Built once here, the filter is in every forked supervisor's PID 1 already.
    with contextlib.suppress(seccomp.SeccompError):
        seccomp.build_filter()
    ForkServer(sock, supervisor, json.loads(argv[3])).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
