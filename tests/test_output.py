"""The output log: raw bytes, stream ranges, live followers, the output cap."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import resource
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import assert_no_leftovers

from jupyter_linuxworker.sandbox import outputlog
from jupyter_linuxworker.sandbox.manager import JobManager
from jupyter_linuxworker.sandbox.store import JobStatus


async def test_non_utf8_bytes_kept(manager: JobManager) -> None:
    """O1: bytes that are not UTF-8 are stored raw; a text view replaces them."""
    job = await manager.submit({"command": r"printf 'a\377b\n'"})
    record = await manager.wait(job.id, timeout=5)

    assert record.status == JobStatus.COMPLETED
    data = manager.read_output(job.id)
    assert data == bytes([0x61, 0xFF, 0x62, 0x0A])
    assert data.decode("utf-8", errors="replace") == "a\ufffdb\n"


async def test_final_line_without_newline(manager: JobManager) -> None:
    """O2: a last line without newline reaches a live follower before end-of-stream."""
    job = await manager.submit({"command": "sleep 0.3; printf 'no newline'"})
    chunks = [chunk async for chunk in manager.follow(job.id)]

    assert b"".join(chunks) == b"no newline"
    assert manager.read_output(job.id) == b"no newline"
    assert (await manager.wait(job.id, timeout=5)).output_size == 10


async def test_stdin_is_at_eof(manager: JobManager) -> None:
    """O4: stdin is closed: `read` gets nothing, a bare `cat` exits 0 at once."""
    started = time.monotonic()
    reader = await manager.submit({"command": 'read x; echo "got:[$x]"'})
    cat = await manager.submit({"command": "cat"})
    reader_record = await manager.wait(reader.id, timeout=5)
    cat_record = await manager.wait(cat.id, timeout=5)

    assert reader_record.exit_code == 0
    assert manager.read_output(reader.id) == b"got:[]\n"
    assert cat_record.exit_code == 0
    assert manager.read_output(cat.id) == b""
    assert time.monotonic() - started < 1.0


async def test_output_is_live(manager: JobManager) -> None:
    """S1: a follower gets each line when it is written, while the job is RUNNING."""
    job = await manager.submit({"command": "echo one; sleep 3; echo two"})
    started = time.monotonic()
    arrivals: list[tuple[bytes, float, JobStatus]] = []
    async for chunk in manager.follow(job.id):
        arrivals.append((chunk, time.monotonic() - started, manager.get(job.id).status))

    assert [chunk for chunk, _, _ in arrivals] == [b"one\n", b"two\n"]
    assert arrivals[0][1] < 0.5
    assert arrivals[0][2] == JobStatus.RUNNING
    assert arrivals[1][1] - arrivals[0][1] >= 2.5


async def test_followers_end_when_job_ends(manager: JobManager) -> None:
    """S2: followers receive the output, then end-of-stream within 1 s of the job's end."""
    job = await manager.submit({"command": "echo hi; sleep 1; kill -KILL $$"})

    async def follow() -> tuple[bytes, float]:
        data = b"".join([chunk async for chunk in manager.follow(job.id)])
        return data, time.time()

    results = await asyncio.gather(follow(), follow())
    record = await manager.wait(job.id, timeout=5)

    assert record.status == JobStatus.FAILED
    assert record.signal == 9
    assert record.ended_at is not None
    for data, ended in results:
        assert data == b"hi\n"
        assert ended - record.ended_at < 1.0


async def test_follow_from_offset(manager: JobManager) -> None:
    job = await manager.submit({"command": "printf 0123456789"})
    await manager.wait(job.id, timeout=5)

    assert b"".join([c async for c in manager.follow(job.id, offset=4)]) == b"456789"
    assert b"".join([c async for c in manager.follow(job.id, offset=10)]) == b""
    assert manager.read_output(job.id, offset=2, size=3) == b"234"

    # Offsets up to the largest file offset read nothing, as any offset past the end does.
    for offset in (2**63 - 2, 2**63 - 1):
        assert [c async for c in manager.follow(job.id, offset=offset)] == []
        assert [p async for p in manager.follow_streams(job.id, offset=offset)] == []
        assert manager.read_output(job.id, offset=offset, size=1024) == b""


