"""GLUE tasks and their metrics, and any sentence(-pair) classification or regression task read from files.

    task = get_task("mrpc")                       # columns, label count, metrics of a GLUE task
    data = load_split(args, "train", task)        # a datasets.Dataset, from the hub or --train_file
    labels = label_ids(data, task, source)        # checked ids (floats for regression)
    glue_metrics(task, predictions, labels)       # {"f1": ..., "accuracy": ...}; task_score() averages them

Metrics are computed here (numpy / scipy), never loaded from the network. Each task's headline score, used
for the macro score of the results table, is the mean of its metrics as on the GLUE leaderboard: Matthews
correlation for CoLA, mean of F1 and accuracy for MRPC and QQP, mean of Pearson and Spearman for STS-B,
accuracy for the others (MNLI: the matched dev set).
"""
import dataclasses
import os
from typing import Optional, Tuple

import numpy as np

from utils import UserError, logger

HUB_DATASET = "nyu-mll/glue"


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    columns: Tuple[str, Optional[str]]  # text column, and the second text of a pair (None: single sentence)
    num_labels: int  # 1: regression
    metrics: Tuple[str, ...]
    label_names: Tuple[str, ...] = ()  # the hub's names of the labels 0, 1, ... (accepted in files too)
    display: str = ""

    @property
    def is_regression(self):
        return self.num_labels == 1


GLUE_TASKS = {
    "cola": Task("cola", ("sentence", None), 2, ("matthews_correlation",), ("unacceptable", "acceptable"), "CoLA"),
    "mnli": Task("mnli", ("premise", "hypothesis"), 3, ("accuracy",), ("entailment", "neutral", "contradiction"),
                 "MNLI"),
    "mrpc": Task("mrpc", ("sentence1", "sentence2"), 2, ("f1", "accuracy"), ("not_equivalent", "equivalent"),
                 "MRPC"),
    "qnli": Task("qnli", ("question", "sentence"), 2, ("accuracy",), ("entailment", "not_entailment"), "QNLI"),
    "qqp": Task("qqp", ("question1", "question2"), 2, ("f1", "accuracy"), ("not_duplicate", "duplicate"), "QQP"),
    "rte": Task("rte", ("sentence1", "sentence2"), 2, ("accuracy",), ("entailment", "not_entailment"), "RTE"),
    "sst2": Task("sst2", ("sentence", None), 2, ("accuracy",), ("negative", "positive"), "SST-2"),
    "stsb": Task("stsb", ("sentence1", "sentence2"), 1, ("pearson", "spearmanr"), (), "STS-B"),
    "wnli": Task("wnli", ("sentence1", "sentence2"), 2, ("accuracy",), ("not_entailment", "entailment"), "WNLI"),
}
# The order of the Distil* README's table.
GLUE_ORDER = ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb", "wnli")


def get_task(name):
    """The GLUE task of that name (case and dashes ignored: 'SST-2' is sst2), or None for a task of your own."""
    return GLUE_TASKS.get(name.lower().replace("-", "").replace("_", "")) if name else None


# ------------------------------------------------------------------------------------------------ reading

_BUILDERS = {".tsv": ("csv", {"delimiter": "\t"}), ".csv": ("csv", {}), ".json": ("json", {}), ".jsonl": ("json", {})}


def load_file(path, flag, cache_dir=None):
    """A tsv / csv / json-lines file as a datasets.Dataset. Text is kept as written: no 'NA' turns into a float."""
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: no such file")
    ext = os.path.splitext(path)[1].lower()
    if ext not in _BUILDERS:
        raise UserError(f"{flag} {path}: unknown format {ext or '(no extension)'}; use .tsv, .csv, .json or .jsonl")
    builder, kwargs = _BUILDERS[ext]
    if builder == "csv":
        kwargs = dict(kwargs, keep_default_na=False, na_filter=False)
    from datasets import load_dataset

    try:
        return load_dataset(builder, data_files={"data": os.path.abspath(path)}, split="data", cache_dir=cache_dir,
                            **kwargs)
    except Exception as error:  # parser errors of pandas / pyarrow: report them as the file's problem
        message = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise UserError(f"{flag} {path}: cannot be read as {ext[1:]} ({message})") from None


def load_hub_split(task, split, cache_dir=None):
    from datasets import load_dataset

    return load_dataset(HUB_DATASET, task.name, split=split, cache_dir=cache_dir)


def text_columns(data, task, args, source, labelled=True):
    """(text column, second text column or None), checked against the data set's columns and logged. --text_column
    and --text_pair_column each replace their default alone (--text_column alone: a single sentence). For a
    GLUE task (task not None) the file must fit it: a single-sentence task refuses a file of sentence pairs (and a
    pair task a file with one text), which would otherwise train as another kind of task without a word.
    labelled=False: unlabelled text, whose label column is neither needed nor read."""
    names = data.column_names
    if task is not None and task.columns[0] in names:
        first, second = task.columns
    elif "sentence1" in names:
        first, second = "sentence1", "sentence2"
    else:
        first, second = "sentence", None
    if task is not None and not (args.text_column or args.text_pair_column):
        pair = task.columns[1] is not None
        if not pair and second is not None:
            raise UserError(f"{source}: --task_name {task.name} is a single-sentence task, but the file holds sentence "
                            f"pairs ({first}, {second}; columns: {', '.join(names)}); is it another task's file? "
                            f"Name the text with --text_column to use one column")
        if pair and second is None and first in names:
            raise UserError(f"{source}: --task_name {task.name} is a sentence-pair task ({', '.join(task.columns)}), "
                            f"but the file holds one text column ({first}; columns: {', '.join(names)}); is it "
                            f"another task's file?")
    if args.text_column:
        first, second = args.text_column, None
    second = args.text_pair_column or second
    flags = ((first, "--text_column"), (second, "--text_pair_column"),
             (args.label_column if labelled else None, "--label_column"))
    for column, flag in flags:
        if column is not None and column not in names:
            raise UserError(f"{source}: no column {column!r} (columns: {', '.join(names)}); name it with {flag}")
    logger.info("%s: text from column %s, %s (%s)", source,
                f"{first!r}" if second is None else f"{first!r} paired with {second!r}",
                f"label from column {args.label_column!r}" if labelled else "no label read (unlabelled text)",
                "a single-sentence task" if second is None else "a sentence-pair task")
    return first, second


