"""Writing a job's output to the command line's standard output and error."""

from __future__ import annotations

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
        while view:
            view = view[os.write(target.fileno(), view) :]
    except BrokenPipeError:
        raise
    except OSError as error:
        raise OutputWriteError(f"cannot write the output to {name}: {error}") from None
