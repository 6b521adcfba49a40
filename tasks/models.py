"""Building the student, the teacher and the tokenizer of a task run, with the checks that pair them.

    tokenizer = load_tokenizer(args)
    student = load_student(args, AutoModelForQuestionAnswering)
    teacher = load_teacher(args, AutoModelForQuestionAnswering, tokenizer, student)  # None without a teacher

The student may come from any checkpoint of its architecture (a pretrained or distilled masked LM: its task
head then starts from random init). The teacher must already be fine-tuned on the task: a teacher whose
task head would be randomly initialised is refused, since distilling from it would teach noise. Teacher
and student must share the tokenizer's vocabulary, token for token. A fine-tuned classifier keeps its own
label order (its config's id2label): label_permutation() says how to read its outputs in the task's order.
"""
import contextlib
import json
import logging
import os

from transformers import AutoConfig, AutoTokenizer

from utils import UserError, load_pretrained, logger


def _cache(args):
    return args.cache_dir or None


def load_tokenizer(args, **kwargs):
    """The run's tokenizer (--tokenizer_name, else the student's); kwargs go to from_pretrained."""
    name = args.tokenizer_name or args.model_name_or_path
    flag = "--tokenizer_name" if args.tokenizer_name else "--model_name_or_path"
    tokenizer = load_pretrained(lambda: AutoTokenizer.from_pretrained(name, cache_dir=_cache(args), **kwargs), flag,
                                name, "a tokenizer", cache_dir=_cache(args))
    if tokenizer.pad_token_id is None:
        raise UserError(f"the tokenizer of {name} has no padding token")
    return tokenizer


def load_config(name, flag, model_type, cache_dir=None, **overrides):
    config = load_pretrained(lambda: AutoConfig.from_pretrained(name, cache_dir=cache_dir, **overrides), flag, name,
                             "a model config", cache_dir=cache_dir)
    if model_type not in (None, "auto") and model_type != config.model_type:
        raise UserError(f"{flag} {name} is a {config.model_type} model, but its type flag says {model_type}")
    return config


def load_student(args, model_class, **config_overrides):
    """The student with a task head (random if its checkpoint has none, which is the usual case)."""
    config = load_config(args.config_name or args.model_name_or_path,
                         "--config_name" if args.config_name else "--model_name_or_path",
                         args.model_type, _cache(args), **config_overrides)
    with quiet_load_report():
        model, info = load_pretrained(
            lambda: model_class.from_pretrained(args.model_name_or_path, config=config, cache_dir=_cache(args),
                                                output_loading_info=True),
            "--model_name_or_path", args.model_name_or_path, "the student's weights", cache_dir=_cache(args))
    if info.get("missing_keys"):
        unused = sorted(info.get("unexpected_keys") or ())
        logger.info("Student: %d tensor(s) start from random init (the task head): %s%s", len(info["missing_keys"]),
                    ", ".join(sorted(info["missing_keys"])[:6]),
                    f"; {len(unused)} checkpoint tensor(s) left unused (its pretraining head): {', '.join(unused[:4])}"
                    if unused else "")
    return model


@contextlib.contextmanager
def quiet_load_report():
    """Without transformers' LOAD REPORT table. transformers 5 logs one, as a warning, for every checkpoint whose
    tensors differ from the model's: here always, by design (a task head starts from random init, the pretraining
    head is left out). load_student says that in one line and load_teacher refuses a teacher without its head;
    errors (a size mismatch) are still raised."""
    log = logging.getLogger("transformers.modeling_utils")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def load_teacher(args, model_class, tokenizer, student, **config_overrides):
    """The fine-tuned teacher in eval mode, or None when --teacher_name_or_path is not given."""
    name = args.teacher_name_or_path
    if name is None:
        return None
    config = load_config(name, "--teacher_name_or_path", args.teacher_type, _cache(args), **config_overrides)
    with quiet_load_report():  # a missing head is refused below, in one line
        teacher, info = load_pretrained(
            lambda: model_class.from_pretrained(name, config=config, cache_dir=_cache(args), output_loading_info=True),
            "--teacher_name_or_path", name, "the teacher's weights", cache_dir=_cache(args))
    missing = sorted(info.get("missing_keys", ())) + sorted(info.get("mismatched_keys", ()))
    if missing:
        head = model_class.__name__[len("AutoModelFor"):]
        raise UserError(f"--teacher_name_or_path {name}: its checkpoint has no {head} "
                        f"head ({missing[0]} would be random); fine-tune the teacher on the task first")
    check_same_vocabulary(name, teacher, tokenizer, student)
    logger.info("%s", describe_teacher(name, teacher))
    return teacher.eval()


