"""kill -9 the daemon at 20 instants while it plans and publishes; a concurrent reader
never accepts a half-written plan, and the restarted daemon resumes and publishes the next one.

DeepSeek-V3 shape (58 layers x 288 slots), so each decision and each publish takes
measurable time. 12 kills land at random instants after the daemon attached
(mostly inside forecast/policy/planner, which dominate its time); 8 are aimed at
``publish_plan`` itself: the test spins on the sequence words of both plan slots
and sends SIGKILL the moment one turns odd (a write in progress), then counts the
kills that really left a slot half-written.
"""

from __future__ import annotations

import json
import mmap
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from daemon_harness import (
    SHM,
    DaemonProc,
    Leader,
    child_env,
    cleanup_prefix,
    leader,
    skewed_loads,
    unique_prefix,
    wait_for,
    write_config,
)

from eplbd.geometry import Geometry

pytestmark = pytest.mark.timeout(300)

READER = r"""
import json, os, sys, time
from eplbd.shm import Domain, TornReadError
from eplbd.plan import plan_hash
from eplbd.planner import validate_plan
from eplbd.placement import default_phy2log
name, stop = sys.argv[1], sys.argv[2]
d = Domain.attach(name, writable=False)
g = d.geometry
old = default_phy2log(g)  # the leader aborts every plan, so this stays in force
reads = torn = 0
hashes = {}
bad = []
last_latest = -1
while not os.path.exists(stop):
    try:
        latest = d.latest_plan_id()
        if latest < last_latest:
            bad.append(f"latest_plan_id went back {last_latest} -> {latest}")
        last_latest = latest
        p = d.read_plan()
        if p is None:
            continue
        reads += 1
        if p.plan_id > d.latest_plan_id():
            bad.append(f"current plan {p.plan_id} is newer than latest_plan_id")
        h = plan_hash(p)
        if p.plan_id not in hashes:
            # A half-written plan cannot transform old into its new placement.
            validate_plan(p, old, g)
            hashes[p.plan_id] = h
        elif hashes[p.plan_id] != h:
            bad.append(f"plan {p.plan_id} read with two different contents")
    except TornReadError:
        torn += 1  # rejected and retried: never acted on
    except Exception as e:
        bad.append(f"{type(e).__name__}: {e}")
        if len(bad) > 20:
            break
print(json.dumps({"reads": reads, "torn": torn, "plans": sorted(hashes), "bad": bad}))
"""


@pytest.fixture
def prefix() -> Iterator[str]:
    p = unique_prefix("k")
    yield p
    cleanup_prefix(p)


class AckingLeader(threading.Thread):
    """Writes a window every ``period`` s and aborts each new plan so the next may come."""

    def __init__(self, ld: Leader, period: float = 0.04) -> None:
        super().__init__(daemon=True)
        self.ld, self.period = ld, period
        self.stop = threading.Event()
        self.rng = np.random.default_rng(1)

    def run(self) -> None:
        from eplbd.shm import PLAN_ABORTED, PlanStatus

        g = self.ld.g
        acked = -1
        while not self.stop.is_set():
            self.ld.write(skewed_loads(self.rng, g.num_layers, g.num_experts))
            pid = self.ld.dom.latest_plan_id()
            if pid > acked:
                self.ld.dom.write_plan_status(PlanStatus(pid, PLAN_ABORTED, 0, 1, time.time_ns()))
                acked = pid
            self.stop.wait(self.period)


def _plan_slot_seqs(name: str, g: Geometry) -> tuple[mmap.mmap, list[int]]:
    from eplbd.shm.layout import compute_layout

    lo = compute_layout(g, 64)
    f = open(SHM / name, "rb")  # noqa: SIM115 - the mapping outlives the file object
    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    f.close()
    return mm, [lo.plan_slot0_off, lo.plan_slot1_off]


def _seqs(mm: mmap.mmap, offs: list[int]) -> list[int]:
    """The seqlock words of both plan slots (odd = a write in progress or torn by a kill)."""
    return [int.from_bytes(mm[o : o + 8], "little") for o in offs]


