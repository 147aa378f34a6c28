"""The sync thread's failure modes, seen from the forward thread (one real gloo rank)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from eplbd.geometry import Geometry
from eplbd_client import ClientConfig, EplbClient
from eplbd_client.host import LayerTables
from eplbd_client.testing import NullHost, PlanDriver, TinyMoE, launch, launch_with_driver

pytestmark = pytest.mark.timeout(60)

G1 = Geometry(2, 8, 1, 8)


def _step_until_two_errors(
    model: TinyMoE, client: EplbClient, steps: int, at_step: Any = None
) -> list[tuple[int, str, str, float]]:
    """Forward + step until step() raised twice: (step, message, repr of the cause, seconds
    the raising step() took) of each."""
    errors: list[tuple[int, str, str, float]] = []
    for step in range(steps):
        model.forward(step, client.record)
        if at_step is not None:
            at_step(step)
        t0 = time.perf_counter()
        try:
            client.step()
        except RuntimeError as e:
            errors.append((step, str(e), repr(e.__cause__), time.perf_counter() - t0))
            if len(errors) == 2:
                break
    return errors


def _fail_in_sync_thread(rank: int, world: int, domain: str) -> dict[str, Any]:
    model = TinyMoE(G1, rank, tokens=16, seed=2)
    client = EplbClient(model, G1, domain, config=ClientConfig(sync_interval=2))
    syncs = {"n": 0}
    poll = client._poll

    def broken_poll() -> None:  # runs on the sync thread
        syncs["n"] += 1
        if syncs["n"] == 3:
            raise ValueError("injected failure in the sync thread")
        poll()

    client._poll = broken_poll  # type: ignore[method-assign]
    status: dict[str, Any] = {}

    def at_step(step: int) -> None:
        if step == 5:
            status.update(client.status())

    errors = _step_until_two_errors(model, client, 40, at_step)
    t0 = time.perf_counter()
    client.close()
    close_s = time.perf_counter() - t0
    after = ""
    try:
        for _ in range(2):  # reaches a sync
            client.step()
    except RuntimeError as e:
        after = str(e)
    return {"errors": errors, "close_s": close_s, "status": status, "after_close": after}


def test_sync_thread_error_raises_on_the_forward_thread_every_time(shm_prefix: str) -> None:
    """An exception in the sync thread is raised by the forward thread's next sync step,
    with the original as its cause, and again (at once, no timeout) at every later sync;
    close() still returns promptly."""
    (r,) = launch(_fail_in_sync_thread, 1, shm_prefix + "job.m0", timeout=50)
    errs = r["errors"]
    assert len(errs) == 2, errs
    (s1, msg1, cause1, _), (s2, msg2, cause2, dt2) = errs
    assert "sync thread failed at sync 2: ValueError: injected failure" in msg1
    assert "injected failure" in cause1 and "ValueError" in cause1
    # The third sync (index 2) failed on the sync thread; the forward sees it at sync 3,
    # step 8 (K = 2, steps counted from 1), and again at the next sync.
    assert (s1, s2) == (7, 9)
    assert msg2 == msg1 and cause2 == cause1
    assert dt2 < 1.0
    assert r["close_s"] < 5.0
    assert "step() after close()" in r["after_close"]
    st = r["status"]  # after 2 syncs (steps 2 and 4), the sync thread has worked
    assert st["sync_thread"] is True and st["sync"] == 2 and st["step"] == 5
    assert st["sync_thread_cpu_us_per_sync"] > 0 and st["sync_thread_waits"] >= 0


G4 = Geometry(2, 8, 4, 2)


def _rank_killed(rank: int, world: int, domain: str) -> dict[str, Any]:
    import os
    import signal

    import torch

    client = EplbClient(NullHost(G4), G4, domain, config=ClientConfig(sync_interval=2, gather_timeout_s=5.0))
    counts = torch.ones(G4.num_layers, G4.slots_per_rank, dtype=torch.int64)
    err, t_err, t_kill = "", 0.0, time.monotonic()
    for step in range(4000):
        if rank == 3 and step == 40:
            os.kill(os.getpid(), signal.SIGKILL)
        if step == 40:
            t_kill = time.monotonic()
        client.recorder.record_all(counts)
        try:
            client.step()
        except RuntimeError as e:
            err = f"{e} <- {e.__cause__!r}"
            t_err = time.monotonic() - t_kill
            break
        time.sleep(0.002)
    t0 = time.monotonic()
    client.close()
    return {"err": err, "t_err": t_err, "close_s": time.monotonic() - t0, "steps": step}


def test_a_killed_rank_fails_the_others_steps_promptly(shm_prefix: str) -> None:
    """kill -9 of one rank: the survivors' sync threads see their all-gather fail, and each
    survivor's next sync step raises RuntimeError naming it (not a silent hang of the
    forward thread); close() returns."""
    res = launch(_rank_killed, 4, shm_prefix + "job.m0", timeout=60, may_die=[3])
    assert res[3] is None
    print("survivors: error after the kill (s)", [round(r["t_err"], 3) for r in res[:3]])
    for r in res[:3]:
        assert "sync thread failed at sync" in r["err"] and "RuntimeError" in r["err"], r
        assert r["t_err"] < 15.0, r
        assert r["close_s"] < 15.0, r


class _CommitFails(TinyMoE):
    """A host whose second layer commit raises (after the client copied that layer's weights)."""

    def commit_layer(self, layer: int, tables: LayerTables) -> None:
        if self.commits == 1:
            raise OSError("injected: the platform's table update failed")
        super().commit_layer(layer, tables)


def _failing_commit(rank: int, world: int, spec: dict[str, Any]) -> dict[str, Any]:
    model = _CommitFails(G1, rank, tokens=16, seed=2)
    client = EplbClient(
        model, G1, spec["domain"], config=ClientConfig(sync_interval=2, sync_thread=spec["threaded"])
    )
    errors = _step_until_two_errors(model, client, 400)
    failed = client.status()["failed"]
    t0 = time.perf_counter()
    client.close()
    return {"errors": errors, "close_s": time.perf_counter() - t0, "commits": model.commits, "failed": failed}


@pytest.mark.parametrize("threaded", [True, False], ids=["sync-thread", "inline"])
def test_a_failed_commit_stops_the_client(shm_prefix: str, threaded: bool) -> None:
    """The host's commit_layer raises half-way through a plan: step() raises an error that
    says the layer may be inconsistent, with the host's error as its cause, and every later
    sync raises the same at once (the engine cannot go on serving by mistake); close() is prompt."""
    name = shm_prefix + "job.m0"
    driver = PlanDriver(name, G1, plans=1, source="random", seed=5)
    spec = {"domain": name, "threaded": threaded}
    (r,) = launch_with_driver(_failing_commit, 1, spec, driver=driver, timeout=50)
    errs = r["errors"]
    assert len(errs) == 2, errs
    (s1, msg1, cause1, _), (s2, msg2, cause2, dt2) = errs
    assert "committing plan" in msg1 and "must stop serving" in msg1, msg1
    assert "injected: the platform's table update failed" in cause1 and "OSError" in cause1
    assert s2 == s1 + 2 and msg2 == msg1 and cause2 == cause1 and dt2 < 0.5
    assert r["commits"] == 1 and r["close_s"] < 5.0 and r["failed"] == msg1
