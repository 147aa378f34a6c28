"""Control words and the agreement rule (DESIGN.md steps 2 and 5), pure numpy.

At every sync each rank all-gathers ``[L*S counts | NUM_WORDS control words]``
(int64). The matrix gathered at sync n is read at sync n+1 and fed to
:func:`decide` together with the *agreed state* (:class:`Agreed`), which every
rank holds identically because every rank applies the same decisions to the same
matrices in the same order. Hence all ranks start, commit, reject and abort at
the same sync with no extra collective.

Words, per rank (``words[r, W_*]``):

======================  =====================================================
``W_SYNC``              sync index the words were packed at (replicated)
``W_EPOCH``             epoch in force (replicated)
``W_ACTIVE``            id of the plan in progress, -1 none (replicated)
``W_COMMITTED``         changed layers of it committed so far (replicated)
``W_CONFIG``            digest of settings that must match on all ranks
``W_CAND_ID``           newest plan id this rank read from shm, -1 none
``W_CAND_HASH``         its plan_hash (0 when unreadable)
``W_CAND_BASE``         its base epoch
``W_CAND_STATUS``       CAND_OK / CAND_PENDING / CAND_STALE or an ERR_* code
``W_STAGED``            changed layers of the active plan staged on this rank
                        (a prefix count that includes committed layers)
``W_EXEC_ERR``          ERR_* of this rank's transfer of the active plan, 0 ok
``W_ABORT_REQ``         1 when this rank asks to abort the active plan
======================  =====================================================

Epochs. Epoch ``b`` is the placement a plan with ``base_epoch == b`` starts
from. After all changed layers of plan X are committed the epoch is ``X.id``.
Commits are per layer, so between the first and the last commit (and after an
abort that left some layers committed) the placement is a mix that no plan
produced; it gets the epoch :func:`partial_epoch` ``(X.id, c)`` =
``2**62 | c << 40 | X.id`` with c the committed changed layers (0 < c < n).
Every placement thus has a unique epoch, and a plan built on any of them can be
validated exactly. An abort with nothing committed keeps the base epoch.

Several nodes. Each node's daemon publishes into its own node's domain and the
ranks of a node read only that one, so a plan starts only when every rank, on
every node, holds the same id with the same hash. Equal ids with different
hashes are rejected at once (``ERR_HASH_MISMATCH``). A plan that only some
nodes' daemons published (a daemon down, slow, configured differently) leaves
the ranks' candidate ids unequal; :func:`track_divergence` counts the syncs
this lasts in :attr:`Agreed.diverging_since`, and after ``divergence_syncs``
syncs :func:`decide` rejects the newest candidate with ``ERR_DIVERGED``: the
node leaders write that into PlanStatus, which unblocks every daemon for the
next trigger.
"""

from __future__ import annotations

import dataclasses
import struct
import sys
from typing import NamedTuple

import numpy as np

__all__ = [
    "NUM_WORDS",
    "Agreed",
    "AgreementError",
    "Decision",
    "decide",
    "decide_rows",
    "partial_epoch",
    "error_name",
    "quiet",
    "quiet_bytes",
    "track_divergence",
]

(
    W_SYNC,
    W_EPOCH,
    W_ACTIVE,
    W_COMMITTED,
    W_CONFIG,
    W_CAND_ID,
    W_CAND_HASH,
    W_CAND_BASE,
    W_CAND_STATUS,
    W_STAGED,
    W_EXEC_ERR,
    W_ABORT_REQ,
) = range(12)
NUM_WORDS = 12
#: One rank's words as packed bytes (native int64, as in the all-gathered matrix).
WORDS_STRUCT = struct.Struct(f"={NUM_WORDS}q")
_ROW_BYTES = WORDS_STRUCT.size
REPLICATED = (W_SYNC, W_EPOCH, W_ACTIVE, W_COMMITTED, W_CONFIG)  # must stay words 0..4

# Candidate status values (below 16) and error codes (16 and up; also written to
# PlanStatus.error by the node leader).
CAND_OK, CAND_PENDING, CAND_STALE = 0, 1, 2
ERR_NONE = 0
ERR_UNREADABLE = 16  # the plan in shm could not be read (torn, CRC, layout)
ERR_INVALID = 17  # validate_plan rejected it
ERR_HASH_MISMATCH = 18  # ranks read different plans under one id
ERR_STALE_BASE = 19  # base epoch is not the epoch in force
ERR_STAGING = 20  # max_staged_experts below one layer's need
ERR_TRANSFER = 21  # a p2p transfer failed or timed out
ERR_TIMEOUT = 22  # no commit progress for plan_timeout_syncs syncs
ERR_ABORT_REQUESTED = 23  # a rank asked to abort (request_abort, shutdown)
ERR_INTERNAL = 24  # unexpected exception on a rank
ERR_DIVERGED = 25  # only some nodes published the plan, for divergence_syncs syncs
ERR_TRANSFER_UNSAFE = 26  # an earlier abort may have left the p2p group out of step (NCCL/HCCL)

