"""The job manager: submits jobs, tracks their supervisors, streams their output, stops them.

Example (as root)::

    import asyncio
    from jupyter_linuxworker.sandbox import JobManager

    async def main() -> None:
        async with JobManager("/tmp/linuxworker-state") as manager:
            job = await manager.submit({"command": "ls -lah /"})
            async for chunk in manager.follow(job.id):
                print(chunk.decode(errors="replace"), end="")
            print((await manager.wait(job.id)).status)

    asyncio.run(main())

Every method runs on the caller's event loop and blocks it at most for a small file read or a
SQLite write. The kernel (inotify, pidfds) wakes waiters; nothing polls.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import os
import re
import shutil
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Final

from . import jobdir, outputlog, userns
from .cgroupfs import block_device, device_number
from .cgroups import CgroupError, CgroupLayout, JobCgroup
from .forkserver import PENDING_PREFIX
from .images import DEFAULT_IMAGE_NAME, ImageError, ImageStore
from .inotify import Inotify
from .launcher import SUPERVISOR_PATH, StartMode, SupervisorLauncher
from .spec import JobSpec, Limits, SpecError
from .store import DATABASE_NAME, JobRecord, JobStatus, JobStore
from .volumes import resolve_volume

DEFAULT_STATE_DIR: Final = "/var/lib/jupyter-linuxworker"
STATE_DIR_ENV: Final = "JUPYTER_LINUXWORKER_STATE_DIR"
DEFAULT_GRACE: Final = 5.0
# Limits of a job that sets none. With them, no single job can take the host's memory or pids.
# TOTAL_* below caps all jobs of one manager together.
DEFAULT_MEMORY: Final = 1024**3
DEFAULT_PIDS: Final = 1024
DEFAULT_DISK: Final = 1024**3
# Shares of the host that all running jobs together may use, set on the jobs' parent cgroup.
TOTAL_MEMORY_FRACTION: Final = 0.75
TOTAL_PIDS_FRACTION: Final = 0.5
STOP_WAIT_MARGIN: Final = 5.0
FOLLOW_CHUNK: Final = 1024 * 1024
FOLLOW_EXTENT: Final = 16 * 1024 * 1024
MAX_ADOPTED_JOBS: Final = 100_000
STAGING_DIR: Final = "staging"
JOB_ID_PATTERN: Final = re.compile(r"^[0-9a-f]{32}$")

log = logging.getLogger("jupyter_linuxworker.manager")


class JobNotFound(KeyError):
    """No job has this id (or the caller may not see it)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "job not found"


class JobConflict(Exception):
    """The job is in a state that does not allow the request, such as deleting a running job."""


def _last_capability() -> int:
    with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as file:
        return int(file.read())


def _host_totals() -> dict[str, Any]:
    """Return the memory and pids that all jobs of a manager may use together."""
    with open("/proc/meminfo", encoding="ascii") as file:
        mem_kib = next(int(line.split()[1]) for line in file if line.startswith("MemTotal:"))
    with open("/proc/sys/kernel/pid_max", encoding="ascii") as file:
        pid_max = int(file.read())
    return {
        "memory": int(mem_kib * 1024 * TOTAL_MEMORY_FRACTION),
        "pids": int(pid_max * TOTAL_PIDS_FRACTION),
    }


def default_state_dir() -> str:
    """Return $JUPYTER_LINUXWORKER_STATE_DIR, else /var/lib/jupyter-linuxworker."""
    return os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR


