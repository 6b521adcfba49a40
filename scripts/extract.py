#!/usr/bin/env python
"""Initialise a shallow student from a subset of a teacher's layers.

The student is the teacher's own class with fewer layers, so every tensor keeps its name except for the
layer index. The output is a state dict (torch.save of name -> tensor) whose keys are exactly those of the
student class's `state_dict()`, ready for `train.py --student_pretrained_weights`.

`--model_type roberta` / `gpt2` map tensor names with a fixed prefix. `--model_type auto` works on any
Hugging Face masked or causal LM whose blocks sit in one `nn.ModuleList` (Llama, Qwen2, Mistral, ModernBERT,
BERT, RoBERTa, GPT-2, ...): it slices that list and the config, and writes a complete model folder.

The machinery shared with extract_distilbert.py (choosing and checking layers, loading and validating the
teacher and the student config, comparing the result against the student class, writing the files) lives
here too, so that both scripts behave the same way.
"""
import argparse
import copy
import os
import re
import shutil
import sys
import tempfile
from typing import Callable, NamedTuple

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import (  # noqa: E402
    MODEL_FOR_CAUSAL_LM_MAPPING,
    MODEL_FOR_MASKED_LM_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    GPT2LMHeadModel,
    RobertaForMaskedLM,
)
from transformers.utils import cached_file  # noqa: E402

from utils import UserError, fail, logger  # noqa: E402

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


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


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
    try:
        return AutoConfig.from_pretrained(model_name)
    except (OSError, ValueError) as error:
        raise UserError(f"--model_name {model_name}: cannot load a model config: {_first_line(error)}")


def load_teacher_weights(model_name, config, model_class):
    try:
        # float32 whatever the checkpoint's dtype: the student is trained from these tensors.
        teacher, info = model_class.from_pretrained(
            model_name, config=config, dtype=torch.float32, output_loading_info=True
        )
    except (OSError, ValueError) as error:
        raise UserError(f"--model_name {model_name}: cannot load the weights: {_first_line(error)}")
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
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise UserError(f"--student_config {path}: cannot read it as a model config: {_first_line(error)}")
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
# Any Hugging Face masked or causal LM (--model_type auto)
# --------------------------------------------------------------------------------------------------------

# Config fields that say how many of the *first* layers have some property (Qwen2 uses sliding windows from
# layer max_window_layers on when layer_types is absent; DeepSeek's first_k_dense_replace layers are dense).
# The kept layers are increasing, so the property still covers a prefix of the student: its length is the
# number of kept layers that sat before the boundary.
PREFIX_COUNT_FIELDS = ("max_window_layers", "first_k_dense_replace")

# AutoTokenizer.from_pretrained does not fail on a folder without any of these: it builds an empty or default
# tokenizer from the model config. Their presence is what tells "the teacher has a tokenizer".
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model",
    "spiece.model", "sentencepiece.bpe.model", "special_tokens_map.json",
)
HUB_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


class LayerStack(NamedTuple):
    path: str  # dotted module path, e.g. "model.layers"
    count_field: str  # the config field holding the layer count


def _layer_count_fields(config):
    if type(getattr(config, "num_hidden_layers", None)) is int:
        return {"num_hidden_layers": config.num_hidden_layers}
    return {key: value for key, value in config.to_dict().items() if "layer" in key and type(value) is int}


def find_layer_stack(model):
    """The one nn.ModuleList holding the transformer blocks, and the config field that counts them.

    A candidate is a ModuleList as long as the config's layer count (num_hidden_layers, which GPT-2's
    attribute map also answers; otherwise any integer config field with "layer" in its name). Lists inside
    another candidate (e.g. a mixture of experts that happens to have as many experts as there are layers)
    are parts of a block, not the stack.
    """
    config = model.config.get_text_config()
    model_type = model.config.model_type
    count_fields = _layer_count_fields(config)
    sizes = set(count_fields.values())
    candidates = [name for name, module in model.named_modules()
                  if isinstance(module, nn.ModuleList) and len(module) > 0 and len(module) in sizes]
    outermost = [name for name in candidates if not any(name.startswith(other + ".") for other in candidates)]
    wanted = "/".join(str(size) for size in sorted(sizes)) or "?"
    if not outermost:
        raise UserError(f"cannot find the layer list of a {model_type} model: no torch.nn.ModuleList of "
                        f"{wanted} blocks (the config's layer count)")
    if len(outermost) > 1:
        raise UserError(f"cannot find the layer list of a {model_type} model: several module lists of "
                        f"{wanted} blocks ({', '.join(outermost)})")
    path = outermost[0]
    n_layers = len(model.get_submodule(path))
    fields = [key for key, value in count_fields.items() if value == n_layers]
    if len(fields) != 1:
        raise UserError(f"cannot tell which config field holds the layer count of a {model_type} model: "
                        f"{', '.join(fields)}")
    return LayerStack(path, fields[0])


