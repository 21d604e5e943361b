"""The per-job supervisor: one process per job, outside the job's cgroup and namespaces.

The manager starts it as ``python -I -S supervisor.py JOB_DIR`` in a session of its own, with
SIGUSR1 and SIGTERM blocked until its handlers exist. It creates the job's cgroup, forks the
container, drains the job's output into the log, enforces the timeout, carries out stop requests
and writes how the job ended to ``state.json``. It outlives the manager that started it.

It imports only the standard library and the engine's container modules: its start is on every
job's latency path.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import select
import signal
import sys
import time
from typing import Any, Final

if __name__ == "__main__":
    # Started with -I -S, so neither site-packages nor this folder is on the path; the
    # package lives three levels up from this file.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from jupyter_linuxworker.sandbox import container, jobdir, syscalls, userns
from jupyter_linuxworker.sandbox.cgroups import CgroupError, JobCgroup
from jupyter_linuxworker.sandbox.outputlog import STDERR, STDOUT, OutputWriter

DRAIN_TIMEOUT: Final = 5.0
PIPE_SIZE: Final = 1024 * 1024
HANDLED_SIGNALS: Final = (signal.SIGUSR1, signal.SIGTERM, signal.SIGCHLD)
IGNORED_SIGNALS: Final = (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE)

log = logging.getLogger("jupyter_linuxworker.supervisor")


class Supervisor:
    """Run one job from its launch file to its final state."""

    def __init__(self, job_dir: str) -> None:
        self.job_dir = job_dir
        launch = jobdir.read_json(os.path.join(job_dir, jobdir.LAUNCH_FILE))
        if launch is None:
            raise FileNotFoundError(f"{job_dir} has no {jobdir.LAUNCH_FILE}")
        self.launch: dict[str, Any] = launch
        self.job_id: str = launch["job_id"]
        self.cgroup = JobCgroup.from_dict(launch["cgroup"])
        self.state: dict[str, Any] = {"status": "PENDING"}

        self.stop_reason: str | None = None
        self.kill_deadline: float | None = None
        self.timeout_deadline: float | None = None
        self.pid1: int | None = None
        self.container_pid: int | None = None
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
            self.request_stop("stopped", float(request.get("grace", self.launch["grace"])))
        if signal.SIGCHLD in pending:
            self._reap()

    # -- stop and timeout -------------------------------------------------------------------

    def request_stop(self, reason: str, grace: float) -> None:
        """Send SIGTERM to the container now and SIGKILL to its cgroup after ``grace`` seconds."""
        deadline = time.monotonic() + max(0.0, grace)
        if self.stop_reason is None:
            self.stop_reason = reason
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

    def _reap(self, block: bool = False) -> None:
        """Reap ended children into ``self.reaped``; with ``block``, wait for at least one."""
        flags = 0 if block else os.WNOHANG
        while True:
            try:
                pid, status = os.waitpid(-1, flags)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.reaped[pid] = status
            if block:
                return

    @property
    def container_done(self) -> bool:
        """Whether PID 1 has ended, or the container child failed before it forked PID 1."""
        if self.pid1 is not None:
            return self.pid1 in self.reaped
        return self.reaped.get(self.container_pid or -1, 0) != 0

    def _on_status_line(self, line: bytes) -> None:
        message = json.loads(line)
        if "pid1" in message:
            self.pid1 = int(message["pid1"])
            timeout = self.launch.get("timeout")
            if timeout:
                # The timeout counts from the job's start, as started_at does.
                self.timeout_deadline = time.monotonic() + float(timeout)
            self.state.update(status="RUNNING", started_at=time.time(), pid1=self.pid1)
            state_file = os.path.join(self.job_dir, jobdir.STATE_FILE)
            jobdir.write_json(state_file, self.state, durable=False)
            log.info("job %s: running as host pid %s", self.job_id, self.pid1)
        elif "started" in message:
            self.started = True
            if self.stop_reason is not None:
                self._terminate()
        elif "exit_status" in message:
            self.exit_status = int(message["exit_status"])
        elif "setup_error" in message:
            self.setup_error = message["setup_error"]
            log.error("job %s: setup failed: %s", self.job_id, self.setup_error["message"])
        elif "exec_error" in message:
            self.exec_error = message["exec_error"]

    def run(self) -> None:
        """Start the container, drain its output, and record how the job ended."""
        wake_fd = self.install_signal_handlers()
        syscalls.prctl(syscalls.PR_SET_CHILD_SUBREAPER, 1)
        self._handle_signals()
        if self.stop_reason is not None:
            self._finish()
            return

        try:
            self.cgroup.create()
            self.cgroup.apply_limits(self.launch["limits"])
        except CgroupError as error:
            return self._setup_failed("create cgroup", error)
        try:
            job_userns, volume_userns = self._make_user_namespaces()
        except OSError as error:
            return self._setup_failed("create user namespace", error)

        writer = OutputWriter(self.job_dir, int(self.launch["output_cap"]))
        stdout_read, stdout_write = os.pipe2(os.O_CLOEXEC)
        stderr_read, stderr_write = os.pipe2(os.O_CLOEXEC)
        status_read, status_write = os.pipe2(os.O_CLOEXEC)
        for fd in (stdout_read, stderr_read):
            _set_pipe_size(fd)
        fds = container.ContainerFds(
            stdout_write, stderr_write, status_write, job_userns, volume_userns
        )

        self.container_pid = os.fork()
        if self.container_pid == 0:
            # Back to plain signal handling: the container child is not the supervisor.
            signal.set_wakeup_fd(-1)
            for signum in (*HANDLED_SIGNALS, *IGNORED_SIGNALS):
                signal.signal(signum, signal.SIG_DFL)
            for fd in (wake_fd, stdout_read, stderr_read, status_read):
                os.close(fd)
            container.run_container(self.launch, fds)
        for fd in (stdout_write, stderr_write, status_write, job_userns, *volume_userns):
            os.close(fd)

        self._loop(wake_fd, writer, {stdout_read: STDOUT, stderr_read: STDERR}, status_read)
        writer.close()
        self.state.update(output_size=writer.size, output_truncated=writer.truncated)
        self._finish()

    def _make_user_namespaces(self) -> tuple[int, list[int]]:
        """Create the job's user namespace and one per volume owner, for the idmapped mounts."""
        start = int(self.launch["id_map"]["host_start"])
        size = int(self.launch["id_map"]["size"])
        job_userns = userns.make_userns(f"0 {start} {size}", f"0 {start} {size}")
        # A volume's owner on the host is the job's root inside, so files the job writes there
        # belong to the owner of the volume's folder.
        volume_userns = [
            userns.make_userns(f"{v['owner_uid']} {start} 1", f"{v['owner_gid']} {start} 1")
            for v in self.launch["volumes"]
        ]
        return job_userns, volume_userns

    def _setup_failed(self, step: str, error: OSError) -> None:
        self.setup_error = {"step": step, "errno": error.errno or 0, "message": str(error)}
        self._finish()

    def _loop(
        self, wake_fd: int, writer: OutputWriter, outputs: dict[int, int], status_fd: int
    ) -> None:
        poller = select.poll()
        for fd in (wake_fd, status_fd, *outputs):
            poller.register(fd, select.POLLIN)
        status_buffer = b""
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
                elif not writer.pump(fd, outputs[fd]):
                    poller.unregister(fd)
                    os.close(fd)
                    del outputs[fd]
            self._handle_signals()
            if status_fd < 0 and not outputs:
                break

        # Every pipe is closed: wait for the processes that have not been reaped yet.
        for fd in outputs:
            os.close(fd)
        while not self.container_done and self.container_pid is not None:
            if self.container_pid in self.reaped and self.pid1 is None:
                break
            self._reap(block=True)

    # -- the end ----------------------------------------------------------------------------

    def _finish(self) -> None:
        # Usage and OOM kills live in the cgroup: read them before it is removed.
        try:
            self.usage = self.cgroup.usage() if self.cgroup.exists() else {}
        except OSError as error:
            log.error("job %s: reading usage failed: %s", self.job_id, error)
        try:
            self.cgroup.remove()
        except CgroupError as error:
            log.error("job %s: %s", self.job_id, error)
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(os.path.join(self.job_dir, jobdir.STAGING_DIR))

        self.state.update(self._outcome(), ended_at=time.time(), usage=self.usage)
        self.state.setdefault("started_at", None)
        jobdir.write_json(os.path.join(self.job_dir, jobdir.STATE_FILE), self.state)
        log.info(
            "job %s: ended %s (%s)", self.job_id, self.state["status"], self.state.get("reason")
        )

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
                "detail": "stopped by request",
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


def _drain_wakeups(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def _set_pipe_size(fd: int) -> None:
    # Past /proc/sys/fs/pipe-max-size the default 64 KiB stays: it works, only slower.
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)


def main(argv: list[str]) -> int:
    """Supervise the job in folder ``argv[1]``."""
    if len(argv) != 2:
        sys.stderr.write("usage: supervisor.py JOB_DIR\n")
        return 2
    job_dir = argv[1]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    supervisor = Supervisor(job_dir)
    jobdir.write_json(
        os.path.join(job_dir, jobdir.SUPERVISOR_FILE),
        {"pid": os.getpid(), "start_ticks": jobdir.process_start_ticks(os.getpid())},
        durable=False,
    )
    try:
        supervisor.run()
    except Exception:
        log.exception("job %s: supervisor failed", supervisor.job_id)
        supervisor.supervisor_error = (
            "the supervisor failed; see supervisor.log in the job's folder"
        )
        supervisor._finish()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
