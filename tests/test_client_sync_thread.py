"""The sync thread's failure modes, seen from the forward thread (one real gloo rank)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from eplbd.geometry import Geometry
from eplbd_client import ClientConfig, EplbClient
from eplbd_client.testing import TinyMoE, launch

pytestmark = pytest.mark.timeout(60)

G1 = Geometry(2, 8, 1, 8)


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
    errors: list[tuple[int, str, str, float]] = []
    for step in range(40):
        model.forward(step, client.record)
        t0 = time.perf_counter()
        try:
            client.step()
        except RuntimeError as e:
            errors.append((step, str(e), repr(e.__cause__), time.perf_counter() - t0))
            if len(errors) == 2:
                break
    t0 = time.perf_counter()
    client.close()
    return {"errors": errors, "close_s": time.perf_counter() - t0, "waits": client.stats.sync_thread_waits}


def test_sync_thread_error_raises_on_the_forward_thread_every_time(shm_prefix: str) -> None:
    """An exception in the sync thread is raised by the forward thread's next sync step,
    with the original as its cause, and again (at once, no timeout) at every later sync;
    close() still returns promptly."""
    (r,) = launch(_fail_in_sync_thread, 1, shm_prefix + "job.m0", timeout=50)
    errs = r["errors"]
    assert len(errs) == 2, errs
    (s1, msg1, cause1, _), (s2, msg2, cause2, dt2) = errs
    assert "sync thread failed" in msg1 and "injected failure" in cause1 and "ValueError" in cause1
    # The third sync (index 2) failed on the sync thread; the forward sees it at sync 3,
    # step 8 (K = 2, steps counted from 1), and again at the next sync.
    assert (s1, s2) == (7, 9)
    assert msg2 == msg1 and cause2 == cause1
    assert dt2 < 1.0
    assert r["close_s"] < 5.0