async def test_stderr_ranges_in_arrival_order(manager: JobManager) -> None:
    job = await manager.submit(
        {
            "command": "echo out1; sleep 0.1; echo err1 >&2; sleep 0.1; echo out2; "
            "sleep 0.1; echo err2 >&2"
        }
    )
    await manager.wait(job.id, timeout=5)

    assert manager.read_output(job.id) == b"out1\nerr1\nout2\nerr2\n"
    assert manager.stderr_ranges(job.id) == [(5, 10, outputlog.STDERR), (15, 20, outputlog.STDERR)]
    pieces = [piece async for piece in manager.follow_streams(job.id)]
    assert pieces == [
        (outputlog.STDOUT, b"out1\n"),
        (outputlog.STDERR, b"err1\n"),
        (outputlog.STDOUT, b"out2\n"),
        (outputlog.STDERR, b"err2\n"),
    ]


async def test_runaway_output_is_capped(manager: JobManager) -> None:
    """R3: past the cap, output is drained and dropped, the job runs on, readers see a marker."""
    cap = 16 * 1024**2
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    job = await manager.submit({"command": "yes", "output_cap": "16M"})
    follower = asyncio.ensure_future(_count_bytes(manager, job.id))
    await asyncio.sleep(10)

    assert manager.get(job.id).status == JobStatus.RUNNING
    record = await manager.stop(job.id)
    followed_size, followed_tail = await asyncio.wait_for(follower, 5)

    # ru_maxrss is in KiB: following 16 MiB in 1 MiB chunks must not keep it all in memory.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 8 * 1024
    marker = outputlog.truncation_marker(cap, after_newline=True)
    assert record.status == JobStatus.STOPPED
    assert record.output_truncated is True
    assert record.output_size == cap + len(marker)
    data = manager.read_output(job.id)
    assert len(data) == cap + len(marker)
    assert data[:cap] == b"y\n" * (cap // 2)
    assert data[cap:] == marker
    assert followed_size == cap + len(marker)
    assert followed_tail.endswith(marker)
    assert manager.stderr_ranges(job.id) == [(cap, cap + len(marker), outputlog.MARKER)]
    assert_no_leftovers(manager)


async def _count_bytes(manager: JobManager, job_id: str) -> tuple[int, bytes]:
    size = 0
    tail = b""
    async for chunk in manager.follow(job_id):
        size += len(chunk)
        tail = (tail + chunk)[-4096:]
    return size, tail


async def test_cap_marker_after_partial_line(manager: JobManager) -> None:
    job = await manager.submit({"command": "printf 'abcdefgh'", "output_cap": 5})
    record = await manager.wait(job.id, timeout=5)

    assert record.status == JobStatus.COMPLETED
    assert manager.read_output(job.id) == b"abcde" + outputlog.truncation_marker(
        5, after_newline=False
    )
    assert outputlog.truncation_marker(5, after_newline=False).startswith(
        b"\n[jupyter-linuxworker: "
    )


# Three MiB of every byte value, written in pieces that straddle pipe pages, and a cap that
# ends inside a page, so the relay has to split one of the pipe's buffers.
PATTERN = bytes(range(256)) * (12 * 1024)
PATTERN_CAP = 2 * 1024**2 + 3
WRITE_PIECE = 65536 + 7


@pytest.mark.parametrize("relay", [True, False])
def test_writer_keeps_stdout_exactly_up_to_the_cap(tmp_path: str, relay: bool) -> None:
    read_fd, write_fd = os.pipe()
    fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, outputlog.PIPE_CHUNK)

    def produce() -> None:
        for start in range(0, len(PATTERN), WRITE_PIECE):
            os.write(write_fd, PATTERN[start : start + WRITE_PIECE])
        os.close(write_fd)

    producer = threading.Thread(target=produce)
    producer.start()
    writer = outputlog.OutputWriter(str(tmp_path), PATTERN_CAP, relay)
    while writer.pump(read_fd, outputlog.STDOUT):
        pass
    writer.close()
    producer.join()
    os.close(read_fd)

    marker = outputlog.truncation_marker(PATTERN_CAP, after_newline=False)
    assert writer.truncated is True
    assert writer.size == PATTERN_CAP + len(marker)
    assert outputlog.read_log(str(tmp_path)) == PATTERN[:PATTERN_CAP] + marker
    assert outputlog.read_ranges(str(tmp_path)) == [
        (PATTERN_CAP, PATTERN_CAP + len(marker), outputlog.MARKER)
    ]


