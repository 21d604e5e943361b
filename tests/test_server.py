"""The REST API of a real Jupyter server process with the extension."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator

import pytest
from conftest import processes_with_cmdline
from server import (
    ServerProcess,
    all_jobs,
    assert_server_took_it_quietly,
    leave_mid_stream,
    log_size,
    request,
    running_server,
)

from jupyter_linuxworker.client import AsyncClient, Client, LinuxWorkerError

ALICE = "alice-token"
BOB = "bob-token"
ADMIN = "admin-token"
MAX_RUNNING = 30


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    extra = [f"--LinuxWorkerApp.max_running_jobs_per_user={MAX_RUNNING}"]
    with running_server(tmp_path_factory.mktemp("server"), extra) as process:
        yield process


# Readers that leave a job's stream early, one after the other, and the job's output size.
FOLLOWERS_THAT_LEAVE = 5
LEAVING_OUTPUT = 50_000_000


def submit(server: ServerProcess, body: dict[str, object], token: str = ALICE) -> dict[str, object]:
    status, job = request("POST", server.api + "jobs", token, body)
    assert status == 201, job
    assert isinstance(job, dict)
    return job


def wait_ended(server: ServerProcess, job_id: str, token: str = ALICE, timeout: float = 10) -> dict:
    """Return the job once ended, by following its output to the end."""
    status, _ = request("GET", f"{server.api}jobs/{job_id}/output?follow=1", token, timeout=timeout)
    assert status == 200
    status, job = request("GET", f"{server.api}jobs/{job_id}", token)
    assert status == 200
    assert isinstance(job, dict)
    return job


def wait_output(server: ServerProcess, job_id: str, expected: bytes, timeout: float = 5) -> None:
    """Return once the job's output starts with ``expected``."""
    follower = Follower(server, job_id)
    deadline = time.monotonic() + timeout
    while not follower.data.startswith(expected):
        assert time.monotonic() < deadline, f"job {job_id} did not print {expected!r}"
        time.sleep(0.02)
    follower.abort()


class Follower:
    """Follow a job's output over one HTTP connection in a thread, noting when bytes arrive."""

    def __init__(self, server: ServerProcess, job_id: str, token: str = ALICE) -> None:
        self.arrivals: list[tuple[float, bytes]] = []
        self.ended_at: float | None = None
        self.error: BaseException | None = None
        self.connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        path = urllib.parse.urlsplit(server.api).path + f"jobs/{job_id}/output?follow=1"
        self.connection.request("GET", path, headers={"Authorization": f"token {token}"})
        self.response = self.connection.getresponse()
        assert self.response.status == 200
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            while True:
                chunk = self.response.read1(65536)
                if not chunk:
                    break
                self.arrivals.append((time.time(), chunk))
        except BaseException as error:
            self.error = error
        self.ended_at = time.time()

    @property
    def data(self) -> bytes:
        return b"".join(chunk for _, chunk in self.arrivals)

    def abort(self) -> None:
        """Disconnect before the end, as a closed browser tab does."""
        # Shut the socket down first: closing the buffered reader would wait for the thread.
        self.connection.sock.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]
        self.thread.join(5)
        self.connection.close()

    def join(self, timeout: float = 15) -> Follower:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the follower did not reach end-of-stream"
        assert self.error is None
        self.connection.close()
        return self


def test_submit_minimal_job(server: ServerProcess) -> None:
    status, job = request("POST", server.api + "jobs", ALICE, {"command": "echo hi"})

    assert status == 201
    assert isinstance(job, dict)
    for key in (
        "id",
        "name",
        "owner",
        "command",
        "status",
        "exit_code",
        "signal",
        "reason",
        "created_at",
        "started_at",
        "ended_at",
    ):
        assert key in job
    assert job["owner"] == "alice"
    assert job["command"] == "echo hi"
    assert job["name"] == "echo"
    assert job["status"] in ("PENDING", "RUNNING")
    ended = wait_ended(server, str(job["id"]))
    assert ended["status"] == "COMPLETED"
    assert ended["exit_code"] == 0
    assert request("GET", f"{server.api}jobs/{job['id']}/output", ALICE) == (200, b"hi\n")


