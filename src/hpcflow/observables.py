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

The table :data:`OBSERVABLES` is the one list of what a production records per
trajectory: for each record its name, shape, how it is measured (on the measured field
phi, on the chain variable z, or from the trajectory's :class:`hpcflow.hmc.HMCInfo`), how
it is stored (dataset, dtype, fill of unmeasured rows) and how it is analysed (the series
whose Gamma-method Obs the analysis builds).  Production buffers and writes it
(:mod:`hpcflow.production`), the file layout is made from it (:func:`hpcflow.store.layout`),
and the analysis loads and analyses it (:func:`hpcflow.store.load_ensemble`,
:func:`hpcflow.analysis.primary_obs`):

========  =================  ==========  ===========  =====================================
name      dataset            per meas.   measured on  analysed as
========  =================  ==========  ===========  =====================================
M         observables/M      []          phi          M, absM = abs(M), M2 = M^2
Mz        observables/Mz     []          z            Mz, Mz2 (c_M); optional
C         observables/C      [L/2+1]     phi          C0 .. C{L/2} (m_eff, xi)
Gp        observables/Gp     []          phi          Gp (xi2)
dH        mc/dH              []          trajectory   exp_mdH = exp(-dH); +-inf: overflowed
accepted  mc/accepted (i1)   []          trajectory   acceptance (plain mean)
========  =================  ==========  ===========  =====================================

Mz is the magnetization of the chain variable z before the map phi = g(z) (z = phi for
HMC), for the slow-mode scale c_M = std(M_z) / std(M) of a flow (PHYSICS.md section 5.1).
Files written before it existed lack it; the analysis then reports no c_M.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
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


def overflow_as_inf(dH: torch.Tensor) -> torch.Tensor:
    """dH as stored: a NaN (an overflowed trajectory, inf - inf) becomes +inf, so that NaN
    in ``mc/dH`` always means "not measured yet" and a non-finite dH "overflowed" (such a
    trajectory is rejected: exp(-dH) = 0)."""
    dH = dH.detach()
    return torch.where(torch.isnan(dH), torch.full_like(dH, float("inf")), dH)


def measure(phi: torch.Tensor) -> dict[str, torch.Tensor]:
    """Everything stored per trajectory: M [B], C [B, L//2+1], Gp [B]."""
    return {"M": magnetization(phi), "C": correlator(phi), "Gp": g_pmin(phi)}


def _scalar(L: int) -> tuple:
    return ()


def _as_stored(a):
    return a


@dataclass(frozen=True)
class Observable:
    """One per-trajectory record of an ensemble file (a row of :data:`OBSERVABLES`).

    Attributes
    ----------
    name : str
        Its name in measurements, buffers and :class:`hpcflow.store.Ensemble`.
    dataset : str
        The HDF5 dataset, [replicas, measurements, *shape(L)].
    shape : callable
        L -> the shape of one measurement of one replica.
    dtype, fill
        Stored dtype and the value of rows not yet measured.
    source : str
        What it is measured on: ``"phi"`` (the measured field), ``"z"`` (the chain
        variable) or ``"trajectory"`` (the :class:`hpcflow.hmc.HMCInfo` of the trajectory).
    measure : callable
        source -> torch tensor [B, *shape(L)].
    series : callable or None
        The stored array [R, N, ...] -> {name: array [R, N]}, the series the analysis makes
        Obs of (None: not made into Obs).
    required : bool
        False when files of earlier versions may lack it (then loaded as None).
    read : callable
        Applied to the stored array when loaded (e.g. int8 -> bool).
    """

    name: str
    dataset: str
    shape: Callable[[int], tuple]
    dtype: str
    fill: object
    source: str
    measure: Callable
    series: Callable | None
    required: bool = True
    read: Callable = _as_stored


OBSERVABLES: tuple[Observable, ...] = (
    Observable("M", "observables/M", _scalar, "f8", np.nan, "phi", magnetization,
               lambda x: {"M": x, "absM": np.abs(x), "M2": x**2}),
    Observable("Mz", "observables/Mz", _scalar, "f8", np.nan, "z", magnetization,
               lambda x: {"Mz": x, "Mz2": x**2}, required=False),
    Observable("C", "observables/C", lambda L: (L // 2 + 1,), "f8", np.nan, "phi", correlator,
               lambda x: {f"C{t}": x[..., t] for t in range(x.shape[-1])}),
    Observable("Gp", "observables/Gp", _scalar, "f8", np.nan, "phi", g_pmin,
               lambda x: {"Gp": x}),
    Observable("dH", "mc/dH", _scalar, "f8", np.nan, "trajectory", lambda info: overflow_as_inf(info.dH),
               lambda x: {"exp_mdH": np.exp(-x)}),
    Observable("accepted", "mc/accepted", _scalar, "i1", -1, "trajectory",
               lambda info: info.accepted.to(torch.int8), None, read=lambda a: a.astype(bool)),
)


def measure_all(phi: torch.Tensor, z: torch.Tensor, info) -> dict[str, np.ndarray]:
    """Every record of :data:`OBSERVABLES` for one trajectory of B chains, as numpy arrays
    [B, ...]: phi the measured field, z the chain variable, info the trajectory's HMCInfo."""
    sources = {"phi": phi, "z": z, "trajectory": info}
    with torch.no_grad():
        return {o.name: o.measure(sources[o.source]).cpu().numpy() for o in OBSERVABLES}
