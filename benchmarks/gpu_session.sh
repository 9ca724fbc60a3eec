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
# elsewhere). Stage limits in seconds: T_TEST, T_BENCH (sampler-overhead and vs-diffusers, each), T_TRAIN
# (train-speed: 63 s on an H200), T_DEMO, T_EXTRA; without EXTRA the defaults add up to 570 s, under the device
# tool's 600 s a command (with EXTRA, lower the others or run it in a call of its own). STAGES (default
# "tests bench demo") picks the stages, so a second call can run the ones the first had no time for.
set -u
OUT=${OUT:?set OUT to a folder for the results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PY:-python3}
T_TEST=${T_TEST:-200} T_BENCH=${T_BENCH:-50} T_TRAIN=${T_TRAIN:-90} T_DEMO=${T_DEMO:-180} T_EXTRA=${T_EXTRA:-100}
STAGES=${STAGES:-tests bench demo}
stage() { echo "=== $1 ($(date +%T))"; }
wanted() { case " $STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
touch "$OUT/.started"  # what this session wrote is newer than this (a failed benchmark leaves an old record)

stage env
{ nvidia-smi -L; $PY -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.cuda.is_available())"; } \
    2>&1 | tee "$OUT/env.txt"
if [ -n "${WHEELS:-}" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    $PY -m pip install --quiet --no-deps --no-index "$WHEELS"/*.whl 2>&1 | tail -3
fi

if wanted tests; then
    stage tests
    # pytest-xdist and pytest-timeout where the machine has them (they are not in the dev extra)
    flags=$($PY -c "
import importlib.util as u, os
f = []
if u.find_spec('xdist'): f += ['-n', str(max(1, min(8, (os.cpu_count() or 2) // 2)))]
if u.find_spec('pytest_timeout'): f += ['--timeout', '120']
print(' '.join(f))")
    timeout "$T_TEST" $PY -m pytest -q $flags -rfE -p no:cacheprovider >"$OUT/pytest.log" 2>&1
    echo "pytest exit $? (flags: ${flags:-none})"; tail -25 "$OUT/pytest.log"
fi

# EXTRA (optional): one more Python script to run here, e.g. a scratch measurement
if [ -n "${EXTRA:-}" ]; then
    stage "extra $EXTRA"
    OUT=$OUT timeout "$T_EXTRA" $PY "$EXTRA" 2>&1 | tail -30
fi

if wanted bench; then
    for b in sampler-overhead vs-diffusers train-speed; do
        stage "bench $b"
        limit=$T_BENCH; [ "$b" = train-speed ] && limit=$T_TRAIN
        timeout "$limit" $PY -m condiff.cli.main bench "$b" --profile full 2>&1 | tail -12
        echo "bench $b exit ${PIPESTATUS[0]}"
    done
fi

if wanted demo; then
    stage demo
    ( time timeout "$T_DEMO" $PY -m condiff.cli.main demo --out runs/demo-gpu ) >"$OUT/demo.log" 2>&1
    echo "demo exit $?"; tail -15 "$OUT/demo.log"
fi

stage pack
# only what this session wrote: a benchmark that failed leaves its old record, which must not pass for new
fresh=$(find benchmarks/results BENCHMARKS.md runs/demo-gpu/metrics.json runs/demo-gpu/log.jsonl -type f \
        -newer "$OUT/.started" 2>/dev/null)
if [ -n "$fresh" ]; then tar czf "$OUT/results.tgz" $fresh; echo "packed:" $fresh; else echo "nothing new to pack"; fi
rm -f "$OUT/.started"
ls -la "$OUT"
