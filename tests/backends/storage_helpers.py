"""Helpers of the backend tests (importable by name; fixtures live in conftest.py)."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dist_pool import free_port
from moto_s3 import MOTO_CREDENTIALS
from torchstow.plugins.manager import reset_default_registry

__all__ = [
    "EXAMPLES",
    "S3_CREDENTIALS",
    "free_port",
    "installed_example",
    "pip_install_example",
    "s3_options",
    "unique",
]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

S3_CREDENTIALS = MOTO_CREDENTIALS


def s3_options(endpoint: str, **extra: Any) -> dict[str, Any]:
    """Storage options for the moto server: fast retries, and parts of S3's smallest size
    for every data file over 5 MiB, so small tests exercise multipart uploads."""
    small_parts = {"part_size": 5 << 20, "multipart_threshold": 5 << 20}
    return {**S3_CREDENTIALS, "endpoint_url": endpoint, "retry_delay": 0.01, **small_parts, **extra}


def unique(prefix: str = "t") -> str:
    """A name no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def pip_install_example(example: Path, target: Path, scratch: Path) -> None:
    """pip-install the example package ``example`` into ``target`` as a third party would,
    from a copy (the source tree stays clean), offline."""
    source = scratch / "src"
    shutil.copytree(example, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    offline = ["--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run(
        [*pip, *offline, "--target", str(target), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )


@contextmanager
def installed_example(example: Path, scratch: Path, package: str) -> Iterator[Path]:
    """The example pip-installed into a directory put on sys.path while the block runs.

    Nothing is installed into the environment itself: on leaving, the directory comes off
    sys.path and the modules of ``package`` are forgotten, which uninstalls it for every
    later test; the plugin registry is rebuilt on entry and on leaving.
    """
    target = scratch / "site"
    pip_install_example(example, target, scratch)
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    reset_default_registry()
    try:
        yield target
    finally:
        sys.path.remove(str(target))
        for name in [m for m in sys.modules if m == package or m.startswith(f"{package}.")]:
            del sys.modules[name]
        importlib.invalidate_caches()
        reset_default_registry()
