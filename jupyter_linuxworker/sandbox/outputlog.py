"""A job's output log: raw bytes in arrival order, plus a side file of stderr and marker ranges.

The supervisor is the only writer. A range record is written before the bytes it covers, so a
reader that reads a byte can also read which stream it came from.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import struct
from collections.abc import Iterator
from typing import Final

from .syscalls import reserve_blocks

log = logging.getLogger(__name__)

LOG_NAME: Final = "output.log"
RANGES_NAME: Final = "output.ranges"
STDOUT: Final = 0
STDERR: Final = 1
MARKER: Final = 2
STREAM_NAMES: Final = {STDOUT: "stdout", STDERR: "stderr", MARKER: "marker"}
RANGE_RECORD: Final = struct.Struct("<QQB")
PIPE_CHUNK: Final = 1024 * 1024
PIPE_SIZE: Final = 1024 * 1024  # the buffer of the job's stdout and stderr pipes and the relay
# Past this size the log's blocks are allocated ahead of the bytes, RESERVE_CHUNK at a time,
# because writing into allocated blocks costs ext4 less CPU (BENCHMARKS.md gives the log
# writer's CPU time per GiB with and without). Small logs never pay for the extra call.
RESERVE_AFTER: Final = 1024 * 1024
RESERVE_CHUNK: Final = 8 * 1024 * 1024
TRUNCATION_MARKER: Final = (
    "[jupyter-linuxworker: output truncated at {cap} bytes, the job's output cap; "
    "later output was dropped]\n"
)
DISK_FULL_MARKER: Final = (
    "[jupyter-linuxworker: output stopped at {size} bytes, since {reason}; "
    "later output was dropped]\n"
)
# Errors of a write that the file system rejects for lack of room. The log stops there, as at
# the cap, and the job runs on, because the job did nothing wrong and its end must be recorded.
DISK_FULL_ERRORS: Final = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def set_pipe_size(fd: int) -> None:
    """Give pipe ``fd`` a buffer of ``PIPE_SIZE`` bytes where the system allows it."""
    # Past /proc/sys/fs/pipe-max-size the default 64 KiB stays: it works, only slower.
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)


def truncation_marker(cap: int, after_newline: bool) -> bytes:
    """Return the marker appended to a log that reached its cap of ``cap`` bytes."""
    return _marker_line(TRUNCATION_MARKER.format(cap=cap), after_newline)


def disk_full_marker(size: int, error: OSError, after_newline: bool, step: int = 0) -> bytes:
    """Return the marker appended to a log that stopped at ``size`` bytes for lack of room.

    ``step`` is the allocation ahead that did not fit, or 0 where a write found no room.
    """
    if step:
        reason = f"its file system has less than {step // 1024**2} MiB of room left"
    else:
        reason = f"the log could not grow ({os.strerror(error.errno or 0)})"
    return _marker_line(DISK_FULL_MARKER.format(size=size, reason=reason), after_newline)


def _marker_line(text: str, after_newline: bool) -> bytes:
    """Return ``text`` as bytes, led by a newline unless the log already ends with one."""
    return (text if after_newline else "\n" + text).encode()


class OutputWriter:
    """Append a job's stdout and stderr to its log, up to a limit.

    The limit is the cap, or less once the log's file system runs short of room. Past the
    limit, output is read and dropped, and a marker ends the log.
    """

    def __init__(self, job_dir: str, cap: int, relay: bool = True, reserve: bool = True) -> None:
        flags = os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        # Read access too: the truncation marker depends on the last byte written.
        self._log = os.open(os.path.join(job_dir, LOG_NAME), flags | os.O_RDWR, 0o640)
        self.job_id = os.path.basename(os.path.normpath(job_dir))
        # Created with the first stderr byte: most jobs' output needs no range file.
        self._ranges_path = os.path.join(job_dir, RANGES_NAME)
        self._ranges = -1
        self.cap = cap
        self.size = 0
        self.truncated = False
        self.relay = relay
        self._relay: tuple[int, int] | None = None  # created with the first stdout bytes
        self._can_splice = True
        self._reserved = 0  # the end of the blocks allocated ahead of the bytes
        self._can_reserve = reserve
        # Where the log ends: the cap, or less once its file system has run out of room.
        self._limit = cap
        self._disk_full: OSError | None = None
        self._failed_step = 0  # the size of an allocation ahead that found too little room
        self._ranges_valid = 0  # the range file's length up to its last correct record

    def pump(self, fd: int, stream: int) -> bool:
        """Move the bytes waiting in ``fd`` into the log; return False at end of file."""
        if self.truncated:
            return bool(os.read(fd, PIPE_CHUNK))
        count = min(PIPE_CHUNK, self._limit - self.size)
        self._reserve(self.size + count)
        # A step that found too little room lowers the limit.
        count = min(count, self._limit - self.size)
        if count <= 0:
            # Room ran out before these bytes: the log ends, and they are dropped.
            self._end()
            return bool(os.read(fd, PIPE_CHUNK))
        try:
            moved = self._splice(fd, count) if stream == STDOUT else -1
            if moved < 0:
                data = os.read(fd, count)
                self._append(data, stream)
                moved = len(data)
        except OSError as error:
            if error.errno not in DISK_FULL_ERRORS:
                raise
            self._stop_for_room(error)
            return True
        if moved == 0:
            return False
        if self.size >= self._limit:
            self._end()
        return True

    def _splice(self, fd: int, count: int) -> int:
        """Move up to ``count`` bytes from pipe ``fd`` into the log with splice.

        Return -1, with no byte moved, where splice is rejected: the caller then copies.

        With ``relay``, the bytes go through a pipe of our own. A splice from a pipe into a file
        keeps the pipe locked while it copies into the page cache, and a job that writes to that
        pipe spins on the lock meanwhile. A splice between two pipes only moves page
        references, so the job's pipe is locked briefly and the copy happens on the relay.
        """
        if not self._can_splice:
            return -1
        if not self.relay:
            return self._splice_to_log(fd, count)

        relay_read, relay_write = self._open_relay()
        try:
            moved = os.splice(fd, relay_write, count)
        except OSError as error:
            if error.errno not in (errno.EINVAL, errno.ENOSYS):
                raise
            self._can_splice = False
            return -1
        left = moved
        while left:
            written = self._splice_to_log(relay_read, left)
            if written < 0:
                # The log's file system rejects splice, so read the relay's bytes and write them.
                data = os.read(relay_read, left)
                self._append(data, STDOUT)
                written = len(data)
            left -= written
        return moved

    def _splice_to_log(self, source: int, count: int) -> int:
        try:
            moved = os.splice(source, self._log, count, offset_dst=self.size)
        except OSError as error:
            if error.errno not in (errno.EINVAL, errno.ENOSYS):
                raise
            self._can_splice = False
            return -1
        self.size += moved
        return moved

    def _reserve(self, end: int) -> None:
        """Allocate the log's blocks past ``end`` in one step, up to the cap, once it is large."""
        if end <= self._reserved or self.size < RESERVE_AFTER or not self._can_reserve:
            return
        start = max(self._reserved, self.size)
        stop = min(start + RESERVE_CHUNK, self.cap)
        try:
            reserve_blocks(self._log, start, stop - start)
        except OSError as error:
            if error.errno in DISK_FULL_ERRORS:
                # Less room than one step is left: the log ends where its blocks end, and
                # what room there is stays for the job's state and everyone else's.
                self._limit = max(self._reserved, self.size)
                self._disk_full = error
                self._failed_step = stop - start
                self._can_reserve = False
                return
            # An optimisation only: on a file system without fallocate, the log is written as
            # it comes.
            log.warning(
                "job %s: allocating the log's blocks ahead failed, so they are allocated as "
                "it grows: %s",
                self.job_id,
                error,
            )
            self._can_reserve = False
            return
        self._reserved = stop

    def _open_relay(self) -> tuple[int, int]:
        if self._relay is None:
            relay_read, relay_write = os.pipe2(os.O_CLOEXEC)
            set_pipe_size(relay_write)
            self._relay = (relay_read, relay_write)
        return self._relay

    def _append(self, data: bytes, stream: int) -> None:
        if not data:
            return
        if stream != STDOUT:
            self._write_range(self.size, self.size + len(data), stream)
        written = 0
        try:
            while written < len(data):
                written += os.pwrite(self._log, data[written:], self.size + written)
        finally:
            if written < len(data) and stream != STDOUT:
                # The record covers bytes that were not written, so one for those that were
                # replaces it.
                self._ranges_valid -= RANGE_RECORD.size
                os.ftruncate(self._ranges, self._ranges_valid)
                if written:
                    self._write_range(self.size, self.size + written, stream)
            self.size += written

    def _write_range(self, start: int, end: int, stream: int) -> None:
        if self._ranges < 0:
            flags = os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_WRONLY | os.O_APPEND
            self._ranges = os.open(self._ranges_path, flags, 0o640)
        try:
            written = os.write(self._ranges, RANGE_RECORD.pack(start, end, stream))
        except OSError:
            os.ftruncate(self._ranges, self._ranges_valid)
            raise
        if written != RANGE_RECORD.size:
            os.ftruncate(self._ranges, self._ranges_valid)
            raise OSError(errno.ENOSPC, f"{self._ranges_path}: short write of a range record")
        self._ranges_valid += written

    def _stop_for_room(self, error: OSError) -> None:
        """End the log at its current size, since its file system refused a write."""
        self._limit = self.size
        self._disk_full = error
        self._end()

    def _end(self) -> None:
        """End the log at the cap or where room ran out, with a marker that names the reason."""
        self.truncated = True
        after_newline = self.size == 0 or os.pread(self._log, 1, self.size - 1) == b"\n"
        if self._disk_full is None:
            marker = truncation_marker(self.cap, after_newline)
        else:
            log.error(
                "job %s: the log stops at %s bytes, since its file system has no room for "
                "more: %s; later output is dropped",
                self.job_id,
                self.size,
                self._disk_full,
            )
            # Blocks allocated ahead are of no use now: give them back.
            os.ftruncate(self._log, self.size)
            marker = disk_full_marker(self.size, self._disk_full, after_newline, self._failed_step)
        try:
            self._append(marker, MARKER)
        except OSError as error:
            if error.errno not in DISK_FULL_ERRORS:
                raise
            log.error(
                "job %s: the marker at the end of the log did not fit: %s", self.job_id, error
            )

    def close(self) -> None:
        """Free the blocks allocated past the end, flush the log to disk and close it."""
        if self._reserved > self.size:
            os.ftruncate(self._log, self.size)
        os.fsync(self._log)
        os.close(self._log)
        for fd in self._relay or ():
            os.close(fd)
        if self._ranges >= 0:
            os.close(self._ranges)


