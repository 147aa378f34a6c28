"""Multi-process client tests (4 ranks, gloo) with plans published by the test itself.

A thread of the test process stands in for the daemon (``PlanDriver``), which
isolates the client from the daemon: these tests exercise record -> sync ->
agree -> transfer -> commit, stop-the-world mode, rejection of corrupt and
invalid plans and aborts, on the tiny EP MoE model.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from eplbd.geometry import Geometry
from eplbd.placement import default_phy2log, log2phy_compact
from eplbd.plan import RECV, Plan
from eplbd.shm import PLAN_COMMITTED, PLAN_REJECTED, Domain
from eplbd_client import ClientConfig, EplbClient
from eplbd_client import control as C
from eplbd_client.testing import (
    PlanDriver,
    TinyMoE,
    check_ranks_exact,
    launch,
    launch_with_driver,
    rank_report,
)

pytestmark = pytest.mark.timeout(120)

G = Geometry(4, 16, 4, 6)
WORLD = 4


def rank_main(rank: int, world: int, spec: dict[str, Any]) -> dict[str, Any]:
    """One rank: the tiny model + client; steps until the (replicated) stop condition."""
    import torch

    model = TinyMoE(G, rank, tokens=spec.get("tokens", 64), seed=1)
    model.keep_history = rank == 0
    cfg = ClientConfig(**spec.get("config", {}))
    if spec.get("break_rank") == rank:  # fault injection: this rank's transfer hangs
        import eplbd_client.transfer as T

        from_layer = spec.get("break_from", 0)
        orig = T.PlanTransfer.transfer_layer

        hangs = {"n": 0}

        def stuck(self: Any, j: int) -> Any:
            if j >= from_layer and not (spec.get("hang_once") and hangs["n"]):
                hangs["n"] += 1
                self.abort_event.wait(30)  # until every rank agreed to abort
                raise T.TransferError(C.ERR_TRANSFER, "injected hang")
            return orig(self, j)

        T.PlanTransfer.transfer_layer = stuck  # type: ignore[method-assign]
    client = EplbClient(model, G, spec["domain"], config=cfg)
    if spec.get("p2p_by_order"):  # as on NCCL/HCCL, which pair p2p messages by order, not tag
        client._p2p_by_order = True
    # Which threads issue the sync's all-gather (with a sync thread: never the forward's).
    gather_threads: set[str] = set()
    gather = client._gather

    def traced_gather(*args: Any, **kwargs: Any) -> Any:
        gather_threads.add(threading.current_thread().name)
        return gather(*args, **kwargs)

    client._gather = traced_gather
    go = spec.get("go")
    if go is not None:
        go.wait(30)
    want_commits = spec.get("commits", 3)
    want_rejects = spec.get("rejects", 0)
    want_aborts = spec.get("aborts", 0)
    maxdiff = 0.0
    steps = 0
    # What the engine sees after each step: must be identical on every rank, step by step.
    seen: list[tuple[int, ...]] = []
    t0 = time.perf_counter()
    abort_asked = False
    for step in range(spec.get("max_steps", 2000)):
        y = model.forward(step, client.record_deferred if spec.get("deferred") else client.record)
        if spec.get("abort_in_flight") == rank and client.active_plan >= 0 and not abort_asked:
            client.request_abort()  # once, while the first plan is in flight
            abort_asked = True
        if step % 3 == 0:
            maxdiff = max(maxdiff, float((y - model.reference_forward(step)).abs().max()))
        client.step()
        steps = step + 1
        s = client.stats  # replicated counters: every rank stops at the same step
        ids = (client.epoch, client.active_plan)
        seen.append((s.plans_started, s.plans_committed, s.plans_aborted, s.plans_rejected, *ids))
        if (
            s.plans_committed >= want_commits
            and s.plans_rejected >= want_rejects
            and s.plans_aborted >= want_aborts
            and client.active_plan < 0
        ):
            break
    elapsed = time.perf_counter() - t0
    out = {
        **rank_report(model, client, maxdiff),
        "steps": steps,
        "elapsed": elapsed,
        "commits": model.commits,
        "gather_threads": sorted(gather_threads),
        "seen": seen,
        "main_thread": threading.current_thread().name,
        "transfer_unsafe": client.status()["transfer_unsafe"],
    }
    if client.is_leader:
        time.sleep(0.05)  # let the publisher thread finish its queue
        ep, p2l = client._dom_poll.read_placement()
        out["shm_placement"] = (ep, p2l.copy())
        if rank == 0:
            # Every window in the ring must hold exactly the logical tokens routed in its
            # steps, whatever placement was in force (windows straddle commits).
            bad = []
            wins = client._dom_poll.read_windows(64)
            for w in wins:
                want = sum(model.logical_by_step[s] for s in range(w.step_begin, w.step_end))
                if not np.array_equal(w.loads, want):
                    bad.append(w.window_id)
            out["windows_checked"], out["windows_bad"] = len(wins), bad
            out["window_epochs"] = sorted({int(w.epoch) for w in wins})
    client.close()
    del torch
    return out


def run(
    spec: dict[str, Any], driver: PlanDriver | None = None, timeout: float = 90.0
) -> list[dict[str, Any]]:
    if driver is None:
        return launch(rank_main, WORLD, spec, timeout=timeout)
    return launch_with_driver(rank_main, WORLD, spec, driver=driver, timeout=timeout)


def check_consistent(res: list[dict[str, Any]]) -> None:
    """Every rank: bitwise weights, tables, same placement and epoch, outputs equal the reference."""
    check_ranks_exact(res)
    for r in res:
        for k in ("plans_started", "plans_committed", "plans_aborted", "plans_rejected", "layers_committed"):
            assert r["stats"][k] == res[0]["stats"][k], k
        assert r["seen"] == res[0]["seen"]  # counters, epoch and active plan, after every step
    ep, p2l = res[0]["shm_placement"]
    assert ep == res[0]["epoch"] and np.array_equal(p2l, res[0]["phy2log"])
    assert res[0]["windows_checked"] > 0 and res[0]["windows_bad"] == [], res[0]["windows_bad"]


@pytest.mark.parametrize("mode", ["async", "async-inline", "stw", "async-deferred"])
def test_random_plans_applied_bitwise(shm_prefix: str, mode: str) -> None:
    """Three plans, exact everywhere. ``async``: the sync runs on the sync thread, and the
    forward thread never issues the all-gather; ``async-inline`` / ``stw``: on the forward
    thread; ``async-deferred``: the sync thread, counts recorded with ``record_deferred``
    (every window still holds exactly the tokens routed in its steps)."""
    name = shm_prefix + "job.m0"
    driver = PlanDriver(name, G, plans=3, source="random", gap_windows=2, seed=5)
    threaded = mode in ("async", "async-deferred")
    cfg = {"sync_interval": 4, "mode": mode.split("-")[0], "sync_thread": threaded}
    spec = {"domain": name, "config": cfg, "commits": 3, "deferred": mode == "async-deferred"}
    res = run(spec, driver)
    check_consistent(res)
    for rank, r in enumerate(res):
        if threaded:
            assert r["gather_threads"] == [f"eplbd-sync-r{rank}"], r["gather_threads"]
        else:
            assert r["gather_threads"] == [r["main_thread"]], r["gather_threads"]
    assert res[0]["stats"]["plans_committed"] == 3
    assert res[0]["stats"]["plans_aborted"] == 0
    assert res[0]["epoch"] == driver.published[-1]
    assert not np.array_equal(res[0]["phy2log"], default_phy2log(G))
    assert [s.state for s in driver.statuses] == [PLAN_COMMITTED] * 3
    assert len(res[0]["window_epochs"]) >= 2  # the checked windows span placements
    assert res[0]["commits"] > 0


def test_small_staging_pool_pipelines_nothing_but_works(shm_prefix: str) -> None:
    """max_staged_experts = S: one layer at a time; still exact."""
    name = shm_prefix + "job.m0"
    driver = PlanDriver(name, G, plans=2, source="random", seed=9)
    spec = {"domain": name, "config": {"sync_interval": 2, "max_staged_experts": 6}, "commits": 2}
    check_consistent(run(spec, driver))


def _flip_plan_bytes(name: str, before: bytes) -> None:
    """Corrupt the plan just published: flip bytes in the middle of the largest changed block."""
    path = Path("/dev/shm") / name
    after = bytearray(path.read_bytes())
    diff = np.flatnonzero(np.frombuffer(bytes(after), np.uint8) != np.frombuffer(before, np.uint8))
    # Largest run of changed bytes = the plan payload (not the 8-byte current-plan word).
    runs = np.split(diff, np.flatnonzero(np.diff(diff) > 64) + 1)
    big = max(runs, key=lambda r: r[-1] - r[0])
    mid = int(big[len(big) // 2])
    with open(path, "r+b") as f:
        f.seek(mid)
        f.write(bytes(b ^ 0xFF for b in after[mid : mid + 4]))


def test_corrupt_and_invalid_plans_rejected_everywhere(shm_prefix: str) -> None:
    """A plan whose bytes were flipped in shm, then a well-formed plan whose ops do not
    match its placements: both rejected on every rank, never applied; a valid plan after them is."""
    import multiprocessing as mp

    name = shm_prefix + "job.m0"
    go = mp.get_context("fork").Event()
    new = default_phy2log(G)
    new[1] = np.roll(new[1], 6)  # layer 1: every rank's slots move to the next rank
    from eplbd.planner import build_plan

    seen: dict[str, Any] = {}

    def feeder() -> None:
        try:
            dom = None
            t_end = time.monotonic() + 30
            while dom is None and time.monotonic() < t_end:
                try:
                    dom = Domain.attach(name, writable=True)
                except Exception:
                    time.sleep(0.01)
            assert dom is not None
            p2l0 = default_phy2log(G)
            before = (Path("/dev/shm") / name).read_bytes()
            dom.publish_plan(build_plan(1, 0, p2l0, new, G))
            _flip_plan_bytes(name, before)
            go.set()  # ranks start stepping only now: nobody saw the intact plan
            seen["s1"] = _wait_final(dom, 1)
            bad = build_plan(2, 0, p2l0, new, G)
            ops = bad.ops.copy()
            i = int(np.flatnonzero(ops["kind"] == RECV)[0])
            ops["expert"][i] = (ops["expert"][i] + 1) % G.num_experts  # lies about the source
            dom.publish_plan(Plan(2, 0, bad.phy2log, bad.log2phy, bad.replica_count, bad.op_indptr, ops))
            seen["s2"] = _wait_final(dom, 2)
            dom.publish_plan(build_plan(3, 0, p2l0, new, G))
            seen["s3"] = _wait_final(dom, 3)
            dom.close()
        except BaseException as e:
            seen["error"] = e
            go.set()

    spec = {
        "domain": name,
        "config": {"sync_interval": 2},
        "go": go,
        "commits": 1,
        "rejects": 2,
    }
    th: list[threading.Thread] = []

    def started() -> None:
        t = threading.Thread(target=feeder, daemon=True)
        t.start()
        th.append(t)

    res = launch(rank_main, WORLD, spec, timeout=90, on_started=started)
    for t in th:
        t.join(10)
    assert "error" not in seen, seen.get("error")
    check_consistent(res)
    for r in res:
        s = r["stats"]
        assert (s["plans_rejected"], s["plans_committed"], s["plans_started"]) == (2, 1, 1)
        ev = [(e, p) for e, p, _ in s["history"]]
        assert ev == [("reject", 1), ("reject", 2), ("start", 3), ("commit", 3)]
    assert seen["s1"].state == PLAN_REJECTED and seen["s1"].error == C.ERR_UNREADABLE
    assert seen["s2"].state == PLAN_REJECTED and seen["s2"].error == C.ERR_INVALID
    assert seen["s3"].state == PLAN_COMMITTED
    assert np.array_equal(res[0]["phy2log"], new) and res[0]["epoch"] == 3


def _wait_final(dom: Domain, plan_id: int, timeout: float = 30.0) -> Any:
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        st = dom.read_plan_status()
        if st.plan_id == plan_id and st.state >= PLAN_COMMITTED:
            return st
        time.sleep(0.002)
    raise TimeoutError(f"plan {plan_id} not final")


def test_staging_too_small_aborts_on_every_rank(shm_prefix: str) -> None:
    """max_staged_experts below a layer's need: every rank flags it, all abort, nothing changes."""
    name = shm_prefix + "job.m0"
    driver = PlanDriver(name, G, plans=1, source="random", seed=3)
    spec = {
        "domain": name,
        "config": {"sync_interval": 2, "max_staged_experts": 1},
        "commits": 0,
        "aborts": 1,
    }
    res = run(spec, driver)
    check_consistent(res)
    assert res[0]["stats"]["plans_aborted"] == 1 and res[0]["stats"]["last_error"] == C.ERR_STAGING
    assert np.array_equal(res[0]["phy2log"], default_phy2log(G)) and res[0]["epoch"] == 0


