"""Load forecast: methods, scale convention, input validation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from eplbd.forecast import METHODS, auto_alpha, forecast, validate_windows


def test_sum_is_the_sum_of_the_last_windows() -> None:
    x = np.arange(4 * 2 * 3, dtype=np.int64).reshape(4, 2, 3)
    assert np.array_equal(forecast(x, "sum"), x.sum(axis=0).astype(np.float64))
    assert np.array_equal(forecast(x, "sum", history=2), x[2:].sum(axis=0).astype(np.float64))
    out = forecast(list(x), "sum")  # a list of [L, E] windows is accepted
    assert out.dtype == np.float64 and out.shape == (2, 3)


@pytest.mark.parametrize("method", METHODS)
def test_identical_windows_give_their_sum(method: str) -> None:
    w = np.array([[5.0, 1.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0]])  # layer 1 idle
    x = np.stack([w] * 5)
    np.testing.assert_allclose(forecast(x, method), 5 * w, rtol=1e-12, atol=1e-12)


def test_ema_weights() -> None:
    x = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])  # W=2, L=1, E=2
    # alpha 0.5: weights old 0.25, new 0.5, renormalised to sum to W = 2.
    np.testing.assert_allclose(forecast(x, "ema", alpha=0.5), [[2 / 3, 4 / 3]])
    np.testing.assert_allclose(forecast(x, "ema", alpha=1.0), [[0.0, 2.0]])  # newest only, x W
    # A smaller alpha remembers more of the past.
    assert forecast(x, "ema", alpha=0.1)[0, 0] > forecast(x, "ema", alpha=0.9)[0, 0]


def test_share_ema_follows_mix_not_volume() -> None:
    a = np.array([[3.0, 1.0]])
    b = np.array([[1.0, 3.0]])
    x = np.stack([a, 100 * b, a])  # a big batch in the middle
    ema = forecast(x, "ema", alpha=0.5)
    share = forecast(x, "share_ema", alpha=0.5)
    # Same total, but the big batch dominates the plain EMA, not the share EMA.
    np.testing.assert_allclose(share.sum(), x.sum())
    assert ema[0, 1] > ema[0, 0]
    assert share[0, 0] > share[0, 1]


def test_trend_extrapolates_drift() -> None:
    shares = np.array([0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    x = np.stack([[[s, 1 - s]] for s in shares]) * 100.0  # [6, 1, 2]
    nxt = 0.8
    tr = forecast(x, "trend", alpha=0.5, beta=0.5, horizon=1.0)
    sh = forecast(x, "share_ema", alpha=0.5)
    total = x.sum()
    assert abs(tr[0, 0] / total - nxt) < abs(sh[0, 0] / total - nxt)
    assert tr[0, 0] / total > shares[-1]
    np.testing.assert_allclose(tr.sum(), total)
    # Extrapolation far ahead is clipped at 0, never negative.
    far = forecast(x, "trend", alpha=0.5, beta=0.5, horizon=100.0)
    assert (far >= 0).all() and far[0, 1] == 0.0
    np.testing.assert_allclose(far.sum(), total)


def test_auto_picks_mean_for_noise_and_fast_ema_for_shifts() -> None:
    rng = np.random.default_rng(0)
    p = np.array([0.4, 0.3, 0.2, 0.1])
    noisy = rng.multinomial(200, p, size=(12, 1)).astype(np.float64)  # [12, 1, 4] stationary
    shift = np.stack([[[90.0, 10.0, 0.0, 0.0]]] * 6 + [[[10.0, 90.0, 0.0, 0.0]]] * 6)  # a jump
    assert auto_alpha(noisy).tolist() == [0.0]
    assert auto_alpha(shift).tolist() == [1.0]
    both = np.concatenate([noisy, shift], axis=1)  # chosen per layer
    assert auto_alpha(both).tolist() == [0.0, 1.0]
    out = forecast(both, "auto")
    np.testing.assert_allclose(out[0], noisy[:, 0].sum(axis=0))  # mean shares x total = sum
    np.testing.assert_allclose(out[1], [120.0, 1080.0, 0.0, 0.0])  # newest mix x total
    with pytest.raises(ValueError, match="alphas"):
        forecast(both, "auto", alphas=[1.5])


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (np.zeros((2, 3)), "3 dims"),
        (np.zeros((0, 2, 3)), "no windows"),
        (np.array([[[1.0, np.nan]]]), "non-finite"),
        (np.array([[[1.0, np.inf]]]), "non-finite"),
        (np.array([[[1.0, -1.0]]]), "negative"),
        (np.array([[["a", "b"]]]), "not numeric"),
        ([np.zeros((2, 3)), np.zeros((2, 4))], "windows"),
    ],
)
def test_bad_windows_raise(bad: object, match: str) -> None:
    for method in METHODS:
        with pytest.raises(ValueError, match=match):
            forecast(bad, method)  # type: ignore[arg-type]


def test_bad_parameters_raise() -> None:
    x = np.ones((3, 2, 2))
    with pytest.raises(ValueError, match="unknown method"):
        forecast(x, "median")
    with pytest.raises(ValueError, match="alpha"):
        forecast(x, "ema", alpha=0.0)
    with pytest.raises(ValueError, match="alpha"):
        forecast(x, "ema", alpha=1.5)
    with pytest.raises(ValueError, match="beta"):
        forecast(x, "trend", beta=-0.1)
    with pytest.raises(ValueError, match="horizon"):
        forecast(x, "trend", horizon=float("nan"))
    with pytest.raises(ValueError, match="history"):
        forecast(x, "sum", history=0)
    with pytest.raises(ValueError, match="window shape"):
        validate_windows(x, shape=(2, 3))


@settings(max_examples=80, deadline=None)
@given(
    hnp.arrays(
        np.float64,
        hnp.array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=5),
        elements=st.floats(0, 1e6, allow_nan=False),
    ),
    st.sampled_from(METHODS),
    st.floats(0.01, 1.0),
)
def test_forecast_invariants(x: np.ndarray, method: str, alpha: float) -> None:
    out = forecast(x, method, alpha=alpha)
    assert out.shape == x.shape[1:] and out.dtype == np.float64
    assert np.isfinite(out).all() and (out >= 0).all()
    # Per-layer totals are those of the windows used for the share-based methods.
    if method in ("sum", "share_ema", "trend"):
        np.testing.assert_allclose(out.sum(axis=1), x.sum(axis=(0, 2)), rtol=1e-9, atol=1e-6)
    # Deterministic.
    assert np.array_equal(out, forecast(x.copy(), method, alpha=alpha))
