# Sourced by tools/demo.sh and tools/test.sh: the venv and the MPI environment.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${HPCFLOW_VENV:-$ROOT/.venv}
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # one thread per rank: oversubscribed threads crawl
export PYTHONUNBUFFERED=1
if [[ $(id -u) == 0 ]]; then                    # Open MPI refuses root unless told
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
MPIRUN=(mpirun --oversubscribe -n)
