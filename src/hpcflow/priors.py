"""Priors r(z): the distributions a flow is trained from.

Every prior has one interface,

    sample(n, rng, device) -> (z [n, L, L], log_r [n])

with ``rng`` a numpy Generator (so draws do not depend on the device), and log_r the log
density up to a constant that does not depend on the flow (PHYSICS.md section 5: the
reverse-KL loss and the Metropolis weights only need it up to a constant).

- :class:`GaussianPrior`: r(z) = prod_x exp(-z_x^2 / 2) / sqrt(2 pi), a unit normal per
  site, exactly normalized (the flow's global scale learns the overall width).
- :class:`CoarseVolumePrior`: r = exp(-S'(z)) / Z', the coarse theory (beta') on the
  same L, i.e. a bigger physical volume; log r = -S'(z) (Z' dropped).
- :class:`CoarseInterleavePrior`: four independent coarse configurations Phi_1..Phi_4 on
  L/2 interleaved into one L lattice (PHYSICS.md section 6, eq. 9 of arXiv:2310.03381),

      z(2n, 2m) = Phi_1(n, m),     z(2n+1, 2m) = Phi_2(n, m),
      z(2n, 2m+1) = Phi_3(n, m),   z(2n+1, 2m+1) = Phi_4(n, m),

  log r = -sum_i S'(Phi_i) (Z'^4 dropped); the four are distinct configurations.

The coarse priors draw training samples from the coarse ensemble's training pool
(uniformly, with replacement across samples, with a random translation and a random sign
phi -> -phi, both symmetries of r), and ``fresh(n, start, rng, device)`` hands out
proposals built from the held-out pool, every configuration used at most once, for the
flow acceptance: proposals ``start .. start + n`` of the held-out sequence, so ranks can
take disjoint slices.  ``capacity`` is how many fresh proposals the held-out pool allows.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .action import Phi4Action
from .stages import coarse_path
from .store import load_samples


class GaussianPrior:
    """Independent unit normals on every site: log r = -1/2 sum_x z_x^2 - V/2 log(2 pi).

    Parameters
    ----------
    L : int
        Lattice extent (samples are [n, L, L]).

    Examples
    --------
    >>> z, log_r = GaussianPrior(8).sample(16, np.random.default_rng(0), "cpu")
    """

    name = "gaussian"

    def __init__(self, L: int):
        self.L = L

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        V = self.L * self.L
        return -0.5 * (z * z).flatten(1).sum(1) - 0.5 * V * math.log(2 * math.pi)

    def sample(self, n: int, rng: np.random.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.from_numpy(rng.standard_normal((n, self.L, self.L))).to(device)
        return z, self.log_prob(z)

    capacity = float("inf")

    def fresh(self, n: int, start: int, rng: np.random.Generator, device):
        return self.sample(n, rng, device)


def interleave(P1, P2, P3, P4) -> torch.Tensor:
    """Four [n, L/2, L/2] configurations -> one [n, L, L] (site (2a + i, 2b + j) from P_{1+i+2j})."""
    n, h, w = P1.shape
    out = P1.new_empty(n, 2 * h, 2 * w)
    out[:, 0::2, 0::2] = P1
    out[:, 1::2, 0::2] = P2
    out[:, 0::2, 1::2] = P3
    out[:, 1::2, 1::2] = P4
    return out


def deinterleave(phi: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The inverse of :func:`interleave`."""
    return phi[:, 0::2, 0::2], phi[:, 1::2, 0::2], phi[:, 0::2, 1::2], phi[:, 1::2, 1::2]


