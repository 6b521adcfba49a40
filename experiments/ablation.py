#!/usr/bin/env python
"""What distillation buys with a real pretrained teacher: the paper's ablation in miniature, rerunnable.

    pip install gguf accelerate          # only to read a .gguf teacher
    python experiments/ablation.py --teacher "$GGUF" --train_text train.txt --eval_text heldout.txt \
        --workdir runs/ablation          # GGUF: the file's path, as docs/real-teacher.md prints it

Arms, each trained with the same data, order (per seed), steps and learning rate:
    distilled          student from teacher layers, --alpha_ce 5 --alpha_clm 2 --alpha_cos 1
    no teacher         the same student, --alpha_clm 2 alone
    distilled, random  the same architecture from random init, the distilled run's losses
for every seed, plus the teacher and the untrained student. Every model is scored by scripts/evaluate.py on
the same held-out sequences, cut at the same length: perplexity, KL(teacher || student) and top-1 agreement.
The table gives each arm's mean, standard deviation and range over the seeds, and the paired difference
(distilled - no teacher) seed by seed: the same seed means the same batches in the same order.

Each step is a repository script run as a subprocess, its command printed and its log kept under
workdir/logs; a finished step (its output present) is skipped, so an interrupted ablation resumes by running
the same command again. --dry_run prints the commands and the run's size without running anything.
"""
import argparse
import json
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from demo.protocol import Protocol, default_layers, main_of, spread, teacher_depth  # noqa: E402

ARMS = {
    "distilled": {"init": "teacher_layers", "alpha": {"ce": 5, "clm": 2, "cos": 1}},
    "no_teacher": {"init": "teacher_layers", "alpha": {"ce": 0, "clm": 2, "cos": 0}},
    "distilled_random_init": {"init": "random", "alpha": {"ce": 5, "clm": 2, "cos": 1}},
}
METRICS = ("perplexity", "kl_teacher_student", "top1_agreement")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Distillation ablation with a real causal LM teacher.")
    parser.add_argument("--teacher", required=True,
                        help="The teacher: a .gguf file (converted once with scripts/convert_gguf.py) or a model "
                             "folder of a causal LM with its tokenizer.")
    parser.add_argument("--train_text", required=True, help="Training text, one sequence per line.")
    parser.add_argument("--eval_text", required=True, help="Held-out text, one sequence per line.")
    parser.add_argument("--workdir", required=True, help="Where the data, models, logs and the table go.")
    parser.add_argument("--layers", default=None,
                        help="Teacher layers the student keeps (default: the first ceil(n/2) and the last "
                             "floor(n/2) of n = half the teacher's depth; 0-7 and 23-29 for a 30-layer teacher).")
    parser.add_argument("--seeds", default="0,1,2", help="Comma-separated seeds, one run per arm and seed.")
    parser.add_argument("--arms", default=",".join(ARMS),
                        help=f"Comma-separated arms to train (default all: {', '.join(ARMS)}).")
    parser.add_argument("--max_steps", type=int, default=150, help="Optimizer steps of every training run.")
    parser.add_argument("--batch_size", type=int, default=4, help="Sequences per batch.")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=2, help="Batches per optimizer step.")
    parser.add_argument("--max_seq_length", type=int, default=128,
                        help="Training and evaluation sequences are cut into chunks of at most this many tokens.")
    parser.add_argument("--learning_rate", type=float, default=5e-4, help="Peak learning rate of every run.")
    parser.add_argument("--warmup_prop", type=float, default=0.05, help="Linear warmup proportion.")
    parser.add_argument("--temperature", type=float, default=2.0, help="Distillation temperature.")
    parser.add_argument("--eval_batches", type=int, default=12,
                        help="Held-out batches of 8 sequences scored per model (the first ones of --eval_text).")
    parser.add_argument("--start_token", default="<|endoftext|>",
                        help="Token before each line (binarized_data.py --start_token; 'auto': the tokenizer's "
                             "own choice).")
    parser.add_argument("--end_token", default="<|endoftext|>", help="Token after each line ('auto', 'none', ...).")
    parser.add_argument("--dry_run", action="store_true", help="Print the commands and the run's size; run nothing.")
    parser.add_argument("--verbose", action="store_true", help="Show every step's output.")
    return parser.parse_args(argv)


def results_table(records, seeds):
    """Markdown: one row per model or arm (mean +- std [min, max] over the seeds, the value alone for one
    seed), then the paired gain.

    records: {"teacher": eval record, "student_init": eval record, (arm, seed): eval record plus
    "train_seconds"}."""
    lines = ["| model | runs | perplexity | KL(teacher \u2016 student) | top-1 agreement | train s / run |",
             "|---|---|---|---|---|---|"]
    for name in ("teacher", "student_init"):
        if name in records:
            r = records[name]
            lines.append(f"| {name} | 1 | {r['perplexity']:.2f} | {r.get('kl_teacher_student', 0):.3f} | "
                         f"{r.get('top1_agreement', 1):.3f} | - |")
    for arm in ARMS:
        runs = [records[(arm, s)] for s in seeds if (arm, s) in records]
        if not runs:
            continue
        cells = [spread([r[metric] for r in runs], digits) for metric, digits in zip(METRICS, (2, 3, 3))]
        seconds = statistics.fmean(r.get("train_seconds", math.nan) for r in runs)
        lines.append(f"| {arm} | {len(runs)} | {' | '.join(cells)} | {seconds:.0f} |")
    paired = [records[("no_teacher", s)]["perplexity"] - records[("distilled", s)]["perplexity"]
              for s in seeds if ("distilled", s) in records and ("no_teacher", s) in records]
    if paired:
        lines.append("")
        lines.append(f"Paired gain of distillation (no_teacher - distilled perplexity, same seed): "
                     f"{spread(paired, 2)} over {len(paired)} seed(s).")
    return "\n".join(lines)


