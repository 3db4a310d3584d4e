#!/usr/bin/env bash
# The L = 16 trivializing-flow study (PHYSICS.md section 8) in one command:
#   bash tools/study.sh [INPUT.ini ...]          (default: HMC at tau = 1, 2, 4 + the three kernel-3 flows)
# runs each input on $HPCFLOW_RANKS MPI ranks (default 2), sharing the coarse ensembles,
# then prints the tau_int(M) table and draws the flow acceptance against training iteration.
# Finished stages are skipped, so a rerun only completes what is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash tools/setup.sh
source tools/env.sh
inputs=("$@")
if ((${#inputs[@]} == 0)); then
    inputs=(inputs/study/L16-hmc.ini inputs/study/L16-hmc-tau2.ini inputs/study/L16-hmc-tau4.ini
            inputs/study/L16-gaussian-k3.ini
            inputs/study/L16-volume-k3.ini inputs/study/L16-interleave-k3.ini)
fi
for input in "${inputs[@]}"; do
    echo "== $input"
    "${MPIRUN[@]}" "${HPCFLOW_RANKS:-2}" python -m mpi4py -m hpcflow.run "$input"
done
python -m hpcflow.study runs/study/L16-* --png runs/study/acceptance.png --json runs/study/study.json --csv runs/study/study.csv
