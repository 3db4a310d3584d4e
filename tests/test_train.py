"""Reverse-KL training: weights, ESS, acceptance, flow files, resumption, free-field trivialization."""

import json

import numpy as np
import pytest
import torch

from conftest import write_ini
from hpcflow import config, run
from hpcflow.action import Phi4Action
from hpcflow.flows import FAMILY, Flow
from hpcflow.parallel import make_world
from hpcflow.priors import GaussianPrior
from hpcflow.store import StageError
from hpcflow.train import ess, load_flow, log_weights, metropolis_acceptance, read_flow_file


def test_ess_and_acceptance_limits():
    rng = np.random.default_rng(0)
    assert ess(np.zeros(100)) == pytest.approx(1.0)
    assert metropolis_acceptance(np.full(100, 3.0), rng) == 1.0
    lw = np.full(100, -50.0)
    lw[0] = 0.0  # one proposal dominates: the chain sticks to it
    assert metropolis_acceptance(lw, rng) == 0.0
    assert ess(lw) == pytest.approx(1 / 100, rel=1e-6)
    # moderately spread weights: acceptance and ESS strictly between 0 and 1
    lw = rng.normal(0, 1, 2000)
    assert 0.2 < metropolis_acceptance(lw, rng) < 0.9 and 0.2 < ess(lw) < 0.9


def test_loss_is_kl_for_the_identity_flow():
    """Gaussian prior, target S = sum phi^2 (beta = lambda = 0: N(0, 1/2) per site),
    identity flow: E[S + log r] = V - V/2 - V/2 log(2 pi), and KL = that + log Z,
    log Z = V/2 log(pi)."""
    L, n = 4, 200000
    V = L * L
    integrand, _ = log_weights(Flow(L), GaussianPrior(L), Phi4Action(0.0, 0.0), n,
                               np.random.default_rng(1), "cpu")
    expect = V - V / 2 - V / 2 * np.log(2 * np.pi)
    err = integrand.std().item() / np.sqrt(n)
    assert abs(integrand.mean().item() - expect) < 4 * err
    kl = expect + V / 2 * np.log(np.pi)  # KL(N(0,1) || N(0,1/2)) per site = (1 - ln 2)/2
    assert kl == pytest.approx(V * (1 - np.log(2)) / 2)


def train_input(tmp_path, *, L=8, beta=0.25, lam=0.0, iterations=200, lr=0.02, batch=128,
                kernel=3, layers=1, hidden="", ckpt=100, name="tr", stages="train"):
    """A training input ``tmp_path/<name>.ini`` whose output is ``tmp_path/<name>``."""
    return write_ini(tmp_path, f"{name}.ini",
                     run=dict(name=name, output=tmp_path / name, seed=99, stages=stages),
                     theory={"L": L, "beta": beta, "lambda": lam},
                     flow=dict(kernel_size=kernel, layers=layers, hidden=hidden),
                     train=dict(iterations=iterations, batch_size=batch, lr=lr, metropolis=2048,
                                checkpoint_every=ckpt))


@pytest.mark.slow
def test_free_field_is_trivialized(tmp_path):
    """At lambda = 0 an exact linear trivializing map exists (z ~ K^(1/2) phi); the minimal
    flow (one coupling layer, k = 3) trained from a unit Gaussian with the authors' settings
    (Adam, lr 0.01, cosine) gets close at L = 8, beta = 0.2: flow Metropolis acceptance above
    0.9, from below 0.1 for the untrained flow (unit width against the field's ~0.7).  The
    minimal model cannot represent the correlations within one checkerboard sublattice, so
    its best acceptance falls as beta grows (0.89 at beta = 0.25 with these settings)."""
    path = train_input(tmp_path, beta=0.2, iterations=400, lr=0.01, batch=512)
    assert run.main([str(path)]) == 0
    payload = read_flow_file(tmp_path / "tr" / "flow.pt")
    hist = payload["history"]
    assert payload["complete"] and payload["acceptance"] > 0.9, payload["acceptance"]
    assert hist["metropolis"][0]["acceptance"] < 0.1  # it learned
    assert len(hist["loss"]) == 400 and hist["loss"][-1] < hist["loss"][0]
    # the loss approaches its bound -log Z = -(V/2) log(2 pi) + (1/2) sum_p log K(p)
    p = 2 * np.pi * np.arange(8) / 8
    K = 2 - 2 * 0.2 * (np.cos(p)[:, None] + np.cos(p)[None, :])
    minus_log_Z = -32 * np.log(2 * np.pi) + 0.5 * np.log(K).sum()
    assert minus_log_Z < np.mean(hist["loss"][-50:]) < minus_log_Z + 0.05
    saved = json.loads((tmp_path / "tr" / "train.json").read_text())
    assert saved["history"]["loss"] == hist["loss"]
    assert saved["train_time"]["seconds"] > 0


