#!/usr/bin/env python
"""Fine-tune a student for named-entity recognition (token tagging), optionally distilling a fine-tuned teacher.

    # CoNLL-style column files (token ... tag per line, blank line between sentences)
    python run_ner_w_distillation.py --train_file btc/train.conll --validation_file btc/dev.conll \\
        --model_name_or_path distilbert-base-cased --teacher_name_or_path <bert-base-cased fine-tuned on it> \\
        --do_train --do_eval --output_dir btc_distilled
    # GermEval 2014 (comment lines, outer tags in column 3; --tag_column 4 for the nested ones)
    python run_ner_w_distillation.py --train_file germeval/train.tsv --validation_file germeval/test.tsv \\
        --model_name_or_path distilbert-base-german-cased --do_train --do_eval --output_dir germeval_student
    # a hub data set with tokens / ner_tags columns
    python run_ner_w_distillation.py --dataset_name eriktks/conll2003 --model_name_or_path bert-base-cased \\
        --do_train --do_eval --output_dir conll03_teacher
    torchrun --nproc_per_node 4 run_ner_w_distillation.py <the same flags>

Loss with a teacher: alpha_task * CE + alpha_ce * T^2 * KL(teacher_T || student_T), both per scored token (a
word's first sub-token) and averaged over the scored tokens; teacher and student label orders are matched by
name. Without a teacher: the cross-entropy alone. Evaluation writes eval_results.json (entity precision,
recall and F1 with the CoNLL convention, overall and per type, and token accuracy) and predictions.txt (token,
gold tag, predicted tag per line: the CoNLL evaluation layout). See tasks/ner.py for the file formats and windows.
"""
import argparse
import os
import sys

REPO = os.path.dirname(os.path.abspath(__file__))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import numpy as np  # noqa: E402

from distil.losses import IGNORE_INDEX, task_distillation_loss, token_ce_loss, token_kd_loss  # noqa: E402
from tasks.ner import (FORMATS, check_tags, hub_sentences, label_list, parse_labels, read_column_file,  # noqa: E402
                       sentence_windows, word_predictions, write_predictions)
from tasks.ner_metrics import ner_scores  # noqa: E402
from tasks.evaluation import mean_confidence, predict, write_eval_results  # noqa: E402
from tasks.models import (clamp_max_seq_length, in_task_order, label_permutation, load_config,  # noqa: E402
                          load_student, load_teacher, load_tokenizer)
from tasks.training import (TokenizedSet, add_training_arguments, check_training_args, start_run,  # noqa: E402
                            subsample, task_main, train_and_evaluate)
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
    add("--alpha_task", default=0.5, type=float, help="Weight of the tagging cross-entropy (with a teacher).")
    add("--task_name", default="ner",
        help="Name of the task in eval_results.json and in scripts/downstream_table.py's column (e.g. btc).")
    add("--train_file", default=None, help="Column file to train on (CoNLL-style or GermEval).")
    add("--validation_file", default=None, help="Column file to evaluate on, same format.")
    add("--data_format", default="auto", choices=FORMATS,
        help="conll: token first, tag last, -DOCSTART- skipped; germeval: index, token, outer tag, nested tag, "
             "`#` comment lines; auto: germeval for a file that opens with a `#` line and a 4-column line 1.")
    add("--tag_column", default=None, type=int,
        help="Column of the tags, counted from 1 (default: the last; GermEval: 3, the outer tags; 4 for nested).")
    add("--token_column", default=None, type=int,
        help="Column of the tokens, counted from 1 (default: 1; GermEval: 2).")
    add("--labels", default=None,
        help="The label list: comma-separated, or a file with one label per line (default: the training file's "
             "tags; evaluating alone: the model's). Needed when the evaluation file has tags training lacks.")
    add("--dataset_name", default=None,
        help="Hub data set instead of the files (e.g. eriktks/conll2003), or a folder saved with save_to_disk.")
    add("--dataset_config_name", default=None, help="Configuration of the hub data set.")
    add("--eval_split", default="validation", help="Hub split to evaluate on.")
    add("--dataset_tokens_column", default="tokens", help="Hub data set column holding each sentence's words.")
    add("--dataset_tags_column", default="ner_tags", help="Hub data set column holding the tags (names or ClassLabel).")
    add_unlabelled_arguments(parser)
    return parser.parse_args(argv)


