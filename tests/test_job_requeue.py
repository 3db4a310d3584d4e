"""The requeue rules of the job scripts under ``jobs/``, without SLURM: each script runs under
bash with a fake ``srun`` (a start-up that never ends) and a fake ``scontrol`` (which records
what it was asked), and is sent the time-limit signal while its run is starting.

A signal during start-up ends the tasks without a checkpoint; the scripts requeue then too,
but at most ``HPCFLOW_STARTUP_REQUEUES`` times in a row: where SLURM signals every start
before the run is up (a margin ``--signal=B:USR1@N`` too close to ``--time``; SLURM may send it
up to a minute early) the job would otherwise be requeued for ever.  A checkpointed stop
(exit 3) is progress and starts the count again.  The real-SLURM versions of these paths are
in tests/test_jobs.py."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO


def _fake_env(tmp_path: Path, srun_exit: int | None = None) -> dict:
    """A venv whose activate puts a fake srun and scontrol first on PATH.  srun marks that it
    started, then either sleeps (a start-up that the signal ends: exit 128 + USR1) or, with
    ``srun_exit``, ignores USR1 for a moment and exits with that status (3: checkpointed)."""
    bin_ = tmp_path / "fakebin"
    bin_.mkdir(parents=True)
    if srun_exit is None:
        body = 'touch "$FAKE_DIR/started"\nexec sleep 60\n'
    else:
        body = (f'trap "exit {srun_exit}" USR1\ntouch "$FAKE_DIR/started"\n'
                'for i in $(seq 600); do sleep 0.1; done\n')
    (bin_ / "srun").write_text("#!/bin/bash\n" + body)
    (bin_ / "scontrol").write_text('#!/bin/bash\necho "$*" >> "$FAKE_DIR/scontrol.log"\n')
    for f in bin_.iterdir():
        f.chmod(0o755)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text(f'export PATH="{bin_}:$PATH"\n')
    return {**os.environ, "HPCFLOW_VENV": str(venv), "FAKE_DIR": str(tmp_path),
            "SLURM_JOB_ID": "4242", "SLURM_ARRAY_JOB_ID": "4240", "SLURM_ARRAY_TASK_ID": "0",
            "SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_NTASKS": "1"}


def _script_args(name: str, tmp_path: Path) -> list[str]:
    if name == "scan.sbatch":
        (tmp_path / "a.ini").write_text("[lattice]\n")
        (tmp_path / "manifest.tsv").write_text(f"# base: {tmp_path}\n0\tL4-hmc\ta.ini\n")
        return [str(tmp_path / "manifest.tsv")]
    return [str(tmp_path / "a.ini")]


def _start_and_signal(name: str, tmp_path: Path, env: dict) -> subprocess.CompletedProcess:
    """One start of the job: run the script, send USR1 to it (the batch shell, as
    ``--signal=B:USR1``) once its srun runs, and collect it."""
    (tmp_path / "started").unlink(missing_ok=True)
    p = subprocess.Popen(["bash", str(REPO / "jobs" / name), *_script_args(name, tmp_path)],
                         cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    t0 = time.monotonic()
    while not (tmp_path / "started").exists():
        assert p.poll() is None, p.communicate()
        assert time.monotonic() - t0 < 30, "the fake srun never started"
        time.sleep(0.05)
    time.sleep(0.2)  # the script is in its wait loop
    p.send_signal(signal.SIGUSR1)
    out, err = p.communicate(timeout=30)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def _requeues(tmp_path: Path) -> list[str]:
    log = tmp_path / "scontrol.log"
    return [line for line in log.read_text().splitlines() if line.startswith("requeue")] \
        if log.exists() else []


@pytest.mark.parametrize("name", ["run.sbatch", "scan.sbatch", "study.sbatch"])
def test_signal_at_every_start_up_requeues_three_times_then_stops_with_the_reason(
        name, tmp_path):
    env = _fake_env(tmp_path)
    want_task = "4240_0" if name == "scan.sbatch" else "4242"
    for n in (1, 2, 3):
        p = _start_and_signal(name, tmp_path, env)
        assert p.returncode != 0, (p.stdout, p.stderr)
        assert _requeues(tmp_path) == [f"requeue {want_task}"] * n, (p.stdout, p.stderr)
    p = _start_and_signal(name, tmp_path, env)
    assert p.returncode == 128 + signal.SIGUSR1, (p.stdout, p.stderr)
    assert _requeues(tmp_path) == [f"requeue {want_task}"] * 3, "requeued a fourth time"
    assert "start-up 3 times in a row" in p.stderr and "--signal=B:USR1@" in p.stderr, p.stderr
    assert not list(tmp_path.glob(".hpcflow-startup-requeues-*")), "the count was left behind"


@pytest.mark.parametrize("name", ["run.sbatch", "scan.sbatch", "study.sbatch"])
def test_a_checkpointed_stop_starts_the_start_up_count_again(name, tmp_path):
    env = _fake_env(tmp_path)
    for _ in range(3):
        _start_and_signal(name, tmp_path, env)
    assert len(_requeues(tmp_path)) == 3
    ok = _fake_env(tmp_path / "ckpt", srun_exit=3)
    ok["FAKE_DIR"] = ok["SLURM_SUBMIT_DIR"] = str(tmp_path)  # the same job, its run checkpoints
    p = _start_and_signal(name, tmp_path, ok)
    assert p.returncode == 3, (p.stdout, p.stderr)
    assert len(_requeues(tmp_path)) == 4
    for _ in range(3):  # three start-up endings in a row are allowed again
        p = _start_and_signal(name, tmp_path, env)
        assert "in a row: not requeueing" not in p.stderr, p.stderr
    assert len(_requeues(tmp_path)) == 7
