"""The slow-mode scale c_M and the cost records of the ensemble files (PHYSICS.md 5.1).

FHMC here runs over the linear generator phi = g(z) = z / c (a module with ``inverse``,
so :class:`hpcflow.action.FlowedAction` takes its autograd force): M_z = c M on every
configuration, so c_M = std(M_z) / std(M) = c exactly, whatever the chain does.
"""

import json
import math

import h5py
import numpy as np
import pytest
import torch

from conftest import write_input
from hpcflow import analysis, config, run, study
from hpcflow.action import FlowedAction, Phi4Action
from hpcflow.production import ChainSpec, produce

C = 0.7


class Scale(torch.nn.Module):
    """phi = z / c, log|det dg/dz| = -V log c."""

    def __init__(self, c):
        super().__init__()
        self.c = c

    def inverse(self, z):
        V = z[0].numel()
        return z / self.c, torch.full((z.shape[0],), -V * math.log(self.c), dtype=z.dtype)


def world():
    from mpi4py import MPI

    from hpcflow.parallel import make_world

    return make_world("cpu", 1, MPI.COMM_SELF)


def scaled_fhmc(path_ini, c=C, **kw):
    """The FHMC production of the input at ``path_ini`` over phi = z / c -> out/fhmc.h5."""
    cfg = config.load(path_ini)
    action = FlowedAction(Phi4Action(cfg.theory.beta, cfg.theory.lam), Scale(c))
    spec = ChainSpec("fhmc", "fhmc", action, "fhmc", to_physical=action.to_physical,
                     attrs={"generator_scale": c})
    return produce(cfg, world(), cfg.hmc, spec, cfg.output / "fhmc.h5", **kw)


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    d = tmp_path_factory.mktemp("cost")
    path = write_input(d, stages="hmc", L=6, replicas=4, trajectories=120, thermalization=10,
                       steps=6, integrator="omf2", save_every=0, checkpoint_every=50)
    assert run.main([str(path)]) == 0
    assert scaled_fhmc(path) == "done"
    results = {r["json"]["algorithm"]: r["json"] for r in analysis.run(d / "out", write=False)}
    return d, results


def test_c_M_is_exactly_one_for_hmc(both):
    _, js = both
    assert js["hmc"]["c_M"] == {"value": 1.0, "error": 0.0}
    assert "Mz" not in js["hmc"]["observables"]


def test_c_M_of_a_linear_generator_is_its_scale(both):
    d, js = both
    with h5py.File(d / "out" / "fhmc.h5", "r") as f:
        np.testing.assert_allclose(f["observables/Mz"][()], C * f["observables/M"][()], rtol=1e-12)
    c_M = js["fhmc"]["c_M"]
    assert c_M["value"] == pytest.approx(C, rel=1e-10)
    assert c_M["error"] < 1e-8  # the ratio does not fluctuate
    assert js["fhmc"]["observables"]["Mz"]["value"] == pytest.approx(
        C * js["fhmc"]["observables"]["M"]["value"], rel=1e-10)


def test_cost_entry(both):
    _, js = both
    for j in js.values():
        c = j["cost"]
        assert c["ranks"] == 1 and c["segments"] == 1 and c["device"].startswith("cpu")
        assert c["trajectories"] == 130 and c["timed_trajectories"] == 130
        assert c["wall_seconds"] > 0 and c["rank_seconds"] == pytest.approx(c["wall_seconds"])
        assert c["seconds_per_trajectory_per_replica"] == pytest.approx(
            c["wall_seconds"] * c["ranks"] / (130 * 4))
        assert c["forces_per_trajectory"] == 6 * 2 + 1  # omf2: two merged-kick forces a step
        assert "input" in j and "[hmc]" in j["input"] and j["schema"] == analysis.SCHEMA


def test_files_without_Mz_and_cost_still_analyse(both, tmp_path):
    d, _ = both
    old = tmp_path / "hmc.h5"
    old.write_bytes((d / "out" / "hmc.h5").read_bytes())
    with h5py.File(old, "r+") as f:  # as written before these datasets existed
        del f["observables/Mz"], f["cost"]
    js = analysis.run(old, write=False)[0]["json"]
    assert js["c_M"] == {"value": None, "error": None} and js["cost"] is None
    row = study.row_from_analysis(js, str(tmp_path))
    study.add_costs(row, study.ForceBench(), bench=True)
    assert row["cost"]["forces_per_trajectory"] == 13 and row["cost"]["force_cost"] == 1.0
    assert row["cost"]["cost_hmc_forces"] == pytest.approx(13 * row["tau_int"]["value"])
    assert row["cost"]["seconds_per_independent_sample"] is None
    assert "n/a" in analysis.table([{"json": js}])


