#!/usr/bin/env python
"""Fine-tune a student for sentence(-pair) classification or regression (GLUE), optionally distilling a teacher.

    # a GLUE task from the hub
    python run_glue_w_distillation.py --task_name mrpc --model_name_or_path distilbert-base-uncased \\
        --teacher_name_or_path bert-base-uncased-finetuned-mrpc --do_train --do_eval --output_dir mrpc_distilled
    # your own files: tsv, csv or json lines with `sentence` (or `sentence1`/`sentence2`) and `label` columns
    python run_glue_w_distillation.py --task_name sst2 --train_file SST-2/train.tsv --validation_file SST-2/dev.tsv \\
        --model_name_or_path distilbert-base-uncased --do_train --do_eval --output_dir sst2_student
    torchrun --nproc_per_node 4 run_glue_w_distillation.py <the same flags>

Loss with a teacher: alpha_task * task loss + alpha_ce * distillation term, where the task loss is the
cross-entropy (squared error for regression) and the distillation term T^2 * KL(teacher_T || student_T) on
the class distribution (for regression the squared error to the teacher's prediction). Without a teacher:
the task loss alone. A --task_name that is not a GLUE task names a task of your own, read from the files:
classification over integer labels 0..max or over the names of string labels, regression for non-integer
numbers or --num_labels 1. A fine-tuned classifier (teacher, or a model evaluated with --do_eval) keeps its own
label order: its outputs are read in the task's order by label name. Evaluation writes eval_results.json. See
docs/task-distillation.md.
"""
import argparse
import os
import sys

REPO = os.path.dirname(os.path.abspath(__file__))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tasks.glue import (GLUE_TASKS, Task, get_task, glue_metrics, infer_custom_task, label_ids,  # noqa: E402
                         load_file, load_hub_split, task_score, text_columns)
from distil.losses import classification_kd_loss, classification_loss, task_distillation_loss  # noqa: E402
from tasks.evaluation import mean_confidence, predict, write_eval_results  # noqa: E402
from tasks.models import (clamp_max_seq_length, in_task_order, label_permutation, load_config,  # noqa: E402
                          load_student, load_teacher, load_tokenizer)
from tasks.training import (TokenizedSet, add_training_arguments, check_training_args, start_run,  # noqa: E402
                            task_main, train_and_evaluate)
from tasks.unlabelled import add_unlabelled_arguments, check_unlabelled_args  # noqa: E402
from utils import UserError, amp_dtype, logger, unwrap  # noqa: E402

COLUMNS = ("input_ids", "token_type_ids", "attention_mask", "labels")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # T = 1: on held-out data T = 2 (the SQuAD script's default, the paper's) and 4 lowered the scores of a
    # student task-distilled from a teacher that had fitted its training set (docs/task-distillation.md).
    add_training_arguments(parser, max_seq_length=128, temperature=1.0)
    add = parser.add_argument
    add("--task_name", required=True,
        help="A GLUE task (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli), or the name of a task of your own "
             "given by --train_file / --validation_file.")
    add("--alpha_task", default=0.5, type=float, help="Weight of the task loss (with a teacher).")
    add("--train_file", default=None,
        help="Training data (.tsv, .csv, .json/.jsonl); default: the GLUE task from the hub.")
    add("--validation_file", default=None, help="Evaluation data, same formats.")
    add("--text_column", default=None, help="Column of the (first) sentence (default: sentence or sentence1).")
    add("--text_pair_column", default=None, help="Column of the second sentence of a pair (default: sentence2).")
    add("--label_column", default="label")
    add("--num_labels", default=None, type=int, help="Classes of a task of your own (1: regression); default: "
                                                     "inferred from the training labels.")
    add_unlabelled_arguments(parser)
    return parser.parse_args(argv)


def check_args(args):
    check_training_args(args)
    task = get_task(args.task_name)
    if task is None and ((args.do_train and not args.train_file) or (args.do_eval and not args.validation_file)):
        raise UserError(f"--task_name {args.task_name} is not a GLUE task ({', '.join(GLUE_TASKS)}); a "
                        f"task of your own needs --train_file and --validation_file")
    if args.num_labels is not None and args.num_labels < 1:
        raise UserError(f"--num_labels must be at least 1, got {args.num_labels}")
    if task is not None and args.num_labels not in (None, task.num_labels):
        raise UserError(f"--num_labels {args.num_labels}: {task.display} has {task.num_labels} label(s)")
    for flag, path in (("--train_file", args.train_file), ("--validation_file", args.validation_file)):
        if path is not None and not os.path.isfile(path):
            raise UserError(f"{flag} {path}: no such file")
    check_unlabelled_args(args)


