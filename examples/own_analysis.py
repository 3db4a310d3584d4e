"""Your own pyerrors analysis of an ensemble file: the Binder cumulant and the correlator.

    python examples/own_analysis.py runs/demo/hmc.h5        # any hmc.h5 / fhmc.h5 / coarse.h5
"""
import sys

import numpy as np
import pyerrors as pe

import hpcflow as hf

e = hf.load_ensemble(sys.argv[1] if len(sys.argv) > 1 else "runs/demo/hmc.h5")
print(f"{e.path}: {e.attrs['algorithm']}, L = {e.L}, beta = {e.attrs['beta']}, "
      f"{e.M.shape[0]} replicas x {e.M.shape[1]} measurements")

# One Obs per series, replicas about the overall mean (to_obs); derive freely from them.
M2, M4 = hf.to_obs(e.M**2, e.name), hf.to_obs(e.M**4, e.name)
binder = 1 - M4 / (3 * M2**2)
binder.gamma_method(S=2.0)
print(f"Binder cumulant U = {binder.value:.4f} +- {binder.dvalue:.4f}, "
      f"tau_int = {binder.e_tauint[e.name]:.2f}")

# The time-slice correlator as a pyerrors Corr (t = 0 .. L/2), connected part.
M = hf.to_obs(e.M, e.name)
corr = pe.Corr([hf.to_obs(e.C[..., t], e.name) - e.L * M**2 for t in range(e.C.shape[-1])])
corr.gamma_method()
for t, c in enumerate(corr.content):
    print(f"C({t}) = {c[0].value:.5f} +- {c[0].dvalue:.5f}")

# The whole analysis of hpcflow.analysis, as a dict and Obs, for comparison.
js, obs = hf.analyse(e)
print(f"chi = {obs['chi'].value:.4f} +- {obs['chi'].dvalue:.4f}, xi = "
      f"{js['observables']['xi']['value']}, |M| = {np.abs(e.M).mean():.4f}")
