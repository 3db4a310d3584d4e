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