def _stuck_rank_spec(name: str, aborts: int, **extra: Any) -> dict[str, Any]:
    """Rank 2's transfer hangs (until every rank aborts); its peers' p2p waits time out
    after 1 s; no plan commits."""
    return {
        "domain": name,
        "config": {"sync_interval": 2, "p2p_timeout_s": 1.0, "plan_timeout_syncs": 400},
        "commits": 0,
        "aborts": aborts,
        "break_rank": 2,
        **extra,
    }


def test_stuck_rank_times_out_and_all_abort_together(shm_prefix: str) -> None:
    """Rank 2's transfer thread hangs: peers' p2p waits time out, every rank aborts at the
    same sync, committed layers (none here) stay, the placement stays valid."""
    name = shm_prefix + "job.m0"
    driver = PlanDriver(name, G, plans=1, source="random", seed=4)
    res = run(_stuck_rank_spec(name, aborts=1), driver)
    check_consistent(res)
    assert res[0]["stats"]["last_error"] == C.ERR_TRANSFER
    aborts = [[h for h in r["stats"]["history"] if h[0] == "abort"] for r in res]
    assert all(a == aborts[0] for a in aborts) and len(aborts[0]) == 1
    # The partially staged plan never touched weights: still the default placement.
    assert np.array_equal(res[0]["phy2log"], default_phy2log(G))


