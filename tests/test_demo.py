"""`eplbd demo` end to end, as a user runs it: a subprocess with a live daemon and 4 gloo ranks.

Small experts and few steps keep each run to a few seconds; the defaults (what
`make demo` runs) are measured in benchmarks/README.md, not here.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SHM = Path("/dev/shm")
# A short run that still sees plans: 4-step windows, a plan every 16 steps, tiny experts.
SMALL = ["--ranks", "4", "--steps", "96", "--sync-interval", "4", "--plan-every", "16"]
SMALL += ["--hidden", "32", "--ffn", "64", "--tokens", "128", "--shift-at", "1"]


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("EPLBD_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def demo(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "eplbd.cli", "demo", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env(),
        cwd=REPO,
    )


def leftovers(pid: int) -> list[str]:
    """shm files (segments, doorbells) of the demo process ``pid``: its prefix is eplbddemo<pid>x..."""
    return sorted(p.name for p in SHM.iterdir() if re.match(rf"(sem\.)?eplbddemo{pid}x", p.name))


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie counts as gone (its parent, the demo, has exited or reaped it).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


FLOAT_KEYS = (
    "beta_before",
    "beta_after",
    "step_ms_p50",
    "step_ms_p99",
    "step_ms_p99_in_flight",
    "stw_step_ms_p99",
    "stw_pause_ms_max",
)
INT_KEYS = ("plans_applied", "moves_remote", "bytes_moved")


@pytest.mark.timeout(90)
def test_short_demo_json_and_plot(tmp_path: Path) -> None:
    png = tmp_path / "demo.png"
    t0 = time.monotonic()
    r = demo(*SMALL, "--json", "--plot", str(png))
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    out: dict[str, Any] = json.loads(r.stdout)  # exactly one JSON object on stdout
    for k in FLOAT_KEYS:
        assert isinstance(out[k], float), (k, out[k])
    for k in INT_KEYS:
        assert isinstance(out[k], int) and not isinstance(out[k], bool), (k, out[k])
    assert out["outputs_match"] is True
    assert out["async"]["weights_bitwise"] and out["stw"]["weights_bitwise"]
    assert out["async"]["outputs_checked_steps"] >= 3
    assert out["plans_applied"] >= 1 and out["stw_plans_applied"] >= 1
    assert out["beta_after"] > out["beta_before"]
    assert out["stw_beta_after"] > out["beta_before"]
    assert out["moves_remote"] >= 1
    assert out["bytes_moved"] == out["moves_remote"] * out["config"]["expert_bytes"]
    assert out["async"]["steps_in_flight"] >= 1
    # stop-the-world runs plans on the forward thread; eplbd never does.
    assert out["stw_pause_ms_max"] > 0.0 and out["async"]["pause_ms_max"] == 0.0
    d = out["daemon"]
    assert d["exit_status"] == 0 and d["plans_published"] >= 2
    assert d["shm_removed"] == []  # the ranks' leader unlinked its domain itself
    assert gone(d["pid"])
    assert not [p for p in SHM.iterdir() if p.name.startswith((d["shm_prefix"], "sem." + d["shm_prefix"]))]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"short demo took {took:.1f} s")


@pytest.mark.timeout(60)
def test_corrupted_expert_weights_are_caught() -> None:
    """The checks can fail: layer-0 weights altered on every rank before the output check of step 49
    (every rank, so that no clean copy is left for a later plan to move back into a slot)."""
    r = demo(*SMALL, "--no-stw", "--json", "--fail-at", "all:49:corrupt")
    assert r.returncode == 1, r.stderr
    out = json.loads(r.stdout)
    a = out["async"]
    assert out["outputs_match"] is False, a
    # Both checks see it: the output compared at step 49, the weights compared at the end.
    assert a["outputs_max_rel_diff"] > 1e-2, a
    assert a["weights_bitwise"] is False, a
    assert "outputs or weights differ from the unbalanced model" in r.stderr


def test_bad_arguments_give_clear_errors() -> None:
    r = demo("--ranks", "1")
    assert r.returncode == 2
    assert "--ranks: must be in [2, 8], got 1" in r.stderr
    r = demo("--steps", "20", "--sync-interval", "8")
    assert r.returncode == 2
    assert "--steps (20) must be at least 4 x --sync-interval (8)" in r.stderr
    r = demo("--steps", "many")
    assert r.returncode == 2 and "--steps: must be an integer, got 'many'" in r.stderr
    r = demo("--plot", "/nonexistent-dir/x.png", "--steps", "16")
    assert r.returncode == 2 and "--plot: directory /nonexistent-dir does not exist" in r.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["raise", "crash"])
def test_rank_failure_exits_nonzero_and_cleans_up(kind: str) -> None:
    p = subprocess.Popen(
        [sys.executable, "-m", "eplbd.cli", "demo", *SMALL, "--no-stw", "--fail-at", f"2:30:{kind}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
        cwd=REPO,
    )
    out, err = p.communicate(timeout=50)
    assert p.returncode == 1, err
    want = "RuntimeError: injected failure at step 30" if kind == "raise" else "exited with status 3"
    assert f"async run failed: rank 2: {want}" in err, err
    assert "daemon stopped, ranks ended, shm removed" in err
    assert out == ""
    m = re.search(r"daemon pid (\d+)", err)
    assert m and gone(int(m.group(1)))
    assert leftovers(p.pid) == []


@pytest.mark.timeout(60)
def test_ctrl_c_stops_daemon_and_ranks() -> None:
    p = subprocess.Popen(
        [sys.executable, "-m", "eplbd.cli", "demo", *SMALL, "--steps", "100000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
        cwd=REPO,
    )
    assert p.stderr is not None
    lines = []
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:  # until rank 0 shows progress: everything is running
        line = p.stderr.readline()
        lines.append(line)
        if line.startswith("[async] step") or not line:
            break
    daemon_pid = int(re.search(r"daemon pid (\d+)", "".join(lines)).group(1))  # type: ignore[union-attr]
    assert leftovers(p.pid), "the run's shm domain should exist while it runs"
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 130, err
    assert "interrupted; daemon stopped, ranks ended, shm removed" in err
    assert gone(daemon_pid)
    assert leftovers(p.pid) == []


def test_demo_module_imports_no_torch() -> None:
    """`eplbd run` shares the dispatcher with `eplbd demo`: parsing must not pull torch in."""
    code = (
        "import sys, eplbd.demo, eplbd.cli; eplbd.cli.build_parser(['demo']);"
        "bad = [m for m in ('torch', 'matplotlib', 'eplbd_client') if m in sys.modules];"
        "assert not bad, bad"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(), timeout=30)
    assert r.returncode == 0, r.stderr
