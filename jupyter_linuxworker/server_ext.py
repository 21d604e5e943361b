"""The Jupyter server extension: owns the job engine inside a running server.

Enable it with ``jupyter server extension enable jupyter_linuxworker`` (pip does it on install
through ``jupyter_server_config.d``). Configure it as ``c.LinuxWorkerApp.<trait>``.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import secrets
from importlib import resources
from typing import Any, Final

from jupyter_server.auth.identity import IdentityProvider, PasswordIdentityProvider, User
from jupyter_server.extension.application import ExtensionApp
from jupyter_server.serverapp import ServerApp
from traitlets import Bool, Float, Int, List, Unicode, default

from .handlers import API_PREFIX, handlers
from .sandbox import userns
from .sandbox.manager import (
    DEFAULT_GRACE,
    DEFAULT_MEMORY,
    DEFAULT_PIDS,
    JobManager,
    default_state_dir,
)
from .sandbox.spec import DEFAULT_OUTPUT_CAP, Limits, SpecError
from .sandbox.units import UnitError, parse_size

URL_ENV: Final = "JUPYTER_LINUXWORKER_URL"
TOKEN_ENV: Final = "JUPYTER_LINUXWORKER_TOKEN"
DEFAULT_MAX_RUNNING_JOBS: Final = 50
# The stock identity providers of a single-user server name each token-authenticated request
# after a random moon, so their usernames cannot tell owners apart.
_SINGLE_USER_PROVIDERS: Final = (IdentityProvider, PasswordIdentityProvider)


class LinuxWorkerApp(ExtensionApp):
    """Run shell commands as jobs in Linux containers, behind a REST API."""

    name = "jupyter_linuxworker"
    description = __doc__

    state_dir = Unicode(help="Folder of job records, outputs and images.").tag(config=True)
    default_image = Unicode("default", help="Image of a job that names none.").tag(config=True)
    default_memory = Unicode(
        str(DEFAULT_MEMORY), help="Memory limit of a job that sets none, such as 1G."
    ).tag(config=True)
    default_pids = Int(DEFAULT_PIDS, help="Pids limit of a job that sets none.").tag(config=True)
    default_cpus = Float(0.0, help="CPU quota of a job that sets none, in CPUs; 0 for none.").tag(
        config=True
    )
    grace = Float(
        DEFAULT_GRACE, help="Seconds between SIGTERM and SIGKILL when a job is stopped."
    ).tag(config=True)
    output_cap = Unicode(
        str(DEFAULT_OUTPUT_CAP), help="Output a job keeps at most, such as 128M."
    ).tag(config=True)
    admin_users = List(Unicode(), help="Users who see and stop everyone's jobs.").tag(config=True)
    max_running_jobs_per_user = Int(
        DEFAULT_MAX_RUNNING_JOBS, help="Jobs a user may have pending or running at once."
    ).tag(config=True)
    sendfile_output = Bool(
        True,
        help="Send followed raw output from the log to the socket with sendfile. With False it "
        "goes through tornado's buffers, which costs the server more CPU per byte.",
    ).tag(config=True)
    output_relay = Bool(
        True,
        help="Move a job's stdout through a second pipe on its way to the log. With False the "
        "supervisor copies from the job's own pipe, and a job that writes fast spins on its lock.",
    ).tag(config=True)
    stop_jobs_on_shutdown = Bool(
        False, help="Stop running jobs when the server stops; by default they outlive it."
    ).tag(config=True)
    volume_roots = List(
        Unicode(),
        help="Folders that volume sources must lie beneath; default: the server's root_dir.",
    ).tag(config=True)
    id_map_start = Int(
        userns.DEFAULT_HOST_START, help="First host id of the ids a job's users map to."
    ).tag(config=True)
    id_map_size = Int(userns.DEFAULT_SIZE, help="How many ids a job's user namespace maps.").tag(
        config=True
    )
    owner_per_user = Bool(
        None,
        allow_none=True,
        help="Make each authenticated username the owner of its jobs. Default: on, unless the "
        "server uses a stock single-user identity provider, where every request acts for the "
        "one owner of the server.",
    ).tag(config=True)

    @property
    def server(self) -> ServerApp:
        """Return the server this extension runs in."""
        if self.serverapp is None:
            raise RuntimeError("the linuxworker extension is not linked to a Jupyter server")
        return self.serverapp

    @default("state_dir")
    def _default_state_dir(self) -> str:
        return default_state_dir()

    def initialize_settings(self) -> None:
        """Create the engine (started when the server's loop runs) and the API token."""
        self.api_token = secrets.token_hex(32)
        self._start_lock = asyncio.Lock()
        self._started = False
        self.server_owner = getpass.getuser()
        try:
            memory = parse_size(self.default_memory)
            parse_size(self.output_cap)
        except UnitError as error:
            raise ValueError(f"LinuxWorkerApp.default_memory or output_cap: {error}") from None
        limits = Limits(memory=memory, pids=self.default_pids, cpus=self.default_cpus or None)
        roots = self.volume_roots or [os.path.abspath(self.server.root_dir)]
        self.manager = JobManager(
            self.state_dir,
            volume_roots=roots,
            grace=self.grace,
            default_limits=limits,
            id_map=(self.id_map_start, self.id_map_size),
            output_relay=self.output_relay,
        )

    def initialize_handlers(self) -> None:
        """Add the REST handlers."""
        self.handlers.extend(handlers())

    async def _start_jupyter_server_extension(self, serverapp: Any) -> None:
        """Open the engine and tell kernels how to reach the API."""
        await self.ensure_started()
        # Kernels inherit the server's environment: they find the API and its token there.
        os.environ[URL_ENV] = self.api_url()
        os.environ[TOKEN_ENV] = self.api_token

    async def ensure_started(self) -> None:
        """Open the engine and adopt running jobs, once."""
        async with self._start_lock:
            if self._started:
                return
            await self.manager.start()
            self._started = True
        running = self.manager.list(statuses=self._active(), limit=1000)
        self.log.info(
            "linuxworker: state in %s, %s job(s) running", self.manager.state_dir, len(running)
        )

    async def stop_extension(self) -> None:
        """Leave jobs running unless configured to stop them; close the engine."""
        if not self._started:
            return
        running = self.manager.list(statuses=self._active(), limit=1000)
        for record in running:
            if self.stop_jobs_on_shutdown:
                self.log.info("linuxworker: stopping job %s at server shutdown", record.id)
                await self.manager.stop(record.id, wait=False)
            else:
                self.log.info("linuxworker: job %s keeps running after the server stops", record.id)
        await self.manager.close()
        left_running = 0 if self.stop_jobs_on_shutdown else len(running)
        self.log.info("linuxworker: stopped, %s job(s) left running", left_running)

    @staticmethod
    def _active() -> tuple[Any, ...]:
        from .sandbox.store import JobStatus

        return (JobStatus.PENDING, JobStatus.RUNNING)

    def api_url(self) -> str:
        """Return the API's URL on this server, ending with a slash."""
        return f"{self.server.connection_url.rstrip('/')}/{API_PREFIX}/"

    def job_url(self, job_id: str) -> str:
        """Return the path of a job's resource."""
        return f"{self.server.base_url.rstrip('/')}/{API_PREFIX}/jobs/{job_id}"

    def owner_of(self, user: User | None) -> str:
        """Return the owner name for requests of ``user``."""
        if user is None:
            return ""
        per_user = self.owner_per_user
        if per_user is None:
            per_user = type(self.server.identity_provider) not in _SINGLE_USER_PROVIDERS
        return user.username if per_user else self.server_owner

    def complete_spec(self, body: Any) -> dict[str, Any]:
        """Return the request body with the server's defaults for fields it leaves out."""
        if not isinstance(body, dict):
            raise SpecError("spec", body, "expected a JSON object with at least a 'command' field")
        spec = dict(body)
        spec.setdefault("image", self.default_image)
        spec.setdefault("output_cap", self.output_cap)
        return spec

    def openapi_document(self) -> dict[str, Any]:
        """Return the OpenAPI document, with this server's URL."""
        text = resources.files("jupyter_linuxworker").joinpath("openapi.json").read_text()
        document: dict[str, Any] = json.loads(text)
        document["servers"] = [{"url": self.api_url().rstrip("/")}]
        return document


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    return [{"module": "jupyter_linuxworker.server_ext", "app": LinuxWorkerApp}]