def test_an_old_file_resumed_gains_cost_and_Mz(tmp_path, monkeypatch):
    """A file begun before /cost and /observables/Mz existed, resumed by this version:
    the datasets are added, the timing covers the resumed trajectories only, and c_M is
    not reported from an Mz with unmeasured rows."""
    from hpcflow import production

    path = write_input(tmp_path, stages="hmc", trajectories=30, thermalization=5,
                       checkpoint_every=10, save_every=0)
    real = production._flush
    calls = {"n": 0}

    def flush_then_die(*args):
        real(*args)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(production, "_flush", flush_then_die)
    with pytest.raises(KeyboardInterrupt):
        run.main([str(path)])
    h5 = tmp_path / "out" / "hmc.h5"
    with h5py.File(h5, "r+") as f:
        del f["observables/Mz"], f["cost"]
    monkeypatch.setattr(production, "_flush", real)
    assert run.main([str(path)]) == 0
    with h5py.File(h5, "r") as f:
        assert f["cost/first_trajectory"][0] == 20 and f["cost/segments"][0] == 1
        assert np.isnan(f["observables/Mz"][:, :15]).all()
        np.testing.assert_array_equal(f["observables/Mz"][:, 15:], f["observables/M"][:, 15:])
    js = analysis.run(h5, write=False)[0]["json"]
    assert js["c_M"]["value"] is None
    c = js["cost"]
    assert c["trajectories"] == 35 and c["timed_trajectories"] == 15
    assert c["seconds_per_trajectory_per_replica"] == pytest.approx(c["rank_seconds"] / (15 * 2))


def test_study_rows_hmc_controls_and_ratio(both, tmp_path, capsys):
    """HMC at tau = 1 is the reference (ratio 1); a tau = 2 control and the FHMC row get
    their ratios; the FHMC row with other steps is marked; CSV and JSON rows."""
    d, _ = both
    ctl = tmp_path / "tau2"
    ctl.mkdir()
    path = write_input(ctl, name="tau2", stages="hmc", L=6, replicas=4, trajectories=120,
                       thermalization=10, steps=12, integrator="omf2", save_every=0)
    path.write_text(path.read_text().replace("length = 1.0", "length = 2.0"))
    assert run.main([str(path)]) == 0
    capsys.readouterr()
    assert study.main([str(d / "out"), str(ctl / "out"), "--no-bench", "--json",
                       str(tmp_path / "s.json"), "--csv", str(tmp_path / "s.csv")]) == 0
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "s.json").read_text())
    assert [(r["algorithm"], r["length"]) for r in rows] == [("hmc", 1.0), ("hmc", 2.0), ("fhmc", 1.0)]
    ref, tau2, fhmc = rows
    assert ref["ratio"] == {"value": 1.0, "error": 0.0}
    for r in (tau2, fhmc):
        a, b = ref["tau_int"], r["tau_int"]
        assert r["ratio"]["value"] == pytest.approx(a["value"] / b["value"])
        assert r["ratio"]["error"] == pytest.approx(
            a["value"] / b["value"] * math.hypot(a["error"] / a["value"], b["error"] / b["value"]))
        assert r["ratio_reference"] == ref["file"]
    for r in rows:
        assert set(r) >= {"L", "beta", "xi", "algorithm", "prior", "kernel_size", "length",
                          "steps", "acceptance", "tau_int", "ratio", "c_M", "cost", "input"}
        assert r["input"] and r["cost"]["seconds_per_independent_sample"] == pytest.approx(
            2 * r["tau_int"]["value"] * r["cost"]["seconds_per_trajectory_per_replica"])
    assert tau2["cost"]["forces_per_trajectory"] == 25 and tau2["c_M"]["value"] == 1.0
    assert fhmc["c_M"]["value"] == pytest.approx(C)
    assert fhmc["cost"]["force_cost"] is None  # --no-bench (and no flow file here)
    assert "HMC tau=2" in out and "xi = " in out
    header = (tmp_path / "s.csv").read_text().splitlines()[0].split(",")
    assert {"tau_int_value", "ratio_error", "c_M_value", "cost_force_cost",
            "cost_seconds_per_independent_sample"} <= set(header) and "input" not in header


def test_force_bench_times_both_alternately():
    """paired_ratio calibrates each callable, then times them in turn in every repeat."""
    calls = []
    ratio, t_a, t_b = study.paired_ratio(lambda: calls.append("a"), lambda: calls.append("b"),
                                         repeats=3, min_seconds=0.002)
    assert ratio > 0 and t_a > 0 and t_b > 0 and np.isfinite(ratio)
    runs = [k for i, k in enumerate(calls) if i == 0 or calls[i - 1] != k]
    assert runs[-6:] == ["a", "b"] * 3   # after calibration: a-block, b-block, three times


def test_paren_format():
    assert study.paren(61.34, 2.9) == "61.3(29)"
    assert study.paren(0.6123, 0.0153) == "0.612(15)"
    assert study.paren(76.2, 14.1) == "76(14)"
    assert study.paren(1.0, 0.0) == "1" and study.paren(None, None) == "-"
