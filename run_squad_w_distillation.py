#!/usr/bin/env python
"""Fine-tune a student for extractive question answering (SQuAD), optionally distilling a fine-tuned teacher.

    # the second distillation step of distilbert-base-uncased-distilled-squad
    python run_squad_w_distillation.py --model_type distilbert --model_name_or_path distilbert-base-uncased \\
        --teacher_type bert --teacher_name_or_path bert-base-uncased-whole-word-masking-finetuned-squad \\
        --train_file train-v1.1.json --predict_file dev-v1.1.json --do_train --do_eval --do_lower_case \\
        --output_dir squad_distilled --per_gpu_train_batch_size 12 --learning_rate 3e-5 --num_train_epochs 2
    torchrun --nproc_per_node 4 run_squad_w_distillation.py <the same flags>

Loss with a teacher: alpha_squad * (CE(start) + CE(end)) / 2 + alpha_ce * T^2 * (KL(start) + KL(end)) / 2,
each KL between the teacher's and the student's temperature-softened distributions over the window's
non-padding positions. Without a teacher: the cross-entropy alone (plain fine-tuning). Evaluation writes
predictions.json, nbest_predictions.json (and null_odds.json for v2.0) and eval_results.json with the
official EM and F1. See docs/task-distillation.md.
"""
import argparse
import hashlib
import json
import os
import sys

REPO = os.path.dirname(os.path.abspath(__file__))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

from distil.losses import span_ce_loss, span_kd_loss, task_distillation_loss  # noqa: E402
from tasks.squad import (examples_from_records, postprocess_predictions, read_squad_examples,  # noqa: E402
                         squad_features)
from tasks.squad_metrics import squad_scores  # noqa: E402
from tasks.evaluation import predict, write_eval_results  # noqa: E402
from tasks.models import clamp_max_seq_length, load_student, load_teacher, load_tokenizer  # noqa: E402
from tasks.training import (TokenizedSet, add_training_arguments, check_training_args, start_run,  # noqa: E402
                            subsample, task_main, train_and_evaluate)
from utils import UserError, amp_dtype, logger  # noqa: E402

TRAIN_COLUMNS = ("input_ids", "token_type_ids", "attention_mask", "start_positions", "end_positions")
EVAL_COLUMNS = ("input_ids", "token_type_ids", "attention_mask")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_training_arguments(parser, max_seq_length=384)
    add = parser.add_argument
    add("--alpha_squad", default=0.5, type=float, help="Weight of the SQuAD cross-entropy (with a teacher).")
    add("--train_file", default=None, help="SQuAD-format JSON to train on.")
    add("--predict_file", default=None, help="SQuAD-format JSON to evaluate on.")
    add("--dataset_name", default=None,
        help="Hub data set instead of the files (e.g. rajpurkar/squad): its train and validation splits.")
    add("--version_2_with_negative", action="store_true", help="SQuAD v2.0: some questions have no answer.")
    add("--null_score_diff_threshold", default=0.0, type=float,
        help="v2.0: answer nothing when the null score beats the best span by more than this.")
    add("--doc_stride", default=128, type=int, help="Tokens between the starts of a long context's windows.")
    add("--max_query_length", default=64, type=int, help="Questions are cut to this many tokens.")
    add("--n_best_size", default=20, type=int, help="Candidate spans kept per question (nbest_predictions.json).")
    add("--max_answer_length", default=30, type=int, help="Longest answer, in tokens.")
    add("--verbose_logging", action="store_true", help="Log every question whose prediction misses the answer.")
    return parser.parse_args(argv)