_ERR_NAMES = {
    ERR_NONE: "none",
    ERR_UNREADABLE: "unreadable",
    ERR_INVALID: "invalid",
    ERR_HASH_MISMATCH: "hash_mismatch",
    ERR_STALE_BASE: "stale_base_epoch",
    ERR_STAGING: "staging_too_small",
    ERR_TRANSFER: "transfer_failed",
    ERR_TIMEOUT: "timeout",
    ERR_ABORT_REQUESTED: "abort_requested",
    ERR_INTERNAL: "internal",
    ERR_DIVERGED: "diverged",
    ERR_TRANSFER_UNSAFE: "transfer_group_unsafe",
}
#: Errors that mean the nodes' daemons disagree (not a fault of the plan itself).
MISMATCH_ERRORS = (ERR_HASH_MISMATCH, ERR_DIVERGED)

_PARTIAL_BIT = 1 << 62


def error_name(code: int) -> str:
    return _ERR_NAMES.get(int(code), f"error_{int(code)}")


def partial_epoch(plan_id: int, committed: int) -> int:
    """Epoch of a placement with ``committed`` (>= 1, < all) changed layers of ``plan_id`` applied."""
    if not (0 < committed < (1 << 21)) or not (0 <= plan_id < (1 << 40)):
        raise ValueError(f"partial_epoch: plan_id {plan_id} / committed {committed} out of range")
    return _PARTIAL_BIT | (committed << 40) | plan_id


class AgreementError(RuntimeError):
    """Ranks disagree on replicated state: a bug or mismatched settings; not recoverable."""


@dataclasses.dataclass
class Agreed:
    """State every rank holds identically (changed only through :func:`decide`'s decisions)."""

    epoch: int
    sync: int = 0
    active_id: int = -1
    active_base: int = -1
    active_layers: int = 0  # changed layers of the active plan
    committed: int = 0  # changed layers committed
    last_progress_sync: int = 0
    last_decided_id: int = -1  # plans with id <= this are never started again
    diverging_since: int = -1  # sync since which candidate ids differ between ranks (-1: they agree)


# Decision kinds.
NONE, START, COMMIT, ABORT, REJECT = "none", "start", "commit", "abort", "reject"


class Decision(NamedTuple):
    kind: str
    plan_id: int = -1
    commit_to: int = 0  # COMMIT: changed layers [committed, commit_to) commit now
    error: int = ERR_NONE
    plan_hash: int = 0  # START: the agreed hash


_NOTHING = Decision(NONE)  # immutable: one instance serves every "nothing to do"


def check_replicated(words: np.ndarray | list[list[int]]) -> None:
    """Raise AgreementError if the replicated words differ between ranks. words: [R, NUM_WORDS]."""
    rows = words.tolist() if isinstance(words, np.ndarray) else words
    n = len(REPLICATED)  # the replicated words come first
    first = rows[0][:n]
    if all(r[:n] == first for r in rows):
        return
    names = ("sync", "epoch", "active", "committed", "config")
    bad = [i for i in range(n) if any(r[i] != first[i] for r in rows)]
    raise AgreementError(
        f"ranks disagree on replicated state {[names[i] for i in bad]}: "
        + "; ".join(f"{names[i]}={[r[i] for r in rows]}" for i in bad)
    )


def _rows_equal(words: np.ndarray) -> bool:
    """True when every rank packed the same words. words: [R, NUM_WORDS] int64."""
    b = words.tobytes()
    return b == b[:_ROW_BYTES] * len(words)


