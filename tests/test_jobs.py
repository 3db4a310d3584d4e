"""The job scripts under ``jobs/`` against a real single-node SLURM (tools/slurm.sh).

These tests submit with ``sbatch`` and wait for the scheduler; they skip, with the reason,
where no SLURM can be started (conftest ``slurm`` fixture)."""

import math
import os
import shutil
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
    # the uninterrupted run on 2 ranks as the job (half the wall time of one process; the
    # chains do not depend on the rank count, tests/test_mpi.py)
    mpi = (["mpirun", "--oversubscribe", "-n", "2", sys.executable, "-m", "mpi4py"]
           if shutil.which("mpirun") else [sys.executable])
    root = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    subprocess.run([*mpi, "-m", "hpcflow.run", str(tmp_path / "ref.ini"), "--quiet"],
                   check=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1", **root})
    with h5py.File(tmp_path / "ref" / "hmc.h5", "r") as f:
        assert np.array_equal(f["observables/M"][()], M_slurm)


def _times(slurm, job: str) -> dict[str, tuple[str, str, str]]:
    """{array task index: (state, StartTime, EndTime)} of an array job."""
    p = slurm.run("scontrol", "-o", "show", "job", job, check=False)
    out = {}
    for line in p.stdout.splitlines():
        kv = dict(tok.split("=", 1) for tok in line.split() if "=" in tok)
        # a task that never left the queue keeps the array's spec, e.g. "4,6-7%4"
        for part in kv.get("ArrayTaskId", "").split("%")[0].split(","):
            lo, _, hi = part.partition("-")
            for task in range(int(lo), int(hi or lo) + 1):
                out[task] = (kv.get("JobState"), kv.get("StartTime"), kv.get("EndTime"))
    return out


def test_scan_sbatch_arrays_dependencies_and_a_failed_task(slurm, tmp_path):
    """A tiny scan through jobs/scan.sbatch: the arrays run, every dependant starts after the
    task it waits for has ended, and a failed task (the L = 6 Gaussian training, whose run
    directory is made unwritable) cancels its production and nothing else."""
    from test_scan import tiny_scan

    import subprocess

    path = tiny_scan(tmp_path, **{"L = 4, 6, 8": "L = 4, 6", "hmc_lengths = 2": "hmc_lengths ="})
    env = {**job_env(), "HPCFLOW_SCAN_THROTTLE": "4"}
    p = subprocess.run([sys.executable, "-m", "hpcflow.scan", "make", str(path)], cwd=tmp_path,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    manifest = tmp_path / "tiny" / "manifest.tsv"
    (tmp_path / "tiny" / "runs").mkdir()
    (tmp_path / "tiny" / "runs" / "L6-gaussian-k3").write_text("not a directory\n")
    p = slurm.run("bash", str(REPO / "jobs" / "scan.sbatch"), str(manifest), cwd=tmp_path,
                  env={**env, "SBATCH_TIMELIMIT": "10"})
    arrays = [line.split()[1].rstrip(":") for line in p.stdout.splitlines() if line.startswith("array ")]
    slurm.jobs += arrays
    # one array of the independent jobs, one per distinct set of dependencies
    assert len(arrays) == 1 + 4, p.stdout
    slurm.wait(arrays, timeout=600)
    from hpcflow.scan import read_manifest

    _, entries = read_manifest(manifest)
    tasks = {}
    for a in arrays:
        for task, t in _times(slurm, a).items():
            tasks[task] = t
    state = {entries[i].key: tasks[i][0] for i in tasks}
    logs = "\n".join(f.read_text() for f in tmp_path.glob("*.out"))
    assert state.pop("L6-gaussian-k3-train") == "FAILED", logs
    assert state.pop("L6-gaussian-k3") == "CANCELLED", logs  # its dependant only
    assert set(state.values()) == {"COMPLETED"}, (state, logs)
    for e in entries:
        for d in e.after:
            if tasks[e.index][0] == "COMPLETED":
                assert tasks[e.index][1] >= tasks[d][2], (e.key, entries[d].key, tasks)
    for run in ("L4-hmc", "L6-hmc", "L4-gaussian-k3", "L4-volume-k3"):
        assert (tmp_path / "tiny" / "runs" / run / "analysis.json").exists()
    # resubmitting the finished scan submits only the failed chain
    (tmp_path / "tiny" / "runs" / "L6-gaussian-k3").unlink()
    p = slurm.run(sys.executable, "-m", "hpcflow.scan", "submit", str(manifest), "--dry-run",
                  "--script", str(REPO / "jobs" / "scan.sbatch"), cwd=tmp_path)
    index = {e.key: e.index for e in entries}
    assert p.stdout.count("would run") == 2
    assert f"--array={index['L6-gaussian-k3-train']}%" in p.stdout
    assert f"--array={index['L6-gaussian-k3']}%" in p.stdout


def _trajectories_for(seconds: float, tmp_path, **kw) -> int:
    """Trajectories that keep a rank with 2 replicas of the job's input busy for about
    ``seconds`` on this machine now: a calibration run of the same input (2 replicas, one
    process, as each of the job's 2 tasks runs) measures its own ``/cost/seconds``, rounded
    up to a thousand.  A fixed count was wrong by more than 2x between a loaded and a quiet
    machine (50000 trajectories took 120 s, then 52 s)."""
    import subprocess

    from conftest import write_input

    n = 4000
    cal = tmp_path / "calibrate"
    cal.mkdir()
    ini = write_input(cal, "calibrate", **dict(kw, replicas=2, trajectories=n, save_every=0))
    subprocess.run([sys.executable, "-m", "hpcflow.run", str(ini), "--quiet"], check=True,
                   cwd=cal, env={**os.environ, "OMP_NUM_THREADS": "1"})
    with h5py.File(cal / "out" / "hmc.h5", "r") as f:
        rate = n / float(f["cost/seconds"][0])
    return 1000 * math.ceil(rate * seconds / 1000)


def _requeued_run(slurm, make_input, tmp_path, *sbatch_args, trajectories=6000,
                  signal_when_running=False):
    """Submit jobs/run.sbatch for a run of L = 6, 4 replicas on 2 tasks, optionally send USR1 to its batch shell once the run prints
    progress, wait for it to finish; its log, restart count, and a check that its file
    matches an uninterrupted run bit for bit."""
    import subprocess
    import time

    from conftest import chain_datasets

    kw = dict(L=6, replicas=4, trajectories=trajectories, thermalization=10, save_every=100,
              checkpoint_every=2000)
    ini = make_input(**kw)
    (job,) = slurm.sbatch("--ntasks-per-node=2", "--cpus-per-task=1", *sbatch_args,
                          f"--output={tmp_path}/job-%j.out", str(REPO / "jobs" / "run.sbatch"),
                          str(ini), cwd=tmp_path, env=job_env())
    if signal_when_running:
        t0 = time.monotonic()
        while not any("[hmc]" in f.read_text() for f in tmp_path.glob("job-*.out")):
            assert time.monotonic() - t0 < 300, slurm.run("scontrol", "show", "job", job).stdout
            time.sleep(0.1)
        slurm.run("scancel", "--batch", "--signal=USR1", job)
    states = slurm.wait([job], timeout=900, release_requeued=True)
    log = next(tmp_path.glob("job-*.out")).read_text()
    assert set(states[job].values()) == {"COMPLETED"}, log
    info = slurm.run("scontrol", "-o", "show", "job", job).stdout
    restarts = int(info.split("Restarts=")[1].split()[0])
    assert restarts >= 1 and "requeueing job" in log and "resuming" in log, (info, log)

    ref = make_input(name="ref", **kw).read_text().replace(str(tmp_path / "out"), str(tmp_path / "ref"))
    (tmp_path / "ref.ini").write_text(ref)
    # the uninterrupted run on 2 ranks as the job (half the wall time of one process; the
    # chains do not depend on the rank count, tests/test_mpi.py)
    mpi = (["mpirun", "--oversubscribe", "-n", "2", sys.executable, "-m", "mpi4py"]
           if shutil.which("mpirun") else [sys.executable])
    root = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    subprocess.run([*mpi, "-m", "hpcflow.run", str(tmp_path / "ref.ini"), "--quiet"],
                   check=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1", **root})
    got, want = chain_datasets(tmp_path / "out" / "hmc.h5"), chain_datasets(tmp_path / "ref" / "hmc.h5")
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    with h5py.File(tmp_path / "out" / "hmc.h5", "r") as f:
        assert int(f["cost/segments"][0]) == restarts + 1
    return log


def test_run_sbatch_signalled_mid_run_checkpoints_requeues_and_finishes_bit_identical(
        slurm, make_input, tmp_path):
    """The signal of ``--signal=B:USR1@...``, sent to the batch shell (``scancel --batch
    --signal=USR1``) once the run is producing: every rank checkpoints, the run exits 3, the
    script requeues the job, and the requeued job resumes and finishes with the chains of an
    uninterrupted run.  12000 trajectories (7 s of work at the 2-core machine's 1650 per
    second) leave the signal, sent within 0.1 s of the run's first line, a wide margin on a
    faster machine."""
    log = _requeued_run(slurm, make_input, tmp_path, "--time=10", trajectories=12000,
                        signal_when_running=True)
    assert "stopped by SIGUSR1 at trajectory" in log, log


def test_run_sbatch_at_its_time_limit_requeues_and_finishes_bit_identical(
        slurm, make_input, tmp_path):
    """A job that reaches its time limit: with --time=2 and --signal=B:USR1@30 SLURM sends
    USR1 to the batch shell 30 s before the limit, or up to a minute earlier (so never before
    30 s into the job, after the run's start-up); the run checkpoints, the script requeues,
    and the requeued job resumes (and is stopped and requeued again if its time runs out)
    until it finishes with the chains of an uninterrupted run.  The run has about 120 s of
    work, more than one start can do before its signal (at most 90 s into it).  (With --time=1 and @45 the signal
    could come at every start, before the run was up: the job was requeued for ever; the
    scripts now stop after 3 such starts, tests/test_job_requeue.py.)"""
    # 120 s of work (calibrated here, :func:`_trajectories_for`): more than a start reaches
    # before its signal (at most 90 s), whatever the machine's speed
    n = _trajectories_for(120.0, tmp_path, L=6, thermalization=10, checkpoint_every=2000)
    log = _requeued_run(slurm, make_input, tmp_path, "--time=2", "--signal=B:USR1@30",
                        trajectories=n)
    assert ("stopped by SIGUSR1 at trajectory" in log
            or "ended by the time-limit signal during start-up" in log), log