def test_kill9_never_exposes_half_plan_and_restart_resumes(tmp_path: Path, prefix: str) -> None:
    g = Geometry.deepseek_v3()
    name = prefix + "ds"
    conf = write_config(
        tmp_path / "c.toml",
        shm_prefix=prefix,
        num_iterations=10,  # every window triggers (K = 10)
        min_gain=0.0,
        poll_interval_s=0.02,
        discovery_interval_s=0.05,
        heartbeat_interval_s=0.2,
    )
    stop_file = tmp_path / "stop"
    ld = Leader(name, g)
    writer = AckingLeader(ld)
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, name, str(stop_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    mm, seq_offs = _plan_slot_seqs(name, g)
    rng = random.Random(4)
    kills = mid_publish = 0
    try:
        writer.start()
        t_start = time.monotonic()
        for i in range(20):
            d = DaemonProc(conf, tmp_path / f"d{i}.log")
            wait_for(lambda d=d: d.lines("serving domain"), timeout=30, what="attach")
            t_attach = time.monotonic()
            if i < 12:
                time.sleep(rng.uniform(0.0, 0.6))
                d.kill9()
            else:
                # Kill as soon as a plan slot's seq turns odd at a new value: this daemon has
                # started a publish (a slot left odd by the previous kill keeps its old value).
                start = _seqs(mm, seq_offs)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    now = _seqs(mm, seq_offs)
                    if any(v & 1 and v != s0 for v, s0 in zip(now, start, strict=True)):
                        break
                os.kill(d.pid, signal.SIGKILL)
                d.kill9()
                after = _seqs(mm, seq_offs)
                mid_publish += any(v & 1 and v != s0 for v, s0 in zip(after, start, strict=True))
            kills += 1
            now = time.monotonic()
            print(
                f"kill {i} at {now - t_start:.2f}s (attached {now - t_attach:.2f}s before) "
                f"mid_publish={mid_publish}",
                file=sys.stderr,
            )
        before = ld.dom.latest_plan_id()
        d = DaemonProc(conf, tmp_path / "final.log")
        wait_for(lambda: ld.dom.latest_plan_id() > before, timeout=30, what="next plan after restart")
        assert d.stop() == 0
        assert d.lines("decision=publish")
    finally:
        writer.stop.set()
        writer.join(5)
        stop_file.touch()
        out, err = reader.communicate(timeout=60)
        mm.close()
        ld.close()
    assert kills == 20
    res = json.loads(out.strip().splitlines()[-1]) if out.strip() else {"bad": [err[-2000:]]}
    assert res["bad"] == [], res["bad"]
    assert res["reads"] > 20 and len(res["plans"]) >= 3, res
    # At least one SIGKILL really landed inside publish_plan and left a slot half-written;
    # the reader above never accepted it.
    assert mid_publish >= 1, f"no kill landed mid-publish ({mid_publish}/8)"


def _info_pid(dom: Any) -> int | None:
    """The pid in the domain's daemon info; None while there is none or it cannot be read."""
    from eplbd.shm import TornReadError

    try:
        info = dom.read_daemon_info()
    except TornReadError:
        return None
    return None if info is None else info.pid


def test_restart_after_kill_mid_daemon_info_write(tmp_path: Path, prefix: str) -> None:
    """A daemon killed inside its heartbeat write leaves the daemon-info seqlock odd. The next
    daemon (the only possible writer: it holds the segment lock) must take over, not give up."""
    from eplbd.shm.layout import compute_layout

    g = Geometry(2, 8, 4, 3)
    name = prefix + "info"
    conf = write_config(tmp_path / "c.toml", shm_prefix=prefix, num_iterations=10, poll_interval_s=0.02,
                        discovery_interval_s=0.05, heartbeat_interval_s=0.2)  # fmt: skip
    with leader(name, g) as ld:
        first = DaemonProc(conf, tmp_path / "d0.log")
        wait_for(lambda: _info_pid(ld.dom) == first.pid, 30, what="first daemon attached")
        first.kill9()
        # What a SIGKILL between "seq odd" and "seq even" leaves: an odd sequence number.
        off = compute_layout(g, 64).daemon_info_off
        with open(SHM / name, "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
            mm[off : off + 8] = (int.from_bytes(mm[off : off + 8], "little") | 1).to_bytes(8, "little")
        assert _info_pid(ld.dom) is None  # readers now reject the region
        second = DaemonProc(conf, tmp_path / "d1.log")
        try:
            wait_for(lambda: _info_pid(ld.dom) == second.pid, 15, what="the restarted daemon serving")
            wid = max(ld.write() for _ in range(3))
            wait_for(lambda: ld.dom.read_daemon_info().last_window >= wid, 15, what="a decision")
            assert not second.lines("cannot resume"), second.log()
            assert second.lines("daemon info left mid-write by a previous daemon"), second.log()
        finally:
            assert second.stop() == 0, second.log()
