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
    autocorrelations (PHYSICS.md section 5).  ``flow`` is any module with ``inverse(phi~) ->
    (phi, log|det d f^-1/d phi~|)``; its parameters are frozen here.

    The force is analytic when the flow has ``frozen()`` (:class:`hpcflow.flow.FrozenFlow`,
    built here once): with J = d f^-1/d phi~ and F = -dS/dphi the target's force,

        F~ = -dS~/dphi~ = J^T F(f^-1(phi~)) + d log|det J| / d phi~,

    the chain rule written out layer by layer (no autograd).  ``action`` and ``to_physical``
    use the same frozen inverse.  The frozen copy is rebuilt if a parameter is changed in
    place or moved (tracked by its version counter and storage); call :meth:`refresh` after
    changes that bypass those (e.g. writes through ``.data``).  A flow without ``frozen`` gets
    the autograd force, :meth:`force_autograd`, which is also kept for tests.
    """

    def __init__(self, target, flow):
        self.target = target
        self.flow = flow
        self._params = list(flow.parameters())
        for p in self._params:
            p.requires_grad_(False)
        self._frozen, self._frozen_key = None, None
        self.frozen_flow()

    def __repr__(self):
        return f"FlowedAction({self.target!r}, {type(self.flow).__name__})"

    def refresh(self) -> None:
        """Rebuild the frozen flow from the module's current weights."""
        self._frozen_key = None
        self.frozen_flow()

    def frozen_flow(self):
        """The flow's FrozenFlow for its current weights, or None (no ``frozen``: autograd)."""
        make = getattr(self.flow, "frozen", None)
        if make is None:
            return None
        key = tuple((p.data_ptr(), p._version) for p in self._params)
        if key != self._frozen_key:
            self._frozen, self._frozen_key = make(), key
        return self._frozen

    def action(self, phi_t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            frozen = self.frozen_flow()
            inverse = self.flow.inverse if frozen is None else frozen.inverse
            phi, logdet_inv = inverse(phi_t)
            return self.target.action(phi) - logdet_inv

    def force(self, phi_t: torch.Tensor) -> torch.Tensor:
        frozen = self.frozen_flow()
        if frozen is None:
            return self.force_autograd(phi_t)
        with torch.no_grad():
            phi, _, pullback = frozen.inverse_with_pullback(phi_t, logdet=False)
            return pullback(self.target.force(phi))

    def force_autograd(self, phi_t: torch.Tensor) -> torch.Tensor:
        """-dS~/dphi~ by autograd through ``flow.inverse`` (reference for the analytic force)."""
        with torch.enable_grad():
            x = phi_t.detach().requires_grad_(True)
            phi, logdet_inv = self.flow.inverse(x)
            S = self.target.action(phi) - logdet_inv
            (grad,) = torch.autograd.grad(S.sum(), x)
        return -grad

    def to_physical(self, phi_t: torch.Tensor) -> torch.Tensor:
        """phi = f^-1(phi~), the field measurements are made on."""
        with torch.no_grad():
            frozen = self.frozen_flow()
            return (self.flow.inverse if frozen is None else frozen.inverse)(phi_t)[0]
