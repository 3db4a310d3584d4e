"""Priors: Gaussian, coarse volume, coarse 4-configuration interleave; the coarse stage."""

import h5py
import numpy as np
import pytest
import torch

from conftest import write_ini
from hpcflow import config, run
from hpcflow.action import Phi4Action
from hpcflow.config import ConfigError
from hpcflow.priors import (CoarseInterleavePrior, CoarseVolumePrior, GaussianPrior,
                            _augment, deinterleave, interleave)

COARSE = Phi4Action(0.576, 0.5)


def pool(n, L, seed=0):
    return np.random.default_rng(seed).normal(size=(n, L, L))


def test_gaussian_prior_density():
    prior = GaussianPrior(4)
    z, log_r = prior.sample(20000, np.random.default_rng(1), "cpu")
    assert z.std().item() == pytest.approx(1.0, rel=0.01)
    x = z[0].numpy()
    expect = -0.5 * (x**2).sum() - 8 * np.log(2 * np.pi)
    assert log_r[0].item() == pytest.approx(expect, rel=1e-12)


def test_interleave_layout_and_inverse():
    """phi~(2n, 2m) = Phi1(n, m), (2n+1, 2m) = Phi2, (2n, 2m+1) = Phi3, (2n+1, 2m+1) = Phi4."""
    P = [torch.from_numpy(pool(3, 4, seed=s)) for s in range(4)]
    phi = interleave(*P)
    assert phi.shape == (3, 8, 8)
    for n in range(4):
        for m in range(4):
            assert phi[1, 2 * n, 2 * m] == P[0][1, n, m]
            assert phi[1, 2 * n + 1, 2 * m] == P[1][1, n, m]
            assert phi[1, 2 * n, 2 * m + 1] == P[2][1, n, m]
            assert phi[1, 2 * n + 1, 2 * m + 1] == P[3][1, n, m]
    for a, b in zip(deinterleave(phi), P):
        assert torch.equal(a, b)


def test_augmentation_is_a_symmetry_of_the_coarse_action():
    configs = pool(50, 6)
    rng = np.random.default_rng(3)
    aug = _augment(configs, rng)
    S0 = COARSE.action(torch.from_numpy(configs))
    S1 = COARSE.action(torch.from_numpy(aug))
    torch.testing.assert_close(S0, S1, rtol=1e-13, atol=1e-12)
    assert not np.allclose(aug, configs)


def test_interleave_prior_never_repeats_a_configuration_within_a_sample():
    prior = CoarseInterleavePrior(pool(5, 4), pool(40, 4, seed=9), COARSE)  # tiny pool: clashes
    idx = prior.draw_indices(5000, np.random.default_rng(4))
    assert all(len(set(row)) == 4 for row in idx.tolist())
    assert set(np.unique(idx)) == set(range(5))
    phi, log_r = prior.sample(64, np.random.default_rng(5), "cpu")
    parts = deinterleave(phi)
    torch.testing.assert_close(log_r, -sum(COARSE.action(p) for p in parts))
    # each quarter of every sample is (a symmetry image of) a distinct pool configuration
    S_pool = COARSE.action(torch.from_numpy(prior.train_pool))
    for b in range(64):
        S_parts = [COARSE.action(p[b:b + 1]).item() for p in parts]
        which = [int(torch.argmin((S_pool - s).abs())) for s in S_parts]
        assert min(abs(S_pool[w].item() - s) for w, s in zip(which, S_parts)) < 1e-10
        assert len(set(which)) == 4


def test_fresh_proposals_use_each_held_out_configuration_once():
    held = pool(40, 4, seed=7)
    prior = CoarseInterleavePrior(pool(8, 4), held, COARSE)
    assert prior.capacity == 10
    a, _ = prior.fresh(6, 0, None, "cpu")
    b, _ = prior.fresh(4, 6, None, "cpu")
    quarters = torch.cat([torch.stack(deinterleave(x), 1) for x in (a, b)]).reshape(40, 4, 4)
    torch.testing.assert_close(quarters, torch.from_numpy(held), rtol=0, atol=0)
    with pytest.raises(ValueError, match="only 10"):
        prior.fresh(1, 10, None, "cpu")
    vol = CoarseVolumePrior(pool(8, 4), held, COARSE)
    phi, log_r = vol.fresh(40, 0, None, "cpu")
    assert torch.equal(phi, torch.from_numpy(held)) and torch.equal(log_r, -COARSE.action(phi))


def study_input(tmp_path, prior="coarse-interleave", L=8, Lc=4, **coarse):
    """The coarse pipeline: coarse, train, fhmc, analysis; output ``tmp_path/out``."""
    return write_ini(tmp_path, "c.ini",
                     run=dict(name="c", seed=3, stages="coarse, train, fhmc, analysis"),
                     theory={"L": L, "beta": 0.6, "lambda": 0.5},
                     coarse=dict(L=Lc, **coarse), flow=dict(prior=prior), train={}, fhmc={})


def test_odd_L_and_wrong_coarse_L_refused_at_input_time(tmp_path):
    with pytest.raises(ConfigError, match=r"\[theory\] L: the coarse-interleave prior needs even L"):
        config.load(study_input(tmp_path, L=9, Lc=4))
    with pytest.raises(ConfigError, match=r"\[coarse\] L: must be 4 for prior = coarse-interleave"):
        config.load(study_input(tmp_path, L=8, Lc=8))
    with pytest.raises(ConfigError, match=r"\[coarse\] L: must be 8 for prior = coarse-volume"):
        config.load(study_input(tmp_path, prior="coarse-volume", L=8, Lc=4))


@pytest.mark.parametrize("prior, Lc", [("coarse-interleave", 4), ("coarse-volume", 8)])
@pytest.mark.slow
def test_coarse_pipeline_end_to_end(tmp_path, capsys, prior, Lc):
    path = study_input(tmp_path, prior=prior, Lc=Lc)
    assert run.main([str(path)]) == 0
    out = capsys.readouterr().out
    with h5py.File(tmp_path / "out" / "coarse.h5", "r") as f:
        a = dict(f.attrs)
        assert (a["L"], a["beta"]) == (Lc, 0.5)
        assert a["spacing"] == np.ceil(2 * (a["pilot_tau_int"] + 2 * a["pilot_tau_int_error"]))
        assert a["spacing"] == a["save_every"]
        assert f["configs"].shape == (4, 32, Lc, Lc) and np.isfinite(f["configs"][()]).all()
        assert "tau_int" in a
    assert "pilot tau_int(M)" in out
    from hpcflow.train import read_flow_file

    payload = read_flow_file(tmp_path / "out" / "flow.pt")
    assert payload["prior"] == prior and payload["complete"]
    assert payload["history"]["metropolis"][-1]["proposals"] == (16 if prior == "coarse-interleave" else 64)
    # a rerun reuses the coarse ensemble
    mtime = (tmp_path / "out" / "coarse.h5").stat().st_mtime_ns
    assert run.main([str(path)]) == 0
    assert (tmp_path / "out" / "coarse.h5").stat().st_mtime_ns == mtime


def test_configured_spacing_below_two_tau_warns(tmp_path, capsys):
    path = study_input(tmp_path, spacing=1)
    path.write_text(path.read_text().replace("stages = coarse, train, fhmc, analysis", "stages = coarse"))
    assert run.main([str(path)]) == 0
    assert "WARNING: [coarse] spacing = 1 is below 2 tau_int(M)" in capsys.readouterr().out
