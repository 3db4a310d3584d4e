import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

torch.set_default_dtype(torch.float64)


#: Defaults of every section the tests' inputs use; :func:`write_ini` merges overrides in.
SECTION_DEFAULTS = {
    "run": {"name": "t", "seed": 7, "stages": "hmc", "device": "cpu"},
    "theory": {"L": 4, "beta": 0.5, "lambda": 0.5},
    "hmc": {"replicas": 2, "trajectories": 20, "thermalization": 5, "length": 1.0, "steps": 5},
    "coarse": {"beta": 0.5, "L": 4, "replicas": 4, "samples": 64, "eval_samples": 64,
               "pilot": 200, "thermalization": 50},
    "flow": {"prior": "gaussian", "kernel_size": 3, "layers": 1},
    "train": {"iterations": 10, "batch_size": 32, "lr": 0.01, "metropolis": 64},
    "fhmc": {"replicas": 2, "trajectories": 20, "steps": 5},
    "analysis": {},
}


def ini_text(**sections) -> str:
    """INI text from section dicts merged over :data:`SECTION_DEFAULTS`.

    ``run`` and ``theory`` are always written; any other section only when given (``{}``
    for its defaults).  A value None leaves the key out."""
    sections = {"run": {}, "theory": {}, **sections}
    lines = []
    for name, defaults in SECTION_DEFAULTS.items():
        if name not in sections:
            continue
        values = {**defaults, **sections[name]}
        lines += [f"[{name}]"] + [f"{k} = {v}" for k, v in values.items() if v is not None] + [""]
    return "\n".join(lines)


def write_ini(directory: Path, file: str = "t.ini", **sections) -> Path:
    """The one input builder of the tests: ``directory/file`` from :func:`ini_text`, with
    ``[run] output`` = ``directory/out`` unless given."""
    sections["run"] = {"output": directory / "out", **sections.get("run", {})}
    path = directory / file
    path.write_text(ini_text(**sections))
    return path


def write_input(directory: Path, name="t", *, stages="hmc", L=4, beta=0.5, lam=0.5,
                replicas=2, trajectories=20, thermalization=5, steps=5, integrator="leapfrog",
                save_every=5, seed=7, checkpoint_every=10, io="auto", extra="") -> Path:
    """A small HMC input ``directory/<name>.ini`` whose output lies in ``directory/out``."""
    path = write_ini(directory, f"{name}.ini",
                     run=dict(name=name, seed=seed, stages=stages, io=io,
                              checkpoint_every=checkpoint_every),
                     theory={"L": L, "beta": beta, "lambda": lam},
                     hmc=dict(replicas=replicas, trajectories=trajectories,
                              thermalization=thermalization, steps=steps, integrator=integrator,
                              save_every=save_every))
    if extra:
        path.write_text(path.read_text() + extra)
    return path


def randomised(module, seed=0, std=0.3):
    """module with every parameter redrawn from a normal distribution, far from the identity.

    Conv weights get standard deviation std * 3 / sqrt(fan-in), i.e. ``std`` for one 3x3
    input channel (s and t are then O(1) before their tanh); scalars (the global log scale)
    get ``std``.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            scale = std * 3 / p[0].numel() ** 0.5 if p.dim() > 1 else std
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


@pytest.fixture
def make_input(tmp_path):
    """write_input in the test's tmp_path."""
    def make(**kw):
        return write_input(tmp_path, **kw)
    return make


@pytest.fixture
def make_ini(tmp_path):
    """write_ini in the test's tmp_path."""
    def make(file="t.ini", **sections):
        return write_ini(tmp_path, file, **sections)
    return make


# ---------------------------------------------------------------------------------------
# A real single-node SLURM (tools/slurm.sh; ../shared/SLURM.md) for the job-script tests.

REPO = Path(__file__).resolve().parents[1]


#: What the SLURM fixture found where it could not run jobs (printed in the terminal summary).
SLURM_REPORT: list[str] = []


def slurm_script(*argv) -> subprocess.CompletedProcess:
    """``bash tools/slurm.sh ARGV``, captured."""
    return subprocess.run(["bash", str(REPO / "tools" / "slurm.sh"), *argv],
                          capture_output=True, text=True)


def first_line(text: str) -> str:
    """The first line of ``text`` ("" when it is empty)."""
    return (text.strip().splitlines() or [""])[0]


def pytest_terminal_summary(terminalreporter):
    """The private SLURM's diagnostics (node state and reason, queue, daemons, log tails)
    when its tests were skipped or timed out, so that a CI log says why."""
    for report in SLURM_REPORT:
        terminalreporter.section("private SLURM (tools/slurm.sh)")
        terminalreporter.write_line(report)


