"""Molecular-dynamics integrators and hybrid Monte Carlo over any action.

HMC (Duane, Kennedy, Pendleton, Roweth 1987) samples exp(-S(phi)) by evolving
H(pi, phi) = 1/2 sum pi^2 + S(phi) with a reversible, area-preserving integrator for a
trajectory of length tau = n_steps * eps and accepting the end point with probability
min(1, exp(-dH)).  The action is any object with ``action`` and ``force`` (see
:mod:`hpcflow.action`), so the same code runs plain HMC and flow HMC (FHMC, over a
flowed action).

Randomness is passed in explicitly (momenta and uniforms drawn by the caller from each
replica's own stream), so a chain does not depend on how chains are batched.

Integrators are symmetric compositions of momentum kicks ``pi += a eps F(phi)`` and
position drifts ``phi += b eps pi`` (PHYSICS.md section 4):

    leapfrog  kicks (1/2, 1/2)                       drifts (1)                       order 2
    omf2      kicks (xi, 1 - 2 xi, xi)               drifts (1/2, 1/2)                order 2
    omf4      kicks (r1, r3, r5, r5, r3, r1)         drifts (r2, r4, r6, r4, r2)      order 4

with xi = 0.1931833275037836 (Omelyan, Mryglod, Folk, Comput. Phys. Commun. 146 (2002) 188)
and the 11-stage fourth-order scheme of the same authors, r5 = 1/2 - r1 - r3,
r6 = 1 - 2 (r2 + r4).  The last kick of one step and the first of the next are merged, so
n steps of a scheme with k kicks cost n (k - 1) + 1 force evaluations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class Integrator:
    """A symmetric kick-drift-...-kick scheme: len(kicks) == len(drifts) + 1."""

    name: str
    kicks: tuple[float, ...]
    drifts: tuple[float, ...]
    order: int

    @property
    def forces_per_step(self) -> int:
        return len(self.kicks) - 1

    def schedule(self, eps: float, n_steps: int) -> list[tuple[float | None, float]]:
        """The trajectory as (drift, kick) coefficients: each entry moves phi += drift pi
        (none for the first) and then pi += kick F(phi); a step's last kick is merged with
        the next step's first, so there are ``n_steps * len(drifts) + 1`` forces."""
        kicks, drifts = self.kicks, self.drifts
        out: list[tuple[float | None, float]] = [(None, kicks[0] * eps)]
        for step in range(n_steps):
            for j, b in enumerate(drifts):
                a = kicks[j + 1]
                if j == len(drifts) - 1 and step < n_steps - 1:
                    a = a + kicks[0]  # merge with the next step's first kick
                out.append((b * eps, a * eps))
        return out

    def __call__(self, phi, pi, force, eps: float, n_steps: int):
        """Integrate Hamilton's equations for n_steps steps of size eps; returns (phi, pi).

        ``force`` is a callable phi -> F(phi); the inputs are not modified."""
        for drift, kick in self.schedule(eps, n_steps):
            if drift is not None:
                phi = phi + drift * pi
            pi = pi + kick * force(phi)
        return phi, pi


OMF2_XI = 0.1931833275037836
OMF4_R1 = 0.08398315262876693
OMF4_R2 = 0.2539785108410595
OMF4_R3 = 0.6822365335719091
OMF4_R4 = -0.03230286765269967
OMF4_R5 = 0.5 - OMF4_R1 - OMF4_R3
OMF4_R6 = 1.0 - 2.0 * (OMF4_R2 + OMF4_R4)

INTEGRATORS = {
    "leapfrog": Integrator("leapfrog", (0.5, 0.5), (1.0,), 2),
    "omf2": Integrator("omf2", (OMF2_XI, 1.0 - 2.0 * OMF2_XI, OMF2_XI), (0.5, 0.5), 2),
    "omf4": Integrator("omf4", (OMF4_R1, OMF4_R3, OMF4_R5, OMF4_R5, OMF4_R3, OMF4_R1),
                       (OMF4_R2, OMF4_R4, OMF4_R6, OMF4_R4, OMF4_R2), 4),
}