def check_args(args):
    check_training_args(args)
    for flag, path, needed in (("--train_file", args.train_file, args.do_train),
                               ("--validation_file", args.validation_file, args.do_eval)):
        if needed and path is None and args.dataset_name is None:
            raise UserError(f"{flag} is needed for {'--do_train' if flag == '--train_file' else '--do_eval'} "
                            f"(or --dataset_name)")
        if path is not None and not os.path.isfile(path):
            raise UserError(f"{flag} {path}: no such file")
    for flag in ("tag_column", "token_column"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag} counts columns from 1, got {getattr(args, flag)}")
    check_unlabelled_args(args)


# ---------------------------------------------------------------------------------------------------- data


def load_data(args, evaluate):
    """The split's sentences (a ner.ColumnFile), from the file or the hub data set."""
    flag, path = ("--validation_file", args.validation_file) if evaluate else ("--train_file", args.train_file)
    if path is not None:
        return read_column_file(path, flag, args.data_format, args.tag_column, args.token_column)
    from datasets import load_dataset, load_from_disk

    split = args.eval_split if evaluate else "train"
    if os.path.isfile(os.path.join(args.dataset_name, "dataset_dict.json")):  # a DatasetDict saved with save_to_disk
        splits = load_from_disk(args.dataset_name)
        if split not in splits:
            raise UserError(f"--dataset_name {args.dataset_name}: no split {split!r} (splits: {', '.join(splits)})")
        dataset = splits[split]
    else:
        dataset = load_dataset(args.dataset_name, args.dataset_config_name, split=split,
                               cache_dir=args.cache_dir or None)
    return hub_sentences(dataset, f"--dataset_name {args.dataset_name} ({split})", args.dataset_tokens_column,
                         args.dataset_tags_column)


def has_tagging_head(config):
    return any(name.endswith("ForTokenClassification") for name in (config.architectures or ()))


def resolve_labels(args, train_data, student_config):
    """The task's label list and where it came from: --labels, the training file, or a fine-tuned model's."""
    if args.labels:
        return parse_labels(args.labels), f"(--labels {args.labels})"
    if train_data is not None:
        return label_list(train_data.sentences), f"of --train_file {train_data.path}"
    names = [student_config.id2label[k] for k in sorted(student_config.id2label, key=int)]
    if not has_tagging_head(student_config) or names == [f"LABEL_{i}" for i in range(len(names))]:
        raise UserError(f"--model_name_or_path {args.model_name_or_path} has no named tagging labels; give the label "
                        f"list in the model's order with --labels")
    return names, f"of --model_name_or_path {args.model_name_or_path}"


def features(args, tokenizer, data, labels, with_tags=True):
    """The data's windows as a TokenizedSet, with each row's sentence and first word kept beside it. Without
    tags (unlabelled text) each word's first sub-token carries a placeholder label: scored, never read."""
    from datasets import Dataset

    index = {label: i for i, label in enumerate(labels)}
    words = [s.words for s in data.sentences]
    tag_ids = [[index[t] for t in s.tags] for s in data.sentences] if with_tags else None
    rows = sentence_windows(tokenizer, words, tag_ids, args.max_seq_length)
    return TokenizedSet(Dataset.from_dict(rows), COLUMNS), rows


# ---------------------------------------------------------------------------------------------------- loss


def make_loss_fn(args, student_perm, teacher_perm):
    def loss_fn(student_out, teacher_out, batch):
        logits = in_task_order(student_out.logits, student_perm)  # (bs, seq_len, n_labels)
        task = token_ce_loss(logits, batch["labels"], batch.get("labelled"))  # unlabelled rows: not read
        if teacher_out is None:
            return task, {"loss_task": task}
        kd = token_kd_loss(logits, in_task_order(teacher_out.logits, teacher_perm), batch["labels"], args.temperature,
                           args.kd_loss, args.jsd_beta)
        return task_distillation_loss(task, kd, args.alpha_task, args.alpha_ce), {"loss_task": task, "loss_ce": kd}
    return loss_fn


# ---------------------------------------------------------------------------------------------- evaluation