def quiet_bytes(packed: bytes, st: Agreed) -> bool:
    """Fast path of a sync: True when nothing can be decided or tracked at this sync.

    ``packed``: every rank's words in rank order as bytes (R rows of
    :data:`WORDS_STRUCT`, i.e. ``words.tobytes()`` of the [R, NUM_WORDS] int64
    matrix). True when no plan is active, every rank packed identical words and
    their candidate is not newer than ``st.last_decided_id`` (the steady state
    between plans). Then :func:`decide` returns ``NONE`` and
    :func:`track_divergence` sets ``st.diverging_since`` to -1, so a caller may
    skip both provided it resets ``diverging_since`` itself. Pure and
    replicated like :func:`decide`; does not change ``st``. Bytes, not numpy:
    a handful of core-Python operations, the cheapest thing to run at every
    sync.
    """
    if st.active_id >= 0:
        return False
    row = packed[:_ROW_BYTES]
    if packed != row * (len(packed) // _ROW_BYTES):
        return False
    cand = int.from_bytes(row[W_CAND_ID * 8 : W_CAND_ID * 8 + 8], sys.byteorder, signed=True)
    return cand <= st.last_decided_id


def quiet(words: np.ndarray, st: Agreed) -> bool:
    """:func:`quiet_bytes` on the gathered words [R, NUM_WORDS] int64."""
    return quiet_bytes(words.tobytes(), st)


def decide(words: np.ndarray, st: Agreed, timeout_syncs: int, divergence_syncs: int = 0) -> Decision:
    """The one decision all ranks take at this sync from the gathered words [R, NUM_WORDS].

    ``st`` is the agreed state *now* (its ``sync`` is the current sync index);
    ``words`` were packed at the previous sync, after that sync's decision.
    ``divergence_syncs`` > 0: reject (``ERR_DIVERGED``) the newest candidate once
    the ranks' candidate ids have differed since ``st.diverging_since`` for that
    many syncs (see :func:`track_divergence`); 0 never rejects for that.
    Pure and deterministic: equal inputs give equal decisions on every rank.
    """
    if _rows_equal(words):
        # Every rule below is an any/all/min/max over the ranks' rows or reads
        # row 0: on identical rows one row gives the same answer, and the
        # replicated words trivially agree.
        rows: list[list[int]] = [words[0].tolist()]
    else:
        rows = words.tolist()
        check_replicated(rows)
    return decide_rows(rows, st, timeout_syncs, divergence_syncs)


def decide_rows(rows: list[list[int]], st: Agreed, timeout_syncs: int, divergence_syncs: int = 0) -> Decision:
    """:func:`decide` on the words as Python lists ([R][NUM_WORDS]) whose replicated words
    were checked. Lists: for a few dozen ranks that is several times cheaper than a chain of
    small numpy operations at a sync."""
    r0 = rows[0]
    if st.active_id >= 0:
        if r0[W_ACTIVE] != st.active_id:
            # Packed before this plan started (cannot happen: START is applied
            # before packing); treat as no information rather than guessing.
            return _NOTHING
        for r in rows:
            if r[W_EXEC_ERR]:
                return Decision(ABORT, st.active_id, error=r[W_EXEC_ERR])
        if any(r[W_ABORT_REQ] for r in rows):
            return Decision(ABORT, st.active_id, error=ERR_ABORT_REQUESTED)
        staged = min(r[W_STAGED] for r in rows)
        if staged > st.committed:
            return Decision(COMMIT, st.active_id, commit_to=min(staged, st.active_layers))
        if st.sync - st.last_progress_sync >= timeout_syncs:
            return Decision(ABORT, st.active_id, error=ERR_TIMEOUT)
        return _NOTHING

    x = r0[W_CAND_ID]
    if any(r[W_CAND_ID] != x for r in rows):
        # Not every rank has read the same plan: usually for a sync or two (daemons
        # publish at slightly different times); for long only if the nodes' daemons
        # disagree on whether (or which) plan to make.
        newest = max(r[W_CAND_ID] for r in rows)
        if (
            divergence_syncs > 0
            and newest > st.last_decided_id
            and st.diverging_since >= 0
            and st.sync - st.diverging_since >= divergence_syncs
        ):
            return Decision(REJECT, newest, error=ERR_DIVERGED)
        return _NOTHING
    if x <= st.last_decided_id:
        return _NOTHING  # the common case: nothing new
    for r in rows:
        if r[W_CAND_STATUS] >= 16:
            return Decision(REJECT, x, error=r[W_CAND_STATUS])
    if any(r[W_CAND_HASH] != r0[W_CAND_HASH] for r in rows):
        return Decision(REJECT, x, error=ERR_HASH_MISMATCH)
    if r0[W_CAND_BASE] != st.epoch:
        return Decision(REJECT, x, error=ERR_STALE_BASE)
    if all(r[W_CAND_STATUS] == CAND_OK for r in rows):
        return Decision(START, x, plan_hash=r0[W_CAND_HASH])
    return _NOTHING  # some rank still validating (or re-validating for this epoch)


def candidate_ids(words: np.ndarray) -> list[int]:
    """Each rank's candidate plan id (-1 none) from the gathered words [R, NUM_WORDS]."""
    return [int(v) for v in np.asarray(words)[:, W_CAND_ID]]


def track_divergence(words: np.ndarray, st: Agreed) -> None:
    """Update ``st.diverging_since`` after this sync's decision was applied.

    Set to the current sync when, with no plan active, some rank holds a
    candidate newer than ``st.last_decided_id`` that not every rank holds;
    reset to -1 as soon as the ids agree, nothing new is pending, or a plan is
    active. A function of the gathered words and the agreed state only, so it
    stays replicated.
    """
    ids: list[int] = words[:, W_CAND_ID].tolist()
    newest = max(ids)
    if st.active_id >= 0 or newest <= st.last_decided_id or all(i == newest for i in ids):
        st.diverging_since = -1
    elif st.diverging_since < 0:
        st.diverging_since = st.sync
