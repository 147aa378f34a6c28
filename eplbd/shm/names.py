"""Domain names: validation, the POSIX names derived from them, discovery in /dev/shm.

A domain ``<name>`` owns the segment ``/<name>`` (file ``/dev/shm/<name>`` on
Linux) and the doorbell semaphore ``/<name>.bell`` (file
``/dev/shm/sem.<name>.bell``). Both files must fit NAME_MAX (255).
"""

from __future__ import annotations

import os
import re

from eplbd.shm.errors import DomainNameError

__all__ = [
    "DEFAULT_PREFIX",
    "SHM_DIR",
    "NAME_MAX",
    "MAX_NAME_LEN",
    "DOORBELL_SUFFIX",
    "validate_name",
    "segment_name",
    "doorbell_name",
    "segment_path",
    "doorbell_path",
    "list_domains",
    "remove_prefix",
]

DEFAULT_PREFIX = "eplbd."
SHM_DIR = "/dev/shm"
NAME_MAX = 255
DOORBELL_SUFFIX = ".bell"
_SEM_FILE_PREFIX = "sem."  # glibc stores semaphore "/x" as /dev/shm/sem.x
MAX_NAME_LEN = NAME_MAX - len(_SEM_FILE_PREFIX) - len(DOORBELL_SUFFIX)
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid domain name, else raise DomainNameError saying why.

    Rules: a str of 1..MAX_NAME_LEN characters matching ``[A-Za-z0-9][A-Za-z0-9_.-]*``
    (no '/', so no leading slash), not starting with "sem." (that namespace holds
    semaphore files in /dev/shm).
    """
    if not isinstance(name, str):
        raise DomainNameError(f"domain name must be a str, got {type(name).__name__}")
    if not name:
        raise DomainNameError("domain name is empty")
    if len(name) > MAX_NAME_LEN:
        raise DomainNameError(
            f"domain name is {len(name)} characters; at most {MAX_NAME_LEN} so that "
            f"'{_SEM_FILE_PREFIX}<name>{DOORBELL_SUFFIX}' fits NAME_MAX={NAME_MAX}"
        )
    if not _NAME_RE.fullmatch(name):
        if not _NAME_RE.fullmatch(name[:1]):
            what = f"must start with a letter or digit, not {name[:1]!r}"
        else:
            bad = next(c for c in name if not re.fullmatch(r"[A-Za-z0-9_.-]", c))
            what = f"contains {bad!r}; allowed are letters, digits, '_', '.', '-'"
        raise DomainNameError(f"domain name {name!r} {what}")
    if name.startswith(_SEM_FILE_PREFIX):
        raise DomainNameError(
            f"domain name {name!r} must not start with {_SEM_FILE_PREFIX!r} "
            "(reserved for semaphores in /dev/shm)"
        )
    return name


def segment_name(name: str) -> str:
    return "/" + name


def doorbell_name(name: str) -> str:
    return "/" + name + DOORBELL_SUFFIX


def segment_path(name: str) -> str:
    return os.path.join(SHM_DIR, name)


def doorbell_path(name: str) -> str:
    return os.path.join(SHM_DIR, _SEM_FILE_PREFIX + name + DOORBELL_SUFFIX)


def list_domains(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Names (no leading '/') of the segments in /dev/shm that start with ``prefix``, sorted.

    Only names that pass :func:`validate_name` are listed; whether a segment is a
    valid domain is for :meth:`Domain.attach` to decide.
    """
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    out = []
    for n in entries:
        if not n.startswith(prefix) or n.startswith(_SEM_FILE_PREFIX):
            continue
        try:
            validate_name(n)
        except DomainNameError:
            continue
        if os.path.isfile(os.path.join(SHM_DIR, n)):
            out.append(n)
    return sorted(out)


def remove_prefix(prefix: str) -> list[str]:
    """Unlink every segment and doorbell file in /dev/shm whose domain name starts with
    ``prefix``; returns the file names removed, sorted.

    For cleaning up after a job or a test whose domains share a unique prefix; an
    empty prefix is refused (it would match every segment on the host).
    """
    if not prefix:
        raise DomainNameError("remove_prefix: refusing an empty prefix (it matches every segment)")
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    removed = []
    for n in entries:
        if n.startswith(prefix) or n.startswith(_SEM_FILE_PREFIX + prefix):
            try:
                os.unlink(os.path.join(SHM_DIR, n))
            except OSError:
                continue
            removed.append(n)
    return sorted(removed)
