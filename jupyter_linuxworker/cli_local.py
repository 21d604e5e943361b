"""Commands that use the engine directly, without a server (they need root): run, demo, images."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from typing import Final

from .cli_output import OutputWriteError, write_output
from .sandbox import outputlog
from .sandbox.images import ImageStore
from .sandbox.manager import JobManager, default_state_dir
from .sandbox.store import JobRecord, JobStatus
from .sandbox.units import format_size

EXIT_ENGINE_ERROR: Final = 125
DEMO_SLEEP_SECONDS: Final = 600
DEMO_RUNNING_PAUSE: Final = 1.0
# Closing the terminal (SIGHUP) stops the job as Ctrl-C does, so no job outlives its `run`.
STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# The record's detail for a job stopped because the reader of its output went away.
READER_GONE: Final = "the reader of its output went away"


def _write_piece(stream: int, data: bytes) -> None:
    if stream == outputlog.STDOUT:
        write_output(sys.stdout.buffer, data)
    else:
        write_output(sys.stderr.buffer, data, "standard error")


def exit_code_of(record: JobRecord) -> int:
    """Return the exit code a shell would show for the job: its code, 128+N for signal N."""
    if record.exit_code is not None:
        return record.exit_code
    return EXIT_ENGINE_ERROR


async def run_job(options: argparse.Namespace, spec: dict[str, object]) -> int:
    """Run one job in the foreground, stream its output, and return its exit code."""
    async with JobManager(
        options.state_dir, volume_roots=options.volume_root, grace=options.grace
    ) as manager:
        job = await manager.submit(spec)
        loop = asyncio.get_running_loop()
        interrupts = 0
        stop_tasks: set[asyncio.Task[JobRecord]] = set()

        def on_interrupt() -> None:
            # The first Ctrl-C stops with the grace period, a second one kills at once.
            nonlocal interrupts
            interrupts += 1
            grace = options.grace if interrupts == 1 else 0.0
            sys.stderr.write(f"\nStopping job {job.short_id} (grace {grace:g} s)...\n")
            stop_tasks.add(loop.create_task(manager.stop(job.id, grace=grace, wait=False)))

        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, on_interrupt)
        try:
            async for stream, data in manager.follow_streams(job.id):
                _write_piece(stream, data)
            record = await manager.wait(job.id)
        except (BrokenPipeError, OutputWriteError) as error:
            # The reader of the output has closed the pipe, or the output has nowhere to go,
            # so the job ends at once, as a foreground command in that pipeline would.
            detail = READER_GONE if isinstance(error, BrokenPipeError) else str(error)
            record = await manager.stop(job.id, grace=0, detail=detail)
            if options.stats:
                sys.stderr.write(format_stats(record))
            raise
        finally:
            for signum in STOP_SIGNALS:
                loop.remove_signal_handler(signum)

        if options.stats:
            sys.stderr.write(format_stats(record))
        elif record.status != JobStatus.COMPLETED and record.reason not in ("exit-code", "signal"):
            sys.stderr.write(
                f"jupyter linuxworker: job {record.short_id} {record.status.value}: "
                f"{record.detail}\n"
            )
        return exit_code_of(record)


def format_stats(record: JobRecord) -> str:
    """Return the end reason and resource usage of an ended job, one fact a line."""
    usage = record.usage
    elapsed = (record.ended_at or 0.0) - (record.started_at or record.ended_at or 0.0)
    lines = [
        f"job: {record.short_id}",
        f"status: {record.status.value}",
        f"exit code: {record.exit_code if record.exit_code is not None else '-'}",
        f"reason: {record.reason or '-'}" + (f" ({record.detail})" if record.detail else ""),
        f"elapsed: {elapsed:.3f} s",
    ]
    if usage.get("cpu_seconds") is not None:
        lines.append(f"cpu: {usage['cpu_seconds']:.3f} s")
    if usage.get("memory_peak_bytes") is not None:
        lines.append(f"memory peak: {format_size(usage['memory_peak_bytes'])}")
    if usage.get("pids_peak") is not None:
        lines.append(f"pids peak: {usage['pids_peak']}")
    if usage.get("io_read_bytes") is not None:
        lines.append(f"io read: {format_size(usage['io_read_bytes'])}")
        lines.append(f"io written: {format_size(usage['io_write_bytes'] or 0)}")
    lines.append(
        f"output: {record.output_size} bytes" + (", truncated" if record.output_truncated else "")
    )
    lines.append(f"oom kills: {usage.get('oom_kills') or 0}")
    return "".join(f"jupyter linuxworker: {line}\n" for line in lines)


async def demo(options: argparse.Namespace) -> int:
    """List / in a job, then start, show, stop and show a sleep job."""
    async with JobManager(options.state_dir) as manager:
        print("$ jupyter linuxworker run -- 'ls -lah /'   # in the default image")
        job = await manager.submit({"command": "ls -lah /"})
        async for data in manager.follow(job.id):
            sys.stdout.buffer.write(data)
        sys.stdout.flush()
        record = await manager.wait(job.id)
        print(f"Job {record.short_id}: {record.status.value}, exit code {record.exit_code}\n")

        print(f"Starting 'sleep {DEMO_SLEEP_SECONDS}' in a job...")
        job = await manager.submit({"command": f"sleep {DEMO_SLEEP_SECONDS}"})
        await asyncio.sleep(DEMO_RUNNING_PAUSE)
        print(f"Job {job.short_id}: {manager.get(job.id).status.value}")
        print("Stopping it...")
        record = await manager.stop(job.id)
        print(
            f"Job {record.short_id}: {record.status.value} ({record.detail}), "
            f"exit code {record.exit_code}"
        )
        return 0 if record.status == JobStatus.STOPPED else 1


def manage_images(options: argparse.Namespace) -> int:
    """Build, import, delete or list images in the state folder."""
    store = ImageStore(os.path.join(options.state_dir or default_state_dir(), "images"))
    if options.images_command == "import":
        info = store.import_tarball(options.name, options.tarball, replace=options.replace)
        print(f"Imported image {info.name}: {info.files} files, {info.size} bytes")
    elif options.images_command == "build-default":
        info = store.build_default(replace=True)
        print(f"Built image {info.name} at {info.path}")
    elif options.images_command == "delete":
        store.delete(options.name)
        print(f"Deleted image {options.name}")
    else:
        for info in store.list():
            print(f"{info.name}\t{info.files} files\t{info.size} bytes\t{info.source}")
    return 0
