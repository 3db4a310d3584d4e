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


def test_table_rows_and_ratio(runs, capsys, tmp_path):
    assert study.main([str(runs / "k3"), str(runs / "k5"), "--json", str(tmp_path / "s.json"),
                       "--png", str(tmp_path / "acc.png")]) == 0
    out = capsys.readouterr().out
    assert "FHMC gaussian k=3 n=1" in out and "FHMC gaussian k=5 n=1" in out and "HMC" in out
    rows = json.loads((tmp_path / "s.json").read_text())
    assert [r["algorithm"] for r in rows] == ["hmc", "fhmc", "hmc", "fhmc"]
    for r in rows:
        assert r["tau_int"] > 0 and r["tau_int_error"] > 0
    f3 = rows[1]
    assert f3["kernel_size"] == 3 and f3["prior"] == "gaussian"
    assert f3["tau_hmc_over_tau"] == pytest.approx(rows[0]["tau_int"] / f3["tau_int"])
    png = (tmp_path / "acc.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "for 2 flow(s)" in out


def test_no_runs_is_an_error(tmp_path):
    assert study.main([str(tmp_path)]) == 2