def describe_teacher(name, teacher):
    """One line for the log: which teacher, its labels in its output order (classifiers and taggers), and its
    own score when its folder holds the eval_results.json of its evaluation."""
    config = teacher.config
    n_params = sum(p.numel() for p in teacher.parameters())
    line = f"Teacher: {name} ({type(teacher).__name__}, {n_params / 1e6:.1f}M parameters)"
    if getattr(teacher, "num_labels", None) and not type(teacher).__name__.endswith("QuestionAnswering"):
        labels = [str(config.id2label[key]) for key in sorted(config.id2label, key=int)]
        line += f"; its labels in output order: {', '.join(labels)}"
    results = os.path.join(name, "eval_results.json")
    if os.path.isfile(results):
        try:
            with open(results) as f:
                record = json.load(f)
            line += f"; its own evaluation ({results}): {record['task']} score {float(record['score']):.2f}"
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a file of another kind says nothing about the teacher: leave it out
    return line


def check_same_vocabulary(teacher_name, teacher, tokenizer, student):
    """Same token ids on both sides: equal embedding sizes, and equal vocabularies when the teacher ships one."""
    t_size, s_size = teacher.config.vocab_size, student.config.vocab_size
    if t_size != s_size:
        raise UserError(f"--teacher_name_or_path {teacher_name}: teacher vocabulary of {t_size} tokens, student "
                        f"vocabulary of {s_size}; teacher and student must share the tokenizer")
    if not os.path.isdir(teacher_name):
        return
    try:
        teacher_tok = AutoTokenizer.from_pretrained(teacher_name)
    except (OSError, ValueError, TypeError):
        return  # a teacher folder without tokenizer files: the embedding sizes are all we can compare
    if teacher_tok.get_vocab() != tokenizer.get_vocab():
        ours, theirs = tokenizer.get_vocab(), teacher_tok.get_vocab()
        differing = sorted(set(ours.items()) ^ set(theirs.items()), key=lambda kv: kv[1])
        token, index = differing[0]
        raise UserError(f"--teacher_name_or_path {teacher_name}: the teacher's tokenizer differs from the student's "
                        f"(e.g. token {token!r} has id {theirs.get(token)} for the teacher, {ours.get(token)} for "
                        f"the student); teacher and student must share the tokenizer")


def clamp_max_seq_length(args, tokenizer, *models):
    """--max_seq_length, lowered (with a warning) to what the models' position embeddings and the tokenizer allow."""
    limits = [tokenizer.model_max_length] if 0 < tokenizer.model_max_length < 1e9 else []
    for model in models:
        # None, or negative (XLNet's -1: relative positions, no limit), is no limit.
        if model is not None and (getattr(model.config, "max_position_embeddings", None) or 0) > 0:
            # RoBERTa-style models number positions from pad_token_id + 1.
            offset = model.config.pad_token_id + 1 if model.config.model_type in ("roberta", "xlm-roberta",
                                                                                 "camembert") else 0
            limits.append(model.config.max_position_embeddings - offset)
    if limits and args.max_seq_length > min(limits):
        logger.warning("--max_seq_length %d is longer than the models accept: using %d", args.max_seq_length,
                       min(limits))
        args.max_seq_length = min(limits)


def label_permutation(id2label, task_labels, source):
    """How to read a model's outputs in the task's label order: None when its order already is the task's, else
    `perm` with perm[i] the model's output index of the task's label i (`logits[..., perm]` is in task order).

    id2label: the model config's mapping (int or str keys); task_labels: the task's label names in task order;
    source: the flag or path named in the error. Labels are matched by name; generic names LABEL_0, LABEL_1, ...
    (a head fine-tuned without names) are taken to be in the task's order. Any other mismatch is refused: reading
    a head in the wrong order would silently swap its classes.
    """
    names = [str(id2label[key]) for key in sorted(id2label, key=int)]
    task_labels = [str(label) for label in task_labels]
    if names == task_labels or names == [f"LABEL_{i}" for i in range(len(task_labels))]:
        return None
    for fold in (str, str.casefold):  # NEGATIVE is negative (the hub's SST-2 models), unless that is ambiguous
        ours, theirs = [fold(n) for n in names], [fold(n) for n in task_labels]
        if sorted(ours) == sorted(theirs) and len(set(ours)) == len(ours):
            perm = [ours.index(label) for label in theirs]
            if perm == list(range(len(perm))):
                return None
            logger.info("%s: its outputs (%s) are read in the task's order (%s), by label name", source,
                        ", ".join(names), ", ".join(task_labels))
            return perm
    raise UserError(f"{source}: the model's labels ({', '.join(names)}) are not the task's "
                    f"({', '.join(task_labels)}); its head cannot be read in the task's order")


def in_task_order(logits, perm):
    """(..., num_labels) logits of a model, in the task's label order (perm: label_permutation's answer)."""
    return logits if perm is None else logits[..., perm]
