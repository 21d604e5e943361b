"""The live REST API checked against its OpenAPI document, with schemathesis and route checks."""

from __future__ import annotations

import json
import os
import re
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis.configuration import set_hypothesis_home_dir
from schemathesis.specs.openapi.checks import (
    missing_required_header,
    negative_data_rejection,
    positive_data_acceptance,
)
from server import ServerProcess, request, running_server
from test_server import wait_ended
from tornado import web

import jupyter_linuxworker
from jupyter_linuxworker.handlers import API_PREFIX, JOB_ID_REGEX, handlers

ALICE = "alice-token"
ADMIN = "admin-token"
AUTH_HEADERS = {"Authorization": f"token {ALICE}"}
OPENAPI_FILE = Path(jupyter_linuxworker.__file__).parent / "openapi.json"
HTTP_METHODS = ("get", "put", "post", "delete", "patch")

# Generated specs run these commands in place of the generated ones, so every job ends at once.
HARMLESS_COMMANDS: tuple[str | list[str], ...] = ("true", "echo hi", ["echo", "x"])
HARMLESS_TIMEOUT = "10s"
# Examples per operation in the fuzzing phase. The coverage phase adds its own fixed cases.
MAX_EXAMPLES = 30
# Headers that describe the HTTP message itself rather than the request to the API.
FRAMING_HEADERS = frozenset({"connection", "content-length", "host", "transfer-encoding"})

# Ids that are not 32 lowercase hexadecimal digits, as they appear in the URL path.
MALFORMED_JOB_IDS = (
    "abc",
    "0" * 31,
    "0" * 33,
    "A" * 32,
    "g" * 32,
    "0" * 32 + "%0A",
    "..",
    "%2E%2E",
    "..%2F..%2Fetc",
    "0" * 16 + "%00" + "0" * 15,
    "job%20name",
)

# Hypothesis writes its caches to ./.hypothesis by default, so this points it at a temporary
# folder outside the checkout. The folder is removed when the interpreter exits.
HYPOTHESIS_HOME = tempfile.TemporaryDirectory(prefix="hypothesis-")
set_hypothesis_home_dir(HYPOTHESIS_HOME.name)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("openapi")) as process:
        yield process


def submit(server: ServerProcess, body: dict[str, object]) -> str:
    status, job = request("POST", server.api + "jobs", ALICE, body)
    assert status == 201, job
    assert isinstance(job, dict)
    return str(job["id"])


@pytest.fixture(scope="module")
def known_jobs(server: ServerProcess) -> dict[str, list[str]]:
    """Real job ids that the generated requests use besides random ones, by HTTP method.

    DELETE gets jobs of its own, so the operations tested after it still find theirs.
    """
    pools: dict[str, list[str]] = {"delete": [], "other": []}
    for pool in pools.values():
        completed = submit(server, {"command": "echo hi", "name": "completed"})
        failed = submit(server, {"command": "echo out; echo err >&2; exit 3", "name": "failed"})
        for job_id in (completed, failed):
            wait_ended(server, job_id)
        # This job still runs during the first examples, so DELETE can get 409 and stop has a live
        # job to stop.
        running = submit(server, {"command": "sleep 3", "timeout": "10s", "name": "running"})
        pool.extend([completed, failed, running])
    return pools


# The file is loaded at import and each request goes to the live server's base URL, and
# test_served_document_matches_file checks that the server serves this file.
# NOTE: schemathesis.pytest.from_fixture, which would load the served document, fails under
# pytest 9.2 with schemathesis 4.32 (AttributeError: 'Function' object has no attribute '_nodeid').
schema = schemathesis.openapi.from_path(OPENAPI_FILE)


def is_valid_command(value: object) -> bool:
    """Return whether ``value`` matches the document's JobSpec.command."""
    if isinstance(value, str):
        return len(value) >= 1
    return (
        isinstance(value, list) and len(value) >= 1 and all(isinstance(arg, str) for arg in value)
    )


def make_harmless(body: object) -> None:
    """Replace a schema-valid command and timeout in ``body`` with short harmless ones.

    A command or timeout that violates the document stays, so a negative case stays negative and
    the server must reject it before anything runs.
    """
    if not isinstance(body, dict):
        return
    if is_valid_command(body.get("command")):
        # The choice depends only on the generated data, so Hypothesis can replay a failure.
        choice = zlib.crc32(json.dumps(body["command"]).encode()) % len(HARMLESS_COMMANDS)
        body["command"] = HARMLESS_COMMANDS[choice]
    timeout = body.get("timeout")
    if "timeout" not in body or (
        isinstance(timeout, int | float | str) and not isinstance(timeout, bool)
    ):
        body["timeout"] = HARMLESS_TIMEOUT


def use_known_job(path_parameters: dict[str, Any], pool: list[str]) -> None:
    """Replace about half of the generated job ids with ids of real jobs from ``pool``.

    Random ids only reach the 404 branch, real ids reach the 200, 204 and 409 responses. The
    choice depends only on the generated id, so Hypothesis can replay a failure.
    """
    job_id = path_parameters.get("job_id")
    if not isinstance(job_id, str):
        return
    index = zlib.crc32(job_id.encode("utf-8", "surrogatepass")) % (2 * len(pool))
    if index < len(pool):
        path_parameters["job_id"] = pool[index]


