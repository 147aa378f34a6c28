"""Unit tests of the client's pure parts: agreement rule, staging gates, recorder, test model."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from eplbd.geometry import Geometry
from eplbd.placement import default_phy2log, log2phy_padded
from eplbd_client import control as C
from eplbd_client.device import DeviceOps
from eplbd_client.host import LayerTables, check_host
from eplbd_client.recorder import LoadRecorder
from eplbd_client.testing import TinyMoE
from eplbd_client.transfer import TransferError, staging_gates

R = 4


def words(**cols: object) -> np.ndarray:
    """[R, NUM_WORDS] with defaults: no candidate, nothing active, epoch 0."""
    w = np.zeros((R, C.NUM_WORDS), dtype=np.int64)
    w[:, C.W_ACTIVE] = -1
    w[:, C.W_CAND_ID] = -1
    w[:, C.W_CAND_BASE] = -1
    w[:, C.W_CAND_STATUS] = C.CAND_PENDING
    for k, v in cols.items():
        w[:, getattr(C, "W_" + k.upper())] = v
    return w


def test_start_needs_every_rank_ok_same_hash_and_base() -> None:
    st = C.Agreed(epoch=0)
    w = words(cand_id=5, cand_hash=77, cand_base=0, cand_status=C.CAND_OK)
    assert C.decide(w, st, 10) == C.Decision(C.START, 5, plan_hash=77)
    w2 = w.copy()
    w2[2, C.W_CAND_ID] = 3  # rank 2 has not read plan 5 yet: wait
    assert C.decide(w2, st, 10).kind == C.NONE
    w3 = w.copy()
    w3[1, C.W_CAND_STATUS] = C.CAND_PENDING  # still validating
    assert C.decide(w3, st, 10).kind == C.NONE
    w4 = w.copy()
    w4[3, C.W_CAND_HASH] = 78
    assert C.decide(w4, st, 10) == C.Decision(C.REJECT, 5, error=C.ERR_HASH_MISMATCH)
    w5 = w.copy()
    w5[0, C.W_CAND_STATUS] = C.ERR_INVALID
    assert C.decide(w5, st, 10) == C.Decision(C.REJECT, 5, error=C.ERR_INVALID)
    assert C.decide(w, C.Agreed(epoch=4), 10) == C.Decision(C.REJECT, 5, error=C.ERR_STALE_BASE)
    assert C.decide(w, C.Agreed(epoch=0, last_decided_id=5), 10).kind == C.NONE


def test_commit_progress_abort_and_timeout() -> None:
    st = C.Agreed(
        epoch=0, sync=10, active_id=5, active_base=0, active_layers=3, committed=1, last_progress_sync=9
    )
    w = words(active=5, committed=1, staged=2)
    w[3, C.W_STAGED] = 3
    assert C.decide(w, st, 4) == C.Decision(C.COMMIT, 5, commit_to=2)
    w[2, C.W_STAGED] = 1  # one rank behind: no commit
    assert C.decide(w, st, 4).kind == C.NONE
    st.sync = 13
    assert C.decide(w, st, 4) == C.Decision(C.ABORT, 5, error=C.ERR_TIMEOUT)
    w[1, C.W_EXEC_ERR] = C.ERR_TRANSFER
    st.sync = 10
    assert C.decide(w, st, 4) == C.Decision(C.ABORT, 5, error=C.ERR_TRANSFER)
    w[1, C.W_EXEC_ERR] = 0
    w[0, C.W_ABORT_REQ] = 1
    assert C.decide(w, st, 4) == C.Decision(C.ABORT, 5, error=C.ERR_ABORT_REQUESTED)


def test_replicated_words_must_agree() -> None:
    w = words(epoch=3)
    w[2, C.W_EPOCH] = 4
    with pytest.raises(C.AgreementError, match="epoch"):
        C.decide(w, C.Agreed(epoch=3), 10)


def _random_words(rng: np.random.Generator) -> np.ndarray:
    """[R, NUM_WORDS] from a small value domain, so that identical rows, equal candidate ids
    and every decision kind all occur often."""
    w = words(epoch=int(rng.integers(0, 3)), active=int(rng.choice([-1, -1, 2])), committed=0)
    same = rng.random() < 0.6  # all ranks packed the same words (the steady state)
    for r in range(R):
        if same and r > 0:
            w[r] = w[0]
            continue
        w[r, C.W_CAND_ID] = rng.integers(-1, 4)
        w[r, C.W_CAND_HASH] = rng.choice([0, 77, 78, 2**62 + 5])
        w[r, C.W_CAND_BASE] = rng.integers(-1, 3)
        w[r, C.W_CAND_STATUS] = rng.choice([C.CAND_OK, C.CAND_PENDING, C.CAND_STALE, C.ERR_INVALID])
        w[r, C.W_STAGED] = rng.integers(0, 3)
        w[r, C.W_EXEC_ERR] = rng.choice([0, 0, 0, C.ERR_TRANSFER])
        w[r, C.W_ABORT_REQ] = rng.random() < 0.1
    return w


def _random_state(rng: np.random.Generator) -> C.Agreed:
    active = int(rng.choice([-1, -1, 2]))
    return C.Agreed(
        epoch=int(rng.integers(0, 3)),
        sync=int(rng.integers(0, 40)),
        active_id=active,
        active_base=0 if active >= 0 else -1,
        active_layers=2 if active >= 0 else 0,
        committed=int(rng.integers(0, 2)) if active >= 0 else 0,
        last_progress_sync=int(rng.integers(0, 10)),
        last_decided_id=int(rng.integers(-1, 3)),
        diverging_since=int(rng.choice([-1, 0, 5])),
    )


def test_quiet_fast_path_agrees_with_decide_and_track() -> None:
    """quiet() is exactly 'decide gives NONE and track_divergence resets' on identical rows
    with no plan active and nothing new; otherwise it declines and the full rule runs."""
    rng = np.random.default_rng(5)
    hits = 0
    for _ in range(3000):
        w, st = _random_words(rng), _random_state(rng)
        w[:, C.W_ACTIVE] = st.active_id  # replicated, as packed after the previous decision
        w[:, C.W_COMMITTED] = st.committed
        q = C.quiet(w, st)
        assert q == C.quiet_bytes(w.tobytes(), st)
        rows_same = all((w[r] == w[0]).all() for r in range(R))
        expect = st.active_id < 0 and rows_same and int(w[0, C.W_CAND_ID]) <= st.last_decided_id
        assert q == expect, (w, st)
        if q:
            hits += 1
            assert C.decide(w, st, 10, 3) == C.Decision(C.NONE)
            st2 = C.Agreed(**vars(st))
            C.track_divergence(w, st2)
            assert st2.diverging_since == -1
    assert 200 < hits < 2900  # both branches exercised


def test_decide_on_identical_rows_equals_the_full_rule() -> None:
    """decide() reads one row when all rows are equal; the answer is the full rule's, also on
    the strided view of the gathered matrix the client passes."""
    rng = np.random.default_rng(6)
    kinds = set()
    for _ in range(3000):
        w, st = _random_words(rng), _random_state(rng)
        w[:, C.W_ACTIVE] = st.active_id
        w[:, C.W_COMMITTED] = st.committed
        full = C.decide_rows(w.tolist(), st, 10, 3)
        assert C.decide(w, st, 10, 3) == full
        mat = np.zeros((R, 7 + C.NUM_WORDS), dtype=np.int64)
        mat[:, 7:] = w
        assert C.decide(mat[:, 7:], st, 10, 3) == full
        kinds.add(full.kind)
    assert kinds == {C.NONE, C.START, C.COMMIT, C.ABORT, C.REJECT}


def test_words_struct_and_gathered_row_views_match_numpy() -> None:
    """The client packs words with WORDS_STRUCT and reads the gathered words through byte
    views of its receive buffer: both must be the int64 matrix numpy sees."""
    from eplbd_client.client import _RecvBuf

    vals = (3, -1, 2**62 + 7, 0, 2**32 - 1, -5, 2**63 - 1, -(2**63), C.ERR_INVALID, 1, 0, 1)
    buf = np.zeros(C.NUM_WORDS + 3, dtype=np.int64)
    C.WORDS_STRUCT.pack_into(memoryview(buf).cast("B"), 24, *vals)
    assert buf[3:].tolist() == list(vals) and buf[:3].tolist() == [0, 0, 0]
    ls = 10
    t = torch.arange(R * (ls + C.NUM_WORDS), dtype=torch.int64) * 7 - 50
    rb = _RecvBuf(t, R, ls)
    assert rb.words.shape == (R, C.NUM_WORDS) and rb.counts.shape == (R, ls)
    assert b"".join(rb.word_rows) == rb.words.tobytes()
    t[ls + C.W_CAND_ID] = 123  # rank 0's candidate id: the views see writes into the tensor
    assert rb.words[0, C.W_CAND_ID] == 123 and b"".join(rb.word_rows) == rb.words.tobytes()


def test_partial_epoch_unique_and_distinct_from_plan_ids() -> None:
    seen = {C.partial_epoch(p, c) for p in (0, 1, 7, 2**39) for c in (1, 2, 57)}
    assert len(seen) == 12 and all(e >= 2**62 for e in seen)
    with pytest.raises(ValueError):
        C.partial_epoch(3, 0)


def test_staging_gates() -> None:
    need = np.array([[2, 1], [2, 2], [1, 0], [3, 3]])
    assert staging_gates(need, 3).tolist() == [0, 1, 1, 3]
    assert staging_gates(need, 100).tolist() == [0, 0, 0, 0]
    with pytest.raises(TransferError, match="max_staged_experts=2"):
        staging_gates(need, 2)


def test_recorder_accumulates_without_reallocating() -> None:
    rec = LoadRecorder(3, 4)
    ptr = rec.acc.data_ptr()
    rec.record(1, torch.tensor([1, 2, 3, 4], dtype=torch.int32))
    rec.record(1, torch.tensor([1, 0, 0, 0]))
    rec.record(2, torch.tensor([0, 0, 0, 5]))
    out = torch.empty(12, dtype=torch.int64)
    rec.drain_into(out)
    assert out.view(3, 4).tolist() == [[0, 0, 0, 0], [2, 2, 3, 4], [0, 0, 0, 5]]
    assert rec.acc.sum().item() == 0 and rec.acc.data_ptr() == ptr


def test_layer_tables_are_independent_device_copies() -> None:
    p2l = np.array([0, 1, 2, 0], dtype=np.int32)
    l2p = log2phy_padded(p2l[None], Geometry(1, 3, 2, 2))[0]
    rc = np.array([2, 1, 1], dtype=np.int32)
    t = LayerTables.build(p2l, l2p, rc, "cpu")
    assert [x.dtype for x in t.tensors()] == [torch.int64] * 3
    assert t.log2phy_dev.tolist() == l2p.tolist() and t.replica_count_dev.tolist() == [2, 1, 1]
    moved = DeviceOps("cpu").to_device(p2l)
    p2l[0] = 2  # the caller's array may change later: the device copy must not
    assert moved.dtype == torch.int64 and moved.tolist() == [0, 1, 2, 0]
    same = torch.arange(3)
    assert DeviceOps("cpu").to_device(same).data_ptr() != same.data_ptr()


def test_check_host_names_what_is_wrong() -> None:
    g = Geometry(1, 4, 1, 4)
    check_host(TinyMoE(g, 0, distributed=False))

    class OldSeam(TinyMoE):
        def commit_layer(self, layer: int, phy2log_row: Any, log2phy: Any, replica_count: Any) -> None:  # type: ignore[override]
            pass

    with pytest.raises(TypeError, match=r"commit_layer.*must take \(layer, tables"):
        check_host(OldSeam(g, 0, distributed=False))
    with pytest.raises(TypeError, match="has no expert_weights, commit_layer"):
        check_host(SimpleNamespace(num_moe_layers=1, device="cpu"))


def test_record_deferred_equals_record() -> None:
    gen = torch.Generator().manual_seed(0)
    steps = [[torch.randint(0, 9, (4,), generator=gen) for _ in range(3)] for _ in range(4)]
    now, later = LoadRecorder(3, 4), LoadRecorder(3, 4)
    for i, counts in enumerate(steps):
        before = later.acc.clone()
        for layer, c in enumerate(counts):
            if i == 1 and layer == 2:
                continue  # a step that skips a layer: per-layer adds at flush
            now.record(layer, c)
            later.record_deferred(layer, c.to(torch.int32) if i == 2 else c)  # any integer dtype
        if i == 3:  # one layer twice in a step
            now.record(0, counts[1])
            later.record_deferred(0, counts[1])
        assert torch.equal(later.acc, before), i  # nothing added before the flush
        later.flush()
        assert torch.equal(later.acc, now.acc), i
    ptr = later._stacked.data_ptr()
    later.flush()  # nothing deferred: no change
    assert torch.equal(later.acc, now.acc) and later._stacked.data_ptr() == ptr


def test_tiny_moe_single_rank_matches_reference() -> None:
    g = Geometry(2, 8, 1, 8)
    m = TinyMoE(g, 0, distributed=False, tokens=32)
    rec = LoadRecorder(2, 8)
    y = m.forward(3, rec.record)
    torch.testing.assert_close(y, m.reference_forward(3), rtol=1e-5, atol=1e-6)
    assert rec.acc.sum().item() == 2 * 32 * 2  # L * T * top_k
    assert m.weight_mismatches() == [] and m.tables_consistent()
    assert np.array_equal(m.phy2log, default_phy2log(g))


def test_client_config_from_env() -> None:
    from eplbd_client import ClientConfig

    env = {
        "EPLBD_CLIENT_SYNC_INTERVAL": "8",
        "EPLBD_CLIENT_MODE": "stw",
        "EPLBD_CLIENT_MAX_STAGED_EXPERTS": "none",
        "EPLBD_CLIENT_P2P_TIMEOUT_S": "2.5",
        "EPLBD_CLIENT_SHM_MODE": "0o640",
        "EPLBD_CLIENT_UNLINK_ON_CLOSE": "false",
        "EPLBD_SHM_PREFIX": "daemon.setting.ignored.",
    }
    c = ClientConfig.from_env(env, ranks_per_node=2)
    assert (c.sync_interval, c.mode, c.max_staged_experts, c.p2p_timeout_s) == (8, "stw", None, 2.5)
    assert (c.shm_mode, c.unlink_on_close, c.ranks_per_node) == (0o640, False, 2)
    with pytest.raises(ValueError, match="EPLBD_CLIENT_SYNC_INTERVALL"):
        ClientConfig.from_env({"EPLBD_CLIENT_SYNC_INTERVALL": "8"})
    with pytest.raises(ValueError, match="mode"):
        ClientConfig.from_env({"EPLBD_CLIENT_MODE": "fast"})
