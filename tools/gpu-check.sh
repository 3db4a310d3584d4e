#!/usr/bin/env bash
# Issue 9, point 4, on a lent GPU machine, as one prepared command:
#
#     bash tools/gpu-check.sh            (device tool: run, timeout_s 560)
#
# It uses that machine's python3 as it is (a CUDA torch, h5py, mpi4py, numpy, scipy; nothing
# is installed; pyerrors is not needed: no analysis stage runs) and hpcflow from src/, and
# writes into $OUT (there) or results/gpu (elsewhere), each step under its own timeout so
# that what finished comes back:
#
#   gpu.txt             nvidia-smi and the torch build
#   bench-gpu.json      HMC at L = 64, B = 64 ... 16384, eager and compiled, PCG64 and
#                       Philox momenta, the copy bandwidth and each cell's ratio to its
#                       40 B / site-step bound
#   bench-gpu-more.json the same at L = 16, B = 1024; FHMC/HMC (minimal flow, B = 1024);
#                       whole L = 64 productions of 4096 replicas for every [run] compile x
#                       [run] rng
#   tests-gpu.log       the tests that need CUDA (tests/test_flow.py, test_flowed_force.py,
#                       test_rng.py)
#   bench.log, bench-more.log   the benches' output
#
# Commit the JSON files to results/ with the device named (bench-gpu-h100.json, ...).
set -u
out=${OUT:-results/gpu}
mkdir -p "$out"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.memory --format=csv
    "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
} > "$out/gpu.txt" 2>&1
cat "$out/gpu.txt"

step() {  # step NAME SECONDS COMMAND...: run it under a timeout, its output to NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most $limit s): $*"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    echo "== $name: exit $?"
    tail -n 25 "$out/$name.log"
}

step bench 270 "$py" -m hpcflow.bench --device cuda --Ls 64 --batches 64,1024,4096,16384 \
    --no-variants --no-reference --no-memory --no-scaling --no-fhmc --no-production \
    --no-allocator --min-seconds 0.2 --out "$out/bench-gpu.json"
step bench-more 180 "$py" -m hpcflow.bench --device cuda --Ls 16 --batches 1024 \
    --no-variants --no-reference --no-memory --no-scaling --no-allocator --fhmc-batch 1024 \
    --production-L 64 --production-replicas 4096 --production-trajectories 100 \
    --production-repeat 1 --scaling-timeout 100 --min-seconds 0.2 --out "$out/bench-gpu-more.json"
step tests-gpu 80 "$py" -m pytest -q -p no:cacheprovider -k cuda tests/test_flow.py \
    tests/test_flowed_force.py tests/test_rng.py
