"""REST handlers of the linuxworker API, under ``{base_url}linuxworker/api/``."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import hmac
import json
import math
import re
from typing import TYPE_CHECKING, Any, BinaryIO, Final, cast

from jupyter_server.auth.decorator import authorized
from jupyter_server.auth.identity import User
from jupyter_server.base.handlers import APIHandler
from jupyter_server.extension.handler import ExtensionHandlerMixin
from tornado import web
from tornado.http1connection import HTTP1Connection
from tornado.iostream import StreamClosedError

from .sandbox import outputlog
from .sandbox.images import ImageError
from .sandbox.manager import JobConflict, JobNotFound
from .sandbox.spec import SpecError
from .sandbox.store import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, JobRecord, JobStatus, iso_time

if TYPE_CHECKING:
    from .server_ext import LinuxWorkerApp

AUTH_RESOURCE: Final = "linuxworker:jobs"
IMAGES_RESOURCE: Final = "linuxworker:images"
API_PREFIX: Final = "linuxworker/api"
JOB_ID_REGEX: Final = r"(?P<job_id>[^/]+)"
SSE_CONTENT_TYPE: Final = "text/event-stream"
OCTET_STREAM: Final = "application/octet-stream"
TEXT_PLAIN: Final = "text/plain; charset=utf-8"
MAX_GRACE: Final = 3600.0
MAX_INT: Final = 2**63 - 1  # SQLite's largest integer
DIGITS: Final = re.compile(r"[0-9]+")
MIN_ID_PREFIX: Final = 8
FULL_ID_LENGTH: Final = 32


class InvalidArgument(web.HTTPError):
    """A 400 for one bad query argument or body field, which the JSON error names."""

    def __init__(self, field: str, value: object, allowed: str) -> None:
        super().__init__(400, f"{field}: invalid value {value!r}: {allowed}")
        self.field = field


class LinuxWorkerHandler(ExtensionHandlerMixin, APIHandler):
    """Base handler: the extension's own token, owner checks, JSON errors with the bad field."""

    auth_resource = AUTH_RESOURCE

    @property
    def app(self) -> LinuxWorkerApp:
        """Return the extension application."""
        return cast("LinuxWorkerApp", self.extensionapp)

    async def prepare(self) -> None:  # type: ignore[override]
        # A kernel calls with the token the extension published, which this API alone accepts;
        # it acts for the server's owner. Everything else goes through jupyter_server's auth.
        token = _request_token(self.request.headers.get("Authorization", ""))
        if token and hmac.compare_digest(token, self.app.api_token):
            self.current_user = self._jupyter_current_user = User(username=self.app.server_owner)
            self._token_authenticated = True
        else:
            await super().prepare()
        await self.app.ensure_started()

    @property
    def owner(self) -> str:
        """Return the name that owns the jobs this request submits."""
        return self.app.owner_of(self.current_user)

    @property
    def is_admin(self) -> bool:
        """Return whether the current user may see and stop everyone's jobs."""
        return self.owner in self.app.admin_users

    def get_job(self, job_id: str) -> JobRecord:
        """Return the job if it exists and the user may see it; raise 404 otherwise.

        A unique prefix of at least ``MIN_ID_PREFIX`` digits names a job too, as the short ids
        that listings show.
        """
        if MIN_ID_PREFIX <= len(job_id) < FULL_ID_LENGTH:
            owner = None if self.is_admin else self.owner
            matches = self.app.manager.store.ids_with_prefix(job_id, owner)
            if len(matches) > 1:
                raise web.HTTPError(
                    400, f"job id prefix {job_id!r} matches several jobs; give more digits"
                )
            if matches:
                job_id = matches[0]
        try:
            record = self.app.manager.get(job_id)
        except JobNotFound:
            hint = ""
            if len(job_id) < MIN_ID_PREFIX:
                hint = (
                    f"; give the 32-digit id or a unique prefix of {MIN_ID_PREFIX} or more digits"
                )
            raise web.HTTPError(404, f"job {job_id!r} not found{hint}") from None
        if record.owner != self.owner and not self.is_admin:
            # Someone else's job is reported as missing, so its id reveals nothing.
            raise web.HTTPError(404, f"job {job_id!r} not found")
        return record

    def write_json(self, data: Any, status: int = 200) -> None:
        """Send ``data`` as JSON with ``status``."""
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(data))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Send errors as JSON in the jupyter_server form, with the bad field for 400."""
        exc_info = kwargs.get("exc_info")
        error = exc_info[1] if exc_info else None
        if isinstance(error, SpecError):
            self.set_status(400)
            self.write_json(
                {"message": str(error), "reason": "invalid spec", "field": error.field}, 400
            )
            return
        if isinstance(error, InvalidArgument):
            message = error.log_message or ""
            self.write_json(
                {"message": message, "reason": "invalid argument", "field": error.field}, 400
            )
            return
        if status_code == 405:
            allowed = [m for m in self.SUPPORTED_METHODS if type(self).__dict__.get(m.lower())]
            self.set_header("Allow", ", ".join(allowed))
        super().write_error(status_code, **kwargs)

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        """Log a rejected spec as one warning line; anything else as jupyter_server does."""
        if isinstance(value, SpecError):
            self.log.warning("linuxworker: rejected job spec from %s: %s", self.owner, value)
            return
        super().log_exception(typ, value, tb)

    def json_body(self, empty: Any = None) -> Any:
        """Return the request's JSON body, or ``empty`` without one. Raise 400 if it is not JSON."""
        if not self.request.body:
            return empty
        try:
            return json.loads(self.request.body)
        except ValueError as error:
            raise web.HTTPError(400, f"the request body is not valid JSON: {error}") from None