def test_bad_field_is_400_and_stores_nothing(server: ServerProcess) -> None:
    before = len(all_jobs(server.state_dir))
    cases = [
        ({"command": "x", "memory": "lots"}, "memory"),
        ({"command": ""}, "command"),
        ({"command": "x", "colour": 1}, "colour"),
        ({"command": "x", "image": "missing"}, "image"),
        ({"command": "x", "volumes": ["/etc:/data"]}, "volumes"),
        ({}, "command"),
    ]
    for body, field in cases:
        status, error = request("POST", server.api + "jobs", ALICE, body)
        assert status == 400, body
        assert isinstance(error, dict)
        assert error["field"] == field
        assert str(error["message"]).startswith(f"{field}: ")
    status, error = request("POST", server.api + "jobs", ALICE, None)
    assert status == 400
    assert len(all_jobs(server.state_dir)) == before


def raw_post(server: ServerProcess, path: str, body: bytes) -> tuple[int, bytes]:
    """POST ``body`` unchanged to ``path`` below the API as Alice. Return status and raw body."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.request(
            "POST",
            urllib.parse.urlsplit(server.api).path + path,
            body=body,
            headers={"Authorization": f"token {ALICE}"},
        )
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_not_json_body_is_400(server: ServerProcess) -> None:
    status, raw = raw_post(server, "jobs", b"{nope")
    assert status == 400
    assert b"not valid JSON" in raw


def test_unknown_and_invalid_ids_are_404(server: ServerProcess) -> None:
    for job_id in ("0" * 32, "not-an-id", "..%2F..%2Fetc", "A" * 32):
        for method, suffix in (
            ("GET", ""),
            ("GET", "/output"),
            ("GET", "/stats"),
            ("POST", "/stop"),
            ("DELETE", ""),
        ):
            status, error = request(
                method,
                f"{server.api}jobs/{job_id}{suffix}",
                ALICE,
                {} if method == "POST" else None,
            )
            assert status == 404, (method, job_id, suffix)
            assert isinstance(error, dict)
            assert "not found" in str(error["message"])


def test_other_users_job_is_not_found(server: ServerProcess) -> None:
    job = submit(server, {"command": "sleep 30"})
    url = f"{server.api}jobs/{job['id']}"

    assert request("GET", url, BOB)[0] == 404
    assert request("GET", url + "/output", BOB)[0] == 404
    assert request("GET", url + "/stats", BOB)[0] == 404
    assert request("POST", url + "/stop", BOB, {})[0] == 404
    assert request("DELETE", url, BOB)[0] == 404
    status, bobs = request("GET", server.api + "jobs", BOB)
    assert status == 200
    assert isinstance(bobs, dict)
    assert job["id"] not in [j["id"] for j in bobs["jobs"]]

    assert request("GET", url, ADMIN)[0] == 200
    status, stopped = request("POST", url + "/stop", ADMIN, {"grace": 0})
    assert status == 200
    assert isinstance(stopped, dict)
    assert stopped["status"] == "STOPPED"


def test_no_token_is_forbidden(server: ServerProcess) -> None:
    assert request("GET", server.api + "jobs", None)[0] == 403
    assert request("POST", server.api + "jobs", None, {"command": "true"})[0] == 403
    assert request("GET", server.api + "images", "wrong-token")[0] == 403


def test_stop_and_delete(server: ServerProcess) -> None:
    job = submit(server, {"command": "trap '' TERM; echo ready; sleep 100"})
    url = f"{server.api}jobs/{job['id']}"
    wait_output(server, str(job["id"]), b"ready\n")

    status, error = request("DELETE", url, ALICE)
    assert status == 409
    assert isinstance(error, dict)
    assert "stop it before deleting it" in str(error["message"])

    started = time.monotonic()
    status, stopped = request("POST", url + "/stop", ALICE, {"grace": 0.5})
    assert status == 200
    assert isinstance(stopped, dict)
    assert stopped["status"] == "STOPPED"
    assert stopped["signal"] == 9
    assert 0.5 <= time.monotonic() - started < 2.0
    assert request("POST", url + "/stop", ALICE, {})[1] == stopped
    path = f"jobs/{job['id']}/stop"
    assert raw_post(server, path, b"")[0] == 200
    assert raw_post(server, path, b'{"grace": null}')[0] == 200
    for body in (b"null", b"[]"):
        status, raw = raw_post(server, path, body)
        assert status == 400
        assert json.loads(raw)["message"] == (
            f'invalid body {body.decode()}: expected {{}} or {{"grace": seconds}}'
        )
    status, raw = raw_post(server, path, b'{"grace": 1, "signal": 9}')
    assert status == 400
    error = json.loads(raw)
    assert error["message"] == "signal: invalid value 9: unknown field; known fields: grace"
    assert error["field"] == "signal"

    assert request("DELETE", url, ALICE) == (204, b"")
    assert request("GET", url, ALICE)[0] == 404
    assert not os.path.exists(os.path.join(server.state_dir, "jobs", str(job["id"])))


def test_output_offset_and_sse(server: ServerProcess) -> None:
    # Two pipes carry stdout and stderr: bytes written at the same instant may swap places.
    command = r"printf 'out\n'; sleep 0.1; printf 'err\377\n' >&2; sleep 0.1; printf tail"
    job = submit(server, {"command": command})
    wait_ended(server, str(job["id"]))
    url = f"{server.api}jobs/{job['id']}/output"

    assert request("GET", url, ALICE) == (200, b"out\nerr\xff\ntail")
    assert request("GET", url + "?offset=4", ALICE) == (200, b"err\xff\ntail")
    assert request("GET", url + "?offset=99", ALICE) == (200, b"")
    assert request("GET", url + "?offset=-1", ALICE)[0] == 400
    status, events = request("GET", url + "?format=sse&follow=1", ALICE)
    assert status == 200
    assert isinstance(events, bytes)
    lines = events.decode().split("\n\n")
    assert lines[0] == 'event: output\ndata: {"stream": "stdout", "text": "out\\n", "offset": 4}'
    assert (
        lines[1]
        == 'event: output\ndata: {"stream": "stderr", "text": "err\\ufffd\\n", "offset": 9}'
    )
    assert lines[2] == 'event: output\ndata: {"stream": "stdout", "text": "tail", "offset": 13}'
    assert lines[3].startswith("event: end\ndata: {")


def test_output_is_live_over_rest(server: ServerProcess) -> None:
    """S1 through the REST endpoint."""
    started = time.time()
    job = submit(server, {"command": "echo one; sleep 3; echo two"})
    follower = Follower(server, str(job["id"]))
    time.sleep(1.0)
    _, running = request("GET", f"{server.api}jobs/{job['id']}", ALICE)
    follower.join()

    assert follower.data == b"one\ntwo\n"
    assert isinstance(running, dict)
    assert running["status"] == "RUNNING"
    first_at = next(at for at, chunk in follower.arrivals if b"one" in chunk)
    second_at = next(at for at, chunk in follower.arrivals if b"two" in chunk)
    assert first_at - started < 0.5
    assert second_at - first_at >= 2.5


def test_followers_end_with_job_over_rest(server: ServerProcess) -> None:
    """S2 through the REST endpoint: two followers end within 1 s of the job's end."""
    job = submit(server, {"command": "echo hi; sleep 1; kill -KILL $$"})
    followers = [Follower(server, str(job["id"])) for _ in range(2)]
    for follower in followers:
        follower.join()
    _, ended = request("GET", f"{server.api}jobs/{job['id']}", ALICE)

    assert isinstance(ended, dict)
    assert ended["status"] == "FAILED"
    assert ended["signal"] == 9
    ended_at = (
        time.mktime(time.strptime(str(ended["ended_at"])[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
    )
    for follower in followers:
        assert follower.data == b"hi\n"
        assert follower.ended_at is not None
        assert follower.ended_at - ended_at < 2.0


def test_twenty_followers_same_bytes(server: ServerProcess) -> None:
    job = submit(
        server,
        {
            "command": "for i in $(seq 1 2000); do echo line-$i; done; sleep 0.5; "
            "head -c 3000000 /dev/urandom | base64"
        },
    )
    followers = [Follower(server, str(job["id"])) for _ in range(20)]
    for follower in followers:
        follower.join(timeout=30)

    expected = hashlib.sha256(
        request("GET", f"{server.api}jobs/{job['id']}/output", ALICE)[1]
    ).hexdigest()  # type: ignore[arg-type]
    digests = {hashlib.sha256(f.data).hexdigest() for f in followers}
    assert digests == {expected}
    ends = [f.ended_at for f in followers if f.ended_at is not None]
    assert len(ends) == 20
    assert max(ends) - min(ends) < 1.0


def inotify_watches(pid: int) -> int:
    """Return how many inotify watches process ``pid`` holds."""
    count = 0
    for name in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{name}", encoding="ascii") as file:
                count += sum(1 for line in file if line.startswith("inotify wd:"))
        except OSError:
            continue
    return count


def test_disconnected_follower_leaves_nothing(server: ServerProcess) -> None:
    assert server.process is not None
    pid = server.process.pid
    job = submit(server, {"command": "echo start; sleep 30"})
    baseline_fds = len(os.listdir(f"/proc/{pid}/fd"))
    baseline_watches = inotify_watches(pid)

    followers = [Follower(server, str(job["id"])) for _ in range(5)]
    time.sleep(0.5)
    assert inotify_watches(pid) == baseline_watches + 1
    for follower in followers:
        follower.abort()
    # The server notices a closed connection at its next write: make the job write.
    request("POST", f"{server.api}jobs/{job['id']}/stop", ALICE, {"grace": 0})
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (
        inotify_watches(pid) != baseline_watches
        or len(os.listdir(f"/proc/{pid}/fd")) > baseline_fds
    ):
        time.sleep(0.1)

    assert inotify_watches(pid) == baseline_watches
    assert len(os.listdir(f"/proc/{pid}/fd")) <= baseline_fds


def test_leaving_follower_logs_no_error(server: ServerProcess) -> None:
    assert server.process is not None
    pid = server.process.pid
    # An ended job: the server sends its whole log at once, and waits on the reader.
    job = submit(server, {"command": f"head -c {LEAVING_OUTPUT} /dev/zero"})
    wait_ended(server, str(job["id"]), ALICE)
    baseline_fds = len(os.listdir(f"/proc/{pid}/fd"))
    log_start = log_size(server)

    leave_mid_stream(server, str(job["id"]), ALICE, FOLLOWERS_THAT_LEAVE)

    assert_server_took_it_quietly(server, baseline_fds, log_start)


def test_pagination_two_hundred_jobs(server: ServerProcess) -> None:
    submitted = []
    for _batch in range(10):
        batch = [submit(server, {"command": "true"}, BOB) for _ in range(20)]
        for job in batch:
            wait_ended(server, str(job["id"]), BOB)
        submitted.extend(str(job["id"]) for job in batch)

    seen: list[str] = []
    cursor = None
    while True:
        url = f"{server.api}jobs?limit=17" + (f"&cursor={cursor}" if cursor else "")
        status, page = request("GET", url, BOB)
        assert status == 200
        assert isinstance(page, dict)
        seen.extend(job["id"] for job in page["jobs"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    bobs_jobs = [job for job in seen if job in set(submitted)]

    assert len(seen) == len(set(seen))
    assert bobs_jobs == list(reversed(submitted))
    status, completed = request("GET", f"{server.api}jobs?status=COMPLETED&limit=5", BOB)
    assert isinstance(completed, dict)
    assert [job["status"] for job in completed["jobs"]] == ["COMPLETED"] * 5

    # Tornado turns a control character into a space, so the value is invalid, not trimmed.
    for query, field in (("cursor=14%15", "cursor"), ("limit=%205", "limit")):
        status, error = request("GET", f"{server.api}jobs?{query}", BOB)
        assert status == 400
        assert isinstance(error, dict)
        assert error["field"] == field
    status, error = request("GET", f"{server.api}jobs?status=COMPLETED%15", BOB)
    assert status == 400
    assert isinstance(error, dict)
    assert error["field"] == "status"


def test_running_limit_is_429(server: ServerProcess) -> None:
    sleepers = [submit(server, {"command": "sleep 60"}, ADMIN) for _ in range(MAX_RUNNING)]
    status, error = request("POST", server.api + "jobs", ADMIN, {"command": "true"})
    assert status == 429
    assert isinstance(error, dict)
    assert f"the maximum is {MAX_RUNNING}" in str(error["message"])
    # Another user is not held back by admin's jobs.
    other = submit(server, {"command": "true"}, BOB)
    wait_ended(server, str(other["id"]), BOB)
    for job in sleepers:
        request("POST", f"{server.api}jobs/{job['id']}/stop", ADMIN, {"grace": 0})
    assert processes_with_cmdline("sleep", "60") == []


def test_stats_images_openapi(server: ServerProcess) -> None:
    job = submit(server, {"command": "echo ready; sleep 30", "memory": "64M"})
    wait_output(server, str(job["id"]), b"ready\n")
    status, stats = request("GET", f"{server.api}jobs/{job['id']}/stats", ALICE)
    assert status == 200
    assert isinstance(stats, dict)
    assert stats["status"] == "RUNNING"
    assert stats["pids"] >= 2
    request("POST", f"{server.api}jobs/{job['id']}/stop", ALICE, {"grace": 0})

    status, images = request("GET", server.api + "images", ALICE)
    assert status == 200
    assert isinstance(images, dict)
    assert [image["name"] for image in images["images"]] == ["default"]

    status, document = request("GET", server.api + "openapi.json", ALICE)
    assert status == 200
    assert isinstance(document, dict)
    assert document["openapi"].startswith("3.")
    assert document["servers"] == [{"url": server.api.rstrip("/")}]
    assert set(document["paths"]) == {
        "/jobs",
        "/jobs/{job_id}",
        "/jobs/{job_id}/stop",
        "/jobs/{job_id}/output",
        "/jobs/{job_id}/stats",
        "/images",
        "/openapi.json",
    }


async def test_async_client(server: ServerProcess) -> None:
    client = AsyncClient(server.url, ALICE)
    job = await client.submit("echo one; sleep 0.5; echo two")
    chunks = [chunk async for chunk in client.follow(job["id"])]
    ended = await client.get(job["id"])

    assert b"".join(chunks) == b"one\ntwo\n"
    assert ended["status"] == "COMPLETED"
    assert await client.output(job["id"], 4) == b"two\n"
    with pytest.raises(LinuxWorkerError) as caught:
        await client.get("0" * 32)
    assert caught.value.status == 404


def test_sync_client_job_handle(server: ServerProcess) -> None:
    client = Client(server.url, ALICE)
    job = client.submit("echo hi; exit 2")
    job.wait(timeout=10)

    assert job.status == "FAILED"
    assert job.exit_code == 2
    assert job.output() == b"hi\n"
    with pytest.raises(LinuxWorkerError) as caught:
        client.submit("true", memory="lots")
    assert caught.value.status == 400
    assert caught.value.field == "memory"


def test_short_id_prefix(server: ServerProcess) -> None:
    job = submit(server, {"command": "echo short"})
    wait_ended(server, str(job["id"]))
    short = str(job["id"])[:12]

    status, found = request("GET", f"{server.api}jobs/{short}", ALICE)
    assert status == 200
    assert isinstance(found, dict)
    assert found["id"] == job["id"]
    assert request("GET", f"{server.api}jobs/{short}/output", ALICE) == (200, b"short\n")
    assert request("GET", f"{server.api}jobs/{short}", BOB)[0] == 404
    assert request("GET", f"{server.api}jobs/{short[:7]}", ALICE)[0] == 404


def test_requests_stay_fast_while_followers_stream(server: ServerProcess) -> None:
    """Followers of a large output do not hold up other requests."""
    job = submit(server, {"command": "yes | head -c 100000000"})
    other = submit(server, {"command": "echo other"})
    wait_ended(server, str(other["id"]))
    followers = [Follower(server, str(job["id"])) for _ in range(10)]

    latencies = []
    while any(f.thread.is_alive() for f in followers) and len(latencies) < 200:
        started = time.monotonic()
        status, _ = request("GET", f"{server.api}jobs/{other['id']}", ALICE)
        latencies.append(time.monotonic() - started)
        assert status == 200
    for follower in followers:
        follower.join(timeout=60)

    latencies.sort()
    assert len(latencies) >= 10
    assert latencies[len(latencies) // 2] < 0.1
    assert latencies[-1] < 1.0
    for follower in followers:
        assert len(follower.data) == 100_000_000


def zombie_children(pid: int) -> list[int]:
    """Return the children of ``pid`` that have exited but were not reaped."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as file:
                stat = file.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        if fields[0] == b"Z" and int(fields[1]) == pid:
            found.append(int(entry))
    return found


def test_ended_supervisors_are_reaped(server: ServerProcess) -> None:
    assert server.process is not None
    jobs = [submit(server, {"command": f"echo {i}"}) for i in range(5)]
    for job in jobs:
        wait_ended(server, str(job["id"]))
    deadline = time.monotonic() + 5
    while zombie_children(server.process.pid) and time.monotonic() < deadline:
        time.sleep(0.1)

    assert zombie_children(server.process.pid) == []