# ------------------------------------------------------------------------------------------------ labels


def label_ids(values, task, source, label_names=None):
    """Checked labels: floats for regression, ints in [0, num_labels) for classification.

    values: the label column; task: the GLUE Task or None; label_names: the names of a task of your own with
    string labels (from the training file). An int label out of range, or a name not among the labels, is
    refused with its row number.
    """
    if task is not None and task.is_regression:
        try:
            return [float(v) for v in values]
        except (TypeError, ValueError):
            raise UserError(f"{source}: the labels of a regression task must be numbers") from None
    names = list(label_names or (task.label_names if task is not None else ()))
    n = task.num_labels if task is not None else (len(names) or None)
    out = []
    for row, value in enumerate(values):
        if isinstance(value, str) and not _is_int(value):
            if value not in names:
                raise UserError(f"{source}: row {row + 1}: label {value!r} is not one of the labels "
                                f"({', '.join(names) or 'none known'})")
            out.append(names.index(value))
            continue
        if isinstance(value, float) and not value.is_integer():
            raise UserError(f"{source}: row {row + 1}: label {value} is not a class id; is this a regression task? "
                            f"(--num_labels 1)")
        label = int(value)
        if label < 0 or (n is not None and label >= n):
            raise UserError(f"{source}: row {row + 1}: label {label} is out of range for {n} classes "
                            f"(labels are 0 to {n - 1})" if n else f"{source}: row {row + 1}: negative label {label}")
        out.append(label)
    return out


def read_scored_pairs(path, flag):
    """(first sentences, second sentences, gold scores) of a file with sentence1, sentence2 and numeric label
    columns (STS-B's layout); flag names the file in errors."""
    data = load_file(path, flag)
    missing = [c for c in ("sentence1", "sentence2", "label") if c not in data.column_names]
    if missing:
        raise UserError(f"{flag} {path}: no column {missing[0]!r} (columns: {', '.join(data.column_names)})")
    try:
        gold = [float(x) for x in data["label"]]
    except ValueError as exc:
        raise UserError(f"{flag} {path}: a label is not a number ({exc})") from None
    return list(data["sentence1"]), list(data["sentence2"]), gold


def _is_int(text):
    try:
        int(text)
        return True
    except ValueError:
        return False


def infer_custom_task(name, values, num_labels=None):
    """A Task for files of your own: regression if --num_labels 1 or the labels are non-integer numbers; else
    classification over the integer labels 0..max, or over the sorted names of string labels."""
    strings = sorted({v for v in values if isinstance(v, str) and not _is_int(v)})
    if num_labels == 1 or (not strings and any(isinstance(v, float) and not v.is_integer() for v in values)):
        return Task(name, ("", None), 1, ("pearson", "spearmanr"), (), name)
    if strings:
        if num_labels is not None and num_labels != len(strings):
            raise UserError(f"--num_labels {num_labels}, but the training labels have {len(strings)} names")
        return Task(name, ("", None), len(strings), ("accuracy",), tuple(strings), name)
    if not values:
        raise UserError("the training file has no rows")
    n = num_labels if num_labels is not None else int(max(int(v) for v in values)) + 1
    return Task(name, ("", None), max(n, 2), ("accuracy",), (), name)


# ------------------------------------------------------------------------------------------------ metrics


def accuracy(predictions, labels):
    return float(np.mean(np.asarray(predictions) == np.asarray(labels)))


def binary_f1(predictions, labels):
    """F1 of the positive class (label 1)."""
    p, y = np.asarray(predictions) == 1, np.asarray(labels) == 1
    tp = float(np.sum(p & y))
    if tp == 0:
        return 0.0
    precision, recall = tp / np.sum(p), tp / np.sum(y)
    return float(2 * precision * recall / (precision + recall))


def matthews_correlation(predictions, labels):
    """Matthews correlation of binary predictions; 0 when a side is constant (undefined)."""
    p, y = np.asarray(predictions) == 1, np.asarray(labels) == 1
    tp, tn = float(np.sum(p & y)), float(np.sum(~p & ~y))
    fp, fn = float(np.sum(p & ~y)), float(np.sum(~p & y))
    denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return float((tp * tn - fp * fn) / denominator) if denominator > 0 else 0.0


def glue_metrics(task, logits, labels):
    """The task's metrics from the model's outputs: logits (n, num_labels), or (n, 1) for regression."""
    from scipy import stats

    logits = np.asarray(logits)
    if task.is_regression:
        predictions = logits.reshape(-1)
        out = {"pearson": float(stats.pearsonr(predictions, labels)[0]),
               "spearmanr": float(stats.spearmanr(predictions, labels)[0])}
        return {k: (0.0 if np.isnan(v) else v) for k, v in out.items()}  # a constant prediction has no correlation
    predictions = logits.argmax(-1)
    funcs = {"accuracy": accuracy, "f1": binary_f1, "matthews_correlation": matthews_correlation}
    return {name: funcs[name](predictions, labels) for name in task.metrics}


def task_score(task, metrics):
    """The task's headline score in percent: the mean of its metrics (GLUE leaderboard convention)."""
    return 100.0 * float(np.mean([metrics[name] for name in task.metrics]))
