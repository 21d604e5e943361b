"""The files in a job's folder that the manager and the supervisor exchange.

The manager writes ``launch.json`` and ``stop.json``; the supervisor writes ``state.json``.
Every file is replaced atomically (write, fsync, rename), so a reader sees either the old or the
new content, also after a crash.
"""

from __future__ import annotations

import json
import os
from typing import Any, Final

LAUNCH_FILE: Final = "launch.json"
STOP_FILE: Final = "stop.json"
STATE_FILE: Final = "state.json"
SUPERVISOR_LOG: Final = "supervisor.log"


def write_json(path: str, data: dict[str, Any], durable: bool = True) -> None:
    """Replace ``path`` with ``data`` as JSON: write a temporary file, fsync, rename.

    Without ``durable`` the fsync is left out: the rename still keeps readers from seeing a
    half-written file, but a power loss may lose the new content. That suits files that
    matter only while the job's processes exist, which a power loss ends anyway.
    """
    temporary = f"{path}.{os.getpid()}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    try:
        os.write(fd, json.dumps(data).encode())
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(temporary, path)


def read_json(path: str) -> dict[str, Any] | None:
    """Return the JSON object in ``path``, or None when the file does not exist."""
    try:
        with open(path, "rb") as file:
            data = json.loads(file.read())
    except FileNotFoundError:
        return None
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not contain a JSON object")
    return data


def process_start_ticks(pid: int) -> int | None:
    """Return when ``pid`` started, in clock ticks since boot; None if it is gone or a zombie.

    A pid and its start time together name one process, even after the pid is reused.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name in field 2 may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def process_is(pid: int, start_ticks: int) -> bool:
    """Return whether ``pid`` still names the process that started at ``start_ticks``."""
    return process_start_ticks(pid) == start_ticks


def redirect_output(job_dir: str) -> None:
    """Point stdin at /dev/null and append stdout and stderr to the job's supervisor log."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    log_path = os.path.join(job_dir, SUPERVISOR_LOG)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
