#!/usr/bin/env python
"""Initialise a DistilBERT student from a subset of a BERT teacher's layers.

The output is a state dict (torch.save of name -> tensor) whose keys are exactly those of
`DistilBertForMaskedLM.state_dict()`, ready for `train.py --student_type distilbert
--student_pretrained_weights`.

What is not transferred:
- `bert.embeddings.token_type_embeddings`: DistilBERT has no segment embeddings. As in the original, they
  are dropped, not folded into the word embeddings, so a student's embedding of a token differs from the
  teacher's by the teacher's segment-0 vector.
- `vocab_transform` / `vocab_layer_norm` (the MLM head's dense + LayerNorm) unless --vocab_transform is
  given; they then start from random init.
"""
import argparse
import os
import sys

SCRIPTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(SCRIPTS_DIR)
for path in (REPO_ROOT, SCRIPTS_DIR):
    if path not in sys.path:
        sys.path.insert(0, path)

from transformers import BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM  # noqa: E402

from extract import add_common_arguments, check_layers, run_extraction, Recipe  # noqa: E402
from utils import UserError, fail, logger  # noqa: E402

# DistilBERT name -> BERT name inside one transformer block.
LAYER_MAP = (
    ("attention.q_lin", "attention.self.query"),
    ("attention.k_lin", "attention.self.key"),
    ("attention.v_lin", "attention.self.value"),
    ("attention.out_lin", "attention.output.dense"),
    ("sa_layer_norm", "attention.output.LayerNorm"),
    ("ffn.lin1", "intermediate.dense"),
    ("ffn.lin2", "output.dense"),
    ("output_layer_norm", "output.LayerNorm"),
)

DROPPED_NOTE = (
    "bert.embeddings.token_type_embeddings (DistilBERT has no segment embeddings) "
    "and the teacher layers not selected"
)


def distilbert_key_map(layers, vocab_transform=False):
    """DistilBertForMaskedLM key -> BertForMaskedLM key, in the student's state_dict order."""
    key_map = {}
    for name in ("word_embeddings.weight", "position_embeddings.weight", "LayerNorm.weight", "LayerNorm.bias"):
        key_map[f"distilbert.embeddings.{name}"] = f"bert.embeddings.{name}"
    for student_idx, teacher_idx in enumerate(layers):
        for student_name, teacher_name in LAYER_MAP:
            for param in ("weight", "bias"):
                key_map[f"distilbert.transformer.layer.{student_idx}.{student_name}.{param}"] = (
                    f"bert.encoder.layer.{teacher_idx}.{teacher_name}.{param}"
                )
    if vocab_transform:
        for param in ("weight", "bias"):
            key_map[f"vocab_transform.{param}"] = f"cls.predictions.transform.dense.{param}"
        for param in ("weight", "bias"):
            key_map[f"vocab_layer_norm.{param}"] = f"cls.predictions.transform.LayerNorm.{param}"
    # Both tied to other tensors (the word embeddings, cls.predictions.bias) in either model; transformers 5
    # lists tied parameters in state_dict(), so they are written too and `load_state_dict` sees no gap.
    key_map["vocab_projector.weight"] = "cls.predictions.decoder.weight"
    key_map["vocab_projector.bias"] = "cls.predictions.bias"
    return key_map


def extract_distilbert_state_dict(teacher, layers, vocab_transform=False):
    """State dict for a DistilBertForMaskedLM made of the BERT teacher layers `layers` (renumbered 0..k-1)."""
    if teacher.config.model_type != "bert":
        raise UserError(f"the teacher is a {teacher.config.model_type} model, not bert")
    check_layers(layers, teacher.config.num_hidden_layers)
    teacher_state = teacher.state_dict()
    key_map = distilbert_key_map(layers, vocab_transform)
    absent = [teacher_key for teacher_key in key_map.values() if teacher_key not in teacher_state]
    if absent:
        raise RuntimeError(f"BERT teacher has no {absent[0]} (transformers changed its parameter names?)")
    return {student_key: teacher_state[teacher_key] for student_key, teacher_key in key_map.items()}


def distilbert_config_from_bert(bert_config, n_layers):
    """The DistilBERT config whose shapes and computation match the extracted BERT layers."""
    if bert_config.layer_norm_eps != 1e-12:
        # DistilBERT hard-codes eps=1e-12 in its LayerNorms.
        logger.warning("Teacher layer_norm_eps is %g, DistilBERT always uses 1e-12.", bert_config.layer_norm_eps)
    return DistilBertConfig(
        vocab_size=bert_config.vocab_size,
        max_position_embeddings=bert_config.max_position_embeddings,
        # The position embeddings are copied from the teacher, so they are learned, not sinusoidal.
        sinusoidal_pos_embds=False,
        n_layers=n_layers,
        n_heads=bert_config.num_attention_heads,
        dim=bert_config.hidden_size,
        hidden_dim=bert_config.intermediate_size,
        activation=bert_config.hidden_act,
        dropout=bert_config.hidden_dropout_prob,
        attention_dropout=bert_config.attention_probs_dropout_prob,
        initializer_range=bert_config.initializer_range,
        pad_token_id=bert_config.pad_token_id,
    )


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
    recipe = Recipe(
        teacher_type="bert", teacher_class=BertForMaskedLM,
        student_type="distilbert", student_class=DistilBertForMaskedLM,
        derive_student_config=distilbert_config_from_bert,
        extract=lambda teacher, layers: extract_distilbert_state_dict(teacher, layers, args.vocab_transform),
        dropped_note=DROPPED_NOTE,
    )
    try:
        run_extraction(args, recipe, "extract_distilbert.py")
    except UserError as error:
        fail(str(error))


if __name__ == "__main__":
    main()
