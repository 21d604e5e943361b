"""A Python client of the linuxworker REST API, and how it finds a server.

Example, in a notebook of a server that runs the extension::

    from jupyter_linuxworker.client import Client

    job = Client().submit("echo hello from $(hostname)")
    job.wait()
    print(job.status, job.output().decode())

Finding the server: an explicit URL and token first, then the environment that the extension
publishes to its kernels (JUPYTER_LINUXWORKER_URL and JUPYTER_LINUXWORKER_TOKEN), then Jupyter's
runtime files, the kernel's parent server first. A server that listens on a Unix socket
(``jupyter server --sock PATH``) has a URL of the form ``http+unix://%2Fpath%2Fto%2Fsocket/``,
as Jupyter writes it: the socket's path, percent-encoded, in place of the host.
"""

from __future__ import annotations

import asyncio
import builtins
import glob
import http.client
import json
import os
import socket
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, Final

URL_ENV: Final = "JUPYTER_LINUXWORKER_URL"
TOKEN_ENV: Final = "JUPYTER_LINUXWORKER_TOKEN"
PARENT_PID_ENV: Final = "JPY_PARENT_PID"
API_PATH: Final = "linuxworker/api/"
DEFAULT_TIMEOUT: Final = 30.0
READ_CHUNK: Final = 64 * 1024
UNIX_SCHEME: Final = "http+unix"
# The Host header of a request over a Unix socket, which has no host name of its own.
UNIX_HOST: Final = "localhost"
URL_FORMS: Final = (
    "http(s)://HOST:PORT/... or http+unix://%2Fpath%2Fto%2Fsocket/... "
    "(the socket's absolute path, percent-encoded)"
)
ENDED: Final = frozenset({"COMPLETED", "FAILED", "STOPPED", "LOST"})
TRUNCATED_NOTE: Final = "cut short; the log ends with a marker that gives the reason"