def read_ranges(job_dir: str) -> list[tuple[int, int, int]]:
    """Return the (start, end, stream) ranges of non-stdout bytes, merged where they touch."""
    return RangeReader(job_dir).update()


class RangeReader:
    """Read a job's range file incrementally, keeping the merged ranges seen so far."""

    def __init__(self, job_dir: str) -> None:
        self._path = os.path.join(job_dir, RANGES_NAME)
        self._offset = 0
        self.ranges: list[tuple[int, int, int]] = []

    def update(self) -> list[tuple[int, int, int]]:
        """Read the records added since the last call; return all ranges."""
        try:
            with open(self._path, "rb") as file:
                file.seek(self._offset)
                data = file.read()
        except FileNotFoundError:
            return self.ranges
        usable = len(data) - len(data) % RANGE_RECORD.size
        self._offset += usable
        for start, end, stream in RANGE_RECORD.iter_unpack(data[:usable]):
            if self.ranges and self.ranges[-1][1] == start and self.ranges[-1][2] == stream:
                self.ranges[-1] = (self.ranges[-1][0], end, stream)
            else:
                self.ranges.append((start, end, stream))
        return self.ranges


def split_streams(
    data: bytes, offset: int, ranges: list[tuple[int, int, int]]
) -> Iterator[tuple[int, bytes]]:
    """Split ``data``, which starts at byte ``offset`` of the log, into (stream, bytes) pieces."""
    position = offset
    end = offset + len(data)
    for start, stop, stream in ranges:
        if stop <= position or start >= end:
            continue
        if start > position:
            yield STDOUT, data[position - offset : start - offset]
            position = start
        piece_end = min(stop, end)
        yield stream, data[position - offset : piece_end - offset]
        position = piece_end
    if position < end:
        yield STDOUT, data[position - offset :]


def read_log(job_dir: str, offset: int = 0, size: int = -1) -> bytes:
    """Return up to ``size`` bytes (all, if negative) of the log from ``offset``."""
    path = os.path.join(job_dir, LOG_NAME)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return b""
    try:
        # Stop at the end, because pread rejects an offset plus size past the largest file offset.
        available = max(0, os.fstat(fd).st_size - offset)
        size = available if size < 0 else min(size, available)
        chunks = []
        while size > 0:
            chunk = os.pread(fd, min(size, PIPE_CHUNK * 4), offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
            size -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def free_blocks_past_end(job_dir: str) -> None:
    """Free the blocks that a writer which never closed the log allocated past its end."""
    path = os.path.join(job_dir, LOG_NAME)
    with contextlib.suppress(FileNotFoundError):
        # ext4 frees them on a truncation to the same size.
        os.truncate(path, os.stat(path).st_size)


def log_size(job_dir: str) -> int:
    """Return the current size of the log in bytes (0 before it exists)."""
    try:
        return os.stat(os.path.join(job_dir, LOG_NAME)).st_size
    except FileNotFoundError:
        return 0