def _is_scalar(value):
    if isinstance(value, tuple):
        return all(_is_scalar(item) for item in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _settings(module):
    """A module's plain settings (layer_idx, attention_type, sliding_window, eps, ...), not its state."""
    return {key: value for key, value in vars(module).items()
            if not key.startswith("_") and key != "training" and _is_scalar(value)}


def index_attributes(stack):
    """(path inside a block, attribute) -> offset, for the settings that hold the block's own position.

    Found by their values rather than by name: a setting that equals the block's index plus a constant in
    every block of the teacher (Llama's self_attn.layer_idx, which the KV cache is indexed by; ModernBERT's
    layer_idx; a 1-based layer_number). A teacher with one layer shows none, and needs none renumbered.
    """
    values = {}
    for index, block in enumerate(stack):
        for path, module in block.named_modules():
            for name, value in _settings(module).items():
                values.setdefault((path, name), []).append((index, value))
    found = {}
    for key, pairs in values.items():
        if len(pairs) < 2 or any(type(value) is not int for _, value in pairs):
            continue
        offsets = {value - index for index, value in pairs}
        if len(offsets) == 1:
            found[key] = offsets.pop()
    return found


def slice_config(config, count_field, layers, n_teacher_layers):
    """Update, in place, the config fields that depend on which layers there are; return their names.

    Per-layer lists (a field with "layer" in its name holding one entry per teacher layer: layer_types,
    mlp_layer_types, ...) keep the entries of the kept layers, so each block keeps its attention type
    (full / sliding window) rather than getting the one its new position would have. Fields listing layer
    indices (mlp_only_layers, ...) are left alone: if they matter, the comparison with a freshly built
    student reports it.
    """
    changed = [count_field]
    for key, value in config.to_dict().items():
        if key in PREFIX_COUNT_FIELDS and type(value) is int:
            setattr(config, key, sum(1 for index in layers if index < value))
            changed.append(key)
        elif "layer" in key and isinstance(value, (list, tuple)) and len(value) == n_teacher_layers:
            current = getattr(config, key)
            setattr(config, key, type(current)(current[index] for index in layers))
            changed.append(key)
    # Last: with an attribute map (GPT-2's n_layer), to_dict above still saw the teacher's count.
    setattr(config, count_field, len(layers))
    return changed


def _signature(block):
    """What a block must agree on with the block the student config builds: classes, settings, shapes."""
    signature = {}
    for path, module in block.named_modules():
        tensors = {name: tuple(tensor.shape) for name, tensor in [*module._parameters.items(),
                                                                   *module._buffers.items()]
                   if tensor is not None}
        signature[path] = (type(module).__name__, _settings(module), tensors)
    return signature


def _first_difference(extracted, fresh):
    """How the block the config builds (`fresh`) differs from the extracted one, in words; None if not."""
    for path in [*fresh, *(p for p in extracted if p not in fresh)]:
        where = path or "the block"
        if path not in extracted:
            return f"{where} ({fresh[path][0]}) exists, the teacher layer has none"
        if path not in fresh:
            return f"{where} does not exist, the teacher layer's is {extracted[path][0]}"
        (cls_a, settings_a, tensors_a), (cls_b, settings_b, tensors_b) = extracted[path], fresh[path]
        if cls_a != cls_b:
            return f"{where} is {cls_b}, the teacher layer's is {cls_a}"
        for name in sorted(set(settings_a) | set(settings_b)):
            if settings_a.get(name, "<unset>") != settings_b.get(name, "<unset>"):
                return (f"{where}.{name} is {settings_b.get(name, '<unset>')!r}, "
                        f"the teacher layer's is {settings_a.get(name, '<unset>')!r}")
        if tensors_a != tensors_b:
            return f"{where} has tensors {tensors_b}, the teacher layer's are {tensors_a}"
    return None


def check_against_fresh_student(student, stack_path, layers):
    """The saved folder is rebuilt from the config on reload: that rebuild must be the extracted model.

    Each kept block is compared with the block the reduced config builds at its new position, so anything
    that depends on a block's position and is not in a sliced config field (ModernBERT's first layer has
    no attention LayerNorm, a MoE layer list, ...) is refused here instead of being silently lost on reload.
    Built on the meta device: no memory, no initialisation.
    """
    model_type = student.config.model_type
    with torch.device("meta"):
        fresh = type(student)(copy.deepcopy(student.config))
    fresh_stack, stack = fresh.get_submodule(stack_path), student.get_submodule(stack_path)
    if len(fresh_stack) != len(stack):
        raise UserError(f"cannot extract from a {model_type} model: a config with {len(stack)} layers still "
                        f"builds {len(fresh_stack)}")
    for student_idx, teacher_idx in enumerate(layers):
        difference = _first_difference(_signature(stack[student_idx]), _signature(fresh_stack[student_idx]))
        if difference:
            raise UserError(
                f"--layers {','.join(map(str, layers))}: teacher layer {teacher_idx} cannot become layer "
                f"{student_idx} of a {len(layers)}-layer {model_type} student: there {difference}"
            )
    shapes = {key: tuple(tensor.shape) for key, tensor in student.state_dict().items()}
    fresh_shapes = {key: tuple(tensor.shape) for key, tensor in fresh.state_dict().items()}
    if shapes != fresh_shapes:
        odd = sorted(set(shapes) ^ set(fresh_shapes)) or [k for k in shapes if shapes[k] != fresh_shapes[k]]
        raise UserError(f"cannot extract from a {model_type} model: the student's tensors do not match "
                        f"those of a {len(layers)}-layer {type(student).__name__} (e.g. {odd[0]})")


def build_auto_student(teacher, layers, inplace=False):
    """The teacher with only the blocks `layers` (renumbered 0..k-1) and a config to match.

    Returns (student, names of the config fields changed). `inplace=True` reuses the teacher's tensors
    instead of copying them, which halves the memory a large teacher needs; the teacher is then gone.
    """
    stack_info = find_layer_stack(teacher)
    n_teacher_layers = len(teacher.get_submodule(stack_info.path))
    check_layers(layers, n_teacher_layers)
    student = teacher if inplace else copy.deepcopy(teacher)
    stack = student.get_submodule(stack_info.path)

    for (path, name), offset in index_attributes(stack).items():
        for student_idx, teacher_idx in enumerate(layers):
            module = stack[teacher_idx].get_submodule(path)
            if getattr(module, name) == teacher_idx + offset:
                setattr(module, name, student_idx + offset)
    parent_path, _, child = stack_info.path.rpartition(".")
    setattr(student.get_submodule(parent_path), child, type(stack)([stack[index] for index in layers]))

    # In place: every block holds this very config object, so they all see the change.
    changed = slice_config(student.config.get_text_config(), stack_info.count_field, layers, n_teacher_layers)
    check_against_fresh_student(student, stack_info.path, layers)

    # GPT-2 divides a block's attention scores by its position + 1 under this flag; no config field can
    # give a block back its teacher position, so the moved blocks attend (slightly) differently.
    if getattr(student.config, "scale_attn_by_inverse_layer_idx", False) and layers != list(range(len(layers))):
        logger.warning("scale_attn_by_inverse_layer_idx is set: student layers whose position differs from "
                       "their teacher layer's scale their attention scores by 1/(new position + 1)")
    return student, changed


def load_auto_teacher(model_name, mlm):
    config = load_teacher_config(model_name)
    wanted, other = (MODEL_FOR_MASKED_LM_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING) if mlm else \
        (MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_MASKED_LM_MAPPING)
    if type(config) not in wanted:
        kind, hint = ("masked", "") if mlm else ("causal", "")
        if type(config) in other:
            hint = "; drop --mlm" if mlm else "; add --mlm for a masked LM"
        raise UserError(f"--model_name {model_name}: a {config.model_type} model has no {kind} LM class "
                        f"in transformers{hint}")
    model_class = AutoModelForMaskedLM if mlm else AutoModelForCausalLM
    return load_teacher_weights(model_name, config, model_class)


def _has_tokenizer(model_name):
    folder = os.path.expanduser(model_name)
    if os.path.isdir(folder):
        return any(os.path.exists(os.path.join(folder, name)) for name in TOKENIZER_FILES)
    try:
        return any(cached_file(model_name, name, _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False) for name in HUB_TOKENIZER_FILES)
    except (OSError, ValueError):
        return False


def load_teacher_tokenizer(model_name):
    """The teacher's tokenizer, or None when it has none (the student folder then has none either)."""
    if not _has_tokenizer(model_name):
        return None
    try:
        return AutoTokenizer.from_pretrained(model_name)
    except (OSError, ValueError, TypeError) as error:
        raise UserError(f"--model_name {model_name}: it has tokenizer files but they do not load: "
                        f"{_first_line(error)}")


def save_model_folder(model, tokenizer, folder):
    """Write the whole folder beside its destination first, so an error never leaves half a model there."""
    folder = os.path.abspath(folder)
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".extract-", dir=parent)
    try:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        # rename() replaces an empty directory, and check_auto_output_paths refused a non-empty one.
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def check_auto_output_paths(args):
    if args.dump_folder is None:
        raise UserError("--model_type auto needs --dump_folder: the student is written as a model folder")
    if args.dump_checkpoint is not None and os.path.isdir(args.dump_checkpoint):
        raise UserError(f"--dump_checkpoint {args.dump_checkpoint} is a directory, expected a file path")
    if os.path.exists(args.dump_folder):
        if not os.path.isdir(args.dump_folder):
            raise UserError(f"--dump_folder {args.dump_folder} exists and is not a directory")
        # Also what keeps the teacher's own folder from being overwritten.
        if os.listdir(args.dump_folder):
            raise UserError(f"--dump_folder {args.dump_folder} is not empty; remove it or choose another")


