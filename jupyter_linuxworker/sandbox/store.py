"""Job records in SQLite. The manager is the only writer."""

from __future__ import annotations

import builtins
import enum
import json
import sqlite3
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Final

DATABASE_NAME: Final = "jobs.sqlite"
SCHEMA_VERSION: Final = 2
DEFAULT_PAGE_SIZE: Final = 50
MAX_PAGE_SIZE: Final = 1000
# Switching a new file to WAL mode failed at once here, without waiting for SQLite's busy
# timeout, while another connection was opening the same file. Opening retries that this often.
WAL_ATTEMPTS: Final = 100
WAL_RETRY_SECONDS: Final = 0.01

_SCHEMA_TABLE: Final = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    owner TEXT NOT NULL,
    spec TEXT NOT NULL,
    status TEXT NOT NULL,
    exit_code INTEGER,
    signal INTEGER,
    reason TEXT,
    detail TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    ended_at REAL,
    output_size INTEGER NOT NULL DEFAULT 0,
    output_truncated INTEGER NOT NULL DEFAULT 0,
    usage TEXT NOT NULL DEFAULT '{}',
    supervisor_pid INTEGER,
    supervisor_start_ticks INTEGER
)
"""
_SCHEMA_INDEXES: Final = (
    "CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status)",
    "CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner)",
)
# Columns that schema version 1 lacks: opening such a database adds them.
_ADDED_COLUMNS: Final = (
    ("supervisor_pid", "INTEGER"),
    ("supervisor_start_ticks", "INTEGER"),
)


class JobStatus(enum.StrEnum):
    """The stage of a job's life."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"
    LOST = "LOST"

    @property
    def ended(self) -> bool:
        """Whether the job can no longer change."""
        return self not in (JobStatus.PENDING, JobStatus.RUNNING)


