#!/usr/bin/env python
"""Initialise a DistilBERT student from a subset of a BERT teacher's layers.

The output is a state dict (torch.save of name -> tensor) whose keys are exactly those of
`DistilBertForMaskedLM.state_dict()`, ready for `train.py --student_type distilbert
--student_pretrained_weights`.

    python scripts/extract_distilbert.py --model_type bert --model_name bert-base-uncased \
        --dump_checkpoint serialization_dir/tf_bert-base-uncased_0247911.pth --vocab_transform

What is not transferred (the mapping lives in distil/extraction.py):
- `bert.embeddings.token_type_embeddings`: DistilBERT has no segment embeddings. As in the original, they
  are dropped, not folded into the word embeddings, so a student's embedding of a token differs from the
  teacher's by the teacher's segment-0 vector.
- `vocab_transform` / `vocab_layer_norm` (the MLM head's dense + LayerNorm) unless --vocab_transform is
  given; they then start from random init.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from distil.extraction import add_common_arguments, recipe_for, run_extraction  # noqa: E402
from utils import UserError, fail  # noqa: E402


def build_parser():
    parser = argparse.ArgumentParser(
        description="Extract a DistilBERT student from a subset of a BERT teacher's layers "
                    "(transfer learning initialisation for distillation)."
    )
    parser.add_argument("--model_type", default="bert", choices=["bert"])
    add_common_arguments(parser, default_checkpoint="serialization_dir/tf_bert-base-uncased_0247911.pth")
    parser.add_argument("--vocab_transform", action="store_true",
                        help="Also copy the MLM head's transform (cls.predictions.transform.dense / LayerNorm) "
                             "into vocab_transform / vocab_layer_norm; without it they start from random init.")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run_extraction(args, recipe_for("bert", args.vocab_transform), "extract_distilbert.py")
    except UserError as error:
        fail(str(error))


if __name__ == "__main__":
    main()
