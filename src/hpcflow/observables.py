"""Per-configuration observables of the phi^4 field (PHYSICS.md section 2).

All functions act on a batch phi [B, L, L] and return one value (or one row) per
configuration; ensemble averages and errors are the business of :mod:`hpcflow.analysis`.

- magnetization  M = (1/V) sum_x phi_x.  |M| and M^2 follow from it; G(0) = V M^2.
- correlator     c(t) = (1/L^2) sum_{t0} Phi(t0 + t) Phi(t0), with the time-slice field
                 Phi(t) = sum_{x1} phi(x1, t), averaged over both lattice directions (either
                 may serve as time on a symmetric lattice) and over t <-> L - t;
                 t = 0 .. L/2.  Its ensemble average is C(t) = <Phi(t0 + t) Phi(t0)> / L.
- g_pmin         |phi(p)|^2 / V at the smallest momentum p_min = 2 pi / L, averaged over
                 the two directions: its average is G(p_min) of the second-moment xi.

Production (:mod:`hpcflow.production`) also stores ``magnetization`` of the chain variable z
before the map phi = g(z) (``/observables/Mz``; z = phi for HMC), for the slow-mode scale
c_M = std(M_z) / std(M) of a flow (PHYSICS.md section 5.1).
"""

from __future__ import annotations

import torch


def magnetization(phi: torch.Tensor) -> torch.Tensor:
    """M = (1/V) sum_x phi_x, shape [B]."""
    return phi.flatten(1).mean(1)


def timeslices(phi: torch.Tensor) -> torch.Tensor:
    """Phi(t) for both directions as time: [B, 2, L]."""
    return torch.stack((phi.sum(-1), phi.sum(-2)), dim=1)


def correlator(phi: torch.Tensor) -> torch.Tensor:
    """c(t) for t = 0 .. L/2 (integer division), shape [B, L//2 + 1]; see module docstring."""
    L = phi.shape[-1]
    ts = timeslices(phi)                                        # [B, 2, L]
    f = torch.fft.rfft(ts, dim=-1)
    # sum_{t0} Phi(t0 + t) Phi(t0) for all t by the convolution theorem
    autocorr = torch.fft.irfft(f * f.conj(), n=L, dim=-1)      # [B, 2, L]
    c = autocorr.mean(1) / L**2                                 # [B, L]
    sym = 0.5 * (c + torch.roll(torch.flip(c, (-1,)), 1, -1))  # c(t) <-> c(L - t)
    return sym[:, : L // 2 + 1].contiguous()


def g_pmin(phi: torch.Tensor) -> torch.Tensor:
    """|phi(p_min)|^2 / V averaged over p_min = (2 pi/L, 0) and (0, 2 pi/L), shape [B]."""
    V = phi.shape[-1] * phi.shape[-2]
    ft = torch.fft.fft(timeslices(phi), dim=-1)[..., 1]        # [B, 2], one transform per row
    return (ft.abs() ** 2).mean(1) / V


def measure(phi: torch.Tensor) -> dict[str, torch.Tensor]:
    """Everything stored per trajectory: M [B], C [B, L//2+1], Gp [B]."""
    return {"M": magnetization(phi), "C": correlator(phi), "Gp": g_pmin(phi)}