MIB = 1024**2
BLOCK = 4096


def _allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def _pump_all(
    job_dir: str, data: bytes, cap: int
) -> tuple[outputlog.OutputWriter, list[tuple[int, int]]]:
    """Write ``data`` through a pipe into a log, as the supervisor does.

    Return the writer, still open, and the log's size and allocated bytes after each pump
    that left it below ``cap``.
    """
    read_fd, write_fd = os.pipe()
    fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, outputlog.PIPE_CHUNK)

    def produce() -> None:
        try:
            for start in range(0, len(data), MIB):
                os.write(write_fd, data[start : start + MIB])
        except BrokenPipeError:
            pass  # the writer failed, and the test with it
        finally:
            os.close(write_fd)

    producer = threading.Thread(target=produce)
    producer.start()
    writer = outputlog.OutputWriter(job_dir, cap)
    log_path = os.path.join(job_dir, outputlog.LOG_NAME)
    sizes = []
    try:
        while writer.pump(read_fd, outputlog.STDOUT):
            if not writer.truncated:
                sizes.append((writer.size, _allocated(log_path)))
    except BaseException:
        writer.close()  # so that a file system under the log can be unmounted
        raise
    finally:
        os.close(read_fd)
        producer.join()
    return writer, sizes


def _max_ahead(sizes: list[tuple[int, int]]) -> int:
    return max(allocated - size for size, allocated in sizes)


def test_writer_reserves_ahead_then_frees(tmp_path: str) -> None:
    data = PATTERN * 7  # 21 MiB
    log_path = os.path.join(str(tmp_path), outputlog.LOG_NAME)
    writer, sizes = _pump_all(str(tmp_path), data, 64 * MIB)
    writer.close()

    assert outputlog.read_log(str(tmp_path)) == data
    assert _max_ahead(sizes) >= outputlog.RESERVE_CHUNK - outputlog.PIPE_CHUNK
    # Only ext4's extent blocks may remain above the bytes.
    assert len(data) <= _allocated(log_path) <= len(data) + 16 * BLOCK


def test_writer_allocates_nothing_ahead_of_a_small_log(tmp_path: str) -> None:
    data = PATTERN[: outputlog.RESERVE_AFTER - 1]
    writer, sizes = _pump_all(str(tmp_path), data, 64 * MIB)
    writer.close()

    assert outputlog.read_log(str(tmp_path)) == data
    assert _max_ahead(sizes) <= BLOCK


def test_writer_allocates_nothing_past_the_cap(tmp_path: str) -> None:
    cap = 12 * MIB + 5
    data = PATTERN * 7
    writer, sizes = _pump_all(str(tmp_path), data, cap)
    writer.close()

    marker = outputlog.truncation_marker(cap, after_newline=False)
    assert outputlog.read_log(str(tmp_path)) == data[:cap] + marker
    assert _max_ahead(sizes) >= outputlog.RESERVE_CHUNK - outputlog.PIPE_CHUNK
    # Only ext4's extent blocks may lie past the cap's last block.
    assert max(allocated for _size, allocated in sizes) <= cap + BLOCK + 16 * BLOCK


