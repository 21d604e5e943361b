"""The %%linuxjob cell magic and the %linuxjob line magics.

Load them with ``%load_ext jupyter_linuxworker``. Example::

    %%linuxjob --memory 256M --timeout 1m
    echo "hello from $(hostname)"
    ls -lah /

The cell returns at once with a live view of the job. With ``--wait`` it streams the output as
plain text instead and returns when the job ends, for terminals, nbconvert and papermill.
"""

from __future__ import annotations

import argparse
import codecs
import shlex
import sys
from collections.abc import Callable
from typing import Any, Final, cast

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import MagicArgumentParser
from IPython.display import display as _display

from .client import Client, Job, LinuxWorkerError
from .options import add_spec_options, describe_spec_error, spec_from_options

DEFAULT_INTERRUPT_GRACE: Final = 1.0
LINE_COMMANDS: Final = ("list", "status", "logs", "stop", "images", "connect")
LINE_HELP: Final = """\
%%linuxjob [options]     run the cell's body as a shell script in a job
%linuxjob list           your jobs, with a Stop button each (--status S, --limit N)
%linuxjob status ID      the job's status, exit code and reason
%linuxjob logs ID        the job's output
%linuxjob stop ID        stop the job
%linuxjob images         the images jobs can run in
%linuxjob connect URL [TOKEN]
                         use the linuxworker API of another Jupyter server
"""


# IPython's display() and MagicArgumentParser carry no type hints.
display = cast(Callable[..., None], _display)
_make_parser = cast(Callable[..., MagicArgumentParser], MagicArgumentParser)


class LinuxJobFailed(RuntimeError):
    """A job run with ``--wait`` did not complete."""

    def _render_traceback_(self) -> list[str]:
        # IPython shows this in place of a traceback: the job failed, not the magic's code.
        return [f"LinuxJobFailed: {self}"]


CELL_DESCRIPTION: Final = (
    "Run the cell as a shell script in a Linux job. The options set the job's fields, as in "
    "`jupyter linuxworker submit`."
)


def _cell_parser() -> MagicArgumentParser:
    """Return the parser of %%linuxjob options; it raises UsageError on a bad option."""
    parser = _make_parser(prog="%%linuxjob", description=CELL_DESCRIPTION, add_help=False)
    _add_cell_options(parser)
    return parser


def _cell_help() -> str:
    # MagicArgumentParser formats help for docstrings (a '::' block, another '%'); a plain
    # parser with the same options formats it for reading.
    parser = argparse.ArgumentParser(
        prog="%%linuxjob",
        description=CELL_DESCRIPTION,
        add_help=False,
        usage="%%%%linuxjob [options]   (the cell body is the script)",
    )
    _add_cell_options(parser)
    return parser.format_help()


def _add_cell_options(parser: argparse.ArgumentParser) -> None:
    add_spec_options(parser)
    parser.add_argument(
        "--wait", action="store_true", help="stream the output as text and return when the job ends"
    )
    parser.add_argument(
        "--no-raise",
        action="store_true",
        help="with --wait, do not raise when the job does not complete",
    )
    parser.add_argument("--out", metavar="VAR", help="also store the job handle in VAR")
    parser.add_argument(
        "--grace",
        type=float,
        default=DEFAULT_INTERRUPT_GRACE,
        help="with --wait, seconds before SIGKILL when an interrupt stops the job",
    )


def _line_parser() -> MagicArgumentParser:
    parser = _make_parser(
        prog="%linuxjob",
        add_help=False,
        description="Manage jobs: " + ", ".join(LINE_COMMANDS) + ".",
    )
    parser.add_argument("command", choices=LINE_COMMANDS)
    parser.add_argument("arguments", nargs="*")
    parser.add_argument("--status", help="with list: only jobs with this status")
    parser.add_argument("--limit", type=int, default=20, help="with list: at most this many")
    return parser


@magics_class
class LinuxJobMagics(Magics):
    """%%linuxjob runs a cell in a job; %linuxjob list|status|logs|stop|images|connect."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        """Return the client of the server found (or connected to) for this kernel."""
        if self._client is None:
            try:
                self._client = Client()
            except LinuxWorkerError as error:
                raise UsageError(f"{error}; or run: %linuxjob connect URL TOKEN") from None
        return self._client

    @line_cell_magic
    def linuxjob(self, line: str, cell: str | None = None) -> Any:
        """Run the cell in a job (%%linuxjob [options]), or manage jobs (%linuxjob COMMAND).

        Line commands: list, status ID, logs ID, stop ID, images, connect URL [TOKEN].
        Run `%linuxjob --help` for the commands and the cell options.
        """
        if cell is None:
            return self._line(line)
        return self._cell(line, cell)

    # -- %%linuxjob --------------------------------------------------------------------------

    def _cell(self, line: str, cell: str) -> Any:
        parser = _cell_parser()
        if line.strip() in ("-h", "--help"):
            print(_cell_help())
            return None
        options = parser.parse_args(shlex.split(line))
        try:
            spec = spec_from_options(options, cell)
            job = self.client.submit(**spec)
        except LinuxWorkerError as error:
            raise UsageError(describe_spec_error(error.field, str(error))) from None

        if options.out and self.shell is not None:
            self.shell.user_ns[options.out] = job
        if options.wait:
            self._wait(job, options.grace, raise_on_failure=not options.no_raise)
            return None

        # The view follows the job from the browser, so the kernel stays free.
        from .widgets import JobView

        display(JobView.for_job(job))
        return job

    def _wait(self, job: Job, grace: float, raise_on_failure: bool) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        try:
            for chunk in self.client.follow(job.id):
                sys.stdout.write(decoder.decode(chunk))
                sys.stdout.flush()
            sys.stdout.write(decoder.decode(b"", final=True))
        except KeyboardInterrupt:
            job.stop(grace)
            print(f"\nStopped job {job.id[:12]}: {job.status}", file=sys.stderr)
            raise
        job.refresh()
        if job.status == "COMPLETED":
            return
        message = f"job {job.id[:12]} {job.status}: {job.data.get('detail')}"
        if raise_on_failure:
            raise LinuxJobFailed(message)
        print(message, file=sys.stderr)

    # -- %linuxjob ---------------------------------------------------------------------------

    def _line(self, line: str) -> Any:
        if line.strip() in ("", "-h", "--help", "help"):
            print(LINE_HELP)
            print(_cell_help())
            return None
        options = _line_parser().parse_args(shlex.split(line))
        arguments = options.arguments
        try:
            if options.command == "connect":
                if not arguments:
                    raise UsageError("usage: %linuxjob connect URL [TOKEN]")
                self._client = Client(arguments[0], arguments[1] if len(arguments) > 1 else None)
                self.client.images()
                print(f"Connected to {self.client.server.url}")
                return None
            if options.command == "list":
                from .widgets import JobList

                display(JobList(status=options.status or "", limit=options.limit))
                return None
            if options.command == "images":
                return [image["name"] for image in self.client.images()]
            if len(arguments) != 1:
                raise UsageError(f"usage: %linuxjob {options.command} ID")
            job_id = arguments[0]
            if options.command == "status":
                job = self.client.job(job_id)
                print(job.summary(), end="")
                return job
            if options.command == "logs":
                data = self.client.output(job_id)
                sys.stdout.write(data.decode("utf-8", errors="replace"))
                return None
            return Job(self.client, self.client.stop(job_id))
        except LinuxWorkerError as error:
            raise UsageError(str(error)) from None
