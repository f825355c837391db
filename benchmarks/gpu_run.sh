#!/usr/bin/env bash
# What the GPU machine runs (issue 29), from the repository's root there, in one command of the device tool:
#
#   here:  python benchmarks/gpu_pack.py            # benchmarks/work/cifar10-50000-10000.tar.gz, 19.3 MiB
#   then:  the device tool's run, carry ["benchmarks/work/cifar10-50000-10000.tar.gz"], command
#          "bash benchmarks/gpu_run.sh", timeout_s 600
#   (arguments go on to gpu_check.py, e.g. --dry-run; PACK names another pack of gpu_pack.py's)
#
# It installs cnnlab beside the machine's own CUDA PyTorch (no network there: no build isolation, no
# dependencies; where pip cannot, src/ goes on PYTHONPATH instead). What cnnlab needs and that machine lacks
# (kornia, captum, optuna) is imported only by commands the check does not run. It unpacks the data, runs
# gpu_check.py with the CPU figures of the same data (the newest results/gpu_check-cpu-*.json), and copies
# the result file and the log to $OUT, also when the check is cut short.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT" /tmp/gpu_data
export PYTHONUNBUFFERED=1 CNNLAB_CACHE=/tmp/gpu_cache
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || export PYTHONPATH=$PWD/src
PACK=${PACK:-cifar10-50000-10000}
tar -xzf "benchmarks/work/$PACK.tar.gz" -C /tmp/gpu_data || exit 1
reference=$(ls -t benchmarks/results/gpu_check-cpu-*.json 2>/dev/null | head -1)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
timeout 560 python3 benchmarks/gpu_check.py --data "/tmp/gpu_data/$PACK" --work /tmp/gpu_work \
    --max-seconds 500 ${reference:+--cpu-reference "$reference"} "$@" 2>&1 | tee "$OUT/gpu_check.log"
code=${PIPESTATUS[0]}
for f in benchmarks/results/gpu_check-*.json; do
    case $f in *gpu_check-cpu-*) ;; *) cp "$f" "$OUT/" ;; esac
done
exit "$code"
