"""The systemd unit: `systemd-analyze verify`, the settings the daemon relies on, and the
MemoryDenyWriteExecute rule checked for real (prctl PR_SET_MDWE, the mechanism systemd uses)."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from daemon_harness import REPO, child_env, cleanup_prefix, unique_prefix

pytestmark = pytest.mark.timeout(120)

UNIT = REPO / "systemd" / "eplbd.service"


def _unit() -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(UNIT.read_text())
    return cp


def test_unit_settings() -> None:
    s = _unit()["Service"]
    assert s["Type"] == "notify" and s["NotifyAccess"] == "main"
    assert s["WatchdogSec"] == "10s" and s["Restart"] == "on-failure"
    assert "kill -HUP $MAINPID" in s["ExecReload"]
    assert s["RestartPreventExitStatus"] == "2"  # config errors: restarting cannot help
    assert "PrivateDevices" not in s  # would hide the ranks' /dev/shm
    assert "/dev/shm" in s["ReadWritePaths"]
    assert s["ProtectSystem"] == "strict" and s["NoNewPrivileges"] == "yes"
    assert set(s["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert s["ExecStart"].split()[1:] == ["run", "--config", "/etc/eplbd/eplbd.toml"]


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd provides it)")
    eplbd = Path(sys.executable).with_name("eplbd")
    if not eplbd.exists():
        pytest.skip(f"{eplbd} missing: the package is not installed in this interpreter's environment")
    # verify checks that ExecStart exists: point it at this environment's console script.
    unit = tmp_path / "eplbd.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/eplbd", str(eplbd)))
    r = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "eplbd.service" not in r.stderr, r.stderr  # no warnings about our unit either


MDWE_RUN = r"""
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
    print("MDWE-UNSUPPORTED", ctypes.get_errno()); sys.exit(0)
# From here on, W+X mappings fail exactly as under MemoryDenyWriteExecute=yes.
import mmap
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    print("MDWE-NOT-ENFORCED"); sys.exit(0)
except OSError:
    pass
import numpy as np
from eplbd.geometry import Geometry
from eplbd.shm import Domain
from eplbd.daemon import Daemon, Logger
from eplbd.config import parse_config
from eplbd.notify import Notifier
prefix = sys.argv[1]
g = Geometry(4, 16, 4, 5)
d = Domain.create(prefix + "mdwe", g)
rng = np.random.default_rng(0)
cfg = parse_config({"shm_prefix": prefix, "num_iterations": 10, "min_gain": 0.0, "poll_interval_s": 0.02,
                    "discovery_interval_s": 0.05, "metrics_port": 0}, {})
dm = Daemon(cfg, None, log=Logger("info"), notifier=Notifier({}))
import threading
t = threading.Thread(target=dm.run, daemon=True)
dm.install_signals = lambda: None  # signals are main-thread only; not what this test is about
t.start()
for w in range(2):
    loads = rng.integers(0, 1000, size=(4, 16)) * (rng.random((4, 16)) < 0.3)
    d.write_window(w, loads, epoch=0, step_begin=w * 10, step_end=w * 10 + 10)
    d.ring_doorbell()
deadline = time.monotonic() + 20
while d.latest_plan_id() < 1 and time.monotonic() < deadline:
    time.sleep(0.02)
print("PLAN", d.latest_plan_id())
dm.stop_event.set(); t.join(5)
d.unlink(); d.close()
"""


def test_daemon_runs_under_memory_deny_write_execute() -> None:
    prefix = unique_prefix("m")
    try:
        r = subprocess.run(
            [sys.executable, "-c", MDWE_RUN, prefix],
            capture_output=True,
            text=True,
            timeout=90,
            env=child_env(),
        )
    finally:
        cleanup_prefix(prefix)
    if "MDWE-UNSUPPORTED" in r.stdout:
        pytest.skip("kernel lacks PR_SET_MDWE (Linux >= 6.3)")
    assert "MDWE-NOT-ENFORCED" not in r.stdout
    assert r.returncode == 0, r.stderr[-3000:]
    assert "PLAN 1" in r.stdout, r.stdout + r.stderr[-3000:]
