"""The `jupyter linuxworker` command line.

`run`, `demo` and `images import|build-default|delete` use the engine on this machine, which
needs root. `submit`, `status`, `logs`, `stop`, `list`, `delete` and `images` call a running
Jupyter server with the extension.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, Final

from . import cli_local, cli_remote
from .cli_output import OutputWriteError
from .client import Client, LinuxWorkerError
from .options import add_spec_options, command_from_words, describe_spec_error, spec_from_options
from .sandbox.images import ImageError
from .sandbox.manager import DEFAULT_GRACE, DEFAULT_STATE_DIR, STATE_DIR_ENV
from .sandbox.spec import JobSpec, SpecError
from .sandbox.units import UnitError, parse_duration

EXIT_USAGE: Final = 2
REMOTE_COMMANDS: Final[dict[str, Callable[[Client, argparse.Namespace], int]]] = {
    "status": cli_remote.status,
    "logs": cli_remote.logs,
    "stop": cli_remote.stop,
    "delete": cli_remote.delete,
    "list": cli_remote.list_jobs,
}


def _seconds(text: str) -> float:
    """Parse a non-negative duration for argparse, with the project's message."""
    try:
        return parse_duration(text)
    except UnitError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_server_options(
    parser: argparse.ArgumentParser, json_output: bool = True, top_level: bool = False
) -> None:
    # Accepted before and after the command. After it they have no default of their own, so
    # that a value given before the command is kept.
    default = None if top_level else argparse.SUPPRESS
    parser.add_argument(
        "--url", default=default, help="the Jupyter server's URL (default: found automatically)"
    )
    parser.add_argument(
        "--token",
        default=default,
        help="a token the server accepts (default: found with the URL)",
    )
    if json_output:
        parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def _add_state_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir",
        default=argparse.SUPPRESS,
        help=f"folder of jobs and images (default: ${STATE_DIR_ENV} or {DEFAULT_STATE_DIR})",
    )


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of `jupyter linuxworker`."""
    parser = argparse.ArgumentParser(
        prog="jupyter linuxworker", description=(__doc__ or "").splitlines()[0].strip("`")
    )
    parser.add_argument("--state-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--log-level", default="WARNING", help="log level (default: %(default)s)")
    _add_server_options(parser, json_output=False, top_level=True)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "run",
        help="run one job in the foreground, without a server",
        usage="jupyter linuxworker run [options] -- COMMAND [ARG...]",
        description="Run COMMAND in a job and stream its output. One word after '--' is a shell "
        "command line run by /bin/sh -c; several words are an argv. Exits with the job's "
        "exit code.",
    )
    add_spec_options(run)
    _add_state_dir(run)
    run.add_argument(
        "--volume-root",
        action="append",
        default=None,
        metavar="DIR",
        help="folder that volume sources must lie beneath (repeatable; default: current folder)",
    )
    run.add_argument(
        "--grace",
        type=_seconds,
        default=DEFAULT_GRACE,
        help="seconds between SIGTERM and SIGKILL when the job is stopped (default: %(default)s)",
    )
    run.add_argument(
        "--stats", action="store_true", help="print the end reason and resource usage to stderr"
    )
    run.add_argument("words", nargs=argparse.REMAINDER, help="the command")

    demo = commands.add_parser("demo", help="run 'ls -lah /' in a job, then start and stop a sleep")
    _add_state_dir(demo)

    submit = commands.add_parser(
        "submit",
        help="submit a job to the server and print its id",
        usage="jupyter linuxworker submit [options] -- COMMAND [ARG...]",
    )
    add_spec_options(submit)
    _add_server_options(submit)
    submit.add_argument("words", nargs=argparse.REMAINDER, help="the command")

    for name, help_text in (
        ("status", "print a job's status, exit code and reason"),
        ("logs", "print a job's output byte for byte"),
        ("stop", "stop a job (SIGTERM, then SIGKILL after the grace period)"),
        ("delete", "delete an ended job and its output"),
    ):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("job_id", metavar="ID")
        _add_server_options(sub, json_output=name != "logs")
        if name == "logs":
            sub.add_argument(
                "-f", "--follow", action="store_true", help="follow until the job ends"
            )
            sub.add_argument("--offset", type=int, default=0, help="start at this byte")
        if name == "stop":
            sub.add_argument("--grace", type=_seconds, help="seconds before SIGKILL")

    listing = commands.add_parser("list", help="list your jobs, newest first")
    listing.add_argument("--status", help="only jobs with this status, such as RUNNING")
    listing.add_argument("--limit", type=int, default=50, help="at most this many (0: all)")
    _add_server_options(listing)

    images = commands.add_parser("images", help="list the server's images, or manage local ones")
    _add_server_options(images)
    _add_state_dir(images)
    image_commands = images.add_subparsers(dest="images_command")
    image_commands.add_parser("list", help="list the images in the local state folder")
    image_commands.add_parser(
        "build-default", help="build the default image from Debian's busybox-static"
    )
    importer = image_commands.add_parser("import", help="import a root filesystem tarball")
    importer.add_argument("name")
    importer.add_argument("tarball")
    importer.add_argument("--replace", action="store_true", help="replace an image of that name")
    deleter = image_commands.add_parser("delete", help="delete an image")
    deleter.add_argument("name")
    return parser


def _client(options: argparse.Namespace) -> Client:
    client = Client(options.url, options.token)
    if client.server.note:
        _error(client.server.note)
    return client


def _dispatch(parser: argparse.ArgumentParser, options: argparse.Namespace) -> int:
    images_command = getattr(options, "images_command", None)
    local = options.command in ("run", "demo") or images_command
    if local and (options.url or options.token):
        name = f"images {images_command}" if images_command else options.command
        parser.error(
            f"{name}: --url and --token are for the commands that call a server; "
            f"{name} uses the engine on this machine, so leave them out"
        )
    if options.command in ("run", "submit"):
        command = command_from_words(options.words)
        if not command:
            parser.error(
                f"{options.command}: missing COMMAND; usage: jupyter linuxworker "
                f"{options.command} [options] -- COMMAND [ARG...]"
            )
        spec = spec_from_options(options, command)
        if options.command == "submit":
            return cli_remote.submit(_client(options), options, spec)
        JobSpec.from_dict(spec)  # checks the spec before any state folder is touched
        return asyncio.run(cli_local.run_job(options, spec))
    if options.command == "demo":
        return asyncio.run(cli_local.demo(options))
    if options.command == "images":
        if options.images_command:
            return cli_local.manage_images(options)
        return cli_remote.images(_client(options), options)
    handler = REMOTE_COMMANDS[options.command]
    return handler(_client(options), options)


# The shell's code for a command ended by SIGPIPE.
EXIT_BROKEN_PIPE: Final = 128 + signal.SIGPIPE


def main(argv: Sequence[str] | None = None) -> int:
    """Run `jupyter linuxworker` with ``argv``; return the exit code."""
    parser = build_parser()
    options = parser.parse_args(argv)
    logging.basicConfig(
        level=options.log_level.upper(), format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return _dispatch(parser, options)
    except SpecError as error:
        _error(describe_spec_error(error.field, str(error)))
        return EXIT_USAGE
    except LinuxWorkerError as error:
        if error.field == "url":
            # A server URL that names no server is a bad value, as a bad option is.
            _error(f"--url: {error}" if getattr(options, "url", None) else error)
            return EXIT_USAGE
        _error(describe_spec_error(error.field, str(error)))
        return cli_remote.exit_code_of_error(error)
    except ImageError as error:
        _error(str(error))
        return EXIT_USAGE
    except PermissionError as error:
        _error(f"{error}; running jobs on this machine needs root")
        return cli_local.EXIT_ENGINE_ERROR
    except BrokenPipeError:
        # The reader of stdout has gone, as `| head` does: stop quietly, as other command line
        # tools do. stdout is pointed at /dev/null so that flushing at exit fails no more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OutputWriteError as error:
        # The same for the bytes still buffered, which could not be written either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        _error(error)
        return cli_remote.EXIT_ERROR


def _error(message: Any) -> None:
    sys.stderr.write(f"jupyter linuxworker: {message}\n")


if __name__ == "__main__":
    sys.exit(main())
