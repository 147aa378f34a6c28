"""Generic fixtures shared by the test files."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def shm_prefix() -> Iterator[str]:
    """A shm name prefix unique to this test; every segment/doorbell under it is removed afterwards."""
    prefix = f"eplbdtest{uuid.uuid4().hex[:10]}."
    yield prefix
    shm = Path("/dev/shm")
    for pattern in (prefix + "*", "sem." + prefix + "*"):
        for p in shm.glob(pattern):
            with contextlib.suppress(OSError):
                p.unlink()
