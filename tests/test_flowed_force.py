"""The analytic flowed force (FrozenFlow pullback) against autograd, finite differences and
a reversible FHMC trajectory, for every flow architecture."""

import pytest
import torch

from conftest import randomised
from hpcflow.action import FlowedAction, Phi4Action
from hpcflow.flow import (AffineCoupling, Flow, FrozenFlow, IdentityFlow, from_sublattices,
                          to_sublattices)
from hpcflow.hmc import INTEGRATORS

TARGET = Phi4Action(0.576, 0.5)
METHODS = ("sparse", "fft")


def fields(L, batch=3, seed=11, scale=0.5):
    return scale * torch.randn(batch, L, L, generator=torch.Generator().manual_seed(seed),
                               dtype=torch.float64)


class Pinned(torch.nn.Module):
    """``flow`` whose ``frozen()`` uses the given method (FlowedAction calls ``frozen()``)."""

    def __init__(self, flow, method):
        super().__init__()
        self.flow, self.method = flow, method

    def inverse(self, phi_t):
        return self.flow.inverse(phi_t)

    def frozen(self):
        return self.flow.frozen(self.method)


def flowed(flow, method):
    """FlowedAction over ``flow`` whose analytic force uses ``method``."""
    act = FlowedAction(TARGET, Pinned(flow, method))
    assert act.frozen_flow().method == method
    return act


def assert_forces_close(actual, expected, rtol=1e-11, atol=1e-12):
    """Elementwise rtol/atol, atol relative to the largest force (rounding scales with it)."""
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale)


# (L, kernel_size, layers, hidden, block)
ARCHITECTURES = [
    (4, 3, 1, (), "pair"),
    (4, 3, 2, (), "single"),
    (4, 1, 1, (), "pair"),
    (4, 3, 1, (4,), "pair"),
    (4, 3, 2, (3, 2), "pair"),
    (4, 3, 1, (2,), "single"),
    (8, 3, 1, (), "pair"),
    (8, 5, 1, (), "pair"),
    (8, 7, 1, (), "pair"),
    (8, 3, 2, (), "pair"),
    (8, 5, 2, (), "single"),
    (8, 7, 1, (), "single"),
    (8, 3, 1, (4,), "pair"),
    (8, 5, 1, (4,), "single"),
    (8, 7, 1, (3, 2), "pair"),
    (8, 3, 2, (3, 2), "single"),
    (8, 5, 2, (4,), "pair"),
]
ARCH_IDS = [f"L{L}-k{k}-n{n}-h{'x'.join(map(str, h)) or 0}-{b}"
            for L, k, n, h, b in ARCHITECTURES]


