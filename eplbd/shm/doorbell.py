"""The doorbell: a POSIX named semaphore posted by the node leader after each window.

It coalesces: ringing an already-rung bell does not stack up wake-ups, so a
daemon that was down for an hour wakes once, not once per missed window.
"""

from __future__ import annotations

import contextlib
import os

import posix_ipc

from eplbd.shm.names import doorbell_name, doorbell_path

__all__ = ["Doorbell", "doorbell_mode"]

_MAX_PENDING = 1


def doorbell_mode(segment_mode: int) -> int:
    """Semaphore mode for a segment mode: whoever may read the segment may use the bell.

    sem_open needs read *and* write permission, so every read bit is mirrored
    into the write bit of the same class.
    """
    m = segment_mode & 0o666
    return m | ((m & 0o444) >> 1)


class Doorbell:
    """Named semaphore ``/<domain>.bell``."""

    def __init__(self, sem: posix_ipc.Semaphore, domain: str) -> None:
        self._sem = sem
        self.domain = domain

    @classmethod
    def create(cls, domain: str, mode: int, gid: int | None) -> Doorbell:
        """Create it fresh (a leftover one from a dead owner is replaced)."""
        name = doorbell_name(domain)
        try:
            sem = posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=mode, initial_value=0)
        except posix_ipc.ExistentialError:
            with contextlib.suppress(posix_ipc.ExistentialError):
                posix_ipc.unlink_semaphore(name)
            sem = posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=mode, initial_value=0)
        path = doorbell_path(domain)
        # The umask trims the creation mode; set it exactly (Linux keeps the file in /dev/shm).
        if os.path.exists(path):
            if gid is not None:
                os.chown(path, -1, gid)
            os.chmod(path, mode)
        return cls(sem, domain)

    @classmethod
    def open(cls, domain: str) -> Doorbell:
        return cls(posix_ipc.Semaphore(doorbell_name(domain)), domain)

    def ring(self) -> None:
        # The value check and release are not atomic; at worst two wake-ups are pending.
        if self._sem.value < _MAX_PENDING:
            self._sem.release()

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds (0: poll); True if the bell was rung."""
        try:
            self._sem.acquire(max(0.0, float(timeout)))
        except posix_ipc.BusyError:
            return False
        return True

    def close(self) -> None:
        with contextlib.suppress(posix_ipc.ExistentialError):
            self._sem.close()

    @staticmethod
    def unlink(domain: str) -> None:
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_semaphore(doorbell_name(domain))
