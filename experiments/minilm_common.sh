# Sourced (not run) by experiments/minilm_figures.sh and experiments/minilm_protocol.sh: the 3-layer student of
# all-MiniLM-L6-v2 and the task runs, with the budgets of the figures in docs/task-distillation.md.
# The caller sets OUT, GLUE and SQUAD; SEED (default 42) seeds every task run. SMOKE=1 shrinks every budget to a
# few examples, to check that the commands run (its scores mean nothing).
PY=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
SEED=${SEED:-42}
COMMON="--do_train --do_eval --overwrite_output_dir --save_steps 0 --logging_steps 50"

declare -A DIRS=([sst2]=SST-2 [mrpc]=MRPC [rte]=RTE [stsb]=STS-B [cola]=CoLA)
# Training examples, epochs and batch size per task: the pair tasks need more optimizer steps than 2 epochs of a
# subsample give at batch 32 (with 64 steps the MRPC teacher stayed at the majority class).
declare -A SAMPLES=([sst2]=2000 [mrpc]=1200 [rte]=1200 [stsb]=1200 [cola]=2000)
declare -A EPOCHS=([sst2]=2 [mrpc]=3 [rte]=3 [stsb]=3 [cola]=3)
declare -A BATCH=([sst2]=32 [mrpc]=16 [rte]=16 [stsb]=16 [cola]=32)
SQUAD_SAMPLES=1000 SQUAD_EVAL=800 SQUAD_EPOCHS=2 GLUE_EVAL=""  # GLUE: the whole dev set
if [ "${SMOKE:-0}" = 1 ]; then
  for task in "${!SAMPLES[@]}"; do SAMPLES[$task]=16; EPOCHS[$task]=1; done
  SQUAD_SAMPLES=8 SQUAD_EVAL=8 SQUAD_EPOCHS=1 GLUE_EVAL="--max_eval_samples 32"
fi

# The package's model has no MLM head, which extract.py requires: experiments/minilm_student.py builds the student
# with the same library code as `extract.py --model_type auto`, from the bare encoder.
build_student() {  # teacher_dir student_dir layer...
  [ -f "$2/config.json" ] || $PY experiments/minilm_student.py "$1" "$2" --layers "${@:3}"
}

squad() {  # name model [teacher]
  local name=$1 model=$2 teacher=${3:-}
  $PY run_squad_w_distillation.py --model_name_or_path "$model" ${teacher:+--teacher_name_or_path "$teacher"} \
    --train_file "$SQUAD/train-from-dev-v1.1.json" --predict_file "$SQUAD/dev-heldout-v1.1.json" \
    --max_train_samples $SQUAD_SAMPLES --max_eval_samples $SQUAD_EVAL --max_seq_length 256 --doc_stride 128 \
    --per_gpu_train_batch_size 16 --per_gpu_eval_batch_size 64 --learning_rate 1e-4 --warmup_steps 30 \
    --num_train_epochs $SQUAD_EPOCHS --output_dir "$OUT/$name" --seed "$SEED" $COMMON
}

glue() {  # task name model [teacher]
  local task=$1 name=$2 model=$3 teacher=${4:-}
  $PY run_glue_w_distillation.py --task_name "$task" --model_name_or_path "$model" \
    ${teacher:+--teacher_name_or_path "$teacher" --temperature 2} \
    --train_file "$GLUE/${DIRS[$task]}/train.tsv" --validation_file "$GLUE/${DIRS[$task]}/dev.tsv" \
    --max_train_samples "${SAMPLES[$task]}" $GLUE_EVAL \
    --max_seq_length 128 --per_gpu_train_batch_size "${BATCH[$task]}" --per_gpu_eval_batch_size 128 \
    --learning_rate 1e-4 --warmup_steps 20 --num_train_epochs "${EPOCHS[$task]}" --output_dir "$OUT/$name" \
    --seed "$SEED" $COMMON
}

done_run() {  # name: the run folder under OUT already holds its evaluation (a rerun skips it)
  [ -f "$OUT/$1/eval_results.json" ]
}

task_run() {  # task name model [teacher]: the SQuAD or the GLUE run
  if [ "$1" = squad ]; then squad "${@:2}"; else glue "$@"; fi
}
