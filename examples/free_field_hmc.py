"""HMC on the free field (lambda = 0) against its exact susceptibility chi = 1 / (2 - 4 beta).

    python examples/free_field_hmc.py [TRAJECTORIES]        # default 2000 per replica
"""
import sys

import numpy as np

import hpcflow as hf

L, beta, replicas = 8, 0.4, 16
trajectories = int(sys.argv[1]) if len(sys.argv) > 1 else 2000

action = hf.Phi4Action(beta, lam=0.0)
streams = hf.ReplicaStreams(seed=1, indices=range(replicas), purpose="free-field")
state = hf.init_state(action, streams.normal((L, L), "cpu"))     # hot start
records = {"M": [], "dH": [], "accepted": []}
for i in range(100 + trajectories):                               # 100 to thermalize
    state, info = hf.hmc_step(action, state, streams.normal((L, L), "cpu"),
                              streams.log_uniform("cpu"), "omf2", 1.0, 8)
    if i >= 100:
        records["M"].append(state.phi.mean((1, 2)).numpy())
        records["dH"].append(info.dH.numpy())
        records["accepted"].append(info.accepted.numpy())
arrays = {k: np.array(v).T for k, v in records.items()}          # [replicas, measurements]

js, obs = hf.analyse(arrays, L=L)                                 # Gamma method, pyerrors Obs
chi = js["observables"]["chi"]
print(f"acceptance {js['acceptance']:.3f}, <exp(-dH)> = {obs['exp_mdH'].value:.4f}")
print(f"chi = {chi['value']:.4f} +- {chi['error']:.4f} (exact {1 / (2 - 4 * beta):.4f}), "
      f"tau_int(M^2) = {js['observables']['M2']['tau_int']:.2f}")