@pytest.mark.parametrize("by_order", [False, True], ids=["gloo", "by-order"])
def test_after_a_failed_transfer_later_plans_are_refused(shm_prefix: str, by_order: bool) -> None:
    """Rank 2's transfer of the first plan hangs: the peers' p2p waits time out (gloo closes
    those pairs), every rank aborts it (transfer_failed). The second plan is then refused
    on every rank at once (transfer_group_unsafe) instead of failing again after a timeout,
    and the placement in force stays valid. The same on a group that pairs p2p by order."""
    name = shm_prefix + "job.m0"
    driver = PlanDriver(name, G, plans=2, source="random", seed=6)
    res = run(_stuck_rank_spec(name, aborts=2, hang_once=True, p2p_by_order=by_order), driver)
    check_consistent(res)
    aborts = [[h for h in r["stats"]["history"] if h[0] == "abort"] for r in res]
    assert all(a == aborts[0] for a in aborts) and len(aborts[0]) == 2
    assert all(r["stats"]["last_error"] == C.ERR_TRANSFER_UNSAFE for r in res)
    assert all("transfer_failed" in r["transfer_unsafe"] for r in res), res[0]["transfer_unsafe"]
    assert res[0]["stats"]["plans_committed"] == 0
    assert np.array_equal(res[0]["phy2log"], default_phy2log(G))


