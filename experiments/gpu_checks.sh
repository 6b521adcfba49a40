#!/usr/bin/env bash
# The first GPU hour: one ~10-minute run that settles the most, in this order (each step under its own `timeout`,
# its log kept in $OUT/<step>.log, a summary at the end; exits non-zero if any step failed):
#   probe        experiments/gpu_probe.py: device name and the bf16 peak MFU uses, pageable vs pinned copy stall,
#                eager vs per-block vs whole-model compiled causal attention kernel, evaluation cost
#   cuda_tests   tests/test_cuda.py: bf16/fp16 training end to end, host syncs, device-side step skipping
#   ddp_fp16_*   train.py --fp16 under DDP over a real one-rank NCCL group (torchrun --nproc_per_node=1), with
#   fsdp_bf16_*  held-out evaluation; then FSDP2 --bf16 the same way (DCP sharded checkpoints, the teacher read
#                shard by shard); each run, then a mid-epoch --resume from its first checkpoint, then loading the
#                export with from_pretrained
#   bench_base   scripts/benchmark.py BERT-base -> 6 layers, length 512, bf16, at the largest batch that fits, MFU
#   fsdp_cuda    scripts/benchmark.py --fsdp_ranks 1 on CUDA (the CUDA allocator's figures per rank)
#   gpt2         scripts/benchmark.py gpt2_clm at base size
#   compile      scripts/benchmark.py --compile, only if time is left
# Left to the CPU tests: DDP = FSDP numerics on 2 ranks, exact resume, the loss maths, the all-reduce count.
#
#   bash experiments/gpu_checks.sh                 # on the GPU machine; BUDGET=540 seconds by default
#   DRY=1 bash experiments/gpu_checks.sh           # the same steps on the CPU (gloo, tiny sizes): proves the script
#
# On a machine that has torch and transformers but not this project's smaller dependencies, put their wheels
# in .whl/ first (e.g. pip download --no-deps -d .whl tensorboardX gitpython gitdb smmap); they are installed
# into /tmp/site without network access.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_checks}
DRY=${DRY:-0}
BUDGET=${BUDGET:-540}  # seconds for all steps together; a step gets at most what is left
SLOW=${SLOW:-1}        # multiplies every step's time limit (DRY=1 sets 4: a shared CPU is slow)
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# Inductor's own cache, here: a step killed by its timeout can leave a half-written kernel in a shared cache.
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$OUT/inductor_cache}

if [ "$DRY" = 1 ]; then
    DEVICE=cpu N_GPU=0 SETUP_SIZE=tiny PROBE=(--device cpu --size tiny --compile_backend aot_eager)
    SLOW=${SLOW_DRY:-4} BUDGET=${BUDGET_DRY:-3600}
    TRAIN_SIZE=(--batch_size 4 --checkpoint_interval 4 --eval_batch_size 4)
    BENCH=(--steps 2 --warmup 1 --loss_steps 1 --loss_warmup 0 --vocab_size 300 --hidden_size 32 --heads 2
           --ffn 37 --teacher_layers 2 --student_layers 1 --seq_len 24)
    BATCHES="3" GPT2_BATCH=3 FSDP_BENCH=(--batch_size 2)
else
    DEVICE=cuda N_GPU=1 SETUP_SIZE=small PROBE=(--device cuda --size base)
    TRAIN_SIZE=(--batch_size 32 --checkpoint_interval 20 --eval_batch_size 32)
    BENCH=(--size base) BATCHES=${BATCH_SIZES:-128 64 32 16} GPT2_BATCH=32 FSDP_BENCH=(--batch_size 16)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi
$PY -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"

