"""The coordinator dies right after its manifest landed, on every backend: the other
rank keeps its data (the commit may have happened, and did), and the restart loads
the new checkpoint bit-exact."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from dist_pool import WorkerPool

from crash_helpers import CRASH_SIGNALS, assert_resumes, crash_after_publish
from storage_helpers import s3_options, unique


@pytest.fixture(params=["shm", "s3", "faulty"])
def location(request: pytest.FixtureRequest, tmp_path: Path, shm_dir: str) -> tuple[str, str, dict[str, Any]]:
    """A prefix of checkpoints, what ends each checkpoint's URI, the storage options."""
    if request.param == "shm":
        return f"shm://{unique()}", "", {"shm_dir": shm_dir}
    if request.param == "faulty":  # the fault-injecting wrapper, with no fault
        return f"faulty+file://{tmp_path}/run", "?fail=", {}
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/{unique()}", "", s3_options(endpoint)


@pytest.mark.slow
@pytest.mark.parametrize("sig", CRASH_SIGNALS)
def test_coordinator_killed_after_its_manifest_landed(
    location: tuple[str, str, dict[str, Any]], sig: str
) -> None:
    prefix, suffix, options = location
    outcomes = WorkerPool.run_once(
        2, crash_after_publish, prefix, suffix, options, sig, timeout=90, settle=30
    )
    code = -signal.SIGKILL if sig == "SIGKILL" else 128 + signal.SIGTERM
    assert (outcomes[0].status, outcomes[0].exitcode) == ("dead", code), outcomes[0]
    assert outcomes[1].status == "ok", outcomes[1]
    assert assert_resumes(prefix, 2, options) == 2
    assert any("did commit" in note for note in outcomes[1].value["notes"]), outcomes[1].value
