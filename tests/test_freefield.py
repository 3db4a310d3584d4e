"""HMC on the free field (lambda = 0) against the exact results of PHYSICS.md section 3.

    chi = V <M^2> = 1 / (2 - 4 beta),  xi2 = sqrt(beta / (2 - 4 beta)),
    cosh m = (1 - beta) / beta,        <|M|> = sqrt(2/pi) sqrt(chi / V),

all exact at any L.  The whole pipeline runs: driver, HDF5 file, Gamma-method analysis.
"""

import json
import math

import pytest

from hpcflow import run

BETA, L = 0.4, 8
CHI = 1 / (2 - 4 * BETA)
XI2 = math.sqrt(BETA / (2 - 4 * BETA))
XI = 1 / math.acosh((1 - BETA) / BETA)
ABSM = math.sqrt(2 / math.pi) * math.sqrt(CHI / L**2)


@pytest.fixture(scope="module")
def free_field(tmp_path_factory):
    from conftest import write_input

    d = tmp_path_factory.mktemp("free")
    path = write_input(d, stages="hmc, analysis", L=L, beta=BETA, lam=0.0, replicas=16,
                       trajectories=3000, thermalization=100, steps=8, integrator="omf2",
                       save_every=0, seed=2024, checkpoint_every=1000)
    assert run.main([str(path)]) == 0
    return json.loads((d / "out" / "analysis.json").read_text())


def test_exact_table_values():
    assert CHI == pytest.approx(2.5) and XI2 == pytest.approx(1.0)
    assert XI == pytest.approx(1.039043, abs=1e-6)


@pytest.mark.parametrize("key, exact", [("chi", CHI), ("xi2", XI2), ("xi", XI), ("absM", ABSM)])
def test_free_field_within_3_sigma(free_field, key, exact):
    o = free_field["observables"][key]
    assert o["error"] > 0 and o["error"] < 0.05 * exact  # precise enough to mean something
    assert abs(o["value"] - exact) < 3 * o["error"], (key, o, exact)


def test_free_field_mean_magnetization_zero(free_field):
    o = free_field["observables"]["M"]
    assert abs(o["value"]) < 3 * o["error"]
