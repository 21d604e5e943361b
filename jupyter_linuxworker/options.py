"""The job spec options shared by the command line and the magics: one name for each field."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, Final

from .sandbox.spec import SpecError

# Spec field -> the option that sets it, so that errors name what the user typed.
OPTION_OF_FIELD: Final = {
    "image": "--image",
    "env": "--env",
    "workdir": "--workdir",
    "name": "--name",
    "volumes": "--volume",
    "timeout": "--timeout",
    "output_cap": "--output-cap",
    "memory": "--memory",
    "cpus": "--cpus",
    "cpu_weight": "--cpu-weight",
    "pids": "--pids",
    "disk": "--disk",
    "io_read_bps": "--io-read",
    "io_write_bps": "--io-write",
    "io_read_iops": "--io-read-iops",
    "io_write_iops": "--io-write-iops",
    "io_devices": "--io-device",
    "network": "--network",
    "status": "--status",
    "offset": "--offset",
    "limit": "--limit",
    "grace": "--grace",
}


def add_spec_options(parser: argparse.ArgumentParser) -> None:
    """Add the options that set a job spec's fields."""
    parser.add_argument(
        "--image", help="image to run in (default: the server's default image; 'default' for run)"
    )
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
    parser.add_argument("--network", help="the job's network: 'none', only loopback (the default)")
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


def spec_from_options(options: argparse.Namespace, command: Sequence[str] | str) -> dict[str, Any]:
    """Return the spec fields that ``options`` set, with ``command``; unset fields are left out."""
    env: dict[str, str] = {}
    for item in options.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SpecError("env", item, "expected NAME=VALUE")
        env[name] = value
    data: dict[str, Any] = {
        "command": command if isinstance(command, str) else list(command),
        "image": options.image,
        "env": env or None,
        "workdir": options.workdir,
        "name": options.name,
        "volumes": list(options.volume) or None,
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
        "io_devices": list(options.io_device) or None,
        "network": options.network,
    }
    return {key: value for key, value in data.items() if value is not None}


def describe_spec_error(field: str | None, message: str) -> str:
    """Return ``message`` with the spec field replaced by the option that sets it."""
    option = OPTION_OF_FIELD.get(field or "")
    if option and field and message.startswith(f"{field}: "):
        return f"{option}: {message[len(field) + 2 :]}"
    return message


def command_from_words(words: Sequence[str]) -> str | list[str]:
    """Return one word as a shell command line, several as an argv (a leading '--' is dropped)."""
    words = list(words)
    if words and words[0] == "--":
        words = words[1:]
    if len(words) == 1:
        return words[0]
    return words
