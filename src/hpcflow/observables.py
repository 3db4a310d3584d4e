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

M, c(t) and g_pmin are all made from the time slices Phi(t) [B, 2, L], which a
production sums once a trajectory (:func:`measure_all`): c(t) and g_pmin from their power
spectrum |Phi~(k)|^2, k = 0 .. L/2 (:func:`power_spectrum`, by projections on cos and sin
of 2 pi k t / L, one matrix product: at these L it costs fewer and cheaper operations than
an FFT and its inverse).

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
M         observables/M      []          Phi(t)       M, absM = abs(M), M2 = M^2
Mz        observables/Mz     []          z            Mz, Mz2 (c_M); optional
C         observables/C      [L/2+1]     |Phi~(k)|^2  C0 .. C{L/2} (m_eff, xi)
Gp        observables/Gp     []          |Phi~(k)|^2  Gp (xi2)
dH        mc/dH              []          trajectory   exp_mdH = exp(-dH); +-inf: overflowed
accepted  mc/accepted (i1)   []          trajectory   acceptance (plain mean)
========  =================  ==========  ===========  =====================================

Mz is the magnetization of the chain variable z before the map phi = g(z) (z = phi for
HMC), for the slow-mode scale c_M = std(M_z) / std(M) of a flow (PHYSICS.md section 5.1).
Files written before it existed lack it; the analysis then reports no c_M.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import torch


def magnetization(phi: torch.Tensor) -> torch.Tensor:
    """M = (1/V) sum_x phi_x, shape [B] (the row sums first: the sums of
    :func:`magnetization_of_timeslices`, so M of z = phi is M of phi bit for bit)."""
    return phi.sum(-1).sum(-1) / (phi.shape[-2] * phi.shape[-1])


def timeslices(phi: torch.Tensor) -> torch.Tensor:
    """Phi(t) for both directions as time: [B, 2, L]."""
    return torch.stack((phi.sum(-1), phi.sum(-2)), dim=1)


def magnetization_of_timeslices(ts: torch.Tensor) -> torch.Tensor:
    """M = (1/V) sum_t Phi(t) from the time slices [B, 2, L] of an L x L field."""
    return ts[:, 0].sum(-1) / ts.shape[-1] ** 2


class Spectrum(NamedTuple):
    """The power spectrum of the time slices of an L x L field: ``power`` [B, 2, L//2 + 1],
    |Phi~(k)|^2 for k = 0 .. L/2 and both directions, Phi~(k) = sum_t Phi(t) e^{-2 pi i k t/L}
    (k and L - k have the same power: Phi is real)."""

    power: torch.Tensor
    L: int


_TABLES: dict = {}