def run_auto_extraction(args):
    """Validate everything, then write: an error leaves no output behind."""
    if args.student_config is not None:
        raise UserError("--student_config is not used with --model_type auto: the student's config is the "
                        "teacher's with fewer layers")
    if not args.vocab_transform:
        raise UserError("--no_vocab_transform applies to --model_type roberta only; --model_type auto copies "
                        "the whole LM head")
    check_auto_output_paths(args)
    layers_arg = parse_layers(args.layers) if args.layers is not None else None
    teacher = load_auto_teacher(args.model_name, args.mlm)
    n_teacher_layers = len(teacher.get_submodule(find_layer_stack(teacher).path))
    layers = layers_arg if layers_arg is not None else default_layers(n_teacher_layers)
    tokenizer = load_teacher_tokenizer(args.model_name)
    student, changed = build_auto_student(teacher, layers, inplace=True)

    logger.info("Teacher %s (%s): %d layers; student built from teacher layers %s", args.model_name,
                type(student).__name__, n_teacher_layers, ",".join(map(str, layers)))
    logger.info("Config fields updated: %s", ", ".join(changed))
    logger.info("Not transferred: the teacher layers not selected")
    logger.info("Student keys left to random init: none")

    if args.dump_checkpoint is not None:
        state_dict = student.state_dict()
        save_state_dict(state_dict, args.dump_checkpoint)
        logger.info("Wrote %d tensors to %s", len(state_dict), args.dump_checkpoint)
    save_model_folder(student, tokenizer, args.dump_folder)
    logger.info("Wrote a %d-layer %s%s to %s", len(layers), type(student).__name__,
                " and the teacher's tokenizer" if tokenizer is not None else "", args.dump_folder)
    return student, layers


