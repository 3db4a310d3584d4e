"""The replica-combined Gamma method about the overall mean (PHYSICS.md section 7).

An AR(1) process x_{t+1} = a x_t + sqrt(1 - a^2) eta_t, eta_t ~ N(0, 1), started from its
stationary distribution N(0, 1), has rho(t) = a^|t| and so the exact

    tau_int = 1/2 + sum_{t>=1} a^t = (1 + a) / (2 (1 - a)).

With many short replicas (n = 75 tau_int) the estimate about the overall mean
(:func:`hpcflow.analysis.to_obs`) recovers it; pyerrors' plain ``Obs(samples, names)``,
which subtracts each replica's own mean, is biased low by O(tau_int / n).
"""

import numpy as np
import pyerrors as pe
import pytest

from hpcflow.analysis import recentre, to_obs

TAU = 20.0
A = (2 * TAU - 1) / (2 * TAU + 1)  # (1 + a) / (2 (1 - a)) = TAU
R, N = 128, 1500


def ar1(a, replicas, n, seed):
    rng = np.random.default_rng(seed)
    eta = rng.normal(size=(replicas, n))
    x = np.empty((replicas, n))
    x[:, 0] = eta[:, 0]  # stationary start
    c = np.sqrt(1 - a * a)
    for t in range(1, n):
        x[:, t] = a * x[:, t - 1] + c * eta[:, t]
    return x


@pytest.fixture(scope="module")
def series():
    return ar1(A, R, N, seed=1)


def test_exact_tau_int_of_the_process():
    assert (1 + A) / (2 * (1 - A)) == pytest.approx(TAU)


def test_overall_mean_recovers_exact_tau_int_and_plain_is_low(series):
    o = to_obs(series, "ar1")
    o.gamma_method()
    tau, dtau = o.e_tauint["ar1"], o.e_dtauint["ar1"]
    assert abs(tau - TAU) < 2.5 * dtau, (tau, dtau)

    plain = pe.Obs(list(series), [f"ar1|r{r:03d}" for r in range(R)])
    plain.gamma_method()
    tau_plain = plain.e_tauint["ar1"]
    # the bias this module is about: the plain estimate is low, beyond its own error
    assert tau_plain < TAU - 2 * plain.e_dtauint["ar1"], (tau_plain, TAU)
    assert tau_plain < tau
    assert plain.dvalue < o.dvalue  # the error of the mean is underestimated with it


def test_to_obs_value_names_and_derived_observables(series):
    x = series[:4, :200] + 3.0
    o = to_obs(x, "ens")
    assert o.names == [f"ens|r{r:03d}" for r in range(4)]
    assert o.value == pytest.approx(x.mean(), rel=1e-14)
    # every replica carries the overall mean, so a derived observable is f(overall mean)
    assert all(v == pytest.approx(x.mean(), rel=1e-14) for v in o.r_values.values())
    d = np.arccosh(o) / o**2
    d.gamma_method()
    assert d.value == pytest.approx(np.arccosh(x.mean()) / x.mean() ** 2, rel=1e-12)
    assert d.dvalue > 0
    # a linear function of the data: the error is exactly that of the data, rescaled
    o.gamma_method()
    lin = 2 * o + 1
    lin.gamma_method()
    assert lin.dvalue == pytest.approx(2 * o.dvalue, rel=1e-12)


def test_to_obs_rejects_wrong_shapes():
    with pytest.raises(ValueError):
        to_obs(np.zeros(10), "e")


def test_json_round_trip_needs_recentre(series, tmp_path):
    """pyerrors' JSON reader re-centres each replica on its own mean; recentre undoes it."""
    o = to_obs(series[:16, :400], "ar1")
    d = np.sqrt(o**2 + 1)  # a derived observable too
    pe.input.json.dump_to_json([o, d], str(tmp_path / "o"), description="test")
    lo, ld = pe.input.json.load_json(str(tmp_path / "o"), verbose=False)
    for orig, loaded in ((o, lo), (d, ld)):
        orig.gamma_method()
        back = recentre(loaded)
        back.gamma_method()
        assert back.value == pytest.approx(orig.value, rel=1e-12)
        assert back.e_tauint["ar1"] == pytest.approx(orig.e_tauint["ar1"], rel=1e-9)
        assert back.dvalue == pytest.approx(orig.dvalue, rel=1e-9)
    loaded = lo
    loaded.gamma_method()
    assert loaded.e_tauint["ar1"] < o.e_tauint["ar1"]  # the reader's re-centring
