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

import copy
from typing import Protocol

import torch


class Action(Protocol):
    def action(self, phi: torch.Tensor) -> torch.Tensor: ...

    def force(self, phi: torch.Tensor) -> torch.Tensor: ...


def neighbour_sum(phi: torch.Tensor, dims: tuple[int, int] = (-2, -1)) -> torch.Tensor:
    """sum over the four nearest neighbours, periodic: sum_{+-mu} phi_{x+-mu}, with the
    lattice directions (x0, x1) on tensor dimensions ``dims`` (default: the last two, a
    batch [B, L0, L1]; (0, 1): the site-major [L0, L1, B] of :mod:`hpcflow.fused`)."""
    d0, d1 = dims
    return (torch.roll(phi, 1, d1) + torch.roll(phi, -1, d1)
            + torch.roll(phi, 1, d0) + torch.roll(phi, -1, d0))


class Phi4Action:
    """The lattice phi^4 action (PHYSICS.md section 1) and its analytic force.

    S(phi) = sum_x [ -beta sum_{mu=1,2} phi_x phi_{x+mu} + phi_x^2 + lam (phi_x^2 - 1)^2 ],
    F = -dS/dphi, on a batch phi [B, L, L] (any L0 x L1, periodic).

    Parameters
    ----------
    beta : float
        Hopping coupling.
    lam : float
        Quartic coupling lambda (0: the free field, stable for beta < 1/2).

    Examples
    --------
    >>> action = Phi4Action(beta=0.576, lam=0.5)
    >>> phi = torch.zeros(2, 8, 8, dtype=torch.float64)
    >>> action.action(phi), action.force(phi).shape      # S = V lam per chain; [2, 8, 8]
    """

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
        """S of each configuration, [B]."""
        return self.density(phi).flatten(-2).sum(-1)

    def force(self, phi: torch.Tensor, dims: tuple[int, int] = (-2, -1)) -> torch.Tensor:
        """F = -dS/dphi, [B, L, L] (lattice directions on ``dims``, as :func:`neighbour_sum`;
        the same operations in the same order for any layout)."""
        return (self.beta * neighbour_sum(phi, dims) - 2.0 * phi
                - 4.0 * self.lam * phi * (phi * phi - 1.0))


class FlowedAction:
    """The action of the flow's latent variables z (Luscher's trivializing map).

    Parameters
    ----------
    target : object
        The target action (``action``, ``force``), e.g. :class:`Phi4Action`.
    flow : torch.nn.Module
        Any module with ``inverse(z) -> (phi, log|det dg/dz|)``, e.g. :class:`hpcflow.Flow`;
        a snapshot is taken, the module itself is neither kept nor modified.

    Notes
    -----
    The flowed action is

        S~(z) = S(g(z)) - log|det dg/dz|,        g = f^-1 the generator.

    exp(-S~) is the density of z = f(phi) when phi ~ exp(-S), so HMC on S~ followed by the
    map phi = g(z) samples the target exactly for any invertible g; the flow only changes
    autocorrelations (PHYSICS.md section 5).  ``flow`` is any module with
    ``inverse(z) -> (phi, log|det dg/dz|)``.

    The action takes its own snapshot of the flow when it is built: a frozen evaluator
    (``flow.frozen()``, :class:`hpcflow.flows.FrozenFlow`) and a detached copy of the module
    for :meth:`force_autograd`.  Later changes of the caller's flow do not reach it, and the
    caller's flow is not modified (its parameters keep ``requires_grad``).  With
    J = dg/dz and F = -dS/dphi the target's force,

        F~ = -dS~/dz = J^T F(g(z)) + d log|det J| / dz,

    the chain rule written out layer by layer (no autograd).  A flow without ``frozen``
    gets the autograd force, :meth:`force_autograd`, which is also kept for tests.
    """

    def __init__(self, target, flow):
        self.target = target
        self.flow = copy.deepcopy(flow)
        for p in self.flow.parameters():
            p.requires_grad_(False)
        make = getattr(flow, "frozen", None)
        with torch.no_grad():
            self.frozen = make() if make is not None else None

    def __repr__(self):
        return f"FlowedAction({self.target!r}, {type(self.flow).__name__})"

    def _generate(self, z):
        return (self.flow.inverse if self.frozen is None else self.frozen.inverse)(z)

    def action(self, z: torch.Tensor) -> torch.Tensor:
        """S~(z) = S(g(z)) - log|det dg/dz|, [B]."""
        with torch.no_grad():
            phi, logdet = self._generate(z)
            return self.target.action(phi) - logdet

    def force(self, z: torch.Tensor) -> torch.Tensor:
        """F~ = -dS~/dz, [B, L, L] (analytic pullback; autograd for flows without one)."""
        if self.frozen is None:
            return self.force_autograd(z)
        with torch.no_grad():
            phi, _, pullback = self.frozen.inverse_with_pullback(z, logdet=False)
            return pullback(self.target.force(phi))

    def force_autograd(self, z: torch.Tensor) -> torch.Tensor:
        """-dS~/dz by autograd through the module's ``inverse`` (reference for the analytic
        force)."""
        with torch.enable_grad():
            x = z.detach().requires_grad_(True)
            phi, logdet = self.flow.inverse(x)
            S = self.target.action(phi) - logdet
            (grad,) = torch.autograd.grad(S.sum(), x)
        return -grad

    def to_physical(self, z: torch.Tensor) -> torch.Tensor:
        """phi = g(z), the field measurements are made on."""
        with torch.no_grad():
            return self._generate(z)[0]
