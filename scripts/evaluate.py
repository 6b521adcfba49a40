"""Held-out evaluation of a student (and how closely it follows its teacher): the command line.

    python scripts/evaluate.py --model serialization_dir/my_first_training --model_type distilbert --mlm \
        --teacher bert-base-uncased-folder --teacher_type bert \
        --data_file data/binarized_text.valid.bert-base-uncased.bin --output eval.json

The metrics are defined in distil/evaluation.py (MLM pseudo-perplexity over a fixed seeded masking, or CLM
perplexity; with a teacher, KL and top-1 agreement).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from distil.evaluation import count_parameters, evaluate, inference_speed  # noqa: E402
from lm_seqs_dataset import MIN_SEQ_LEN, BinarizedCorpus, LmSeqsDataset  # noqa: E402
from distil.models import framing_token_ids, max_input_size, model_classes  # noqa: E402
from utils import (UserError, fail, first_line, load_pretrained, logger, refuse_gguf, special_token_ids,  # noqa: E402
                   write_json_atomic)



# The data a model is scored on must not depend on its config: every model is cut at this length unless a
# model cannot take it (then the run says so, and --max_seq_length makes comparisons explicit).
DEFAULT_MAX_SEQ_LENGTH = 512


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate a (student) model on a binarized corpus.")
    parser.add_argument("--model", required=True, help="Model folder (from_pretrained), e.g. a training dump_path.")
    parser.add_argument("--model_type", required=True, choices=["bert", "distilbert", "roberta", "gpt2", "auto"])
    parser.add_argument("--teacher", default=None, help="Teacher folder: adds KL and top-1 agreement.")
    parser.add_argument("--teacher_type", default=None, choices=["bert", "distilbert", "roberta", "gpt2", "auto"],
                        help="Default: bert for a distilbert model, else --model_type.")
    parser.add_argument("--tokenizer", default=None,
                        help="Tokenizer folder (default: the model folder, else the teacher folder).")
    parser.add_argument("--data_file", required=True, help="Binarized corpus (scripts/binarized_data.py).")
    parser.add_argument("--mlm", action="store_true",
                        help="Masked LM evaluation (the default for bert/distilbert/roberta; gpt2 is causal).")
    parser.add_argument("--mask_prop", type=float, default=0.15, help="Proportion of real tokens masked (MLM).")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="Seed of the fixed MLM masking.")
    parser.add_argument("--max_batches", type=int, default=None,
                        help="Evaluate only the first max_batches * batch_size sequences.")
    parser.add_argument("--max_seq_length", type=int, default=None,
                        help=f"Cut sequences into chunks of at most this many tokens, the same for every model "
                             f"compared (default: {DEFAULT_MAX_SEQ_LENGTH}, or less, with a warning, when the model, "
                             "teacher or tokenizer accepts less).")
    parser.add_argument("--speed_batches", type=int, default=0,
                        help="Also time this many forward batches (sequences/s); 0: skip.")
    parser.add_argument("--device", default=None, help="Default: cuda if available, else cpu.")
    parser.add_argument("--output", default=None, help="Write the results to this JSON file.")
    return parser.parse_args(argv)


def _check_args(args):
    mlm_type = args.mlm if args.model_type == "auto" else args.model_type != "gpt2"  # auto: --mlm decides
    if args.mlm and not mlm_type:
        raise UserError("--mlm does not apply to --model_type gpt2 (a causal LM)")
    args.mlm = mlm_type
    if args.teacher_type is None:
        args.teacher_type = "bert" if args.model_type == "distilbert" else args.model_type
    if args.teacher is not None and args.teacher_type != "auto" and (args.teacher_type != "gpt2") != mlm_type:
        raise UserError(f"--teacher_type {args.teacher_type} and --model_type {args.model_type} are not both "
                        "masked or both causal LMs")
    if args.batch_size < 1:
        raise UserError("--batch_size must be >= 1")
    if args.max_batches is not None and args.max_batches < 1:
        raise UserError("--max_batches must be >= 1")
    if args.max_seq_length is not None and args.max_seq_length < MIN_SEQ_LEN:
        raise UserError(f"--max_seq_length must be at least {MIN_SEQ_LEN} (shorter sequences are not scored)")
    if args.speed_batches < 0:
        raise UserError("--speed_batches must be >= 0")
    if not 0 < args.mask_prop <= 1:
        raise UserError("--mask_prop must be in (0, 1]")
    for flag in ("model", "teacher", "tokenizer"):
        path = getattr(args, flag)
        refuse_gguf(path, f"--{flag}")
        if path is not None and not os.path.isdir(path):
            raise UserError(f"--{flag} {path}: no such folder")
    if args.output is not None and os.path.isdir(args.output):
        raise UserError(f"--output {args.output} is a folder")


def _load_config(path, model_type, flag, mlm=True):
    config_class, _, _ = model_classes(model_type, mlm)
    return load_pretrained(lambda: config_class.from_pretrained(path), flag, path, f"a {model_type} config")


def _load_model(path, model_type, config, flag, mlm=True):
    _, model_class, _ = model_classes(model_type, mlm)
    return load_pretrained(lambda: model_class.from_pretrained(path, config=config), flag, path,
                           f"a {model_type} model")


def _load_tokenizer(args):
    candidates = [(args.tokenizer, "--tokenizer", args.model_type)]
    if args.tokenizer is None:
        candidates = [(args.model, "--model", args.model_type), (args.teacher, "--teacher", args.teacher_type)]
    errors = []
    for path, flag, model_type in candidates:
        if path is None:
            continue
        _, _, tokenizer_class = model_classes(model_type, args.mlm)
        try:
            return tokenizer_class.from_pretrained(path)
        except Exception as exc:  # a malformed tokenizer folder fails in many ways, all the folder's fault
            errors.append(f"{flag} {path}: {first_line(exc)}")
    if args.tokenizer is not None:
        raise UserError(f"cannot load a tokenizer ({'; '.join(errors)})")
    raise UserError(f"no tokenizer in --model {args.model}" + (f" nor --teacher {args.teacher}" if args.teacher else "")
                    + "; pass --tokenizer")


def sequence_cut(args, models_max):
    """The length sequences are cut at: --max_seq_length, else the default, and never more than the models take."""
    if args.max_seq_length is not None:
        if args.max_seq_length > models_max:
            raise UserError(f"--max_seq_length {args.max_seq_length} is longer than the models accept ({models_max} "
                            "tokens)")
        return args.max_seq_length
    if models_max < DEFAULT_MAX_SEQ_LENGTH:
        logger.warning("Sequences cut at %d tokens, the most the model/teacher/tokenizer accept, not the default %d: "
                       "pass the same --max_seq_length to every evaluation you compare.", models_max,
                       DEFAULT_MAX_SEQ_LENGTH)
    return min(models_max, DEFAULT_MAX_SEQ_LENGTH)


def run(args):
    import transformers

    _check_args(args)
    transformers.utils.logging.disable_progress_bar()  # stderr stays for warnings and the error line
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:  # first: the cheapest input to get wrong, and it needs no model
        corpus = BinarizedCorpus.open(args.data_file)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(f"--data_file {exc}") from None
    # Configs before weights: a mismatch is reported without loading either model.
    config = _load_config(args.model, args.model_type, "--model")
    t_config = _load_config(args.teacher, args.teacher_type, "--teacher") if args.teacher else None
    vocab = config.vocab_size
    if t_config is not None and t_config.vocab_size != vocab:
        raise UserError(f"vocabulary mismatch: --model {args.model} has {vocab} tokens, --teacher {args.teacher} "
                        f"has {t_config.vocab_size}")
    tokenizer = _load_tokenizer(args)
    special = framing_token_ids(special_token_ids(tokenizer), args.mlm, corpus.metadata.get("framing"))
    if args.mlm and "mask_token" not in special:
        raise UserError("the tokenizer has no mask token, needed for MLM evaluation")
    if corpus.max_token_id >= vocab:
        raise UserError(f"--data_file {args.data_file}: token id {corpus.max_token_id} is outside the model's "
                        f"vocabulary of {vocab}; was it binarized with another tokenizer?")
    max_len = sequence_cut(args, min(max_input_size(config, tokenizer),
                                     max_input_size(t_config) if t_config is not None else 1 << 30))
    dataset = LmSeqsDataset(corpus, special_tok_ids=special, mlm=args.mlm, max_len=max_len)
    if len(dataset) == 0:
        raise UserError(f"--data_file {args.data_file}: no sequence left after filtering (at least 12 tokens needed)")

    model = _load_model(args.model, args.model_type, config, "--model", args.mlm).to(device)
    teacher = _load_model(args.teacher, args.teacher_type, t_config, "--teacher", args.mlm).to(device) if t_config else None
    results = evaluate(model, dataset, mlm=args.mlm, batch_size=args.batch_size, device=device,
                       special_tok_ids=special, vocab_size=vocab, teacher=teacher, seed=args.seed,
                       mask_prop=args.mask_prop, max_batches=args.max_batches, progress=True)
    record = {"model": args.model, "model_type": args.model_type, "teacher": args.teacher,
              "data_file": args.data_file, "max_seq_length": max_len, "mlm": args.mlm, "seed": args.seed, "batch_size": args.batch_size,
              "max_batches": args.max_batches, "n_parameters": count_parameters(model), **results}
    if teacher is not None:
        record["teacher_n_parameters"] = count_parameters(teacher)
    if args.speed_batches:
        record["sequences_per_second"] = inference_speed(model, dataset, args.batch_size, device, args.speed_batches)
    return record


def _print_table(record):
    keys = ["max_seq_length", "n_parameters", "n_sequences", "n_tokens", "mlm_loss", "pseudo_perplexity", "clm_loss", "perplexity",
            "kl_teacher_student", "top1_agreement", "teacher_n_parameters", "sequences_per_second"]
    rows = [(k, record[k]) for k in keys if k in record]
    width = max(len(k) for k, _ in rows)
    print(f"{'model':<{width}}  {record['model']}")
    for key, value in rows:
        text = f"{value:,}" if isinstance(value, int) else f"{value:.6g}"
        print(f"{key:<{width}}  {text}")


def main(argv=None):
    args = parse_args(argv)
    record = run(args)
    _print_table(record)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        # allow_nan stays on: an empty evaluation reports NaN rather than failing after the work is done.
        write_json_atomic(args.output, record)
        logger.info("Results written to %s", args.output)
    return record


if __name__ == "__main__":
    try:
        main()
    except UserError as exc:
        fail(str(exc))
