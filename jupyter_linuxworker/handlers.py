"""REST handlers of the linuxworker API, under ``{base_url}linuxworker/api/``."""

from __future__ import annotations

import codecs
import hmac
import json
from typing import TYPE_CHECKING, Any, Final, cast

from jupyter_server.auth.decorator import authorized
from jupyter_server.auth.identity import User
from jupyter_server.base.handlers import APIHandler
from jupyter_server.extension.handler import ExtensionHandlerMixin
from tornado import web
from tornado.iostream import StreamClosedError

from .sandbox import outputlog
from .sandbox.images import ImageError
from .sandbox.manager import JobConflict, JobNotFound
from .sandbox.spec import SpecError
from .sandbox.store import MAX_PAGE_SIZE, JobRecord, JobStatus

if TYPE_CHECKING:
    from .server_ext import LinuxWorkerApp

AUTH_RESOURCE: Final = "linuxworker:jobs"
IMAGES_RESOURCE: Final = "linuxworker:images"
API_PREFIX: Final = "linuxworker/api"
JOB_ID_REGEX: Final = r"(?P<job_id>[^/]+)"
SSE_CONTENT_TYPE: Final = "text/event-stream"
OCTET_STREAM: Final = "application/octet-stream"
MIN_ID_PREFIX: Final = 8
FULL_ID_LENGTH: Final = 32


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
            raise web.HTTPError(404, f"job {job_id!r} not found") from None
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
        super().write_error(status_code, **kwargs)


def _request_token(header: str) -> str:
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() in ("token", "bearer") else ""


def _int_argument(handler: web.RequestHandler, name: str, default: int, minimum: int = 0) -> int:
    text = handler.get_argument(name, None)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise web.HTTPError(
            400, f"{name}: invalid value {text!r}: expected a whole number"
        ) from None
    if value < minimum:
        raise web.HTTPError(400, f"{name}: invalid value {text!r}: expected {minimum} or more")
    return value


class JobsHandler(LinuxWorkerHandler):
    """Submit jobs and list them."""

    @web.authenticated
    @authorized
    async def get(self) -> None:
        """List the user's jobs, newest first, ``limit`` at a time after ``cursor``."""
        statuses = []
        for text in self.get_arguments("status"):
            for name in text.split(","):
                try:
                    statuses.append(JobStatus(name.strip().upper()))
                except ValueError:
                    allowed = ", ".join(status.value for status in JobStatus)
                    raise web.HTTPError(
                        400, f"status: invalid value {name!r}: expected one of {allowed}"
                    ) from None
        limit = min(_int_argument(self, "limit", 50, minimum=1), MAX_PAGE_SIZE)
        cursor = self.get_argument("cursor", None)
        before = None if cursor is None else _int_argument(self, "cursor", 0, minimum=1)
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
        try:
            body = json.loads(self.request.body or b"{}")
        except json.JSONDecodeError as error:
            raise web.HTTPError(400, f"the request body is not valid JSON: {error}") from None
        running = self.app.manager.list(
            statuses=(JobStatus.PENDING, JobStatus.RUNNING), owner=self.owner, limit=MAX_PAGE_SIZE
        )
        if len(running) >= self.app.max_running_jobs_per_user:
            raise web.HTTPError(
                429,
                f"{len(running)} jobs are running for {self.owner!r}, the maximum is "
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
        body = json.loads(self.request.body or b"{}") if self.request.body else {}
        grace = body.get("grace") if isinstance(body, dict) else None
        if grace is not None and (
            isinstance(grace, bool) or not isinstance(grace, int | float) or grace < 0
        ):
            raise web.HTTPError(400, f"grace: invalid value {grace!r}: expected 0 or more seconds")
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
            {"id": record.id, "status": record.status.value, **self.app.manager.stats(record.id)}
        )


class OutputHandler(LinuxWorkerHandler):
    """A job's output: bytes from an offset, followed live, or as Server-Sent Events."""

    @web.authenticated
    @authorized
    async def get(self, job_id: str) -> None:
        """Send output from ``offset``; with ``follow=1`` keep sending until the job has ended."""
        job_id = self.get_job(job_id).id
        offset = _int_argument(self, "offset", 0)
        follow = self.get_argument("follow", "0") in ("1", "true", "yes")
        sse = self.get_argument(
            "format", ""
        ) == "sse" or SSE_CONTENT_TYPE in self.request.headers.get("Accept", "")

        if sse:
            await self._send_events(job_id, offset, follow)
            return
        self.set_header("Content-Type", OCTET_STREAM)
        if not follow:
            self.finish(self.app.manager.read_output(job_id, offset), set_content_type=OCTET_STREAM)
            return
        try:
            async for chunk in self.app.manager.follow(job_id, offset):
                self.write(chunk)
                await self.flush()
        except StreamClosedError:
            return
        self.finish(set_content_type=OCTET_STREAM)

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
            self.write(f"event: end\ndata: {json.dumps(record.to_dict())}\n\n")
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
        self.write_json({"images": [image.to_dict() for image in images]})


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
