"""Initialising a shallow student from a subset of a teacher's layers (scripts/extract.py and
scripts/extract_distilbert.py are the command lines).

Three recipes map tensor names with fixed rules: BERT -> DistilBERT (renamed blocks; BERT's token-type
embeddings are dropped, as in the original; the MLM head's transform only with --vocab_transform),
RoBERTa -> RoBERTa and GPT-2 -> GPT-2 (the teacher's own class with fewer layers, so every tensor keeps its
name except for the layer index). The output is a state dict whose keys are exactly those of the student
class's `state_dict()`, ready for `train.py --student_pretrained_weights`, and optionally a model folder.
Any other Hugging Face LM goes through distil/extraction_auto.py. Everything is validated before anything is
written: an error leaves no output behind.
"""
import copy
import os
import re
import tempfile
from typing import Callable, NamedTuple

import torch
from transformers import (AutoConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM, GPT2LMHeadModel,
                          RobertaForMaskedLM)

from utils import UserError, load_pretrained, logger

# The layers the original DistilBERT / DistilRoBERTa / DistilGPT2 students were initialised from.
ORIGINAL_LAYERS = [0, 2, 4, 7, 9, 11]
DEFAULT_STUDENT_LAYERS = 6


# --------------------------------------------------------------------------------------------------------
# Choosing layers
# --------------------------------------------------------------------------------------------------------


def default_layers(n_teacher_layers, n_student_layers=DEFAULT_STUDENT_LAYERS):
    """Teacher layers a student of `n_student_layers` is built from when --layers is not given.

    The original list for the 12 -> 6 case (it is not quite evenly spread, and the released students used
    it); otherwise an even spread that always keeps the first and the last layer; every layer when the
    teacher is not deeper than the student.
    """
    if n_teacher_layers <= n_student_layers:
        return list(range(n_teacher_layers))
    if n_teacher_layers == 12 and n_student_layers == 6:
        return list(ORIGINAL_LAYERS)
    if n_student_layers == 1:
        return [n_teacher_layers - 1]
    step = (n_teacher_layers - 1) / (n_student_layers - 1)
    # int(x + 0.5) rather than round(): banker's rounding would make the spread depend on parity.
    return [int(i * step + 0.5) for i in range(n_student_layers)]


def parse_layers(text):
    """'0,2,4' -> [0, 2, 4]; the range is checked later, once the teacher's depth is known."""
    try:
        layers = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise UserError(f"--layers {text!r}: expected comma-separated layer indices such as 0,2,4,7,9,11")
    if not layers:
        raise UserError(f"--layers {text!r}: no layer index given")
    return layers


def check_layers(layers, n_teacher_layers):
    """Indices must exist in the teacher and be strictly increasing.

    Repeated or reordered indices are refused rather than silently sorted: they are almost always a typo,
    and a student whose layers run in a different order than the teacher's is not a sensible initialisation.
    """
    if not layers:
        raise UserError("--layers: no layer index given")
    bad = [i for i in layers if not 0 <= i < n_teacher_layers]
    if bad:
        raise UserError(
            f"--layers: index {bad[0]} is out of range, the teacher has {n_teacher_layers} layers "
            f"(valid indices 0..{n_teacher_layers - 1})"
        )
    if len(set(layers)) != len(layers):
        raise UserError(f"--layers {','.join(map(str, layers))}: an index is repeated")
    if layers != sorted(layers):
        raise UserError(f"--layers {','.join(map(str, layers))}: indices must be in increasing order")


# --------------------------------------------------------------------------------------------------------
# RoBERTa -> RoBERTa, GPT-2 -> GPT-2
# --------------------------------------------------------------------------------------------------------

LAYER_PREFIX = {"roberta": "roberta.encoder.layer.", "gpt2": "transformer.h."}
# RoBERTa's LM head has a dense + LayerNorm transform before the (tied) decoder; GPT-2's head is the tied
# embedding matrix alone, so there is nothing to leave out.
HEAD_TRANSFORM_PREFIXES = {"roberta": ("lm_head.dense.", "lm_head.layer_norm."), "gpt2": ()}


