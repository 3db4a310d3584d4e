"""HMC on the free field (lambda = 0) against the exact results of PHYSICS.md section 3.

    chi = V <M^2> = 1 / (2 - 4 beta),  xi2 = sqrt(beta / (2 - 4 beta)),
    cosh m = (1 - beta) / beta,        <|M|> = sqrt(2/pi) sqrt(chi / V),

all exact at any L.  The whole pipeline runs: driver, HDF5 file, Gamma-method analysis.
"""

import json
import math

import numpy as np
import pytest

from hpcflow import run

BETA, L = 0.4, 8
CHI = 1 / (2 - 4 * BETA)
XI2 = math.sqrt(BETA / (2 - 4 * BETA))
XI = 1 / math.acosh((1 - BETA) / BETA)
ABSM = math.sqrt(2 / math.pi) * math.sqrt(CHI / L**2)


@pytest.fixture(scope="module")
def free_field_dir(tmp_path_factory):
    from conftest import write_input

    d = tmp_path_factory.mktemp("free")
    path = write_input(d, stages="hmc, analysis", L=L, beta=BETA, lam=0.0, replicas=16,
                       trajectories=3000, thermalization=100, steps=8, integrator="omf2",
                       save_every=0, seed=2024, checkpoint_every=1000)
    assert run.main([str(path)]) == 0
    return d / "out"


@pytest.fixture(scope="module")
def free_field(free_field_dir):
    return json.loads((free_field_dir / "analysis.json").read_text())


def test_exact_table_values():
    assert CHI == pytest.approx(2.5) and XI2 == pytest.approx(1.0)
    assert XI == pytest.approx(1.039043, abs=1e-6)


@pytest.mark.parametrize("key, exact", [("chi", CHI), ("xi2", XI2), ("xi", XI), ("absM", ABSM)])
@pytest.mark.slow
def test_free_field_within_3_sigma(free_field, key, exact):
    o = free_field["observables"][key]
    assert o["error"] > 0 and o["error"] < 0.05 * exact  # precise enough to mean something
    assert abs(o["value"] - exact) < 3 * o["error"], (key, o, exact)


@pytest.mark.slow
def test_free_field_mean_magnetization_zero(free_field):
    o = free_field["observables"]["M"]
    assert abs(o["value"]) < 3 * o["error"]


def hand_rolled_plateau(C, tmin):
    """The effective mass and plateau of analysis schema <= 3, written out by hand:
    m_eff(t) = arccosh of the cosh ratio (errors at S = 2), mean weighted by 1/dm^2."""
    points = []
    for t in range(max(1, tmin), len(C) - 1):
        ratio = (C[t - 1] + C[t + 1]) / (2 * C[t])
        if ratio.value > 1:
            m = np.arccosh(ratio)
            m.gamma_method()
            points.append(m)
    w = np.array([1 / m.dvalue**2 for m in points])
    w /= w.sum()
    return sum(wi * m for wi, m in zip(w, points))


@pytest.mark.slow
def test_xi_from_pyerrors_corr_agrees_with_the_hand_rolled_plateau(free_field_dir):
    """pyerrors.Corr m_eff + plateau fit = the former weighted mean, to rounding (values and
    errors), on the free-field ensemble (plateau t = 2, 3 at L = 8); and the m_eff errors
    follow the configured S."""
    from hpcflow import analysis
    from hpcflow.store import load_ensemble

    e = load_ensemble(free_field_dir / "hmc.h5")
    p = analysis.primary_obs(e)
    C = [p[f"C{t}"] - L * p["M"] ** 2 for t in range(L // 2 + 1)]
    meff, plateau = analysis.effective_mass(C, L // 4, S=2.0)
    old = hand_rolled_plateau(C, L // 4)
    plateau.gamma_method()
    old.gamma_method()
    assert abs(plateau.value - old.value) < 1e-6 * old.dvalue
    assert plateau.dvalue == pytest.approx(old.dvalue, rel=1e-6)
    xi = 1 / plateau
    xi.gamma_method()
    assert abs(xi.value - 1 / old.value) < 1e-3 * xi.dvalue
    meff3, _ = analysis.effective_mass(C, L // 4, S=3.0)
    for t in (1, 2, 3):
        ratio = (C[t - 1] + C[t + 1]) / (2 * C[t])
        m = np.arccosh(ratio)
        m.gamma_method(S=3.0)
        assert meff3[t].dvalue == pytest.approx(m.dvalue, rel=1e-12)
        assert meff3[t].value == pytest.approx(meff[t].value, rel=1e-14)
