"""A minimal inotify binding: the kernel reports changes to a job's files, so no code polls."""

from __future__ import annotations

import ctypes
import os
import struct
from typing import Final

IN_MODIFY: Final = 0x00000002
IN_CLOSE_WRITE: Final = 0x00000008
IN_MOVED_TO: Final = 0x00000080
IN_CREATE: Final = 0x00000100
IN_DELETE_SELF: Final = 0x00000400
IN_IGNORED: Final = 0x00008000
IN_NONBLOCK: Final = 0o4000
IN_CLOEXEC: Final = 0o2000000
JOB_DIR_EVENTS: Final = IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE | IN_DELETE_SELF
_EVENT_HEADER: Final = struct.Struct("iIII")
_READ_SIZE: Final = 64 * 1024

_libc = ctypes.CDLL(None, use_errno=True)


class Inotify:
    """One inotify instance; watches are folders, events are reported per watch descriptor."""

    def __init__(self) -> None:
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            error = ctypes.get_errno()
            raise OSError(
                error,
                f"inotify_init1 failed: {os.strerror(error)}; "
                "raise fs.inotify.max_user_instances if the limit was reached",
            )
        self.fd: int = fd

    def add_watch(self, path: str, mask: int = JOB_DIR_EVENTS) -> int:
        """Watch ``path``; return the watch descriptor."""
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(path), ctypes.c_uint32(mask))
        if wd < 0:
            error = ctypes.get_errno()
            raise OSError(error, f"inotify watch on {path} failed: {os.strerror(error)}")
        return int(wd)

    def remove_watch(self, wd: int) -> None:
        """Stop watching ``wd``; a watch the kernel already dropped is ignored."""
        _libc.inotify_rm_watch(self.fd, ctypes.c_int(wd))

    def read_events(self) -> list[tuple[int, int]]:
        """Return the pending (watch descriptor, mask) pairs without blocking."""
        try:
            data = os.read(self.fd, _READ_SIZE)
        except BlockingIOError:
            return []
        events = []
        offset = 0
        while offset + _EVENT_HEADER.size <= len(data):
            wd, mask, _cookie, name_length = _EVENT_HEADER.unpack_from(data, offset)
            events.append((wd, mask))
            offset += _EVENT_HEADER.size + name_length
        return events

    def close(self) -> None:
        """Close the instance, dropping every watch."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
