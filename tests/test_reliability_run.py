"""Issue 7, items 5, 8, 9, 10: one writer per output, signals, bad input, the rest.

Processes that must be killed or signalled run as subprocesses of the test; the MPI
cases are in test_reliability_mpi.py (2 ranks)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import REPO, chain_datasets, write_input, write_ini
from hpcflow import analysis, run

ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}


def read(path):
    return chain_datasets(path)


def start(ini, *extra):
    return subprocess.Popen([sys.executable, "-m", "hpcflow.run", str(ini), *extra], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, timeout=120.0, what=""):
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(what)
        time.sleep(0.1)


def counter(h5):
    try:
        with h5py.File(h5, "r") as f:
            return int(f["checkpoint/trajectory"][0])
    except (OSError, KeyError):
        return 0


# ---------------------------------------------------------------------------------------
# Item 5: one writer per output


def test_a_second_run_on_the_same_output_exits_2_naming_the_holder(tmp_path, capsys):
    ini = write_input(tmp_path, L=6, replicas=2, trajectories=200000, checkpoint_every=50,
                      save_every=0)
    first = start(ini)
    try:
        wait_for(lambda: counter(tmp_path / "out" / "hmc.h5") >= 100, what="first run's checkpoint")
        capsys.readouterr()
        second = subprocess.run([sys.executable, "-m", "hpcflow.run", str(ini)], env=ENV,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"host {socket.gethostname()}, pid {first.pid}, started " in second.stderr
        assert "in use by another run" in second.stderr
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()  # SIGKILL: the lock is left as a dead process leaves it
        first.communicate()
    done = counter(tmp_path / "out" / "hmc.h5")
    ini.write_text(ini.read_text().replace("trajectories = 200000", f"trajectories = {done + 10}"))
    assert run.main([str(ini)]) == 0
    out = capsys.readouterr().out
    assert f"took over the lock of a run that ended without releasing it (host " \
           f"{socket.gethostname()}, pid {first.pid}" in out


def test_without_flock_a_lock_file_with_host_and_pid(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    from hpcflow.errors import StageError
    from hpcflow.locks import Lock

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    path = tmp_path / "x.lock"
    held = Lock(path, "x").acquire()
    assert "does not support flock" in caplog.text
    assert f"pid {os.getpid()}" in path.read_text()
    with pytest.raises(StageError, match=f"pid {os.getpid()}.*no flock here.*delete the lock file"):
        Lock(path, "x").acquire()
    held.release()
    assert not path.exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    path.write_text(f"host {socket.gethostname()}, pid {dead}, started then\n")
    Lock(path, "x").acquire().release()  # a dead process of this host: taken over
    assert "took over the lock file of a dead run" in caplog.text
    path.write_text(f"host elsewhere.example, pid {os.getpid()}, started then\n")
    with pytest.raises(StageError, match="elsewhere.example"):  # cannot be checked: refused
        Lock(path, "x").acquire()


# ---------------------------------------------------------------------------------------
# Item 8: signals


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_a_signal_checkpoints_and_exits_3_and_the_rerun_is_bit_identical(tmp_path, sig):
    # The signal goes as soon as the file exists (its first checkpoint, trajectory 1000):
    # 5000 trajectories are then left, seconds of work even on a fast machine (a fixed
    # sleep after it let an unloaded machine finish 3000 first: exit 0, not 3).
    kw = dict(L=6, replicas=2, trajectories=6000, thermalization=10, checkpoint_every=1000,
              save_every=50)
    ini = write_input(tmp_path, **kw)
    p = start(ini)
    wait_for(lambda: (tmp_path / "out" / "hmc.h5").exists(), what="the run's file")
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 3, out + err
    assert f"stopped by {signal.Signals(sig).name} at trajectory" in err
    assert "rerun the same command to resume" in err
    stopped_at = counter(tmp_path / "out" / "hmc.h5")
    assert 0 < stopped_at < 6010 and stopped_at % 1000  # a checkpoint of its own, not a due one
    assert run.main([str(ini)]) == 0
    (tmp_path / "ref").mkdir()
    ref = write_input(tmp_path / "ref", **kw)
    assert run.main([str(ref)]) == 0
    a, b = read(tmp_path / "out" / "hmc.h5"), read(tmp_path / "ref" / "out" / "hmc.h5")
    for name in b:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


# ---------------------------------------------------------------------------------------
# Item 9: bad input


def bad(tmp_path, capsys, path, *words):
    capsys.readouterr()
    assert run.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err
    for w in words:
        assert w in err, err
    return err


def test_empty_output_is_refused(tmp_path, capsys):
    path = write_ini(tmp_path, run={"output": ""}, hmc={})
    bad(tmp_path, capsys, path, "[run] output", "must name a directory")
    assert os.listdir(tmp_path) == ["t.ini"]


def test_output_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    path = write_ini(tmp_path, run={"output": tmp_path / "afile"}, hmc={})
    bad(tmp_path, capsys, path, "[run] output", "is not a directory")
    path = write_ini(tmp_path, run={"output": tmp_path / "afile" / "sub"}, hmc={})
    bad(tmp_path, capsys, path, "[run] output", "is a file")


@pytest.fixture
def mount(tmp_path):
    """mount(options) -> a fresh tmpfs directory (root only; skips elsewhere)."""
    mounted = []

    def make(options):
        d = tmp_path / f"mnt{len(mounted)}"
        d.mkdir()
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(d)],
                           capture_output=True, text=True)
        if p.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
        mounted.append(d)
        return d
    yield make
    for d in mounted:
        subprocess.run(["umount", str(d)], check=False)


def test_read_only_output_is_refused(tmp_path, capsys, mount):
    ro = mount("ro,size=1m")
    path = write_ini(tmp_path, run={"output": ro / "out"}, hmc={})
    bad(tmp_path, capsys, path, "[run] output", "cannot write in", "Read-only file system")


def test_cuda_without_a_gpu_is_refused(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    path = write_ini(tmp_path, run={"device": "cuda"}, hmc={})
    bad(tmp_path, capsys, path, "[run] device", "no CUDA device")
    assert not (tmp_path / "out").exists()


def test_a_utf8_bom_is_accepted(tmp_path):
    path = write_input(tmp_path)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert run.main([str(path)]) == 0
    with h5py.File(tmp_path / "out" / "hmc.h5", "r") as f:
        assert f.attrs["input"].startswith("[run]")


def test_ini_syntax_errors_name_the_line(tmp_path, capsys):
    path = tmp_path / "t.ini"
    path.write_text("[run]\nname = x\nthis is not ini\n")
    bad(tmp_path, capsys, path, "line 3", "'this is not ini'")
    path.write_text("name = x\n[run]\n")
    bad(tmp_path, capsys, path, "line 1")


@pytest.mark.parametrize("key,value,named", [
    ("trajectories", 10**12, "[hmc] trajectories"),
    ("replicas", 10**9, "[hmc] trajectories"),
    ("L", 10**6, "[theory] L"),
    ("save_every", 1, "[hmc] save_every"),
])
def test_huge_sizes_are_refused_against_the_free_disk(tmp_path, capsys, monkeypatch, key, value, named):
    from hpcflow import preflight

    monkeypatch.setattr(preflight, "free_bytes", lambda path: 10**6)  # 1 MB free
    sections = {"theory": {}, "hmc": {"save_every": 0, "trajectories": 10**5}}
    sections["theory" if key == "L" else "hmc"][key] = value
    path = write_ini(tmp_path, **sections)
    bad(tmp_path, capsys, path, named, "0.001 GB free")
    assert not (tmp_path / "out").exists()


def test_a_full_disk_is_refused_before_anything_is_written(tmp_path, capsys, mount):
    tiny = mount("size=64k")
    path = write_ini(tmp_path, run={"output": tiny / "out"}, hmc={"trajectories": 5000})
    bad(tmp_path, capsys, path, "[hmc] trajectories", "free")
    assert os.listdir(tiny) == []


def test_a_disk_that_fills_at_creation_leaves_no_stub(tmp_path, mount):
    """The free-space query says yes (another process fills the disk after it): the run
    exits 2 naming the output and leaves no half-made file."""
    tiny = mount("size=64k")
    path = write_ini(tmp_path, run={"output": tiny / "out", "io": "gather"},
                     hmc={"trajectories": 5000})
    code = ("import sys; from hpcflow import preflight, run; "
            "preflight.free_bytes = lambda p: 10**12; sys.exit(run.main(sys.argv[1:]))")
    p = subprocess.run([sys.executable, "-c", code, str(path)], env=ENV, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "[run] output: no space left on the device" in p.stderr
    assert os.listdir(tiny) == []


def test_memory_is_checked_after_mpi_starts_and_the_new_directory_goes(tmp_path, capsys, monkeypatch):
    from hpcflow import preflight

    monkeypatch.setattr(preflight, "available_memory", lambda: 10**9)
    path = write_ini(tmp_path, theory={"L": 4000}, hmc={"replicas": 1, "trajectories": 2})
    bad(tmp_path, capsys, path, "[theory] L", "of memory")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv,named", [
    (["--S", "nan"], "--S"), (["--S", "0"], "--S"), (["--S", "-1"], "--S"),
    (["--S", "inf"], "--S"), (["--plateau-min", "-1"], "--plateau-min")])
def test_analysis_refuses_bad_settings(tmp_path, capsys, argv, named):
    path = write_input(tmp_path, trajectories=40)
    assert run.main([str(path)]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        analysis.main([str(tmp_path / "out"), *argv])
    assert e.value.code == 2
    assert named in capsys.readouterr().err
    assert not analysis.cache_path(tmp_path / "out" / "hmc.h5").exists()


def test_a_bad_input_is_reported_once_under_a_launcher(tmp_path):
    """Before MPI starts, only the process of rank 0 (launcher environment) prints."""
    path = write_ini(tmp_path, run={"output": ""}, hmc={})
    for rank, printed in (("0", True), ("1", False)):
        p = subprocess.run([sys.executable, "-m", "hpcflow.run", str(path)],
                           env={**ENV, "OMPI_COMM_WORLD_RANK": rank}, capture_output=True, text=True)
        assert p.returncode == 2
        assert ("[run] output" in p.stderr) == printed


# ---------------------------------------------------------------------------------------
# Item 10: the rest


def test_overflowed_trajectories_are_stored_counted_and_reported(tmp_path, capsys):
    """A step size so large that the energy overflows: dH is stored +inf (never NaN, which
    means "not measured"), counted in the progress line and in the analysis."""
    path = write_input(tmp_path, L=4, replicas=4, trajectories=40, thermalization=0, steps=5,
                       stages="hmc")
    path.write_text(path.read_text().replace("length = 1.0", "length = 40.0"))  # dH = NaN
    assert run.main([str(path)]) == 0
    out = capsys.readouterr().out
    with h5py.File(tmp_path / "out" / "hmc.h5", "r") as f:
        dH = f["mc/dH"][()]
    assert not np.isnan(dH).any()
    n = int((~np.isfinite(dH)).sum())
    assert n > 0
    assert f"{n} overflowed (dH not finite)" in out
    assert "WARNING: acceptance below 0.5" in out
    # (every chain stuck here: the analysis gets a mixed ensemble)
    rng = np.random.default_rng(1)
    dH_mixed = rng.normal(0.0, 0.1, (2, 200))
    dH_mixed[0, 17] = dH_mixed[1, 150] = np.inf
    js, _ = analysis.analyse({"M": rng.normal(size=(2, 200)), "dH": dH_mixed,
                              "accepted": np.isfinite(dH_mixed)}, L=4)
    assert js["overflows"] == 2
    assert "2 overflowed trajectories" in analysis.table([{"json": dict(js, file="x")}])


def test_good_acceptance_does_not_warn(tmp_path, capsys):
    assert run.main([str(write_input(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "acc 1.000" in out or "acc 0.9" in out
    assert "WARNING" not in out and "overflowed" not in out


def train_ini(d, **train):
    return write_ini(d, run={"stages": "train"}, theory={"L": 4}, flow={"hidden": "4"},
                     train={"iterations": 6, "checkpoint_every": 3, **train})


def test_training_with_hidden_layers_is_reproducible(tmp_path):
    import torch

    from hpcflow.train import read_flow_file

    weights = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        torch.rand(7)  # the global generator moves between the runs
        assert run.main([str(train_ini(tmp_path / name)), "--quiet"]) == 0
        weights.append(read_flow_file(tmp_path / name / "out" / "flow.pt")["state_dict"])
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k


def test_train_json_survives_a_kill_after_the_flow_file(tmp_path, monkeypatch):
    from hpcflow import train as train_mod

    ini = train_ini(tmp_path)
    real = train_mod.save_flow

    def save_then_die(path, payload):
        real(path, payload)
        if payload["complete"]:
            raise KeyboardInterrupt  # killed right after the finished flow file

    monkeypatch.setattr(train_mod, "save_flow", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run.main([str(ini), "--quiet"])
    monkeypatch.setattr(train_mod, "save_flow", real)
    history = tmp_path / "out" / "train.json"
    history.unlink(missing_ok=True)  # as if the kill came before it was written
    assert run.main([str(ini), "--quiet"]) == 0
    flow = train_mod.read_flow_file(tmp_path / "out" / "flow.pt")
    assert json.loads(history.read_text())["history"]["loss"] == flow["history"]["loss"]


def test_an_error_after_mpi_starts_removes_the_empty_output_it_created(tmp_path, capsys):
    path = write_ini(tmp_path, run={"stages": "fhmc"}, flow={}, fhmc={})
    assert run.main([str(path)]) == 2
    assert "no trained flow" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()  # not created by the run: stays
    assert run.main([str(path)]) == 2
    assert (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------
# Item 8 under mpirun: one rank signalled, one rank failing


MPIRUN = ["mpirun", "--oversubscribe", "-n", "2"]


def children_ranks(mpirun_pid):
    """{rank: pid} of the processes mpirun started (from /proc)."""
    ranks = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            env = Path(f"/proc/{d}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if ppid != mpirun_pid:
            continue
        for kv in env:
            if kv.startswith(b"OMPI_COMM_WORLD_RANK="):
                ranks[int(kv.split(b"=")[1])] = int(d)
    return ranks


def test_sigint_to_one_rank_stops_both_with_a_checkpoint(tmp_path):
    """Before: both ranks spun at 100% CPU forever.  The signal goes 0.2 s after the first
    checkpoint (trajectory 1000) with 7000 trajectories left, seconds of work here (1650
    trajectories/s on the 2-core machine): with 4000 and a 1 s wait, a machine twice as
    fast would have finished first."""
    kw = dict(L=6, replicas=4, trajectories=8000, thermalization=10, checkpoint_every=1000,
              save_every=0)
    ini = write_input(tmp_path, **kw)
    p = subprocess.Popen([*MPIRUN, sys.executable, "-m", "mpi4py", "-m", "hpcflow.run", str(ini)],
                         env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (tmp_path / "out" / "hmc.h5").exists() and len(children_ranks(p.pid)) == 2,
                 what="both ranks running")
        time.sleep(0.2)
        os.kill(children_ranks(p.pid)[1], signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 3, out + err
    assert err.count("stopped by SIGINT at trajectory") == 1  # reported once, by rank 0
    assert 1000 <= counter(tmp_path / "out" / "hmc.h5") < 8010
    rerun = subprocess.run([*MPIRUN, sys.executable, "-m", "mpi4py", "-m", "hpcflow.run", str(ini)],
                           env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    (tmp_path / "ref").mkdir()
    assert run.main([str(write_input(tmp_path / "ref", **kw))]) == 0
    a, b = read(tmp_path / "out" / "hmc.h5"), read(tmp_path / "ref" / "out" / "hmc.h5")
    for name in b:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_an_exception_on_one_rank_aborts_all_with_its_message(tmp_path):
    ini = write_input(tmp_path, L=6, replicas=4, trajectories=4000, checkpoint_every=100)
    code = ("import sys; from mpi4py import MPI; from hpcflow import production, run\n"
            "real = production.advance\n"
            "def advance(p):\n"
            "    real(p)\n"
            "    if MPI.COMM_WORLD.Get_rank() == 1 and p.done == 150:\n"
            "        raise RuntimeError('injected fault on rank 1')\n"
            "production.advance = advance\n"
            "sys.exit(run.main(sys.argv[1:]))\n")
    p = subprocess.run([*MPIRUN, sys.executable, "-m", "mpi4py", "-c", code, str(ini)], env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert "RuntimeError: injected fault on rank 1" in p.stderr
