"""`eplbd-ctl status` / `trace` against a live daemon, and its error exits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from daemon_harness import (
    REPO,
    DaemonProc,
    child_env,
    cleanup_prefix,
    leader,
    unique_prefix,
    wait_for,
    write_config,
)

from eplbd.ctl import EXIT_NO_DAEMON, EXIT_NO_DOMAIN
from eplbd.geometry import Geometry

pytestmark = pytest.mark.timeout(60)

G = Geometry(4, 16, 4, 5)


@pytest.fixture
def prefix() -> Iterator[str]:
    p = unique_prefix("c")
    yield p
    cleanup_prefix(p)


def _snapshot(name: str) -> bytes:
    """The segment's bytes with the daemon-info region (rewritten by heartbeats) cut out."""
    from eplbd.shm.layout import DAEMON_INFO_SIZE, REGION_HEADER_SIZE, compute_layout

    lo = compute_layout(G, 64)
    raw = Path("/dev/shm", name).read_bytes()
    end = lo.daemon_info_off + REGION_HEADER_SIZE + DAEMON_INFO_SIZE
    return raw[: lo.daemon_info_off] + raw[end:]


def ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "import sys; from eplbd.ctl import main; sys.exit(main())", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
        cwd=REPO,
    )


def test_status_live_daemon_both_forms(tmp_path: Path, prefix: str) -> None:
    name = prefix + "job.main"
    conf = write_config(
        tmp_path / "c.toml",
        shm_prefix=prefix,
        num_iterations=20,
        min_gain=0.0,
        poll_interval_s=0.05,
        heartbeat_interval_s=0.2,
        discovery_interval_s=0.1,
    )
    with leader(name, G) as ld:
        ld.dom.set_rank_pids([os.getpid(), 999_999_99])
        d = DaemonProc(conf, tmp_path / "d.log")
        try:
            wait_for(lambda: d.lines("serving domain"), what="attach")
            hot = np.full((4, 16), 10, dtype=np.int64)
            hot[:, 7] = 5000  # expert 7 is by far the hottest in every layer
            hot[:, 3] = 2000
            ld.write(hot)
            ld.write(hot)  # window 1 triggers (n = 20 / 10 = 2)
            wait_for(lambda: ld.dom.latest_plan_id() == 1, what="plan 1")
            wait_for(lambda: (i := ld.dom.read_daemon_info()) and i.plans_published == 1, what="info")
            before = _snapshot(name)

            r = ctl("status", "--json", "--prefix", prefix)
            assert r.returncode == 0, r.stderr
            st = json.loads(r.stdout)
            assert [x["name"] for x in st["domains"]] == [name]
            dom = st["domains"][0]
            assert dom["geometry"]["num_experts"] == 16 and dom["geometry"]["num_slots"] == 20
            assert dom["owner"] == {"pid": os.getpid(), "alive": True}
            assert dom["ranks"] == [{"pid": os.getpid(), "alive": True}, {"pid": 999_999_99, "alive": False}]
            assert dom["window"]["id"] == 1 and dom["window"]["age_s"] < 30
            assert 0 < dom["beta"] < 0.5  # the default placement is badly balanced for this load
            assert dom["plan"]["id"] == 1 and dom["plan"]["state"] == "not started"
            assert dom["daemon"]["pid"] == d.pid and dom["daemon"]["health"] == "ok"
            assert dom["daemon"]["moves"]["remote"] + dom["daemon"]["moves"]["local"] > 0
            assert [h["expert"] for h in dom["hottest"][:2]] == [7, 3]
            assert st["daemons"][0]["pid"] == d.pid and st["daemons"][0]["domains"] == [name]
            assert d.pid in st["processes"]

            r = ctl("status", "--prefix", prefix)
            assert r.returncode == 0, r.stderr
            out = r.stdout
            assert f"pid {d.pid} alive" in out and ": ok" in out
            assert f"domain    {name}" in out
            assert "L=4 E=16 R=4 S=5" in out and "#1" in out and "not started" in out
            assert "hottest     e7 " in out and "(dead)" in out

            r = ctl("status", "--domain", name)
            assert r.returncode == 0 and name in r.stdout, r.stderr
            # Read-only: the segment is byte-for-byte as before, except the region the
            # daemon itself keeps rewriting (its heartbeat).
            assert _snapshot(name) == before

            out_npy = tmp_path / "trace.npy"
            r = ctl("trace", name, "-o", str(out_npy))
            assert r.returncode == 0, r.stderr
            tr = np.load(out_npy)
            assert tr.dtype == np.int64 and tr.shape == (2, 4, 16)
            assert (tr == hot).all()
        finally:
            assert d.stop() == 0

        # The daemon is gone: the domain is still there, but no live daemon serves it.
        r = ctl("status", "--prefix", prefix)
        assert r.returncode == EXIT_NO_DAEMON, r.stdout + r.stderr
        assert "no live eplbd daemon" in r.stderr and "not running" in r.stdout
        r = ctl("status", "--json", "--prefix", prefix)
        assert r.returncode == EXIT_NO_DAEMON
        assert json.loads(r.stdout)["domains"][0]["daemon"]["alive"] is False


def test_status_no_domain_and_missing_domain(prefix: str, tmp_path: Path) -> None:
    r = ctl("status", "--prefix", prefix)
    assert r.returncode == EXIT_NO_DOMAIN
    assert "no eplbd domain" in r.stderr and prefix in r.stderr
    r = ctl("status", "--domain", prefix + "nothere")
    assert r.returncode == EXIT_NO_DOMAIN and "no domain" in r.stderr, r.stderr
    r = ctl("trace", prefix + "nothere", "-o", str(tmp_path / "x.npy"))
    assert r.returncode == EXIT_NO_DOMAIN and "nothere" in r.stderr
    r = ctl("status", "--domain", "bad/name")
    assert r.returncode == 2


def test_status_without_daemon_reports_none(prefix: str) -> None:
    with leader(prefix + "solo", G) as ld:
        ld.write()
        r = ctl("status", "--prefix", prefix)
        assert r.returncode == EXIT_NO_DAEMON
        assert "none has written" in r.stdout and "window      #0" in r.stdout


def test_status_says_when_the_ranks_refuse_plans(prefix: str) -> None:
    """A plan status with transfer_group_unsafe gets its own line and JSON field."""
    import time

    from eplbd.shm import PlanStatus

    with leader(prefix + "job.m0", G) as ld:
        ld.write()
        r = ctl("status", "--prefix", prefix, "--json")
        assert json.loads(r.stdout)["domains"][0]["transfer_unsafe"] is None
        ld.dom.write_plan_status(PlanStatus(7, 3, 0, 26, time.time_ns()))  # aborted, error 26
        r = ctl("status", "--prefix", prefix)
        assert "REFUSED     plan #7 refused on every rank" in r.stdout, r.stdout
        assert "until the ranks restart" in r.stdout
        d = json.loads(ctl("status", "--prefix", prefix, "--json").stdout)["domains"][0]
        assert d["transfer_unsafe"]["plan_id"] == 7
        assert d["plan_status"]["error_name"] == "transfer_group_unsafe"
