"""Parse sizes, rates, CPU counts and durations written the way people write them."""

from __future__ import annotations

import math
import re
from typing import Final

# Binary multiples, as Docker, Kubernetes' Mi/Gi and the kernel's own tools use them: 1K = 1024.
_SIZE_MULTIPLIERS: Final = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_SIZE_PATTERN: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)
_RATE_SUFFIX: Final = re.compile(r"\s*(/s|/sec|ps)\s*$", re.IGNORECASE)
_DURATION_MULTIPLIERS: Final = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "ms": 0.001}
_DURATION_PATTERN: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$", re.IGNORECASE)

SIZE_HELP: Final = "a number of bytes, or a number with K, M, G or T (1K = 1024), such as 256M"
DURATION_HELP: Final = "a number of seconds, or a number with ms, s, m or h, such as 90s or 1.5h"


class UnitError(ValueError):
    """A value that is not a size, rate, count or duration; the message states what is allowed."""


def parse_size(value: str | int | float) -> int:
    """Return the number of bytes in ``value`` (``256M``, ``1.5G``, ``4096``)."""
    if isinstance(value, bool):
        raise UnitError(f"expected {SIZE_HELP}, got {value!r}")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0 or value != int(value):
            raise UnitError(f"expected a whole, non-negative number of bytes, got {value!r}")
        return int(value)
    match = _SIZE_PATTERN.match(value)
    if match is None:
        raise UnitError(f"expected {SIZE_HELP}, got {value!r}")
    number, suffix = match.groups()
    return int(float(number) * _SIZE_MULTIPLIERS[suffix.upper()])


def parse_rate(value: str | int | float) -> int:
    """Return bytes (or operations) per second in ``value`` (``10M``, ``10M/s``, ``500``)."""
    if isinstance(value, str):
        value = _RATE_SUFFIX.sub("", value)
    return parse_size(value)


def parse_duration(value: str | int | float) -> float:
    """Return the number of seconds in ``value`` (``30``, ``90s``, ``5m``, ``250ms``)."""
    if isinstance(value, bool):
        raise UnitError(f"expected {DURATION_HELP}, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION_PATTERN.match(value)
        if match is None:
            raise UnitError(f"expected {DURATION_HELP}, got {value!r}")
        number, suffix = match.groups()
        seconds = float(number) * _DURATION_MULTIPLIERS[(suffix or "").lower()]
    if not math.isfinite(seconds) or seconds < 0:
        raise UnitError(f"expected {DURATION_HELP}, got {value!r}")
    return seconds


def format_size(size: int) -> str:
    """Format ``size`` bytes with the largest binary unit that keeps it readable (``16.0M``)."""
    for suffix in ("T", "G", "M", "K"):
        multiplier = _SIZE_MULTIPLIERS[suffix]
        if size >= multiplier:
            return f"{size / multiplier:.1f}{suffix}"
    return f"{size}B"
