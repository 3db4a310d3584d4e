#!/usr/bin/env bash
# Set up if needed, then run every test: serial pytest, then the MPI tests on 2 ranks.
#   bash tools/test.sh [extra pytest arguments]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash tools/setup.sh
# a private single-node SLURM for the job-script tests (they skip, with the reason, without it)
bash tools/slurm.sh install || echo "[test] SLURM cannot be installed here: its tests will skip"
source tools/env.sh
echo "== serial tests"
python -m pytest tests "$@"
echo "== MPI tests, 2 ranks"
# python -m mpi4py: an exception on one rank aborts all ranks instead of hanging.
"${MPIRUN[@]}" 2 python -m mpi4py -m pytest --with-mpi -m mpi -p no:cacheprovider tests "$@"