def iso_time(timestamp: float | None) -> str | None:
    """Return ``timestamp`` (seconds since the epoch) as an ISO 8601 UTC string."""
    if timestamp is None:
        return None
    return (
        datetime.fromtimestamp(timestamp, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


@dataclass(frozen=True)
class JobRecord:
    """The record of one job."""

    id: str
    name: str
    owner: str
    spec: dict[str, Any]
    status: JobStatus
    created_at: float
    seq: int = 0
    exit_code: int | None = None
    signal: int | None = None
    reason: str | None = None
    detail: str | None = None
    started_at: float | None = None
    ended_at: float | None = None
    output_size: int = 0
    output_truncated: bool = False
    usage: dict[str, Any] = field(default_factory=dict)

    @property
    def short_id(self) -> str:
        """Return the first 12 characters of the id, also the job's hostname."""
        return self.id[:12]

    @property
    def command(self) -> str | list[str]:
        """Return the command as submitted: a shell string or an argv list."""
        command: str | list[str] = self.spec["command"]
        return command

    def with_changes(self, **changes: Any) -> JobRecord:
        """Return a copy with ``changes`` applied."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form used by the REST API and ``--json`` output."""
        return {
            "id": self.id,
            "name": self.name,
            "owner": self.owner,
            "command": self.command,
            "image": self.spec.get("image"),
            "status": self.status.value,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "reason": self.reason,
            "detail": self.detail,
            "created_at": iso_time(self.created_at),
            "started_at": iso_time(self.started_at),
            "ended_at": iso_time(self.ended_at),
            "output_size": self.output_size,
            "output_truncated": self.output_truncated,
            "usage": self.usage,
            "spec": self.spec,
        }


_COLUMNS: Final = (
    "seq",
    "id",
    "name",
    "owner",
    "spec",
    "status",
    "exit_code",
    "signal",
    "reason",
    "detail",
    "created_at",
    "started_at",
    "ended_at",
    "output_size",
    "output_truncated",
    "usage",
)


def _record_from_row(row: tuple[Any, ...]) -> JobRecord:
    values = dict(zip(_COLUMNS, row, strict=True))
    values["spec"] = json.loads(values["spec"])
    values["status"] = JobStatus(values["status"])
    values["output_truncated"] = bool(values["output_truncated"])
    values["usage"] = json.loads(values["usage"])
    return JobRecord(**values)


class JobStore:
    """Read and write job records in one SQLite file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            self._use_wal()
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
        except BaseException:
            self._db.close()
            raise

    def _use_wal(self) -> None:
        """Put the file in WAL mode, so that readers do not wait for the writer."""
        for attempt in range(WAL_ATTEMPTS):
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as error:
                busy = error.sqlite_errorcode in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
                if not busy or attempt == WAL_ATTEMPTS - 1:
                    raise sqlite3.OperationalError(
                        f"switching {self.path} to WAL mode failed: {error}; if another "
                        "process keeps it locked, stop that process and try again"
                    ) from error
            time.sleep(WAL_RETRY_SECONDS)

    def _migrate(self) -> None:
        """Create the table, or add the columns an earlier version's table lacks."""
        # One write transaction, so that two processes opening the file at once do not both
        # add a column.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute(_SCHEMA_TABLE)
            for statement in _SCHEMA_INDEXES:
                self._db.execute(statement)
            present = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
            for name, kind in _ADDED_COLUMNS:
                if name not in present:
                    self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")
            version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
            # A newer version's database keeps its number, so that version does not take it
            # for an older one.
            self._db.execute(f"PRAGMA user_version={max(version, SCHEMA_VERSION)}")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def insert(self, record: JobRecord) -> JobRecord:
        """Store a new record; return it with its sequence number."""
        cursor = self._db.execute(
            "INSERT INTO jobs (id, name, owner, spec, status, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (
                record.id,
                record.name,
                record.owner,
                json.dumps(record.spec),
                record.status.value,
                record.created_at,
            ),
        )
        return record.with_changes(seq=cursor.lastrowid or 0)

    def update(self, record: JobRecord) -> None:
        """Write the changing fields of ``record``."""
        self._db.execute(
            "UPDATE jobs SET status=?, exit_code=?, signal=?, reason=?, detail=?, started_at=?, "
            "ended_at=?, output_size=?, output_truncated=?, usage=? WHERE id=?",
            (
                record.status.value,
                record.exit_code,
                record.signal,
                record.reason,
                record.detail,
                record.started_at,
                record.ended_at,
                record.output_size,
                int(record.output_truncated),
                json.dumps(record.usage),
                record.id,
            ),
        )

    def get(self, job_id: str) -> JobRecord | None:
        """Return the record of ``job_id``, or None."""
        row = self._db.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE id=?", (job_id,)
        ).fetchone()
        return _record_from_row(row) if row else None

    def list(
        self,
        *,
        statuses: tuple[JobStatus, ...] = (),
        owner: str | None = None,
        before_seq: int | None = None,
        limit: int = DEFAULT_PAGE_SIZE,
    ) -> list[JobRecord]:
        """Return records newest first, filtered by status and owner, older than ``before_seq``."""
        clauses: list[str] = []
        params: list[Any] = []
        if statuses:
            clauses.append(f"status IN ({', '.join('?' for _ in statuses)})")
            params.extend(status.value for status in statuses)
        if owner is not None:
            clauses.append("owner=?")
            params.append(owner)
        if before_seq is not None:
            clauses.append("seq<?")
            params.append(before_seq)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        params.append(max(1, min(limit, MAX_PAGE_SIZE)))
        rows = self._db.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM jobs {where} ORDER BY seq DESC LIMIT ?", params
        ).fetchall()
        return [_record_from_row(row) for row in rows]

    def count(self, *, statuses: tuple[JobStatus, ...], owner: str | None = None) -> int:
        """Return how many records have one of ``statuses`` (and ``owner``, if given)."""
        query = f"SELECT COUNT(*) FROM jobs WHERE status IN ({', '.join('?' for _ in statuses)})"
        params: list[Any] = [status.value for status in statuses]
        if owner is not None:
            query += " AND owner=?"
            params.append(owner)
        return int(self._db.execute(query, params).fetchone()[0])

    def ids_with_prefix(
        self, prefix: str, owner: str | None = None, limit: int = 2
    ) -> builtins.list[str]:
        """Return up to ``limit`` job ids that start with ``prefix`` (hex digits only)."""
        if not prefix or any(c not in "0123456789abcdef" for c in prefix):
            return []
        query = "SELECT id FROM jobs WHERE id >= ? AND id < ?"
        params: list[Any] = [prefix, prefix + "g"]
        if owner is not None:
            query += " AND owner = ?"
            params.append(owner)
        rows = self._db.execute(query + " LIMIT ?", [*params, limit]).fetchall()
        return [row[0] for row in rows]

    def set_supervisor(self, job_id: str, pid: int, start_ticks: int) -> None:
        """Record the process that supervises ``job_id``: its pid and when it started."""
        self._db.execute(
            "UPDATE jobs SET supervisor_pid=?, supervisor_start_ticks=? WHERE id=?",
            (pid, start_ticks, job_id),
        )

    def supervisor(self, job_id: str) -> tuple[int, int] | None:
        """Return the pid and start ticks recorded for the job's supervisor, or None."""
        row = self._db.execute(
            "SELECT supervisor_pid, supervisor_start_ticks FROM jobs WHERE id=?", (job_id,)
        ).fetchone()
        if row is None or row[0] is None or row[1] is None:
            return None
        return int(row[0]), int(row[1])

    def delete(self, job_id: str) -> None:
        """Remove the record of ``job_id``."""
        self._db.execute("DELETE FROM jobs WHERE id=?", (job_id,))

    def close(self) -> None:
        """Close the database."""
        self._db.close()