def check_args(args):
    check_training_args(args)
    for name in ("doc_stride", "max_query_length", "n_best_size", "max_answer_length"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for flag, path, needed in (("--train_file", args.train_file, args.do_train),
                               ("--predict_file", args.predict_file, args.do_eval)):
        if needed and path is None and args.dataset_name is None:
            raise UserError(f"{flag} is needed for {'--do_train' if flag == '--train_file' else '--do_eval'} "
                            f"(or --dataset_name)")
        if needed and path is not None and not os.path.isfile(path):
            raise UserError(f"{flag} {path}: no such file")


# ---------------------------------------------------------------------------------------------------- data


def load_examples(args, evaluate):
    split = "validation" if evaluate else "train"
    path = args.predict_file if evaluate else args.train_file
    if path is not None:
        examples = read_squad_examples(path, is_training=not evaluate,
                                       version_2_with_negative=args.version_2_with_negative,
                                       flag="--predict_file" if evaluate else "--train_file")
    else:
        from datasets import load_dataset

        records = load_dataset(args.dataset_name, split=split, cache_dir=args.cache_dir or None)
        examples = examples_from_records(list(records), f"--dataset_name {args.dataset_name} ({split})", not evaluate,
                                         args.version_2_with_negative)
    if evaluate:
        return examples[:args.max_eval_samples] if args.max_eval_samples else examples
    return subsample(examples, args.max_train_samples, args.seed)


def tokenizer_fingerprint(tokenizer):
    """A digest of what the tokenizer does (vocabulary, normaliser, special-token template, which side the
    question goes), not of where it was loaded from: another tokenizer saved at the same path gets another."""
    if getattr(tokenizer, "is_fast", False):
        content = tokenizer.backend_tokenizer.to_str()
    else:
        content = json.dumps(sorted(tokenizer.get_vocab().items()))
    described = json.dumps([type(tokenizer).__name__, tokenizer.padding_side, content])
    return hashlib.sha1(described.encode()).hexdigest()


def _cache_path(args, tokenizer, source, evaluate):
    """Features depend on the data, the tokenizer and the window flags; a change of any gives a new folder."""
    if os.path.isfile(source):
        stat = os.stat(source)
        source = f"{os.path.abspath(source)}:{stat.st_size}:{stat.st_mtime_ns}"
    samples = args.max_eval_samples if evaluate else (args.max_train_samples, args.seed)
    # The last item versions the features' layout (2: segment ids always, cls_index).
    key = json.dumps([source, tokenizer_fingerprint(tokenizer), args.max_seq_length, args.doc_stride,
                      args.max_query_length, args.version_2_with_negative, evaluate, samples, 2])
    from datasets import config

    root = args.cache_dir or str(config.HF_DATASETS_CACHE)
    name = f"squad_{'eval' if evaluate else 'train'}_{hashlib.sha1(key.encode()).hexdigest()[:16]}"
    return os.path.join(root, "distil_squad_features", name)


def load_features(args, tokenizer, examples, ctx, evaluate):
    """The windows of `examples` as a datasets.Dataset, from the cache when it has them (the master builds them
    first; the other ranks wait and read its cache)."""
    from datasets import Dataset, load_from_disk

    source = (args.predict_file if evaluate else args.train_file) or f"{args.dataset_name}:{evaluate}"
    path = _cache_path(args, tokenizer, source, evaluate)
    if ctx.multi_gpu and not ctx.is_master:
        torch.distributed.barrier()
    if os.path.isdir(path) and not args.overwrite_cache:
        logger.info("Loading features from the cache %s", path)
        features = load_from_disk(path)
    else:
        logger.info("Cutting %d questions into windows (cached in %s)", len(examples), path)

        def windows(batch, indices):
            rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
            return squad_features(rows, tokenizer, args.max_seq_length, args.doc_stride, args.max_query_length,
                                  is_training=not evaluate, example_indices=indices)

        table = Dataset.from_list(examples)
        features = table.map(windows, batched=True, with_indices=True, remove_columns=table.column_names,
                             num_proc=args.threads if args.threads > 1 else None, desc="windows")
        if ctx.is_master:
            tmp = f"{path}.tmp-{os.getpid()}"
            features.save_to_disk(tmp)
            if os.path.isdir(path):
                import shutil

                shutil.rmtree(path)
            os.replace(tmp, path)
    if ctx.multi_gpu and ctx.is_master:
        torch.distributed.barrier()
    return features


# ---------------------------------------------------------------------------------------------------- loss


def make_loss_fn(args):
    def loss_fn(student_out, teacher_out, batch):
        squad = span_ce_loss(student_out.start_logits, student_out.end_logits, batch["start_positions"],
                             batch["end_positions"])
        if teacher_out is None:
            return squad, {"loss_squad": squad}
        kd = span_kd_loss(student_out.start_logits, student_out.end_logits, teacher_out.start_logits,
                          teacher_out.end_logits, args.temperature, batch["attention_mask"], args.kd_loss,
                          args.jsd_beta)
        return task_distillation_loss(squad, kd, args.alpha_squad, args.alpha_ce), {"loss_squad": squad, "loss_ce": kd}
    return loss_fn


# ---------------------------------------------------------------------------------------------- evaluation


def evaluate(args, model, tokenizer, ctx, eval_data, out_folder, model_path=None):
    """EM/F1 of `model` (saved at model_path, if it is) on the evaluation set; the master writes predictions and
    eval_results.json to out_folder. Collective: every rank runs its share of the windows."""
    examples, features = eval_data
    dataset = TokenizedSet(features, EVAL_COLUMNS)
    amp = amp_dtype(bf16=args.bf16, fp16=args.fp16)
    out = predict(model, dataset, ["start_logits", "end_logits"], tokenizer.pad_token_id,
                  args.per_gpu_eval_batch_size, ctx, amp_dtype=amp, per_position=True)
    if not ctx.is_master:
        return None
    meta = {name: features[name] for name in ("example_index", "offset_mapping", "token_is_max_context",
                                               "cls_index")}
    predictions, nbest, null_odds = postprocess_predictions(
        examples, meta, out["start_logits"], out["end_logits"], n_best_size=args.n_best_size,
        max_answer_length=args.max_answer_length, version_2_with_negative=args.version_2_with_negative,
        null_score_diff_threshold=args.null_score_diff_threshold)
    references = {e["id"]: e["answers"]["text"] for e in examples}
    metrics = squad_scores(references, predictions, v2=args.version_2_with_negative)
    if args.verbose_logging:
        for e in examples:
            if predictions[e["id"]] not in e["answers"]["text"]:
                logger.info("%s: predicted %r, answers %r", e["id"], predictions[e["id"]], e["answers"]["text"])
    os.makedirs(out_folder, exist_ok=True)
    for name, payload in (("predictions.json", predictions), ("nbest_predictions.json", nbest),
                          ("null_odds.json", null_odds if args.version_2_with_negative else None)):
        if payload is not None:
            with open(os.path.join(out_folder, name), "w") as f:
                json.dump(payload, f, indent=2)
    from distil.evaluation import count_parameters

    task = "squad_v2" if args.version_2_with_negative else "squad"
    write_eval_results(out_folder, {"task": task, "metrics": metrics, "score": metrics["f1"], "score_name": "f1",
                                    "n_examples": len(examples), "model": model_path,
                                    "n_parameters": count_parameters(model),
                                    "data": args.predict_file or args.dataset_name})
    logger.info("SQuAD (%d questions): EM %.2f, F1 %.2f", len(examples), metrics["exact"], metrics["f1"])
    return metrics


# ---------------------------------------------------------------------------------------------------- main


def run(args):
    check_args(args)
    ctx, resume_from = start_run(args, [args.train_file, args.predict_file])
    tokenizer = load_tokenizer(args)
    from transformers import AutoModelForQuestionAnswering

    student = load_student(args, AutoModelForQuestionAnswering).to(ctx.device)
    teacher = load_teacher(args, AutoModelForQuestionAnswering, tokenizer, student) if args.do_train else None
    if teacher is not None:
        teacher.to(ctx.device)
    clamp_max_seq_length(args, tokenizer, student, teacher)
    eval_data = None
    if args.do_eval or args.evaluate_during_training:
        examples = load_examples(args, evaluate=True)
        eval_data = (examples, load_features(args, tokenizer, examples, ctx, evaluate=True))
    train_set = None
    if args.do_train:
        examples = load_examples(args, evaluate=False)
        train_set = TokenizedSet(load_features(args, tokenizer, examples, ctx, evaluate=False), TRAIN_COLUMNS)

    train_and_evaluate(args, ctx, student, teacher, train_set, make_loss_fn(args), tokenizer,
                       lambda model, folder, path: evaluate(args, model, tokenizer, ctx, eval_data, folder, path),
                       AutoModelForQuestionAnswering, resume_from)
    return ctx


def main(argv=None):
    task_main(run, parse_args(argv))


if __name__ == "__main__":
    main()