#: |dH| above which a trajectory counts as divergent (as well as a non-finite dH): the
#: integration has failed, whatever the Metropolis test does with it (blackjax's default).
DIVERGENCE_THRESHOLD = 1000.0


class HMCState(NamedTuple):
    """Chains' positions and their actions.

    Attributes
    ----------
    phi : torch.Tensor
        [B, L, L] the chains' configurations (FHMC: the chain variable z).
    S : torch.Tensor
        [B] the action of each.
    """

    phi: torch.Tensor
    S: torch.Tensor


class HMCInfo(NamedTuple):
    """What one trajectory did, per chain.

    Attributes
    ----------
    dH : torch.Tensor
        [B] energy violation H(end) - H(start) of the proposal.
    accepted : torch.Tensor
        [B] bool, the Metropolis decision.
    acceptance_probability : torch.Tensor
        [B] min(1, exp(-dH)) (0 for dH = +inf, NaN for NaN).
    divergent : torch.Tensor
        [B] bool: dH not finite, or |dH| > ``divergence_threshold`` (default
        :data:`DIVERGENCE_THRESHOLD`); the step size is far too large for this action.
    """

    dH: torch.Tensor
    accepted: torch.Tensor
    acceptance_probability: torch.Tensor
    divergent: torch.Tensor


def init_state(action, phi: torch.Tensor) -> HMCState:
    """The HMC state of configurations ``phi`` [B, L, L]: their actions computed once.

    Parameters
    ----------
    action : object
        Any action (``action(phi) -> [B]``, ``force(phi) -> [B, L, L]``).
    phi : torch.Tensor
        [B, L, L] starting configurations.

    Returns
    -------
    HMCState
    """
    return HMCState(phi, action.action(phi))


def kinetic(pi: torch.Tensor) -> torch.Tensor:
    """1/2 sum_x pi_x^2 per chain."""
    return 0.5 * (pi * pi).flatten(1).sum(1)


def metropolis(phi, S, pi, phi_new, pi_new, S_new, log_u):
    """The Metropolis test at the end of an HMC trajectory (phi, pi) -> (phi', pi'):

        dH = [1/2 sum_x pi'_x^2 + S(phi')] - [1/2 sum_x pi_x^2 + S(phi)],

    chain b accepts when log_u[b] < -dH[b] (probability min(1, exp(-dH))).  Returns
    (phi_out, S_out, dH, accepted): phi' and S(phi') where accepted, phi and S elsewhere.
    The eager test of :func:`hmc_step`, and the end of the compiled step
    (:func:`hpcflow.fused.compile_trajectory`, unless ``metropolis=False``)."""
    dH = (kinetic(pi_new) + S_new) - (kinetic(pi) + S)
    accepted = log_u < -dH
    keep = accepted.view(-1, *([1] * (phi.dim() - 1)))
    return torch.where(keep, phi_new, phi), torch.where(accepted, S_new, S), dH, accepted


def trajectory_info(dH: torch.Tensor, divergence_threshold: float = DIVERGENCE_THRESHOLD):
    """(acceptance probability, divergent) of the energy violations dH [B]: min(1, exp(-dH))
    (0 for dH = +inf, NaN for NaN), and dH not finite or |dH| > ``divergence_threshold``
    (:class:`HMCInfo`)."""
    probability = torch.exp(torch.clamp(-dH, max=0.0))
    divergent = ~torch.isfinite(dH) | (dH.abs() > divergence_threshold)
    return probability, divergent


