#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one call, for a lent GPU machine with a short lease:
#   1. the CUDA tests (pytest -m cuda: conformance on the GPU per family, AutoFlow guides, the demo);
#   2. the real host synchronisations of one training step per family (benchmarks/bench_cuda_syncs.py);
#   3. SVI steps/s against vectorised particles up to 4096 (bench --what particles --device cuda);
#   4. the speed benchmark on the GPU at D = 8 and 32 (bench --what speed --device cuda).  DEV=cpu: a dry run of 2-4 here.
# Each stage has its own time limit and its log under $OUT; the results folders come back as one tarball.
# Where the machine lacks Pyro, zuko or ArviZ, carry them as wheels in .whl/ (pip download --no-deps ...):
# they are installed into /tmp/site first.
#
# Usage:  OUT=/tmp/gpu bash benchmarks/device_check.sh [stage ...]   (stages: tests syncs particles speed;
#         DIMS, PEERS, SPEED_LIMIT set the speed stage's D list, peers and time limit)
set -uo pipefail
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
STAGES=${*:-tests syncs particles speed}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader
python3 -c "import torch, pyro, zuko, arviz; print('torch', torch.__version__, 'pyro', pyro.__version__, \
'zuko', zuko.__version__, 'arviz', arviz.__version__, torch.cuda.get_device_name(), 'cpus', __import__('os').cpu_count())"

stage() {  # stage NAME LIMIT_S COMMAND...: run, log to $OUT/NAME.log, print rc, seconds and the log's tail
    local name=$1 limit=$2 start rc
    shift 2
    echo "== $name (limit $limit s)"
    start=$(date +%s)
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "== $name: rc $rc, $(($(date +%s) - start)) s"
    tail -n "${TAIL:-12}" "$OUT/$name.log"
}

for s in $STAGES; do
    case $s in
    tests) stage tests 150 python3 -m pytest -q -p no:cacheprovider -m cuda -n 8 --timeout 120 ;;
    syncs) TAIL=40 stage syncs 90 python3 benchmarks/bench_cuda_syncs.py --device "${DEV:-cuda}" --out "$OUT/syncs.md" ;;
    particles) stage particles 120 python3 -m pyro_flows bench --what particles --device "${DEV:-cuda}" \
        --results "$OUT/results" ;;
    speed) TAIL=30 stage speed "${SPEED_LIMIT:-260}" python3 -m pyro_flows bench --what speed --device "${DEV:-cuda}" \
        --dims "${DIMS:-8,32}" --repeats 5 ${PEERS:+--peers "$PEERS"} --results "$OUT/results/speed" ;;
    *) echo "unknown stage $s" ;;
    esac
done
[ -d "$OUT/results" ] && tar czf "$OUT/results.tgz" -C "$OUT" results && rm -rf "$OUT/results"
ls -la "$OUT"