START=$(date +%s)
status=0
summary=()
step() {  # step NAME SECONDS COMMAND...: under timeout (capped by what is left of BUDGET), output in $OUT/NAME.log
    local name=$1 limit=$(($2 * SLOW))
    shift 2
    local left=$((BUDGET - ($(date +%s) - START)))
    if ((left < 20)); then
        summary+=("$name: skipped, budget spent")
        return 1
    fi
    ((limit > left)) && limit=$left
    echo "=== $name (at most ${limit} s): $*"
    local t0 rc
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    tail -n "${TAIL:-4}" "$OUT/$name.log"
    summary+=("$name: $([ $rc = 0 ] && echo ok || echo "FAILED (rc $rc$([ $rc = 124 ] && echo ', timeout'))") in $(($(date +%s) - t0)) s")
    ((rc != 0)) && status=1
    return $rc
}
port() { $PY -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }

TAIL=12 step probe 180 $PY experiments/gpu_probe.py "${PROBE[@]}" --json "$OUT/probe.json"
step cuda_tests 150 $PY -m pytest -q -rs tests/test_cuda.py

INPUTS=$OUT/inputs
step setup 90 $PY experiments/gpu_checks_setup.py --out "$INPUTS" --size $SETUP_SIZE
TRAIN=(train.py --student_type distilbert --student_config "$INPUTS/student.json" --teacher_type bert
       --teacher_name "$INPUTS/teacher" --mlm --alpha_ce 5 --alpha_mlm 2 --alpha_clm 0 --alpha_cos 1
       --data_file "$INPUTS/train.teacher.bin" --token_counts "$INPUTS/counts.pickle"
       --eval_data_file "$INPUTS/heldout.teacher.bin" --eval_max_batches 4 --n_epoch 1 --gradient_accumulation_steps 2
       --log_interval 10 --save_total_limit 20 --n_gpu $N_GPU "${TRAIN_SIZE[@]}")
for run in "ddp_fp16 --fp16" "fsdp_bf16 --fsdp --bf16"; do
    set -- $run
    name=$1
    shift
    dump=$OUT/$name
    one_rank=($PY -m torch.distributed.run --nproc_per_node=1 --master_addr=127.0.0.1)
    step "${name}_train" 120 "${one_rank[@]}" --master_port="$(port)" "${TRAIN[@]}" "$@" --dump_path "$dump" --force &&
    step "${name}_resume" 90 "${one_rank[@]}" --master_port="$(port)" "${TRAIN[@]}" "$@" --dump_path "$dump" \
        --resume "$(ls -d "$dump"/checkpoints/* | head -n 1)" &&
    step "${name}_export" 30 $PY -c "import sys; from transformers import DistilBertForMaskedLM as M; \
m = M.from_pretrained(sys.argv[1]); print('export loads:', sum(p.numel() for p in m.parameters()), 'parameters')" "$dump"
done

# the largest batch of $BATCHES that fits
TAIL=12 step bench_base 180 bash -c 'batches=$1; shift; for bs in $batches; do "$@" --batch_size "$bs" && exit 0;
    echo "batch $bs did not run (out of memory?): trying the next"; done; exit 1' _ "$BATCHES" \
    $PY scripts/benchmark.py --device $DEVICE --bf16 --config bert_mlm "${BENCH[@]}" --json "$OUT/bert_mlm.json"
TAIL=10 step fsdp_cuda 90 $PY scripts/benchmark.py --fsdp_ranks 1 --config bert_mlm --device $DEVICE --bf16 \
    "${BENCH[@]}" "${FSDP_BENCH[@]}" --json "$OUT/fsdp_ranks_1.json"
TAIL=8 step gpt2 90 $PY scripts/benchmark.py --device $DEVICE --bf16 --config gpt2_clm "${BENCH[@]}" \
    --batch_size $GPT2_BATCH --json "$OUT/gpt2_clm.json"
TAIL=8 step compile 120 $PY scripts/benchmark.py --device $DEVICE --bf16 --compile --config bert_mlm "${BENCH[@]}" \
    --batch_size "${BATCHES##* }" --json "$OUT/bert_mlm_compiled.json"

echo "=== summary ($(($(date +%s) - START)) s of a $BUDGET s budget; logs and JSON in $OUT)"
printf '%s\n' "${summary[@]}"
exit $status