def evaluate(args, model, tokenizer, ctx, eval_data, labels, out_folder, model_path=None):
    """Entity scores of `model`; the master writes eval_results.json and predictions.txt to out_folder. Collective."""
    data, dataset, rows = eval_data
    amp = amp_dtype(bf16=args.bf16, fp16=args.fp16)
    logits = predict(model, dataset, ["logits"], tokenizer.pad_token_id, args.per_gpu_eval_batch_size, ctx,
                     amp_dtype=amp, per_position=True)["logits"]
    if not ctx.is_master:
        return None
    perm = label_permutation(unwrap(model).config.id2label, labels, model_path or args.model_name_or_path)
    logits = [in_task_order(np.asarray(row), perm) for row in logits]  # (length, n_labels) each
    predicted = word_predictions(rows, logits, len(data.sentences), labels)
    scores = ner_scores([s.tags for s in data.sentences], predicted)
    per_type = scores.pop("per_type")
    os.makedirs(out_folder, exist_ok=True)
    write_predictions(data, predicted, os.path.join(out_folder, "predictions.txt"))
    from distil.evaluation import count_parameters

    scored = [row[i] for r, row in enumerate(logits) for i, label in enumerate(rows["labels"][r])
              if label != IGNORE_INDEX]  # each word's first sub-token
    write_eval_results(out_folder, {"task": args.task_name, "task_type": "ner", "metrics": scores,
                                    "per_type": per_type, "score": 100.0 * scores["f1"], "score_name": "entity_f1",
                                    "mean_confidence": mean_confidence(scored),
                                    "n_examples": len(data.sentences), "labels": list(labels), "model": model_path,
                                    "n_parameters": count_parameters(model), "data": data.path})
    logger.info("NER (%d sentences): entity precision %.4f, recall %.4f, F1 %.4f; token accuracy %.4f",
                len(data.sentences), scores["precision"], scores["recall"], scores["f1"], scores["accuracy"])
    return scores


# ---------------------------------------------------------------------------------------------------- main


def run(args):
    check_args(args)
    # The data first: a bad line is reported before models load (nothing is written until train_and_evaluate).
    train_data = load_data(args, evaluate=False) if args.do_train else None
    eval_data = load_data(args, evaluate=True) if args.do_eval or args.evaluate_during_training else None
    unlabelled_data = None
    if args.unlabeled_file:
        unlabelled_data = read_column_file(args.unlabeled_file, "--unlabeled_file", args.data_format,
                                           token_column=args.token_column, with_tags=False)
    ctx, resume_from = start_run(args, [args.train_file, args.validation_file, args.unlabeled_file])
    tokenizer = load_tokenizer(args)
    if getattr(tokenizer, "add_prefix_space", None) is False:  # byte-level BPE: words need their leading space
        tokenizer = load_tokenizer(args, add_prefix_space=True)
    from transformers import AutoModelForTokenClassification

    student_config = load_config(args.config_name or args.model_name_or_path,
                                 "--config_name" if args.config_name else "--model_name_or_path", args.model_type,
                                 args.cache_dir or None)
    labels, origin = resolve_labels(args, train_data, student_config)
    for data in (train_data, eval_data):
        if data is not None:
            check_tags(data, labels, origin)
    # A fine-tuned tagger keeps its head and its label order (read through a permutation); any other checkpoint
    # gets a new head in the task's order.
    overrides, student_perm = {}, None
    if has_tagging_head(student_config):
        student_perm = label_permutation(student_config.id2label, labels,
                                         f"--model_name_or_path {args.model_name_or_path}")
    else:
        overrides = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                     "label2id": {label: i for i, label in enumerate(labels)}}
    student = load_student(args, AutoModelForTokenClassification, **overrides).to(ctx.device)
    teacher, teacher_perm = None, None
    if args.do_train and args.teacher_name_or_path:
        teacher = load_teacher(args, AutoModelForTokenClassification, tokenizer, student)
        teacher_perm = label_permutation(teacher.config.id2label, labels,
                                         f"--teacher_name_or_path {args.teacher_name_or_path}")
        teacher.to(ctx.device)
    clamp_max_seq_length(args, tokenizer, student, teacher)

    if eval_data is not None and args.max_eval_samples:
        eval_data.sentences = eval_data.sentences[:args.max_eval_samples]
    evaluation = (eval_data, *features(args, tokenizer, eval_data, labels)) if eval_data is not None else None
    train_set = None
    if train_data is not None:
        train_data.sentences = subsample(train_data.sentences, args.max_train_samples, args.seed)
        train_set = features(args, tokenizer, train_data, labels)[0]
    unlabelled_set = None
    if unlabelled_data is not None:
        unlabelled_set = features(args, tokenizer, unlabelled_data, labels, with_tags=False)[0]

    train_and_evaluate(args, ctx, student, teacher, train_set, make_loss_fn(args, student_perm, teacher_perm),
                       tokenizer,
                       lambda model, folder, path: evaluate(args, model, tokenizer, ctx, evaluation, labels, folder,
                                                            path),
                       AutoModelForTokenClassification, resume_from, unlabelled=unlabelled_set, per_token=True,
                       **overrides)
    return ctx


def main(argv=None):
    task_main(run, parse_args(argv))


if __name__ == "__main__":
    main()
