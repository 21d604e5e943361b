"""Job specs: what a job runs, where, with which limits, and the checks on every field."""

from __future__ import annotations

import math
import os
import posixpath
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Final

from .units import (
    DURATION_HELP,
    SIZE_HELP,
    UnitError,
    parse_duration,
    parse_rate,
    parse_size,
)

DEFAULT_IMAGE: Final = "default"
DEFAULT_WORKDIR: Final = "/root"
DEFAULT_OUTPUT_CAP: Final = 128 * 1024**2
MAX_OUTPUT_CAP: Final = 64 * 1024**3
MAX_COMMAND_BYTES: Final = 1024**2
MAX_NAME_LENGTH: Final = 100
MAX_ENV_ENTRIES: Final = 1000
MAX_VOLUMES: Final = 64
MAX_TIMEOUT_SECONDS: Final = 30 * 24 * 3600.0
MAX_CPU_WEIGHT: Final = 10_000
MIN_MEMORY: Final = 8 * 1024**2  # the job's init needs a few MiB of its own
MIN_DISK: Final = 1024**2
MIN_CPUS: Final = 0.01  # the kernel's smallest CFS quota, 1 ms per 100 ms period
NETWORK_MODES: Final = ("none",)
DEFAULT_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

IMAGE_NAME_PATTERN: Final = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_ENV_NAME_PATTERN: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Container paths the runtime mounts itself; a volume on them would hide or replace them.
_RESERVED_DESTINATIONS: Final = ("/proc", "/dev", "/sys")


MISSING: Final = object()


class SpecError(ValueError):
    """An invalid job spec field: ``field`` names it, and the message states what is allowed."""

    def __init__(self, field_name: str, value: object, allowed: str) -> None:
        self.field = field_name
        self.value = value
        self.allowed = allowed
        if value is MISSING:
            super().__init__(f"{field_name}: missing: {allowed}")
            return
        shown = repr(value)
        if len(shown) > 200:
            shown = shown[:200] + "..."
        super().__init__(f"{field_name}: invalid value {shown}: {allowed}")


@dataclass(frozen=True)
class Volume:
    """A host folder bind-mounted into the job at ``dest``."""

    source: str
    dest: str
    read_only: bool = False

    @classmethod
    def parse(cls, text: str) -> Volume:
        """Parse ``SRC:DEST`` or ``SRC:DEST:ro`` (``:rw`` is accepted too)."""
        parts = text.split(":")
        if len(parts) == 3 and parts[2] in ("ro", "rw"):
            return cls(parts[0], parts[1], parts[2] == "ro")
        if len(parts) == 2:
            return cls(parts[0], parts[1])
        raise SpecError("volumes", text, "use SRC:DEST or SRC:DEST:ro with absolute paths")

    def __str__(self) -> str:
        return f"{self.source}:{self.dest}" + (":ro" if self.read_only else "")


@dataclass(frozen=True)
class Limits:
    """Resource limits of one job; ``None`` means the manager's default."""

    memory: int | None = None
    cpus: float | None = None
    cpu_weight: int | None = None
    pids: int | None = None
    io_read_bps: int | None = None
    io_write_bps: int | None = None
    io_read_iops: int | None = None
    io_write_iops: int | None = None
    disk: int | None = None


