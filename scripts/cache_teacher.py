"""Run the teacher once over a binarized corpus and cache its top-k predictions, for train.py --teacher_cache.

    # causal LM: every position, one pass
    python scripts/cache_teacher.py --teacher_type gpt2 --teacher_name gpt2 \
        --data_file data/binarized_text.gpt2.bin --cache_dir cache/gpt2-k64 --k 64
    # MLM: the masking of each sequence is fixed for each of --n_epoch epochs (the flags train.py will use)
    python scripts/cache_teacher.py --teacher_type bert --teacher_name bert-base-uncased --mlm \
        --data_file data/binarized_text.bert-base-uncased.bin \
        --token_counts data/token_counts.bert-base-uncased.pickle --n_epoch 3 --cache_dir cache/bert-k64 --k 64
    python train.py <student and data flags, no --teacher_*> --teacher_cache cache/bert-k64

Interrupted, the same command resumes where it stopped; the folder becomes usable (cache.json "complete")
only once every row is written. Format and semantics: distil/teacher_cache.py.
"""
import argparse
import logging
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lm_seqs_dataset import MIN_SEQ_LEN, BinarizedCorpus, LmSeqsDataset, load_token_counts  # noqa: E402
from distil.masking import smoothed_token_probs  # noqa: E402
from distil.models import (AUTO, TeacherLM, framing_token_ids, load_teacher, load_tokenizer,  # noqa: E402
                           max_input_size, model_classes)
from distil.teacher_cache import build_cache, cache_size_bytes, teacher_identity  # noqa: E402
from utils import UserError, fail, load_pretrained, logger, set_seed, special_token_ids, user_input  # noqa: E402
from distil.vocabularies import check_teacher_vocabulary, teacher_tokenizer_to_compare  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Cache a teacher's top-k predictions over a binarized corpus.")
    add = parser.add_argument
    add("--cache_dir", required=True, help="The cache folder to write (or to finish, after an interruption).")
    add("--force", action="store_true", help="Replace whatever --cache_dir holds.")
    add("--data_file", required=True, help="The binarized corpus train.py will read (--data_file).")
    add("--teacher_type", choices=["bert", "roberta", "gpt2", AUTO], required=True, help="As train.py's.")
    add("--teacher_name", required=True, help="The teacher: a hub name or a local folder.")
    add("--tokenizer_name", default=None,
        help="Tokenizer folder or hub name (default: the teacher's); its token -> id table is compared with the "
             "teacher's own tokenizer's, as train.py does.")
    add("--assume_same_token_ids", action="store_true",
        help="As train.py's: with --tokenizer_name and a --teacher_name folder that holds no tokenizer, take "
             "--tokenizer_name's token ids to be the teacher's, unchecked (refused without it).")
    add("--student_type", choices=["distilbert", "roberta", "gpt2", "bert", AUTO], default=None,
        help="With --student_config: the student's type, to read its config.")
    add("--student_config", default=None,
        help="The student's config: its maximum input size and vocabulary bound the cache as they bound "
             "train.py (default: the teacher's).")
    add("--max_seq_length", type=int, default=None,
        help="Cut sequences into chunks of at most this many tokens, as train.py --max_seq_length will (default: "
             "the longest the teacher, the --student_config and the tokenizer accept).")
    add("--k", type=int, default=64, help="Teacher ids kept per position (the vocabulary size: all of them).")
    add("--log_probs_dtype", choices=["float16", "float32"], default="float16",
        help="Storage of the log-probabilities: float16 (compact) or float32 (a k = vocabulary cache then "
             "reproduces the live teacher's losses to float32 rounding).")
    add("--temperature", type=float, default=2.0, help="train.py's --temperature (the cache stores softened "
                                                       "distributions).")
    add("--mlm", action="store_true", help="Masked LM: cache the teacher on a fixed masking per epoch.")
    add("--restrict_ce_to_mask", action="store_true",
        help="As train.py's: cache only the predicted positions (MLM), about 1/--mlm_mask_prop times smaller.")
    add("--n_epoch", type=int, default=3, help="MLM: epochs whose masking the cache fixes (train.py's --n_epoch).")
    add("--token_counts", default=None, help="MLM: the token counts (scripts/token_counts.py).")
    add("--mlm_mask_prop", type=float, default=0.15, help="As train.py's.")
    add("--word_mask", type=float, default=0.8, help="As train.py's.")
    add("--word_keep", type=float, default=0.1, help="As train.py's.")
    add("--word_rand", type=float, default=0.1, help="As train.py's.")
    add("--mlm_smoothing", type=float, default=0.7, help="As train.py's.")
    add("--seed", type=int, default=56, help="Seed of the masking draws (MLM).")
    add("--batch_size", type=int, default=32, help="Sequences per teacher forward.")
    add("--n_gpu", type=int, default=1, help="0: run the teacher on the CPU even when a GPU is there.")
    return parser.parse_args(argv)


def sanity_checks(args):
    if args.k < 1:
        raise UserError(f"--k must be at least 1, got {args.k}")
    if args.temperature <= 0:
        raise UserError("--temperature must be > 0")
    if args.batch_size < 1 or args.n_epoch < 1:
        raise UserError("--batch_size and --n_epoch must be at least 1")
    if args.mlm and args.token_counts is None:
        raise UserError("--mlm needs --token_counts (the output of scripts/token_counts.py)")
    if args.restrict_ce_to_mask and not args.mlm:
        raise UserError("--restrict_ce_to_mask only applies with --mlm")
    if args.max_seq_length is not None and args.max_seq_length < MIN_SEQ_LEN:
        raise UserError(f"--max_seq_length must be at least {MIN_SEQ_LEN} (shorter sequences are not trained on)")
    if (args.student_config is None) != (args.student_type is None):
        raise UserError("--student_config and --student_type go together")
    split = (args.word_mask, args.word_keep, args.word_rand)
    if min(split) < 0 or abs(sum(split) - 1) > 1e-6:
        raise UserError(f"--word_mask/--word_keep/--word_rand must be >= 0 and sum to 1, got {split}")


