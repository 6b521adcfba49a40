#!/usr/bin/env python
"""The whole distillation workflow on one CPU, offline, in about ten minutes: `make demo` runs this.

    python scripts/demo.py                      # full demo, writes demo_output/
    python scripts/demo.py --quick              # seconds-scale smoke run (CI)
    python scripts/demo.py --corpus my.txt      # your own text, one sequence per line

There is no hub and no data set to download, so everything is made here: a corpus of real English prose
(the docstrings and comments of the Python standard library, which every Python installation ships), a
WordPiece tokenizer trained on it, and a small BERT teacher pretrained on it from scratch. Then the
DistilBERT recipe: a 2-layer student initialised from teacher layers, distilled; and, for comparison, the
same student from the same initialisation trained for the same steps without the teacher. Every step
after the tokenizer is a real command of this repository (printed before it runs), so the output doubles
as a worked example of the README. The results table lands in <workdir>/results.md and results.json.

The steps are the methods of `Demo`, run in the order of `Demo.STEPS`; a new stage is a method plus its name
there.
"""
import argparse
import json
import math
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the library modules; every step after the tokenizer runs a repository script
from demo.data import (STDLIB_TASK, docstring_or_comment_rows, find_glue_tasks, read_corpus,  # noqa: E402
                       split_heldout, stdlib_corpus, stdlib_paragraphs, write_task_tsv)
from demo.models import train_tokenizer, write_model_configs  # noqa: E402
from demo.pipeline import Pipeline, StepFailed, optimizer_steps  # noqa: E402
from demo.results import COLUMNS, build_rows, downstream_column, measure_speed, results_markdown  # noqa: E402
from distil.preprocessing import check_text_file  # noqa: E402
from utils import UserError  # noqa: E402

