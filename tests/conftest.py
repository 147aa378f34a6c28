"""Generic fixtures shared by the test files."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from eplbd.shm import remove_prefix


@pytest.fixture
def shm_prefix() -> Iterator[str]:
    """A shm name prefix unique to this test; every segment/doorbell under it is removed afterwards."""
    prefix = f"eplbdtest{uuid.uuid4().hex[:10]}."
    yield prefix
    remove_prefix(prefix)
