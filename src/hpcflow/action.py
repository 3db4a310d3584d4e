"""Actions: the abstraction that HMC, FHMC and training are written against.

An action is any object with

    action(phi) -> [B]          S of each of B configurations phi [B, L, L]
    force(phi)  -> [B, L, L]    F = -dS/dphi

on a batch of B chains (torch, float64, any device).  HMC never looks inside.

:class:`Phi4Action` is the lattice phi^4 theory of PHYSICS.md section 1,

    S(phi) = sum_x [ -beta sum_{mu=1,2} phi_x phi_{x+mu} + phi_x^2 + lambda (phi_x^2 - 1)^2 ],

with the hopping term over forward links only, and its analytic force

    F_x = beta sum_{+-mu} phi_{x+-mu} - 2 phi_x - 4 lambda phi_x (phi_x^2 - 1).
"""

from __future__ import annotations

from typing import Protocol

import torch


class Action(Protocol):
    def action(self, phi: torch.Tensor) -> torch.Tensor: ...

    def force(self, phi: torch.Tensor) -> torch.Tensor: ...


def neighbour_sum(phi: torch.Tensor) -> torch.Tensor:
    """sum over the four nearest neighbours, periodic: sum_{+-mu} phi_{x+-mu}."""
    return (torch.roll(phi, 1, -1) + torch.roll(phi, -1, -1)
            + torch.roll(phi, 1, -2) + torch.roll(phi, -1, -2))


class Phi4Action:
    """Lattice phi^4 action with hopping coupling ``beta`` and quartic coupling ``lam``."""

    def __init__(self, beta: float, lam: float):
        self.beta = float(beta)
        self.lam = float(lam)

    def __repr__(self):
        return f"Phi4Action(beta={self.beta}, lam={self.lam})"

    def density(self, phi: torch.Tensor) -> torch.Tensor:
        """The action density s_x [B, L, L], S = sum_x s_x."""
        forward = torch.roll(phi, -1, -1) + torch.roll(phi, -1, -2)
        phi2 = phi * phi
        return -self.beta * phi * forward + phi2 + self.lam * (phi2 - 1.0) ** 2

    def action(self, phi: torch.Tensor) -> torch.Tensor:
        return self.density(phi).flatten(-2).sum(-1)

    def force(self, phi: torch.Tensor) -> torch.Tensor:
        return (self.beta * neighbour_sum(phi) - 2.0 * phi
                - 4.0 * self.lam * phi * (phi * phi - 1.0))


class FlowedAction:
    """The action of the trivialized variables phi~ = f(phi) (Luscher's trivializing map):

        S~(phi~) = S(f^-1(phi~)) - log|det d f^-1 / d phi~|
                 = S(phi) + log|det df/dphi|          at phi = f^-1(phi~).

    exp(-S~) is the density of phi~ when phi ~ exp(-S), so HMC on S~ followed by the map
    phi = f^-1(phi~) samples the target exactly for any invertible f; the flow only changes
    autocorrelations (PHYSICS.md section 5).  The force -dS~/dphi~ comes from autograd
    through the inverse flow.  ``flow`` is any module with ``inverse(phi~) -> (phi,
    log|det d f^-1/d phi~|)``; its parameters are frozen here.
    """

    def __init__(self, target, flow):
        self.target = target
        self.flow = flow
        for p in flow.parameters():
            p.requires_grad_(False)

    def __repr__(self):
        return f"FlowedAction({self.target!r}, {type(self.flow).__name__})"

    def action(self, phi_t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            phi, logdet_inv = self.flow.inverse(phi_t)
            return self.target.action(phi) - logdet_inv

    def force(self, phi_t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = phi_t.detach().requires_grad_(True)
            phi, logdet_inv = self.flow.inverse(x)
            S = self.target.action(phi) - logdet_inv
            (grad,) = torch.autograd.grad(S.sum(), x)
        return -grad

    def to_physical(self, phi_t: torch.Tensor) -> torch.Tensor:
        """phi = f^-1(phi~), the field measurements are made on."""
        with torch.no_grad():
            return self.flow.inverse(phi_t)[0]
