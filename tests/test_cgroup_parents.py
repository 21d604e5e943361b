"""The job parent cgroups: shared by the managers of one cgroup, removed by the last to close."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import assert_no_leftovers
from test_lifecycle import wait_running

from jupyter_linuxworker.sandbox.cgroups import PARENT_NAME, CgroupLayout
from jupyter_linuxworker.sandbox.manager import JobManager
from jupyter_linuxworker.sandbox.store import JobStatus

TEST_FOLDER = f"jupyter-linuxworker-parenttest-{os.getpid()}"


@pytest.fixture
def layout() -> Iterator[CgroupLayout]:
    """A v1 layout whose parents lie in a folder of this test beneath our own cgroups.

    Other managers of this test run share the detected parents, so a test of their removal
    needs parents of its own.
    """
    detected = CgroupLayout.detect()
    if detected.version != 1:
        pytest.skip("this machine has no cgroup v1 hierarchies; test_cgroup_v2 covers v2")
    folders = sorted(
        {os.path.join(os.path.dirname(p), TEST_FOLDER) for p in detected.parents.values()}
    )
    for folder in folders:
        os.mkdir(folder)
    parents = {
        controller: os.path.join(os.path.dirname(path), TEST_FOLDER, PARENT_NAME)
        for controller, path in detected.parents.items()
    }
    try:
        yield CgroupLayout(1, parents)
    finally:
        for folder in folders:
            leftovers = os.listdir(folder) if os.path.isdir(folder) else []
            subfolders = [name for name in leftovers if os.path.isdir(os.path.join(folder, name))]
            os.rmdir(folder)
            assert subfolders == [], f"{folder} kept {subfolders}"


def parent_folders(layout: CgroupLayout) -> list[str]:
    return sorted(path for path in set(layout.parents.values()) if os.path.isdir(path))


async def started_manager(state_dir: Path, layout: CgroupLayout) -> JobManager:
    manager = JobManager(str(state_dir), volume_roots=[str(state_dir)])
    manager.cgroups = CgroupLayout(layout.version, dict(layout.parents))
    await manager.start()
    return manager


async def test_parents_removed_on_close(tmp_path: Path, layout: CgroupLayout) -> None:
    manager = await started_manager(tmp_path / "state", layout)
    try:
        assert parent_folders(layout) == sorted(set(layout.parents.values()))
        job = await manager.submit({"command": "echo hi"})
        record = await manager.wait(job.id, timeout=10)
        assert record.status == JobStatus.COMPLETED
        assert_no_leftovers(manager)
    finally:
        await manager.close()

    assert parent_folders(layout) == []


async def test_parents_stay_for_another_manager(tmp_path: Path, layout: CgroupLayout) -> None:
    first = await started_manager(tmp_path / "first", layout)
    second = await started_manager(tmp_path / "second", layout)
    try:
        await first.close()
        assert parent_folders(layout) == sorted(set(layout.parents.values()))

        job = await second.submit({"command": "echo hi"})
        record = await second.wait(job.id, timeout=10)
        assert record.status == JobStatus.COMPLETED
    finally:
        await second.close()

    assert parent_folders(layout) == []


async def test_parents_stay_for_running_job(tmp_path: Path, layout: CgroupLayout) -> None:
    state_dir = tmp_path / "state"
    manager = await started_manager(state_dir, layout)
    job = await manager.submit({"command": "sleep 600"})
    await wait_running(manager, job.id)
    await manager.close()

    # The job outlives the manager, so its cgroup, and the parents around it, stay.
    assert parent_folders(layout) == sorted(set(layout.parents.values()))
    assert manager.cgroups.for_job(job.id).exists()

    again = await started_manager(state_dir, layout)
    try:
        record = await again.stop(job.id, grace=0)
        assert record.status == JobStatus.STOPPED
        assert_no_leftovers(again)
    finally:
        await again.close()

    assert parent_folders(layout) == []
