"""Start job supervisors: forked from a pre-imported fork server, or as fresh interpreters.

Three modes, from the fastest start to the simplest:

- ``prepared`` (the default): one fork server per manager, started with the manager and
  restarted when it has died. It keeps supervisors forked ahead of time, whose containers and
  cgroups are ready before a job is submitted.
- ``fork``: the same fork server, but each job gets a fresh fork that prepares its container
  on the job's start path.
- ``exec``: ``python -I -S supervisor.py JOB_DIR`` for each job, with no helper process.

The two slower modes are kept for the benchmarks' before and after figures.

Either way, each supervisor runs in a session of its own, with SIGUSR1 and SIGTERM blocked until
its handlers exist, stdin on /dev/null, and stdout and stderr appended to ``supervisor.log`` in
the job's folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
import signal
import socket
from dataclasses import dataclass
from typing import Any, Final, Literal

from . import forkserver, jobdir

SANDBOX_DIR: Final = os.path.dirname(os.path.abspath(__file__))
SUPERVISOR_PATH: Final = os.path.join(SANDBOX_DIR, "supervisor.py")
FORKSERVER_PATH: Final = os.path.join(SANDBOX_DIR, "forkserver.py")
FORKSERVER_LOG: Final = "forkserver.log"
# The descriptor number of the request socket in the fork server.
FORKSERVER_FD: Final = 3
# A stop sent before the supervisor's handlers exist waits instead of killing it.
SUPERVISOR_BLOCKED_SIGNALS: Final = (signal.SIGUSR1, signal.SIGTERM)
SUPERVISOR_ENV: Final = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
# How long closing waits for the fork server to exit after its socket is closed.
FORKSERVER_EXIT_TIMEOUT: Final = 2.0
StartMode = Literal["prepared", "fork", "exec"]
START_MODES: Final = ("prepared", "fork", "exec")

log = logging.getLogger("jupyter_linuxworker.launcher")


@dataclass(frozen=True)
class StartedSupervisor:
    """A supervisor that was just started, and a pidfd of it that the caller now owns."""

    pid: int
    start_ticks: int | None
    pidfd: int | None


class SupervisorLauncher:
    """Start supervisors for one manager; see the module docstring for the two modes."""

    def __init__(
        self,
        python: str,
        state_dir: str,
        mode: StartMode = "prepared",
        supervisor_path: str = SUPERVISOR_PATH,
        config: dict[str, Any] | None = None,
    ) -> None:
        """``config`` passes the manager's ``id_map`` and ``cgroup`` layout to the fork server."""
        if mode not in START_MODES:
            raise ValueError(
                f"invalid supervisor start mode {mode!r}: use one of {', '.join(START_MODES)}"
            )
        self.python = python
        self.state_dir = state_dir
        self.mode = mode
        self.supervisor_path = supervisor_path
        self.config = {**(config or {}), "prepare": mode == "prepared"}
        self._children: set[int] = set()
        self._server_pid: int | None = None
        self._server_sock: socket.socket | None = None
        self._lock = asyncio.Lock()

    @property
    def server_pid(self) -> int | None:
        """The pid of the running fork server, if one was started."""
        return self._server_pid

    def start(self) -> None:
        """Start the fork server unless in ``exec`` mode; it imports while the manager goes on."""
        if self.mode != "exec" and self._server_sock is None:
            self._start_server()

    async def start_supervisor(self, job_dir: str) -> StartedSupervisor:
        """Start the supervisor of the job in ``job_dir``; raise OSError if that fails."""
        self.reap()
        if self.mode == "exec":
            pid = self._spawn(
                [self.python, "-I", "-S", self.supervisor_path, job_dir],
                os.path.join(job_dir, jobdir.SUPERVISOR_LOG),
            )
            return StartedSupervisor(pid, jobdir.process_start_ticks(pid), None)

        # Shielded: a reply left unread by a cancelled caller would reach the next caller.
        task = asyncio.ensure_future(self._fork(job_dir))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_close_unclaimed_pidfd)
            raise

    def reap(self) -> None:
        """Reap the processes this launcher started that have ended, so no zombie stays."""
        for pid in list(self._children):
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    self._children.discard(pid)
            except ChildProcessError:
                self._children.discard(pid)

    def close(self) -> None:
        """Stop the fork server; the supervisors it started keep running."""
        self._stop_server()
        self.reap()

    # -- the fork server ---------------------------------------------------------------------

    def _start_server(self) -> None:
        manager_sock, server_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            source = server_sock.fileno()
            if source == FORKSERVER_FD:
                # dup2 onto itself would keep close-on-exec set.
                source = os.dup(source)
            self._server_pid = self._spawn(
                [
                    self.python,
                    "-I",
                    "-S",
                    FORKSERVER_PATH,
                    str(FORKSERVER_FD),
                    self.supervisor_path,
                    json.dumps(self.config),
                ],
                os.path.join(self.state_dir, FORKSERVER_LOG),
                extra_fd=source,
            )
            if source != server_sock.fileno():
                os.close(source)
        except OSError:
            manager_sock.close()
            raise
        finally:
            server_sock.close()
        manager_sock.setblocking(False)
        self._server_sock = manager_sock
        log.info("fork server started, pid %s", self._server_pid)

    def _stop_server(self) -> None:
        if self._server_sock is not None:
            self._server_sock.close()
            self._server_sock = None
        pid, self._server_pid = self._server_pid, None
        if pid is None:
            return
        # The server exits as soon as it reads the end of its socket.
        with contextlib.suppress(ProcessLookupError):
            pidfd = os.pidfd_open(pid)
            try:
                select.select([pidfd], [], [], FORKSERVER_EXIT_TIMEOUT)
            finally:
                os.close(pidfd)
        self.reap()

    async def _fork(self, job_dir: str) -> StartedSupervisor:
        async with self._lock:
            try:
                return await self._request_fork(job_dir)
            except (ConnectionError, EOFError) as error:
                # The fork server has died since the last job, for example killed by an
                # administrator: start another and try once more.
                log.warning("the fork server ended (%s); starting a new one", error)
                self._stop_server()
                return await self._request_fork(job_dir)

    async def _request_fork(self, job_dir: str) -> StartedSupervisor:
        if self._server_sock is None:
            self._start_server()
        sock = self._server_sock
        assert sock is not None
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, os.fsencode(job_dir))

        while True:
            try:
                reply, fds, _flags, _address = socket.recv_fds(sock, forkserver.MAX_REQUEST, 1)
                break
            except BlockingIOError:
                await _readable(loop, sock.fileno())
        if not reply:
            raise EOFError("its socket is closed")
        try:
            pid, start_ticks = forkserver.decode_reply(reply)
        except OSError:
            for fd in fds:
                os.close(fd)
            raise
        return StartedSupervisor(pid, start_ticks, fds[0] if fds else None)

    # -- processes ---------------------------------------------------------------------------

    def _spawn(self, argv: list[str], log_path: str, extra_fd: int | None = None) -> int:
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640),
            (os.POSIX_SPAWN_DUP2, 1, 2),
        ]
        if extra_fd is not None:
            actions.append((os.POSIX_SPAWN_DUP2, extra_fd, FORKSERVER_FD))
        pid = os.posix_spawn(
            self.python,
            argv,
            SUPERVISOR_ENV,
            file_actions=actions,
            setsid=True,
            setsigmask=SUPERVISOR_BLOCKED_SIGNALS,
        )
        self._children.add(pid)
        return pid


async def _readable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    ready: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, _set_done, ready)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _close_unclaimed_pidfd(task: asyncio.Future[StartedSupervisor]) -> None:
    if task.cancelled() or task.exception() is not None:
        return
    pidfd = task.result().pidfd
    if pidfd is not None:
        os.close(pidfd)