@pytest.mark.parametrize("by_order", [False, True], ids=["gloo", "by-order"])
def test_abort_requested_mid_transfer(shm_prefix: str, by_order: bool) -> None:
    """Rank 0 asks to abort while a paced plan is in flight: every rank aborts it together.
    With gloo (tags keep an aborted plan's late messages apart) the next plan commits; on a
    group that pairs p2p by order (NCCL/HCCL) messages may be left unmatched, so every rank
    refuses the next plan and keeps the placement in force."""
    name = shm_prefix + "job.m0"
    driver = PlanDriver(name, G, plans=2, source="random", seed=7)
    spec = {
        "domain": name,
        "config": {"sync_interval": 2, "transfer_rounds_per_step": 0.05, "p2p_timeout_s": 20.0},
        "commits": 0 if by_order else 1,
        "aborts": 2 if by_order else 1,
        "abort_in_flight": 0,
        "p2p_by_order": by_order,
        "max_steps": 4000,
    }
    res = run(spec, driver)
    check_consistent(res)
    first = [[h for h in r["stats"]["history"] if h[0] == "abort"][0] for r in res]
    assert all(a == first[0] for a in first)
    if by_order:
        assert all(r["stats"]["last_error"] == C.ERR_TRANSFER_UNSAFE for r in res)
        assert all("abort_requested" in r["transfer_unsafe"] for r in res), res[0]["transfer_unsafe"]
        assert np.array_equal(res[0]["phy2log"], default_phy2log(G))
    else:
        assert res[0]["stats"]["plans_committed"] == 1 and all(r["transfer_unsafe"] == "" for r in res)


