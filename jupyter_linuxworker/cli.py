"""The ``jupyter linuxworker`` command line.

``run`` executes one job in the foreground through the engine, without a server (root needed);
``demo`` shows what a job is; ``images`` lists, builds and imports root filesystem images.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any, Final

from .sandbox import outputlog
from .sandbox.images import ImageError, ImageStore
from .sandbox.manager import (
    DEFAULT_GRACE,
    DEFAULT_STATE_DIR,
    STATE_DIR_ENV,
    JobManager,
    default_state_dir,
)
from .sandbox.spec import JobSpec, SpecError, Volume
from .sandbox.store import JobRecord, JobStatus
from .sandbox.units import format_size

EXIT_USAGE: Final = 2
EXIT_ENGINE_ERROR: Final = 125
DEMO_SLEEP_SECONDS: Final = 600
DEMO_RUNNING_PAUSE: Final = 1.0

log = logging.getLogger("jupyter_linuxworker.cli")


def _add_spec_options(parser: argparse.ArgumentParser) -> None:
    """Add the options that set a job spec's fields; the magics take the same names."""
    parser.add_argument("--image", help="image to run in (default: %(default)s)", default="default")
    parser.add_argument(
        "--env",
        "-e",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set an environment variable in the job (repeatable)",
    )
    parser.add_argument("--workdir", "-w", help="working directory inside the job (default: /root)")
    parser.add_argument("--name", help="a name for the job (default: the command's first word)")
    parser.add_argument(
        "--volume",
        "-v",
        action="append",
        default=[],
        metavar="SRC:DEST[:ro]",
        help="bind-mount host folder SRC at DEST, read-only with :ro (repeatable)",
    )
    parser.add_argument("--timeout", help="stop the job after this long (seconds, or 90s, 5m, 1h)")
    parser.add_argument(
        "--output-cap", help="keep at most this much output (such as 16M); the rest is dropped"
    )
    parser.add_argument("--memory", help="memory limit, such as 256M or 1.5G (no swap beyond it)")
    parser.add_argument("--cpus", help="CPU quota in CPUs, such as 0.5")
    parser.add_argument("--cpu-weight", help="relative CPU weight from 1 to 10000 (default 100)")
    parser.add_argument("--pids", help="maximum number of processes and threads")
    parser.add_argument("--disk", help="size of the writable layer, such as 512M")
    parser.add_argument("--io-read", help="read rate limit in bytes per second, such as 10M")
    parser.add_argument("--io-write", help="write rate limit in bytes per second, such as 10M")
    parser.add_argument("--io-read-iops", help="read operations per second")
    parser.add_argument("--io-write-iops", help="write operations per second")
    parser.add_argument(
        "--io-device",
        action="append",
        default=[],
        metavar="DEVICE",
        help="also apply the IO limits to this block device, such as /dev/sdb (repeatable)",
    )


def spec_from_options(options: argparse.Namespace, command: Sequence[str] | str) -> JobSpec:
    """Build a checked job spec from parsed options and the command."""
    env: dict[str, str] = {}
    for item in options.env:
        name, sep, value = item.partition("=")
        if not sep:
            raise SpecError("env", item, "expected NAME=VALUE")
        env[name] = value
    data: dict[str, Any] = {
        "command": command,
        "image": options.image,
        "env": env,
        "name": options.name,
        "volumes": [Volume.parse(text) for text in options.volume],
        "timeout": options.timeout,
        "output_cap": options.output_cap,
        "memory": options.memory,
        "cpus": options.cpus,
        "cpu_weight": options.cpu_weight,
        "pids": options.pids,
        "disk": options.disk,
        "io_read_bps": options.io_read,
        "io_write_bps": options.io_write,
        "io_read_iops": options.io_read_iops,
        "io_write_iops": options.io_write_iops,
        "io_devices": options.io_device,
    }
    if options.workdir:
        data["workdir"] = options.workdir
    return JobSpec.from_dict(data)


def _command_from_words(words: list[str]) -> str | list[str]:
    # One word is a shell command line (`run -- 'echo a; echo b'`); several are an argv.
    if words and words[0] == "--":
        words = words[1:]
    if len(words) == 1:
        return words[0]
    return words


