"""Integrators and HMC: reversibility, order, <exp(-dH)> = 1, exact free-field results."""

import math

import numpy as np
import pytest
import torch

from hpcflow.action import Phi4Action
from hpcflow.hmc import INTEGRATORS, hmc_step, init_state, kinetic
from hpcflow.parallel import ReplicaStreams

ACTION = Phi4Action(0.576, 0.5)


def equilibrated(action, B=16, L=8, n=60, seed=5):
    """Configurations after n HMC trajectories from a hot start."""
    streams = ReplicaStreams(seed, range(B), "test")
    state = init_state(action, streams.normal((L, L), "cpu"))
    for _ in range(n):
        state, _ = hmc_step(action, state, streams.normal((L, L), "cpu"),
                            streams.log_uniform("cpu"), INTEGRATORS["omf2"], 1.0, 10)
    return state.phi, streams


class HarmonicAction:
    """S = (w^2/2) sum phi^2, whose orbits are known exactly."""

    def __init__(self, w):
        self.w = w

    def action(self, phi):
        return 0.5 * self.w**2 * (phi * phi).flatten(1).sum(1)

    def force(self, phi):
        return -self.w**2 * phi


@pytest.mark.parametrize("name", INTEGRATORS)
def test_harmonic_orbit(name):
    """Each scheme converges to the exact orbit phi(t) = phi0 cos wt + pi0/w sin wt."""
    w, tau = 1.3, 1.0
    phi0, pi0 = torch.tensor([[[0.7]]]), torch.tensor([[[-0.4]]])
    exact = phi0 * math.cos(w * tau) + pi0 / w * math.sin(w * tau)
    errors = []
    for n in (10, 20, 40):
        phi, _ = INTEGRATORS[name](phi0, pi0, HarmonicAction(w).force, tau / n, n)
        errors.append(abs((phi - exact).item()))
    order = INTEGRATORS[name].order
    for e1, e2 in zip(errors, errors[1:]):
        assert math.log2(e1 / e2) == pytest.approx(order, abs=0.2)


@pytest.mark.parametrize("name", INTEGRATORS)
def test_reversibility(name):
    """Forward, flip momenta, forward again: back to the start, to rounding."""
    phi0, streams = equilibrated(ACTION, B=4)
    pi0 = streams.normal((8, 8), "cpu")
    integ = INTEGRATORS[name]
    phi1, pi1 = integ(phi0, pi0, ACTION.force, 0.1, 10)
    phi2, pi2 = integ(phi1, -pi1, ACTION.force, 0.1, 10)
    assert (phi1 - phi0).abs().max() > 0.1  # it moved
    assert (phi2 - phi0).abs().max() < 1e-12
    assert (pi2 + pi0).abs().max() < 1e-12


@pytest.mark.parametrize("name", INTEGRATORS)
def test_dH_scales_with_order(name):
    """rms dH over fixed (phi, pi) falls as eps^p: log2 of successive ratios ~ p."""
    phi0, streams = equilibrated(ACTION)
    pi0 = streams.normal((8, 8), "cpu")
    H0 = kinetic(pi0) + ACTION.action(phi0)
    integ = INTEGRATORS[name]
    rms = []
    for n in (8, 16, 32):
        phi, pi = integ(phi0, pi0, ACTION.force, 1.0 / n, n)
        dH = kinetic(pi) + ACTION.action(phi) - H0
        rms.append(dH.pow(2).mean().sqrt().item())
    slopes = [math.log2(a / b) for a, b in zip(rms, rms[1:])]
    assert slopes == pytest.approx([integ.order] * 2, abs=0.3), (rms, slopes)


def test_force_evaluations_per_step():
    assert [INTEGRATORS[n].forces_per_step for n in ("leapfrog", "omf2", "omf4")] == [1, 2, 5]
    for integ in INTEGRATORS.values():
        assert sum(integ.kicks) == pytest.approx(1.0) and sum(integ.drifts) == pytest.approx(1.0)
        assert integ.kicks == integ.kicks[::-1] and integ.drifts == integ.drifts[::-1]


