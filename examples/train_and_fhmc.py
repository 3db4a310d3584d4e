"""Train the minimal flow (one coupling layer, k = 3) on the free field, then run flow HMC
in memory and check chi against the exact 1 / (2 - 4 beta).

    python examples/train_and_fhmc.py [ITERATIONS [TRAJECTORIES]]    # default 400, 1000
"""
import sys

import numpy as np

import hpcflow as hf

L, beta, replicas = 8, 0.2, 16
iterations = int(sys.argv[1]) if len(sys.argv) > 1 else 400
trajectories = int(sys.argv[2]) if len(sys.argv) > 2 else 1000

target = hf.Phi4Action(beta, lam=0.0)
flow = hf.Flow(L)                               # the minimal model; starts as the identity
trainer = hf.Trainer(flow, hf.GaussianPrior(L), target, lr=0.01, iterations=iterations,
                     batch_size=512)            # Adam, cosine schedule (the authors')
history = trainer.train(iterations, seed=1, callbacks=[
    lambda r: r["iteration"] % 100 or print(f"iteration {r['iteration']}: loss {r['loss']:.3f}")])
print("flow acceptance on fresh proposals:", trainer.evaluate(2048, np.random.default_rng(2)))

action = hf.FlowedAction(target, flow)          # frozen snapshot; analytic flowed force
streams = hf.ReplicaStreams(seed=2, indices=range(replicas), purpose="fhmc")
state = hf.init_state(action, streams.normal((L, L), "cpu"))
M, divergent = [], 0
for i in range(50 + trajectories):
    state, info = hf.hmc_step(action, state, streams.normal((L, L), "cpu"),
                              streams.log_uniform("cpu"), "leapfrog", 1.0, 10)
    divergent += int(info.divergent.sum())
    if i >= 50:                                 # measure on phi = g(z)
        M.append(action.to_physical(state.phi).mean((1, 2)).numpy())

js, _ = hf.analyse({"M": np.array(M).T}, L=L)
chi = js["observables"]["chi"]
print(f"FHMC chi = {chi['value']:.4f} +- {chi['error']:.4f} (exact {1 / (2 - 4 * beta):.4f}), "
      f"tau_int(M) = {js['observables']['M']['tau_int']:.2f}, {divergent} divergent trajectories")