def _write_piece(stream: int, data: bytes) -> None:
    target = sys.stdout.buffer if stream == outputlog.STDOUT else sys.stderr.buffer
    target.write(data)
    target.flush()


def exit_code_of(record: JobRecord) -> int:
    """Return the exit code a shell would show for the job: its code, 128+N for signal N."""
    if record.exit_code is not None:
        return record.exit_code
    return EXIT_ENGINE_ERROR


async def _run(options: argparse.Namespace, command: str | list[str]) -> int:
    spec = spec_from_options(options, command)
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

        loop.add_signal_handler(signal.SIGINT, on_interrupt)
        loop.add_signal_handler(signal.SIGTERM, on_interrupt)
        try:
            async for stream, data in manager.follow_streams(job.id):
                _write_piece(stream, data)
            record = await manager.wait(job.id)
        finally:
            loop.remove_signal_handler(signal.SIGINT)
            loop.remove_signal_handler(signal.SIGTERM)

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
        f"job: {record.id}",
        f"status: {record.status.value}",
        f"exit code: {record.exit_code}",
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
    lines.append(f"oom kills: {usage.get('oom_kills', 0)}")
    return "".join(f"jupyter linuxworker: {line}\n" for line in lines)


async def _demo(options: argparse.Namespace) -> int:
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


def _images(options: argparse.Namespace) -> int:
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


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of ``jupyter linuxworker``."""
    parser = argparse.ArgumentParser(
        prog="jupyter linuxworker", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--state-dir",
        default=None,
        help=f"folder of jobs and images (default: ${STATE_DIR_ENV} or {DEFAULT_STATE_DIR})",
    )
    parser.add_argument(
        "--log-level", default="WARNING", help="engine log level (default: %(default)s)"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "run",
        help="run one job in the foreground, without a server",
        usage="jupyter linuxworker run [options] -- COMMAND [ARG...]",
        description="Run COMMAND in a job and stream its output. One word after "
        "'--' is a shell command line run by /bin/sh -c; several "
        "words are an argv. Exits with the job's exit code.",
    )
    _add_spec_options(run)
    run.add_argument(
        "--volume-root",
        action="append",
        default=None,
        metavar="DIR",
        help="folder that volume sources must lie beneath (repeatable; default: current folder)",
    )
    run.add_argument(
        "--grace",
        type=float,
        default=DEFAULT_GRACE,
        help="seconds between SIGTERM and SIGKILL when the job is stopped (default: %(default)s)",
    )
    run.add_argument(
        "--stats", action="store_true", help="print the end reason and resource usage to stderr"
    )
    run.add_argument("words", nargs=argparse.REMAINDER, help="the command")

    commands.add_parser("demo", help="run 'ls -lah /' in a job, then start and stop a 'sleep' job")

    images = commands.add_parser("images", help="list, build or import root filesystem images")
    image_commands = images.add_subparsers(dest="images_command")
    image_commands.add_parser("list", help="list the images")
    image_commands.add_parser(
        "build-default", help="build the default image from Debian's busybox-static"
    )
    importer = image_commands.add_parser(
        "import", help="import a root filesystem tarball as an image"
    )
    importer.add_argument("name")
    importer.add_argument("tarball")
    importer.add_argument(
        "--replace", action="store_true", help="replace an existing image of that name"
    )
    deleter = image_commands.add_parser("delete", help="delete an image")
    deleter.add_argument("name")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``jupyter linuxworker`` with ``argv``; return the exit code."""
    parser = build_parser()
    options = parser.parse_args(argv)
    logging.basicConfig(
        level=options.log_level.upper(), format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        if options.command == "run":
            command = _command_from_words(options.words)
            if not command:
                parser.error("run: missing COMMAND after the options")
            return asyncio.run(_run(options, command))
        if options.command == "demo":
            return asyncio.run(_demo(options))
        return _images(options)
    except (SpecError, ImageError) as error:
        sys.stderr.write(f"jupyter linuxworker: {error}\n")
        return EXIT_USAGE
    except PermissionError as error:
        sys.stderr.write(f"jupyter linuxworker: {error}; running jobs needs root\n")
        return EXIT_ENGINE_ERROR


if __name__ == "__main__":
    sys.exit(main())