def test_log2phy_compact_matches_plan_tables() -> None:
    """The client derives padded log2phy from phy2log; the plan's compact table agrees."""
    from eplbd.planner import build_plan

    rng = np.random.default_rng(0)
    from eplbd.policy import rebalance

    new = rebalance(rng.gamma(0.5, 1.0, (G.num_layers, G.num_experts)), None, G, policy="greedy")
    plan = build_plan(1, 0, default_phy2log(G), new, G)
    assert np.array_equal(plan.log2phy, log2phy_compact(new))


def test_abort_after_partial_commit_keeps_committed_layers(shm_prefix: str) -> None:
    """Rank 1 hangs from the second changed layer on: the first layer commits everywhere,
    then peers time out and all ranks abort. Committed layers stay, the others keep the old
    placement, the epoch is the partial epoch, and weights match the mixed placement."""
    name = shm_prefix + "job.m0"
    driver = PlanDriver(name, G, plans=1, source="random", seed=6)
    spec = {
        "domain": name,
        "config": {
            "sync_interval": 2,
            "p2p_timeout_s": 1.0,
            "max_staged_experts": 6,
            "plan_timeout_syncs": 200,
        },
        "commits": 0,
        "aborts": 1,
        "break_rank": 1,
        "break_from": 1,
    }
    res = run(spec, driver)
    check_consistent(res)
    s = res[0]["stats"]
    # Peers' p2p timeout or, on a fast machine, the plan's sync timeout fires first.
    assert s["plans_aborted"] == 1 and s["layers_committed"] == 1
    assert s["last_error"] in (C.ERR_TRANSFER, C.ERR_TIMEOUT)
    pid = driver.published[0]
    assert res[0]["epoch"] == C.partial_epoch(pid, 1)
    old = default_phy2log(G)
    changed = np.flatnonzero((res[0]["phy2log"] != old).any(axis=1))
    assert len(changed) == 1  # exactly the first changed layer of the plan
    assert driver.statuses and driver.statuses[0].layers_committed == 1