@pytest.mark.parametrize("L, kernel, layers, hidden, block", ARCHITECTURES, ids=ARCH_IDS)
@pytest.mark.parametrize("method", METHODS)
def test_analytic_force_equals_autograd(L, kernel, layers, hidden, block, method):
    flow = Flow(L, kernel, layers, hidden, block)
    # weights of std 0.3 (as in test_flow) with up to two coupling layers; deeper flows
    # compound exp(|s|) and need smaller ones to keep phi = f^-1(phi~) of order one
    std = 0.3 if len(flow.couplings) <= 2 else 0.15
    randomised(flow, seed=L + 10 * kernel + layers, std=std)
    act = flowed(flow, method)
    phi_t = fields(L)
    reference = act.force_autograd(phi_t)
    assert reference.abs().max() > 1.0
    force = act.force(phi_t)
    assert force.shape == phi_t.shape and force.dtype == torch.float64
    assert_forces_close(force, reference)
    # the frozen inverse and the action agree with the module
    phi, logdet = flow.inverse(phi_t)
    phi_f, logdet_f = flow.frozen(method).inverse(phi_t)
    torch.testing.assert_close(phi_f, phi, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logdet_f, logdet, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(act.action(phi_t), TARGET.action(phi) - logdet,
                               rtol=1e-12, atol=1e-10)
    assert logdet.abs().min() > 0.1


@pytest.mark.parametrize("method", METHODS)
def test_inverse_with_pullback_returns_inverse_and_logdet(method):
    L = 8
    flow = randomised(Flow(L, 3, 1, (2,)), 3)
    phi_t = fields(L)
    phi, logdet, pullback = flow.frozen(method).inverse_with_pullback(phi_t)
    ref_phi, ref_logdet = flow.inverse(phi_t)
    torch.testing.assert_close(phi, ref_phi, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logdet, ref_logdet, rtol=1e-12, atol=1e-12)
    # pullback(F) = J^T F + grad log|det J|, linear in F with J^T from autograd
    F = fields(L, seed=5)
    x = phi_t.clone().requires_grad_(True)
    y, ld = flow.inverse(x)
    (expected,) = torch.autograd.grad((y * F).sum() + ld.sum(), x)
    assert_forces_close(pullback(F), expected)
    assert_forces_close(pullback(F), expected)   # the closure can be used twice


def test_auto_method_picks_sparse_for_small_and_fft_for_large_nets():
    assert Flow(8).frozen().method == "sparse"
    assert Flow(8, 7).frozen().method == "sparse"
    assert Flow(8, 3, hidden=(4,)).frozen().method == "sparse"
    assert Flow(8, 5, hidden=(8, 8)).frozen().method == "fft"
    with pytest.raises(ValueError, match="method"):
        Flow(8).frozen("dense")


@pytest.mark.parametrize("method", METHODS)
def test_single_coupling_layer_as_flow(method):
    L = 8
    layer = randomised(AffineCoupling(L, 1, 3, (3,)), 4)
    act = flowed(layer, method)
    phi_t = fields(L)
    assert_forces_close(act.force(phi_t), act.force_autograd(phi_t))


def test_identity_flow():
    act = FlowedAction(TARGET, IdentityFlow())
    assert isinstance(act.frozen_flow(), FrozenFlow)
    phi_t = fields(6)
    assert torch.equal(act.force(phi_t), TARGET.force(phi_t))
    assert torch.equal(act.action(phi_t), TARGET.action(phi_t))
    assert_forces_close(act.force(phi_t), act.force_autograd(phi_t))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("hidden", [(), (3,)])
def test_fresh_flow_force_is_the_target_force(method, hidden):
    """A freshly built flow is the identity: its analytic force is the target's."""
    L = 8
    flow = Flow(L, 3, 2, hidden)
    act = flowed(flow, method)
    phi_t = fields(L)
    torch.testing.assert_close(act.force(phi_t), TARGET.force(phi_t), rtol=0, atol=1e-14)
    torch.testing.assert_close(act.action(phi_t), TARGET.action(phi_t), rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("hidden", [(), (2,)])
def test_subgradient_of_abs_s_at_zero(method, hidden):
    """At phi~ = 0 with zero biases s = 0 exactly; d|s|/ds = +1 there, as in the module."""
    L = 4
    flow = randomised(Flow(L, 3, 1, hidden), 6)
    with torch.no_grad():
        for name, p in flow.named_parameters():
            if name.endswith("bias"):
                p.zero_()
    act = flowed(flow, method)
    phi_t = torch.zeros(2, L, L, dtype=torch.float64)
    reference = act.force_autograd(phi_t)
    assert reference.abs().max() > 0.1   # the log-det term alone
    assert_forces_close(act.force(phi_t), reference)


def test_analytic_force_matches_finite_differences():
    L = 8
    act = FlowedAction(TARGET, randomised(Flow(L, 5, 1, (3,)), 7))
    phi_t = fields(L, batch=2, seed=3)
    F = act.force(phi_t)
    h = 1e-5
    for i, j in [(0, 0), (1, 2), (3, 7), (6, 5)]:
        e = torch.zeros_like(phi_t)
        e[:, i, j] = h
        fd = -(act.action(phi_t + e) - act.action(phi_t - e)) / (2 * h)
        torch.testing.assert_close(F[:, i, j], fd, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kwargs", [{}, {"hidden": (3,), "block": "single", "layers": 2}])
def test_fhmc_trajectory_is_reversible(kwargs):
    """Leapfrog with the analytic force: forward, flip the momenta, back = the start."""
    L, B = 8, 4
    act = FlowedAction(TARGET, randomised(Flow(L, **kwargs), 8, std=0.1))
    g = torch.Generator().manual_seed(9)
    phi0 = 0.5 * torch.randn(B, L, L, generator=g, dtype=torch.float64)
    pi0 = torch.randn(B, L, L, generator=g, dtype=torch.float64)
    leapfrog = INTEGRATORS["leapfrog"]
    phi1, pi1 = leapfrog(phi0, pi0, act.force, 0.05, 20)
    assert (phi1 - phi0).abs().max() > 0.1
    H0 = 0.5 * (pi0 ** 2).sum((1, 2)) + act.action(phi0)
    H1 = 0.5 * (pi1 ** 2).sum((1, 2)) + act.action(phi1)
    assert (H1 - H0).abs().max() < 0.5                 # a consistent force conserves H
    phi2, pi2 = leapfrog(phi1, -pi1, act.force, 0.05, 20)
    torch.testing.assert_close(phi2, phi0, rtol=0, atol=1e-11)
    torch.testing.assert_close(-pi2, pi0, rtol=0, atol=1e-11)


def test_flow_without_frozen_falls_back_to_autograd():
    class OnlyInverse(torch.nn.Module):
        def __init__(self, flow):
            super().__init__()
            self.flow = flow

        def inverse(self, phi_t):
            return self.flow.inverse(phi_t)

    L = 4
    flow = randomised(Flow(L, hidden=(2,)), 12)
    act = FlowedAction(TARGET, OnlyInverse(flow))
    assert act.frozen_flow() is None
    phi_t = fields(L)
    assert torch.equal(act.force(phi_t), act.force_autograd(phi_t))
    analytic = FlowedAction(TARGET, flow)
    assert_forces_close(analytic.force(phi_t), act.force(phi_t))
    torch.testing.assert_close(analytic.action(phi_t), act.action(phi_t), rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(analytic.to_physical(phi_t), act.to_physical(phi_t),
                               rtol=0, atol=1e-12)


def test_frozen_flow_follows_in_place_weight_changes():
    L = 4
    flow = randomised(Flow(L), 13)
    act = FlowedAction(TARGET, flow)
    phi_t = fields(L)
    before = act.force(phi_t)
    randomised(flow, 14)                       # in-place copy_: the version counters move
    after = act.force(phi_t)
    assert (after - before).abs().max() > 1e-3
    assert_forces_close(after, act.force_autograd(phi_t))
    with torch.no_grad():
        flow.couplings[0].t[0].bias.data.add_(0.5)   # through .data: invisible, refresh()
    act.refresh()
    assert_forces_close(act.force(phi_t), act.force_autograd(phi_t))


def test_batch_shapes_and_wrong_lattice():
    L = 4
    flow = randomised(Flow(L, hidden=(2,)), 15)
    act = FlowedAction(TARGET, flow)
    one = fields(L, batch=1)
    assert_forces_close(act.force(one), act.force_autograd(one))
    with pytest.raises(ValueError):
        act.force(torch.zeros(2, 6, 6, dtype=torch.float64))


@pytest.mark.parametrize("L", [2, 4, 6])
def test_sublattice_coordinates(L):
    phi = fields(L, batch=2)
    sub = to_sublattices(phi)
    assert sub.shape == (2, 2, L, L // 2)
    for sigma in (0, 1):
        for a in range(L):
            for b in range(L // 2):
                x1 = (a + 2 * b + sigma) % L
                assert (a + x1) % 2 == sigma
                assert torch.equal(sub[:, sigma, a, b], phi[:, a, x1])
    assert torch.equal(from_sublattices(sub[:, 0], sub[:, 1]), phi)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("hidden", [(), (3,)])
def test_analytic_force_on_cuda(method, hidden):
    L = 8
    flow = randomised(Flow(L, 3, 2, hidden), 16)
    phi_t = fields(L)
    cpu = flowed(flow, method)
    F_cpu, S_cpu = cpu.force(phi_t), cpu.action(phi_t)
    gpu = flowed(flow.to("cuda"), method)
    x = phi_t.to("cuda")
    F = gpu.force(x)
    assert F.device.type == "cuda" and F.dtype == torch.float64
    assert_forces_close(F.cpu(), F_cpu)
    torch.testing.assert_close(gpu.action(x).cpu(), S_cpu, rtol=1e-12, atol=1e-10)
    assert_forces_close(F, gpu.force_autograd(x))