@dataclass(frozen=True)
class JobSpec:
    """What one job runs. Build it with :meth:`from_dict` to get every field checked."""

    command: str | tuple[str, ...]
    image: str = DEFAULT_IMAGE
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = DEFAULT_WORKDIR
    name: str = ""
    timeout: float | None = None
    output_cap: int = DEFAULT_OUTPUT_CAP
    volumes: tuple[Volume, ...] = ()
    network: str = "none"
    limits: Limits = field(default_factory=Limits)
    io_devices: tuple[str, ...] = ()

    @property
    def argv(self) -> list[str]:
        """Return the argv that the container's init executes."""
        if isinstance(self.command, str):
            return ["/bin/sh", "-c", self.command]
        return list(self.command)

    @property
    def environ(self) -> dict[str, str]:
        """Return the job's environment: the defaults, overridden by the spec's ``env``."""
        base = {"PATH": DEFAULT_PATH, "HOME": "/root", "TERM": "dumb", "LANG": "C.UTF-8"}
        base.update(self.env)
        return base

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict that :meth:`from_dict` turns back into this spec."""
        data = asdict(self)
        data["command"] = self.command if isinstance(self.command, str) else list(self.command)
        data["volumes"] = [str(volume) for volume in self.volumes]
        data["limits"] = {key: value for key, value in data["limits"].items() if value is not None}
        data["io_devices"] = list(self.io_devices)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        """Check every field of ``data`` and build a spec; raise SpecError on the first bad one."""
        if not isinstance(data, dict):
            raise SpecError("spec", data, "expected an object with at least a 'command' field")
        known = {f.name for f in fields(cls)} | {f.name for f in fields(Limits)}
        for key in data:
            if key not in known:
                raise SpecError(
                    key, data[key], f"unknown field; known fields: {', '.join(sorted(known))}"
                )

        raw_limits = data.get("limits")
        if raw_limits is not None and not isinstance(raw_limits, dict):
            raise SpecError("limits", raw_limits, "expected an object of limit fields")
        limits_data = dict(raw_limits or {})
        # Limits may also be given at the top level, as the command line and magics do.
        for limit_field in fields(Limits):
            if limit_field.name in data and data[limit_field.name] is not None:
                limits_data[limit_field.name] = data[limit_field.name]

        command = _check_command(data.get("command"))
        return cls(
            command=command,
            image=_check_image(data.get("image", DEFAULT_IMAGE)),
            env=_check_env(_or_default(data, "env", {})),
            workdir=_check_container_path("workdir", data.get("workdir", DEFAULT_WORKDIR)),
            name=_check_name(data.get("name"), command),
            timeout=_check_timeout(data.get("timeout")),
            output_cap=_check_output_cap(data.get("output_cap")),
            volumes=_check_volumes(_or_default(data, "volumes", ())),
            network=_check_network(data.get("network", "none")),
            limits=_check_limits(limits_data),
            io_devices=_check_io_devices(_or_default(data, "io_devices", ())),
        )


def _or_default(data: dict[str, Any], key: str, default: object) -> object:
    """Return ``data[key]``, or ``default`` when it is missing or null (not when it is empty)."""
    value = data.get(key)
    return default if value is None else value


def _check_command(value: object) -> str | tuple[str, ...]:
    if value is None:
        raise SpecError("command", MISSING, "give a shell command string or an argv list")
    if isinstance(value, str):
        if not value.strip():
            raise SpecError("command", value, "expected a non-empty shell command")
        encoded_size = len(value.encode("utf-8", "surrogateescape"))
        if "\0" in value or encoded_size > MAX_COMMAND_BYTES:
            raise SpecError(
                "command",
                value,
                f"expected a shell command of at most {MAX_COMMAND_BYTES} bytes, no NUL",
            )
        return value
    if isinstance(value, list | tuple) and value and all(isinstance(arg, str) for arg in value):
        if not value[0]:
            raise SpecError("command", value, "the program name (the first item) is empty")
        if any("\0" in arg for arg in value):
            raise SpecError("command", value, "expected an argv list without NUL bytes")
        return tuple(value)
    raise SpecError("command", value, "expected a shell command string or a non-empty argv list")


def _check_image(value: object) -> str:
    if not isinstance(value, str) or not IMAGE_NAME_PATTERN.fullmatch(value):
        raise SpecError(
            "image", value, "expected an image name of lowercase letters, digits, '.', '_' or '-'"
        )
    return value


def _check_env(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        raise SpecError("env", value, "expected an object of NAME: value strings")
    if len(value) > MAX_ENV_ENTRIES:
        raise SpecError("env", f"{len(value)} entries", f"at most {MAX_ENV_ENTRIES} entries")
    for key, item in value.items():
        if not isinstance(key, str) or not _ENV_NAME_PATTERN.match(key):
            raise SpecError(
                "env", key, "a variable name is letters, digits and '_', not starting with a digit"
            )
        if not isinstance(item, str) or "\0" in item:
            raise SpecError(f"env.{key}", item, "expected a string without NUL bytes")
    return dict(value)


def _check_container_path(field_name: str, value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise SpecError(field_name, value, "expected an absolute path inside the container")
    if ".." in value.split("/"):
        raise SpecError(field_name, value, "'..' is not allowed in a container path")
    return posixpath.normpath(value)


def _check_name(value: object, command: str | tuple[str, ...]) -> str:
    if value is None or value == "":
        words = command.split() if isinstance(command, str) else list(command)
        return posixpath.basename(words[0])[:MAX_NAME_LENGTH] if words else "job"
    if not isinstance(value, str) or len(value) > MAX_NAME_LENGTH or not value.isprintable():
        raise SpecError(
            "name", value, f"expected printable text of at most {MAX_NAME_LENGTH} characters"
        )
    return value


def _check_timeout(value: object) -> float | None:
    if value is None:
        return None
    try:
        seconds = parse_duration(value)  # type: ignore[arg-type]
    except (UnitError, TypeError):
        raise SpecError("timeout", value, f"expected {DURATION_HELP}") from None
    if seconds <= 0 or seconds > MAX_TIMEOUT_SECONDS:
        raise SpecError(
            "timeout", value, f"expected more than 0 and at most {MAX_TIMEOUT_SECONDS:.0f} seconds"
        )
    return seconds


def _check_output_cap(value: object) -> int:
    if value is None:
        return DEFAULT_OUTPUT_CAP
    try:
        cap = parse_size(value)  # type: ignore[arg-type]
    except (UnitError, TypeError):
        raise SpecError("output_cap", value, f"expected {SIZE_HELP}") from None
    if cap < 1 or cap > MAX_OUTPUT_CAP:
        raise SpecError("output_cap", value, f"expected 1 byte to {MAX_OUTPUT_CAP // 1024**3}G")
    return cap


def _check_volumes(value: object) -> tuple[Volume, ...]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise SpecError("volumes", value, "expected a list of SRC:DEST[:ro] strings")
    if len(value) > MAX_VOLUMES:
        raise SpecError("volumes", f"{len(value)} volumes", f"at most {MAX_VOLUMES} volumes")
    volumes: list[Volume] = []
    for item in value:
        if isinstance(item, Volume):
            volume = item
        elif isinstance(item, str):
            volume = Volume.parse(item)
        else:
            raise SpecError("volumes", item, "expected SRC:DEST or SRC:DEST:ro")
        if not os.path.isabs(volume.source) or "\0" in volume.source:
            raise SpecError("volumes", str(volume), "the source must be an absolute host path")
        dest = _check_container_path("volumes", volume.dest)
        if dest == "/" or any(
            dest == p or dest.startswith(p + "/") for p in _RESERVED_DESTINATIONS
        ):
            raise SpecError(
                "volumes",
                str(volume),
                "the destination must not be /, or lie under /proc, /dev or /sys",
            )
        if any(other.dest == dest for other in volumes):
            raise SpecError("volumes", str(volume), "two volumes have the same destination")
        volumes.append(Volume(volume.source, dest, volume.read_only))
    return tuple(volumes)


def _check_io_devices(value: object) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise SpecError(
            "io_devices", value, "expected a list of block device paths such as /dev/sda"
        )
    for item in value:
        if not isinstance(item, str) or not item.startswith("/dev/"):
            raise SpecError("io_devices", item, "expected a block device path such as /dev/sda")
    return tuple(value)


def _check_network(value: object) -> str:
    if value not in NETWORK_MODES:
        raise SpecError("network", value, f"expected one of: {', '.join(NETWORK_MODES)}")
    return str(value)


def _check_limits(data: dict[str, Any]) -> Limits:
    checked: dict[str, Any] = {}
    for name, value in data.items():
        if value is None:
            continue
        if name not in {f.name for f in fields(Limits)}:
            raise SpecError(f"limits.{name}", value, "unknown limit")
        checked[name] = _check_limit(name, value)
    return Limits(**checked)


def _check_limit(name: str, value: Any) -> int | float:
    if name == "cpus":
        try:
            cpus = float(value)
        except (TypeError, ValueError):
            cpus = math.nan
        host_cpus = os.cpu_count() or 1
        if isinstance(value, bool) or not math.isfinite(cpus) or not MIN_CPUS <= cpus <= host_cpus:
            message = f"expected a number of CPUs from {MIN_CPUS} to {host_cpus}, such as 0.5"
            raise SpecError(name, value, message)
        return cpus
    if name in ("cpu_weight", "pids"):
        top = MAX_CPU_WEIGHT if name == "cpu_weight" else 4_194_304
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise SpecError(name, value, f"expected a whole number from 1 to {top}")
        try:
            number = int(value)
        except ValueError:
            raise SpecError(name, value, f"expected a whole number from 1 to {top}") from None
        if not 1 <= number <= top:
            raise SpecError(name, value, f"expected a whole number from 1 to {top}")
        return number
    parser = parse_size if name in ("memory", "disk") else parse_rate
    try:
        amount = parser(value)
    except (UnitError, TypeError):
        unit = SIZE_HELP if name in ("memory", "disk") else SIZE_HELP + " per second"
        raise SpecError(name, value, f"expected {unit}") from None
    minimum = {"memory": MIN_MEMORY, "disk": MIN_DISK}.get(name, 1)
    if amount < minimum:
        shown = f"{minimum // 1024**2}M" if minimum >= 1024**2 else str(minimum)
        raise SpecError(name, value, f"expected at least {shown}")
    return amount
