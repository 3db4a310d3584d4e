"""The job scripts under ``jobs/`` against a real single-node SLURM (tools/slurm.sh).

These tests submit with ``sbatch`` and wait for the scheduler; they skip, with the reason,
where no SLURM can be started (conftest ``slurm`` fixture)."""

import sys

import h5py
import numpy as np
import pytest

from conftest import REPO

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def job_env():
    """What a user's shell would carry into sbatch: the venv hpcflow runs from."""
    return {"HPCFLOW_VENV": sys.prefix, "OMP_NUM_THREADS": "1"}


def test_run_sbatch_two_tasks_with_mpi_default_none(slurm, make_input, tmp_path):
    """jobs/run.sbatch starts Open MPI through PMIx although the cluster's MpiDefault is
    none (MPI_Init aborted there before), and its 2 tasks give the same chains as 1 rank."""
    ini = make_input(L=6, replicas=4, trajectories=40, thermalization=10, save_every=0)
    (job,) = slurm.sbatch("--ntasks-per-node=2", "--cpus-per-task=1", "--time=5",
                          f"--output={tmp_path}/job-%j.out", str(REPO / "jobs" / "run.sbatch"),
                          str(ini), cwd=tmp_path, env=job_env())
    states = slurm.wait([job], timeout=240)
    log = next(tmp_path.glob("job-*.out")).read_text()
    assert set(states[job].values()) == {"COMPLETED"}, log
    assert "PMI support" not in log
    with h5py.File(tmp_path / "out" / "hmc.h5", "r") as f:
        M_slurm = f["observables/M"][()]
        ranks = int(f["cost/ranks"][0])
    assert ranks == 2

    import subprocess
    ref = make_input(name="ref", L=6, replicas=4, trajectories=40, thermalization=10,
                     save_every=0).read_text().replace(str(tmp_path / "out"), str(tmp_path / "ref"))
    (tmp_path / "ref.ini").write_text(ref)
    subprocess.run([sys.executable, "-m", "hpcflow.run", str(tmp_path / "ref.ini"), "--quiet"],
                   check=True, cwd=tmp_path)
    with h5py.File(tmp_path / "ref" / "hmc.h5", "r") as f:
        assert np.array_equal(f["observables/M"][()], M_slurm)


def test_run_sbatch_checkpoints_on_a_signal_requeues_and_finishes_bit_identical(slurm, make_input,
                                                                                 tmp_path):
    """SIGUSR1 to the batch shell (what --signal=B:USR1@120 sends before the time limit):
    every rank checkpoints, the run exits 3, the script requeues the job, and the requeued
    job resumes and finishes with the chains of an uninterrupted run."""
    import subprocess
    import time

    kw = dict(L=6, replicas=4, trajectories=6000, thermalization=10, save_every=100,
              checkpoint_every=2000)
    ini = make_input(**kw)
    (job,) = slurm.sbatch("--ntasks-per-node=2", "--cpus-per-task=1", "--time=10",
                          f"--output={tmp_path}/job-%j.out", str(REPO / "jobs" / "run.sbatch"),
                          str(ini), cwd=tmp_path, env=job_env())
    h5 = tmp_path / "out" / "hmc.h5"
    t0 = time.monotonic()
    while not h5.exists():  # the run has begun its trajectories
        assert time.monotonic() - t0 < 240, slurm.state(job)
        time.sleep(0.5)
    time.sleep(2.0)
    slurm.run("scancel", "--signal=USR1", "--batch", job)
    states = slurm.wait([job], timeout=600)
    log = next(tmp_path.glob("job-*.out")).read_text()
    assert set(states[job].values()) == {"COMPLETED"}, log
    assert "stopped by SIGUSR1 at trajectory" in log and "requeueing job" in log, log
    assert "resuming" in log, log
    info = slurm.run("scontrol", "-o", "show", "job", job).stdout
    assert "Restarts=1" in info, info

    ref = make_input(name="ref", **kw).read_text().replace(str(tmp_path / "out"), str(tmp_path / "ref"))
    (tmp_path / "ref.ini").write_text(ref)
    subprocess.run([sys.executable, "-m", "hpcflow.run", str(tmp_path / "ref.ini"), "--quiet"],
                   check=True, cwd=tmp_path)
    with h5py.File(h5, "r") as a, h5py.File(tmp_path / "ref" / "hmc.h5", "r") as b:
        for name in ("observables/M", "observables/C", "mc/dH", "mc/accepted", "configs",
                     "checkpoint/phi", "checkpoint/rng", "checkpoint/trajectory"):
            np.testing.assert_array_equal(a[name][()], b[name][()], err_msg=name)
        assert int(a["cost/segments"][0]) >= 2