def extract_state_dict(teacher, model_type, layers, vocab_transform=True):
    """State dict for a `type(teacher)` student made of the teacher layers `layers` (renumbered 0..k-1).

    Everything outside the layer stack (embeddings, final LayerNorm, LM head, tied copies such as
    `lm_head.decoder.weight`) is copied as is. With `vocab_transform=False`, RoBERTa's `lm_head.dense` and
    `lm_head.layer_norm` are left out so the student starts them from random init (the original's default).
    """
    if model_type not in LAYER_PREFIX:
        raise ValueError(f"model_type must be one of {sorted(LAYER_PREFIX)}, not {model_type!r}")
    if teacher.config.model_type != model_type:
        raise UserError(f"the teacher is a {teacher.config.model_type} model, not {model_type}")
    check_layers(layers, teacher.config.num_hidden_layers)

    prefix = LAYER_PREFIX[model_type]
    layer_key = re.compile(re.escape(prefix) + r"(\d+)\.(.+)")
    new_index = {teacher_idx: student_idx for student_idx, teacher_idx in enumerate(layers)}
    skipped_head = HEAD_TRANSFORM_PREFIXES[model_type] if not vocab_transform else ()

    # Teacher order is also student order because `layers` is increasing, so the file reads naturally.
    state_dict = {}
    for key, tensor in teacher.state_dict().items():
        match = layer_key.fullmatch(key)
        if match:
            teacher_idx = int(match.group(1))
            if teacher_idx in new_index:
                state_dict[f"{prefix}{new_index[teacher_idx]}.{match.group(2)}"] = tensor
            continue
        if skipped_head and key.startswith(skipped_head):
            continue
        state_dict[key] = tensor
    return state_dict


def same_architecture_student_config(teacher_config, n_layers):
    config = copy.deepcopy(teacher_config)
    config.num_hidden_layers = n_layers
    return config


# --------------------------------------------------------------------------------------------------------
# Shared pipeline
# --------------------------------------------------------------------------------------------------------


def _ffn_size(config):
    """Width of the feed-forward block, whatever the config class calls it."""
    if config.model_type == "distilbert":
        return config.hidden_dim
    if config.model_type == "gpt2":
        return config.n_inner or 4 * config.n_embd
    return config.intermediate_size


# (what to call it in an error message, how to read it): the sizes a student config must share with the
# extraction. Layer count is handled separately because it decides which layers are picked.
CONFIG_CHECKS = (
    ("hidden size", lambda c: c.hidden_size),
    ("vocab size", lambda c: c.vocab_size),
    ("number of attention heads", lambda c: c.num_attention_heads),
    ("feed-forward size", _ffn_size),
    ("max position embeddings", lambda c: c.max_position_embeddings),
)


class Recipe(NamedTuple):
    """What differs between the extractions; `run_extraction` does the rest."""

    teacher_type: str  # the teacher config's model_type
    teacher_class: type
    student_type: str  # the student config's model_type
    student_class: type
    # (teacher config, number of layers) -> the student config the extraction implies
    derive_student_config: Callable
    # (teacher model, layers) -> student state dict
    extract: Callable
    # teacher keys with no student counterpart, with the reason, for the log
    dropped_note: str = ""


def load_teacher_config(model_name):
    # A hub name is never absolute nor starts with a dot, so such a name can only be a missing folder; say
    # so instead of transformers' complaint about repo ids.
    looks_like_path = os.path.isabs(model_name) or model_name.startswith((".", "~"))
    if looks_like_path and not os.path.isdir(os.path.expanduser(model_name)):
        raise UserError(f"--model_name {model_name}: no such directory")
    return load_pretrained(lambda: AutoConfig.from_pretrained(model_name), "--model_name", model_name, "a model config")