def _request_token(header: str) -> str:
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() in ("token", "bearer") else ""


def _int_argument(
    handler: web.RequestHandler, name: str, default: int, minimum: int = 0, maximum: int = MAX_INT
) -> int:
    # strip=False: tornado turns control characters into spaces and would strip them, and
    # the API document allows digits only.
    text = handler.get_argument(name, None, strip=False)
    if text is None:
        return default
    if not DIGITS.fullmatch(text) or not minimum <= int(text) <= maximum:
        raise InvalidArgument(name, text, f"expected a whole number from {minimum} to {maximum}")
    return int(text)


def _choice_argument(handler: web.RequestHandler, name: str, choices: tuple[str, ...]) -> str:
    value = handler.get_argument(name, choices[0], strip=False)
    if value not in choices:
        expected = " or ".join(repr(choice) for choice in choices)
        raise InvalidArgument(name, value, f"expected {expected}")
    return value


class JobsHandler(LinuxWorkerHandler):
    """Submit jobs and list them."""

    @web.authenticated
    @authorized
    async def get(self) -> None:
        """List the user's jobs, newest first, ``limit`` at a time after ``cursor``."""
        statuses = []
        for name in self.get_arguments("status", strip=False):
            try:
                statuses.append(JobStatus(name))
            except ValueError:
                allowed = ", ".join(status.value for status in JobStatus)
                raise InvalidArgument("status", name, f"expected one of {allowed}") from None
        limit = _int_argument(self, "limit", DEFAULT_PAGE_SIZE, minimum=1, maximum=MAX_PAGE_SIZE)
        # No cursor reads as 0, which a request cannot send: cursors start at 1.
        before = _int_argument(self, "cursor", 0, minimum=1) or None
        owner = None if self.is_admin else self.owner
        records = self.app.manager.list(
            statuses=tuple(statuses), owner=owner, before_seq=before, limit=limit + 1
        )
        page = records[:limit]
        next_cursor = str(page[-1].seq) if len(records) > limit else None
        self.write_json({"jobs": [r.to_dict() for r in page], "next_cursor": next_cursor})

    @web.authenticated
    @authorized
    async def post(self) -> None:
        """Submit a job: 201 with the job, 400 naming a bad field, 429 past the running limit."""
        body = self.json_body()
        limit = self.app.max_running_jobs_per_user
        running = self.app.manager.count_active(self.owner)
        if running >= limit:
            # The quick count may include jobs that have just ended: refresh them to be exact.
            running = len(
                self.app.manager.list(
                    statuses=(JobStatus.PENDING, JobStatus.RUNNING),
                    owner=self.owner,
                    limit=MAX_PAGE_SIZE,
                )
            )
        if running >= limit:
            raise web.HTTPError(
                429,
                f"{running} jobs are running for {self.owner!r}, the maximum is "
                f"{self.app.max_running_jobs_per_user}; wait for one to end or stop one",
            )
        record = await self.app.manager.submit(self.app.complete_spec(body), owner=self.owner)
        self.set_header("Location", self.app.job_url(record.id))
        self.write_json(record.to_dict(), 201)


