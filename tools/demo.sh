#!/usr/bin/env bash
# Set up if needed, then run the demo job on 2 MPI ranks and print the analysis table.
#   bash tools/demo.sh [INPUT.ini] [--force]        (default inputs/demo.ini)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash tools/setup.sh
source tools/env.sh
input=${1:-inputs/demo.ini}
shift || true
"${MPIRUN[@]}" "${HPCFLOW_RANKS:-2}" python -m hpcflow.run "$input" "$@"
