"""The public API (``import hpcflow``): no MPI, the caller's objects left alone, the
library objects the drivers are built from, logging flags."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import hpcflow as hf
from conftest import randomised


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_import_without_mpi():
    """``import hpcflow``, its public names and the modules of the library layer (the
    drivers too: they import mpi4py only when they run) leave mpi4py unimported."""
    r = run_python("""
import sys
import hpcflow
names = [getattr(hpcflow, n) for n in hpcflow.__all__]
import hpcflow.analysis, hpcflow.coarse, hpcflow.production, hpcflow.run, hpcflow.study
import hpcflow.train
assert "mpi4py" not in sys.modules, "mpi4py was imported"
print("ok", len(names))
""")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ok", str(len(hf.__all__))]


@pytest.mark.slow
def test_main_objects_used_without_mpi():
    """The main objects, constructed and used, never import mpi4py (so never initialise
    MPI)."""
    r = run_python("""
import sys
import numpy as np
import hpcflow as hf
assert "mpi4py" not in sys.modules
L = 4
target = hf.Phi4Action(0.3, 0.5)
flow = hf.Flow(L)
history = hf.Trainer(flow, hf.GaussianPrior(L), target, iterations=3, batch_size=16).train(3)
action = hf.FlowedAction(target, flow)
streams = hf.ReplicaStreams(1, range(3), "api")
state = hf.init_state(action, streams.normal((L, L), "cpu"))
M = []
for _ in range(10):
    state, info = hf.hmc_step(action, state, streams.normal((L, L), "cpu"),
                              streams.log_uniform("cpu"), "leapfrog", 1.0, 4)
    M.append(action.to_physical(state.phi).mean((1, 2)).numpy())