class JobHandler(LinuxWorkerHandler):
    """Inspect or delete one job."""

    @web.authenticated
    @authorized
    async def get(self, job_id: str) -> None:
        """Return the job."""
        self.write_json(self.get_job(job_id).to_dict())

    @web.authenticated
    @authorized
    async def delete(self, job_id: str) -> None:
        """Delete an ended job with its output; 409 while it runs."""
        job_id = self.get_job(job_id).id
        try:
            await self.app.manager.delete(job_id)
        except JobConflict as error:
            raise web.HTTPError(409, str(error)) from None
        self.set_status(204)
        self.finish(set_content_type="text/plain")


class StopHandler(LinuxWorkerHandler):
    """Stop a job."""

    @web.authenticated
    @authorized
    async def post(self, job_id: str) -> None:
        """Stop the job (SIGTERM, then SIGKILL after ``grace`` seconds); return it once ended."""
        job_id = self.get_job(job_id).id
        # An empty body means no options. A JSON null is invalid, because the API document
        # requires an object.
        body = self.json_body(empty={})
        if not isinstance(body, dict):
            raise web.HTTPError(
                400, f'invalid body {json.dumps(body)}: expected {{}} or {{"grace": seconds}}'
            )
        unknown = sorted(set(body) - {"grace"})
        if unknown:
            raise InvalidArgument(
                unknown[0], body[unknown[0]], "unknown field; known fields: grace"
            )
        grace = body.get("grace")
        if grace is not None and (
            isinstance(grace, bool)
            or not isinstance(grace, int | float)
            or not math.isfinite(grace)
            or not 0 <= grace <= MAX_GRACE
        ):
            raise InvalidArgument("grace", grace, f"expected 0 to {MAX_GRACE:g} seconds")
        record = await self.app.manager.stop(job_id, grace=grace)
        self.write_json(record.to_dict())


class StatsHandler(LinuxWorkerHandler):
    """Resource usage of a job."""

    @web.authenticated
    @authorized
    async def get(self, job_id: str) -> None:
        """Return the job's usage: live while it runs, final once it has ended."""
        record = self.get_job(job_id)
        self.write_json(
            {
                "id": record.id,
                "status": record.status.value,
                **self.app.manager.stats(record.id),
                "limits": self.app.manager.limits(record.id),
            }
        )


