"""Priors r(phi~): the distributions a flow is trained from.

Every prior has one interface,

    sample(n, rng, device) -> (phi~ [n, L, L], log_r [n])

with ``rng`` a numpy Generator (so draws do not depend on the device), and log_r the log
density up to a constant that does not depend on the flow (PHYSICS.md section 5: the
reverse-KL loss and the Metropolis weights only need it up to a constant).

- :class:`GaussianPrior`: r(phi~) = prod_x exp(-phi~_x^2 / (2 sigma^2)) / sqrt(2 pi sigma^2),
  exactly normalized; sigma = ``[flow] prior_width`` (default 1).

Why a width: the coupling layers scale by exp(-|s|) <= 1 from phi to phi~, so f can only
contract and the prior must be at least as narrow as the target's fluctuations of each
site given its neighbours.  For the free field those have variance 1/2 (the on-site term
phi^2 of S), so a unit-width prior cannot be reached by any flow of this family, while
sigma <= 1/sqrt(2) can; for the interacting theory at lambda = 0.5 the on-site potential
is 0.5 phi^4 and the unit width is the natural choice.
"""

from __future__ import annotations

import math

import numpy as np
import torch


class GaussianPrior:
    """Independent normals of width sigma on every site:
    log r = -1/(2 sigma^2) sum_x phi~_x^2 - V/2 log(2 pi sigma^2)."""

    name = "gaussian"

    def __init__(self, L: int, sigma: float = 1.0):
        self.L, self.sigma = L, float(sigma)

    def log_prob(self, phi_t: torch.Tensor) -> torch.Tensor:
        V = self.L * self.L
        return (-0.5 * (phi_t * phi_t).flatten(1).sum(1) / self.sigma**2
                - 0.5 * V * math.log(2 * math.pi * self.sigma**2))

    def sample(self, n: int, rng: np.random.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
        phi_t = self.sigma * torch.from_numpy(rng.standard_normal((n, self.L, self.L))).to(device)
        return phi_t, self.log_prob(phi_t)


def make_prior(cfg):
    """The prior of an input's [flow] section."""
    name, L = cfg.flow.prior, cfg.theory.L
    if name == "gaussian":
        return GaussianPrior(L, cfg.flow.prior_width)
    raise ValueError(f"prior {name!r} is not available yet")