def run_settings(args):
    """The flags a training run must share with the cache (teacher_cache.RUN_SETTINGS)."""
    settings = {"mlm": args.mlm, "temperature": args.temperature}
    if args.mlm:
        settings.update({name: getattr(args, name) for name in ("restrict_ce_to_mask", "mlm_mask_prop", "word_mask",
                                                                "word_keep", "word_rand", "mlm_smoothing")})
        settings["masking_seed"] = args.seed
    return settings


def main(argv=None):
    args = parse_args(argv)
    sanity_checks(args)
    set_seed(args.seed)
    device = torch.device("cuda" if args.n_gpu > 0 and torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(args.teacher_type, args.tokenizer_name or args.teacher_name,
                               "--tokenizer_name" if args.tokenizer_name else "--teacher_name", args.mlm)
    teacher = load_teacher(args.teacher_type, args.teacher_name, args.mlm)
    # The same vocabulary check as a live run (train.py check_vocabularies), with or without --student_config.
    teacher_tokenizer = teacher_tokenizer_to_compare(args.teacher_type, args.teacher_name, args.tokenizer_name,
                                                     args.mlm, args.assume_same_token_ids)
    own = tokenizer if args.tokenizer_name is None else teacher_tokenizer  # None: no tokenizer to record
    identity = teacher_identity(args.teacher_name, teacher.config, own)  # before any cut of its vocabulary
    max_len = max_input_size(teacher.config, tokenizer)
    vocab_size = teacher.config.vocab_size
    if args.student_config is not None:
        config_class, _, _ = model_classes(args.student_type, args.mlm)
        s_config = load_pretrained(lambda: config_class.from_pretrained(args.student_config), "--student_config",
                                   args.student_config, f"a {args.student_type} config")
        max_len = min(max_len, max_input_size(s_config))
        vocab_size = s_config.vocab_size
    check_teacher_vocabulary(teacher, vocab_size, tokenizer, "--student_config", args.student_config,
                             args.teacher_name, teacher_tokenizer, args.tokenizer_name)
    if args.max_seq_length is not None:
        if args.max_seq_length > max_len:
            raise UserError(f"--max_seq_length {args.max_seq_length} is longer than the models accept ({max_len} "
                            "tokens)")
        max_len = args.max_seq_length
    with user_input("--data_file"):
        corpus = BinarizedCorpus.open(args.data_file)
    if corpus.max_token_id >= vocab_size:
        raise UserError(f"--data_file {corpus.path}: token id {corpus.max_token_id} is outside the vocabulary of "
                        f"{vocab_size}; was it binarized with another tokenizer?")
    # The chunks of a long sequence are framed as train.py frames them: with the corpus's recorded tokens.
    special = framing_token_ids(special_token_ids(tokenizer), args.mlm, corpus.metadata.get("framing"))
    dataset = LmSeqsDataset(corpus, special_tok_ids=special, mlm=args.mlm, max_len=max_len)
    if len(dataset) == 0:
        raise UserError(f"--data_file {corpus.path}: no sequence left after filtering")
    token_probs = masking = None
    if args.mlm:
        with user_input("--token_counts"):
            counts = load_token_counts(args.token_counts)
        counts = np.pad(counts, (0, max(0, vocab_size - len(counts))))
        token_probs = smoothed_token_probs(counts, special.values(), args.mlm_smoothing).numpy()
        masking = {"mask_prop": args.mlm_mask_prop, "split": (args.word_mask, args.word_keep, args.word_rand),
                   "mask_id": special["mask_token"], "vocab_size": vocab_size, "seed": args.seed}
    teacher.to(device)
    start = time.time()
    meta = build_cache(args.cache_dir, teacher_lm=TeacherLM(teacher), dataset=dataset, corpus=corpus,
                       tokenizer=tokenizer, data_file=corpus.path, max_len=max_len, vocab_size=vocab_size,
                       mlm=args.mlm, k=min(args.k, vocab_size), temperature=args.temperature, n_epochs=args.n_epoch,
                       settings=run_settings(args), batch_size=args.batch_size, device=device,
                       log_probs_dtype=args.log_probs_dtype, token_probs=token_probs, masking=masking,
                       force=args.force, teacher=identity)
    # Per position: the rows alone (cache.json's bytes_per_row); the folder's total also holds the tokenizer's
    # copy, the offsets and (MLM) the draws, which do not grow with k and would swamp the figure on a small corpus.
    logger.info("Cached %d positions (top-%d, %s) in %.1fs: %d bytes per cached position (%.1f MB of rows); the "
                "folder holds %.1f MB in all (tokenizer, offsets%s) -> %s", meta["n_rows"], meta["k"],
                args.log_probs_dtype, time.time() - start, meta["bytes_per_row"],
                meta["bytes_per_row"] * meta["n_rows"] / 1e6, cache_size_bytes(args.cache_dir) / 1e6,
                ", masking draws" if args.mlm else "", args.cache_dir)


if __name__ == "__main__":
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        main()
    except (UserError, ValueError, FileNotFoundError) as exc:
        fail(str(exc))