def load_teacher_weights(model_name, config, model_class):
    # float32 whatever the checkpoint's dtype: the student is trained from these tensors.
    teacher, info = load_pretrained(
        lambda: model_class.from_pretrained(model_name, config=config, dtype=torch.float32, output_loading_info=True),
        "--model_name", model_name, "the weights")
    # A base-model checkpoint (no LM head) loads with a random head; copying that into the student would be
    # silently wrong, so refuse it.
    missing = sorted(info.get("missing_keys", ())) + sorted(info.get("mismatched_keys", ()))
    if missing:
        raise UserError(
            f"--model_name {model_name}: the checkpoint lacks {len(missing)} tensor(s) of "
            f"{model_class.__name__} (e.g. {missing[0]}); is it a model without its LM head?"
        )
    return teacher.eval()


def load_teacher(model_name, recipe, script_name):
    config = load_teacher_config(model_name)
    if config.model_type != recipe.teacher_type:
        raise UserError(
            f"--model_name {model_name} is a {config.model_type} model, but {script_name} "
            f"--model_type {recipe.teacher_type} needs a {recipe.teacher_type} teacher"
        )
    return load_teacher_weights(model_name, config, recipe.teacher_class)


def load_student_config(path, recipe):
    if not os.path.exists(path):
        raise UserError(f"--student_config {path}: no such file or directory")
    config = load_pretrained(lambda: AutoConfig.from_pretrained(path), "--student_config", path, "a model config")
    if config.model_type != recipe.student_type:
        raise UserError(
            f"--student_config {path} is a {config.model_type} config, the student must be {recipe.student_type}"
        )
    return config


def choose_layers(layers_arg, n_teacher_layers, student_config, student_config_path):
    if layers_arg is not None:
        check_layers(layers_arg, n_teacher_layers)
        if student_config is not None and student_config.num_hidden_layers != len(layers_arg):
            raise UserError(
                f"--student_config {student_config_path} has {student_config.num_hidden_layers} layers, "
                f"but --layers selects {len(layers_arg)}"
            )
        return layers_arg
    if student_config is None:
        return default_layers(n_teacher_layers)
    n_student = student_config.num_hidden_layers
    if not 1 <= n_student <= n_teacher_layers:
        raise UserError(
            f"--student_config {student_config_path} has {n_student} layers, "
            f"the teacher has {n_teacher_layers} to choose from"
        )
    return default_layers(n_teacher_layers, n_student)


def check_student_config(student_config, reference, path):
    """The student config must describe the model the extracted tensors fit (`reference`)."""
    for what, read in CONFIG_CHECKS:
        if read(student_config) != read(reference):
            raise UserError(
                f"--student_config {path}: {what} is {read(student_config)}, "
                f"but the teacher's is {read(reference)}"
            )


def keys_left_to_random_init(state_dict, config, student_class, source):
    """Check `state_dict` against the student class built from `config`; return the student keys it lacks.

    Built on the meta device: only names and shapes are needed, not memory or an initialisation.
    """
    with torch.device("meta"):
        student = student_class(config)
    expected = student.state_dict()
    unexpected = [key for key in state_dict if key not in expected]
    if unexpected:
        # The mapping, not the user, is wrong.
        raise RuntimeError(f"extraction produced keys that {student_class.__name__} does not have: {unexpected}")
    for key, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise UserError(
                f"{source}: {key} has shape {tuple(expected[key].shape)} in the student "
                f"but {tuple(tensor.shape)} in the teacher"
            )
    return [key for key in expected if key not in state_dict]


