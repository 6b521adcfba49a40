#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one run (CI has no GPU, so these are run by hand on a GPU machine):
#   1. tests/test_cuda.py: bf16 and fp16 training end to end, the step's host synchronisations as PyTorch's
#      sync debug mode counts them, a non-finite step skipped on the device;
#   2. scripts/benchmark.py at BERT-base size, length 512, bf16: ours vs the original-style reference, with
#      MFU, for each batch size in BATCH_SIZES, then compiled, then the GPT-2 and restricted configurations.
# Logs and JSON figures go to $OUT (default /tmp/gpu_checks). Exits non-zero if any part failed.
#
# On a machine that has torch and transformers but not this project's smaller dependencies, put their wheels
# in .whl/ first (e.g. pip download --no-deps -d .whl tensorboardX gitpython gitdb smmap); they are installed
# into /tmp/site without network access.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"

status=0
run() {  # run NAME COMMAND...: output to the terminal and to $OUT/NAME.log
    local name=$1
    shift
    echo "=== $name: $*"
    "$@" 2>&1 | tee "$OUT/$name.log" || status=1
}
run tests $PY -m pytest -q -rs tests/test_cuda.py tests/test_host_syncs.py
for bs in ${BATCH_SIZES:-32 64}; do
    run "bert_mlm_bs$bs" $PY scripts/benchmark.py --size base --device cuda --bf16 --config bert_mlm \
        --batch_size "$bs" --json "$OUT/bert_mlm_bs$bs.json"
done
run bert_mlm_compiled $PY scripts/benchmark.py --size base --device cuda --bf16 --compile --config bert_mlm \
    --batch_size "${COMPILE_BATCH_SIZE:-64}" --json "$OUT/bert_mlm_compiled.json"
run others $PY scripts/benchmark.py --size base --device cuda --bf16 --config bert_mlm_restrict \
    --json "$OUT/bert_mlm_restrict.json"
run gpt2 $PY scripts/benchmark.py --size base --device cuda --bf16 --config gpt2_clm --json "$OUT/gpt2_clm.json"
echo "=== done, status $status; logs in $OUT"
exit $status
