"""The transport under the followers, alone: sendfile over a local socket, no server, no job.

A thread per reader sends a file that is already in the page cache with os.sendfile, and each
reader is a process that reads its socket into a 1 MiB buffer until the end. There is no HTTP,
no event loop and no log being written meanwhile, so over loopback TCP the times and CPU
seconds are a floor for any server that delivers a log over TCP on this machine. The same over
a Unix socket shows what a local follower could gain from one.

Run as a script, this file is one reader. ``transport.py ADDRESS`` connects to ADDRESS, a
port on 127.0.0.1 or the path of a Unix socket, and reads to the end. Then it prints one JSON
line: the byte count, the CLOCK_MONOTONIC time of its last byte, and the CPU seconds it spent
after connecting.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

READ_SIZE = 1024 * 1024
LOOPBACK = "127.0.0.1"
# Every reader connects before the clock starts; this bounds the wait for one to do so.
CONNECT_TIMEOUT = 30.0
READER_TIMEOUT = 600.0


@dataclass
class TransportRun:
    """One delivery of a file to every reader."""

    seconds: float  # from the first sendfile call to the last reader's last byte
    sender_cpu: float  # CPU seconds of all sending threads together
    reader_cpu: float  # CPU seconds of all readers together


def deliver(path: str, readers: int, unix: bool = False) -> TransportRun:
    """Send the file at ``path`` to ``readers`` reader processes at once; time it.

    The readers connect over loopback TCP, or with ``unix`` over a Unix socket. Raise
    RuntimeError when a reader does not receive every byte.
    """
    size = os.path.getsize(path)
    with tempfile.TemporaryDirectory(prefix="linuxworker-transport-") as folder:
        if unix:
            address = os.path.join(folder, "socket")
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(address)
            listener.listen(readers)
        else:
            listener = socket.create_server((LOOPBACK, 0))
            address = str(listener.getsockname()[1])
        listener.settimeout(CONNECT_TIMEOUT)
        processes = [
            subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), address], stdout=subprocess.PIPE
            )
            for _ in range(readers)
        ]
        try:
            connections = [listener.accept()[0] for _ in range(readers)]
        finally:
            listener.close()

    # Each thread measures its own CPU time, which counts the kernel's work in sendfile.
    sender_cpu = [0.0] * readers
    source = os.open(path, os.O_RDONLY)

    def send(index: int, connection: socket.socket) -> None:
        cpu_start = time.thread_time()
        offset = 0
        with connection:
            while offset < size:
                offset += os.sendfile(connection.fileno(), source, offset, size - offset)
        sender_cpu[index] = time.thread_time() - cpu_start

    threads = [
        threading.Thread(target=send, args=(index, connection))
        for index, connection in enumerate(connections)
    ]
    started = time.monotonic()
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        os.close(source)

    reports = []
    for process in processes:
        output, _ = process.communicate(timeout=READER_TIMEOUT)
        reports.append(json.loads(output))
    for report in reports:
        if report["bytes"] != size:
            raise RuntimeError(f"a reader got {report['bytes']} bytes of {path}, expected {size}")
    return TransportRun(
        seconds=max(report["last"] for report in reports) - started,
        sender_cpu=sum(sender_cpu),
        reader_cpu=sum(report["cpu"] for report in reports),
    )


def read(address: str) -> dict[str, float]:
    """Read everything the sender at ``address`` sends; return the count, last byte time and CPU.

    ``address`` is a port on 127.0.0.1, or the path of a Unix socket.
    """
    if address.isdigit():
        connection = socket.create_connection((LOOPBACK, int(address)))
    else:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.connect(address)
    with connection:
        cpu_start = os.times()
        buffer = bytearray(READ_SIZE)
        count = 0
        last = time.monotonic()
        while size := connection.recv_into(buffer):
            count += size
            last = time.monotonic()
        now = os.times()
    cpu = now.user - cpu_start.user + now.system - cpu_start.system
    return {"bytes": count, "last": last, "cpu": cpu}


if __name__ == "__main__":
    sys.stdout.write(json.dumps(read(sys.argv[1])) + "\n")
