"""Multi-node on one machine: 4 gloo ranks as 2 nodes x 2, one real daemon per "node".

Each node has its own domain (``<prefix>n{node}.job.m0``) and its own daemon
(``shm_prefix = <prefix>n{node}.``), so the two daemons never see each other's
segments, just as on two hosts. The ranks get their node identity the way
torchrun gives it (GROUP_RANK, LOCAL_RANK, LOCAL_WORLD_SIZE), not from config.

- two daemons fed the same windows publish bit-identical plans, also after one is
  kill -9'd and restarted (daemon only, node leaders played by the test);
- three plans applied across both nodes: weights bitwise right, outputs equal the
  unbalanced model's, both nodes' plans identical;
- one daemon restarted between triggers: the next plans still agree and apply;
- one daemon with another policy: plans rejected on all ranks as a mismatch,
  inference keeps stepping, daemon log and `eplbd-ctl status` show it;
- one daemon down: nothing starts anywhere, the other daemon is not blocked
  (it publishes again after each rejection), no rank waits;
- node identity: launcher variables, explicit overrides, contradictions.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from daemon_harness import REPO, DaemonProc, child_env, skewed_loads, wait_for, write_config

from eplbd import ctl
from eplbd.geometry import Geometry
from eplbd.placement import default_phy2log
from eplbd.plan import plan_hash
from eplbd.shm import PLAN_COMMITTED, Domain, PlanStatus
from eplbd_client import ClientConfig, EplbClient
from eplbd_client import control as C
from eplbd_client.client import NodeLayout, NodeLayoutError, launcher_node, node_layout
from eplbd_client.testing import TinyMoE, check_ranks_exact, launch, rank_report

pytestmark = pytest.mark.timeout(120)

G = Geometry(4, 16, 4, 6, num_nodes=2)
WORLD, RPN = 4, 2
K = 2  # sync interval (steps per window)
DAEMON_KEYS: dict[str, Any] = {
    "num_iterations": 16,  # a trigger every 8 windows: plans finish well before the next one
    "history_windows": 4,
    "min_gain": 0.01,
    "poll_interval_s": 0.02,
    "discovery_interval_s": 0.05,
    "heartbeat_interval_s": 0.2,
    "owner_grace_s": 1.0,
}


def node_prefix(prefix: str, node: int) -> str:
    return f"{prefix}n{node}."


def domain_tmpl(prefix: str) -> str:
    return prefix + "n{node}.job.m0"


def start_daemon(tmp: Path, prefix: str, node: int, tag: str = "", **keys: Any) -> DaemonProc:
    """The daemon of ``node``: serves only that node's domains (its own shm prefix)."""
    tag = tag or f"n{node}"
    conf = write_config(
        tmp / f"eplbd-{tag}.toml", shm_prefix=node_prefix(prefix, node), **{**DAEMON_KEYS, **keys}
    )
    return DaemonProc(conf, tmp / f"eplbd-{tag}.log")


def daemon_logs(daemons: dict[int, DaemonProc]) -> str:
    """The tail of each daemon's log, for a failure message."""
    return "\n".join(f"--- daemon of node {n} (pid {d.pid}) ---\n{d.log()[-3000:]}"
                     for n, d in daemons.items())  # fmt: skip


def daemon_serving(name: str, pid: int) -> bool:
    """The daemon ``pid`` has attached ``name`` (its DaemonInfo is there)."""
    try:
        with Domain.attach(name) as dom:
            info = dom.read_daemon_info()
            return info is not None and info.pid == pid
    except Exception:
        return False


# ---------------------------------------------------------------- ranks


