"""Scans (hpcflow.scan): the scan file, the plan and manifest, the local runner, resume,
failures that block only their dependants, the analysis and the z fit."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpcflow import config as config_mod
from hpcflow import scan, study

#: A tiny scan: L = 4, 6, 8 with given couplings (no tuned line needed), HMC at tau = 1 and
#: 2, FHMC from a Gaussian (k = 3) everywhere and from the coarse bigger volume at L = 8.
TINY = """
[scan]
name = tiny
output = {out}
seed = 11
L = 4, 6, 8
lcp = {lcp}
beta = 4:0.45, 6:0.53, 8:0.577
coarse_beta = 4:0.3

[algorithms]
hmc_lengths = 2
fhmc = gaussian:3, coarse-volume:3@4

[md]
steps = 6

[statistics]
trajectories = 120
thermalization_taus = 0
min_thermalization = 20
replicas = 4

[run]
checkpoint_every = 40
device = cpu

[train]
iterations = 8
batch_size = 16
metropolis = 32

[coarse]
replicas = 4
samples = 32
eval_samples = 32
pilot = 60
thermalization = 20
"""


def tiny_scan(tmp_path, name="tiny", **replace) -> "Path":
    text = TINY.format(out=tmp_path / name, lcp=tmp_path / "no-lcp.json")
    for old, new in replace.items():
        text = text.replace(old, new)
    path = tmp_path / f"{name}.ini"
    path.write_text(text)
    return path


def test_plan_jobs_dependencies_and_inputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    manifest, jobs = scan.make(tiny_scan(tmp_path), quiet=True)
    keys = [j.key for j in jobs]
    assert keys[0] == "L4-coarse-volume"  # dependencies first, point by point
    assert keys.index("L4-volume-k3") < keys.index("L6-hmc")
    assert set(keys) == {"L4-coarse-volume", "L4-hmc", "L4-hmc-tau2", "L6-hmc", "L6-hmc-tau2",
                         "L8-hmc", "L8-hmc-tau2", "L4-gaussian-k3-train", "L6-gaussian-k3-train",
                         "L8-gaussian-k3-train", "L4-volume-k3-train", "L4-gaussian-k3",
                         "L6-gaussian-k3", "L8-gaussian-k3", "L4-volume-k3"}
    base, entries = scan.read_manifest(manifest)
    assert base == tmp_path
    by_key = {e.key: e for e in entries}
    assert [entries[i].key for i in by_key["L4-volume-k3-train"].after] == ["L4-coarse-volume"]
    assert [entries[i].key for i in by_key["L4-volume-k3"].after] == ["L4-volume-k3-train"]
    assert by_key["L4-hmc"].after == [] and by_key["L4-gaussian-k3-train"].after == []
    for e in entries:  # every job an ordinary, valid input
        cfg = config_mod.load(base / e.input)
        assert cfg.run.name == e.key.removesuffix("-train")  # training and production: one run
    hmc2 = config_mod.load(base / by_key["L6-hmc-tau2"].input)
    assert (hmc2.hmc.length, hmc2.hmc.steps, hmc2.theory.beta) == (2.0, 12, 0.53)  # same eps
    train = config_mod.load(base / by_key["L4-volume-k3-train"].input)
    prod = config_mod.load(base / by_key["L4-volume-k3"].input)
    coarse = config_mod.load(base / by_key["L4-coarse-volume"].input)
    assert train.run.stages == ("train",) and prod.run.stages == ("fhmc", "analysis")
    assert train.coarse == prod.coarse == coarse.coarse  # one coarse file, one identity
    assert (coarse.coarse.L, coarse.coarse.beta) == (4, 0.3)
    assert train.output == prod.output  # the production finds the trained flow
    # stable seeds, different per job
    seeds = {config_mod.load(base / e.input).run.seed for e in entries}
    assert len(seeds) == len({e.key.removesuffix("-train") for e in entries})
    _, again = scan.make(tiny_scan(tmp_path), quiet=True)
    assert [j.text for j in again] == [j.text for j in jobs]


def test_steps_rule_and_statistics_estimate(tmp_path):
    md = scan.MDSection(length=1.0, steps=10, steps_rule="sqrt-L", steps_L=16)
    assert scan.steps_at(md, 16, 1.0) == 10 and scan.steps_at(md, 64, 1.0) == 20
    assert scan.steps_at(md, 16, 2.0) == 20
    s = scan.load_scan(tiny_scan(tmp_path, **{"trajectories = 120": "target = 0.1"}))
    tau = scan.tau_estimate(s, 16, 1.0, None)
    assert math.isclose(tau, 77.0)  # the L = 16 study's HMC (xi = 4)
    assert math.isclose(scan.tau_estimate(s, 32, 1.0, None), 4 * 77.0)
    assert math.isclose(scan.tau_estimate(s, 16, 1.0, "coarse-interleave"), 77.0 / 2.4)
    n, therm = scan.statistics_for(s, tau)
    # N R = 40 tau / target^2 at R = 4 replicas: 40 * 77 / 0.01 / 4 = 77000
    assert n == 77000 and therm == 20  # [statistics] min_thermalization of the tiny scan


@pytest.mark.parametrize("replace, where", [
    ({"steps = 6": "steps = 6\nstep = 3"}, "[md] step: unknown key"),
    ({"[algorithms]": "[algorithm]"}, "[algorithm]: unknown section"),
    ({"coarse-volume:3@4": "coarse-interleave:3@4"}, "[scan] L: L = 4"),  # the control: fine
    ({"L = 4, 6, 8": "L = 4, 7", "fhmc = gaussian:3, coarse-volume:3@4": "fhmc = coarse-interleave:3"},
     "[scan] L: L = 7 is odd"),
    ({"beta = 4:0.45, 6:0.53, 8:0.577": "beta = 4:0.45, 8:0.577"}, "[scan] beta: point L = 6: no beta"),
    ({"fhmc = gaussian:3,": "fhmc = gaussian:4,"}, "[algorithms] fhmc: 'gaussian:4': kernel_size must be odd"),
    ({"fhmc = gaussian:3,": "fhmc = flat:3,"}, "[algorithms] fhmc: 'flat:3'"),
    ({"fhmc = gaussian:3,": "fhmc = gaussian:7,"}, "[algorithms] fhmc: kernel_size 7 exceeds L = 4"),
    ({"[train]": "[train]\nlr = fast"}, "[train] lr: expected a finite number"),
    ({"[coarse]": "[coarse]\nL = 4"}, "[coarse] L: is set by the scan"),
    ({"replicas = 4\n\n[run]": "replicas = 0\n\n[run]"}, "[statistics] replicas: must be > 0"),
    ({"[statistics]": "[statistics]\nreplicas = 5"}, "[statistics] replicas: key appears twice"),
])
def test_bad_scan_file_exits_2_and_writes_nothing(tmp_path, monkeypatch, capsys, replace, where):
    monkeypatch.chdir(tmp_path)
    path = tiny_scan(tmp_path, **replace)
    rc = scan.main(["make", str(path)])
    err = capsys.readouterr().err
    if where == "[scan] L: L = 4":  # the control: the interleave at even L is fine
        assert rc == 0
        return
    assert rc == 2, err
    assert f"{path}: {where}" in err, err
    assert not (tmp_path / "tiny").exists()


def test_manifest_pointing_to_a_missing_input_starts_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    manifest, _ = scan.make(tiny_scan(tmp_path), quiet=True)
    (tmp_path / "tiny" / "inputs" / "L6-hmc.ini").unlink()
    calls = tmp_path / "sbatch-calls"
    fake = tmp_path / "sbatch"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\necho 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:" + __import__("os").environ["PATH"])
    for argv in (["check", str(manifest)], ["submit", str(manifest), "--script", "x.sbatch"]):
        assert scan.main(argv) == 2
        assert "job L6-hmc: input" in capsys.readouterr().err
    assert not calls.exists()
    p = subprocess.run(["bash", str(scan_script()), str(manifest)], capture_output=True, text=True,
                       env={**__import__("os").environ, "HPCFLOW_VENV": sys.prefix})
    assert p.returncode == 2 and "does not exist" in p.stderr and not calls.exists()


def scan_script():
    from conftest import REPO
    return REPO / "jobs" / "scan.sbatch"


def test_submit_groups_by_dependency(tmp_path, monkeypatch):
    """Independent jobs go into one array; a dependant waits for exactly its tasks."""
    monkeypatch.chdir(tmp_path)
    manifest, jobs = scan.make(tiny_scan(tmp_path), quiet=True)
    arrays = scan.submit(manifest, "jobs/scan.sbatch", throttle=3, dry_run=True)
    base, entries = scan.read_manifest(manifest)
    first = arrays[0]
    assert first["after"] == [] and "%3" in " ".join(first["argv"])
    assert sorted(i for a in arrays for i in a["indices"]) == list(range(len(entries)))
    for a in arrays:
        for i in a["indices"]:
            assert sorted(entries[i].after) == a["after"]
        if a["after"]:
            dep = next(x for x in a["argv"] if x.startswith("--dependency="))
            assert dep == "--dependency=afterok:" + ":".join(
                f"{next(b['job_id'] for b in arrays if d in b['indices'])}_{d}" for d in a["after"])
    assert scan._ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"


@pytest.fixture(scope="module")
def finished_scan(tmp_path_factory):
    """The tiny scan, run to the end by the local runner (one rank)."""
    from mpi4py import MPI

    tmp = tmp_path_factory.mktemp("scan")
    path = tiny_scan(tmp)
    cwd = __import__("os").getcwd()
    __import__("os").chdir(tmp)
    try:
        rc = scan.run_scan(path, comm=MPI.COMM_WORLD, quiet=True)
    finally:
        __import__("os").chdir(cwd)
    return tmp, path, rc


def test_only_selects_the_matching_jobs_and_what_they_wait_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    manifest, _ = scan.make(tiny_scan(tmp_path), quiet=True)
    _, entries = scan.read_manifest(manifest)
    keys = lambda only: [e.key for e in scan.select_entries(entries, only)]  # noqa: E731
    assert keys([]) == [e.key for e in entries]
    assert keys(["L4-volume-k3"]) == ["L4-coarse-volume", "L4-volume-k3-train", "L4-volume-k3"]
    assert keys(["L6-*"]) == [e.key for e in entries if e.key.startswith("L6-")]
    assert keys(["L8-hmc*", "L6-hmc"]) == ["L6-hmc", "L8-hmc", "L8-hmc-tau2"]
    with pytest.raises(ValueError, match="L12-"):
        scan.select_entries(entries, ["L4-*", "L12-*"])


def test_local_runner_starts_every_job_with_fresh_compile_caches(tmp_path, monkeypatch):
    """scan run empties dynamo's caches (fused.new_job) before each job it runs, so a long
    scan in one process never reaches the recompile limit (test_fused checks new_job)."""
    from mpi4py import MPI

    from hpcflow import fused
    from hpcflow import run as run_mod

    monkeypatch.chdir(tmp_path)
    path = tiny_scan(tmp_path)
    calls = []
    monkeypatch.setattr(fused, "new_job", lambda: calls.append("new_job"))
    monkeypatch.setattr(run_mod, "main", lambda argv, comm=None: calls.append(argv[0]) or 0)
    assert scan.run_scan(path, comm=MPI.COMM_WORLD, quiet=True) == 0
    _, entries = scan.read_manifest(tmp_path / "tiny" / "manifest.tsv")
    assert [Path(p).name for p in calls[1::2]] == [Path(e.input).name for e in entries]
    assert calls[0::2] == ["new_job"] * len(entries)


def test_only_with_no_matching_job_exits_2_and_runs_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = tiny_scan(tmp_path)
    assert scan.main(["run", str(path), "--only", "L12-*"]) == 2
    assert "L12-*: no job of the manifest matches" in capsys.readouterr().err
    assert not (tmp_path / "tiny" / "runs").exists()


@pytest.mark.slow
def test_local_runner_runs_every_job_then_skips(finished_scan, monkeypatch, caplog):
    from mpi4py import MPI

    tmp, path, rc = finished_scan
    assert rc == 0
    out = tmp / "tiny"
    for name in ("L4-hmc", "L8-hmc-tau2", "L8-gaussian-k3", "L4-volume-k3"):
        run = out / "runs" / name
        assert (run / "analysis.json").exists()
    assert (out / "coarse" / "coarse-L4-b0.300000.h5").exists()
    monkeypatch.chdir(tmp)
    with caplog.at_level("INFO", logger="hpcflow"):
        assert scan.run_scan(path, comm=MPI.COMM_WORLD) == 0
    assert caplog.text.count("complete, skipped") == 15
    caplog.clear()
    with caplog.at_level("INFO", logger="hpcflow"):
        assert scan.run_scan(path, comm=MPI.COMM_WORLD, only=["L4-volume-k3"]) == 0
    assert caplog.text.count("complete, skipped") == 3


@pytest.mark.slow
def test_interrupted_scan_finishes_the_missing_jobs_only(finished_scan, tmp_path):
    """Kill the runner inside its 4th job (L4-gaussian-k3-train, the scan's first training,
    with its flow file written beside the result but not yet renamed onto it); the rerun
    skips the first three, redoes the 4th and gives the same measurements as the
    uninterrupted scan (seeds depend on the job, not the directory).

    The kill is a fault-injection point, not a signal on seeing the job's log line: that
    job takes well under a second, and a polling kill (stop 23's CI) sometimes came after
    it had finished."""
    from hpcflow import store

    ref_dir = finished_scan[0] / "tiny"
    path = tiny_scan(tmp_path)
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "hpcflow.scan", "run", str(path)], cwd=tmp_path,
                       capture_output=True, text=True, env={**env, "HPCFLOW_TEST_KILL": "flow-tmp"})
    first = p.stdout + p.stderr
    assert p.returncode == store.KILLED_STATUS, first
    assert "4/15 L4-gaussian-k3-train: running" in first and "5/15" not in first
    assert "3/15 L4-hmc-tau2: done" in first
    train_dir = tmp_path / "tiny" / "runs" / "L4-gaussian-k3"
    assert [f.name for f in train_dir.glob("flow.pt*")] == ["flow.pt.tmp"]
    p = subprocess.run([sys.executable, "-m", "hpcflow.scan", "run", str(path)], cwd=tmp_path,
                       capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("complete, skipped") == 3
    for run in sorted((ref_dir / "runs").iterdir()):
        for name in ("hmc.h5", "fhmc.h5"):
            if (run / name).exists():
                with h5py.File(run / name) as a, h5py.File(tmp_path / "tiny" / "runs" / run.name / name) as b:
                    assert np.array_equal(a["observables/M"][()], b["observables/M"][()]), run.name


@pytest.mark.slow
def test_failed_job_blocks_only_its_dependants(tmp_path, monkeypatch, caplog):
    from mpi4py import MPI

    monkeypatch.chdir(tmp_path)
    path = tiny_scan(tmp_path, **{"L = 4, 6, 8": "L = 4", "hmc_lengths = 2": "hmc_lengths ="})
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "coarse").write_text("a file where the coarse directory goes\n")
    with caplog.at_level("INFO", logger="hpcflow"):
        assert scan.run_scan(path, comm=MPI.COMM_WORLD, quiet=True) == 1
    assert "L4-coarse-volume: FAILED" in caplog.text
    assert "L4-volume-k3-train: not started" in caplog.text
    assert "L4-volume-k3: not started" in caplog.text
    for done in ("L4-hmc", "L4-gaussian-k3"):
        assert (tmp_path / "tiny" / "runs" / done / "analysis.json").exists()
    assert not (tmp_path / "tiny" / "runs" / "L4-volume-k3" / "fhmc.h5").exists()
    result = scan.collect_scan(tmp_path / "tiny")
    assert result["missing"] == ["L4-volume-k3"]  # marked, not dropped
    row = next(r for r in result["rows"] if r["job"] == "L4-volume-k3")
    assert row["status"] == "missing" and row["tau_int"]["value"] is None


@pytest.mark.slow
def test_analyse_table_json_figure(finished_scan, tmp_path):
    tmp, _, _ = finished_scan
    js, png, csv = tmp_path / "scan.json", tmp_path / "scan.png", tmp_path / "scan.csv"
    p = subprocess.run([sys.executable, "-m", "hpcflow.scan", "analyse", str(tmp / "tiny"),
                        "--json", str(js), "--png", str(png), "--csv", str(csv)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    result = json.loads(js.read_text())
    assert not result["missing"] and not result["partial"]
    rows = result["rows"]
    assert len(rows) == 10 and all(r["status"] == "complete" for r in rows)  # 3 L x 3 + L4 volume
    ref = next(r for r in rows if r["job"] == "L6-hmc")
    assert ref["ratio"] == {"value": 1.0, "error": 0.0}
    g = next(r for r in rows if r["job"] == "L6-gaussian-k3")
    assert math.isclose(g["ratio"]["value"], ref["tau_int"]["value"] / g["tau_int"]["value"])
    for key in ("L", "beta", "xi", "algorithm", "prior", "kernel_size", "length", "steps",
                "acceptance", "tau_int", "ratio", "c_M", "cost"):
        assert key in g
    assert g["cost"]["train_rank_seconds_per_independent_sample"] > 0
    labels = {f["label"]: f for f in result["fits"]}
    assert {"HMC", "HMC tau=2", "FHMC gaussian k=3"} <= set(labels)
    assert labels["HMC"]["n"] == 3 and labels["FHMC gaussian k=3"]["ratio_fit"] is not None
    assert png.stat().st_size > 10_000 and csv.read_text().count("\n") == 11
    assert "z = " in p.stdout


@pytest.mark.slow
def test_analyse_takes_points_without_runs_from_an_earlier_analysis(finished_scan, tmp_path,
                                                                   monkeypatch, capsys):
    """The finished scan's analysis fills the same scan in another directory, where no job
    has run: every point comes back whole with its source, the same fits; a point with a
    run here is not replaced; a changed job or another scan is refused with exit 2."""
    tmp, _, _ = finished_scan
    earlier = tmp_path / "earlier.json"
    old = scan.collect_scan(tmp / "tiny")
    earlier.write_text(json.dumps(old))
    monkeypatch.chdir(tmp_path)
    scan.make(tiny_scan(tmp_path), quiet=True)
    empty = scan.collect_scan(tmp_path / "tiny")
    assert len(empty["missing"]) == 10
    got = scan.collect_scan(tmp_path / "tiny", earlier=[earlier])
    assert not got["missing"] and got["earlier"] == [str(earlier)]
    assert {r["job"] for r in got["rows"]} == {r["job"] for r in old["rows"]}
    assert all(r["source"] == str(earlier) for r in got["rows"])
    assert [(f["label"], f["z"]) for f in got["fits"]] == [(f["label"], f["z"]) for f in old["fits"]]
    assert "from the earlier analysis" in scan.scan_table(got)
    here = scan.collect_scan(tmp / "tiny", earlier=[earlier])
    assert not here["earlier"] and not any("source" in r for r in here["rows"])

    partial = json.loads(json.dumps(old))
    partial["rows"] = [r for r in partial["rows"] if r["L"] != 6]
    for r in partial["rows"]:
        if r["L"] == 4:
            r["L"], r["tau_int"] = 6, {"value": 1.0, "error": 0.1}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(partial))
    with pytest.raises(config_mod.ConfigError, match="L differ from the plan"):
        scan.collect_scan(tmp_path / "tiny", earlier=[bad])
    other = json.loads(json.dumps(old)) | {"scan": "another"}
    bad.write_text(json.dumps(other))
    assert scan.main(["analyse", str(tmp_path / "tiny"), "--earlier", str(bad)]) == 2
    assert "an analysis of scan 'another'" in capsys.readouterr().err


@pytest.mark.slow
def test_analyse_fills_single_jobs_from_an_earlier_analysis(finished_scan, tmp_path, monkeypatch):
    """Job by job: with only L6-gaussian-k3 run here, the earlier analysis fills the other
    jobs (with their source), the job here is kept, and its ratio is recomputed against the
    earlier HMC reference of its point (the rescaling control too)."""
    tmp, _, _ = finished_scan
    old = scan.collect_scan(tmp / "tiny")
    here_tau = next(r for r in old["rows"] if r["job"] == "L6-gaussian-k3")["tau_int"]
    for r in old["rows"]:
        if r["job"] == "L6-hmc":
            r["tau_int"] = {"value": 2 * r["tau_int"]["value"], "error": 2 * r["tau_int"]["error"]}
            ref_tau = r["tau_int"]
        if r["job"] == "L6-gaussian-k3":
            r["tau_int"] = {"value": 1e6, "error": 1.0}  # must not replace the run here
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps(old))
    monkeypatch.chdir(tmp_path)
    scan.make(tiny_scan(tmp_path), quiet=True)
    shutil.copytree(tmp / "tiny" / "runs" / "L6-gaussian-k3", tmp_path / "tiny" / "runs" / "L6-gaussian-k3")
    got = scan.collect_scan(tmp_path / "tiny", earlier=[earlier])
    assert not got["missing"] and got["earlier"] == [str(earlier)]
    rows = {r["job"]: r for r in got["rows"]}
    assert set(rows) == {r["job"] for r in old["rows"]}
    g = rows["L6-gaussian-k3"]
    assert "source" not in g and g["tau_int"] == here_tau
    assert all(r["source"] == str(earlier) for k, r in rows.items() if k != "L6-gaussian-k3")
    want = study.tau_ratio({"tau_int": ref_tau}, g)
    assert g["ratio"] == want and math.isclose(want["value"], ref_tau["value"] / here_tau["value"])
    assert g["ratio_reference"] == rows["L6-hmc"]["file"]
    assert rows["L6-hmc"]["ratio"] == {"value": 1.0, "error": 0.0}
    eq = study.hmc_at_length([r for r in got["rows"]], g, g["length"] / g["c_M"]["value"])
    assert g["hmc_equivalent"] == eq
    assert rows["L4-gaussian-k3"]["ratio"] == next(r for r in old["rows"] if r["job"] == "L4-gaussian-k3")["ratio"]


def test_fit_power_on_synthetic_data():
    """tau = A xi^z with 3 % Gaussian noise: z within 3 sigma of the truth over many draws,
    and the error estimate itself honest (pull width near 1)."""
    rng = np.random.default_rng(3)
    xi = np.array([2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0])
    pulls = []
    for _ in range(200):
        tau = 5.0 * xi**2.1
        noisy = tau * (1 + 0.03 * rng.standard_normal(xi.size))
        fit = scan.fit_power(xi, noisy, 0.03 * tau)
        pulls.append((fit["z"] - 2.1) / fit["z_error"])
    pulls = np.array(pulls)
    assert abs(pulls.mean()) < 3 / np.sqrt(len(pulls)) * 1.5
    assert 0.8 < pulls.std() < 1.3
    exact = scan.fit_power(xi, 5.0 * xi**2.1, 0.03 * 5.0 * xi**2.1)
    assert math.isclose(exact["z"], 2.1, rel_tol=1e-12) and math.isclose(exact["A"], 5.0, rel_tol=1e-12)
    assert exact["dof"] == 5 and exact["chi2"] < 1e-20
    two = scan.fit_power([2.0, 4.0], [10.0, 40.0], [1.0, 4.0])  # z = 2 +- sqrt(2) 0.1 / ln 2
    assert math.isclose(two["z"], 2.0) and math.isclose(two["z_error"], math.sqrt(0.02) / math.log(2))
    assert scan.fit_power([2.0], [10.0], [1.0]) is None
    # an xi error enlarges the error of z (effective variance)
    assert scan.fit_power(xi, 5.0 * xi**2.1, 0.03 * 5.0 * xi**2.1, 0.02 * xi)["z_error"] > exact["z_error"]


@pytest.mark.slow
def test_refine_lengthens_a_production_and_continues_its_chains(tmp_path, monkeypatch):
    """A finished HMC point that missed the target error is lengthened by ``refine``
    (N' = 1.1 N (e / target)^2, at most 8 N); the next run continues the same chains, so the
    first N measurements are the old ones bit for bit."""
    from mpi4py import MPI

    monkeypatch.chdir(tmp_path)
    path = tiny_scan(tmp_path, **{"L = 4, 6, 8": "L = 4", "hmc_lengths = 2": "hmc_lengths =",
                                  "fhmc = gaussian:3, coarse-volume:3@4": "fhmc =",
                                  "trajectories = 120": "trajectories = 120\ntarget = 0.05"})
    assert scan.run_scan(path, comm=MPI.COMM_WORLD, quiet=True) == 0
    ens = tmp_path / "tiny" / "runs" / "L4-hmc" / "hmc.h5"
    with h5py.File(ens) as f:
        before = f["observables/M"][()]
    n = before.shape[1]
    assert n == 120
    js = json.loads(ens.with_name("analysis.json").read_text())
    err = js["observables"]["M"]["tau_int_error"] / js["observables"]["M"]["tau_int"]
    assert err > 0.05  # 4 x 120 trajectories cannot reach 5 %
    now = scan.refine(path, quiet=True)
    want = min(math.ceil(1.1 * n * (err / 0.05) ** 2), 8 * n)
    want = int(math.ceil(want / 100) * 100)
    assert now["L4-hmc"] == {"trajectories": want, "from": n, "error": pytest.approx(err)}
    assert f"trajectories = {want}" in (tmp_path / "tiny" / "inputs" / "L4-hmc.ini").read_text()
    scan.make(path, quiet=True)  # a later make keeps the refined length
    assert f"trajectories = {want}" in (tmp_path / "tiny" / "inputs" / "L4-hmc.ini").read_text()
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps(scan.collect_scan(tmp_path / "tiny")))  # before the extension
    assert scan.run_scan(path, comm=MPI.COMM_WORLD, quiet=True) == 0
    with h5py.File(ens) as f:
        after = f["observables/M"][()]
    assert after.shape[1] == want and np.array_equal(after[:, :n], before)

    # The run directories gone (another allocation): the earlier analysis stands in for the
    # job, refine lengthens it the same way, and the production, restarted at the longer
    # length, is the extended chain bit for bit.
    shutil.rmtree(tmp_path / "tiny")
    assert scan.refine(path, quiet=True) == {}  # nothing here to refine without --earlier
    again = scan.refine(path, quiet=True, earlier=[earlier])
    assert again == now
    assert scan.run_scan(path, comm=MPI.COMM_WORLD, quiet=True) == 0
    with h5py.File(ens) as f:
        assert np.array_equal(f["observables/M"][()], after)