def metropolis_info(phi, S, pi, phi_new, pi_new, S_new, log_u):
    """:func:`metropolis` and :func:`trajectory_info` of its dH (at
    :data:`DIVERGENCE_THRESHOLD`): (phi_out, S_out, dH, accepted, probability, divergent),
    what a fused step returns (:mod:`hpcflow.fused`), so that hmc_step adds no operation of
    its own after the compiled graph."""
    phi_out, S_out, dH, accepted = metropolis(phi, S, pi, phi_new, pi_new, S_new, log_u)
    return (phi_out, S_out, dH, accepted, *trajectory_info(dH))


def hmc_step(action, state: HMCState, pi: torch.Tensor, log_u: torch.Tensor,
             integrator: Integrator | str, length: float, n_steps: int,
             divergence_threshold: float = DIVERGENCE_THRESHOLD,
             trajectory=None) -> tuple[HMCState, HMCInfo]:
    """One HMC trajectory for every chain of the batch.

    Randomness is explicit: the caller draws the momenta and the Metropolis numbers (from
    each replica's own stream, :class:`hpcflow.rng.ReplicaStreams`), so a chain does not
    depend on how chains are batched.

    Parameters
    ----------
    action : object
        Any action (``action(phi) -> [B]``, ``force(phi) -> [B, L, L]``), e.g.
        :class:`hpcflow.Phi4Action` or :class:`hpcflow.FlowedAction`.
    state : HMCState
        The current chains (:func:`init_state`).
    pi : torch.Tensor
        [B, L, L] fresh standard-normal momenta.
    log_u : torch.Tensor
        [B] logs of uniform numbers in (0, 1]; chain b accepts when log_u[b] < -dH[b],
        i.e. with probability min(1, exp(-dH)).
    integrator : Integrator or str
        An :class:`Integrator` or the name of one of :data:`INTEGRATORS`
        (``"leapfrog"``, ``"omf2"``, ``"omf4"``).
    length : float
        Trajectory length tau; the step is eps = length / n_steps.
    n_steps : int
        MD steps per trajectory.
    divergence_threshold : float
        |dH| above which :attr:`HMCInfo.divergent` is set.
    trajectory : callable, optional
        (phi, pi) -> (phi', pi', S(phi')): replaces the integration and the final action,
        the fused, compiled form of the same (:mod:`hpcflow.fused`).  One that carries a
        fused step (its attribute ``step``: (phi, S, pi, log_u) -> (phi_out, S_out, dH,
        accepted) or, with the trajectory's probability and divergence too, the six numbers
        of :func:`metropolis_info`; the trajectory and the test compiled; what
        ``fused.compile_trajectory`` returns by default) runs that instead.

    Returns
    -------
    (HMCState, HMCInfo)
        The chains after the Metropolis test, and what the trajectory did.

    Examples
    --------
    >>> action = Phi4Action(beta=0.4, lam=0.0)
    >>> streams = ReplicaStreams(1, range(8), "example")
    >>> state = init_state(action, streams.normal((8, 8), "cpu"))
    >>> state, info = hmc_step(action, state, streams.normal((8, 8), "cpu"),
    ...                        streams.log_uniform("cpu"), "leapfrog", 1.0, 10)
    """
    if isinstance(integrator, str):
        integrator = INTEGRATORS[integrator]
    step = getattr(trajectory, "step", None)
    info = None
    if step is not None:
        out = step(state.phi, state.S, pi, log_u)
        phi_out, S_out, dH, accepted = out[:4]
        if len(out) == 6 and divergence_threshold == DIVERGENCE_THRESHOLD:
            info = out[4:]
    else:
        if trajectory is None:
            phi_new, pi_new = integrator(state.phi, pi, action.force, length / n_steps, n_steps)
            S_new = action.action(phi_new)
        else:
            phi_new, pi_new, S_new = trajectory(state.phi, pi)
        phi_out, S_out, dH, accepted = metropolis(state.phi, state.S, pi, phi_new, pi_new,
                                                  S_new, log_u)
    if info is None:
        with torch.no_grad():
            info = trajectory_info(dH.detach(), divergence_threshold)
    return HMCState(phi_out, S_out), HMCInfo(dH, accepted, *info)
