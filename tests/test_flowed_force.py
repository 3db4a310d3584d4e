"""The analytic flowed force (FrozenFlow pullback) against autograd, finite differences and
a reversible FHMC trajectory, for every flow architecture of the family and both backends
of FrozenFlow (sparse site matrices and products in Fourier space)."""

import pytest
import torch

from conftest import randomised
from hpcflow.action import FlowedAction, Phi4Action
from hpcflow.flows import AffineCoupling, Flow, FrozenFlow, IdentityFlow
from hpcflow.flows.fft import from_sublattices, to_sublattices
from hpcflow.hmc import INTEGRATORS

TARGET = Phi4Action(0.576, 0.5)
METHODS = ("sparse", "fft")


def fields(L, batch=3, seed=11, scale=1.0):
    return scale * torch.randn(batch, L, L, generator=torch.Generator().manual_seed(seed),
                               dtype=torch.float64)


class Pinned(torch.nn.Module):
    """``flow`` whose ``frozen()`` uses the given method (FlowedAction calls ``frozen()``)."""

    def __init__(self, flow, method):
        super().__init__()
        self.flow, self.method = flow, method

    def inverse(self, z):
        return self.flow.inverse(z)

    def frozen(self):
        return self.flow.frozen(self.method)


def flowed(flow, method):
    """FlowedAction over ``flow`` whose analytic force uses the backend ``method``."""
    act = FlowedAction(TARGET, Pinned(flow, method))
    assert act.frozen.method == method
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
    """Includes tanh' of every net and the global scale lambda (randomised, != 0)."""
    flow = randomised(Flow(L, kernel, layers, hidden, block), seed=L + 10 * kernel + layers)
    assert flow.scale.log_scale.item() != 0
    act = flowed(flow, method)
    z = fields(L)
    reference = act.force_autograd(z)
    assert reference.abs().max() > 1.0
    force = act.force(z)
    assert force.shape == z.shape and force.dtype == torch.float64
    assert_forces_close(force, reference)
    # the frozen generator and the action agree with the module
    phi, logdet = flow.inverse(z)
    phi_f, logdet_f = flow.frozen(method).inverse(z)
    torch.testing.assert_close(phi_f, phi, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logdet_f, logdet, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(act.action(z), TARGET.action(phi) - logdet, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(act.to_physical(z), phi, rtol=1e-12, atol=1e-12)
    assert logdet.abs().min() > 0.1


@pytest.mark.parametrize("method", METHODS)
def test_inverse_with_pullback_returns_inverse_and_logdet(method):
    L = 8
    flow = randomised(Flow(L, 3, 1, (2,)), 3)
    z = fields(L)
    phi, logdet, pullback = flow.frozen(method).inverse_with_pullback(z)
    ref_phi, ref_logdet = flow.inverse(z)
    torch.testing.assert_close(phi, ref_phi, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logdet, ref_logdet, rtol=1e-12, atol=1e-12)
    # pullback(F) = J^T F + grad log|det J|, linear in F with J^T from autograd
    F = fields(L, seed=5)
    x = z.clone().requires_grad_(True)
    y, ld = flow.inverse(x)
    (expected,) = torch.autograd.grad((y * F).sum() + ld.sum(), x)
    assert_forces_close(pullback(F), expected)
    assert_forces_close(pullback(F), expected)   # the closure can be used twice


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("parity", [0, 1])
def test_single_coupling_step_as_flow(method, parity):
    L = 8
    layer = randomised(AffineCoupling(L, parity, 3, (3,)), 4)
    act = flowed(layer, method)
    z = fields(L)
    assert_forces_close(act.force(z), act.force_autograd(z))


@pytest.mark.parametrize("method", ("auto", *METHODS))
def test_identity_flow(method):
    act = FlowedAction(TARGET, Pinned(IdentityFlow(), method))
    assert isinstance(act.frozen, FrozenFlow) and act.frozen.is_identity
    assert act.frozen.method is None       # no layers, no backend
    z = fields(6)
    assert torch.equal(act.force(z), TARGET.force(z))
    assert torch.equal(act.action(z), TARGET.action(z))
    assert_forces_close(act.force(z), act.force_autograd(z))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("hidden", [(), (3,)])
def test_fresh_flow_force_is_the_target_force(method, hidden):
    """A freshly built flow is the identity: its analytic force is the target's."""
    L = 8
    act = flowed(Flow(L, 3, 2, hidden), method)
    z = fields(L)
    torch.testing.assert_close(act.force(z), TARGET.force(z), rtol=0, atol=1e-14)
    torch.testing.assert_close(act.action(z), TARGET.action(z), rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("hidden", [(), (2,)])
def test_subgradient_of_abs_s_at_zero(method, hidden):
    """At z = 0 bias-free nets give s = t = 0 exactly, in every step; d|s|/ds = +1 there, as
    in the module, so the log-det term still pushes."""
    L = 4
    act = flowed(randomised(Flow(L, 3, 1, hidden), 6), method)
    z = torch.zeros(2, L, L, dtype=torch.float64)
    reference = act.force_autograd(z)
    assert reference.abs().max() > 0.1   # the log-det term alone
    assert_forces_close(act.force(z), reference)


# (kernel_size, hidden, the faster backend at L = 16 and at L = 32 in
# results/frozen-backends-cpu.json, CPU); see the module docstring of hpcflow.flows.frozen
AUTO_CASES = [
    (3, (), "sparse"), (5, (), "sparse"), (7, (), "sparse"),
    (3, (8,), "sparse"), (3, (16,), "sparse"), (3, (4, 4), "sparse"),
    (7, (8,), "fft"), (3, (12, 12), "fft"), (3, (16, 16), "fft"),
    (5, (4, 4), "fft"), (5, (8, 8), "fft"), (7, (8, 8), "fft"),
]


@pytest.mark.parametrize("kernel, hidden, expected", AUTO_CASES)
def test_auto_method_follows_the_cpu_benchmark(kernel, hidden, expected):
    """The rule depends on the conv shapes only, not on L."""
    flow = Flow(8, kernel, 1, hidden)
    assert flow.frozen().method == expected
    assert flow.frozen("auto").method == expected
    assert FrozenFlow(flow.couplings, 8).method == expected
    assert AffineCoupling(8, 1, kernel, hidden).frozen().method == expected
    for method in METHODS:
        assert flow.frozen(method).method == method


def test_auto_method_picks_sparse_for_the_minimal_model_and_rejects_unknown_methods():
    assert Flow(8).frozen().method == "sparse"
    assert Flow(16, 3, 2, block="single").frozen().method == "sparse"
    assert IdentityFlow().frozen().method is None
    for module in (Flow(8), AffineCoupling(8, 0), IdentityFlow()):
        for method in ("dense", "Sparse", None):
            with pytest.raises(ValueError, match="method"):
                module.frozen(method)
    with pytest.raises(ValueError, match="method"):
        FrozenFlow(Flow(4).couplings, 4, 0.0, "fourier")


def test_frozen_backends_benchmark_writes_its_table(tmp_path, monkeypatch):
    """``python -m hpcflow.bench --frozen-backends`` on two tiny cases, then with a limit that
    skips everything (measured, then predicted from the smaller lattice)."""
    import json

    from hpcflow import bench

    monkeypatch.setattr(bench, "FROZEN_CASES", [(4, 3, ()), (8, 3, (2,))])
    out = tmp_path / "frozen.json"
    assert bench.main(["--frozen-backends", "--repeat", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["machine"]["hpcflow"] and result["machine"]["threads"] == 1
    rows = result["frozen_backends"]["rows"]
    assert [(r["L"], r["kernel_size"], r["hidden"]) for r in rows] == [(4, 3, []), (8, 3, [2])]
    for r in rows:
        assert r["sparse"]["seconds"] > 0 and r["fft"]["seconds"] > 0
        assert r["fft_over_sparse"] == pytest.approx(r["fft"]["seconds"] / r["sparse"]["seconds"])
        assert r["auto"] == "sparse" and r["B"] == 64
    assert rows[1]["k2_cin_cout"] == 2 * 9 * 2 and rows[1]["max_k2_cin"] == 18

    monkeypatch.setattr(bench, "FROZEN_CASES", [(4, 3, ()), (8, 3, ())])
    assert bench.main(["--frozen-backends", "--max-seconds", "1e-9", "--out", str(out)]) == 0
    small, large = json.loads(out.read_text())["frozen_backends"]["rows"]
    for method in METHODS:
        assert small[method]["skipped"] and small[method]["first_seconds"] > 1e-9
        assert large[method]["skipped"] and "predicted_seconds" in large[method]
    assert "fft_over_sparse" not in small


@pytest.mark.parametrize("L", [2, 4, 6])
def test_sublattice_coordinates(L):
    z = fields(L, batch=2)
    sub = to_sublattices(z)
    assert sub.shape == (2, 2, L, L // 2)
    for sigma in (0, 1):
        for a in range(L):
            for b in range(L // 2):
                x1 = (a + 2 * b + sigma) % L
                assert (a + x1) % 2 == sigma
                assert torch.equal(sub[:, sigma, a, b], z[:, a, x1])
    assert torch.equal(from_sublattices(sub[:, 0], sub[:, 1]), z)


def test_analytic_force_matches_finite_differences():
    L = 8
    act = FlowedAction(TARGET, randomised(Flow(L, 5, 1, (3,)), 7))
    z = fields(L, batch=2, seed=3)
    F = act.force(z)
    h = 1e-5
    for i, j in [(0, 0), (1, 2), (3, 7), (6, 5)]:
        e = torch.zeros_like(z)
        e[:, i, j] = h
        fd = -(act.action(z + e) - act.action(z - e)) / (2 * h)
        torch.testing.assert_close(F[:, i, j], fd, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kwargs", [{}, {"hidden": (3,), "block": "single", "layers": 2}])
def test_fhmc_trajectory_is_reversible(kwargs, method):
    """Leapfrog with the analytic force: forward, flip the momenta, back = the start."""
    L, B = 8, 4
    act = flowed(randomised(Flow(L, **kwargs), 8, std=0.3), method)
    g = torch.Generator().manual_seed(9)
    z0 = 0.5 * torch.randn(B, L, L, generator=g, dtype=torch.float64)
    pi0 = torch.randn(B, L, L, generator=g, dtype=torch.float64)
    leapfrog = INTEGRATORS["leapfrog"]
    z1, pi1 = leapfrog(z0, pi0, act.force, 0.05, 20)
    assert (z1 - z0).abs().max() > 0.1
    H0 = 0.5 * (pi0 ** 2).sum((1, 2)) + act.action(z0)
    H1 = 0.5 * (pi1 ** 2).sum((1, 2)) + act.action(z1)
    assert (H1 - H0).abs().max() < 0.5                 # a consistent force conserves H
    z2, pi2 = leapfrog(z1, -pi1, act.force, 0.05, 20)
    torch.testing.assert_close(z2, z0, rtol=0, atol=1e-11)
    torch.testing.assert_close(-pi2, pi0, rtol=0, atol=1e-11)


def test_flow_without_frozen_falls_back_to_autograd():
    class OnlyInverse(torch.nn.Module):
        def __init__(self, flow):
            super().__init__()
            self.flow = flow

        def inverse(self, z):
            return self.flow.inverse(z)

    L = 4
    flow = randomised(Flow(L, hidden=(2,)), 12)
    act = FlowedAction(TARGET, OnlyInverse(flow))
    assert act.frozen is None
    z = fields(L)
    assert torch.equal(act.force(z), act.force_autograd(z))
    analytic = FlowedAction(TARGET, flow)
    assert_forces_close(analytic.force(z), act.force(z))
    torch.testing.assert_close(analytic.action(z), act.action(z), rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(analytic.to_physical(z), act.to_physical(z), rtol=0, atol=1e-12)


def test_action_takes_a_snapshot_and_leaves_the_flow_alone():
    """FlowedAction neither follows later weight changes nor touches the caller's module."""
    L = 4
    flow = randomised(Flow(L), 13)
    act = FlowedAction(TARGET, flow)
    assert all(p.requires_grad for p in flow.parameters())
    z = fields(L)
    before, before_autograd = act.force(z), act.force_autograd(z)
    randomised(flow, 14)
    assert torch.equal(act.force(z), before)
    assert torch.equal(act.force_autograd(z), before_autograd)
    assert (FlowedAction(TARGET, flow).force(z) - before).abs().max() > 1e-3


def test_batch_shapes_and_wrong_lattice():
    L = 4
    act = FlowedAction(TARGET, randomised(Flow(L, hidden=(2,)), 15))
    one = fields(L, batch=1)
    assert_forces_close(act.force(one), act.force_autograd(one))
    with pytest.raises(ValueError):
        act.force(torch.zeros(2, 6, 6, dtype=torch.float64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("hidden", [(), (3,)])
def test_analytic_force_on_cuda(method, hidden):
    L = 8
    flow = randomised(Flow(L, 3, 2, hidden), 16)
    z = fields(L)
    cpu = flowed(flow, method)
    F_cpu, S_cpu = cpu.force(z), cpu.action(z)
    gpu = flowed(flow.to("cuda"), method)
    x = z.to("cuda")
    F = gpu.force(x)
    assert F.device.type == "cuda" and F.dtype == torch.float64
    assert_forces_close(F.cpu(), F_cpu)
    torch.testing.assert_close(gpu.action(x).cpu(), S_cpu, rtol=1e-12, atol=1e-10)
    assert_forces_close(F, gpu.force_autograd(x))
