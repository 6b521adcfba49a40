#!/usr/bin/env python
"""Initialise a shallow student from a subset of a teacher's layers: RoBERTa, GPT-2, or any masked / causal LM.

    python scripts/extract.py --model_type roberta --model_name roberta-base \
        --dump_checkpoint serialization_dir/tf_roberta_048131723.pth --vocab_transform
    python scripts/extract.py --model_type auto --model_name Qwen/Qwen2.5-0.5B --layers 0,5,11,17,23 \
        --dump_folder serialization_dir/qwen-student

The student is the teacher's own class with fewer layers. The output is a state dict (torch.save of name ->
tensor) whose keys are exactly those of the student class's `state_dict()`, ready for
`train.py --student_pretrained_weights`; `--model_type auto` writes a complete model folder. The extraction
itself lives in distil/extraction.py and distil/extraction_auto.py.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from distil.extraction import add_common_arguments, recipe_for, run_extraction  # noqa: E402
from distil.extraction_auto import run_auto_extraction  # noqa: E402
from utils import UserError, fail, logger, refuse_gguf  # noqa: E402


DEFAULT_CHECKPOINT = "serialization_dir/tf_roberta_048131723.pth"


def build_parser():
    parser = argparse.ArgumentParser(
        description="Extract a shallow student from a subset of a teacher's layers (transfer learning "
                    "initialisation for distillation): RoBERTa, GPT-2, or any masked / causal LM with "
                    "--model_type auto."
    )
    parser.add_argument("--model_type", default="roberta", choices=["gpt2", "roberta", "auto"],
                        help="auto: any Hugging Face masked or causal LM; needs --dump_folder.")
    # None stands for "not given": auto writes a state dict only when asked, the others always do.
    add_common_arguments(
        parser, default_checkpoint=None,
        checkpoint_help=f"Where to write the student state dict (torch.save of name -> tensor). Default: "
                        f"{DEFAULT_CHECKPOINT}; with --model_type auto, none is written unless this is given.",
    )
    parser.add_argument("--mlm", action="store_true",
                        help="With --model_type auto: load the teacher with AutoModelForMaskedLM "
                             "(default: AutoModelForCausalLM).")
    parser.add_argument("--eval_data_file", default=None,
                        help="With --model_type auto: a binarized held-out file (scripts/binarized_data.py) on "
                             "which the teacher's and the new student's losses are reported, before any training.")
    parser.add_argument("--eval_max_batches", type=int, default=4,
                        help="Score at most this many batches of --eval_data_file.")
    parser.add_argument("--eval_batch_size", type=int, default=8, help="Batch size of that scoring.")
    parser.add_argument("--eval_max_seq_length", type=int, default=512,
                        help="Cut --eval_data_file's sequences into chunks of at most this many tokens.")
    parser.add_argument("--vocab_transform", dest="vocab_transform", action="store_const", const=True,
                        default=True,
                        help="Copy RoBERTa's lm_head.dense / lm_head.layer_norm (the default here: the "
                             "student has the same head). Kept for the original command lines.")
    parser.add_argument("--no_vocab_transform", dest="vocab_transform", action="store_const", const=False,
                        help="Leave RoBERTa's lm_head.dense / lm_head.layer_norm to random init "
                             "(the original script's default). No effect for GPT-2.")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        refuse_gguf(args.model_name, "--model_name")
    except UserError as error:
        fail(str(error))
    if args.eval_data_file is not None and args.model_type != "auto":
        fail("--eval_data_file applies to --model_type auto only")
    if min(args.eval_max_batches, args.eval_batch_size) < 1 or args.eval_max_seq_length < 12:
        fail("--eval_max_batches and --eval_batch_size must be >= 1, --eval_max_seq_length >= 12")
    if args.model_type == "auto":
        try:
            run_auto_extraction(args)
        except UserError as error:
            fail(str(error))
        return
    if args.mlm:
        fail("--mlm applies to --model_type auto only")
    if args.dump_checkpoint is None:
        args.dump_checkpoint = DEFAULT_CHECKPOINT
    if args.model_type == "gpt2" and not args.vocab_transform:
        logger.warning("--no_vocab_transform has no effect for GPT-2: its LM head is the tied embedding matrix.")
    try:
        run_extraction(args, recipe_for(args.model_type, args.vocab_transform), "extract.py")
    except UserError as error:
        fail(str(error))


if __name__ == "__main__":
    main()