# Two sizes of the same pipeline. The full one is sized for ~8-10 minutes on 2 CPU cores; the quick one only
# proves every step runs and produces a table (its numbers mean little).
PRESETS = {
    "full": {
        "max_lines": None, "vocab_size": 4000, "max_len": 128,
        "teacher": {"layers": 4, "hidden": 128, "heads": 4, "ffn": 512},
        "student_layers": [0, 3],
        "batch_size": 32,
        "teacher_epochs": 14, "teacher_lr": 1e-3,
        "student_epochs": 3, "student_lr": 5e-4,
        "eval_batch_size": 32, "speed_batches": 10, "speed_rounds": 7,
        "task_max_train": 4000, "task_epochs": 3, "task_lr": 3e-4, "task_batch_size": 32,
    },
    "quick": {  # the test suite runs it (tests/test_demo.py): the smallest that still learns a little
        "max_lines": 600, "vocab_size": 400, "max_len": 64,
        "teacher": {"layers": 4, "hidden": 32, "heads": 2, "ffn": 64},
        "student_layers": [0, 3],
        "batch_size": 16,
        "teacher_epochs": 1, "teacher_lr": 1e-3,
        "student_epochs": 1, "student_lr": 5e-4,
        "eval_batch_size": 32, "speed_batches": 2, "speed_rounds": 2,
        "task_max_train": 128, "task_epochs": 1, "task_lr": 3e-4, "task_batch_size": 32,
    },
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Offline end-to-end DistilBERT demo on the CPU.")
    parser.add_argument("--workdir", default=os.path.join(REPO, "demo_output"),
                        help="Where everything is written (default: demo_output/ in the repository). It is "
                             "cleared first if it holds a previous demo.")
    parser.add_argument("--corpus", default=None,
                        help="A text file, one sequence per line (default: the Python standard library's "
                             "docstrings and comments).")
    parser.add_argument("--quick", action="store_true",
                        help="A tiny run that only checks the pipeline (a few minutes).")
    parser.add_argument("--steps_scale", type=float, default=1.0,
                        help="Multiply the number of training epochs of every stage (rounded, at least 1).")
    parser.add_argument("--glue_dir", default=None,
                        help="Downstream stage on the GLUE tasks found in this folder (SST-2/, CoLA/, ... with "
                             "train.tsv and dev.tsv) instead of the docstring-or-comment task.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="Echo every step's output, not only its log file.")
    return parser.parse_args(argv)


def prepare_workdir(workdir):
    """A previous demo's folder is replaced; anything else that happens to be there is not deleted."""
    import shutil

    marker = os.path.join(workdir, ".distil-demo")
    if os.path.exists(workdir) and os.listdir(workdir):
        if not os.path.exists(marker):
            raise UserError(f"--workdir {workdir} is not empty and was not made by this demo; choose another folder")
        shutil.rmtree(workdir)
    os.makedirs(workdir, exist_ok=True)
    open(marker, "w").close()


class Demo:
    """The demo's state and its steps, one method each, run in order by `run`. Each step reads what the
    earlier ones left on `self` (paths, the tokenizer, evaluation results) and adds its own."""

    STEPS = ("corpus", "tokenizer", "binarize", "teacher", "extract", "distil", "baseline", "evaluate", "task_data",
             "task_teacher", "task_students", "results")

    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.preset = dict(PRESETS["quick" if args.quick else "full"])
        self.workdir = os.path.abspath(args.workdir)
        self.data = os.path.join(self.workdir, "data")
        self.runs = os.path.join(self.workdir, "runs")
        self.pipe = Pipeline(self.workdir, n_steps=len(self.STEPS), verbose=args.verbose)
        self.t_start = time.time()

    def epochs(self, epochs):
        return max(1, round(epochs * self.args.steps_scale))

    def check_inputs(self):
        """The user's inputs, before anything is written or trained (a UserError: one line, exit 2)."""
        args = self.args
        if args.corpus:
            if not os.path.isfile(args.corpus):
                raise UserError(f"--corpus {args.corpus}: no such file")
            try:
                check_text_file(args.corpus, "--corpus")
            except ValueError as exc:
                raise UserError(str(exc)) from None
        if args.glue_dir:
            if not os.path.isdir(args.glue_dir):
                raise UserError(f"--glue_dir {args.glue_dir}: no such folder")
            if not find_glue_tasks(args.glue_dir):
                raise UserError(f"--glue_dir {args.glue_dir}: no GLUE task folder (SST-2/, CoLA/, ... with "
                                "train.tsv and dev.tsv) in it")

    def run(self):
        self.check_inputs()
        prepare_workdir(self.workdir)
        print(f"Distil* demo ({'quick' if self.quick else 'full'}), interpreter {sys.executable}, "
              f"workdir {self.pipe.rel(self.workdir)}", flush=True)
        os.makedirs(self.data, exist_ok=True)
        for name in self.STEPS:
            getattr(self, name)()

    def corpus(self):
        """1. The corpus, split into training and held-out lines."""
        args, pipe = self.args, self.pipe
        pipe.begin("Corpus: " + (args.corpus if args.corpus else "Python standard library docstrings and comments"))
        lines = read_corpus(args.corpus, args.seed) if args.corpus else stdlib_corpus(args.seed)
        if self.preset["max_lines"]:
            lines = lines[:self.preset["max_lines"]]
        if len(lines) < 40:
            raise StepFailed(pipe.step_name, f"only {len(lines)} usable lines; the demo needs at least 40")
        self.train_lines, self.heldout_lines = split_heldout(lines)
        self.train_txt, self.heldout_txt = os.path.join(self.data, "train.txt"), os.path.join(self.data, "heldout.txt")
        for path, subset in ((self.train_txt, self.train_lines), (self.heldout_txt, self.heldout_lines)):
            with open(path, "w", encoding="utf-8") as f:
                f.write("\n".join(subset) + "\n")
        self.n_words = [sum(len(x.split()) for x in subset) for subset in (self.train_lines, self.heldout_lines)]
        print(f"    {len(self.train_lines):,} training lines ({self.n_words[0]:,} words), {len(self.heldout_lines):,} "
              f"held-out lines ({self.n_words[1]:,} words)\n    e.g. \"{self.train_lines[0][:110]}\"", flush=True)
        pipe.end()

    def tokenizer(self):
        """2. A WordPiece vocabulary learnt from the training lines."""
        pipe, preset = self.pipe, self.preset
        pipe.begin(f"WordPiece tokenizer ({preset['vocab_size']:,} tokens, lowercase) trained with `tokenizers`")
        self.tok_dir = os.path.join(self.workdir, "tokenizer")
        self.tok = train_tokenizer(self.train_lines, self.tok_dir, preset["vocab_size"], preset["max_len"])
        print(f"    {len(self.tok):,} tokens -> {pipe.rel(self.tok_dir)}\n    e.g. "
              f"{self.tok.tokenize(self.heldout_lines[0])[:14]}", flush=True)
        self.teacher_config, self.student_config = write_model_configs(os.path.join(self.workdir, "configs"),
                                                                       self.tok, preset)
        pipe.end()

    def binarize(self):
        """3. scripts/binarized_data.py on both splits, scripts/token_counts.py on the training one."""
        pipe = self.pipe
        pipe.begin("Binarize the text and count tokens")
        for name, txt in (("train", self.train_txt), ("heldout", self.heldout_txt)):
            pipe.run("scripts/binarized_data.py", ["--file_path", pipe.rel(txt), "--tokenizer_type", "bert",
                                                   "--tokenizer_name", pipe.rel(self.tok_dir),
                                                   "--dump_file", pipe.rel(os.path.join(self.data, name))],
                     f"03_binarize_{name}.log")
        slug = os.path.basename(self.tok_dir)
        self.train_bin, self.heldout_bin = (os.path.join(self.data, f"{n}.{slug}.bin") for n in ("train", "heldout"))
        self.counts = os.path.join(self.data, f"token_counts.{slug}.pickle")
        pipe.run("scripts/token_counts.py", ["--data_file", pipe.rel(self.train_bin), "--token_counts_dump",
                                             pipe.rel(self.counts)], "03_token_counts.log")
        pipe.end()

    def common_train_args(self):
        """Shared by every training run: one process on the CPU, an optimizer step per batch, no mid-run
        checkpoints (the epoch-end ones are enough for a demo). --mlm_smoothing 0 masks tokens uniformly, as
        the held-out evaluation does: the recipe's rare-token emphasis (0.7) trades frequent-word accuracy
        for rare words, which needs far more training than a demo has to pay off."""
        pipe = self.pipe
        return ["--mlm", "--alpha_clm", "0", "--mlm_smoothing", "0", "--data_file", pipe.rel(self.train_bin),
                "--token_counts", pipe.rel(self.counts),
                "--n_gpu", "0", "--batch_size", self.preset["batch_size"], "--gradient_accumulation_steps", "1",
                "--log_interval", "10", "--checkpoint_interval", "100000", "--save_total_limit", "1",
                "--seed", self.args.seed, "--force"]

    def teacher(self):
        """4. Pretrain the teacher from scratch: train.py with no teacher of its own, MLM only."""
        pipe, preset, t = self.pipe, self.preset, self.preset["teacher"]
        pipe.begin(f"Pretrain the teacher: BERT, {t['layers']} layers, hidden {t['hidden']}, MLM only (no teacher "
                   "of its own)")
        self.teacher_dir = os.path.join(self.runs, "teacher")
        # --restrict_ce_to_mask: the MLM loss only reads the masked positions, so the LM head is only run there.
        pipe.run("train.py", ["--student_type", "bert", "--student_config", pipe.rel(self.teacher_config),
                              "--tokenizer_name", pipe.rel(self.tok_dir), "--alpha_mlm", "1", "--alpha_ce", "0",
                              "--alpha_cos", "0", "--restrict_ce_to_mask",
                              "--n_epoch", self.epochs(preset["teacher_epochs"]),
                              "--learning_rate", preset["teacher_lr"], "--warmup_prop", "0.05",
                              "--weight_decay", "0.01", "--dump_path", pipe.rel(self.teacher_dir),
                              *self.common_train_args()],
                 "04_teacher.log", progress_file=os.path.join(self.teacher_dir, "metrics.jsonl"))
        pipe.end()

    def extract(self):
        """5. The student's initialisation: scripts/extract_distilbert.py from teacher layers."""
        pipe, preset = self.pipe, self.preset
        self.layers = ",".join(map(str, preset["student_layers"]))
        pipe.begin(f"Initialise a {len(preset['student_layers'])}-layer DistilBERT from teacher layers {self.layers}")
        self.student_init = os.path.join(self.workdir, "student_init.pth")
        pipe.run("scripts/extract_distilbert.py", ["--model_type", "bert", "--model_name", pipe.rel(self.teacher_dir),
                                                   "--dump_checkpoint", pipe.rel(self.student_init),
                                                   "--layers", self.layers, "--vocab_transform",
                                                   "--student_config", pipe.rel(self.student_config)],
                 "05_extract.log")
        pipe.end()

    def student_args(self):
        """Both students: same init, data, batches, schedule and steps."""
        pipe, preset = self.pipe, self.preset
        return ["--student_type", "distilbert", "--student_config", pipe.rel(self.student_config),
                "--student_pretrained_weights", pipe.rel(self.student_init),
                "--n_epoch", self.epochs(preset["student_epochs"]), "--learning_rate", preset["student_lr"],
                "--warmup_prop", "0.05", "--weight_decay", "0.01", *self.common_train_args()]

    def distil(self):
        """6. The recipe: soft targets + MLM + hidden-state cosine."""
        pipe = self.pipe
        self.distilled_dir = os.path.join(self.runs, "distilled")
        pipe.begin("Distil the student from the teacher (soft targets + MLM + hidden-state cosine)")
        out = pipe.run(
            "train.py", ["--teacher_type", "bert", "--teacher_name", pipe.rel(self.teacher_dir), "--alpha_ce", "5",
                         "--alpha_mlm", "2", "--alpha_cos", "1", "--temperature", "2",
                         "--dump_path", pipe.rel(self.distilled_dir), *self.student_args()],
            "06_distill.log", progress_file=os.path.join(self.distilled_dir, "metrics.jsonl"))
        self.steps = {"distilled": optimizer_steps(out)}
        pipe.end()

    def baseline(self):
        """7. The same student trained for the same steps on the MLM loss alone."""
        pipe = self.pipe
        self.baseline_dir = os.path.join(self.runs, "baseline")
        pipe.begin("Baseline: the same student, same steps, MLM only (no teacher)")
        out = pipe.run(
            "train.py", ["--tokenizer_name", pipe.rel(self.tok_dir), "--alpha_ce", "0", "--alpha_mlm", "1",
                         "--alpha_cos", "0", "--restrict_ce_to_mask", "--dump_path", pipe.rel(self.baseline_dir),
                         *self.student_args()],
            "07_baseline.log", progress_file=os.path.join(self.baseline_dir, "metrics.jsonl"))
        self.steps["baseline"] = optimizer_steps(out)
        if self.steps["distilled"] != self.steps["baseline"]:
            raise StepFailed(pipe.step_name, f"the students trained for different numbers of steps: {self.steps}")
        pipe.end()

    def evaluate(self):
        """8. scripts/evaluate.py on the held-out lines for the three models, then their inference speed."""
        pipe, preset = self.pipe, self.preset
        pipe.begin("Evaluate on the held-out lines (fixed seeded masking of 15% of the tokens)")
        self.evals = {}
        models = (("teacher", self.teacher_dir, "bert"), ("distilled", self.distilled_dir, "distilbert"),
                  ("baseline", self.baseline_dir, "distilbert"))
        for name, model_dir, model_type in models:
            out_json = os.path.join(self.workdir, "eval", f"{name}.json")
            vs_teacher = [] if name == "teacher" else ["--teacher", pipe.rel(self.teacher_dir), "--teacher_type", "bert"]
            pipe.run("scripts/evaluate.py", ["--model", pipe.rel(model_dir), "--model_type", model_type, *vs_teacher,
                                             "--data_file", pipe.rel(self.heldout_bin), "--batch_size",
                                             preset["eval_batch_size"], "--seed", "0", "--device", "cpu",
                                             "--output", pipe.rel(out_json)], f"08_evaluate_{name}.log")
            with open(out_json) as f:
                self.evals[name] = json.load(f)
        print(f"    inference speed: batches of {preset['eval_batch_size']} held-out sequences, "
              f"{preset['speed_rounds']} interleaved rounds (distil/evaluation.py's inference_speed)", flush=True)
        speeds = measure_speed({name: (folder, model_type) for name, folder, model_type in models}, self.heldout_bin,
                               preset["eval_batch_size"], preset["speed_batches"], preset["speed_rounds"])
        for name, speed in speeds.items():
            self.evals[name]["sequences_per_second"] = speed
        pipe.end()

    # -- downstream: fine-tune, task-distil, compare ------------------------------------------------------

    def task_data(self):
        """9. The labelled task(s): is a paragraph a docstring or a comment (from the corpus itself), or the GLUE
        tasks found in --glue_dir."""
        pipe, args = self.pipe, self.args
        self.tasks = []
        if args.glue_dir:
            pipe.begin(f"Downstream tasks: the GLUE tasks in {args.glue_dir}")
            self.tasks = [{"name": name, "train": train, "dev": dev}
                          for name, train, dev in find_glue_tasks(args.glue_dir)]
            print(f"    {', '.join(t['name'] for t in self.tasks)}; at most {self.preset['task_max_train']:,} training "
                  "examples each (--max_train_samples), whole dev sets", flush=True)
        elif args.corpus:
            pipe.begin("Downstream task: none for --corpus (give --glue_dir for GLUE tasks)")
            print("    your own text has no labels to fine-tune on: skipping the downstream stage", flush=True)
        else:
            pipe.begin("Downstream task: is a standard-library paragraph a docstring or a comment?")
            kinds = dict(stdlib_paragraphs())
            train = docstring_or_comment_rows(self.train_lines, kinds)
            dev = docstring_or_comment_rows(self.heldout_lines, kinds)  # never seen in pretraining either
            paths = {split: os.path.join(self.data, f"{STDLIB_TASK}_{split}.tsv") for split in ("train", "dev")}
            write_task_tsv(paths["train"], train)
            write_task_tsv(paths["dev"], dev)
            self.tasks = [{"name": STDLIB_TASK, "train": paths["train"], "dev": paths["dev"]}]
            majority = max(sum(1 for _, k in dev if k == kind) for kind in ("docstring", "comment")) / len(dev)
            self.task_note = (f"Downstream task: tell a docstring paragraph from a comment paragraph, trained on at "
                              f"most {self.preset['task_max_train']:,} paragraphs of the training lines, scored "
                              f"(accuracy) on the {len(dev):,} held-out ones, where always answering the majority "
                              f"class scores {majority:.1%}.")
            n_doc = sum(1 for _, k in train if k == "docstring")
            print(f"    {len(train):,} training paragraphs (at most {self.preset['task_max_train']:,} used), "
                  f"{len(dev):,} held-out; {n_doc:,} of the training ones are docstrings", flush=True)
        pipe.end()

    def task_args(self, task, model_dir, out_dir):
        """One fine-tuning run of run_glue_w_distillation.py: the same data, schedule and seed for every model."""
        pipe, preset = self.pipe, self.preset
        n_steps = math.ceil(preset["task_max_train"] / preset["task_batch_size"]) * self.epochs(preset["task_epochs"])
        return ["--task_name", task["name"], "--train_file", pipe.rel(task["train"]), "--validation_file",
                pipe.rel(task["dev"]), "--model_name_or_path", pipe.rel(model_dir), "--output_dir", pipe.rel(out_dir),
                "--do_train", "--do_eval", "--max_train_samples", preset["task_max_train"],
                "--max_seq_length", preset["max_len"], "--per_gpu_train_batch_size", preset["task_batch_size"],
                "--per_gpu_eval_batch_size", 64, "--learning_rate", preset["task_lr"], "--weight_decay", "0.01",
                "--warmup_steps", max(1, round(0.06 * n_steps)),
                "--num_train_epochs", self.epochs(preset["task_epochs"]),
                "--logging_steps", 20, "--save_steps", 0, "--seed", self.args.seed, "--no_cuda",
                "--overwrite_output_dir", "--cache_dir", pipe.rel(os.path.join(self.workdir, "cache"))]

    def task_run_dir(self, role, task):
        return os.path.join(self.runs, f"{task['name']}_{role}")

    def task_teacher(self):
        """10. Fine-tune the teacher on each task (run_glue_w_distillation.py, no teacher of its own)."""
        pipe = self.pipe
        pipe.begin("Fine-tune the teacher on the downstream task" + ("s" if len(self.tasks) > 1 else ""))
        if not self.tasks:
            print("    skipped: no downstream task", flush=True)
        for task in self.tasks:
            out = self.task_run_dir("teacher", task)
            pipe.run("run_glue_w_distillation.py", self.task_args(task, self.teacher_dir, out),
                     f"10_{task['name']}_teacher.log", progress_file=os.path.join(out, "metrics.jsonl"))
        pipe.end()

    def task_students(self):
        """11. Task-distil the distilled student from the fine-tuned teacher; fine-tune the baseline student alone
        (same data, schedule, seed); then scripts/downstream_table.py."""
        pipe = self.pipe
        pipe.begin("Task-distil the distilled student from the fine-tuned teacher; fine-tune the baseline alone")
        self.downstream = None
        if not self.tasks:
            print("    skipped: no downstream task", flush=True)
            return pipe.end()
        for task in self.tasks:
            teacher = self.task_run_dir("teacher", task)
            for role, model_dir, extra in (
                    ("distilled", self.distilled_dir, ["--teacher_name_or_path", pipe.rel(teacher), "--alpha_ce", "0.5",
                                                       "--alpha_task", "0.5", "--temperature", "2"]),
                    ("baseline", self.baseline_dir, [])):
                out = self.task_run_dir(role, task)
                pipe.run("run_glue_w_distillation.py", self.task_args(task, model_dir, out) + extra,
                         f"11_{task['name']}_{role}.log", progress_file=os.path.join(out, "metrics.jsonl"))
        self.downstream_prefix = os.path.join(self.workdir, "downstream")
        folders = {role: [pipe.rel(self.task_run_dir(role, t)) for t in self.tasks]
                   for role in ("teacher", "distilled", "baseline")}
        pipe.run("scripts/downstream_table.py",
                 ["--teacher", "teacher (BERT), fine-tuned", *folders["teacher"],
                  "--student", "distilled student, task-distilled", *folders["distilled"],
                  "--student", "baseline student, fine-tuned alone", *folders["baseline"],
                  "--output", pipe.rel(self.downstream_prefix), "--no_speed"], "11_downstream_table.log")
        with open(self.downstream_prefix + ".json") as f:
            self.downstream = json.load(f)
        pipe.end()

    def results(self):
        """12. The table, results.md and results.json."""
        pipe, preset, evals = self.pipe, self.preset, self.evals
        pipe.begin("Results")
        n_student_layers = len(preset["student_layers"])
        rows = build_rows(evals, {"teacher": preset["teacher"]["layers"], "distilled": n_student_layers,
                                  "baseline": n_student_layers}, self.downstream)
        table = results_markdown(rows, downstream_column(self.downstream) if self.downstream else None)
        chance = math.log(len(self.tok))
        with open(os.path.join(self.workdir, "logs", "04_teacher.log")) as f:
            teacher_steps = optimizer_steps(f.read())
        d, b = evals["distilled"], evals["baseline"]
        verdict = (f"The distilled student {'beats' if d['mlm_loss'] < b['mlm_loss'] else 'does NOT beat'} the "
                   f"no-teacher baseline on held-out MLM loss ({d['mlm_loss']:.3f} vs {b['mlm_loss']:.3f}); top-1 "
                   f"agreement with the teacher {d['top1_agreement']:.1%} vs {b['top1_agreement']:.1%}.")
        if self.quick:
            verdict += " (--quick: far too little training for this comparison to mean anything.)"
        notes = (f"Held-out: {len(self.heldout_lines):,} lines never seen in training, {evals['teacher']['n_tokens']:,} "
                 f"masked tokens (the same for every model). A uniform guess over the {len(self.tok):,}-token "
                 f"vocabulary scores an MLM loss of {chance:.3f}. Teacher: {teacher_steps} steps; each student: "
                 f"{self.steps['distilled']} steps of {preset['batch_size']} sequences from the same initialisation "
                 f"(teacher layers {self.layers}). Inference on the CPU, batches of {preset['eval_batch_size']} "
                 "sequences: half the layers is less than half the compute, as the embeddings and the output layer "
                 "over the whole vocabulary are a large share of such a small model.")
        downstream_md = ""
        if self.downstream:
            t, ds, bs = (r["macro"] for r in self.downstream["rows"])
            notes += ("\n\n" + getattr(self, "task_note", "Downstream: the GLUE tasks of --glue_dir.") +
                      " Each model is fine-tuned with the same data, schedule and seed (run_glue_w_distillation.py);"
                      " the distilled student also learns from the fine-tuned teacher's soft predictions (T = 2).")
            verdict += (f" Downstream, the task-distilled student scores {ds:.1f} ({ds / t:.0%} of the teacher's "
                        f"{t:.1f}), the baseline fine-tuned alone {bs:.1f} ({bs / t:.0%}).")
            with open(self.downstream_prefix + ".md") as f:
                downstream_md = "\n## Downstream (scripts/downstream_table.py)\n\n" + f.read()
        with open(os.path.join(self.workdir, "results.md"), "w") as f:
            f.write(f"# Distil* demo results ({'quick' if self.quick else 'full'})\n\n{table}\n{notes}\n\n{verdict}\n"
                    f"{downstream_md}")
        pipe.timings[pipe.step_name] = round(time.time() - pipe._t0, 1)
        args = self.args
        record = {
            "preset": "quick" if self.quick else "full", "config": preset, "steps_scale": args.steps_scale,
            "seed": args.seed, "corpus": args.corpus or "python-stdlib",
            "corpus_lines": {"train": len(self.train_lines), "heldout": len(self.heldout_lines)},
            "corpus_words": {"train": self.n_words[0], "heldout": self.n_words[1]},
            "vocab_size": len(self.tok), "chance_mlm_loss": chance,
            "steps": {"teacher": teacher_steps, **self.steps}, "rows": rows,
            "columns": COLUMNS + ([downstream_column(self.downstream)] if self.downstream else []),
            "timings_s": pipe.timings, "total_s": round(time.time() - self.t_start, 1),
            "downstream": self.downstream,
        }
        with open(os.path.join(self.workdir, "results.json"), "w") as f:
            json.dump(record, f, indent=2)
        print("\n" + table + "\n" + notes + "\n\n" + verdict + "\n" + downstream_md, flush=True)
        print(f"\nTotal {time.time() - self.t_start:.0f}s. Table: {pipe.rel(os.path.join(self.workdir, 'results.md'))}; "
              f"models and logs: {pipe.rel(self.workdir)}/", flush=True)


def main(argv=None):
    demo = Demo(parse_args(argv))
    pipe = demo.pipe
    try:
        demo.run()
        return 0
    except UserError as exc:  # the inputs, checked before anything runs
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StepFailed as exc:
        print(f"\nerror: step {pipe.step_no} ({exc.step}) failed: {exc}", file=sys.stderr)
        if exc.command:
            print(f"command: {exc.command}", file=sys.stderr)
        if exc.log:
            with open(exc.log, errors="replace") as f:
                tail = f.readlines()[-25:]
            print(f"last lines of {exc.log}:\n" + "".join("  " + line for line in tail), file=sys.stderr)
        return 1
    except Exception as exc:  # in-process steps (corpus, tokenizer, table): name the step, keep the traceback
        import traceback

        traceback.print_exc()
        print(f"\nerror: step {pipe.step_no} ({pipe.step_name}) failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