@contextlib.contextmanager
def _small_file_system(tmp_path: str, kind: str, size: str) -> Iterator[str]:
    """Mount a ``size`` tmpfs, or an ext2 image, which has no fallocate, on a new folder."""
    target = os.path.join(tmp_path, f"small-{kind}")
    os.mkdir(target)
    if kind == "tmpfs":
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", target], check=True)
    else:
        image = os.path.join(tmp_path, "small.img")
        subprocess.run(["truncate", "-s", size, image], check=True)
        subprocess.run(["mkfs.ext2", "-q", "-F", "-b", "4096", image], check=True)
        subprocess.run(["mount", "-o", "loop", image, target], check=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", target], check=True)
        assert not os.path.ismount(target)


def _pump_in_steps(
    job_dir: str, data: bytes, stream: int, reserve: bool = True, cap: int = 64 * MIB
) -> outputlog.OutputWriter:
    """Write ``data`` into a log through a pipe, one MiB at a time, each pumped whole."""
    read_fd, write_fd = os.pipe()
    fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, outputlog.PIPE_CHUNK)
    writer = outputlog.OutputWriter(job_dir, cap, reserve=reserve)
    try:
        for start in range(0, len(data), MIB):
            os.write(write_fd, data[start : start + MIB])
            assert writer.pump(read_fd, stream) is True
        os.close(write_fd)
        write_fd = -1
        while writer.pump(read_fd, stream):
            pass
    finally:
        writer.close()
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)
    return writer


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]