def _augment(configs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random periodic translation and sign of each configuration (symmetries of S')."""
    n, L0, L1 = configs.shape
    shift0 = rng.integers(0, L0, n)
    shift1 = rng.integers(0, L1, n)
    sign = rng.choice([-1.0, 1.0], n)
    i0 = (np.arange(L0)[None, :] + shift0[:, None]) % L0
    i1 = (np.arange(L1)[None, :] + shift1[:, None]) % L1
    rolled = configs[np.arange(n)[:, None, None], i0[:, :, None], i1[:, None, :]]
    return rolled * sign[:, None, None]


class CoarseVolumePrior:
    """The coarse ensemble on the target's L: log r(phi~) = -S'(phi~) + const.

    Parameters
    ----------
    train_pool : numpy.ndarray
        [n, L, L] coarse configurations to train from (sampled with random translations
        and signs).
    eval_pool : numpy.ndarray
        [m, L, L] held-out configurations for :meth:`fresh` (each used once).
    coarse_action : Phi4Action
        S' at the coarse coupling beta'.
    """

    name = "coarse-volume"

    def __init__(self, train_pool: np.ndarray, eval_pool: np.ndarray, coarse_action):
        self.train_pool, self.eval_pool, self.action = train_pool, eval_pool, coarse_action
        self.capacity = len(eval_pool)

    def _finish(self, configs, device):
        phi_t = torch.from_numpy(np.ascontiguousarray(configs)).to(device)
        return phi_t, -self.action.action(phi_t)

    def sample(self, n, rng, device):
        idx = rng.integers(0, len(self.train_pool), n)
        return self._finish(_augment(self.train_pool[idx], rng), device)

    def fresh(self, n, start, rng, device):
        if start + n > self.capacity:
            raise ValueError(f"only {self.capacity} held-out coarse configurations")
        return self._finish(self.eval_pool[start:start + n], device)


class CoarseInterleavePrior:
    """Four distinct coarse L/2 configurations interleaved: log r = -sum_i S'(Phi_i) + const.

    Parameters
    ----------
    train_pool : numpy.ndarray
        [n, L/2, L/2] coarse configurations (n >= 4) to train from.
    eval_pool : numpy.ndarray
        [m, L/2, L/2] held-out configurations; :meth:`fresh` interleaves them four at a time.
    coarse_action : Phi4Action
        S' at the coarse coupling beta'.
    """

    name = "coarse-interleave"

    def __init__(self, train_pool: np.ndarray, eval_pool: np.ndarray, coarse_action):
        if len(train_pool) < 4:
            raise ValueError("the interleave prior needs at least 4 coarse configurations")
        self.train_pool, self.eval_pool, self.action = train_pool, eval_pool, coarse_action
        self.capacity = len(eval_pool) // 4

    def _finish(self, four, device):
        parts = [torch.from_numpy(np.ascontiguousarray(p)).to(device) for p in four]
        log_r = -sum(self.action.action(p) for p in parts)
        return interleave(*parts), log_r

    def draw_indices(self, n, rng) -> np.ndarray:
        """[n, 4] indices into the training pool, four distinct ones per sample."""
        N = len(self.train_pool)
        idx = rng.integers(0, N, (n, 4))
        while True:
            s = np.sort(idx, axis=1)
            clash = (s[:, 1:] == s[:, :-1]).any(axis=1)
            if not clash.any():
                return idx
            idx[clash] = rng.integers(0, N, (int(clash.sum()), 4))

    def sample(self, n, rng, device):
        idx = self.draw_indices(n, rng)
        four = [_augment(self.train_pool[idx[:, i]], rng) for i in range(4)]
        return self._finish(four, device)

    def fresh(self, n, start, rng, device):
        if start + n > self.capacity:
            raise ValueError(f"only {self.capacity} fresh interleaved proposals "
                             f"({len(self.eval_pool)} held-out coarse configurations)")
        block = self.eval_pool[4 * start:4 * (start + n)].reshape(n, 4, *self.eval_pool.shape[1:])
        return self._finish([block[:, i] for i in range(4)], device)


def make_prior(cfg):
    """The prior of an input's [flow] section (coarse priors read the coarse file)."""
    name, L = cfg.flow.prior, cfg.theory.L
    if name == "gaussian":
        return GaussianPrior(L)
    c = cfg.coarse
    train_pool, eval_pool, _ = load_samples(coarse_path(cfg), c.L, c.beta, cfg.theory.lam)
    coarse_action = Phi4Action(c.beta, cfg.theory.lam)
    if name == "coarse-volume":
        return CoarseVolumePrior(train_pool, eval_pool, coarse_action)
    if name == "coarse-interleave":
        return CoarseInterleavePrior(train_pool, eval_pool, coarse_action)
    raise ValueError(f"unknown prior {name!r}")
