#!/usr/bin/env bash
# Idempotent set-up of everything hpcflow needs, on Debian/Ubuntu or on a cluster.
#
#   bash tools/setup.sh            # installs what is missing; seconds when nothing is
#
# System layer (needs root, skipped when already present):
#   Open MPI + parallel HDF5 from apt (openmpi-bin libopenmpi-dev libhdf5-openmpi-dev pkg-config).
# Python layer (a virtual environment, default .venv in the repository, override HPCFLOW_VENV):
#   numpy, mpi4py, torch, h5py compiled against parallel HDF5, pyerrors, matplotlib,
#   pytest, pytest-mpi, and hpcflow itself (editable), every one at the exact version of
#   constraints.txt (torch==2.13.0). HPCFLOW_TORCH=SPEC installs another torch instead
#   (e.g. HPCFLOW_TORCH=torch==2.13.0+cu128 with PIP_EXTRA_INDEX_URL set to the CUDA
#   wheels): it replaces the torch block of constraints.txt, every other pin stays.
#
# On a cluster without root: load the modules first, point the build at them, and skip apt:
#   module load openmpi hdf5/parallel     # whatever your site calls them
#   export MPICC=mpicc HDF5_DIR=/path/to/parallel/hdf5   # HDF5_DIR only if pkg-config cannot find it
#   HPCFLOW_NO_APT=1 bash tools/setup.sh
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${HPCFLOW_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
CONSTRAINTS=$ROOT/constraints.txt
TORCH_SPEC=${HPCFLOW_TORCH:-torch}
APT_PACKAGES=(openmpi-bin libopenmpi-dev libhdf5-openmpi-dev pkg-config python3-venv)
STAMP=$VENV/.hpcflow-setup

say() { printf '[setup] %s\n' "$*"; }

stamp_key() {
    cat "$ROOT/tools/setup.sh" "$ROOT/pyproject.toml" "$ROOT/setup.cfg" "$CONSTRAINTS" 2>/dev/null \
        | sha256sum | cut -d' ' -f1
    echo "$TORCH_SPEC"
}

# The constraints pip gets: constraints.txt, less its torch block when HPCFLOW_TORCH names
# another torch (whose own dependencies may need other versions), so that the two never conflict.
effective_constraints() {
    if [[ -n ${HPCFLOW_TORCH:-} ]]; then
        sed '/^# >>> torch/,/^# <<< torch/d' "$CONSTRAINTS"
    else
        cat "$CONSTRAINTS"
    fi
}

# ---- fast path: everything already in place -------------------------------------------
if [[ -f $STAMP && "$(cat "$STAMP")" == "$(stamp_key)" ]] && command -v mpirun >/dev/null \
   && "$VENV/bin/python" -c 'import h5py, mpi4py, torch, pyerrors, hpcflow; assert h5py.get_config().mpi' 2>/dev/null; then
    exit 0
fi

# ---- system layer ------------------------------------------------------------------------
have_system() {
    command -v mpicc >/dev/null && command -v mpirun >/dev/null || return 1
    [[ -n ${HDF5_DIR:-} ]] && return 0
    pkg-config --exists hdf5-openmpi 2>/dev/null
}
if ! have_system; then
    missing=()
    if command -v dpkg >/dev/null; then
        for p in "${APT_PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    fi
    if [[ -n ${HPCFLOW_NO_APT:-} ]] || ! command -v apt-get >/dev/null || [[ $(id -u) != 0 ]]; then
        say "Open MPI and parallel HDF5 are not available and cannot be installed here."
        say "Load your site's modules (e.g. 'module load openmpi hdf5/parallel'), set MPICC and,"
        say "if pkg-config cannot find HDF5, HDF5_DIR; then rerun with HPCFLOW_NO_APT=1."
        exit 1
    fi
    if ((${#missing[@]})); then
        say "apt-get install ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" build-essential >/dev/null
    fi
fi

# ---- Python layer ------------------------------------------------------------------------
if [[ ! -x $VENV/bin/python ]]; then
    say "creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PY=$VENV/bin/python
PIN=$VENV/hpcflow-constraints.txt
effective_constraints >"$PIN"
pip_q() { "$PY" -m pip install -q --disable-pip-version-check -c "$PIN" "$@"; }

say "build tools, numpy, mpi4py, torch (versions from constraints.txt${HPCFLOW_TORCH:+; torch: $HPCFLOW_TORCH})"
pip_q --upgrade pip
pip_q Cython pkgconfig setuptools wheel numpy mpi4py "$TORCH_SPEC"

# Rebuilt when missing, serial, or not the pinned version (pip would replace it by a serial wheel).
H5PY_PIN=$(sed -n 's/^h5py==\([^ ;#]*\).*/\1/p' "$PIN")
if ! "$PY" -c 'import h5py, sys; sys.exit(0 if h5py.get_config().mpi and sys.argv[1] in ("", h5py.__version__) else 1)' \
        "$H5PY_PIN" 2>/dev/null; then
    say "building h5py against parallel HDF5 (a few minutes)"
    "$PY" -m pip uninstall -y -q h5py >/dev/null 2>&1 || true
    export CC=${MPICC:-mpicc} HDF5_MPI=ON
    [[ -n ${HDF5_DIR:-} ]] || export HDF5_PKGCONFIG_NAME=${HDF5_PKGCONFIG_NAME:-hdf5-openmpi}
    pip_q --no-build-isolation --no-cache-dir --no-binary=h5py h5py
    "$PY" -c 'import h5py; assert h5py.get_config().mpi, "h5py was built without MPI"'
fi

say "pyerrors, matplotlib, pytest, pytest-mpi, hpcflow"
# h5py is already satisfied by the parallel build, so pip keeps it.
pip_q pyerrors matplotlib pytest pytest-mpi "$TORCH_SPEC"
# A distribution named "hpcflow" (this package's name before 0.2, or PyPI's unrelated workflow
# manager) would own the same import name: remove it before installing hpcflow-phi4.
"$PY" -m pip uninstall -y -q hpcflow >/dev/null 2>&1 || true
pip_q --no-build-isolation --no-deps -e "$ROOT"

"$PY" -c 'import h5py, mpi4py, torch, pyerrors, hpcflow; assert h5py.get_config().mpi'
stamp_key >"$STAMP"
say "ready: $VENV (torch $("$PY" -c 'import torch; print(torch.__version__)'), parallel h5py)"