def _fourier_tables(L: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """For an extent L, K = L//2 + 1: ``phases`` [L, 2K], cos and sin of 2 pi k t / L
    (rows t, columns k), and ``cosines`` [K, K], w_k cos(2 pi k t / L) / L^3 (rows k,
    columns t <= L/2) with w_k = 2 for the momenta that stand for k and L - k, else 1;
    cached per (L, dtype, device)."""
    key = (L, dtype, torch.device(device))
    if key not in _TABLES:
        K = L // 2 + 1
        k = np.arange(K)
        phase = 2 * np.pi * np.outer(np.arange(L), k) / L
        w = np.where((k == 0) | (2 * k == L), 1.0, 2.0)
        cosines = w[:, None] * np.cos(2 * np.pi * np.outer(k, k) / L) / L**3
        _TABLES[key] = tuple(torch.tensor(a, dtype=dtype, device=device) for a in
                             (np.concatenate((np.cos(phase), np.sin(phase)), 1), cosines))
    return _TABLES[key]


def power_spectrum(ts: torch.Tensor) -> Spectrum:
    """The :class:`Spectrum` of the time slices [B, 2, L], by their projections on cos and
    sin of 2 pi k t / L (one product; no transform)."""
    L = ts.shape[-1]
    K = L // 2 + 1
    p = ts @ _fourier_tables(L, ts.dtype, ts.device)[0]         # [B, 2, 2K]
    return Spectrum(p[..., :K].square() + p[..., K:].square(), L)


def correlator_of_spectrum(spectrum: Spectrum) -> torch.Tensor:
    """c(t), t = 0 .. L/2, [B, L//2 + 1], by the convolution theorem: sum_{t0} Phi(t0 + t)
    Phi(t0) = (1/L) sum_k |Phi~(k)|^2 cos(2 pi k t / L), averaged over the directions
    (symmetric in t <-> L - t term by term)."""
    power, L = spectrum
    return power.mean(1) @ _fourier_tables(L, power.dtype, power.device)[1]


def g_pmin_of_spectrum(spectrum: Spectrum) -> torch.Tensor:
    """|phi(p_min)|^2 / V averaged over both directions, [B]: phi(p_min) = Phi~(1)."""
    power, L = spectrum
    return power[..., 1].mean(-1) / L**2


def correlator(phi: torch.Tensor) -> torch.Tensor:
    """c(t) for t = 0 .. L/2 (integer division), shape [B, L//2 + 1]; see module docstring."""
    return correlator_of_spectrum(power_spectrum(timeslices(phi)))


def g_pmin(phi: torch.Tensor) -> torch.Tensor:
    """|phi(p_min)|^2 / V averaged over p_min = (2 pi/L, 0) and (0, 2 pi/L), shape [B]."""
    return g_pmin_of_spectrum(power_spectrum(timeslices(phi)))


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
        What it is measured on: ``"phi"`` (the measured field), ``"timeslices"`` (its
        time slices Phi(t), [B, 2, L], :func:`timeslices`), ``"spectrum"`` (their
        :func:`power_spectrum`), both made once for all records,
        ``"z"`` (the chain variable) or ``"trajectory"`` (the :class:`hpcflow.hmc.HMCInfo`
        of the trajectory).
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
    Observable("M", "observables/M", _scalar, "f8", np.nan, "timeslices",
               magnetization_of_timeslices,
               lambda x: {"M": x, "absM": np.abs(x), "M2": x**2}),
    Observable("Mz", "observables/Mz", _scalar, "f8", np.nan, "z", magnetization,
               lambda x: {"Mz": x, "Mz2": x**2}, required=False),
    Observable("C", "observables/C", lambda L: (L // 2 + 1,), "f8", np.nan, "spectrum",
               correlator_of_spectrum,
               lambda x: {f"C{t}": x[..., t] for t in range(x.shape[-1])}),
    Observable("Gp", "observables/Gp", _scalar, "f8", np.nan, "spectrum", g_pmin_of_spectrum,
               lambda x: {"Gp": x}),
    Observable("dH", "mc/dH", _scalar, "f8", np.nan, "trajectory", lambda info: overflow_as_inf(info.dH),
               lambda x: {"exp_mdH": np.exp(-x)}),
    Observable("accepted", "mc/accepted", _scalar, "i1", -1, "trajectory",
               lambda info: info.accepted.to(torch.int8), None, read=lambda a: a.astype(bool)),
)


def measure_all(phi: torch.Tensor, z: torch.Tensor, info) -> dict[str, np.ndarray]:
    """Every record of :data:`OBSERVABLES` for one trajectory of B chains, as numpy arrays
    [B, ...]: phi the measured field, z the chain variable, info the trajectory's HMCInfo.
    phi's time slices and their power spectrum are made once, for every record measured on
    them."""
    with torch.no_grad():
        ts = timeslices(phi)
        sources = {"phi": phi, "z": z, "trajectory": info, "timeslices": ts,
                   "spectrum": power_spectrum(ts)}
        return {o.name: o.measure(sources[o.source]).cpu().numpy() for o in OBSERVABLES}
