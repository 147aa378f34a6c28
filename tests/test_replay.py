"""`eplbd replay`: held-out semantics, JSON summary, bad traces, plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from eplbd import replay as replay_mod
from eplbd.cli import main
from eplbd.geometry import Geometry
from eplbd.placement import balancedness, default_phy2log
from eplbd.replay import TraceError, replay, validate_trace
from eplbd.synthetic import drifting_trace

KEYS = {
    "beta_mean",
    "beta_static",
    "moves_remote_total",
    "moves_remote_first",
    "moves_remote_steady_per_plan",
    "plans",
    "plan_ms_median",
    "beta_min",
    "beta_hindsight",
    "peak_gap",
    "moves_cross_node_total",
}


@pytest.fixture
def trace_file(tmp_path: Path) -> Path:
    p = tmp_path / "trace.npy"
    np.save(p, drifting_trace(25, 3, 16, seed=4))
    return p


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["replay", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_json_summary(trace_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, str(trace_file), "--ranks", "4", "--nodes", "2", "--slots-per-rank", "5",
                       "--groups", "2", "--interval", "5", "--history", "5", "--json")  # fmt: skip
    assert rc == 0, err
    s = json.loads(out)
    assert set(s) >= KEYS
    assert s["plans"] == 4  # windows 5, 10, 15, 20
    assert s["held_out_from"] == 5
    assert "beta_bound" not in s  # the trivial bound read 1.000 on every realistic shape
    # greedy fitted to each window in hindsight beats the static default placement
    assert 0 < s["beta_static"] < s["beta_hindsight"] <= 1.0
    assert s["peak_gap"] >= -1e-12
    assert s["geometry"]["num_groups"] == 2


def test_table_and_plot(trace_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "replay.png"
    rc, out, err = run(capsys, str(trace_file), "--ranks", "4", "--nodes", "1", "--slots-per-rank", "5",
                       "--policy", "greedy", "--plot", str(png))  # fmt: skip
    assert rc == 0, err
    assert "beta_mean" in out and "moves_remote_first" in out
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_synthetic_small(capsys: pytest.CaptureFixture[str]) -> None:
    base = ("--synthetic", "--windows", "30", "--layers", "2", "--experts", "32",
            "--ranks", "8", "--nodes", "2", "--slots-per-rank", "5", "--json")  # fmt: skip
    rc, out, err = run(capsys, *base, "--fixed-slack")
    assert rc == 0, err
    fixed = json.loads(out)
    rc, out, err = run(capsys, *base, "--option", "slack=0.06")
    assert rc == 0, err
    assert json.loads(out)["beta_mean"] == fixed["beta_mean"]  # the default slack is 0.06
    rc, out, err = run(capsys, "--synthetic", "--windows", "30", "--layers", "2", "--experts", "32",
                       "--ranks", "8", "--nodes", "2", "--slots-per-rank", "5", "--json")  # fmt: skip
    assert rc == 0, err
    s = json.loads(out)
    assert s["plans"] == 2 and s["beta_mean"] > s["beta_static"]


def test_held_out_semantics() -> None:
    """Window t is measured under the plan made from windows < t, never from t itself."""
    g = Geometry(2, 8, 4, 2)
    tr = np.zeros((4, 2, 8))
    tr[:2, :, 0] = 100.0  # first windows: expert 0 hot
    tr[2:, :, 7] = 100.0  # from window 2: expert 7 hot
    res = replay(tr, g, "moveaware", interval=2, history=2)
    assert res.plan_windows == [2]
    # window 2 is served by a plan fitted to expert 0: it cannot be balanced for expert 7
    plan_fit_to_0 = balancedness(tr[0], default_phy2log(g), g)
    assert res.beta[2] < 0.5 and res.beta[0] == pytest.approx(plan_fit_to_0)
    assert res.summary()["held_out_from"] == 2


@pytest.mark.parametrize(
    ("array", "words"),
    [
        (np.ones((3, 8)), "expected 3 dimensions"),
        (np.full((2, 2, 8), -1), "negative count -1"),
        (np.full((2, 2, 8), np.nan), "non-finite count nan at window 0, layer 0, expert 0"),
        (np.array([[["x"] * 8] * 2] * 2), "not numeric"),
        (np.ones((0, 2, 8)), "empty dimension"),
    ],
)
def test_bad_traces_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], array: np.ndarray, words: str
) -> None:
    p = tmp_path / "bad.npy"
    np.save(p, array)
    rc, out, err = run(capsys, str(p), "--ranks", "4", "--nodes", "1", "--slots-per-rank", "2")
    assert rc == 2 and out == ""
    assert words in err and err.startswith("eplbd replay: error:")


def test_geometry_that_cannot_hold_experts(trace_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, str(trace_file), "--ranks", "2", "--nodes", "1", "--slots-per-rank", "3")
    assert rc == 2 and "must be >= num_experts" in err
    rc, _, err = run(capsys, str(trace_file), "--ranks", "4", "--nodes", "3", "--slots-per-rank", "4")
    assert rc == 2 and "divisible by num_nodes" in err


def test_cli_usage_errors(trace_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, str(trace_file))
    assert rc == 2 and "--ranks" in err
    missing = str(tmp_path / "missing.npy")
    rc, _, err = run(capsys, missing, "--ranks", "4", "--nodes", "1", "--slots-per-rank", "4")
    assert rc == 2 and "cannot read trace" in err
    rc, _, err = run(capsys, str(trace_file), "--ranks", "4", "--nodes", "1", "--slots-per-rank", "4",
                     "--option", "min_gain")  # fmt: skip
    assert rc == 2 and "KEY=VALUE" in err
    rc, _, err = run(capsys, str(trace_file), "--ranks", "4", "--nodes", "1", "--slots-per-rank", "4",
                     "--option", "bogus=1")  # fmt: skip
    assert rc == 2 and "unknown option" in err


def test_validate_trace_returns_float() -> None:
    a = validate_trace(np.ones((1, 1, 2), dtype=np.int32))
    assert a.dtype == np.float64
    with pytest.raises(TraceError):
        validate_trace([[1, 2]])


def test_progress(
    trace_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    tr = np.load(trace_file)
    g = Geometry(tr.shape[1], tr.shape[2], 4, 5)
    calls: list[tuple[int, int, float, int]] = []
    res = replay(tr, g, interval=5, history=5, progress=lambda *a: calls.append(a))
    T = tr.shape[0]
    assert [c[:2] for c in calls] == [(t, T) for t in range(1, T + 1)]
    assert all(np.isnan(c[2]) for c in calls[:5])
    assert calls[-1][2] == pytest.approx(res.summary()["beta_mean"])
    assert [c[3] for c in calls][4:6] == [0, 1]  # the plan at window 5 serves window 5 on
    # The CLI prints (rate-limited) progress lines to stderr, the summary alone to stdout.
    monkeypatch.setattr(replay_mod, "PROGRESS_EVERY_S", 0.0)
    geo = ("--ranks", "4", "--nodes", "1", "--slots-per-rank", "5")
    rc, out, err = run(capsys, str(trace_file), *geo, "--json")
    assert rc == 0
    json.loads(out)
    lines = err.splitlines()
    assert len(lines) == T and lines[-1].startswith(f"eplbd replay: window {T}/{T} (100%)")