def save_state_dict(state_dict, path):
    """Write through a temporary file in the same folder so a crash never leaves a truncated checkpoint."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=".extract-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state_dict, handle)
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise


def save_student_folder(state_dict, config, student_class, folder):
    student = student_class(config)
    student.load_state_dict(state_dict, strict=False)
    student.save_pretrained(folder)


def check_output_paths(args):
    # Before the (slow) teacher load, so a typo costs nothing.
    if os.path.isdir(args.dump_checkpoint):
        raise UserError(f"--dump_checkpoint {args.dump_checkpoint} is a directory, expected a file path")
    if args.dump_folder is not None and os.path.exists(args.dump_folder) and not os.path.isdir(args.dump_folder):
        raise UserError(f"--dump_folder {args.dump_folder} exists and is not a directory")


def run_extraction(args, recipe, script_name):
    """Validate everything, then write: an error leaves no output behind."""
    check_output_paths(args)
    layers_arg = parse_layers(args.layers) if args.layers is not None else None
    student_config = load_student_config(args.student_config, recipe) if args.student_config else None
    teacher = load_teacher(args.model_name, recipe, script_name)
    n_teacher_layers = teacher.config.num_hidden_layers

    layers = choose_layers(layers_arg, n_teacher_layers, student_config, args.student_config)
    reference = recipe.derive_student_config(teacher.config, len(layers))
    if student_config is not None:
        check_student_config(student_config, reference, args.student_config)
        config, source = student_config, f"--student_config {args.student_config}"
    else:
        config, source = reference, f"--model_name {args.model_name}"

    state_dict = recipe.extract(teacher, layers)
    random_keys = keys_left_to_random_init(state_dict, config, recipe.student_class, source)

    logger.info("Teacher %s: %d layers; student built from teacher layers %s", args.model_name,
                n_teacher_layers, ",".join(map(str, layers)))
    if recipe.dropped_note:
        logger.info("Not transferred: %s", recipe.dropped_note)
    # Stable wording: the tests (and people) read this line to know which missing keys are expected.
    logger.info("Student keys left to random init: %s", ", ".join(random_keys) if random_keys else "none")

    save_state_dict(state_dict, args.dump_checkpoint)
    logger.info("Wrote %d tensors to %s", len(state_dict), args.dump_checkpoint)
    if args.dump_folder is not None:
        save_student_folder(state_dict, config, recipe.student_class, args.dump_folder)
        logger.info("Wrote a %d-layer %s to %s", len(layers), recipe.student_class.__name__, args.dump_folder)
    return state_dict, layers, random_keys


def add_common_arguments(parser, default_checkpoint, checkpoint_help=None):
    """The flags both extraction scripts share (--model_name, --dump_checkpoint, --layers, --student_config,
    --dump_folder)."""
    parser.add_argument("--model_name", required=True, help="Teacher: hub name or local folder.")
    parser.add_argument("--dump_checkpoint", default=default_checkpoint,
                        help=checkpoint_help or "Where to write the student state dict (torch.save of name -> "
                                                "tensor).")
    parser.add_argument("--layers", default=None,
                        help="Comma-separated teacher layers to keep, increasing, e.g. 0,2,4,7,9,11. Default: "
                             "0,2,4,7,9,11 for a 12-layer teacher, else 6 evenly spread layers including the "
                             "first and last (all layers if the teacher has <= 6); with --student_config, "
                             "as many as it has.")
    parser.add_argument("--student_config", default=None,
                        help="Student config to check the extraction against (sizes and layer count).")
    parser.add_argument("--dump_folder", default=None,
                        help="Also write a complete student model folder (config + weights) that "
                             "from_pretrained loads.")


# --------------------------------------------------------------------------------------------------------
# BERT -> DistilBERT
# --------------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------------
# The recipes, by --model_type
# --------------------------------------------------------------------------------------------------------


def recipe_for(model_type, vocab_transform):
    """The Recipe of extract_distilbert.py (--model_type bert) or extract.py (roberta, gpt2)."""
    if model_type == "bert":
        return Recipe(
            teacher_type="bert", teacher_class=BertForMaskedLM,
            student_type="distilbert", student_class=DistilBertForMaskedLM,
            derive_student_config=distilbert_config_from_bert,
            extract=lambda teacher, layers: extract_distilbert_state_dict(teacher, layers, vocab_transform),
            dropped_note=DROPPED_NOTE,
        )
    model_class = {"roberta": RobertaForMaskedLM, "gpt2": GPT2LMHeadModel}[model_type]
    return Recipe(
        teacher_type=model_type, teacher_class=model_class,
        student_type=model_type, student_class=model_class,
        derive_student_config=same_architecture_student_config,
        extract=lambda teacher, layers: extract_state_dict(teacher, model_type, layers, vocab_transform),
        dropped_note="the teacher layers not selected",
    )