class Ablation(Protocol):
    ARMS = ARMS

    def __init__(self, args):
        super().__init__(args, fixed_steps=6, steps_per_run=2)  # teacher, 2 x binarize, extract, 2 references

    def check(self):
        self.check_common(("teacher", "train_text", "eval_text"),
                          ("max_steps", "batch_size", "gradient_accumulation_steps", "eval_batches"))

    def run(self):
        a = self.args
        teacher = os.path.abspath(a.teacher)
        if teacher.lower().endswith(".gguf"):
            folder = self.path("teacher")
            self.step("Convert the GGUF teacher", self.path("teacher", "config.json"), "scripts/convert_gguf.py",
                      ["--gguf_file", teacher, "--dump_folder", folder], "convert.log")
            teacher = folder
        else:
            self.pipe.begin("Teacher folder")
            print(f"    {self.pipe.rel(teacher)}", flush=True)
            self.pipe.end()
        framing = []
        for side in ("start", "end"):
            value = getattr(a, f"{side}_token")
            if value != "auto":
                framing += [f"--{side}_token", value]
        data = {}
        for split, text in (("train", a.train_text), ("eval", a.eval_text)):
            prefix = self.path("data", split)
            data[split] = f"{prefix}.{os.path.basename(teacher)}.bin"
            self.step(f"Binarize {split} text", data[split], "scripts/binarized_data.py",
                      ["--file_path", text, "--tokenizer_type", "auto", "--tokenizer_name", teacher,
                       "--dump_file", prefix, *framing], f"binarize_{split}.log")
        student_init = self.path("student_init")
        depth = teacher_depth(teacher)
        layers = a.layers or (",".join(map(str, default_layers(depth))) if depth else "<half the teacher's depth>")
        self.step("Student from teacher layers " + layers, self.path("student_init", "config.json"),
                  "scripts/extract.py", ["--model_type", "auto", "--model_name", teacher, "--layers", layers,
                                         "--dump_folder", student_init, "--eval_data_file", data["eval"],
                                         "--eval_max_seq_length", a.max_seq_length], "extract.log")

        records = {}
        for name, model in (("teacher", teacher), ("student_init", student_init)):
            record = self._evaluate(f"Evaluate {name}", model, teacher if name != "teacher" else None, data["eval"],
                                    f"eval_{name}")
            if record is not None:
                records[name] = record
        for seed in self.seeds:
            for arm in self.arms:
                spec = ARMS[arm]
                run = self.path("runs", f"{arm}_seed{seed}")
                seconds = self._train(arm, spec, seed, run, teacher, student_init, data["train"])
                record = self._evaluate(f"Evaluate {arm} seed {seed}", run, teacher, data["eval"],
                                        f"eval_{arm}_seed{seed}")
                if record is not None:
                    records[(arm, seed)] = dict(record, train_seconds=seconds)
        if a.dry_run:
            return None
        table = results_table(records, self.seeds)
        self.write_results("ablation", layers, records, table)
        return table

    def _train(self, arm, spec, seed, run, teacher, student_init, data):
        a = self.args
        init = ["--student_pretrained_weights", student_init] if spec["init"] == "teacher_layers" else []
        alphas = [x for name, value in spec["alpha"].items() for x in (f"--alpha_{name}", value)]
        args = ["--student_type", "auto", "--teacher_type", "auto", "--student_config",
                os.path.join(student_init, "config.json"), *init, "--teacher_name", teacher, "--tokenizer_name",
                teacher, *alphas, "--data_file", data, "--dump_path", run, "--force", "--n_gpu", "0",
                "--seed", seed, "--max_steps", a.max_steps, "--batch_size", a.batch_size,
                "--gradient_accumulation_steps", a.gradient_accumulation_steps, "--max_seq_length", a.max_seq_length,
                "--learning_rate", a.learning_rate, "--warmup_prop", a.warmup_prop, "--temperature", a.temperature,
                "--log_interval", 10, "--checkpoint_interval", 100_000]
        return self.timed_train(arm, seed, run, args, "ablation_seconds.json")

    def _evaluate(self, name, model, teacher, data, tag):
        a = self.args
        out = self.path("eval", f"{tag}.json")
        vs_teacher = ["--teacher", teacher, "--teacher_type", "auto"] if teacher else []
        self.step(name, out, "scripts/evaluate.py",
                  ["--model", model, "--model_type", "auto", *vs_teacher, "--data_file", data, "--batch_size", 8,
                   "--max_batches", a.eval_batches, "--max_seq_length", a.max_seq_length, "--device", "cpu",
                   "--output", out], f"{tag}.log")
        if not os.path.exists(out):
            return None
        with open(out) as f:
            return json.load(f)


def main(argv=None):
    return main_of(Ablation, parse_args(argv))


if __name__ == "__main__":
    main()
