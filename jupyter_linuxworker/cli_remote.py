"""Commands that call a running Jupyter server: submit, status, logs, stop, list, delete, images."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Final

from .cli_output import write_output
from .client import Client, Job, LinuxWorkerError

# Exit codes a script can test; the README lists them.
EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_INVALID: Final = 2
EXIT_NOT_FOUND: Final = 3
EXIT_CONFLICT: Final = 4
EXIT_UNREACHABLE: Final = 5
EXIT_OF_STATUS: Final = {
    400: EXIT_INVALID,
    403: EXIT_UNREACHABLE,
    404: EXIT_NOT_FOUND,
    409: EXIT_CONFLICT,
    429: EXIT_CONFLICT,
    0: EXIT_UNREACHABLE,
}


def exit_code_of_error(error: LinuxWorkerError) -> int:
    """Return the command's exit code for an API error."""
    return EXIT_OF_STATUS.get(error.status, EXIT_ERROR)


def _print(text: str, end: str = "\n") -> None:
    """Print ``text`` as print() does, with a refused write raised as OutputWriteError."""
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is None:
        # A text-only stdout, such as a notebook's, takes text.
        print(text, end=end)
        return
    write_output(buffer, (text + end).encode(sys.stdout.encoding or "utf-8", "replace"))


def _print_json(data: Any) -> None:
    _print(json.dumps(data, indent=2))


def _print_status(client: Client, job: dict[str, Any]) -> None:
    _print(Job(client, job).summary(), end="")


def submit(client: Client, options: argparse.Namespace, spec: dict[str, Any]) -> int:
    """Submit a job and print its id."""
    job = client.submit(**spec)
    if options.json:
        _print_json(job.data)
    else:
        _print(f"Id of submitted job: {job.id}")
    return EXIT_OK


def status(client: Client, options: argparse.Namespace) -> int:
    """Print a job's status, exit code and reason."""
    job = client.get(options.job_id)
    if options.json:
        _print_json(job)
    else:
        _print_status(client, job)
    return EXIT_OK


def logs(client: Client, options: argparse.Namespace) -> int:
    """Write a job's output byte for byte; with -f, follow it until the job ends."""
    out = sys.stdout.buffer
    if options.follow:
        for chunk in client.follow(options.job_id, options.offset):
            write_output(out, chunk)
    else:
        write_output(out, client.output(options.job_id, options.offset))
    return EXIT_OK


def stop(client: Client, options: argparse.Namespace) -> int:
    """Stop a job and print how it ended."""
    job = client.stop(options.job_id, options.grace)
    if options.json:
        _print_json(job)
    else:
        _print_status(client, job)
    return EXIT_OK


def delete(client: Client, options: argparse.Namespace) -> int:
    """Delete an ended job."""
    client.delete(options.job_id)
    if options.json:
        _print_json({"id": options.job_id, "deleted": True})
    else:
        _print(f"Deleted job {options.job_id}")
    return EXIT_OK


def list_jobs(client: Client, options: argparse.Namespace) -> int:
    """Print the user's jobs, newest first."""
    jobs = []
    for job in client.jobs(options.status):
        jobs.append(job)
        if options.limit and len(jobs) >= options.limit:
            break
    if options.json:
        _print_json(jobs)
        return EXIT_OK
    _print(f"{'ID':<12}  {'STATUS':<9}  {'EXIT':>4}  {'CREATED':<24}  NAME")
    for job in jobs:
        code = "" if job["exit_code"] is None else str(job["exit_code"])
        created = job["created_at"]
        _print(f"{job['id'][:12]:<12}  {job['status']:<9}  {code:>4}  {created:<24}  {job['name']}")
    return EXIT_OK


def images(client: Client, options: argparse.Namespace) -> int:
    """Print the images the server offers."""
    found = client.images()
    if options.json:
        _print_json(found)
        return EXIT_OK
    for image in found:
        _print(f"{image['name']}\t{image['files']} files\t{image['size']} bytes\t{image['source']}")
    return EXIT_OK
