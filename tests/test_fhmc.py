"""Flow HMC: the flowed action, identity flow = HMC, exactness for any flow."""

import json

import numpy as np
import pytest
import torch

from conftest import randomised, write_ini
from hpcflow import run
from hpcflow.action import FlowedAction, Phi4Action
from hpcflow.flows import Flow, IdentityFlow
from hpcflow.hmc import INTEGRATORS, hmc_step, init_state
from hpcflow.parallel import ReplicaStreams

TARGET = Phi4Action(0.576, 0.5)


def random_flow(L=4, seed=0, **kw):
    return randomised(Flow(L, **kw), seed)


def test_flowed_action_definition():
    flow = random_flow()
    act = FlowedAction(TARGET, flow)
    z = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(1))
    phi, logdet_g = flow.inverse(z)
    torch.testing.assert_close(act.action(z), TARGET.action(phi) - logdet_g)
    # S~(f(phi)) = S(phi) + log|det df/dphi|
    z_back, logdet_f = flow.forward(phi)
    torch.testing.assert_close(act.action(z_back), TARGET.action(phi) + logdet_f)
    torch.testing.assert_close(act.to_physical(z), phi)


def test_flowed_force_is_minus_gradient_by_finite_differences():
    act = FlowedAction(TARGET, random_flow(kernel_size=3, hidden=(4,)))
    phi_t = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(2))
    F = act.force(phi_t)
    h = 1e-5
    for i, j in [(0, 0), (1, 2), (3, 3), (2, 1)]:
        e = torch.zeros_like(phi_t)
        e[:, i, j] = h
        fd = -(act.action(phi_t + e) - act.action(phi_t - e)) / (2 * h)
        np.testing.assert_allclose(F[:, i, j].numpy(), fd.numpy(), rtol=1e-6, atol=1e-8)


def test_identity_flow_reproduces_hmc_step_for_step():
    """Same streams, same chain: HMC on S and FHMC with f = identity agree to rounding."""
    B, L = 6, 8
    runs = []
    for action in (TARGET, FlowedAction(TARGET, IdentityFlow()), FlowedAction(TARGET, Flow(L))):
        streams = ReplicaStreams(11, range(B), "same")
        state = init_state(action, streams.normal((L, L), "cpu"))
        phis, accepts = [], []
        for _ in range(40):
            state, info = hmc_step(action, state, streams.normal((L, L), "cpu"),
                                   streams.log_uniform("cpu"), INTEGRATORS["leapfrog"], 1.0, 5)
            phis.append(state.phi)
            accepts.append(info.accepted)
        runs.append((torch.stack(phis), torch.stack(accepts)))
    (phi_hmc, acc_hmc) = runs[0]
    assert 0 < acc_hmc.float().mean() < 1  # some rejections: the decisions are compared too
    for phi, acc in runs[1:]:
        assert torch.equal(acc, acc_hmc)
        torch.testing.assert_close(phi, phi_hmc, rtol=0, atol=1e-11)


def fhmc_input(tmp_path, *, L, beta, lam, replicas, trajectories, iterations, name="f",
               hmc=True, seed=5, steps=8):
    """HMC (when ``hmc``), training and FHMC of the minimal flow, then the analysis;
    output ``tmp_path/<name>``."""
    chains = dict(replicas=replicas, trajectories=trajectories, thermalization=50, steps=steps)
    return write_ini(tmp_path, f"{name}.ini",
                     run=dict(name=name, output=tmp_path / name, seed=seed, checkpoint_every=500,
                              stages=f"{'hmc, ' if hmc else ''}train, fhmc, analysis"),
                     theory={"L": L, "beta": beta, "lambda": lam},
                     hmc=chains, flow={}, fhmc=chains,
                     train=dict(iterations=iterations, batch_size=64, lr=0.01, metropolis=512))


def results(d):
    js = json.loads((d / "analysis.json").read_text())
    js = [js] if isinstance(js, dict) else js
    return {j["algorithm"]: j for j in js}


@pytest.mark.slow
def test_free_field_fhmc_is_exact(tmp_path):
    """Free-field FHMC with a briefly trained flow reproduces chi and xi2 exactly."""
    beta = 0.4
    path = fhmc_input(tmp_path, L=8, beta=beta, lam=0.0, replicas=16, trajectories=500,
                      iterations=30, hmc=False)
    assert run.main([str(path)]) == 0
    js = results(tmp_path / "f")["fhmc"]
    assert js["flow"]["prior"] == "gaussian" and js["flow"]["acceptance"] is not None
    for key, exact in (("chi", 1 / (2 - 4 * beta)), ("xi2", (beta / (2 - 4 * beta)) ** 0.5)):
        o = js["observables"][key]
        assert o["error"] < 0.06 * exact
        assert abs(o["value"] - exact) < 3 * o["error"], (key, o, exact)


@pytest.mark.slow
def test_fhmc_agrees_with_hmc_in_the_interacting_theory(tmp_path):
    """L = 8, beta = 0.576: FHMC and HMC give the same |M| and chi within errors."""
    path = fhmc_input(tmp_path, L=8, beta=0.576, lam=0.5, replicas=16, trajectories=800,
                      iterations=50, steps=10)
    assert run.main([str(path)]) == 0
    r = results(tmp_path / "f")
    for key in ("absM", "chi"):
        a, b = r["hmc"]["observables"][key], r["fhmc"]["observables"][key]
        sigma = (a["error"] ** 2 + b["error"] ** 2) ** 0.5
        assert a["error"] < 0.1 * a["value"] and b["error"] < 0.1 * b["value"]
        assert abs(a["value"] - b["value"]) < 3 * sigma, (key, a, b)