class LinuxWorkerError(Exception):
    """An error of the API (``status`` is the HTTP code), or a server that cannot be reached."""

    def __init__(self, message: str, status: int = 0, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.field = field


@dataclass(frozen=True)
class ServerInfo:
    """The API's URL (ending with a slash) and a token that it accepts."""

    url: str
    token: str
    note: str = ""


def unix_socket_path(url: str) -> str | None:
    """Return the socket path of an ``http+unix://`` URL, or None for another scheme."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != UNIX_SCHEME:
        return None
    return urllib.parse.unquote(parts.netloc)


def unreachable(url: str, error: OSError) -> LinuxWorkerError:
    """Return the error for a server at ``url`` that could not be reached, for ``error``."""
    path = unix_socket_path(url)
    if path is None:
        return LinuxWorkerError(f"cannot reach the Jupyter server at {url}: {error}")
    return LinuxWorkerError(
        f"cannot reach the Jupyter server at {url} (Unix socket {path}): {error}; "
        f"is a server running with --ServerApp.sock={path}?"
    )


def check_url(url: str) -> urllib.parse.SplitResult:
    """Return the parts of the server URL ``url``; raise LinuxWorkerError if it names no server."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == UNIX_SCHEME:
        valid = urllib.parse.unquote(parts.netloc).startswith("/")
    else:
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
    if not valid:
        raise LinuxWorkerError(f"invalid server URL {url!r}: expected {URL_FORMS}", field="url")
    return parts


class UnixHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to a server that listens on the Unix socket at ``path``."""

    def __init__(self, path: str, timeout: float | None = None) -> None:
        super().__init__(UNIX_HOST, timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        """Connect to the socket instead of a host and port."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _runtime_dir() -> str:
    try:
        from jupyter_core.paths import jupyter_runtime_dir

        return jupyter_runtime_dir()
    except ImportError:  # pragma: no cover - jupyter_core comes with jupyter_server
        return os.path.expanduser("~/.local/share/jupyter/runtime")


def _runtime_servers() -> list[dict[str, Any]]:
    """Return the servers described by Jupyter's runtime files, newest first."""
    servers = []
    for path in glob.glob(os.path.join(_runtime_dir(), "jpserver-*.json")):
        try:
            with open(path, encoding="utf-8") as file:
                info = json.load(file)
            info["_mtime"] = os.path.getmtime(path)
        except (OSError, json.JSONDecodeError):
            continue
        servers.append(info)
    return sorted(servers, key=lambda info: info["_mtime"], reverse=True)


def discover(url: str | None = None, token: str | None = None) -> ServerInfo:
    """Return where the API is; raise LinuxWorkerError naming what was tried."""
    if url:
        api = url.rstrip("/") + "/"
        if not api.endswith(API_PATH):
            api += API_PATH
        if not token:
            # The runtime file of a server at that URL contains its token.
            for info in _runtime_servers():
                base = info.get("url", "").rstrip("/") + "/"
                if api.startswith(base):
                    token = info.get("token", "")
                    break
        return ServerInfo(api, token or "")
    if os.environ.get(URL_ENV):
        return ServerInfo(
            os.environ[URL_ENV].rstrip("/") + "/", token or os.environ.get(TOKEN_ENV, "")
        )

    servers = _runtime_servers()
    parent = os.environ.get(PARENT_PID_ENV)
    servers.sort(key=lambda info: str(info.get("pid")) != parent)
    for info in servers:
        base = info.get("url", "").rstrip("/") + "/"
        note = ""
        if len(servers) > 1 and str(info.get("pid")) != parent:
            note = (
                f"{len(servers)} Jupyter servers are running; using the newest, {base} "
                "(choose one with --url)"
            )
        return ServerInfo(base + API_PATH, token or info.get("token", ""), note)
    raise LinuxWorkerError(
        f"no Jupyter server found: set {URL_ENV} and {TOKEN_ENV}, pass --url and --token, "
        f"or start a server (no runtime file in {_runtime_dir()})"
    )


class Job:
    """A handle on one job: its last known state, and the calls that act on it."""

    def __init__(self, client: Client, data: dict[str, Any]) -> None:
        self.client = client
        self.data = data

    @property
    def id(self) -> str:
        """Return the job's id."""
        return str(self.data["id"])

    @property
    def status(self) -> str:
        """Return the status last seen (call :meth:`refresh` for the current one)."""
        return str(self.data["status"])

    @property
    def exit_code(self) -> int | None:
        """Return the exit code once the job has ended."""
        code = self.data.get("exit_code")
        return None if code is None else int(code)

    def summary(self) -> str:
        """Return the job's status, exit code, reason and whether output was dropped, a line each.

        Lines without a value are left out: a running job has no exit code yet.
        """
        lines = [f"Status: {self.status}"]
        if self.exit_code is not None:
            lines.append(f"Exit code: {self.exit_code}")
        if self.data.get("reason"):
            detail = self.data.get("detail")
            lines.append(f"Reason: {self.data['reason']}" + (f" ({detail})" if detail else ""))
        if self.data.get("output_truncated"):
            lines.append(f"Output: {TRUNCATED_NOTE}")
        return "\n".join(lines) + "\n"

    def refresh(self) -> Job:
        """Fetch the job's current state."""
        self.data = self.client.get(self.id)
        return self

    def wait(self, timeout: float | None = None) -> Job:
        """Return once the job has ended, following its output until then."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for _chunk in self.client.follow(self.id, timeout=timeout):
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {self.id} did not end within {timeout} s")
        return self.refresh()

    def output(self, offset: int = 0) -> bytes:
        """Return the job's output from ``offset``."""
        return self.client.output(self.id, offset)

    def stop(self, grace: float | None = None) -> Job:
        """Stop the job and return once it has ended."""
        self.data = self.client.stop(self.id, grace)
        return self

    def __repr__(self) -> str:
        # The status is left out: it would only be the one last fetched, which soon goes stale.
        return f"<Job {self.id[:12]} {self.data.get('name')!r}>"


class Client:
    """A blocking client of the linuxworker API."""

    def __init__(
        self, url: str | None = None, token: str | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        if url:
            check_url(url)
        self.server = discover(url, token)
        self.timeout = timeout
        self._parts = check_url(self.server.url)

    def _connection(self, timeout: float | None) -> http.client.HTTPConnection:
        path = unix_socket_path(self.server.url)
        if path is not None:
            return UnixHTTPConnection(path, timeout=timeout)
        cls = (
            http.client.HTTPSConnection
            if self._parts.scheme == "https"
            else http.client.HTTPConnection
        )
        return cls(self._parts.hostname or "", self._parts.port, timeout=timeout)

    def _open(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: dict[str, Any] | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        query = "?" + urllib.parse.urlencode(params, doseq=True) if params else ""
        target = self._parts.path + path + query
        headers = {"Authorization": f"token {self.server.token}", "Accept": "application/json"}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        connection = self._connection(timeout)
        try:
            connection.request(method, target, body=payload, headers=headers)
            response = connection.getresponse()
        except OSError as error:
            connection.close()
            raise unreachable(self.server.url, error) from None
        if response.status >= 400:
            data = response.read()
            connection.close()
            raise _api_error(response.status, data)
        return connection, response

    def _json(
        self, method: str, path: str, body: Any = None, params: dict[str, Any] | None = None
    ) -> Any:
        connection, response = self._open(method, path, body, params, self.timeout)
        try:
            data = response.read()
        finally:
            connection.close()
        return json.loads(data) if data else None

    def submit(self, command: str | list[str], **fields: Any) -> Job:
        """Submit ``command`` with the spec's other ``fields``; return its handle."""
        return Job(self, self._json("POST", "jobs", {"command": command, **fields}))

    def get(self, job_id: str) -> dict[str, Any]:
        """Return one job as the API describes it."""
        data: dict[str, Any] = self._json("GET", f"jobs/{urllib.parse.quote(job_id)}")
        return data

    def job(self, job_id: str) -> Job:
        """Return a handle on job ``job_id``."""
        return Job(self, self.get(job_id))

    def list(
        self, status: str | None = None, limit: int = 50, cursor: str | None = None
    ) -> dict[str, Any]:
        """Return one page of jobs, newest first, with ``next_cursor`` for the next page."""
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status.upper()
        if cursor:
            params["cursor"] = cursor
        data: dict[str, Any] = self._json("GET", "jobs", params=params)
        return data

    def jobs(self, status: str | None = None, page_size: int = 100) -> Iterator[dict[str, Any]]:
        """Yield every job, newest first, page by page."""
        cursor = None
        while True:
            page = self.list(status, page_size, cursor)
            yield from page["jobs"]
            cursor = page["next_cursor"]
            if not cursor:
                return

    def stop(self, job_id: str, grace: float | None = None) -> dict[str, Any]:
        """Stop a job and return it once ended."""
        body = {} if grace is None else {"grace": grace}
        data: dict[str, Any] = self._json("POST", f"jobs/{urllib.parse.quote(job_id)}/stop", body)
        return data

    def delete(self, job_id: str) -> None:
        """Delete an ended job and its output."""
        self._json("DELETE", f"jobs/{urllib.parse.quote(job_id)}")

    def stats(self, job_id: str) -> dict[str, Any]:
        """Return a job's resource usage."""
        data: dict[str, Any] = self._json("GET", f"jobs/{urllib.parse.quote(job_id)}/stats")
        return data

    def images(self) -> builtins.list[dict[str, Any]]:
        """Return the images jobs can run in."""
        data: dict[str, Any] = self._json("GET", "images")
        return list(data["images"])

    def output(self, job_id: str, offset: int = 0) -> bytes:
        """Return a job's output from ``offset``, as raw bytes."""
        path = f"jobs/{urllib.parse.quote(job_id)}/output"
        connection, response = self._open(
            "GET", path, params={"offset": offset}, timeout=self.timeout
        )
        try:
            return response.read()
        finally:
            connection.close()

    def follow(self, job_id: str, offset: int = 0, timeout: float | None = None) -> Iterator[bytes]:
        """Yield a job's output as it arrives, until the job has ended and all is sent."""
        path = f"jobs/{urllib.parse.quote(job_id)}/output"
        connection, response = self._open(
            "GET", path, params={"offset": offset, "follow": 1}, timeout=timeout
        )
        try:
            while True:
                chunk = response.read1(READ_CHUNK)
                if not chunk:
                    return
                yield chunk
        finally:
            connection.close()


def _api_error(status: int, data: bytes) -> LinuxWorkerError:
    try:
        body = json.loads(data)
        message = body.get("message") or body.get("reason") or data.decode(errors="replace")
        field = body.get("field")
    except (json.JSONDecodeError, AttributeError):
        message, field = (
            data.decode(errors="replace").strip() or http.client.responses.get(status, ""),
            None,
        )
    if status == 403:
        message += "; check the token (pass --token, or let the server's runtime file provide it)"
    return LinuxWorkerError(f"{message} (HTTP {status})", status, field)


class AsyncClient:
    """The same API as :class:`Client` for asyncio code, such as widgets on a kernel's loop."""

    def __init__(
        self, url: str | None = None, token: str | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        if url:
            check_url(url)
        self.server = discover(url, token)
        self.timeout = timeout
        parts = check_url(self.server.url)
        self._socket_path = unix_socket_path(self.server.url)
        # tornado takes a host name in the URL; the resolver below maps it to the socket.
        self._base = (
            self.server.url if self._socket_path is None else f"http://{UNIX_HOST}{parts.path}"
        )
        self._unix_client: Any = None

    def _http_client(self) -> Any:
        from tornado.httpclient import AsyncHTTPClient

        if self._socket_path is None:
            return AsyncHTTPClient()
        if self._unix_client is None:
            self._unix_client = AsyncHTTPClient(
                force_instance=True, resolver=_unix_resolver(self._socket_path)
            )
        return self._unix_client

    def _request(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        from tornado.httpclient import HTTPRequest

        query = "?" + urllib.parse.urlencode(params, doseq=True) if params else ""
        headers = {"Authorization": f"token {self.server.token}"}
        payload = None
        if body is not None:
            payload = json.dumps(body)
            headers["Content-Type"] = "application/json"
        elif method == "POST":
            payload = "{}"
        # tornado measures request_timeout from the start; None means no limit for follow.
        limit = self.timeout if timeout is None else timeout
        return HTTPRequest(
            self._base + path + query,
            method=method,
            headers=headers,
            body=payload,
            request_timeout=limit,
            **kwargs,
        )

    async def _fetch(self, request: Any) -> Any:
        from tornado.httpclient import HTTPClientError

        try:
            return await self._http_client().fetch(request)
        except HTTPClientError as error:
            body = error.response.body if error.response is not None else b""
            raise _api_error(error.code, body) from None
        except OSError as error:
            raise unreachable(self.server.url, error) from None

    async def _json(
        self, method: str, path: str, body: Any = None, params: dict[str, Any] | None = None
    ) -> Any:
        response = await self._fetch(self._request(method, path, body, params))
        return json.loads(response.body) if response.body else None

    async def submit(self, command: str | list[str], **fields: Any) -> dict[str, Any]:
        """Submit ``command`` with the spec's other ``fields``; return the job."""
        data: dict[str, Any] = await self._json("POST", "jobs", {"command": command, **fields})
        return data

    async def get(self, job_id: str) -> dict[str, Any]:
        """Return one job."""
        data: dict[str, Any] = await self._json("GET", f"jobs/{urllib.parse.quote(job_id)}")
        return data

    async def list(
        self, status: str | None = None, limit: int = 50, cursor: str | None = None
    ) -> dict[str, Any]:
        """Return one page of jobs, newest first."""
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        if cursor:
            params["cursor"] = cursor
        data: dict[str, Any] = await self._json("GET", "jobs", params=params)
        return data

    async def stop(self, job_id: str, grace: float | None = None) -> dict[str, Any]:
        """Stop a job and return it once ended."""
        body = {} if grace is None else {"grace": grace}
        data: dict[str, Any] = await self._json(
            "POST", f"jobs/{urllib.parse.quote(job_id)}/stop", body
        )
        return data

    async def delete(self, job_id: str) -> None:
        """Delete an ended job and its output."""
        await self._json("DELETE", f"jobs/{urllib.parse.quote(job_id)}")

    async def stats(self, job_id: str) -> dict[str, Any]:
        """Return a job's resource usage."""
        data: dict[str, Any] = await self._json("GET", f"jobs/{urllib.parse.quote(job_id)}/stats")
        return data

    async def output(self, job_id: str, offset: int = 0) -> bytes:
        """Return a job's output from ``offset``."""
        path = f"jobs/{urllib.parse.quote(job_id)}/output"
        response = await self._fetch(self._request("GET", path, params={"offset": offset}))
        body: bytes = response.body
        return body

    async def follow(self, job_id: str, offset: int = 0) -> AsyncIterator[bytes]:
        """Yield a job's output as it arrives, until the job has ended and all is sent."""
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        path = f"jobs/{urllib.parse.quote(job_id)}/output"
        request = self._request(
            "GET",
            path,
            params={"offset": offset, "follow": 1},
            timeout=0,
            streaming_callback=queue.put_nowait,
        )
        request.request_timeout = None
        fetch = asyncio.ensure_future(self._fetch(request))
        fetch.add_done_callback(lambda _future: queue.put_nowait(None))
        try:
            while (chunk := await queue.get()) is not None:
                yield chunk
            await fetch
        finally:
            fetch.cancel()


def _unix_resolver(path: str) -> Any:
    """Return a tornado resolver that sends every host to the Unix socket at ``path``."""
    from tornado.netutil import Resolver

    class UnixResolver(Resolver):
        async def resolve(
            self, host: str, port: int, family: socket.AddressFamily = socket.AF_UNSPEC
        ) -> list[tuple[int, Any]]:
            return [(socket.AF_UNIX, path)]

    return UnixResolver()