def rank_main(rank: int, world: int, spec: dict[str, Any]) -> dict[str, Any]:
    """One rank of the 2x2 job: node identity from torchrun-style variables, TinyMoE + client."""
    os.environ.update(GROUP_RANK=str(rank // RPN), LOCAL_RANK=str(rank % RPN), LOCAL_WORLD_SIZE=str(RPN))
    model = TinyMoE(G, rank, tokens=96, seed=2, skew=3.0, drift_period=48)
    cfg = ClientConfig(sync_interval=K, max_staged_experts=4 * 6, divergence_syncs=spec.get("div", 6))
    client = EplbClient(model, G, spec["domain"], config=cfg)
    layout = client.layout
    go = spec.get("go")
    if go is not None:
        assert go.wait(60), "daemons did not attach"
    want_commits, want_rejects = spec.get("commits", 0), spec.get("rejects", 0)
    hold_at = spec.get("hold_after_commits", -1)
    maxdiff, step, step_s = 0.0, 0, []
    for step in range(spec.get("max_steps", 2000)):  # noqa: B007 - used after the loop
        y = model.forward(step, client.record)
        if step % 4 == 0:
            maxdiff = max(maxdiff, float((y - model.reference_forward(step)).abs().max()))
        t0 = time.perf_counter()
        client.step()
        step_s.append(time.perf_counter() - t0)
        s = client.stats  # replicated: every rank takes the same branch at the same step
        if s.plans_committed == hold_at and client.active_plan < 0 and hold_at >= 0:
            hold_at = -1
            if rank == 0:
                spec["paused"].set()
            assert spec["resume"].wait(60), "test did not resume the ranks"
        if (
            s.plans_committed >= want_commits
            and s.plans_rejected >= want_rejects
            and client.active_plan < 0
            and step >= spec.get("min_steps", 0)
        ):
            break
    out: dict[str, Any] = {
        "layout": tuple(layout),
        "leader": client.is_leader,
        "domain": client.domain_name,
        "steps": step + 1,
        **rank_report(model, client, maxdiff),
        "step_s": np.array(step_s),
    }
    if client.is_leader:
        time.sleep(0.2)  # the publisher thread's last writes (plan status) land
        plan = client._dom_poll.read_plan()
        out["plan"] = None if plan is None else (plan.plan_id, plan_hash(plan))
        out["status"] = tuple(client._dom_poll.read_plan_status())
        pfx = client.domain_name[: client.domain_name.index("job.")]
        out["ctl"] = ctl.collect_status(pfx)
        out["ctl_text"] = ctl.format_status(out["ctl"])
        if spec.get("ctl_cli") and rank == 0:
            cp = subprocess.run(
                [sys.executable, "-m", "eplbd.ctl", "status", "--json", "--prefix", pfx],
                capture_output=True,
                text=True,
                timeout=30,
                env=child_env(),
                cwd=REPO,
            )
            out["ctl_cli"] = (cp.returncode, cp.stdout, cp.stderr)
    client.close()
    return out


def run_job(
    spec: dict[str, Any], daemons: dict[int, DaemonProc], on_paused: Any = None
) -> list[dict[str, Any]]:
    """Launch the 4 ranks; release them once each daemon ({node: proc}) serves its node's domain.

    ``on_paused`` runs in a parent thread while the ranks are held (see ``hold_after_commits``)."""
    ctx = mp.get_context("fork")
    spec = {**spec, "go": ctx.Event(), "paused": ctx.Event(), "resume": ctx.Event()}
    tmpl = spec["domain"]
    errors: list[BaseException] = []

    def side() -> None:
        try:
            for node, d in daemons.items():
                wait_for(lambda d=d, n=node: daemon_serving(tmpl.format(node=n), d.pid), 60, what="attach")
            spec["go"].set()
            if on_paused is not None:
                assert spec["paused"].wait(90)
                on_paused()
                spec["resume"].set()
        except BaseException as e:
            errors.append(e)
            spec["go"].set()
            spec["resume"].set()

    res = launch(rank_main, WORLD, spec, timeout=110, on_started=side)
    assert not errors, f"{errors}\n" + daemon_logs(daemons)
    return res


def check_same_everywhere(res: list[dict[str, Any]]) -> None:
    """Every rank: bitwise weights, consistent tables, equal placement/epoch/history, exact outputs."""
    check_ranks_exact(res)
    # Node identity came from the launcher's variables: nodes 0, 0, 1, 1; leaders ranks 0 and 2.
    want = [node_layout(r, WORLD, [0, 0, 1, 1], source="GROUP_RANK") for r in range(WORLD)]
    assert [r["layout"] for r in res] == [tuple(w) for w in want]
    assert [r["leader"] for r in res] == [True, False, True, False]


def history(res: list[dict[str, Any]], event: str) -> list[int]:
    return [p for e, p, _ in res[0]["stats"]["history"] if e == event]


# ---------------------------------------------------------------- daemons alone


def test_two_daemons_same_windows_identical_plans_across_restart(shm_prefix: str, tmp_path: Path) -> None:
    """The test plays both node leaders: the same windows into both nodes' domains, the
    plan committed in both; daemon 1 is kill -9'd and restarted after the first plan."""
    names = [domain_tmpl(shm_prefix).format(node=n) for n in range(2)]
    doms = [Domain.create(n, G, ring_capacity=32) for n in names]
    daemons = [start_daemon(tmp_path, shm_prefix, n, num_iterations=40) for n in range(2)]  # n = 4
    rng = np.random.default_rng(5)
    wid, plans, restarted = 0, [], False
    try:
        for d, name in zip(daemons, names, strict=True):
            wait_for(lambda d=d, name=name: daemon_serving(name, d.pid), 30, what="attach")
        while len(plans) < 4 and wid < 80:
            loads = skewed_loads(rng, G.num_layers, G.num_experts)
            for dom in doms:
                ep, _ = dom.read_placement()
                dom.write_window(wid, loads, epoch=ep, step_begin=wid * 10, step_end=wid * 10 + 10)
                dom.ring_doorbell()
            if wid % 4 == 3:  # a trigger: both daemons decide it before the next window
                for dom in doms:
                    wait_for(lambda dom=dom, w=wid: (i := dom.read_daemon_info()) and i.last_window >= w, 20)
                got = [dom.latest_plan_id() for dom in doms]
                assert got[0] == got[1], (got, [d.lines("decision") for d in daemons])
                if got[0] == wid:
                    a, b = (dom.read_plan() for dom in doms)
                    assert a is not None and b is not None
                    assert plan_hash(a) == plan_hash(b) and np.array_equal(a.ops, b.ops)
                    assert np.array_equal(a.phy2log, b.phy2log)
                    plans.append(wid)
                    for dom in doms:  # the ranks commit it on both nodes
                        dom.write_placement(wid, a.phy2log)
                        dom.write_plan_status(PlanStatus(wid, PLAN_COMMITTED, G.num_layers, 0, 1))
                    if not restarted:
                        daemons[1].kill9()
                        daemons[1] = start_daemon(
                            tmp_path, shm_prefix, 1, tag="n1-restarted", num_iterations=40
                        )
                        try:
                            wait_for(lambda: daemon_serving(names[1], daemons[1].pid), 30, what="re-attach")
                        except AssertionError as e:
                            raise AssertionError(f"{e}\n{daemon_logs({1: daemons[1]})}") from None
                        restarted = True
            wid += 1
    finally:
        for d in daemons:
            d.stop()
        for dom in doms:
            dom.unlink()
            dom.close()
    assert len(plans) >= 3, (plans, daemons[0].lines("decision"))
    published = [ln for ln in daemons[1].lines("decision=publish")]
    assert len(published) >= 2, daemons[1].log()  # the restarted daemon made (agreeing) plans


# ---------------------------------------------------------------- the 2x2 job


def test_three_plans_applied_on_both_nodes(shm_prefix: str, tmp_path: Path) -> None:
    daemons = [start_daemon(tmp_path, shm_prefix, n) for n in range(2)]
    try:
        res = run_job({"domain": domain_tmpl(shm_prefix), "commits": 3}, dict(enumerate(daemons)))
    finally:
        for d in daemons:
            d.stop()
    check_same_everywhere(res)
    s = res[0]["stats"]
    assert s["plans_committed"] >= 3 and s["plans_rejected"] == 0, (s, daemons[0].log(), daemons[1].log())
    assert res[0]["epoch"] == history(res, "commit")[-1]
    # Both nodes hold the same last plan, bit for bit, each published by its own daemon.
    assert res[0]["plan"] == res[2]["plan"] and res[0]["plan"][0] == res[0]["epoch"]
    for n in (0, 2):
        assert res[n]["domain"] == domain_tmpl(shm_prefix).format(node=n // 2)
    ids = [{int(ln.split("plan=")[1].split()[0]) for ln in d.lines("decision=publish")} for d in daemons]
    # Up to the last commit both daemons published the same plans. A window that came
    # after it may be decided by one daemon and not the other before the job shuts down
    # (seen under load: {7, 15, 23, 31} against {7, 15, 23}).
    last = history(res, "commit")[-1]
    assert {i for i in ids[0] if i <= last} == {i for i in ids[1] if i <= last}, ids
    assert set(history(res, "commit")) <= ids[0] & ids[1]


def test_daemon_restarted_between_triggers_next_plans_agree(shm_prefix: str, tmp_path: Path) -> None:
    daemons = [start_daemon(tmp_path, shm_prefix, n) for n in range(2)]
    box: dict[str, Any] = {}

    def restart() -> None:
        """Ranks are held right after the first commit: kill -9 node 1's daemon, start a new one."""
        old = daemons[1]
        old.kill9()
        with Domain.attach(domain_tmpl(shm_prefix).format(node=1)) as dom:
            box["last_old_plan"] = dom.latest_plan_id()  # may be past the commit we held at
        daemons[1] = start_daemon(tmp_path, shm_prefix, 1, tag="n1-restarted")
        try:
            wait_for(
                lambda: daemon_serving(domain_tmpl(shm_prefix).format(node=1), daemons[1].pid),
                30,
                what="re-attach",
            )
        except AssertionError as e:
            raise AssertionError(f"{e}\n{daemon_logs({1: daemons[1]})}") from None
        box["killed"] = old

    try:
        res = run_job(
            {"domain": domain_tmpl(shm_prefix), "commits": 4, "hold_after_commits": 1},
            dict(enumerate(daemons)),
            restart,
        )
    finally:
        for d in daemons:
            d.stop()
    check_same_everywhere(res)
    s = res[0]["stats"]
    assert s["plans_committed"] >= 4 and s["plans_rejected"] == 0, (s, daemons[1].log())
    # Plans newer than anything the killed daemon published came from the restarted one,
    # with its memory lost, and agreed bit for bit with node 0's (else they would not start).
    after = [p for p in history(res, "commit") if p > box["last_old_plan"]]
    new_ids = {int(ln.split("plan=")[1].split()[0]) for ln in daemons[1].lines("decision=publish")}
    assert len(after) >= 2 and set(after) <= new_ids, (after, new_ids, box)
    assert res[0]["plan"] == res[2]["plan"]


def test_daemons_with_different_policy_plans_rejected_everywhere(shm_prefix: str, tmp_path: Path) -> None:
    daemons = [start_daemon(tmp_path, shm_prefix, 0), start_daemon(tmp_path, shm_prefix, 1, policy="greedy")]
    try:
        res = run_job(
            {"domain": domain_tmpl(shm_prefix), "rejects": 2, "min_steps": 40, "ctl_cli": True},
            dict(enumerate(daemons)),
        )
        logs = [d.log() for d in daemons]
    finally:
        for d in daemons:
            d.stop()
    check_same_everywhere(res)  # nothing moved: default placement, exact outputs
    s = res[0]["stats"]
    assert (
        s["plans_started"] == 0 and s["plans_rejected"] >= 2 and s["plans_mismatched"] == s["plans_rejected"]
    )
    assert s["last_error"] in C.MISMATCH_ERRORS
    assert np.array_equal(res[0]["phy2log"], default_phy2log(G)) and res[0]["epoch"] == 0
    assert res[0]["steps"] >= 40
    print(res[0]["ctl_text"], res[2]["ctl_text"], sep="\n")
    for r in (0, 2):  # each node's status shows the mismatch
        mm = res[r]["ctl"]["domains"][0]["mismatch"]
        assert mm is not None and mm["plan_id"] == s["last_error_plan"], res[r]["ctl"]
        assert "MISMATCH    plan #" in res[r]["ctl_text"], res[r]["ctl_text"]
    rc, out, err = res[0]["ctl_cli"]
    assert rc == 0, err
    assert json.loads(out)["domains"][0]["mismatch"]["error"] in ("hash_mismatch", "diverged")
    for log in logs:
        assert "plan mismatch between nodes" in log, log


def test_one_daemon_down_nothing_starts_and_no_rank_waits(shm_prefix: str, tmp_path: Path) -> None:
    daemons = [start_daemon(tmp_path, shm_prefix, 0)]  # node 1 has no daemon at all
    try:
        res = run_job({"domain": domain_tmpl(shm_prefix), "rejects": 2, "min_steps": 40}, {0: daemons[0]})
        log = daemons[0].log()
    finally:
        daemons[0].stop()
    check_same_everywhere(res)
    s = res[0]["stats"]
    assert s["plans_started"] == 0 and s["plans_rejected"] >= 2, s
    assert s["last_error"] == C.ERR_DIVERGED
    # Node 0's daemon was not blocked by its unstarted plan: it published again after the rejection.
    published = [ln for ln in log.splitlines() if "decision=publish" in ln]
    assert len(published) >= 2 and log.count("plan mismatch between nodes") >= 2, log
    for r in res:
        st = r["step_s"]
        print(f"rank step(): p50 {np.median(st) * 1e3:.3f} ms, max {st.max() * 1e3:.1f} ms")
        assert st.max() < 1.0 and np.median(st) < 0.01  # a wait would be seconds (gather/p2p timeouts)
    mm0 = res[0]["ctl"]["domains"][0]["mismatch"]
    mm1 = res[2]["ctl"]["domains"][0]["mismatch"]
    assert mm0["error"] == mm1["error"] == "diverged"
    # Node 0's daemon may already have published its next plan (then it is unknown here).
    assert mm0["published_here"] in (True, None) and mm1["published_here"] is False
    assert "this node's daemon did not publish it" in res[2]["ctl_text"]


# ---------------------------------------------------------------- node identity


def test_launcher_node_from_torchrun_variables() -> None:
    assert launcher_node({"GROUP_RANK": "3", "LOCAL_RANK": "1"}, 13) == (3, "GROUP_RANK", "")
    assert launcher_node({"NODE_RANK": "2"}, 9) == (2, "NODE_RANK", "")
    assert launcher_node({"LOCAL_WORLD_SIZE": "8", "LOCAL_RANK": "5"}, 21) == (2, "LOCAL_WORLD_SIZE", "")
    assert launcher_node({}, 5) == (None, "", "")
    lb, _, why = launcher_node({"LOCAL_WORLD_SIZE": "8", "LOCAL_RANK": "0"}, 21)
    assert lb is None and "not numbered node-major" in why
    assert "cannot parse" in launcher_node({"GROUP_RANK": "x"}, 0)[2]
    # Variables of another launch (RANK / WORLD_SIZE not this process's) are ignored.
    assert launcher_node({"GROUP_RANK": "1", "RANK": "3"}, 5) == (None, "", "")
    assert launcher_node({"GROUP_RANK": "1", "RANK": "5", "WORLD_SIZE": "8"}, 5, 16) == (None, "", "")
    assert launcher_node({"GROUP_RANK": "1", "RANK": "5", "WORLD_SIZE": "16"}, 5, 16)[0] == 1


def test_node_layout_precedence_and_validation() -> None:
    # Labels from the launcher: any ids, node-major.
    assert node_layout(5, 8, [7, 7, 7, 7, 9, 9, 9, 9], source="GROUP_RANK") == NodeLayout(
        1, 2, 4, 4, "GROUP_RANK"
    )
    # Explicit ranks_per_node wins over labels; geometry is the fallback.
    assert node_layout(3, 8, [0] * 8, ranks_per_node=2).node == 1
    assert node_layout(3, 8, geometry_nodes=4) == NodeLayout(1, 4, 2, 2, "geometry")
    assert node_layout(3, 8) == NodeLayout(0, 1, 8, 0, "geometry")
    with pytest.raises(NodeLayoutError, match="not numbered node-major"):
        node_layout(0, 4, [0, 1, 0, 1], source="GROUP_RANK")
    with pytest.raises(NodeLayoutError, match="not numbered node-major"):
        node_layout(0, 6, [0, 0, 0, 0, 1, 1])  # unequal nodes
    with pytest.raises(NodeLayoutError, match="some EP ranks only"):
        node_layout(0, 4, [0, 0, None, 1], source="GROUP_RANK")
    with pytest.raises(NodeLayoutError, match="geometry says 4 nodes"):
        node_layout(0, 8, [0] * 4 + [1] * 4, source="GROUP_RANK", geometry_nodes=4)
    with pytest.raises(NodeLayoutError, match="do not split"):
        node_layout(0, 6, ranks_per_node=4)


def _layout_rank(rank: int, world: int, env: dict[str, str], cfg: dict[str, Any], name: str) -> Any:
    """Set this rank's launcher/eplbd variables (``{node}``: node-major, ``{alt}``: interleaved)."""
    os.environ.update({k: v.format(node=rank // RPN, alt=rank % RPN) for k, v in env.items()})
    model = TinyMoE(G, rank, tokens=8, seed=0)
    client = EplbClient(model, G, name, config=ClientConfig.from_env(sync_interval=2, **cfg))
    out = (tuple(client.layout), client.domain_name, client.is_leader)
    import torch.distributed as dist

    dist.barrier()  # every rank attached before a leader's close unlinks its domain
    client.close()
    return out


def test_node_identity_in_clients_overrides_and_contradictions(shm_prefix: str) -> None:
    tmpl = shm_prefix + "k{node}.m"
    want_names = [tmpl.format(node=n) for n in (0, 0, 1, 1)]
    bad = {"GROUP_RANK": "{alt}", "LOCAL_WORLD_SIZE": "2"}  # interleaved: contradicts node-major
    # Explicit settings override the launcher: ranks_per_node in the config, or each
    # rank's node id from EPLBD_CLIENT_NODE_ID.
    for env, cfg, src in (
        (bad, {"ranks_per_node": 2}, "config ranks_per_node"),
        ({**bad, "EPLBD_CLIENT_NODE_ID": "{node}"}, {}, "config node_id"),
    ):
        res = launch(_layout_rank, WORLD, env, cfg, tmpl, timeout=60)
        assert [r[1] for r in res] == want_names and [r[2] for r in res] == [True, False, True, False]
        assert {r[0][4] for r in res} == {src}
    # The launcher's layout alone contradicts node-major numbering: one clear error on every rank.
    with pytest.raises(RuntimeError) as ei:
        launch(_layout_rank, WORLD, bad, {}, tmpl, timeout=60)
    assert str(ei.value).count("NodeLayoutError: EP ranks are not numbered node-major") == WORLD, ei.value


def test_error_names_agree_between_client_and_ctl() -> None:
    codes = [v for k, v in vars(C).items() if k.startswith("ERR_")]
    assert {c: C.error_name(c) for c in codes} == {c: ctl.plan_error_name(c) for c in codes}
    assert set(C.MISMATCH_ERRORS) == set(ctl.MISMATCH_ERRORS)


def test_divergence_rejected_after_configured_syncs() -> None:
    w = np.zeros((4, C.NUM_WORDS), dtype=np.int64)
    w[:, C.W_ACTIVE] = -1
    w[:, C.W_CAND_ID], w[:, C.W_CAND_HASH], w[:, C.W_CAND_BASE] = -1, 0, -1
    w[:, C.W_CAND_STATUS] = C.CAND_PENDING
    w[:2, C.W_CAND_ID], w[:2, C.W_CAND_HASH], w[:2, C.W_CAND_BASE] = 8, 99, 0
    w[:2, C.W_CAND_STATUS] = C.CAND_OK  # node 0 has plan 8, node 1 has nothing
    st = C.Agreed(epoch=0)
    kinds = []
    for n in range(6):
        st.sync = n
        d = C.decide(w, st, 64, divergence_syncs=3)
        kinds.append(d.kind)
        if d.kind == C.REJECT:
            assert d == C.Decision(C.REJECT, 8, error=C.ERR_DIVERGED)
            st.last_decided_id = d.plan_id
        C.track_divergence(w, st)
    assert kinds == [C.NONE, C.NONE, C.NONE, C.REJECT, C.NONE, C.NONE]
    assert st.diverging_since == -1
    # 0 = never; agreeing ids reset the count.
    st = C.Agreed(epoch=0, sync=100, diverging_since=0)
    assert C.decide(w, st, 64, divergence_syncs=0).kind == C.NONE
    w[2:] = w[:2]
    C.track_divergence(w, st)
    assert st.diverging_since == -1
