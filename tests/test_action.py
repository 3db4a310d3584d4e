"""The phi^4 action and its force against independent computations."""

import numpy as np
import pytest
import torch

from hpcflow.action import Phi4Action


def action_by_loops(phi, beta, lam):
    """S from the definition, one site and one forward link at a time."""
    L0, L1 = phi.shape
    S = 0.0
    for x in range(L0):
        for y in range(L1):
            p = phi[x, y]
            S += -beta * p * (phi[(x + 1) % L0, y] + phi[x, (y + 1) % L1])
            S += p * p + lam * (p * p - 1) ** 2
    return S


@pytest.mark.parametrize("beta, lam", [(0.576, 0.5), (0.4, 0.0), (0.7, 1.3)])
def test_action_matches_definition(beta, lam):
    g = torch.Generator().manual_seed(1)
    phi = torch.randn(3, 4, 5, generator=g)
    S = Phi4Action(beta, lam).action(phi)
    for b in range(3):
        assert S[b].item() == pytest.approx(action_by_loops(phi[b].numpy(), beta, lam), rel=1e-13)


def test_constant_field():
    c, beta, lam, L = 0.7, 0.6, 0.5, 6
    phi = torch.full((1, L, L), c)
    expect = L * L * (-2 * beta * c * c + c * c + lam * (c * c - 1) ** 2)
    assert Phi4Action(beta, lam).action(phi).item() == pytest.approx(expect, rel=1e-14)


@pytest.mark.parametrize("beta, lam", [(0.576, 0.5), (0.45, 0.0)])
def test_force_is_minus_gradient(beta, lam):
    """Analytic force against autograd and against central finite differences."""
    act = Phi4Action(beta, lam)
    g = torch.Generator().manual_seed(2)
    phi = torch.randn(2, 4, 4, generator=g)
    x = phi.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(act.action(x).sum(), x)
    F = act.force(phi)
    torch.testing.assert_close(F, -grad, rtol=1e-12, atol=1e-12)

    h = 1e-5
    fd = torch.empty_like(phi)
    for i in range(4):
        for j in range(4):
            e = torch.zeros_like(phi)
            e[:, i, j] = h
            fd[:, i, j] = -(act.action(phi + e) - act.action(phi - e)) / (2 * h)
    np.testing.assert_allclose(F.numpy(), fd.numpy(), rtol=1e-7, atol=1e-8)


def test_batch_rows_are_independent():
    """Each chain's action and force depend on its own row only, bit for bit."""
    act = Phi4Action(0.6, 0.5)
    phi = torch.randn(5, 8, 8, generator=torch.Generator().manual_seed(3))
    S, F = act.action(phi), act.force(phi)
    for b in range(5):
        assert torch.equal(act.action(phi[b:b + 1]), S[b:b + 1])
        assert torch.equal(act.force(phi[b:b + 1]), F[b:b + 1])
