"""The tuner (hpcflow.tune) on the free field, the tuned-line file, and bad input.

Free field (lambda = 0, PHYSICS.md section 3): cosh m = (1 - beta) / beta exactly, so at
L = 8 the target L / xi = 8 m(0.4) = 7.6994 has the exact solution beta = 0.4 (xi = 1.039).
"""

import json
import math

import pytest

from hpcflow import tune

L_FF = 8
BETA_FF = 0.4
XI_FF = 1 / math.acosh((1 - BETA_FF) / BETA_FF)
TARGET_FF = L_FF / XI_FF


def test_exact_free_field_target():
    assert XI_FF == pytest.approx(1.039043, abs=1e-6)
    # the built-in free-field start inverts cosh m = (1 - beta) / beta exactly
    assert tune.default_beta0(L_FF, TARGET_FF, 0.0) == pytest.approx(BETA_FF, abs=1e-12)


def test_fit_line_inverse_prediction():
    """Two exact points: beta* interpolates; the error is the delta-method formula."""
    f = tune.fit_line([0.5, 0.6], [5.0, 3.0], [0.1, 0.1], 4.0)
    assert f.beta == pytest.approx(0.55) and f.bracketed and f.dof == 0
    # y_fit(0.55) is the mean of two independent points of error 0.1: sigma_y = 0.1/sqrt(2);
    # sigma(beta*) = sigma_y / |c1| with c1 = -20
    assert f.y_error == pytest.approx(0.1 / math.sqrt(2))
    assert f.beta_error == pytest.approx(0.1 / math.sqrt(2) / 20)


def test_default_start_is_the_table():
    for L, beta in tune.TABLE:
        assert tune.default_beta0(L, 4.0, 0.5) == pytest.approx(beta, abs=0.004)
    # extrapolates monotonically below the critical coupling
    b24, b32, b48 = (tune.default_beta0(L, 4.0, 0.5) for L in (24, 32, 48))
    assert 0.645 < b24 < b32 < b48 < tune.critical_model(0.5, None)[0] < 0.70


@pytest.mark.slow
def test_free_field_tuning(tmp_path, capsys):
    """L = 8 free field, started off the answer: beta within 3 sigma of 0.4, sensible error."""
    argv = ["--L", str(L_FF), "--lam", "0", "--L-over-xi", f"{TARGET_FF:.6f}", "--beta0", "0.37",
            "--replicas", "32", "--trajectories", "600", "--thermalization", "100",
            "--work", str(tmp_path / "work"), "--json", "--write", str(tmp_path / "lcp.json")]
    assert tune.main(argv) == 0
    r = json.loads(capsys.readouterr().out)
    assert {"L", "beta", "beta_error", "xi"} <= set(r)
    assert r["L"] == L_FF and r["converged"]
    assert 0 < r["beta_error"] < 0.01, r  # 0.01 in beta moves xi by ~5 %: a useful error
    assert abs(r["beta"] - BETA_FF) < 3 * r["beta_error"], (r["beta"], r["beta_error"])
    assert r["xi"] == pytest.approx(XI_FF, rel=1e-5)
    assert len(r["points"]) >= 3 and r["fit"]["bracketed"]
    assert all(p["acceptance"] > 0.8 for p in r["points"])
    # written, and readable back
    assert tune.beta_lcp(L_FF, tmp_path / "lcp.json", L_over_xi=round(TARGET_FF, 6), lam=0) \
        == pytest.approx(r["beta"])
    # a second call reuses every run directory and gives the same answer
    assert tune.main(argv) == 0
    r2 = json.loads(capsys.readouterr().out)
    assert r2["beta"] == r["beta"] and all(p["reused"] for p in r2["points"])


def _entry(L, beta, err=0.001, target=4.0, lam=0.5, kind="xi"):
    return {"L": L, "beta": beta, "beta_error": err, "xi": L / target, "xi_error": 0.01,
            "L_over_xi_target": target, "lambda": lam, "xi_kind": kind,
            "runs": {"replicas": 64, "trajectories": 2000}, "hpcflow_version": "test",
            "date": "2026-01-01T00:00:00Z"}


def test_lcp_round_trip_and_beta_coarse(tmp_path):
    path = tmp_path / "results" / "lcp.json"
    with pytest.raises(KeyError, match="L = 8"):
        tune.beta_lcp(8, path)
    tune.write_lcp(_entry(16, 0.634), path)
    tune.write_lcp(_entry(8, 0.577), path)
    tune.write_lcp(_entry(8, 0.576, 0.002), path)          # replaces L = 8
    tune.write_lcp(_entry(8, 0.45, target=8.0), path)       # another line: kept apart
    data = json.loads(path.read_text())
    assert [e["L"] for e in data if e["L_over_xi_target"] == 4.0] == [8, 16]
    assert len(data) == 3
    assert tune.beta_lcp(8, path) == 0.576
    assert tune.beta_lcp(8, path, error=True) == (0.576, 0.002)
    assert tune.beta_lcp(8, path, L_over_xi=8.0) == 0.45
    assert tune.beta_coarse(16, path) == 0.576
    with pytest.raises(KeyError, match=r"no tuned point for L = 32.*hpcflow.tune --L 32"):
        tune.beta_coarse(64, path)
    with pytest.raises(ValueError, match="even"):
        tune.beta_coarse(15, path)


@pytest.mark.parametrize("argv, message", [
    (["--L", "2"], "--L must be >= 4"),
    (["--L", "-9"], "--L must be >= 4"),
    (["--L", "8", "--L-over-xi", "0"], "--L-over-xi must be > 0"),
    (["--L", "8", "--L-over-xi", "-4"], "--L-over-xi must be > 0"),
    (["--L", "8", "--lam", "0.3"], "give --beta0"),
    (["--L", "8", "--replicas", "0"], "must be positive"),
])
def test_bad_input_exits_2(tmp_path, capsys, argv, message):
    work = tmp_path / "work"
    assert tune.main([*argv, "--work", str(work)]) == 2
    assert message in capsys.readouterr().err
    assert not work.exists()  # nothing run, nothing written


def test_bad_input_command_line(tmp_path):
    """The module entry point itself exits 2 with the message."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "hpcflow.tune", "--L", "3"], capture_output=True,
                       text=True, cwd=tmp_path)
    assert p.returncode == 2 and "--L must be >= 4" in p.stderr