# ---------------------------------------------------------------------------------------------------- data


def load_split(args, task, evaluate):
    """(raw datasets.Dataset, a name for error messages): from the given file, else from the hub."""
    flag, path = ("--validation_file", args.validation_file) if evaluate else ("--train_file", args.train_file)
    if path is not None:
        return load_file(path, flag, args.cache_dir or None), f"{flag} {path}"
    split = ("validation_matched" if task.name == "mnli" else "validation") if evaluate else "train"
    return load_hub_split(task, split, args.cache_dir or None), f"{task.display} {split}"


def resolve_task(args, train_raw, model_config=None):
    """The GLUE task, or a task of your own inferred from the training labels (or the model's config)."""
    task = get_task(args.task_name)
    if task is not None:
        return task
    if train_raw is not None:
        return infer_custom_task(args.task_name, list(train_raw[args.label_column]), args.num_labels)
    names = tuple(model_config.id2label[i] for i in range(model_config.num_labels))
    generic = all(n == f"LABEL_{i}" for i, n in enumerate(names))
    metrics = ("pearson", "spearmanr") if model_config.num_labels == 1 else ("accuracy",)
    return Task(args.task_name, ("", None), model_config.num_labels, metrics, () if generic else names, args.task_name)


def tokenize(args, tokenizer, raw, task, source, labelled=True):
    """input_ids / attention_mask / token_type_ids / labels, truncated to --max_seq_length, checked labels.
    labelled=False (unlabelled text): the label column is not read; every row gets a placeholder label."""
    first, second = text_columns(raw, task if get_task(args.task_name) else None, args, source, labelled)
    if labelled:
        labels = label_ids(list(raw[args.label_column]), task, source, task.label_names)
    else:
        labels = [0.0 if task.is_regression else 0] * len(raw)

    def encode(batch, indices):
        texts = [str(t) for t in batch[first]]
        pairs = [str(t) for t in batch[second]] if second else None
        # Segment ids even where the tokenizer returns none by default (DistilBERT's): a BERT teacher needs them.
        enc = tokenizer(texts, pairs, truncation=True, max_length=args.max_seq_length, return_token_type_ids=True)
        enc["labels"] = [labels[i] for i in indices]
        return dict(enc)

    return raw.map(encode, batched=True, with_indices=True, remove_columns=raw.column_names,
                   load_from_cache_file=not args.overwrite_cache, num_proc=args.threads if args.threads > 1 else None,
                   desc="tokenising")


# ---------------------------------------------------------------------------------------------- label order


def label_order(model, task, source):
    """label_permutation of a model's classifier against the task (None: its outputs are in the task's order;
    always None for regression and for tasks whose labels are bare integers, which name no class)."""
    if task.is_regression or not task.label_names:
        return None
    return label_permutation(unwrap(model).config.id2label, task.label_names, source)


def student_label_overrides(config, task):
    """Config overrides for the student: the task's label count, and its label names unless the checkpoint is
    a classifier with names of its own (its head keeps its order: its outputs are then read by name)."""
    overrides = {"num_labels": task.num_labels}
    names = [config.id2label[i] for i in sorted(config.id2label)]
    own_names = names != [f"LABEL_{i}" for i in range(len(names))]
    if task.label_names and not (own_names and config.num_labels == task.num_labels):
        overrides.update(id2label=dict(enumerate(task.label_names)),
                         label2id={n: i for i, n in enumerate(task.label_names)})
    return overrides


# ---------------------------------------------------------------------------------------------------- loss


def make_loss_fn(args, student_perm=None, teacher_perm=None):
    """student_perm / teacher_perm: label_order() of each model (None: already the task's order)."""
    def loss_fn(student_out, teacher_out, batch):
        student_logits = in_task_order(student_out.logits, student_perm)
        task = classification_loss(student_logits, batch["labels"], batch.get("labelled"))  # unlabelled: not read
        if teacher_out is None:
            return task, {"loss_task": task}
        kd = classification_kd_loss(student_logits, in_task_order(teacher_out.logits, teacher_perm),
                                    args.temperature, args.kd_loss, args.jsd_beta)
        return task_distillation_loss(task, kd, args.alpha_task, args.alpha_ce), {"loss_task": task, "loss_ce": kd}
    return loss_fn


# ---------------------------------------------------------------------------------------------- evaluation


