"""The daemon as a real subprocess: plans, gates, reload, faults, signals.

The test process plays the node leader (creates the domain, writes windows,
rings the doorbell); ``python -m eplbd.cli run`` is the daemon; a third
interpreter checks what the daemon published, reading shm only.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from daemon_harness import SHM, DaemonProc, Leader, cleanup_prefix, leader, run_py, wait_for, write_config

from eplbd.daemon import plan_interval_windows, trigger_window
from eplbd.geometry import Geometry

pytestmark = pytest.mark.timeout(60)

SMALL = Geometry(4, 16, 4, 5)  # L=4, E=16, R=4, S=5: P=20, 4 redundant slots
BASE = dict(
    num_iterations=40, min_gain=0.0, poll_interval_s=0.05, heartbeat_interval_s=0.2, discovery_interval_s=0.1
)


@pytest.fixture
def prefix() -> Iterator[str]:
    from daemon_harness import unique_prefix

    p = unique_prefix("d")
    yield p
    cleanup_prefix(p)


def start(tmp_path: Path, prefix: str, **cfg: object) -> DaemonProc:
    conf = write_config(tmp_path / "eplbd.toml", shm_prefix=prefix, **{**BASE, **cfg})
    return DaemonProc(conf, tmp_path / "daemon.log")


def test_trigger_arithmetic() -> None:
    assert plan_interval_windows(40, 10) == 4
    assert plan_interval_windows(45, 10) == 5  # ceil
    assert plan_interval_windows(5, 10) == 1
    assert [trigger_window(w, 4) for w in range(9)] == [-1, -1, -1, 3, 3, 3, 3, 7, 7]
    assert trigger_window(0, 1) == 0


CHECKER = r"""
import json, sys
import numpy as np
from eplbd.shm import Domain
from eplbd.plan import plan_hash
from eplbd.planner import validate_plan
from eplbd.placement import default_phy2log
d = Domain.attach(sys.argv[1] if len(sys.argv) > 1 else {name!r}, writable=False)
p = d.read_plan()
epoch, cur = d.read_placement()
validate_plan(p, cur, d.geometry)
print(json.dumps({{"latest": d.latest_plan_id(), "id": p.plan_id, "base": p.base_epoch,
                  "hash": plan_hash(p), "epoch": epoch, "ops": p.num_ops}}))
"""


def expected_plan_hash(ld: Leader, trig: int, history: int = 16) -> int:
    """What any node's daemon must publish for trigger ``trig`` (default config)."""
    from eplbd.planner import build_plan
    from eplbd.policy import propose

    wins = [ld.dom.read_window(w) for w in range(max(0, trig - history + 1), trig + 1)]
    loads = np.stack([w.loads for w in wins if w is not None])
    epoch, cur = ld.dom.read_placement()
    return build_plan(trig, epoch, cur, propose(loads, cur, ld.g).phy2log, ld.g).hash


def test_publishes_valid_plan_after_threshold(tmp_path: Path, prefix: str) -> None:
    name = prefix + "job.main"
    with leader(name, SMALL) as ld:
        d = start(tmp_path, prefix)
        try:
            wait_for(lambda: d.lines("serving domain"), what="daemon attach")
            for _ in range(3):  # windows 0..2: below the threshold (n = 40 / 10 = 4)
                ld.write()
            time.sleep(0.3)
            assert ld.dom.latest_plan_id() == -1
            ld.write()  # window 3 triggers
            wait_for(lambda: ld.dom.latest_plan_id() == 3, what="plan 3")
            r = run_py(CHECKER.format(name=name))
            assert r.returncode == 0, r.stderr
            got = json.loads(r.stdout)
            assert got["id"] == got["latest"] == 3 and got["base"] == 0 and got["ops"] > 0
            assert got["hash"] == ld.dom.read_plan().hash == expected_plan_hash(ld, 3)
            line = wait_for(lambda: d.lines("decision=publish"), what="log line")[0]
            for key in (
                "domain=" + name,
                "window=3",
                "plan=3",
                "beta_now=",
                "beta_pred=",
                "moves_remote=",
                "compute_ms=",
            ):
                assert key in line, line
            info = wait_for(lambda: ld.dom.read_daemon_info(), what="daemon info")
            assert info.pid == d.pid and info.plans_published == 1 and info.last_window >= 3
            assert info.beta_pred > info.beta_now
            assert info.last_decision.startswith("publish")
        finally:
            assert d.stop() == 0