class JobManager:
    """Run jobs from one state folder: records in SQLite, one folder per job, images beside them."""

    def __init__(
        self,
        state_dir: str | None = None,
        *,
        volume_roots: list[str] | None = None,
        grace: float = DEFAULT_GRACE,
        disk: int = DEFAULT_DISK,
        default_limits: Limits | None = None,
        id_map: tuple[int, int] = (userns.DEFAULT_HOST_START, userns.DEFAULT_SIZE),
        seccomp: bool = True,
        python: str = sys.executable,
        supervisor_start: StartMode = "prepared",
        supervisor_path: str = SUPERVISOR_PATH,
        output_relay: bool = True,
    ) -> None:
        self.state_dir = os.path.abspath(state_dir or default_state_dir())
        self.jobs_dir = os.path.join(self.state_dir, "jobs")
        # The empty folder that each job's PID 1 mounts its writable layer on, in its own
        # private mount namespace: the mounts of different jobs never meet.
        self.staging_dir = os.path.join(self.state_dir, STAGING_DIR)
        self.images = ImageStore(os.path.join(self.state_dir, "images"))
        self.volume_roots = [
            os.path.abspath(r)
            for r in (volume_roots if volume_roots is not None else [os.getcwd()])
        ]
        if grace < 0:
            raise ValueError(f"invalid grace period {grace}: expected 0 or more seconds")
        self.grace = grace
        self.disk = disk
        self.default_limits = default_limits or Limits(memory=DEFAULT_MEMORY, pids=DEFAULT_PIDS)
        userns.check_id_map(*id_map)
        self.id_map = id_map
        self.seccomp = seccomp
        self.output_relay = output_relay
        self.python = python
        self.last_capability = _last_capability()
        self.cgroups = CgroupLayout.detect()
        self.launcher = SupervisorLauncher(
            python, self.state_dir, supervisor_start, supervisor_path, {"id_map": list(id_map)}
        )
        self._store: JobStore | None = None
        self._inotify: Inotify | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watches: dict[str, int] = {}
        self._watch_jobs: dict[int, str] = {}
        self._listeners: dict[str, set[asyncio.Event]] = {}
        self._supervisors: dict[str, int] = {}
        # Jobs whose supervisor is being started, with the task that starts it.
        self._launches: dict[str, asyncio.Future[None]] = {}

    # -- opening and closing ----------------------------------------------------------------

    async def __aenter__(self) -> JobManager:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Open the state folder, build the default image if missing, adopt running jobs."""
        self._loop = asyncio.get_running_loop()
        for folder in (self.state_dir, self.jobs_dir):
            os.makedirs(folder, mode=0o711, exist_ok=True)
        os.makedirs(self.staging_dir, mode=0o700, exist_ok=True)
        if "," in self.state_dir or ":" in self.state_dir:
            raise ValueError(
                f"state folder {self.state_dir}: ',' and ':' cannot be used in overlay mount "
                "options; choose another path"
            )
        self._store = JobStore(os.path.join(self.state_dir, DATABASE_NAME))
        self.cgroups.acquire(_host_totals())
        try:
            self.images.ensure_default(DEFAULT_IMAGE_NAME)
        except ImageError as error:
            log.warning("default image unavailable: %s", error)

        self._inotify = Inotify()
        self._loop.add_reader(self._inotify.fd, self._on_inotify)
        self._adopt()
        # The fork server prepares containers with these; it starts after this point.
        self.launcher.config["cgroup"] = {
            "version": self.cgroups.version,
            "parents": self.cgroups.parents,
        }
        self.launcher.config["root"] = self._default_root()
        self.launcher.start()

    def _default_root(self) -> dict[str, Any] | None:
        """Return the root of a job that sets no image or disk, for prepared containers."""
        try:
            image_root = self.images.rootfs(DEFAULT_IMAGE_NAME)
        except ImageError:
            return None
        return {
            "staging": self.staging_dir,
            "image_root": image_root,
            "disk": self.disk,
            "owner": self.id_map[0],
        }

    async def close(self) -> None:
        """Stop tracking jobs; they keep running under their supervisors."""
        # Supervisors being started are waited for, so that each job has one to outlive this.
        if self._launches:
            await asyncio.gather(*self._launches.values(), return_exceptions=True)
        if self._loop is not None:
            for job_id in list(self._supervisors):
                self._untrack(job_id)
            if self._inotify is not None:
                self._loop.remove_reader(self._inotify.fd)
                self._inotify.close()
                self._inotify = None
        for events in self._listeners.values():
            for event in events:
                event.set()
        pending = False
        if self._store is not None:
            pending = bool(self._store.list(statuses=(JobStatus.PENDING,), limit=1))
            self._store.close()
            self._store = None
        self.launcher.close()
        # The supervisor of a pending job may still create its cgroup in the parents.
        self.cgroups.release(remove=not pending)

    @property
    def store(self) -> JobStore:
        """Return the open job store; raise if :meth:`start` has not run."""
        if self._store is None:
            raise RuntimeError("the job manager is not started: call 'await manager.start()' first")
        return self._store

    def _adopt(self) -> None:
        active = self.store.list(
            statuses=(JobStatus.PENDING, JobStatus.RUNNING), limit=MAX_ADOPTED_JOBS
        )
        for record in active:
            refreshed = self._refresh(record)
            info = None if refreshed.status.ended else self._supervisor_info(record.id)
            if info is not None:
                self._track(record.id, *info)
                log.info("job %s: adopted, supervisor pid %s", record.id, info[0])

        # Cgroups left by a job of ours that is known to have ended, for example after a crash,
        # and pending cgroups of prepared supervisors whose fork server is gone.
        for job_id in self.cgroups.job_ids():
            if job_id.startswith(PENDING_PREFIX):
                self._remove_stale_pending(job_id)
                continue
            known = self.store.get(job_id) if JOB_ID_PATTERN.fullmatch(job_id) else None
            if known is not None and known.status.ended:
                log.info("job %s: removing the cgroup it left behind", job_id)
                self._remove_cgroup(job_id)

    # -- submitting -------------------------------------------------------------------------

    async def submit(self, spec: JobSpec | dict[str, Any], owner: str = "") -> JobRecord:
        """Check ``spec``, store a PENDING record and start the job's supervisor."""
        if not isinstance(spec, JobSpec):
            spec = JobSpec.from_dict(spec)
        try:
            image_root = self.images.rootfs(spec.image)
        except ImageError as error:
            raise SpecError("image", spec.image, str(error)) from None
        volumes = [resolve_volume(volume, self.volume_roots) for volume in spec.volumes]
        limits = self.limits_for(spec, image_root, volumes)

        job_id = uuid.uuid4().hex
        job_dir = self._job_dir(job_id)
        os.mkdir(job_dir, 0o700)
        launch = {
            "job_id": job_id,
            "hostname": job_id[:12],
            "argv": spec.argv,
            "env": spec.environ,
            "workdir": spec.workdir,
            "image_root": image_root,
            "staging": self.staging_dir,
            "volumes": volumes,
            "disk": spec.limits.disk or self.disk,
            "cgroup": self.cgroups.for_job(job_id).to_dict(),
            "output_cap": spec.output_cap,
            "timeout": spec.timeout,
            "grace": self.grace,
            "limits": limits,
            "id_map": {"host_start": self.id_map[0], "size": self.id_map[1]},
            "last_capability": self.last_capability,
            "seccomp": self.seccomp,
            "output_relay": self.output_relay,
        }
        jobdir.write_json(os.path.join(job_dir, jobdir.LAUNCH_FILE), launch, durable=False)
        record = self.store.insert(
            JobRecord(
                id=job_id,
                name=spec.name,
                owner=owner,
                spec=spec.to_dict(),
                status=JobStatus.PENDING,
                created_at=time.time(),
            )
        )
        # The supervisor starts in the background: submit returns the PENDING record at once,
        # so a burst of submits does not wait for each start in turn.
        starting = asyncio.ensure_future(self._launch(job_id, job_dir, owner))
        self._launches[job_id] = starting
        starting.add_done_callback(lambda _task: self._launches.pop(job_id, None))
        return record

    async def _launch(self, job_id: str, job_dir: str, owner: str) -> None:
        """Start the job's supervisor and track it; on failure, record the job as FAILED."""
        try:
            started = await self.launcher.start_supervisor(job_dir)
        except OSError as error:
            log.error("job %s: starting the supervisor failed: %s", job_id, error)
            record = self.store.get(job_id)
            if record is not None:
                self.store.update(
                    record.with_changes(
                        status=JobStatus.FAILED,
                        reason="supervisor-error",
                        ended_at=time.time(),
                        detail=f"starting the supervisor failed: {error}",
                    )
                )
            self._notify(job_id)
            return

        # The pid goes into the record rather than into a file of the job's folder, because on
        # ext4 without a journal each new inode is slower to allocate after many deletions.
        if started.start_ticks is not None:
            self.store.set_supervisor(job_id, started.pid, started.start_ticks)
            self._track(job_id, started.pid, started.start_ticks, started.pidfd)
        elif started.pidfd is not None:
            os.close(started.pidfd)
        log.info("job %s: submitted by %r, supervisor pid %s", job_id, owner, started.pid)
        self._notify(job_id)

    async def _launched(self, job_id: str) -> None:
        """Wait until the job's supervisor has been started, if that is still under way."""
        launch = self._launches.get(job_id)
        if launch is not None:
            await asyncio.shield(launch)

    def limits_for(
        self, spec: JobSpec, image_root: str, volumes: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """Return the job's limits: the spec's, else the manager's defaults, with IO devices."""
        limits: dict[str, Any] = {}
        for name in (
            "memory",
            "cpus",
            "cpu_weight",
            "pids",
            "io_read_bps",
            "io_write_bps",
            "io_read_iops",
            "io_write_iops",
        ):
            value = getattr(spec.limits, name)
            limits[name] = value if value is not None else getattr(self.default_limits, name)
        # The writable layer is a tmpfs (memory), so IO limits apply where the job's files come
        # from: the image's disk, the volumes' disks and the devices the spec names.
        devices = [block_device(image_root), *(block_device(v["source"]) for v in volumes)]
        named = set()
        for path in spec.io_devices:
            try:
                named.add(device_number(path))
            except ValueError as error:
                raise SpecError(
                    "io_devices", path, f"{error}; name a block device such as /dev/sda"
                ) from None
        limits["io_devices"] = sorted({d for d in devices if d} | named)
        return limits

    def stats(self, job_id: str) -> dict[str, Any]:
        """Return the job's resource usage: live while it runs, final once it has ended."""
        record = self.get(job_id)
        usage = dict(record.usage)
        if not record.status.ended:
            live = self.cgroups.for_job(job_id).usage()
            if any(value is not None for value in live.values()):
                usage = live
        return usage

    def limits(self, job_id: str) -> dict[str, Any]:
        """Return the limits the job runs under, defaults included."""
        self.get(job_id)
        launch = jobdir.read_json(os.path.join(self._job_dir(job_id), jobdir.LAUNCH_FILE)) or {}
        limits: dict[str, Any] = launch.get("limits", {})
        return limits

    # -- reading ----------------------------------------------------------------------------

    def _job_dir(self, job_id: str) -> str:
        if not JOB_ID_PATTERN.fullmatch(job_id):
            raise JobNotFound(f"job {job_id!r} not found: a job id is 32 hexadecimal digits")
        return os.path.join(self.jobs_dir, job_id)

    def get(self, job_id: str) -> JobRecord:
        """Return the current record of ``job_id``; raise JobNotFound."""
        self._job_dir(job_id)
        record = self.store.get(job_id)
        if record is None:
            raise JobNotFound(f"job {job_id!r} not found")
        return self._refresh(record)

    def list(
        self,
        *,
        statuses: tuple[JobStatus, ...] = (),
        owner: str | None = None,
        before_seq: int | None = None,
        limit: int = 50,
    ) -> list[JobRecord]:
        """Return records newest first; see :meth:`JobStore.list`."""
        if statuses:
            # The filter runs in SQLite: bring active records up to date first, so a job that
            # started or ended since it was last read is filed under its real status.
            active = (JobStatus.PENDING, JobStatus.RUNNING)
            for record in self.store.list(statuses=active, owner=owner, limit=MAX_ADOPTED_JOBS):
                self._refresh(record)
        records = self.store.list(
            statuses=statuses, owner=owner, before_seq=before_seq, limit=limit
        )
        return [self._refresh(record) for record in records]

    def count_active(self, owner: str | None = None) -> int:
        """Return how many jobs (of ``owner``, if given) are PENDING or RUNNING.

        The count comes from the records without reading each job's folder, so it may include
        a job that ended a moment ago and whose supervisor's exit has not been handled yet.
        """
        active = (JobStatus.PENDING, JobStatus.RUNNING)
        return self.store.count(statuses=active, owner=owner)

    def read_output(self, job_id: str, offset: int = 0, size: int = -1) -> bytes:
        """Return up to ``size`` bytes (all if negative) of the job's output log from ``offset``."""
        self.get(job_id)
        return outputlog.read_log(self._job_dir(job_id), offset, size)

    def stderr_ranges(self, job_id: str) -> builtins.list[tuple[int, int, int]]:
        """Return the (start, end, stream) ranges of the log that are not stdout."""
        self.get(job_id)
        return outputlog.read_ranges(self._job_dir(job_id))

    async def follow(self, job_id: str, offset: int = 0) -> AsyncIterator[bytes]:
        """Yield output from ``offset`` as it arrives, until the job has ended and all is read."""
        async for _stream, data in self._follow(job_id, offset, streams=False):
            yield data

    async def follow_extents(self, job_id: str, offset: int = 0) -> AsyncIterator[tuple[int, int]]:
        """Yield (offset, size) of each new part of the log, without reading it.

        For callers that copy the log themselves, such as with sendfile. It ends when the job
        has ended and every byte has been yielded; parts are at most FOLLOW_EXTENT bytes.
        """
        self.get(job_id)
        job_dir = self._job_dir(job_id)
        async with self._listening(job_id) as changed:
            while True:
                changed.clear()
                size = outputlog.log_size(job_dir)
                if size <= offset:
                    if not self.get(job_id).status.ended:
                        await changed.wait()
                        continue
                    # The supervisor writes its final state after the last byte: look again.
                    size = outputlog.log_size(job_dir)
                    if size <= offset:
                        return
                length = min(size - offset, FOLLOW_EXTENT)
                yield offset, length
                offset += length

    def output_path(self, job_id: str) -> str:
        """Return the path of the job's output log (which may not exist yet)."""
        self.get(job_id)
        return os.path.join(self._job_dir(job_id), outputlog.LOG_NAME)

    async def follow_streams(
        self, job_id: str, offset: int = 0
    ) -> AsyncIterator[tuple[int, bytes]]:
        """Like :meth:`follow`, yielding (stream, bytes) with stream STDOUT, STDERR or MARKER."""
        async for piece in self._follow(job_id, offset, streams=True):
            yield piece

    async def _follow(
        self, job_id: str, offset: int, streams: bool
    ) -> AsyncIterator[tuple[int, bytes]]:
        self.get(job_id)
        job_dir = self._job_dir(job_id)
        ranges = outputlog.RangeReader(job_dir)
        async with self._listening(job_id) as changed:
            while True:
                changed.clear()
                data = outputlog.read_log(job_dir, offset, FOLLOW_CHUNK)
                if not data:
                    if not self.get(job_id).status.ended:
                        await changed.wait()
                        continue
                    # The supervisor writes its final state after the last byte: read once more.
                    data = outputlog.read_log(job_dir, offset, FOLLOW_CHUNK)
                    if not data:
                        return
                if streams:
                    for piece in outputlog.split_streams(data, offset, ranges.update()):
                        yield piece
                else:
                    yield outputlog.STDOUT, data
                offset += len(data)

    async def wait(self, job_id: str, timeout: float | None = None) -> JobRecord:
        """Return the record once the job has ended; raise TimeoutError after ``timeout`` s."""
        async with asyncio.timeout(timeout), self._listening(job_id) as changed:
            while True:
                changed.clear()
                record = self.get(job_id)
                if record.status.ended:
                    return record
                await changed.wait()

    # -- stopping and deleting --------------------------------------------------------------

    async def stop(
        self,
        job_id: str,
        grace: float | None = None,
        wait: bool = True,
        detail: str | None = None,
    ) -> JobRecord:
        """Send SIGTERM to the job, then SIGKILL to all of it after ``grace`` seconds.

        Stopping an ended job changes nothing and is not an error. With ``wait``, return once
        the job has ended. ``detail`` is why, for the record; it defaults to a stop by request.
        """
        record = self.get(job_id)
        if record.status.ended:
            return record
        grace = self.grace if grace is None else grace
        if grace < 0:
            raise SpecError("grace", grace, "expected 0 or more seconds")
        job_dir = self._job_dir(job_id)
        request: dict[str, object] = {"grace": grace, "requested_at": time.time()}
        if detail:
            request["detail"] = detail
        jobdir.write_json(os.path.join(job_dir, jobdir.STOP_FILE), request)
        await self._launched(job_id)
        if self.get(job_id).status.ended:
            return self.get(job_id)
        if not self._signal_supervisor(job_id, signal.SIGUSR1):
            log.warning("job %s: its supervisor is gone; killing the job", job_id)
            self._remove_cgroup(job_id)
        if not wait:
            return self.get(job_id)
        return await self.wait(job_id, timeout=grace + STOP_WAIT_MARGIN)

    async def delete(self, job_id: str) -> None:
        """Remove an ended job's record and folder; raise JobConflict while it runs."""
        record = self.get(job_id)
        if not record.status.ended:
            raise JobConflict(f"job {job_id} is {record.status.value}: stop it before deleting it")
        job_dir = self._job_dir(job_id)
        await asyncio.get_running_loop().run_in_executor(None, shutil.rmtree, job_dir, True)
        self.store.delete(job_id)
        log.info("job %s: deleted", job_id)

    # -- supervisors ------------------------------------------------------------------------

    def _supervisor_info(self, job_id: str) -> tuple[int, int] | None:
        """Return the pid and start ticks of the job's supervisor, or None if unknown."""
        recorded = self.store.supervisor(job_id)
        if recorded is not None:
            return recorded
        # A manager that ended right after starting the supervisor recorded nothing. The
        # supervisor records itself in state.json once the job runs.
        state = jobdir.read_json(os.path.join(self._job_dir(job_id), jobdir.STATE_FILE)) or {}
        info = state.get("supervisor")
        if not info or info.get("start_ticks") is None:
            return None
        return int(info["pid"]), int(info["start_ticks"])

    def _signal_supervisor(self, job_id: str, signum: int) -> bool:
        info = self._supervisor_info(job_id)
        if info is None:
            return False
        pid, start_ticks = info
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return False
        try:
            # Checked after the pidfd is open, so the pid cannot be reused in between.
            if not jobdir.process_is(pid, start_ticks):
                return False
            signal.pidfd_send_signal(pidfd, signum)
            return True
        except ProcessLookupError:
            return False
        finally:
            os.close(pidfd)

    def _track(self, job_id: str, pid: int, start_ticks: int, pidfd: int | None = None) -> None:
        """Wake the job's listeners when its supervisor exits; take over ``pidfd`` if given."""
        if self._loop is None or job_id in self._supervisors:
            if pidfd is not None:
                os.close(pidfd)
            return
        if pidfd is None:
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                return
        if not jobdir.process_is(pid, start_ticks):
            os.close(pidfd)
            return
        self._supervisors[job_id] = pidfd
        self._loop.add_reader(pidfd, self._on_supervisor_exit, job_id, pid)

    def _untrack(self, job_id: str) -> None:
        pidfd = self._supervisors.pop(job_id, None)
        if pidfd is not None and self._loop is not None:
            self._loop.remove_reader(pidfd)
            os.close(pidfd)

    def _on_supervisor_exit(self, job_id: str, pid: int) -> None:
        self._untrack(job_id)
        self.launcher.reap()
        with contextlib.suppress(JobNotFound):
            self.get(job_id)
        self._notify(job_id)

    def _refresh(self, record: JobRecord) -> JobRecord:
        """Bring an active record up to date with what its supervisor wrote, or mark it LOST."""
        if record.status.ended:
            return record
        job_dir = self._job_dir(record.id)
        state = jobdir.read_json(os.path.join(job_dir, jobdir.STATE_FILE))
        if state is None or not JobStatus(state["status"]).ended:
            alive = self._supervisor_alive(record.id)
            if not alive:
                # The supervisor may have written its final state just before it exited.
                state = jobdir.read_json(os.path.join(job_dir, jobdir.STATE_FILE))
            if not alive and (state is None or not JobStatus(state["status"]).ended):
                return self._mark_lost(record)
        if state is None:
            return record

        status = JobStatus(state["status"])
        updated = record.with_changes(
            status=status,
            started_at=state.get("started_at"),
            ended_at=state.get("ended_at"),
            exit_code=state.get("exit_code"),
            signal=state.get("signal"),
            reason=state.get("reason"),
            detail=state.get("detail"),
            output_size=state.get("output_size", record.output_size),
            output_truncated=bool(state.get("output_truncated", False)),
            usage=state.get("usage") or {},
        )
        if updated != record:
            self.store.update(updated)
            if updated.status.ended:
                log.info(
                    "job %s: %s (%s)%s",
                    record.id,
                    updated.status.value,
                    updated.detail or "exit code 0",
                    "; its output was cut short" if updated.output_truncated else "",
                )
                # The supervisor writes its final state just before it exits: its pidfd stays
                # watched until then, so the exit is seen and the process reaped.
        if not updated.status.ended:
            # The log grows on every write: report its size without storing each change.
            return updated.with_changes(output_size=outputlog.log_size(job_dir))
        return updated

    def _supervisor_alive(self, job_id: str) -> bool:
        if job_id in self._launches:
            return True
        info = self._supervisor_info(job_id)
        return info is not None and jobdir.process_is(*info)

    def _mark_lost(self, record: JobRecord) -> JobRecord:
        log.warning(
            "job %s: its supervisor ended without recording an end; marking it LOST", record.id
        )
        self._remove_cgroup(record.id)
        outputlog.free_blocks_past_end(self._job_dir(record.id))
        lost = record.with_changes(
            status=JobStatus.LOST,
            reason="lost",
            ended_at=time.time(),
            detail="the job's supervisor ended without recording how the job ended; "
            "every process of the job was killed",
            output_size=outputlog.log_size(self._job_dir(record.id)),
        )
        self.store.update(lost)
        self._untrack(record.id)
        return lost

    def _remove_stale_pending(self, name: str) -> None:
        # The fork server removes the cgroup when its supervisor dies, and the supervisor
        # renames it for a job, even after the fork server has ended.
        pids = name[len(PENDING_PREFIX) :].split("-")
        if not all(pid.isdigit() for pid in pids) or any(
            os.path.exists(f"/proc/{pid}") for pid in pids
        ):
            return
        log.info("removing the pending cgroup %s: its fork server and supervisor ended", name)
        self._remove_cgroup(name)

    def _remove_cgroup(self, job_id: str) -> None:
        cgroup: JobCgroup = self.cgroups.for_job(job_id)
        try:
            cgroup.remove()
        except CgroupError as error:
            log.error("job %s: %s", job_id, error)

    # -- wake-ups ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _listening(self, job_id: str) -> AsyncIterator[asyncio.Event]:
        """Yield an event set whenever the job's folder changes or its supervisor exits."""
        job_dir = self._job_dir(job_id)
        event = asyncio.Event()
        listeners = self._listeners.setdefault(job_id, set())
        listeners.add(event)
        if job_id not in self._watches and self._inotify is not None:
            new_wd = self._inotify.add_watch(job_dir)
            self._watches[job_id] = new_wd
            self._watch_jobs[new_wd] = job_id
        try:
            yield event
        finally:
            listeners.discard(event)
            if not listeners:
                del self._listeners[job_id]
                wd = self._watches.pop(job_id, None)
                if wd is not None and self._inotify is not None:
                    self._watch_jobs.pop(wd, None)
                    self._inotify.remove_watch(wd)

    def _on_inotify(self) -> None:
        if self._inotify is None:
            return
        for wd, _mask in self._inotify.read_events():
            job_id = self._watch_jobs.get(wd)
            if job_id is not None:
                self._notify(job_id)

    def _notify(self, job_id: str) -> None:
        for event in self._listeners.get(job_id, ()):
            event.set()