def drop_framing_headers(case: schemathesis.Case) -> None:
    """Remove generated headers that frame the HTTP message, which the HTTP client owns.

    Tornado returns 400 for a bad Transfer-Encoding before any handler of the API runs, so such
    a case tests the HTTP server, not the document.
    """
    for name in list(case.headers or {}):
        if name.lower() in FRAMING_HEADERS:
            del case.headers[name]


def is_submit(case: schemathesis.Case) -> bool:
    return case.method.upper() == "POST" and case.path == "/jobs"


def excluded_checks(case: schemathesis.Case) -> list[Any]:
    """Return the schemathesis checks that judge ``case`` by a rule the document does not state."""
    # jupyter_server returns 403 for a request without credentials, and the document lists 403
    # for every operation. This check of schemathesis 4.32 accepts only 401 there.
    excluded = [missing_required_header]
    declared = {parameter.name for parameter in case.operation.query}
    if set(case.query or {}) - declared:
        # The server ignores unknown query parameters, and the document does not state that it
        # rejects them.
        excluded.append(negative_data_rejection)
    if is_submit(case):
        # The document cannot express which images exist or which limits the host allows, so a
        # schema-valid spec may get 400. The test then checks that the 400 names the field.
        excluded.append(positive_data_acceptance)
    return excluded


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_api_conforms_to_document(
    case: schemathesis.Case, server: ServerProcess, known_jobs: dict[str, list[str]]
) -> None:
    if case.path_parameters:
        pool = known_jobs["delete" if case.method.upper() == "DELETE" else "other"]
        use_known_job(case.path_parameters, pool)
    if is_submit(case):
        make_harmless(case.body)
    drop_framing_headers(case)
    # Reading the metadata makes schemathesis revalidate the edited case, so its checks judge the
    # request as sent. A negative case that became valid is then not expected to be rejected.
    metadata = case.meta

    response = case.call_and_validate(
        base_url=server.api.rstrip("/"),
        headers=AUTH_HEADERS,
        excluded_checks=excluded_checks(case),
        timeout=30,
    )

    positive = metadata is not None and metadata.generation.mode.is_positive
    if is_submit(case) and positive and response.status_code == 400:
        assert "field" in response.json(), response.text


def get_json(url: str, token: str = ALICE) -> Any:
    status, body = request("GET", url, token)
    assert status == 200, body
    return body


def test_served_document_matches_file(server: ServerProcess) -> None:
    served = get_json(server.api + "openapi.json")
    with open(OPENAPI_FILE, encoding="utf-8") as file:
        stored = json.load(file)

    assert served.pop("servers") == [{"url": server.api.rstrip("/")}]
    assert "servers" not in stored
    assert served == stored


def documented_route(pattern: str) -> str:
    """Turn a handler's URL pattern into the document's path template."""
    prefix = f"/{API_PREFIX}"
    assert pattern.startswith(prefix), pattern
    return pattern.removeprefix(prefix).replace(JOB_ID_REGEX, "{job_id}")


def test_every_route_is_documented() -> None:
    with open(OPENAPI_FILE, encoding="utf-8") as file:
        documented = set(json.load(file)["paths"])
    registered = {documented_route(pattern) for pattern, _ in handlers()}

    assert registered - documented == set(), "routes missing from the document"
    assert documented - registered == set(), "documented paths that no handler serves"


def implemented_methods(handler: type[web.RequestHandler]) -> set[str]:
    return {
        method
        for method in HTTP_METHODS
        if getattr(handler, method) is not getattr(web.RequestHandler, method)
    }


def test_every_method_is_documented() -> None:
    with open(OPENAPI_FILE, encoding="utf-8") as file:
        paths = json.load(file)["paths"]

    for pattern, handler in handlers():
        route = documented_route(pattern)
        if route not in paths:
            continue  # test_every_route_is_documented reports it
        documented = {method for method in paths[route] if method in HTTP_METHODS}
        assert implemented_methods(handler) == documented, route


def job_dirs(server: ServerProcess) -> set[str]:
    jobs_dir = os.path.join(server.state_dir, "jobs")
    return set(os.listdir(jobs_dir)) if os.path.isdir(jobs_dir) else set()


@pytest.mark.parametrize("job_id", MALFORMED_JOB_IDS)
@pytest.mark.parametrize(
    ("method", "suffix"),
    [("GET", ""), ("DELETE", ""), ("POST", "/stop"), ("GET", "/output"), ("GET", "/stats")],
)
def test_malformed_job_id_not_found(
    server: ServerProcess, method: str, suffix: str, job_id: str
) -> None:
    before = job_dirs(server)

    body = {"grace": 0} if method == "POST" else None
    status, error = request(method, f"{server.api}jobs/{job_id}{suffix}", ALICE, body)

    assert status == 404, error
    assert isinstance(error, dict), error
    assert "not found" in error["message"]
    assert job_dirs(server) == before
    # No folder or file of that name exists anywhere in the state folder either.
    decoded = re.sub(r"%([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), job_id)
    for _, dirs, files in os.walk(server.state_dir):
        assert decoded not in dirs + files
