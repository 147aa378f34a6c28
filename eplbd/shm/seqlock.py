"""Seqlock + CRC32 regions: one writer, any number of lock-free readers.

A region is a 64-byte header — ``seq`` u64 at 0, ``crc`` u32 at 8, 4 reserved
bytes, six i64 fields at 16..64 — followed by its payload (see layout.py).

Writer: compute the CRC32 of (fields, payload) from its own buffers, set
``seq`` odd, store fields and payload, store the CRC, set ``seq`` even.
Reader: read ``seq`` (must be even), copy fields + CRC + payload, re-read
``seq`` (must be unchanged), then check the CRC of the *copies*.

Why both: on x86 (TSO) the sequence check alone is sound, but Ascend hosts are
aarch64, where plain stores may become visible out of order and CPython gives
us no fences; a reader may then see the new even ``seq`` before the new
payload. The CRC covers the fields (ids, sizes) and the payload, not ``seq``,
so such a mix is rejected and retried. A writer killed mid-write leaves ``seq``
odd: readers keep rejecting the region, and the next writer (a restarted
daemon) simply moves to the next odd value and writes a whole new version.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Sequence

import numpy as np

from eplbd.shm.errors import TornReadError
from eplbd.shm.layout import REGION_FIELDS, REGION_HEADER_SIZE

__all__ = ["SeqRegion", "DEFAULT_READ_BUDGET_S", "SPIN_ATTEMPTS", "CORRUPT_LIMIT"]

DEFAULT_READ_BUDGET_S = 0.5  # a writer may be descheduled inside its odd window on a busy host
SPIN_ATTEMPTS = 64  # retries before the reader starts yielding the CPU
CORRUPT_LIMIT = 16  # stable-seq CRC failures (with backoff between) that mean "corrupt", not "racing"
_MASK64 = (1 << 64) - 1

PartsFor = Callable[[np.ndarray], "Sequence[np.ndarray] | None"]


class SeqRegion:
    """One seqlocked region over ``buf[off : off + 64 + payload_size]``.

    ``buf`` is a uint8 view of the whole segment (read-only for read-only
    attachments). ``payload`` is the uint8 view of the payload; callers carve
    typed views out of it.
    """

    __slots__ = ("label", "_seq", "_meta", "_fields", "_crc", "payload")

    def __init__(self, buf: np.ndarray, off: int, payload_size: int, label: str) -> None:
        self.label = label
        self._seq = buf[off : off + 8].view("<u8")
        self._meta = buf[off + 8 : off + REGION_HEADER_SIZE]  # crc, reserved, fields: copied at once
        self._crc = buf[off + 8 : off + 12].view("<u4")
        self._fields = buf[off + 16 : off + REGION_HEADER_SIZE].view("<i8")
        self.payload = buf[off + REGION_HEADER_SIZE : off + REGION_HEADER_SIZE + payload_size]

    @property
    def seq(self) -> int:
        """Current sequence number (odd while a write is in progress or was interrupted)."""
        return int(self._seq[0])

    def write(self, fields: Sequence[int], parts: Sequence[tuple[np.ndarray, np.ndarray]] = ()) -> None:
        """Store ``fields`` (≤ 6 ints) and copy each ``src`` into its ``dst`` view.

        ``src`` must be C-contiguous with ``dst``'s dtype and shape, so the CRC of
        ``src`` bytes is the CRC of what lands in shared memory.
        """
        f = np.zeros(REGION_FIELDS, dtype="<i8")
        f[: len(fields)] = fields
        crc = zlib.crc32(f.data)
        for _, src in parts:
            crc = zlib.crc32(src.data, crc)
        s = int(self._seq[0])
        # An odd seq means a previous writer died mid-write: skip to the next odd
        # value, so no reader can match a seq it saw before that write.
        odd = (s + 1 if s % 2 == 0 else s + 2) & _MASK64
        self._seq[0] = odd
        self._fields[:] = f
        for dst, src in parts:
            np.copyto(dst, src, casting="no")
        self._crc[0] = crc
        self._seq[0] = (odd + 1) & _MASK64

    def read(
        self, parts_for: PartsFor | None = None, budget_s: float = DEFAULT_READ_BUDGET_S
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Consistent copy: (fields [6] int64, [copies of the views parts_for(fields) returns]).

        ``parts_for`` gets the copied fields and returns the payload views to copy
        (e.g. only the used ops), or None if the fields are out of bounds (torn
        or corrupt: retried like a CRC mismatch). Raises TornReadError when no
        consistent copy is seen within ``budget_s`` seconds, or when the content
        keeps failing its CRC while ``seq`` stays the same (corruption, not a race).
        """
        seq_view, meta_view = self._seq, self._meta
        attempt = 0
        corrupt = 0
        corrupt_seq = -1
        t0 = 0.0
        while True:
            s1 = int(seq_view[0])
            if s1 % 2 == 0:
                meta = meta_view.copy()
                fields = meta[8:].view("<i8")
                views = parts_for(fields) if parts_for is not None else ()
                copies = [v.copy() for v in views] if views is not None else []
                if int(seq_view[0]) == s1:
                    if views is not None:
                        crc = zlib.crc32(meta[8:].data)
                        for c in copies:
                            crc = zlib.crc32(c.data, crc)
                        if crc == int(meta[:4].view("<u4")[0]):
                            return fields, copies
                    # Stable seq but bad content: a stale view on a weakly ordered
                    # CPU clears up after a moment; corruption does not.
                    if s1 == corrupt_seq:
                        corrupt += 1
                        if corrupt >= CORRUPT_LIMIT:
                            raise TornReadError(
                                f"{self.label}: content fails its CRC32/bounds at stable sequence {s1} "
                                f"over {corrupt + 1} reads: corrupt"
                            )
                    else:
                        corrupt_seq, corrupt = s1, 0
            attempt += 1
            if attempt < SPIN_ATTEMPTS:
                continue
            now = time.monotonic()
            if t0 == 0.0:
                t0 = now
            elif now - t0 > budget_s:
                state = "odd (write in progress or writer died mid-write)" if s1 % 2 else "changing"
                raise TornReadError(
                    f"{self.label}: no consistent read in {attempt} attempts / {budget_s:.3g} s "
                    f"(sequence {state}, last {s1})"
                )
            # Let the writer run (it may share our core), then back off gently.
            over = attempt - 2 * SPIN_ATTEMPTS
            time.sleep(0 if over < 0 else min(1e-3, 1e-5 * (over + 1)))