# --------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------

RECIPES = {
    "roberta": Recipe(
        teacher_type="roberta", teacher_class=RobertaForMaskedLM,
        student_type="roberta", student_class=RobertaForMaskedLM,
        derive_student_config=same_architecture_student_config,
        extract=None,  # filled in per run: depends on --vocab_transform
        dropped_note="the teacher layers not selected",
    ),
    "gpt2": Recipe(
        teacher_type="gpt2", teacher_class=GPT2LMHeadModel,
        student_type="gpt2", student_class=GPT2LMHeadModel,
        derive_student_config=same_architecture_student_config,
        extract=None,
        dropped_note="the teacher layers not selected",
    ),
}


DEFAULT_CHECKPOINT = "serialization_dir/tf_roberta_048131723.pth"


def build_parser():
    parser = argparse.ArgumentParser(
        description="Extract a shallow student from a subset of a teacher's layers (transfer learning "
                    "initialisation for distillation): RoBERTa, GPT-2, or any masked / causal LM with "
                    "--model_type auto."
    )
    parser.add_argument("--model_type", default="roberta", choices=[*sorted(RECIPES), "auto"],
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
    recipe = RECIPES[args.model_type]._replace(
        extract=lambda teacher, layers: extract_state_dict(teacher, args.model_type, layers, args.vocab_transform)
    )
    try:
        run_extraction(args, recipe, "extract.py")
    except UserError as error:
        fail(str(error))


if __name__ == "__main__":
    main()
