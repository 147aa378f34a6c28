"""Transfer pacing (``ClientConfig.transfer_rounds_per_step``): 4 gloo ranks, plans from a test thread.

A paced rebalance must still be applied bitwise-exactly on every rank, its
staging must really be spread over forward steps (each pace unit at least
``1 / rate`` steps after the previous one, on every rank), and pacing must never
make a plan time out: the rate is raised per plan to fit ``plan_timeout_syncs``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from eplbd.geometry import Geometry
from eplbd.placement import default_phy2log
from eplbd.shm import PLAN_COMMITTED
from eplbd_client import ClientConfig, EplbClient
from eplbd_client.testing import PlanDriver, TinyMoE, check_ranks_exact, launch_with_driver, rank_report
from eplbd_client.transfer import pace_rate

pytestmark = pytest.mark.timeout(120)

G = Geometry(4, 16, 4, 6)
WORLD = 4


def rank_main(rank: int, world: int, spec: dict[str, Any]) -> dict[str, Any]:
    """One rank: tiny model + client until ``commits`` plans committed (replicated stop)."""
    import eplbd_client.transfer as T

    runs: list[dict[str, Any]] = []
    orig_run = T.PlanTransfer.run

    def run_and_record(self: Any) -> None:  # worker thread: what the pacing did, per plan
        orig_run(self)
        runs.append(
            {
                "plan": int(self.plan.plan_id),
                "pace": self.pace,
                "start_step": self.start_step,
                "unit_steps": list(self.unit_steps),
                "units": int(self.pace_units.sum()),
                "error": self.error,
            }
        )

    T.PlanTransfer.run = run_and_record  # type: ignore[method-assign]
    model = TinyMoE(G, rank, tokens=32, seed=1)
    client = EplbClient(model, G, spec["domain"], config=ClientConfig(**spec["config"]))
    maxdiff = 0.0
    for step in range(spec.get("max_steps", 3000)):
        y = model.forward(step, client.record)
        if step % 7 == 0:
            maxdiff = max(maxdiff, float((y - model.reference_forward(step)).abs().max()))
        client.step()
        if (
            client.stats.plans_committed + client.stats.plans_aborted >= spec["commits"]
            and client.active_plan < 0
        ):
            break
    time.sleep(0.05)  # the last run record is appended by the worker right after staging
    out = {"runs": runs, **rank_report(model, client, maxdiff)}
    client.close()
    return out


def run(spec: dict[str, Any], driver: PlanDriver) -> list[dict[str, Any]]:
    return launch_with_driver(rank_main, WORLD, spec, driver=driver, timeout=100.0)


def test_pace_rate_is_raised_to_fit_the_timeout() -> None:
    units = np.array([3, 5, 1], dtype=np.int64)
    assert pace_rate(units, 0.0, 100) == 0.0  # unpaced
    assert pace_rate(units, 0.5, 100) == 0.5  # 4 steps between the 5 units of the longest layer: fits
    assert pace_rate(units, 0.01, 8) == pytest.approx(0.5)  # (5 - 1) units in 8 steps
    assert pace_rate(units, 0.01, 0) == 0.0  # no budget at all: pacing off rather than a timeout
    assert pace_rate(np.zeros(0, np.int64), 1.0, 10) == 0.0  # nothing to move


def test_paced_plans_spread_over_steps_and_stay_exact(shm_prefix: str) -> None:
    rate, K = 0.25, 2
    name = shm_prefix + "job.m0"
    driver = PlanDriver(name, G, plans=2, source="random", gap_windows=2, seed=11)
    cfg = {
        "sync_interval": K,
        "max_staged_experts": G.num_layers * G.slots_per_rank,  # whole plan: unpaced, it would burst
        "transfer_rounds_per_step": rate,
    }
    res = run({"domain": name, "config": cfg, "commits": 2}, driver)
    check_ranks_exact(res)
    assert res[0]["stats"]["plans_committed"] == 2 and res[0]["stats"]["plans_aborted"] == 0
    assert [s.state for s in driver.statuses] == [PLAN_COMMITTED] * 2
    assert not np.array_equal(res[0]["phy2log"], default_phy2log(G))
    gap = int(np.ceil(1 / rate))
    for r in res:
        assert [x["plan"] for x in r["runs"]] == driver.published
        for x in r["runs"]:
            assert x["error"] == 0 and x["pace"] == rate
            steps = np.array(x["unit_steps"])
            assert len(steps) == x["units"] >= 4, x  # every unit of the plan went through the pace
            assert steps[0] >= x["start_step"]
            assert (np.diff(steps) >= gap).all(), steps  # never two units within 1/rate steps
            assert steps[-1] - x["start_step"] >= (x["units"] - 1) * gap
        # Same schedule on every rank: the plan starts at the same step everywhere.
        assert [x["start_step"] for x in r["runs"]] == [x["start_step"] for x in res[0]["runs"]]
    # Visible in the agreed history too: start -> commit spans the paced steps.
    hist = res[0]["stats"]["history"]
    for x in res[0]["runs"]:
        s0 = next(s for e, p, s in hist if e == "start" and p == x["plan"])
        s1 = next(s for e, p, s in hist if e == "commit" and p == x["plan"])
        assert (s1 - s0) * K >= (x["units"] - 1) * gap


def test_unpaced_plan_does_not_wait(shm_prefix: str) -> None:
    """Control for the test above: with the default (0) nothing is paced."""
    name = shm_prefix + "job.m0"
    driver = PlanDriver(name, G, plans=1, source="random", gap_windows=2, seed=11)
    cfg = {"sync_interval": 2, "max_staged_experts": G.num_layers * G.slots_per_rank}
    res = run({"domain": name, "config": cfg, "commits": 1}, driver)
    check_ranks_exact(res)
    for r in res:
        assert len(r["runs"]) == 1 and r["runs"][0]["pace"] == 0.0 and r["runs"][0]["unit_steps"] == []


def test_slow_pace_is_raised_so_the_plan_does_not_time_out(shm_prefix: str) -> None:
    """1 round per 100 steps would stall each layer past plan_timeout_syncs (6 syncs = 12 steps);
    the rate is raised for the plan instead, so it commits and nothing aborts."""
    name = shm_prefix + "job.m0"
    driver = PlanDriver(name, G, plans=1, source="random", gap_windows=2, seed=3)
    cfg = {
        "sync_interval": 2,
        "max_staged_experts": G.num_layers * G.slots_per_rank,
        "transfer_rounds_per_step": 0.01,
        "plan_timeout_syncs": 6,
    }
    res = run({"domain": name, "config": cfg, "commits": 1}, driver)
    check_ranks_exact(res)
    assert res[0]["stats"]["plans_committed"] == 1 and res[0]["stats"]["plans_aborted"] == 0
    for r in res:
        (x,) = r["runs"]
        assert x["pace"] > 0.01  # raised: still paced, but within the timeout's budget
        assert len(x["unit_steps"]) == x["units"]


def test_config_rejects_negative_pace() -> None:
    with pytest.raises(ValueError, match="transfer_rounds_per_step"):
        ClientConfig(transfer_rounds_per_step=-1.0)
    with pytest.raises(ValueError, match="transfer_rounds_per_step"):
        ClientConfig(transfer_rounds_per_step=float("nan"))
    assert (
        ClientConfig.from_env({"EPLBD_CLIENT_TRANSFER_ROUNDS_PER_STEP": "0.5"}).transfer_rounds_per_step
        == 0.5
    )