class Slurm:
    """Client side of the private SLURM that ``tools/slurm.sh start`` runs."""

    def __init__(self, conf: str):
        self.conf = conf
        self.env = {**os.environ, "SLURM_CONF": conf}
        self.jobs: list[str] = []

    def run(self, *argv, check=True, **kw):
        p = subprocess.run(list(argv), env={**self.env, **kw.pop("env", {})},
                           capture_output=True, text=True, **kw)
        if check and p.returncode:
            raise RuntimeError(f"{' '.join(map(str, argv))} -> {p.returncode}\n{p.stdout}{p.stderr}")
        return p

    def sbatch(self, *argv, cwd=None, env=None) -> list[str]:
        """Submit; returns the job ids that sbatch printed (``--parsable`` lines)."""
        p = self.run("sbatch", *argv, cwd=cwd, env=env or {})
        ids = [line.split(";")[0] for line in p.stdout.split() if line.split(";")[0].isdigit()]
        self.jobs += ids
        return ids

    def state(self, job: str) -> dict[str, str]:
        """{task id or job id: state} from ``scontrol show job`` (array tasks one by one)."""
        p = self.run("scontrol", "-o", "show", "job", str(job), check=False)
        states = {}
        for line in p.stdout.splitlines():
            kv = dict(tok.split("=", 1) for tok in line.split() if "=" in tok)
            key = kv.get("ArrayTaskId") or kv.get("JobId")
            states[key] = kv.get("JobState", "?")
        return states

    def wait(self, jobs, timeout: float = 300.0, release_requeued: bool = False
             ) -> dict[str, dict[str, str]]:
        """Wait until no task of ``jobs`` is pending or running; their final states.

        ``release_requeued``: a requeued job waits about 2 minutes (its BeginTime) before
        SLURM starts it again; start it 5 s after it is seen pending instead (``scontrol update
        StartTime=now``), so that a test of the requeue path does not spend its time idle."""
        live = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_FED",
                "REQUEUE_HOLD", "SUSPENDED"}
        t0 = time.monotonic()
        requeued_at: dict[str, float] = {}
        while True:
            states = {j: self.state(j) for j in jobs}
            if not any(s in live for st in states.values() for s in st.values()):
                # A job whose script ran ``scontrol requeue`` and exited 3 can show FAILED
                # for a moment before slurmctld requeues it (seen once in a full run: the
                # wait ended after the first segment): final only if it stays so.
                time.sleep(3.0)
                again = {j: self.state(j) for j in jobs}
                if again == states:
                    return states
                continue
            if release_requeued:
                # Not at once: slurmd refuses a batch launch whose credential is from the same
                # second as the revocation of the job's previous run ("Killing non-startable
                # batch JobId=13: Job credential revoked" in slurmctld.log, 60 ms after the
                # requeue: the job then ends FAILED).  SLURM's own BeginTime delay avoids it.
                for j in jobs:
                    p = self.run("squeue", "-h", "-j", str(j), "-o", "%T %r", check=False)
                    if p.stdout.split() != ["PENDING", "BeginTime"]:
                        requeued_at.pop(j, None)
                    elif time.monotonic() - requeued_at.setdefault(j, time.monotonic()) > 5.0:
                        self.run("scontrol", "update", f"JobId={j}", "StartTime=now", check=False)
            if time.monotonic() - t0 > timeout:
                diagnostics = slurm_script("diagnose").stdout
                SLURM_REPORT.append(f"jobs {jobs} still live after {timeout} s:\n{diagnostics}")
                self.run("scancel", *jobs, check=False)
                raise TimeoutError(f"SLURM jobs still live after {timeout} s: {states}\n{diagnostics}")
            time.sleep(1.0)


@pytest.fixture(scope="session")
def slurm():
    """A running single-node SLURM, started by ``tools/slurm.sh`` and stopped afterwards
    (only if this fixture started it).  Before any test uses it, a trivial 2-task job
    (``srun true``) must complete within a minute (``tools/slurm.sh probe``).  The tests skip,
    with the reason, where it cannot run: no root, no slurm packages, ports taken by another
    SLURM, or a scheduler that does not run the probe (its diagnostics are printed in the
    terminal summary)."""
    directory = Path(os.environ.get("HPCFLOW_SLURM_DIR", "/tmp/hpcflow-slurm"))

    def alive(name):
        pid = directory / f"{name}.pid"
        try:
            os.kill(int(pid.read_text()), 0)
            return True
        except (OSError, ValueError):
            return False

    was_running = alive("slurmctld") and alive("slurmd")
    p = slurm_script("start")
    if p.returncode:
        SLURM_REPORT.append(p.stderr)
        pytest.skip(f"no single-node SLURM here: {first_line(p.stderr or p.stdout)}")
    conf = p.stdout.strip().split("=", 1)[1]
    probe = slurm_script("probe")
    if probe.returncode:
        SLURM_REPORT.append(probe.stderr)
        if not was_running:
            slurm_script("stop")
        pytest.skip(f"the private SLURM does not run jobs: {first_line(probe.stderr)}")
    s = Slurm(conf)
    yield s
    if s.jobs:
        s.run("scancel", *s.jobs, check=False)
    if not was_running:
        slurm_script("stop")


def chain_datasets(path) -> dict:
    """Every dataset of an ensemble file that the chains determine: all but ``/cost`` (wall
    time), with the two checkpoint slots replaced by the committed checkpoint (which slot
    holds it depends on how many segments wrote the file)."""
    import h5py

    from hpcflow.store import read_checkpoint

    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda n, o: out.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset)
                     and not n.startswith(("cost/", "checkpoint/slot_")) else None)
        out["checkpoint/committed_phi"], out["checkpoint/committed_rng"] = read_checkpoint(f)
    return out


def checked_on_every_rank(comm, check) -> None:
    """Run ``check(rank)`` on every rank of ``comm`` and fail on every rank if it failed on
    any, naming the ranks with their tracebacks.  A check that fails on one rank only
    (pytest catches the assertion: ``python -m mpi4py`` sees no uncaught exception) would
    otherwise leave the other ranks at their next collective call for ever."""
    import traceback

    failure = None
    try:
        check(comm.Get_rank())
    except (Exception, pytest.fail.Exception):
        failure = traceback.format_exc()
    failures = comm.allgather(failure)
    failed = {r: f for r, f in enumerate(failures) if f is not None}
    assert not failed, "\n".join(f"rank {r}:\n{f}" for r, f in failed.items())
