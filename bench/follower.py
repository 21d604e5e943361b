"""One REST follower: GET jobs/ID/output?follow=1 and count the bytes, for the output benchmarks.

Usage: follower.py ADDRESS TOKEN, where ADDRESS is the server's port on 127.0.0.1 or the path
of its Unix socket. The process connects first, then reads the job id as one line
on stdin, so that its start-up is not timed. At the end it prints one JSON line with the byte
count, CLOCK_MONOTONIC times (the same clock in every process): request sent, first byte,
last byte, end of the response, and the CPU seconds (all, and in the kernel) this process
spent from the request to its last byte.
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import time

from jupyter_linuxworker.client import UnixHTTPConnection

BUFFER_SIZE = 1024 * 1024


def main(argv: list[str]) -> int:
    address, token = argv[1], argv[2]
    connection = (
        http.client.HTTPConnection("127.0.0.1", int(address), timeout=600)
        if address.isdigit()
        else UnixHTTPConnection(address, timeout=600)
    )
    connection.connect()
    job_id = sys.stdin.readline().strip()

    requested = time.monotonic()
    cpu_start = os.times()
    connection.request(
        "GET",
        f"/linuxworker/api/jobs/{job_id}/output?follow=1",
        headers={"Authorization": f"token {token}"},
    )
    response = connection.getresponse()

    buffer = bytearray(BUFFER_SIZE)
    count = 0
    first = last = None
    cpu = system = 0.0
    while True:
        size = response.readinto(buffer)
        if not size:
            break
        last = time.monotonic()
        now = os.times()
        system = now.system - cpu_start.system
        cpu = now.user - cpu_start.user + system
        if first is None:
            first = last
        count += size
    ended = time.monotonic()

    result = {
        "status": response.status,
        "bytes": count,
        "requested": requested,
        "first": first,
        "last": last,
        "ended": ended,
        "cpu": cpu,
        "cpu_system": system,
    }
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
