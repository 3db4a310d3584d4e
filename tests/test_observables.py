"""Per-configuration observables against direct sums."""

import numpy as np
import pytest
import torch

from hpcflow import observables


@pytest.fixture
def phi():
    return torch.randn(3, 6, 6, generator=torch.Generator().manual_seed(4)) + 0.3


def test_magnetization(phi):
    M = observables.magnetization(phi)
    np.testing.assert_allclose(M.numpy(), phi.numpy().mean(axis=(1, 2)), rtol=1e-14)


def test_correlator_direct_sum(phi):
    L = 6
    c = observables.correlator(phi).numpy()
    assert c.shape == (3, L // 2 + 1)
    for b in range(3):
        p = phi[b].numpy()
        full = np.zeros(L)
        for Phi in (p.sum(axis=1), p.sum(axis=0)):  # either direction as time
            for t in range(L):
                full[t] += sum(Phi[(t0 + t) % L] * Phi[t0] for t0 in range(L)) / L**2 / 2
        sym = 0.5 * (full + np.roll(full[::-1], 1))
        np.testing.assert_allclose(c[b], sym[: L // 2 + 1], rtol=1e-12)
        # c(0) averaged over configurations is C(0) = <Phi(t)^2>/L; t <-> L-t symmetric
        assert sym[1] == pytest.approx(sym[L - 1])


def test_g_pmin_direct_sum(phi):
    L = 6
    g = observables.g_pmin(phi).numpy()
    for b in range(3):
        p = phi[b].numpy()
        x = np.arange(L)
        e = np.exp(2j * np.pi * x / L)
        g1 = abs((p * e[:, None]).sum()) ** 2 / L**2
        g2 = abs((p * e[None, :]).sum()) ** 2 / L**2
        assert g[b] == pytest.approx((g1 + g2) / 2, rel=1e-12)


def test_momentum_space_G_by_the_2d_transform(phi):
    """G(p) = |phi(p)|^2 / V from the full 2D FFT: at p = 0 it is V M^2 (what the analysis
    takes for G(0) in xi2), at p_min the mean over both directions is g_pmin; the two share
    one normalisation, so xi2 = sqrt((G(0)/G(p_min) - 1) / (4 sin^2(pi/L))) is right."""
    L, V = 6, 36
    G = torch.fft.fft2(phi).abs() ** 2 / V                      # [B, L, L], p = 2 pi n / L
    torch.testing.assert_close(G[:, 0, 0], V * observables.magnetization(phi) ** 2)
    torch.testing.assert_close(0.5 * (G[:, 1, 0] + G[:, 0, 1]), observables.g_pmin(phi))
    torch.testing.assert_close(G[:, 1, 0], G[:, L - 1, 0])      # p and -p: real field
    assert not torch.allclose(G[:, 1, 0], G[:, 0, 1])           # the directions do differ


@pytest.mark.parametrize("L", [2, 3, 5, 8])
def test_correlator_and_g_pmin_by_fft_at_odd_and_small_L(L):
    """The power-spectrum forms against the FFT of the time slices, odd L included (where
    no momentum stands for itself at L/2) and L = 2 (p_min = pi)."""
    phi = torch.randn(4, L, L, dtype=torch.float64, generator=torch.Generator().manual_seed(L))
    ts = observables.timeslices(phi)
    f = torch.fft.fft(ts, dim=-1)
    auto = torch.fft.ifft(f * f.conj(), dim=-1).real.mean(1) / L**2      # [B, L]
    torch.testing.assert_close(observables.correlator(phi), auto[:, : L // 2 + 1],
                               rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(observables.g_pmin(phi), (f[..., 1].abs() ** 2).mean(1) / L**2,
                               rtol=1e-12, atol=0)


def test_measure_all_records_of_hmc_z_equal_phi():
    """For HMC z is phi: Mz is M bit for bit (the same sums), and every record has the
    stored shape."""
    from hpcflow.hmc import HMCInfo

    L, B = 6, 3
    phi = torch.randn(B, L, L, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    dH = torch.tensor([0.1, float("nan"), -0.2], dtype=torch.float64)
    meas = observables.measure_all(phi, phi, HMCInfo(dH, dH < 0, dH, dH != dH))
    np.testing.assert_array_equal(meas["M"], meas["Mz"])
    for o in observables.OBSERVABLES:
        assert meas[o.name].shape == (B, *o.shape(L)), o.name
    assert meas["dH"][1] == np.inf  # an overflowed trajectory is stored as +inf
