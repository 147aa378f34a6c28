"""benchmarks/bench_policy.py: the reference rows are the baselines they are named after."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from eplbd.geometry import Geometry
from eplbd.replay import replay
from eplbd.synthetic import drifting_trace

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_policy.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_policy", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_reference_rows_are_the_named_baselines(bench: ModuleType) -> None:
    g = Geometry(3, 32, 8, 5, num_nodes=2, num_groups=4)  # groups pack onto nodes
    tr = drifting_trace(25, 3, 32, seed=3)
    rows = bench.reference_rows("t", tr, g, 5, 5, "auto", 0.0)
    assert [r["policy"] for r in rows] == ["greedy-hier/sum", "greedy-global/sum", "greedy-global/auto"]
    assert [r["forecast"] for r in rows] == ["sum", "sum", "auto"]
    # Global = the same greedy on a one-node geometry (β depends on the ranks only),
    # hierarchical = the default greedy; moves are counted on the real geometry.
    g1 = Geometry(3, 32, 8, 5, num_nodes=1, num_groups=4)
    for r, (geo, fc) in zip(rows, ((g, "sum"), (g1, "sum"), (g1, "auto")), strict=True):
        want = replay(tr, geo, "greedy", 5, 5, fc).summary()
        assert r["beta_mean"] == pytest.approx(want["beta_mean"], abs=1e-12)
        assert r["moves_remote_total"] == want["moves_remote_total"]
        assert r["geometry"].endswith("N2 G4")
    assert rows[0]["beta_mean"] != rows[1]["beta_mean"]
    held = [r["beta_half1"] for r in rows] + [r["beta_half2"] for r in rows]
    assert np.isfinite(held).all()


def test_tradeoff_rows_use_fixed_settings(bench: ModuleType) -> None:
    g = Geometry(2, 16, 4, 5)
    tr = drifting_trace(15, 2, 16, seed=4)
    rows = bench.tradeoff_rows("t", tr, g, 5, 5, "sum", 0.0, {})
    assert len(rows) == len(bench.TRADEOFF)
    for r, (sl, rt) in zip(rows, bench.TRADEOFF, strict=True):
        opts = {"slack": sl, "repair_tolerance": rt}
        want = replay(tr, g, "moveaware", 5, 5, "sum", options=opts).summary()
        assert r["beta_mean"] == want["beta_mean"]
        assert r["moves_remote_total"] == want["moves_remote_total"]
        assert r["policy"] == f"moveaware s={sl:g} rt={rt:g}"


def test_paired_ci_blocks_by_plan_interval(bench: ModuleType) -> None:
    # Block means of a - b: [0.01, 0.03, 0.02] (the trailing partial block is dropped).
    b = np.full(7, 0.8)
    a = b + np.array([0.0, 0.02, 0.02, 0.04, 0.01, 0.03, 9.0])
    lo, hi, k = bench.paired_ci(a, b, 2)
    assert k == 3
    half = 4.303 * 0.01 / np.sqrt(3)  # t(0.975, 2) x sd / sqrt(k)
    assert (lo, hi) == pytest.approx((0.02 - half, 0.02 + half))
    # Differences that vary only inside blocks: the interval is the mean itself.
    flat = bench.paired_ci(b[:6] + np.tile([0.01, -0.01], 3), b[:6], 2)
    assert flat[:2] == pytest.approx((0.0, 0.0), abs=1e-15)
    # One block: no interval.
    lo, hi, k = bench.paired_ci(a[:3], b[:3], 3)
    assert k == 1 and np.isnan(lo) and np.isnan(hi)


def test_variant_rows_replay_moveaware_with_the_options(
    bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tr = drifting_trace(12, 2, 16, seed=5)
    path = tmp_path / "t" / "loads.npy"
    path.parent.mkdir()
    np.save(path, tr)
    argv = [str(path), "--no-synthetic", "--no-speed", "--json", "--variant", "count_ratio=1.1,slack=0.03"]
    assert bench.main(argv) == 0
    rows = {r["policy"]: r for r in json.loads(capsys.readouterr().out)["replay"]}
    assert set(rows) == {"greedy", "moveaware", "moveaware count_ratio=1.1,slack=0.03"}
    g = bench.geometry_for(2, 16)
    interval, history = bench.cadence(12)
    want = replay(tr, g, "moveaware", interval, history, options={"count_ratio": 1.1, "slack": 0.03})
    got = rows["moveaware count_ratio=1.1,slack=0.03"]
    assert got["beta_held_out"] == [round(float(x), 6) for x in want.beta[want.first_window :]]
    assert got["moves_remote_total"] == want.summary()["moves_remote_total"]
    assert got["beta_held_out"] != rows["moveaware"]["beta_held_out"]  # the options took effect


def test_comparisons_and_plot(bench: ModuleType, tmp_path: Path) -> None:
    g = Geometry(2, 16, 4, 5)
    rows = []
    for name, seed in (("a", 1), ("b", 2)):
        rows += bench.run_replays(name, drifting_trace(25, 2, 16, seed=seed), g, 5, 5, "auto",
                                  adaptive=True, min_gain=0.0, options={})  # fmt: skip
    cmp = bench.comparisons(rows)
    assert [c["trace"] for c in cmp] == ["a", "b"]
    by = {(r["trace"], r["policy"]): r for r in rows}
    for c in cmp:
        m, gr = by[(c["trace"], "moveaware")], by[(c["trace"], "greedy")]
        assert c["d_beta"] == m["beta_mean"] - gr["beta_mean"]
        lo, hi, k = bench.paired_ci(np.array(m["beta_held_out"]), np.array(gr["beta_held_out"]), 5)
        assert (c["lo"], c["hi"], c["k"]) == (lo, hi, k) and k == 4
    png = tmp_path / "p.png"
    bench.plot(rows, str(png))
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000
