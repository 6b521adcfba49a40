"""Initialising a shallow student from any Hugging Face masked or causal LM (`scripts/extract.py
--model_type auto`).

Works on models whose blocks sit in one `nn.ModuleList` (Llama, Qwen2, Mistral, ModernBERT, BERT, RoBERTa,
GPT-2, ...): it slices that list and the config (per-layer fields, layer counts, layer indices), checks the
result against a freshly built student of the same class, and writes a complete model folder.
"""
import copy
import math
import os
import shutil
import tempfile
from typing import NamedTuple

import torch
from torch import nn
from transformers import (MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_MASKED_LM_MAPPING, AutoModelForCausalLM,
                          AutoModelForMaskedLM, AutoTokenizer)
from transformers.utils import cached_file

from distil.extraction import (check_layers, default_layers, load_teacher_config, load_teacher_weights, parse_layers,
                                save_state_dict)
from utils import UserError, load_pretrained, logger


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
    return load_pretrained(lambda: AutoTokenizer.from_pretrained(model_name), "--model_name", model_name,
                           "its tokenizer files")


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


def held_out_scorer(args, tokenizer, teacher_config):
    """A function model -> held-out loss on --eval_data_file (None without it): what a layer choice costs before
    any training."""
    if getattr(args, "eval_data_file", None) is None:
        return None
    import functools

    from distil.evaluation import evaluate
    from lm_seqs_dataset import BinarizedCorpus, LmSeqsDataset
    from distil.models import framing_token_ids, max_input_size
    from utils import special_token_ids, user_input

    if tokenizer is None:
        raise UserError(f"--eval_data_file needs the teacher's tokenizer; --model_name {args.model_name} has none")
    with user_input("--eval_data_file"):
        corpus = BinarizedCorpus.open(args.eval_data_file)
    special = framing_token_ids(special_token_ids(tokenizer), args.mlm, corpus.metadata.get("framing"))
    dataset = LmSeqsDataset(corpus, special_tok_ids=special, mlm=args.mlm,
                            max_len=min(args.eval_max_seq_length, max_input_size(teacher_config, tokenizer)))
    if len(dataset) == 0:
        raise UserError(f"--eval_data_file {args.eval_data_file}: no sequence left after filtering")
    score = functools.partial(evaluate, dataset=dataset, mlm=args.mlm, batch_size=args.eval_batch_size,
                              device="cpu", special_tok_ids=special, max_batches=args.eval_max_batches)
    key = "mlm_loss" if args.mlm else "clm_loss"
    return lambda model: score(model, vocab_size=model.config.get_text_config().vocab_size)[key]


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
    score = held_out_scorer(args, tokenizer, teacher.config.get_text_config())
    teacher_loss = score(teacher) if score is not None else None  # before the teacher becomes the student
    student, changed = build_auto_student(teacher, layers, inplace=True)
    if score is not None:
        vocab = student.config.get_text_config().vocab_size
        logger.info("Held-out %s loss on %s (nats per token): teacher %.3f, student before training %.3f, "
                    "uniform guess %.3f. A student far above the teacher, or above the uniform guess, starts "
                    "from a poor layer choice (see --layers).", "MLM" if args.mlm else "CLM", args.eval_data_file,
                    teacher_loss, score(student), math.log(vocab))

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
