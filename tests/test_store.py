"""The job store's SQLite file: the supervisor columns, and databases of earlier versions."""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

from jupyter_linuxworker.sandbox.store import (
    DATABASE_NAME,
    SCHEMA_VERSION,
    JobRecord,
    JobStatus,
    JobStore,
)

# The table as the first release created it, before the supervisor columns.
VERSION_1_TABLE = """
CREATE TABLE jobs (
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
    usage TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX jobs_status ON jobs (status);
CREATE INDEX jobs_owner ON jobs (owner);
PRAGMA user_version=1;
"""
JOB_ID = "0123456789abcdef0123456789abcdef"
OPENERS = 8  # stores that open the same file at once
# Files opened that way. Without the fix, a single round passed 4 times in 5.
OPEN_ROUNDS = 10


def columns(path: str) -> list[str]:
    database = sqlite3.connect(path)
    try:
        return [row[1] for row in database.execute("PRAGMA table_info(jobs)")]
    finally:
        database.close()


def user_version(path: str) -> int:
    database = sqlite3.connect(path)
    try:
        return int(database.execute("PRAGMA user_version").fetchone()[0])
    finally:
        database.close()


def test_supervisor_is_recorded(tmp_path: Path) -> None:
    store = JobStore(os.path.join(tmp_path, DATABASE_NAME))
    try:
        record = JobRecord(
            id=JOB_ID,
            name="job",
            owner="alice",
            spec={"command": "true"},
            status=JobStatus.PENDING,
            created_at=1.5,
        )
        store.insert(record)
        assert store.supervisor(JOB_ID) is None

        store.set_supervisor(JOB_ID, 4242, 987654)

        assert store.supervisor(JOB_ID) == (4242, 987654)
        assert store.supervisor("f" * 32) is None
        # Updating the record's fields leaves the supervisor alone.
        store.update(record.with_changes(status=JobStatus.RUNNING))
        assert store.supervisor(JOB_ID) == (4242, 987654)
    finally:
        store.close()


def test_version_1_file_gains_columns(tmp_path: Path) -> None:
    path = os.path.join(tmp_path, DATABASE_NAME)
    database = sqlite3.connect(path)
    database.executescript(VERSION_1_TABLE)
    database.execute(
        "INSERT INTO jobs (id, name, owner, spec, status, exit_code, created_at, ended_at) "
        "VALUES (?, 'old', 'bob', '{\"command\": \"echo old\"}', 'COMPLETED', 3, 10.0, 12.5)",
        (JOB_ID,),
    )
    database.commit()
    database.close()

    store = JobStore(path)
    try:
        record = store.get(JOB_ID)
        assert record is not None
        assert record.name == "old"
        assert record.owner == "bob"
        assert record.status == JobStatus.COMPLETED
        assert record.exit_code == 3
        assert record.command == "echo old"
        assert record.ended_at == 12.5
        assert store.supervisor(JOB_ID) is None
        store.set_supervisor(JOB_ID, 17, 23)
        assert store.supervisor(JOB_ID) == (17, 23)
    finally:
        store.close()

    assert columns(path)[-2:] == ["supervisor_pid", "supervisor_start_ticks"]
    assert SCHEMA_VERSION == 2
    assert user_version(path) == 2

    # Opening it again changes nothing.
    JobStore(path).close()
    assert columns(path).count("supervisor_pid") == 1
    assert user_version(path) == 2


def open_at_once(path: str) -> list[BaseException]:
    """Open ``path`` from OPENERS threads at the same moment; return what they raised."""
    errors: list[BaseException] = []
    ready = threading.Barrier(OPENERS)

    def open_store() -> None:
        ready.wait()
        try:
            JobStore(path).close()
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=open_store) for _ in range(OPENERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return errors


def test_new_file_opened_at_once(tmp_path: Path) -> None:
    for round_number in range(OPEN_ROUNDS):
        path = os.path.join(tmp_path, f"{round_number}-{DATABASE_NAME}")

        assert open_at_once(path) == []
        assert columns(path).count("supervisor_pid") == 1
        assert user_version(path) == 2


def test_version_1_file_opened_at_once(tmp_path: Path) -> None:
    for round_number in range(OPEN_ROUNDS):
        path = os.path.join(tmp_path, f"{round_number}-{DATABASE_NAME}")
        database = sqlite3.connect(path)
        # WAL mode, as the first release left its file.
        database.execute("PRAGMA journal_mode=WAL")
        database.executescript(VERSION_1_TABLE)
        database.close()

        assert open_at_once(path) == []
        assert columns(path).count("supervisor_pid") == 1
        assert user_version(path) == 2


def test_newer_database_keeps_its_version(tmp_path: Path) -> None:
    path = os.path.join(tmp_path, DATABASE_NAME)
    JobStore(path).close()
    database = sqlite3.connect(path)
    database.execute("PRAGMA user_version=7")
    database.close()

    JobStore(path).close()

    assert user_version(path) == 7