def evaluate(args, model, tokenizer, ctx, task, eval_set, out_folder, model_path=None):
    """The task's metrics for `model`; the master writes out_folder/eval_results.json. Collective."""
    amp = amp_dtype(bf16=args.bf16, fp16=args.fp16)
    logits = predict(model, eval_set, ["logits"], tokenizer.pad_token_id, args.per_gpu_eval_batch_size, ctx,
                     amp_dtype=amp)["logits"]
    if not ctx.is_master:
        return None
    perm = label_order(model, task, model_path or args.model_name_or_path)  # checked when the model was loaded
    logits = [in_task_order(row, perm) for row in logits]
    labels = [eval_set.data[i]["labels"] for i in range(len(eval_set))]
    metrics = glue_metrics(task, logits, labels)
    from distil.evaluation import count_parameters

    score = task_score(task, metrics)
    confidence = {} if task.is_regression else {"mean_confidence": mean_confidence(logits)}
    write_eval_results(out_folder, {"task": task.name, "metrics": metrics, "score": score, **confidence,
                                    "score_name": "+".join(task.metrics), "n_examples": len(eval_set),
                                    "model": model_path, "n_parameters": count_parameters(model),
                                    "data": args.validation_file or f"{task.name} (hub)"})
    logger.info("%s (%d examples): %s; score %.2f", task.display, len(eval_set),
                ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), score)
    return metrics


# ---------------------------------------------------------------------------------------------------- main


def run(args):
    check_args(args)
    ctx, resume_from = start_run(args, [args.train_file, args.validation_file, args.unlabeled_file])
    tokenizer = load_tokenizer(args)
    from transformers import AutoModelForSequenceClassification

    train_raw = source = None
    if args.do_train:
        train_raw, source = load_split(args, get_task(args.task_name), evaluate=False)
        if args.label_column not in train_raw.column_names:
            raise UserError(f"{source}: no column {args.label_column!r} (columns: {', '.join(train_raw.column_names)}); "
                            f"name it with --label_column")
        if args.max_train_samples and args.max_train_samples < len(train_raw):
            train_raw = train_raw.shuffle(seed=args.seed).select(range(args.max_train_samples))
    config_flag = "--config_name" if args.config_name else "--model_name_or_path"
    config = load_config(args.config_name or args.model_name_or_path, config_flag, args.model_type,
                         args.cache_dir or None)
    task = resolve_task(args, train_raw, config)
    overrides = student_label_overrides(config, task)
    student = load_student(args, AutoModelForSequenceClassification, **overrides).to(ctx.device)
    student_perm = label_order(student, task, f"{config_flag} {args.config_name or args.model_name_or_path}")
    teacher = teacher_perm = None
    if args.do_train and args.teacher_name_or_path:
        teacher = load_teacher(args, AutoModelForSequenceClassification, tokenizer, student)
        if teacher.config.num_labels != task.num_labels:
            raise UserError(f"--teacher_name_or_path {args.teacher_name_or_path}: the teacher predicts "
                            f"{teacher.config.num_labels} label(s), the task has {task.num_labels}")
        teacher_perm = label_order(teacher, task, f"--teacher_name_or_path {args.teacher_name_or_path}")
        teacher.to(ctx.device)
    clamp_max_seq_length(args, tokenizer, student, teacher)

    eval_set = None
    if args.do_eval or args.evaluate_during_training:
        eval_raw, eval_source = load_split(args, task, evaluate=True)
        if args.label_column not in eval_raw.column_names:
            raise UserError(f"{eval_source}: no column {args.label_column!r} (columns: "
                            f"{', '.join(eval_raw.column_names)}); name it with --label_column")
        if args.max_eval_samples:
            eval_raw = eval_raw.select(range(min(args.max_eval_samples, len(eval_raw))))
        eval_set = TokenizedSet(tokenize(args, tokenizer, eval_raw, task, eval_source), COLUMNS)
    train_set = TokenizedSet(tokenize(args, tokenizer, train_raw, task, source), COLUMNS) if args.do_train else None
    unlabelled_set = None
    if args.unlabeled_file:
        source = f"--unlabeled_file {args.unlabeled_file}"
        unlabelled_raw = load_file(args.unlabeled_file, "--unlabeled_file", args.cache_dir or None)
        unlabelled_set = TokenizedSet(tokenize(args, tokenizer, unlabelled_raw, task, source, labelled=False), COLUMNS)

    loss_fn = make_loss_fn(args, student_perm, teacher_perm)
    train_and_evaluate(args, ctx, student, teacher, train_set, loss_fn, tokenizer,
                       lambda model, folder, path: evaluate(args, model, tokenizer, ctx, task, eval_set, folder, path),
                       AutoModelForSequenceClassification, resume_from, unlabelled=unlabelled_set, **overrides)
    return ctx


def main(argv=None):
    task_main(run, parse_args(argv))


if __name__ == "__main__":
    main()