def test_stale_base_epoch_rejected_then_next_plan_applied(shm_prefix: str) -> None:
    name = shm_prefix + "job.m0"

    def stale_first(i: int, plan: Plan) -> Plan:
        if i:
            return plan
        return Plan(
            plan.plan_id, 12345, plan.phy2log, plan.log2phy, plan.replica_count, plan.op_indptr, plan.ops
        )

    driver = PlanDriver(name, G, plans=2, source="random", seed=8, mutate=stale_first)
    spec = {"domain": name, "config": {"sync_interval": 2}, "commits": 1, "rejects": 1}
    res = run(spec, driver)
    check_consistent(res)
    hist = [(e, p) for e, p, _ in res[0]["stats"]["history"]]
    first, second = driver.published
    assert hist == [("reject", first), ("start", second), ("commit", second)]
    assert driver.statuses[0].state == PLAN_REJECTED and driver.statuses[0].error == C.ERR_STALE_BASE


def _create_failure_rank(rank: int, world: int, name: str) -> None:
    model = TinyMoE(G, rank)
    EplbClient(model, G, name)


def test_domain_create_failure_raises_on_every_rank(shm_prefix: str) -> None:
    """The segment exists with a live owner (this process): the leader cannot create it and
    every rank raises instead of hanging."""
    name = shm_prefix + "job.m0"
    squatter = Domain.create(name, G)
    try:
        with pytest.raises(RuntimeError) as ei:
            launch(_create_failure_rank, WORLD, name, timeout=60)
        msg = str(ei.value)
        assert msg.count("RuntimeError: eplbd_client: node leader rank 0 could not create") == WORLD, msg
    finally:
        squatter.unlink()
        squatter.close()


def test_two_node_domains_agree(shm_prefix: str) -> None:
    """Ranks 0-1 on 'node 0', 2-3 on 'node 1' (ranks_per_node=2): two leaders, two domains,
    each with the global windows; the same plan in both is applied everywhere."""
    tmpl = shm_prefix + "job.n{node}"
    driver = PlanDriver(
        tmpl.format(node=0), G, plans=2, source="windows", seed=1, mirrors=[tmpl.format(node=1)]
    )
    spec = {"domain": tmpl, "config": {"sync_interval": 2, "ranks_per_node": 2}, "commits": 2}
    res = run(spec, driver)
    check_consistent(res)
    ep, p2l = res[2]["shm_placement"]
    assert ep == res[0]["epoch"] and np.array_equal(p2l, res[0]["phy2log"])
    assert "shm_placement" not in res[1] and "shm_placement" not in res[3]


def test_two_node_domains_hash_mismatch_rejected(shm_prefix: str) -> None:
    """Node 1's domain gets a different plan under the same id: every rank rejects it."""
    from eplbd.planner import build_plan

    tmpl = shm_prefix + "job.n{node}"

    def other(i: int, plan: Plan) -> Plan:
        if i:
            return plan
        new = plan.phy2log.copy()
        new[0] = np.roll(default_phy2log(G)[0], 6)
        return build_plan(plan.plan_id, plan.base_epoch, default_phy2log(G), new, G)

    driver = PlanDriver(
        tmpl.format(node=0),
        G,
        plans=2,
        source="random",
        seed=2,
        mirrors=[tmpl.format(node=1)],
        mirror_mutate=other,
    )
    spec = {"domain": tmpl, "config": {"sync_interval": 2, "ranks_per_node": 2}, "commits": 1, "rejects": 1}
    res = run(spec, driver)
    check_consistent(res)
    hist = [(e, p) for e, p, _ in res[0]["stats"]["history"]]
    assert hist[0] == ("reject", driver.published[0]) and ("commit", driver.published[1]) in hist
    assert driver.statuses[0].error == C.ERR_HASH_MISMATCH