def test_writer_where_allocating_ahead_is_unsupported(
    tmp_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """ext2 has no fallocate: the log is written whole, as it comes."""
    with _small_file_system(str(tmp_path), "ext2", "16M") as small:
        data = PATTERN  # 3 MiB
        writer, sizes = _pump_all(small, data, 64 * MIB)
        writer.close()

        assert outputlog.read_log(small) == data
        assert _max_ahead(sizes) <= BLOCK
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1
        assert warnings[0].startswith(
            f"job {os.path.basename(small)}: allocating the log's blocks ahead failed, so they "
            "are allocated as it grows: [Errno 95] fallocate(fd "
        )
        assert warnings[0].endswith(f", {outputlog.RESERVE_CHUNK}): Operation not supported")


def test_writer_stops_where_room_runs_out(tmp_path: str, caplog: pytest.LogCaptureFixture) -> None:
    """With 16 MiB of room, the second 8 MiB step fails: the log ends where its blocks end."""
    with _small_file_system(str(tmp_path), "tmpfs", "16m") as small:
        data = PATTERN * 4  # 12 MiB
        writer = _pump_in_steps(small, data, outputlog.STDOUT)

        end = 9 * MIB  # 1 MiB, then one step of 8 MiB
        marker = (
            b"\n[jupyter-linuxworker: output stopped at 9437184 bytes, since its file system "
            b"has less than 8 MiB of room left; later output was dropped]\n"
        )
        assert writer.truncated is True
        assert outputlog.read_log(small) == data[:end] + marker
        assert outputlog.read_ranges(small) == [(end, end + len(marker), outputlog.MARKER)]
        assert _errors(caplog) == [
            f"job small-tmpfs: the log stops at {end} bytes, since its file system has no "
            "room for more: [Errno 28] fallocate(fd "
            + _errors(caplog)[0].split("fallocate(fd ", 1)[1]
        ]
        assert _errors(caplog)[0].endswith(
            f", {end}, {outputlog.RESERVE_CHUNK}): No space left on device; later output is dropped"
        )
        # The room the log did not take stays free, for the job's state and others.
        free = os.statvfs(small)
        assert free.f_bavail * free.f_frsize >= 6 * MIB


@pytest.mark.parametrize("stream", [outputlog.STDOUT, outputlog.STDERR])
def test_writer_stops_where_a_write_fails(
    tmp_path: str, caplog: pytest.LogCaptureFixture, stream: int
) -> None:
    """Without blocks allocated ahead, the write that finds no room ends the log."""
    with _small_file_system(str(tmp_path), "tmpfs", "4m") as small:
        data = PATTERN * 2  # 6 MiB
        writer = _pump_in_steps(small, data, stream, reserve=False)

        # On a tmpfs each file takes whole pages: stderr's range file takes one of the 1024.
        end = 4 * MIB if stream == outputlog.STDOUT else 4 * MIB - BLOCK
        assert writer.truncated is True
        assert writer.size == end
        assert outputlog.read_log(small) == data[:end]
        expected_ranges = [] if stream == outputlog.STDOUT else [(0, end, outputlog.STDERR)]
        assert outputlog.read_ranges(small) == expected_ranges
        assert _errors(caplog) == [
            f"job small-tmpfs: the log stops at {end} bytes, since its file system has no "
            "room for more: [Errno 28] No space left on device; later output is dropped",
            "job small-tmpfs: the marker at the end of the log did not fit: [Errno 28] No space "
            "left on device",
        ]


def test_disk_full_markers() -> None:
    no_room = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    assert outputlog.disk_full_marker(5, no_room, True) == (
        b"[jupyter-linuxworker: output stopped at 5 bytes, since the log could not grow "
        b"(No space left on device); later output was dropped]\n"
    )
    assert outputlog.disk_full_marker(5, no_room, False, 8 * MIB) == (
        b"\n[jupyter-linuxworker: output stopped at 5 bytes, since its file system has less "
        b"than 8 MiB of room left; later output was dropped]\n"
    )


def test_cap_marker_without_room(tmp_path: str, caplog: pytest.LogCaptureFixture) -> None:
    with _small_file_system(str(tmp_path), "tmpfs", "4m") as small:
        data = PATTERN * 2  # 6 MiB
        writer = _pump_in_steps(small, data, outputlog.STDOUT, reserve=False, cap=4 * MIB)

        assert writer.truncated is True
        assert outputlog.read_log(small) == data[: 4 * MIB]
        assert _errors(caplog) == [
            "job small-tmpfs: the marker at the end of the log did not fit: [Errno 28] No space "
            "left on device",
        ]


async def test_job_filling_the_state_folder(
    tmp_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The log stops with a marker; the job runs on, and its end and the next job are kept."""
    caplog.set_level(logging.INFO, logger="jupyter_linuxworker")
    with _small_file_system(str(tmp_path), "tmpfs", "40m") as small:
        state = os.path.join(small, "state")
        async with JobManager(state, volume_roots=[str(tmp_path)], grace=1.0) as full:
            command = "dd if=/dev/zero bs=1M count=100 2>/dev/null; echo after >&2; exit 3"
            job = await full.submit({"command": command, "output_cap": "1G"})
            record = await full.wait(job.id, timeout=30)

            data = full.read_output(job.id)
            size = data.index(b"\n[jupyter-linuxworker: output stopped at ")
            no_room = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            assert record.status == JobStatus.FAILED
            assert record.exit_code == 3
            assert record.output_truncated is True
            assert record.output_size == len(data)
            step = outputlog.RESERVE_CHUNK
            assert data == bytes(size) + outputlog.disk_full_marker(size, no_room, False, step)
            assert outputlog.RESERVE_CHUNK <= size <= 40 * MIB
            assert (
                f"job {job.id}: FAILED (exited with code 3); its output was cut short"
                in caplog.messages
            )

            second = await full.submit({"command": "echo ok"})
            assert (await full.wait(second.id, timeout=10)).status == JobStatus.COMPLETED
            assert full.read_output(second.id) == b"ok\n"
            assert_no_leftovers(full)


async def test_output_without_relay(state_dir: str, tmp_path: str) -> None:
    expected = "".join(f"{number}\n" for number in range(1, 200001)).encode()
    async with JobManager(state_dir, volume_roots=[str(tmp_path)], output_relay=False) as direct:
        job = await direct.submit({"command": "seq 1 200000"})
        record = await direct.wait(job.id, timeout=10)

        with open(os.path.join(direct.jobs_dir, job.id, "launch.json")) as file:
            assert json.load(file)["output_relay"] is False
        assert record.status == JobStatus.COMPLETED
        assert record.output_size == len(expected) == 1288895
        assert direct.read_output(job.id) == expected
        assert_no_leftovers(direct)
