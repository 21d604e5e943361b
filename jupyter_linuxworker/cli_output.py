"""Writing a job's output to the command line's standard output and error."""

from __future__ import annotations

import io
import os
from typing import BinaryIO


class OutputWriteError(Exception):
    """A standard stream refused the job's output, as a full disk does."""


def write_output(target: BinaryIO, data: bytes, name: str = "standard output") -> None:
    """Write all of ``data`` to ``target``'s descriptor; a refused write raises OutputWriteError.

    The bytes bypass the buffer: Python's buffered writer can lose the error of a large write
    to a pipe whose reader has gone. BrokenPipeError passes through, since a reader that went
    away is not an error of the output.
    """
    view = memoryview(data)
    try:
        target.flush()
        try:
            descriptor = target.fileno()
        except io.UnsupportedOperation:
            # A stream in memory, as a test's captured output is, has no descriptor to bypass.
            target.write(data)
            target.flush()
            return
        while view:
            view = view[os.write(descriptor, view) :]
    except BrokenPipeError:
        raise
    except OSError as error:
        raise OutputWriteError(f"cannot write the output to {name}: {error}") from None
