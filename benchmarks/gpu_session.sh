#!/usr/bin/env bash
# One lease of a GPU machine, as one prepared script: the test suite with CUDA available (the CLI then
# picks cuda by default, so the train / sample / solve / namm / pnp / dual tests run their GPU paths),
# the speed benchmarks' "full" profiles recorded, and `condiff demo` timed. Everything it writes goes
# under $OUT (results.tgz holds the recorded tables), each stage has its own time limit so that one
# slow stage cannot take the others' time.
#
# Run from the repository root on a machine whose python3 has a CUDA build of torch and no network:
#     OUT=/tmp/out WHEELS=.gpu/wheels bash benchmarks/gpu_session.sh
# WHEELS (optional) is a folder of wheels to install first (diffusers, elkai: `pip download` them
# elsewhere). Stage limits in seconds: T_TEST, T_BENCH, T_DEMO, T_EXTRA.
set -u
OUT=${OUT:?set OUT to a folder for the results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PY:-python3}
T_TEST=${T_TEST:-180} T_BENCH=${T_BENCH:-90} T_DEMO=${T_DEMO:-120} T_EXTRA=${T_EXTRA:-100}
stage() { echo "=== $1 ($(date +%T))"; }

stage env
{ nvidia-smi -L; $PY -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.cuda.is_available())"; } \
    2>&1 | tee "$OUT/env.txt"
if [ -n "${WHEELS:-}" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    $PY -m pip install --quiet --no-deps --no-index "$WHEELS"/*.whl 2>&1 | tail -3
fi

stage tests
workers=$($PY -c "import os; print(max(1, min(8, (os.cpu_count() or 2) // 2)))")
timeout "$T_TEST" $PY -m pytest -q -n "$workers" -rfE --timeout 120 >"$OUT/pytest.log" 2>&1
echo "pytest exit $?"; tail -25 "$OUT/pytest.log"

# EXTRA (optional): one more Python script to run here, e.g. a scratch measurement
if [ -n "${EXTRA:-}" ]; then
    stage "extra $EXTRA"
    OUT=$OUT timeout "$T_EXTRA" $PY "$EXTRA" 2>&1 | tail -30
fi

for b in sampler-overhead vs-diffusers train-speed; do
    stage "bench $b"
    timeout "$T_BENCH" $PY -m condiff.cli.main bench "$b" --profile full 2>&1 | tail -12
done

stage demo
( time timeout "$T_DEMO" $PY -m condiff.cli.main demo --out runs/demo-gpu ) >"$OUT/demo.log" 2>&1
echo "demo exit $?"; tail -15 "$OUT/demo.log"

stage pack
tar czf "$OUT/results.tgz" benchmarks/results/*-full.* BENCHMARKS.md runs/demo-gpu/metrics.json runs/demo-gpu/log.jsonl 2>/dev/null
ls -la "$OUT"