js, obs = hf.analyse({"M": np.array(M).T}, L=L)
o = hf.to_obs(np.array(M).T, "x")
assert "mpi4py" not in sys.modules, "mpi4py was imported"
print("ok", len(history["loss"]))
""")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ok", "3"]


def test_all_names_exist_and_have_docstrings():
    for name in hf.__all__:
        obj = getattr(hf, name)
        if callable(obj) and not isinstance(obj, dict):
            assert obj.__doc__ and obj.__doc__.strip(), name
    for cls in (hf.HMCInfo, hf.Trainer, hf.ReplicaStreams, hf.GaussianPrior):
        assert "Parameters" in cls.__doc__ or "Attributes" in cls.__doc__, cls


def test_flowed_action_leaves_the_flow_alone():
    flow = randomised(hf.Flow(4), seed=3)
    before = {k: v.clone() for k, v in flow.state_dict().items()}
    action = hf.FlowedAction(hf.Phi4Action(0.5, 0.5), flow)
    action.force(torch.randn(2, 4, 4))
    assert all(p.requires_grad for p in flow.parameters())
    assert all(torch.equal(before[k], v) for k, v in flow.state_dict().items())


def test_hmc_info_acceptance_probability_and_divergence():
    L = 4
    action = hf.Phi4Action(0.5, 0.5)
    streams = hf.ReplicaStreams(2, range(8), "api")
    state = hf.init_state(action, streams.normal((L, L), "cpu"))
    _, info = hf.hmc_step(action, state, streams.normal((L, L), "cpu"),
                          streams.log_uniform("cpu"), "leapfrog", 1.0, 10)
    expect = torch.minimum(torch.ones_like(info.dH), torch.exp(-info.dH))
    torch.testing.assert_close(info.acceptance_probability, expect, rtol=1e-15, atol=0)
    assert not info.divergent.any()
    # an absurd step on a stiff action: dH explodes, the trajectories are flagged
    _, bad = hf.hmc_step(hf.Phi4Action(0.5, 50.0), state, 10 * streams.normal((L, L), "cpu"),
                         streams.log_uniform("cpu"), "leapfrog", 5.0, 1)
    assert bad.divergent.all() and not bad.accepted.any()
    assert (bad.acceptance_probability == 0).all()
    dH = torch.tensor([0.5, -0.5, float("nan"), float("inf"), 2000.0])
    p = torch.exp(torch.clamp(-dH, max=0.0))
    assert p[1] == 1 and p[3] == 0 and torch.isnan(p[2])


def test_trainer_is_what_the_train_stage_runs(tmp_path):
    """The train stage on one rank (checkpoints beyond the end: one stream) and the plain
    Trainer from the same seed give the same flow and history, bit for bit."""
    from hpcflow import run
    from hpcflow.train import read_flow_file
    from test_train import train_input

    path = train_input(tmp_path, L=4, iterations=12, batch=32, ckpt=100)
    assert run.main([str(path)]) == 0
    payload = read_flow_file(tmp_path / "tr" / "flow.pt")
    L, beta, lam, lr = 4, 0.25, 0.0, 0.02
    flow = hf.Flow(L).to(torch.float64)
    records = []
    trainer = hf.Trainer(flow, hf.GaussianPrior(L), hf.Phi4Action(beta, lam), lr=lr,
                         iterations=12, batch_size=32, callbacks=[records.append])
    history = trainer.train(12, seed=99)
    for k, v in flow.state_dict().items():
        assert torch.equal(v, payload["state_dict"][k]), k
    for k in ("iteration", "loss", "acceptance", "ess"):
        assert history[k] == payload["history"][k], k
    assert [r["loss"] for r in records] == history["loss"]
    m = trainer.evaluate(256, np.random.default_rng(0))
    assert 0 <= m["acceptance"] <= 1 and m["proposals"] == 256


def test_analyse_arrays_is_the_file_analysis(make_input, tmp_path):
    """analyse() on the arrays of a file gives the file's analysis JSON (values, errors,
    tau_int), without the file."""
    from hpcflow import analysis, run

    path = make_input(stages="hmc", L=6, replicas=3, trajectories=150, thermalization=10)
    assert run.main([str(path)]) == 0
    h5 = tmp_path / "out" / "hmc.h5"
    ref = analysis.run(h5, write=False)[0]["json"]
    e = hf.load_ensemble(h5)
    js, obs = hf.analyse({k: v for k, v in e.data.items() if v is not None}, L=6, name=e.name)
    assert js["observables"] == ref["observables"] and js["meff"] == ref["meff"]
    assert js["acceptance"] == ref["acceptance"] and js["file"] is None
    js2, _ = hf.analyse(e)
    assert js2["observables"] == ref["observables"]
    M_only, _ = hf.analyse({"M": e.M}, L=6, name=e.name)
    assert M_only["observables"]["chi"] == ref["observables"]["chi"]
    assert M_only["observables"]["xi"] == {"value": None, "error": None}
    assert set(obs) >= {"M", "absM", "M2", "chi", "xi", "m", "xi2"}
    with pytest.raises(ValueError, match="unknown arrays"):
        hf.analyse({"M": e.M, "Q": e.M}, L=6)


PROGRESS = re.compile(r"^\[hmc\] 25/25 trajectories \| acc \d\.\d{3} \| <dH> [+-]\d\.\d{2}e[+-]\d{2} "
                      r"\| <exp\(-dH\)> \d\.\d{3} \| \d+\.\d traj/s x 2 replicas \| done in \dm\d{2}s$")


def test_logging_flags_and_progress_format(make_input, capsys):
    from hpcflow import run

    path = make_input(stages="hmc")
    assert run.main([str(path), "--force"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert any(PROGRESS.match(line) for line in out), out
    assert any(line.startswith("[hmc] hmc: L=4 beta=0.5") for line in out)
    assert run.main([str(path), "--force", "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    assert run.main([str(path), "--verbose"]) == 0
    assert "is complete: skipped" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run.main([str(path), "--quiet", "--verbose"])


def test_analysis_json_stays_clean_with_verbose(make_input, tmp_path, capsys):
    from hpcflow import analysis, run

    assert run.main([str(make_input(stages="hmc", trajectories=40))]) == 0
    capsys.readouterr()
    assert analysis.main([str(tmp_path / "out"), "--json", "--verbose"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["algorithm"] == "hmc"
    assert "[analysis] analysing" in captured.err