def test_exp_minus_dH_is_one():
    """<exp(-dH)> = 1 in equilibrium (Creutz), with a coarse step so dH is not tiny."""
    import pyerrors as pe

    B, L = 32, 8
    phi, streams = equilibrated(ACTION, B=B)
    state = init_state(ACTION, phi)
    series = []
    for _ in range(200):
        state, info = hmc_step(ACTION, state, streams.normal((L, L), "cpu"),
                               streams.log_uniform("cpu"), INTEGRATORS["leapfrog"], 1.0, 4)
        series.append(torch.exp(-info.dH).numpy())
    x = np.array(series).T
    assert x.std() > 0.1  # dH is not negligible: the check has teeth
    o = pe.Obs(list(x), [f"t|r{r:03d}" for r in range(B)])
    o.gamma_method()
    assert abs(o.value - 1) < 3 * o.dvalue, (o.value, o.dvalue)


def test_metropolis_rejects_and_keeps_state():
    """A rejected chain keeps phi and S exactly; an accepted one takes the new ones."""
    B, L = 4, 4
    streams = ReplicaStreams(9, range(B), "test")
    state = init_state(ACTION, streams.normal((L, L), "cpu"))
    pi = streams.normal((L, L), "cpu")
    log_u = torch.tensor([-1e300, 0.0, -1e300, 0.0])  # accept, reject unless dH < 0, ...
    new, info = hmc_step(ACTION, state, pi, log_u, INTEGRATORS["leapfrog"], 1.0, 10)
    for b in range(B):
        if info.accepted[b]:
            assert not torch.equal(new.phi[b], state.phi[b])
        else:
            assert torch.equal(new.phi[b], state.phi[b]) and new.S[b] == state.S[b]
    assert bool(info.accepted[0]) and bool(info.accepted[2])
    assert bool(info.accepted[1]) == bool(info.dH[1] < 0)
    torch.testing.assert_close(new.S, ACTION.action(new.phi))


def test_hmc_step_takes_a_fused_steps_info_at_the_default_threshold_only():
    """A fused step's six numbers (hmc.metropolis_info) give HMCInfo as they are; with another
    divergence_threshold hmc_step recomputes probability and divergence from dH."""
    from hpcflow.hmc import DIVERGENCE_THRESHOLD, HMCState, hmc_step, metropolis_info

    action = Phi4Action(beta=0.5, lam=0.5)
    phi = torch.zeros(3, 4, 4, dtype=torch.float64)
    pi = torch.ones(3, 4, 4, dtype=torch.float64)
    dH = torch.tensor([0.5, -2.0, 5e3], dtype=torch.float64)

    class Fused:
        @staticmethod
        def step(phi, S, pi, log_u):  # a stand-in whose info is recognisably its own
            return (phi, S, dH, log_u < -dH, torch.full_like(dH, 0.25),
                    torch.tensor([True, False, True]))

    state = HMCState(phi, action.action(phi))
    log_u = torch.zeros(3, dtype=torch.float64)
    _, info = hmc_step(action, state, pi, log_u, "leapfrog", 1.0, 2, trajectory=Fused)
    assert info.acceptance_probability.tolist() == [0.25] * 3
    assert info.divergent.tolist() == [True, False, True]
    _, info = hmc_step(action, state, pi, log_u, "leapfrog", 1.0, 2, trajectory=Fused,
                       divergence_threshold=1.0)
    torch.testing.assert_close(info.acceptance_probability, torch.exp(torch.clamp(-dH, max=0)))
    assert info.divergent.tolist() == [False, True, True]
    # and metropolis_info's own pair is trajectory_info at the default threshold
    out = metropolis_info(phi, state.S, pi, phi, pi, state.S + dH, log_u)
    assert out[5].tolist() == (dH.abs() > DIVERGENCE_THRESHOLD).tolist()
    torch.testing.assert_close(out[4], torch.exp(torch.clamp(-out[2], max=0)))
