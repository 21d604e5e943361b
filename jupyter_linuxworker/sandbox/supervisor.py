"""The per-job supervisor: one process per job, outside the job's cgroup and namespaces.

The fork server forks it (see forkserver.py); without one, the manager starts it as
``python -I -S supervisor.py JOB_DIR``. Either way it runs in a session of its own, with
SIGUSR1 and SIGTERM blocked until its handlers exist. It creates the job's cgroup, starts the
container, drains the job's output into the log, enforces the timeout, carries out stop requests
and writes how the job ended to ``state.json``. It outlives the manager that started it.

A supervisor forked ahead of time runs :func:`run_prepared`: it prepares a container and a
cgroup before any job exists, then waits for a job folder.

It imports only the standard library and the engine's container modules, which keeps the start
of an exec'd supervisor and the pages a forked one copies small.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import json
import logging
import os
import select
import signal
import socket
import sys
import termios
import time
from typing import Any, Final

if __name__ == "__main__":
    # Started with -I -S, so neither site-packages nor this folder is on the path; the
    # package lives three levels up from this file.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from jupyter_linuxworker.sandbox import container, jobdir, syscalls, userns
from jupyter_linuxworker.sandbox.cgroups import CgroupError, JobCgroup
from jupyter_linuxworker.sandbox.container import PreparedContainer
from jupyter_linuxworker.sandbox.mounts import RootSpec, SetupError
from jupyter_linuxworker.sandbox.outputlog import STDERR, STDOUT, OutputWriter

DRAIN_TIMEOUT: Final = 5.0
# The record's detail for a stop whose request gives none, as the REST API's does.
STOPPED_DETAIL: Final = "stopped by request"
READY_MESSAGE: Final = b"ready"
FAILED_MESSAGE: Final = b"failed"
SUPERVISOR_TITLE: Final = "jupyter-linuxworker-supervisor"
MAX_JOB_DIR: Final = 4096
HANDLED_SIGNALS: Final = (signal.SIGUSR1, signal.SIGTERM, signal.SIGCHLD)
IGNORED_SIGNALS: Final = (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE)

log = logging.getLogger("jupyter_linuxworker.supervisor")


class Supervisor:
    """Run one job from its launch file to its final state."""

    def __init__(self, job_dir: str, title_prefix: str = SUPERVISOR_TITLE) -> None:
        self.job_dir = job_dir
        self.title_prefix = title_prefix
        launch = jobdir.read_json(os.path.join(job_dir, jobdir.LAUNCH_FILE))
        if launch is None:
            raise FileNotFoundError(f"{job_dir} has no {jobdir.LAUNCH_FILE}")
        self.launch: dict[str, Any] = launch
        self.job_id: str = launch["job_id"]
        self.cgroup = JobCgroup.from_dict(launch["cgroup"])
        # The manager records this process in the job's record too; the copy in state.json
        # covers a manager that ended before it did.
        self.state: dict[str, Any] = {
            "status": "PENDING",
            "supervisor": {
                "pid": os.getpid(),
                "start_ticks": jobdir.process_start_ticks(os.getpid()),
            },
        }

        self.stop_reason: str | None = None
        self.stop_detail: str | None = None
        self.kill_deadline: float | None = None
        self.timeout_deadline: float | None = None
        self.pid1: int | None = None
        self.prepared: PreparedContainer | None = None
        self.started = False
        self.exit_status: int | None = None
        self.reaped: dict[int, int] = {}
        self.setup_error: dict[str, Any] | None = None
        self.exec_error: dict[str, Any] | None = None
        self.supervisor_error: str | None = None
        self.usage: dict[str, Any] = {}
        self._signals_pending: set[int] = set()

    # -- signals ----------------------------------------------------------------------------

    def install_signal_handlers(self) -> int:
        """Install handlers that only record the signal; return the wake-up pipe's read end."""
        wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, self._record_signal)
        for signum in IGNORED_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
        return wake_read

    def _record_signal(self, signum: int, _frame: object) -> None:
        self._signals_pending.add(signum)

    def _handle_signals(self) -> None:
        pending, self._signals_pending = self._signals_pending, set()
        if signal.SIGUSR1 in pending or signal.SIGTERM in pending:
            request = jobdir.read_json(os.path.join(self.job_dir, jobdir.STOP_FILE)) or {}
            grace = float(request.get("grace", self.launch["grace"]))
            detail = request.get("detail")
            self.request_stop("stopped", grace, str(detail) if detail else None)
        if signal.SIGCHLD in pending:
            self._reap()

    # -- stop and timeout -------------------------------------------------------------------

    def request_stop(self, reason: str, grace: float, detail: str | None = None) -> None:
        """Send SIGTERM to the container now and SIGKILL to its cgroup after ``grace`` seconds.

        ``detail`` is the reason given in the job's record. The first request's reason and
        detail are kept.
        """
        deadline = time.monotonic() + max(0.0, grace)
        if self.stop_reason is None:
            self.stop_reason = reason
            self.stop_detail = detail
            log.info("job %s: stop requested (%s), grace %.1f s", self.job_id, reason, grace)
            self._terminate()
        if self.kill_deadline is None or deadline < self.kill_deadline:
            self.kill_deadline = deadline

    def _terminate(self) -> None:
        # PID 1 of a PID namespace receives only the signals it has handlers for. It installs
        # them just before it reports "started", so SIGTERM is sent only after that.
        if self.pid1 is not None and self.started and not self.container_done:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid1, signal.SIGTERM)

    def _kill_all(self) -> None:
        log.info("job %s: grace period over, killing every process of the job", self.job_id)
        if self.pid1 is not None and not self.container_done:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid1, signal.SIGKILL)
        try:
            self.cgroup.kill()
        except CgroupError as error:
            log.error("job %s: %s", self.job_id, error)
        self.kill_deadline = None

    # -- the container ----------------------------------------------------------------------

    def _reap(self, block: bool = False) -> bool:
        """Reap ended children into ``self.reaped``; with ``block``, wait for one.

        Returns whether a child was reaped.
        """
        flags = 0 if block else os.WNOHANG
        reaped = False
        while True:
            try:
                pid, status = os.waitpid(-1, flags)
            except ChildProcessError:
                return reaped
            if pid == 0:
                return reaped
            self.reaped[pid] = status
            reaped = True
            if block:
                return reaped

    @property
    def container_done(self) -> bool:
        """Whether PID 1 has ended, or never existed."""
        return self.pid1 is None or self.pid1 in self.reaped

    def _pump(self, writer: OutputWriter, fd: int, stream: int) -> bool:
        # Output means the command runs, even if PID 1's report is still in its pipe: a reader
        # of the log must find the job RUNNING.
        if self.state["status"] != "RUNNING" and _bytes_waiting(fd) > 0:
            self._record_running()
        return writer.pump(fd, stream)

    def _on_status_line(self, line: bytes) -> None:
        message = json.loads(line)
        if "started" in message:
            self.started = True
            self._record_running()
            if self.stop_reason is not None:
                self._terminate()
        elif "exit_status" in message:
            self.exit_status = int(message["exit_status"])
        elif "setup_error" in message:
            self.setup_error = message["setup_error"]
            log.error("job %s: setup failed: %s", self.job_id, self.setup_error["message"])
        elif "exec_error" in message:
            self.exec_error = message["exec_error"]

    def run(
        self, prepared: PreparedContainer | None = None, pending: JobCgroup | None = None
    ) -> None:
        """Start the container, drain its output, and record how the job ended.

        ``prepared`` is a container made before the job was known, and ``pending`` the cgroup
        its PID 1 already joined, which becomes the job's cgroup by a rename.
        """
        syscalls.prctl(syscalls.PR_SET_CHILD_SUBREAPER, 1)
        id_map = (int(self.launch["id_map"]["host_start"]), int(self.launch["id_map"]["size"]))
        if prepared is not None and prepared.id_map != id_map:
            log.info(
                "job %s: the prepared container has another id map; making a new one", self.job_id
            )
            self._discard(prepared, pending)
            prepared = pending = None
        if prepared is None:
            try:
                prepared = container.prepare_container(id_map, RootSpec.from_launch(self.launch))
            except SetupError as error:
                return self._setup_failed(error.step, OSError(error.errno, str(error)))
        self.prepared = prepared
        self.pid1 = prepared.pid1

        wake_fd = self.install_signal_handlers()
        self._handle_signals()
        if self.stop_reason is not None:
            self._discard(prepared, pending)
            self._finish()
            return

        # The cgroup: the prepared one renamed, or a new one that PID 1 is moved into.
        try:
            if pending is not None:
                pending.rename(self.cgroup)
            else:
                self.cgroup.create()
            self.cgroup.apply_limits(self.launch["limits"])
        except CgroupError as error:
            self._discard(prepared, pending)
            return self._setup_failed("create cgroup", error)
        if pending is None:
            # NOTE: on cgroup v2, which cannot rename, this move is on every job's start path.
            # The first move after a quiet spell took 5 to 14 ms on v1 here; CLONE_INTO_CGROUP
            # could avoid it.
            try:
                self.cgroup.join(prepared.pid1)
            except CgroupError as error:
                self._discard(prepared, None)
                return self._setup_failed("join cgroup", error)
        try:
            volume_userns = self._make_volume_namespaces()
        except OSError as error:
            self._discard(prepared, None)
            return self._setup_failed("create user namespace", error)

        relay = bool(self.launch.get("output_relay", True))
        writer = OutputWriter(self.job_dir, int(self.launch["output_cap"]), relay)
        try:
            container.start_container(prepared, self.job_dir, volume_userns)
        except SetupError as error:
            self._discard(prepared, None)
            return self._setup_failed(error.step, OSError(error.errno, str(error)))
        finally:
            for fd in volume_userns:
                os.close(fd)
        self.prepared = None
        self._after_start()

        outputs = {prepared.stdout: STDOUT, prepared.stderr: STDERR}
        self._loop(wake_fd, writer, outputs, prepared.status, prepared.status_buffer)
        writer.close()
        self.state.update(output_size=writer.size, output_truncated=writer.truncated)
        self._finish()

    def _after_start(self) -> None:
        """Do what can wait until PID 1 builds the root."""
        syscalls.set_process_title(f"{self.title_prefix} {self.job_dir}")

    def _record_running(self) -> None:
        if self.state["status"] == "RUNNING":
            return
        timeout = self.launch.get("timeout")
        if timeout:
            # The timeout counts from the job's start, as started_at does.
            self.timeout_deadline = time.monotonic() + float(timeout)
        self.state.update(status="RUNNING", started_at=time.time(), pid1=self.pid1)
        state_file = os.path.join(self.job_dir, jobdir.STATE_FILE)
        jobdir.write_json(state_file, self.state, durable=False)
        log.info("job %s: running as host pid %s", self.job_id, self.pid1)

    def _discard(self, prepared: PreparedContainer, pending: JobCgroup | None) -> None:
        container.discard_container(prepared)
        self.prepared = None
        self.pid1 = None
        if pending is not None:
            try:
                pending.remove()
            except CgroupError as error:
                log.error("job %s: %s", self.job_id, error)

    def _make_volume_namespaces(self) -> list[int]:
        """Create one user namespace per volume owner, for the idmapped mounts."""
        start = int(self.launch["id_map"]["host_start"])
        # A volume's owner on the host is the job's root inside, so files the job writes there
        # belong to the owner of the volume's folder.
        return [
            userns.make_userns(f"{v['owner_uid']} {start} 1", f"{v['owner_gid']} {start} 1")
            for v in self.launch["volumes"]
        ]

    def _setup_failed(self, step: str, error: OSError) -> None:
        self.setup_error = {"step": step, "errno": error.errno or 0, "message": str(error)}
        self._finish()

    def _loop(
        self,
        wake_fd: int,
        writer: OutputWriter,
        outputs: dict[int, int],
        status_fd: int,
        status_buffer: bytes,
    ) -> None:
        poller = select.poll()
        for fd in (wake_fd, status_fd, *outputs):
            poller.register(fd, select.POLLIN)
        while b"\n" in status_buffer:
            line, status_buffer = status_buffer.split(b"\n", 1)
            self._on_status_line(line)
        drain_deadline: float | None = None

        while outputs or status_fd >= 0:
            now = time.monotonic()
            if self.timeout_deadline is not None and now >= self.timeout_deadline:
                self.timeout_deadline = None
                self.request_stop("timeout", float(self.launch["grace"]))
            if self.kill_deadline is not None and now >= self.kill_deadline:
                self._kill_all()
            if self.container_done and drain_deadline is None:
                # PID 1 is gone, so the kernel killed the rest of its namespace. What is left in
                # the pipes is drained, with a time bound in case a descriptor escaped.
                drain_deadline = now + DRAIN_TIMEOUT
            if drain_deadline is not None and now >= drain_deadline:
                log.warning(
                    "job %s: output still open %.0f s after the job ended",
                    self.job_id,
                    DRAIN_TIMEOUT,
                )
                break

            deadlines = [
                d
                for d in (self.timeout_deadline, self.kill_deadline, drain_deadline)
                if d is not None
            ]
            wait_ms = None if not deadlines else max(0, int((min(deadlines) - now) * 1000) + 1)
            for fd, _events in poller.poll(wait_ms):
                if fd == wake_fd:
                    _drain_wakeups(wake_fd)
                elif fd == status_fd:
                    data = os.read(status_fd, 65536)
                    if not data:
                        poller.unregister(status_fd)
                        os.close(status_fd)
                        status_fd = -1
                        continue
                    status_buffer += data
                    while b"\n" in status_buffer:
                        line, status_buffer = status_buffer.split(b"\n", 1)
                        self._on_status_line(line)
                elif not self._pump(writer, fd, outputs[fd]):
                    poller.unregister(fd)
                    os.close(fd)
                    del outputs[fd]
            self._handle_signals()
            if status_fd < 0 and not outputs:
                break

        # Every pipe is closed: wait for PID 1 if it has not been reaped yet.
        for fd in outputs:
            os.close(fd)
        while not self.container_done:
            if not self._reap(block=True):
                break

    # -- the end ----------------------------------------------------------------------------

    def _finish(self) -> None:
        if self.prepared is not None:
            self._discard(self.prepared, None)
        # Usage and OOM kills live in the cgroup: read them before it is removed.
        try:
            self.usage = self.cgroup.usage() if self.cgroup.exists() else {}
        except OSError as error:
            log.error("job %s: reading usage failed: %s", self.job_id, error)
        try:
            self.cgroup.remove()
        except CgroupError as error:
            log.error("job %s: %s", self.job_id, error)

        self.state.update(self._outcome(), ended_at=time.time(), usage=self.usage)
        self.state.setdefault("started_at", None)
        # Logged before the final state is written, so that whoever reads that state finds
        # every line in the log.
        outcome = self.state.get("detail") or f"exit code {self.state.get('exit_code')}"
        log.info("job %s: ended %s (%s)", self.job_id, self.state["status"], outcome)
        jobdir.write_json(os.path.join(self.job_dir, jobdir.STATE_FILE), self.state)

    def _outcome(self) -> dict[str, Any]:
        """Return status, exit code, signal, reason and detail from what the container reported."""
        pid1_status = self.reaped.get(self.pid1) if self.pid1 is not None else None
        status = self.exit_status if self.exit_status is not None else pid1_status
        exit_code: int | None = None
        signum: int | None = None
        if status is not None:
            if os.WIFSIGNALED(status):
                signum = os.WTERMSIG(status)
                exit_code = 128 + signum
            else:
                exit_code = os.waitstatus_to_exitcode(status)

        outcome: dict[str, Any] = {
            "exit_code": exit_code,
            "signal": signum,
            "reason": None,
            "detail": None,
        }
        if self.supervisor_error is not None:
            return {
                **outcome,
                "status": "FAILED",
                "reason": "supervisor-error",
                "detail": self.supervisor_error,
            }
        if self.stop_reason == "stopped":
            return {
                **outcome,
                "status": "STOPPED",
                "reason": "stopped",
                "detail": self.stop_detail or STOPPED_DETAIL,
            }
        if self.stop_reason == "timeout":
            detail = f"timed out after {float(self.launch['timeout']):g} s"
            return {**outcome, "status": "FAILED", "reason": "timeout", "detail": detail}
        if self.setup_error is not None:
            detail = (
                f"setup failed at step '{self.setup_error['step']}': {self.setup_error['message']}"
            )
            return {
                **outcome,
                "status": "FAILED",
                "reason": "setup-error",
                "detail": detail,
                "setup_step": self.setup_error["step"],
                "errno": self.setup_error["errno"],
            }
        if self.exec_error is not None:
            error = self.exec_error
            detail = (
                f"could not execute {error['argv0']!r}: {error['message']} (errno {error['errno']})"
            )
            return {**outcome, "status": "FAILED", "reason": "exec-error", "detail": detail}
        if status is None and self.usage.get("oom_kills"):
            detail = "out of memory: the job's init was killed at the memory limit"
            return {**outcome, "status": "FAILED", "reason": "out-of-memory", "detail": detail}
        if status is None:
            return {
                **outcome,
                "status": "FAILED",
                "reason": "container-error",
                "detail": "the job's init ended without reporting the command's status",
            }
        if self.usage.get("oom_kills") and (signum is not None or exit_code != 0):
            kills = self.usage["oom_kills"]
            detail = f"out of memory: the kernel killed {kills} process(es) at the memory limit"
            if signum is not None:
                detail += f"; the command was killed by signal {signum}"
            return {**outcome, "status": "FAILED", "reason": "out-of-memory", "detail": detail}
        if signum is not None:
            name = signal.Signals(signum).name if signum in signal.valid_signals() else str(signum)
            return {
                **outcome,
                "status": "FAILED",
                "reason": "signal",
                "detail": f"killed by signal {signum} ({name})",
            }
        if exit_code != 0:
            return {
                **outcome,
                "status": "FAILED",
                "reason": "exit-code",
                "detail": f"exited with code {exit_code}",
            }
        return {**outcome, "status": "COMPLETED"}


