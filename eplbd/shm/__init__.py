"""Shared memory between inference ranks and the per-node daemon.

One segment per domain (layout: :mod:`eplbd.shm.layout`), every multi-word
region under a seqlock plus CRC32, a doorbell semaphore. See :class:`Domain`.
"""

from eplbd.shm.domain import (
    PLAN_ABORTED,
    PLAN_COMMITTED,
    PLAN_NONE,
    PLAN_REJECTED,
    PLAN_STARTED,
    DaemonInfo,
    Domain,
    PlanStatus,
    Window,
)
from eplbd.shm.errors import (
    DomainExistsError,
    DomainNameError,
    DomainNotFoundError,
    LayoutError,
    ShmError,
    TornReadError,
)
from eplbd.shm.layout import LAYOUT_VERSION, MAGIC
from eplbd.shm.names import DEFAULT_PREFIX, list_domains, remove_prefix, validate_name

__all__ = [
    "DEFAULT_PREFIX",
    "LAYOUT_VERSION",
    "MAGIC",
    "PLAN_ABORTED",
    "PLAN_COMMITTED",
    "PLAN_NONE",
    "PLAN_REJECTED",
    "PLAN_STARTED",
    "DaemonInfo",
    "Domain",
    "DomainExistsError",
    "DomainNameError",
    "DomainNotFoundError",
    "LayoutError",
    "PlanStatus",
    "ShmError",
    "TornReadError",
    "Window",
    "list_domains",
    "remove_prefix",
    "validate_name",
]