def test_gain_gate_moves_cap_inflight_and_reload(tmp_path: Path, prefix: str) -> None:
    from eplbd.shm import PLAN_ABORTED, PlanStatus

    name = prefix + "gate"
    conf = tmp_path / "eplbd.toml"
    with leader(name, SMALL) as ld:
        d = start(tmp_path, prefix, min_gain=1.0)  # nothing can gain a full 1.0
        try:
            wait_for(lambda: d.lines("serving domain"), what="attach")
            for _ in range(4):
                ld.write()
            wait_for(lambda: d.lines("reason=gain_below_min"), what="gain gate")
            assert ld.dom.latest_plan_id() == -1

            write_config(conf, shm_prefix=prefix, **{**BASE, "max_moves_per_plan": 1})
            d.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: d.lines("config reloaded"), what="reload")
            for _ in range(4):
                ld.write()
            wait_for(lambda: d.lines("reason=moves_over_max"), what="moves cap")
            assert ld.dom.latest_plan_id() == -1

            conf.write_text("num_iterations = 'oops'\n")  # bad: the running config stays
            d.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: d.lines("reload failed"), what="bad reload")
            assert "'num_iterations'" in d.lines("reload failed")[0]

            write_config(conf, shm_prefix=prefix, **BASE)
            d.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: len(d.lines("config reloaded")) == 2, what="second reload")
            for _ in range(4):
                ld.write()
            wait_for(lambda: ld.dom.latest_plan_id() == 11, what="plan 11")

            # Plan 11 is in flight (nobody started it): the next trigger waits...
            for _ in range(4):
                ld.write()
            wait_for(lambda: d.lines("decision=wait"), what="in-flight wait")
            assert "plan=11" in d.lines("decision=wait")[0]
            assert ld.dom.latest_plan_id() == 11
            # ...until the leader reports it final.
            ld.dom.write_plan_status(PlanStatus(11, PLAN_ABORTED, 0, 1, time.time_ns()))
            for _ in range(4):
                ld.write()
            wait_for(lambda: ld.dom.latest_plan_id() == 19, what="plan 19")
            # Ranks that refuse plans (transfer group unsafe after an aborted transfer): the
            # daemon stops planning for them, and says why.
            ld.dom.write_plan_status(PlanStatus(19, PLAN_ABORTED, 0, 26, time.time_ns()))
            for _ in range(4):
                ld.write()
            wait_for(lambda: d.lines("reason=ranks_refuse_plans"), what="refusal skip")
            assert ld.dom.latest_plan_id() == 19
        finally:
            assert d.stop() == 0


def _create_and_die(name: str, g: Geometry) -> None:
    from eplbd.shm import Domain

    Domain.create(name, g)
    os._exit(0)  # owner gone without unlinking: a crashed job


def test_broken_and_dead_domains_do_not_stop_the_others(tmp_path: Path, prefix: str) -> None:
    good, bad, dead = prefix + "a.good", prefix + "b.badversion", prefix + "c.dead"
    with leader(good, SMALL) as ld, leader(bad, SMALL) as ldb:
        # Unknown layout version: bytes 8..12 of the header (after the magic).
        with open(SHM / bad, "r+b") as f:
            f.seek(8)
            f.write(struct.pack("<I", 999))
        ctx = mp.get_context("fork")
        p = ctx.Process(target=_create_and_die, args=(dead, SMALL))
        p.start()
        p.join(10)
        assert (SHM / dead).exists()
        d = start(tmp_path, prefix, owner_grace_s=0.5)
        try:
            wait_for(lambda: d.lines("domain=" + bad), what="bad domain reported")
            err = d.lines("domain=" + bad)[0]
            assert "error" in err and "LayoutError" in err, err
            wait_for(lambda: not (SHM / dead).exists(), what="dead owner's segment unlinked")
            assert d.lines("domain=" + dead)
            for _ in range(4):
                ld.write()
            wait_for(lambda: ld.dom.latest_plan_id() == 3, what="good domain still served")
            assert d.proc.poll() is None
            assert len(d.lines("cannot serve domain")) == 1  # reported once, not once per discovery
            assert ldb.dom.name == bad
        finally:
            assert d.stop() == 0


def test_notices_new_domain_within_a_second_and_releases_removed(tmp_path: Path, prefix: str) -> None:
    d = start(tmp_path, prefix, discovery_interval_s=0.5)
    try:
        wait_for(lambda: d.lines("started"), what="start")
        time.sleep(0.3)
        name = prefix + "late"
        with leader(name, SMALL) as ld:
            t0 = time.monotonic()
            wait_for(lambda: d.lines("domain=" + name), timeout=5, what="discovery")
            assert time.monotonic() - t0 < 1.0
            for _ in range(4):
                ld.write()
            wait_for(lambda: ld.dom.latest_plan_id() == 3, what="plan")
        wait_for(lambda: d.lines("domain gone"), what="release of a removed domain")
    finally:
        assert d.stop() == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signals_exit_zero_promptly(tmp_path: Path, prefix: str, sig: int) -> None:
    with leader(prefix + "x", SMALL):
        d = start(tmp_path, prefix)
        wait_for(lambda: d.lines("serving domain"), what="attach")
        t0 = time.monotonic()
        assert d.stop(sig) == 0
        assert time.monotonic() - t0 < 3.0
        assert d.lines("stopped")