class OutputHandler(LinuxWorkerHandler):
    """A job's output: bytes from an offset, followed live, or as Server-Sent Events."""

    @web.authenticated
    @authorized
    async def get(self, job_id: str) -> None:
        """Send output from ``offset``; with ``follow=1`` keep sending until the job has ended."""
        job_id = self.get_job(job_id).id
        offset = _int_argument(self, "offset", 0)
        follow = _choice_argument(self, "follow", ("0", "1")) == "1"
        output_format = _choice_argument(self, "format", ("raw", "sse", "text"))
        sse = output_format == "sse" or SSE_CONTENT_TYPE in self.request.headers.get("Accept", "")

        if sse:
            await self._send_events(job_id, offset, follow)
            return
        # "text" lets a browser tab show the log instead of downloading it; the bytes are the same.
        content_type = TEXT_PLAIN if output_format == "text" else OCTET_STREAM
        self.set_header("Content-Type", content_type)
        if not follow:
            self.finish(self.app.manager.read_output(job_id, offset), set_content_type=content_type)
            return
        try:
            # Sends the headers; after that, they show whether the body is chunked.
            await self.flush()
            connection = self.request.connection
            chunked = self._headers.get("Transfer-Encoding") == "chunked"
            if chunked and self.app.sendfile_output and isinstance(connection, HTTP1Connection):
                await self._send_chunks_from_file(job_id, offset, connection)
            else:
                async for chunk in self.app.manager.follow(job_id, offset):
                    self.write(chunk)
                    await self.flush()
        except (StreamClosedError, ConnectionError):
            return
        self.finish(set_content_type=content_type)

    async def _send_chunks_from_file(
        self, job_id: str, offset: int, connection: HTTP1Connection
    ) -> None:
        """Send the log as HTTP chunks with sendfile: the kernel copies it to the socket.

        Tornado's own writes copy each chunk in Python, which costs a follower of a fast job
        more CPU than the job. Tornado's buffer is empty here (the headers were flushed) and
        it writes nothing until this returns, so the socket is free for these writes.

        The writes go to a duplicate of the socket's descriptor. Tornado closes its own
        descriptor once it finds that the reader has left. A write still waiting on that
        number would then fail with EBADF, and the number may already belong to a new
        connection.
        """
        loop = asyncio.get_running_loop()
        stream_socket = connection.stream.socket
        if stream_socket is None:
            raise StreamClosedError()
        path = self.app.manager.output_path(job_id)
        with contextlib.ExitStack() as stack:
            sock = stack.enter_context(stream_socket.dup())
            log_file: BinaryIO | None = None
            async for start, length in self.app.manager.follow_extents(job_id, offset):
                if log_file is None:
                    # The supervisor creates the log when the job starts, so it exists now.
                    log_file = stack.enter_context(open(path, "rb"))
                await loop.sock_sendall(sock, b"%x\r\n" % length)
                await loop.sock_sendfile(sock, log_file, start, length)
                await loop.sock_sendall(sock, b"\r\n")

    async def _send_events(self, job_id: str, offset: int, follow: bool) -> None:
        # Browsers get text: each stream is decoded on its own, so a UTF-8 character split
        # across two reads stays whole, and bytes that are not UTF-8 become U+FFFD.
        self.set_header("Content-Type", SSE_CONTENT_TYPE)
        self.set_header("Cache-Control", "no-cache")
        decoders = {
            stream: codecs.getincrementaldecoder("utf-8")("replace")
            for stream in outputlog.STREAM_NAMES
        }
        position = offset
        # Without follow, the status is read before the output, so "end" is sent only when
        # every byte of the ended job is in this response.
        ended_before = self.get_job(job_id).status.ended
        try:
            pieces = (
                self.app.manager.follow_streams(job_id, offset)
                if follow
                else _pieces(self, job_id, offset)
            )
            async for stream, data in pieces:
                text = decoders[stream].decode(data)
                position += len(data)
                event = {"stream": outputlog.STREAM_NAMES[stream], "text": text, "offset": position}
                self.write(f"event: output\ndata: {json.dumps(event)}\n\n")
                await self.flush()
            record = self.get_job(job_id)
            # Without follow the stream stops at the end of what is written so far.
            kind = "end" if (record.status.ended and (follow or ended_before)) else "status"
            self.write(f"event: {kind}\ndata: {json.dumps(record.to_dict())}\n\n")
            await self.flush()
        except StreamClosedError:
            return
        self.finish(set_content_type=SSE_CONTENT_TYPE)


async def _pieces(handler: LinuxWorkerHandler, job_id: str, offset: int):  # type: ignore[no-untyped-def]
    manager = handler.app.manager
    data = manager.read_output(job_id, offset)
    for piece in outputlog.split_streams(data, offset, manager.stderr_ranges(job_id)):
        yield piece


class ImagesHandler(LinuxWorkerHandler):
    """List the images that jobs can run in."""

    auth_resource = IMAGES_RESOURCE

    @web.authenticated
    @authorized
    async def get(self) -> None:
        """List the images."""
        try:
            images = self.app.manager.images.list()
        except ImageError as error:
            raise web.HTTPError(500, str(error)) from None
        listed = []
        for image in images:
            data = image.to_dict()
            data["created_at"] = iso_time(image.created_at)
            listed.append(data)
        self.write_json({"images": listed})


class OpenAPIHandler(LinuxWorkerHandler):
    """The OpenAPI document of this API."""

    @web.authenticated
    async def get(self) -> None:
        """Return the OpenAPI document."""
        self.write_json(self.app.openapi_document())


def handlers() -> list[tuple[str, type[LinuxWorkerHandler]]]:
    """Return the URL patterns of the API, relative to the server's base URL."""
    job = rf"/{API_PREFIX}/jobs/{JOB_ID_REGEX}"
    return [
        (rf"/{API_PREFIX}/jobs", JobsHandler),
        (job, JobHandler),
        (rf"{job}/stop", StopHandler),
        (rf"{job}/output", OutputHandler),
        (rf"{job}/stats", StatsHandler),
        (rf"/{API_PREFIX}/images", ImagesHandler),
        (rf"/{API_PREFIX}/openapi.json", OpenAPIHandler),
    ]
