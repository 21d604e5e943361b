"""Job spec checks and unit parsing: each bad field is named, with its value and what is allowed."""

from __future__ import annotations

import os

import pytest

from jupyter_linuxworker.sandbox.spec import DEFAULT_OUTPUT_CAP, JobSpec, SpecError, Volume
from jupyter_linuxworker.sandbox.units import UnitError, parse_duration, parse_rate, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("256M", 256 * 1024**2),
        ("1.5G", 1536 * 1024**2),
        ("10k", 10240),
        ("64MiB", 64 * 1024**2),
        ("2 GB", 2 * 1024**3),
        (1000, 1000),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "M", "-1M", "1.2.3", "12X", "1e9", True, 1.5])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(UnitError):
        parse_size(text)


def test_parse_rate_and_duration() -> None:
    assert parse_rate("10M/s") == 10 * 1024**2
    assert parse_rate("500") == 500
    assert parse_duration("90s") == 90.0
    assert parse_duration("1.5h") == 5400.0
    assert parse_duration("250ms") == 0.25
    assert parse_duration(3) == 3.0
    with pytest.raises(UnitError):
        parse_duration("soon")


def test_minimal_spec_defaults() -> None:
    spec = JobSpec.from_dict({"command": "echo hi"})
    assert spec.argv == ["/bin/sh", "-c", "echo hi"]
    assert spec.image == "default"
    assert spec.name == "echo"
    assert spec.workdir == "/root"
    assert spec.output_cap == DEFAULT_OUTPUT_CAP
    assert spec.timeout is None
    assert spec.environ["PATH"] == "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def test_spec_round_trip() -> None:
    data = {
        "command": ["ls", "-l"],
        "env": {"A": "1"},
        "timeout": "2m",
        "output_cap": "16M",
        "volumes": ["/srv/data:/data:ro"],
        "memory": "256M",
        "cpus": "0.5",
        "name": "listing",
    }
    spec = JobSpec.from_dict(data)
    assert spec.timeout == 120.0
    assert spec.limits.memory == 256 * 1024**2
    assert spec.limits.cpus == 0.5
    assert spec.volumes == (Volume("/srv/data", "/data", True),)
    assert JobSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(
    ("data", "field", "fragment"),
    [
        ({}, "command", "give a shell command string or an argv list"),
        ({"command": "  "}, "command", "non-empty"),
        ({"command": []}, "command", "non-empty argv"),
        ({"command": "x", "image": "../etc"}, "image", "lowercase letters"),
        ({"command": "x", "env": {"1A": "x"}}, "env", "variable name"),
        ({"command": "x", "env": {"A": 1}}, "env.A", "string"),
        ({"command": "x", "workdir": "relative"}, "workdir", "absolute path"),
        ({"command": "x", "workdir": "/a/../b"}, "workdir", "'..'"),
        ({"command": "x", "timeout": "soon"}, "timeout", "number of seconds"),
        ({"command": "x", "timeout": 0}, "timeout", "more than 0"),
        ({"command": "x", "output_cap": "lots"}, "output_cap", "such as 256M"),
        ({"command": "x", "volumes": ["a:b:c:d"]}, "volumes", "SRC:DEST"),
        ({"command": "x", "volumes": ["rel:/data"]}, "volumes", "absolute host path"),
        ({"command": "x", "volumes": ["/srv:/proc/x"]}, "volumes", "/proc, /dev or /sys"),
        ({"command": "x", "volumes": ["/a:/d", "/b:/d"]}, "volumes", "same destination"),
        ({"command": "x", "network": "host"}, "network", "none"),
        ({"command": "x", "memory": "lots"}, "memory", "such as 256M"),
        ({"command": "x", "cpus": "0"}, "cpus", "from 0.01"),
        ({"command": "x", "cpus": "0.005"}, "cpus", "from 0.01"),
        ({"command": "x", "pids": "many"}, "pids", "whole number"),
        ({"command": "x", "io_write_bps": "fast"}, "io_write_bps", "per second"),
        ({"command": "x", "colour": "red"}, "colour", "unknown field"),
    ],
)
def test_bad_field_is_named(data: dict[str, object], field: str, fragment: str) -> None:
    with pytest.raises(SpecError) as caught:
        JobSpec.from_dict(data)
    assert caught.value.field == field
    if data:
        assert str(caught.value).startswith(f"{field}: invalid value ")
    else:
        assert str(caught.value) == "command: missing: give a shell command string or an argv list"
    assert fragment in str(caught.value)


def test_cpus_above_host_rejected() -> None:
    too_many = (os.cpu_count() or 1) + 1
    with pytest.raises(SpecError, match=f"from 0.01 to {os.cpu_count()}"):
        JobSpec.from_dict({"command": "x", "cpus": too_many})
