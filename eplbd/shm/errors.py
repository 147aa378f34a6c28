"""Exceptions of the shared-memory layer. Every failure of a reader is a :class:`ShmError`."""

from __future__ import annotations

__all__ = [
    "ShmError",
    "LayoutError",
    "DomainNameError",
    "TornReadError",
    "DomainExistsError",
    "DomainNotFoundError",
]


class ShmError(Exception):
    """Base of every shared-memory error."""


class LayoutError(ShmError, ValueError):
    """The segment is not a valid eplbd domain of this layout: bad magic, unknown layout
    version, half-made ("incomplete"), truncated, header CRC mismatch, geometry mismatch,
    or a region whose consistent content breaks a bound."""


class DomainNameError(ShmError, ValueError):
    """A domain name breaks the naming rules; the message says which."""


class TornReadError(ShmError):
    """No consistent read (seqlock stable and CRC32 matching) within the retry budget."""


class DomainExistsError(ShmError, FileExistsError):
    """The segment exists and its owner process is alive."""


class DomainNotFoundError(ShmError, FileNotFoundError):
    """No segment of that name exists."""
