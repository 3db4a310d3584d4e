"""The post-hoc study table and acceptance figure over run directories."""

import json

import pytest

from hpcflow import run, study


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from test_fhmc import fhmc_input

    d = tmp_path_factory.mktemp("study")
    for k in (3, 5):
        path = fhmc_input(d, L=6 if k == 5 else 4, beta=0.5, lam=0.5, replicas=2,
                          trajectories=150, iterations=5, name=f"k{k}")
        text = path.read_text().replace("kernel_size = 3", f"kernel_size = {k}")
        text = text.replace("L = 6", "L = 6").replace("thermalization = 50", "thermalization = 10")
        path.write_text(text)
        assert run.main([str(path)]) == 0
    return d


@pytest.mark.slow
def test_table_rows_and_ratio(runs, capsys, tmp_path):
    assert study.main([str(runs / "k3"), str(runs / "k5"), "--json", str(tmp_path / "s.json"),
                       "--csv", str(tmp_path / "s.csv"), "--png", str(tmp_path / "acc.png")]) == 0
    out = capsys.readouterr().out
    assert "FHMC gaussian k=3 n=1" in out and "FHMC gaussian k=5 n=1" in out and "HMC" in out
    rows = json.loads((tmp_path / "s.json").read_text())
    assert [r["algorithm"] for r in rows] == ["hmc", "fhmc", "hmc", "fhmc"]
    for r in rows:  # the row schema of DESIGN.md section 4
        assert set(r) >= {"L", "beta", "xi", "algorithm", "prior", "kernel_size", "length",
                          "steps", "acceptance", "tau_int", "ratio", "c_M", "cost", "input"}
        assert r["tau_int"]["value"] > 0 and r["tau_int"]["error"] > 0
        assert r["length"] == 1.0 and r["steps"] == 8 and "[fhmc]" in r["input"]
        c = r["cost"]
        assert c["forces_per_trajectory"] == 9 and c["ranks"] == 1 and c["wall_seconds"] > 0
        assert c["cost_hmc_forces"] == pytest.approx(r["tau_int"]["value"] * 9 * c["force_cost"])
        assert c["seconds_per_independent_sample"] == pytest.approx(
            2 * r["tau_int"]["value"] * c["seconds_per_trajectory_per_replica"])
    hmc, f3 = rows[0], rows[1]
    assert f3["kernel_size"] == 3 and f3["prior"] == "gaussian"
    assert hmc["ratio"] == {"value": 1.0, "error": 0.0} and hmc["c_M"]["value"] == 1.0
    assert hmc["cost"]["force_cost"] == 1.0 and hmc["cost"]["train_seconds"] is None
    assert f3["ratio"]["value"] == pytest.approx(hmc["tau_int"]["value"] / f3["tau_int"]["value"])
    assert f3["ratio"]["error"] > 0
    for f in (rows[1], rows[3]):  # a flow, even an untrained one, rescales M_z
        assert f["c_M"]["error"] > 0 and abs(f["c_M"]["value"] - 1) > 3 * f["c_M"]["error"]
        assert f["cost"]["force_cost"] > 0  # measured (its size is the bench's business)
        assert f["cost"]["force_cost_bench"]["batch"] == 2  # replicas per rank
        assert f["cost"]["train_seconds"] is None or f["cost"]["train_seconds"] > 0
    csv_head = (tmp_path / "s.csv").read_text().splitlines()[0].split(",")
    assert "tau_int_value" in csv_head and "cost_force_cost" in csv_head
    png = (tmp_path / "acc.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "for 2 flow(s)" in out


def test_no_runs_is_an_error(tmp_path):
    assert study.main([str(tmp_path)]) == 2


@pytest.mark.slow
def test_no_bench_skips_the_force_cost(runs, capsys):
    rows = study.collect([runs / "k3"], bench=False)
    assert [r["cost"]["force_cost"] for r in rows] == [1.0, None]
    assert rows[1]["cost"]["cost_hmc_forces"] is None


def _row(algorithm, length, tau, dtau, c_M=1.0):
    return {"algorithm": algorithm, "L": 16, "beta": 0.634, "lambda": 0.5, "length": length,
            "integrator": "leapfrog", "tau_int": {"value": tau, "error": dtau},
            "c_M": {"value": c_M, "error": 0.0}}


def test_hmc_at_equivalent_length_interpolates_the_controls():
    """tau_int(M) of HMC at tau / c_M, log-log between the bracketing lengths; a flow that
    only rescales the slow mode has gain_beyond_rescaling 1."""
    import math

    hmc = [_row("hmc", 1.0, 80.0, 4.0), _row("hmc", 2.0, 20.0, 1.0), _row("hmc", 4.0, 8.0, 0.4)]
    rescaling = _row("fhmc", 1.0, 80.0 / 2 ** 1.5, 1.0, c_M=1 / 2 ** 0.75)   # tau/c = 2^0.75
    faster = _row("fhmc", 1.0, 10.0, 0.5, c_M=0.5)                          # tau/c = 2: exact row
    outside = _row("fhmc", 1.0, 50.0, 2.0, c_M=0.2)                         # tau/c = 5 > 4
    rows = hmc + [rescaling, faster, outside]
    for r in rows:
        study.add_rescaling_control(rows, r)
    eq = rescaling["hmc_equivalent"]
    assert eq["between"] == [1.0, 2.0] and eq["length"] == pytest.approx(2 ** 0.75)
    assert eq["tau_int"]["value"] == pytest.approx(80.0 * (20.0 / 80.0) ** 0.75)
    w = 0.75
    assert eq["tau_int"]["error"] == pytest.approx(
        eq["tau_int"]["value"] * math.hypot((1 - w) * 0.05, w * 0.05))
    assert rescaling["gain_beyond_rescaling"]["value"] == pytest.approx(
        80.0 * 0.25 ** 0.75 / (80.0 / 2 ** 1.5))
    assert faster["hmc_equivalent"]["tau_int"] == {"value": 20.0, "error": 1.0}
    assert faster["gain_beyond_rescaling"]["value"] == pytest.approx(2.0)
    assert outside["hmc_equivalent"] is None
    assert outside["gain_beyond_rescaling"] == {"value": None, "error": None}
    assert hmc[0]["hmc_equivalent"] is None