def test_one_daemon_per_domain_and_takeover(tmp_path: Path, prefix: str) -> None:
    with leader(prefix + "one", SMALL) as ld:
        (tmp_path / "2").mkdir()
        d1, d2 = start(tmp_path, prefix), start(tmp_path / "2", prefix)
        try:
            wait_for(lambda: d1.lines("serving domain") or d2.lines("serving domain"), what="one attaches")
            time.sleep(0.5)
            serving = [d for d in (d1, d2) if d.lines("serving domain")]
            assert len(serving) == 1, (d1.log(), d2.log())
            winner = serving[0]
            other = d2 if winner is d1 else d1
            wait_for(lambda: other.lines("another daemon"), what="second daemon refuses")
            # The kernel drops the winner's lock when it dies: the other one takes over.
            winner.kill9()
            wait_for(lambda: other.lines("serving domain"), what="takeover")
            for _ in range(4):
                ld.write()
            wait_for(lambda: ld.dom.latest_plan_id() == 3, what="plan from the survivor")
            assert ld.dom.read_daemon_info().pid == other.pid
        finally:
            for d in (d1, d2):
                if d.proc.poll() is None:
                    assert d.stop() == 0


def test_restart_resumes_from_shm_without_redeciding(tmp_path: Path, prefix: str) -> None:
    name = prefix + "resume"
    with leader(name, SMALL) as ld:
        d = start(tmp_path, prefix)
        try:
            for _ in range(4):
                ld.write()
            wait_for(lambda: ld.dom.latest_plan_id() == 3, what="plan 3")
            wait_for(lambda: (i := ld.dom.read_daemon_info()) and i.last_window >= 3, what="info")
        finally:
            assert d.stop() == 0
        ld.write()  # window 4, written while no daemon runs
        (tmp_path / "b").mkdir()
        d2 = start(tmp_path / "b", prefix)
        try:
            line = wait_for(lambda: d2.lines("serving domain"), what="re-attach")[0]
            assert "resume_after_window=3" in line, line
            time.sleep(0.3)
            assert not d2.lines("decision="), "window 3 was decided again after the restart"
            for _ in range(3):
                ld.write()  # windows 5..7: 7 triggers
            wait_for(lambda: d2.lines("decision="), what="next decision")
            assert "window=7" in d2.lines("decision=")[0]
            assert "decision=wait" in d2.lines("decision=")[0]  # plan 3 is still in flight
        finally:
            assert d2.stop() == 0


def test_metrics_on_loopback(tmp_path: Path, prefix: str) -> None:
    import socket
    import urllib.request

    with socket.socket() as s:  # a free port (tiny race with other processes; fine for a test)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    name = prefix + "m"
    with leader(name, SMALL) as ld:
        d = start(tmp_path, prefix, metrics_port=port)
        try:
            wait_for(lambda: d.lines("metrics serving"), what="metrics server")
            for _ in range(4):
                ld.write()
            wait_for(lambda: ld.dom.latest_plan_id() == 3, what="plan")

            def scrape() -> str:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()

            text = wait_for(
                lambda: (t := scrape()) and f'eplbd_plans_published_total{{domain="{name}"}} 1.0' in t and t
            )
            assert f'eplbd_windows_total{{domain="{name}"}} 4.0' in text
            assert f'eplbd_decisions_total{{decision="publish",domain="{name}"}} 1.0' in text
            assert f'eplbd_beta_predicted{{domain="{name}"}}' in text
            assert f'eplbd_plan_moves{{domain="{name}",kind="remote"}}' in text
            assert "eplbd_domains 1.0" in text
        finally:
            assert d.stop() == 0


def test_daemon_side_never_imports_torch_or_metrics_when_off() -> None:
    r = run_py(
        "import sys, eplbd.daemon, eplbd.ctl, eplbd.cli\n"
        "print(sorted(m for m in ('torch', 'prometheus_client', 'matplotlib') if m in sys.modules))"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_log_line_format() -> None:
    import io

    from eplbd.daemon import Logger

    buf = io.StringIO()
    Logger("info", buf, journal=True).info(domain="d", window=7, decision="publish", beta_now=0.61234)
    assert buf.getvalue() == "<6>eplbd: domain=d window=7 decision=publish beta_now=0.6123\n"
    buf = io.StringIO()
    lg = Logger("warning", buf, journal=False)
    lg.info("hidden")
    lg.error("domain error", domain="x", error="two words")
    out = buf.getvalue()
    assert out.count("\n") == 1 and ' error: domain error domain=x error="two words"' in out