def test_cosine_schedule_and_train_time(tmp_path):
    """lr follows lr (1 + cos(pi k / n)) / 2 and reaches 0; wall time is recorded per rank
    count; a constant schedule keeps lr."""
    from hpcflow.train import make_scheduler

    cfg = config.load(train_input(tmp_path, iterations=8, L=4, lr=0.01))
    assert (cfg.train.schedule, cfg.train.batch_size) == ("cosine", 128)
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    sched = make_scheduler(opt, cfg.train)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expect = [0.01 * (1 + np.cos(np.pi * k / 8)) / 2 for k in range(8)]
    np.testing.assert_allclose(lrs, expect, rtol=1e-12, atol=1e-15)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-15)
    assert run.main([str(tmp_path / "tr.ini")]) == 0
    t = read_flow_file(tmp_path / "tr" / "flow.pt")["train_time"]
    assert t["seconds"] > 0 and list(t["seconds_by_ranks"]) == ["1"]
    assert t["segments"][0]["from"] == 0 and t["segments"][0]["to"] == 8
    defaults = config.parse("[run]\nname=a\noutput=o\nseed=1\nstages=train\n[theory]\nL=4\n"
                            "beta=0.5\n[flow]\n[train]\n", "d.ini").train
    assert (defaults.iterations, defaults.batch_size, defaults.lr, defaults.schedule) == \
        (2000, 500, 0.01, "cosine")


def test_old_family_flow_file_is_refused(tmp_path, capsys):
    """A flow file of hpcflow 0.1's family (format 1) exits 2 naming the family mismatch."""
    path = train_input(tmp_path, iterations=3, L=4)
    assert run.main([str(path)]) == 0
    flow_file = tmp_path / "tr" / "flow.pt"
    payload = torch.load(flow_file, weights_only=False)
    payload["format"] = "hpcflow-flow-1"
    payload["spec"].pop("family")
    torch.save(payload, flow_file)
    path.write_text(path.read_text().replace("stages = train", "stages = fhmc")
                    + "\n[fhmc]\nreplicas = 2\ntrajectories = 5\n")
    capsys.readouterr()
    assert run.main([str(path)]) == 2
    assert not (tmp_path / "tr" / "fhmc.h5").exists()
    err = capsys.readouterr().err
    assert "flow family mismatch" in err and "generative direction" in err and "--force" in err
    with pytest.raises(StageError, match="flow family mismatch"):
        read_flow_file(flow_file)


def test_prior_width_is_refused_with_a_reason(tmp_path, capsys):
    path = train_input(tmp_path, iterations=3, L=4)
    path.write_text(path.read_text().replace("prior = gaussian", "prior = gaussian\nprior_width = 0.35"))
    assert run.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "[flow] prior_width: was removed" in err and "unit width" in err
    assert not (tmp_path / "tr").exists()


def test_flow_file_round_trip_and_refusals(tmp_path):
    path = train_input(tmp_path, iterations=5, L=4)
    assert run.main([str(path)]) == 0
    cfg = config.load(path)
    world = make_world("cpu")
    flow, payload = load_flow(tmp_path / "tr" / "flow.pt", cfg, "cpu")
    assert payload["spec"] == {"family": FAMILY, "L": 4, "kernel_size": 3, "layers": 1,
                               "hidden": [], "block": "pair"}
    assert payload["theory"] == {"L": 4, "beta": 0.25, "lambda": 0.0}
    assert payload["prior"] == "gaussian" and payload["optimizer"] is None
    phi = torch.randn(3, 4, 4)
    state = payload["state_dict"]
    ref = Flow(4)
    ref.load_state_dict(state)
    torch.testing.assert_close(flow.inverse(phi)[0], ref.inverse(phi)[0], rtol=0, atol=0)
    for change, words in ((("L = 4", "L = 6"), "L = 4"), (("kernel_size = 3", "kernel_size = 5"),
                                                            "kernel_size = 3")):
        other = config.parse(path.read_text().replace(*change).replace("L = 4", "L = 6"), "x.ini")
        with pytest.raises(StageError, match=words):
            load_flow(tmp_path / "tr" / "flow.pt", other, "cpu")
    del world


def test_training_resumes_to_the_same_flow(tmp_path, monkeypatch):
    from hpcflow import train as train_mod

    full = train_input(tmp_path, iterations=30, ckpt=10, name="full", L=4)
    assert run.main([str(full)]) == 0
    cut = train_input(tmp_path, iterations=30, ckpt=10, name="cut", L=4)
    real = train_mod.save_flow
    calls = {"n": 0}

    def save_then_die(path, payload):
        real(path, payload)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "save_flow", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run.main([str(cut)])
    assert read_flow_file(tmp_path / "cut" / "flow.pt")["iteration"] == 20
    monkeypatch.setattr(train_mod, "save_flow", real)
    assert run.main([str(cut)]) == 0
    a = read_flow_file(tmp_path / "full" / "flow.pt")
    b = read_flow_file(tmp_path / "cut" / "flow.pt")
    assert a["history"]["loss"] == b["history"]["loss"]
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k


def test_retraining_needs_force(tmp_path, capsys):
    path = train_input(tmp_path, iterations=3, L=4)
    assert run.main([str(path)]) == 0
    assert run.main([str(path)]) == 0 and "skipped" in capsys.readouterr().out
    path.write_text(path.read_text().replace("lr = 0.02", "lr = 0.01"))
    assert run.main([str(path)]) == 2 and "different input" in capsys.readouterr().err
    assert run.main([str(path), "--force"]) == 0


def test_fhmc_without_flow_is_refused(tmp_path, capsys):
    path = train_input(tmp_path, L=4, stages="fhmc")
    path.write_text(path.read_text() + "\n[fhmc]\nreplicas = 2\ntrajectories = 5\n")
    assert run.main([str(path)]) == 2
    assert "no trained flow" in capsys.readouterr().err