def _bytes_waiting(fd: int) -> int:
    waiting = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, waiting)
    return waiting[0]


def _drain_wakeups(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def supervise(
    job_dir: str, prepared: PreparedContainer | None = None, pending: JobCgroup | None = None
) -> int:
    """Supervise the job in ``job_dir``; return the supervisor's exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    supervisor = Supervisor(job_dir)
    try:
        supervisor.run(prepared, pending)
    except Exception:
        log.exception("job %s: supervisor failed", supervisor.job_id)
        supervisor.supervisor_error = (
            "the supervisor failed; see supervisor.log in the job's folder"
        )
        supervisor._finish()
        return 1
    return 0


def run_prepared(
    conn: socket.socket,
    id_map: tuple[int, int],
    pending: JobCgroup | None,
    root: RootSpec | None = None,
) -> int:
    """Prepare a container, report on ``conn``, then supervise the job that ``conn`` names.

    ``root`` is the root that most jobs use, which PID 1 builds now. ``pending`` is a cgroup
    to create and move PID 1 into now, so that no job waits for the move. The first write to
    cgroup.procs after a quiet spell took 5 to 14 ms here (Linux 6.18, cgroup v1), later ones
    about 0.1 ms. The job's cgroup is then made by renaming it, which only cgroup v1 allows.

    The report is ``ready`` or ``failed``, and a job folder may arrive before it. After a
    failed preparation, the job is supervised as if nothing was prepared, so that its record
    gets the reason of the failure. An empty message on ``conn`` discards the container.
    """
    syscalls.prctl(syscalls.PR_SET_CHILD_SUBREAPER, 1)
    prepared = _prepare_quietly(id_map, pending, root)
    if prepared is None:
        pending = None
    # The fork server closes its end once it has sent a job, which may come before this report.
    with contextlib.suppress(ConnectionError):
        conn.send(READY_MESSAGE if prepared is not None else FAILED_MESSAGE)
    request = conn.recv(MAX_JOB_DIR)
    conn.close()
    if not request:
        if prepared is not None:
            container.discard_container(prepared)
        if pending is not None:
            pending.remove()
        return 0
    job_dir = os.fsdecode(request)
    jobdir.redirect_output(job_dir)
    return supervise(job_dir, prepared, pending)


def _prepare_quietly(
    id_map: tuple[int, int], pending: JobCgroup | None, root: RootSpec | None
) -> PreparedContainer | None:
    """Return a prepared container in ``pending``, or None after logging why that failed."""
    try:
        prepared = container.prepare_container(id_map, root)
    except SetupError as error:
        log.error("preparing a container failed at step %r: %s", error.step, error)
        return None
    if pending is None:
        return prepared
    try:
        pending.create()
        pending.join(prepared.pid1)
    except CgroupError as error:
        log.error("preparing a container failed: %s", error)
        container.discard_container(prepared)
        with contextlib.suppress(CgroupError):
            pending.remove()
        return None
    return prepared


def main(argv: list[str]) -> int:
    """Supervise the job in folder ``argv[1]``."""
    if len(argv) != 2:
        sys.stderr.write("usage: supervisor.py JOB_DIR\n")
        return 2
    return supervise(argv[1])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
