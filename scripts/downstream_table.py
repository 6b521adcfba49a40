#!/usr/bin/env python
"""The Distil* README's downstream table: one column per task, macro score, size, speed, share of the teacher.

    python scripts/downstream_table.py --output results/table \\
        --teacher "BERT-base" runs/bert_cola runs/bert_sst2 runs/bert_squad \\
        --student "DistilBERT" runs/distil_cola runs/distil_sst2 runs/distil_squad \\
        --student "DistilBERT, fine-tuned alone" runs/alone_cola runs/alone_sst2 runs/alone_squad

Each folder is the --output_dir of a run_glue_w_distillation.py / run_squad_w_distillation.py evaluation (its
eval_results.json; run_ner_w_distillation.py's too). Prints the markdown table and writes OUTPUT.md and
OUTPUT.json. The macro score is the mean of the classification / regression task scores a model has (each
task's score is the mean of its GLUE metrics), with and without WNLI when WNLI is there; SQuAD (EM / F1) and
each NER task (entity F1, named by its --task_name) are their own columns, outside the macro, as in the README.
"share" is a student's macro score over the teacher's on the same tasks (and F1 over F1 for SQuAD and NER).
Parameters count the encoder without its task head; speed is forward passes of the encoder on one fixed batch
of random tokens (--speed_batch_size x --speed_seq_len), median of --speed_rounds rounds, all models
interleaved so that machine load affects them alike.
"""
import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tasks.glue import GLUE_ORDER, get_task  # noqa: E402
from utils import UserError, fail, write_report  # noqa: E402

SQUAD_TASKS = ("squad", "squad_v2")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", nargs="+", required=True, metavar=("NAME", "RUN_DIR"),
                        help="The teacher's name, then its run folders (one per task).")
    parser.add_argument("--student", nargs="+", action="append", default=[], metavar=("NAME", "RUN_DIR"),
                        help="A student's name, then its run folders; repeat for each student.")
    parser.add_argument("--output", default=None, help="Write OUTPUT.md and OUTPUT.json.")
    parser.add_argument("--no_speed", action="store_true", help="Skip the speed measurement.")
    parser.add_argument("--speed_batch_size", type=int, default=32)
    parser.add_argument("--speed_seq_len", type=int, default=128)
    parser.add_argument("--speed_batches", type=int, default=5)
    parser.add_argument("--speed_rounds", type=int, default=3)
    return parser.parse_args(argv)


def read_model(spec, role):
    """{"name", "results": {task: eval record}, "model": a model folder} from NAME DIR... ."""
    if len(spec) < 2:
        raise UserError(f"--{role} needs a name and at least one run folder, got {' '.join(spec)!r}")
    name, folders = spec[0], spec[1:]
    results = {}
    for folder in folders:
        path = folder if folder.endswith(".json") else os.path.join(folder, "eval_results.json")
        try:
            with open(path) as f:
                record = json.load(f)
            task = record["task"]
            float(record["score"])
        except FileNotFoundError:
            raise UserError(f"--{role} {name}: {path} does not exist (was the run evaluated with --do_eval?)") from None
        except (ValueError, KeyError, TypeError):
            raise UserError(f"--{role} {name}: {path} is not an eval_results.json of the task scripts") from None
        if task in results:
            raise UserError(f"--{role} {name}: two results for the task {task} ({results[task]['_path']} and {path})")
        results[task] = dict(record, _path=path)
    model = next((r["model"] for r in results.values() if r.get("model") and os.path.isdir(r["model"])), None)
    return {"name": name, "results": results, "model": model}


def task_order(models):
    """(classification / regression tasks: GLUE order then tasks of your own, SQuAD tasks, NER tasks)."""
    tasks = {t for m in models for t in m["results"]}
    ner = sorted({t for m in models for t, r in m["results"].items() if r.get("task_type") == "ner"})
    glue = [t for t in GLUE_ORDER if t in tasks]
    squad = [t for t in SQUAD_TASKS if t in tasks]
    own = sorted(tasks - set(glue) - set(squad) - set(ner))
    return glue + own, squad, ner


def macro(results, tasks):
    scores = [results[t]["score"] for t in tasks if t in results]
    return sum(scores) / len(scores) if scores and len(scores) == len(tasks) else None


def encoder_size_and_speed(models, args):
    """{model name: (parameters, sequences/s)}: encoders only, one fixed random batch, interleaved rounds."""
    import torch
    from transformers import AutoModel, logging as hf_logging

    from distil.evaluation import count_parameters

    from tqdm import tqdm

    hf_logging.set_verbosity_error()  # the load report lists the task heads AutoModel leaves out: expected
    hf_logging.disable_progress_bar()  # one bar for the whole measurement, below
    named = [m for m in models if m["model"] is not None]
    timed = 0 if args.no_speed else len(named) * (1 + args.speed_rounds)  # a warm-up, then the rounds
    bar = tqdm(total=len(named) + timed, desc="Encoders: load", unit="step", mininterval=2)
    encoders = {}
    for m in named:
        encoders[m["name"]] = AutoModel.from_pretrained(m["model"]).eval()
        bar.update(1)
    out = {name: [count_parameters(enc), None] for name, enc in encoders.items()}
    if args.no_speed or not encoders:
        bar.close()
        return out
    bar.set_description("Encoders: time")
    vocab = min(enc.config.vocab_size for enc in encoders.values())
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (args.speed_batch_size, args.speed_seq_len), generator=generator)
    mask = torch.ones_like(ids)
    times = {name: [] for name in encoders}
    with torch.inference_mode():
        for enc in encoders.values():  # warm-up: allocator, kernel choice
            enc(input_ids=ids, attention_mask=mask)
            bar.update(1)
        for _ in range(args.speed_rounds):
            for name, enc in encoders.items():
                start = time.perf_counter()
                for _ in range(args.speed_batches):
                    enc(input_ids=ids, attention_mask=mask)
                times[name].append(time.perf_counter() - start)
                bar.update(1)  # between timings, outside the timed span
    bar.close()
    for name in encoders:
        out[name][1] = args.speed_batches * args.speed_batch_size / statistics.median(times[name])
    return out


def build_table(teacher, students, sizes):
    """Rows (dicts) for the teacher then each student; shares against the teacher on the same tasks."""
    models = [teacher] + students
    tasks, squad, ner = task_order(models)
    no_wnli = [t for t in tasks if t != "wnli"]
    rows = []
    t_speed = (sizes.get(teacher["name"]) or [None, None])[1]
    for m in models:
        res = m["results"]
        params, speed = sizes.get(m["name"], (None, None))
        row = {"model": m["name"], "parameters": params, "inference_seq_per_s": speed,
               "speedup": speed / t_speed if speed and t_speed else None,
               "scores": {t: res[t]["score"] for t in tasks if t in res},
               "metrics": {t: res[t]["metrics"] for t in tasks + squad + ner if t in res},
               "macro": macro(res, tasks), "macro_without_wnli": macro(res, no_wnli) if "wnli" in tasks else None}
        for t in squad:
            if t in res:
                row[t] = {"exact": res[t]["metrics"]["exact"], "f1": res[t]["metrics"]["f1"]}
        for t in ner:
            if t in res:
                row[t] = {"f1": res[t]["score"]}  # entity F1, in percent
        if m is not teacher:
            both = [t for t in tasks if t in res and t in teacher["results"]]  # the tasks both have
            t_macro, s_macro = macro(teacher["results"], both), macro(res, both)
            row["share_of_teacher"] = s_macro / t_macro if s_macro is not None and t_macro else None
            for t in squad:
                if t in res and t in teacher["results"]:
                    row[f"{t}_share_of_teacher"] = res[t]["metrics"]["f1"] / teacher["results"][t]["metrics"]["f1"]
            for t in ner:
                if t in res and t in teacher["results"] and teacher["results"][t]["score"]:
                    row[f"{t}_share_of_teacher"] = res[t]["score"] / teacher["results"][t]["score"]
        rows.append(row)
    return {"tasks": tasks, "squad_tasks": squad, "ner_tasks": ner, "teacher": teacher["name"], "rows": rows}


def _display(task):
    glue = get_task(task)
    return glue.display if glue else task


def _f(value, spec, suffix=""):
    return "-" if value is None else f"{value:{spec}}{suffix}"


def markdown(table):
    tasks, squad, ner = table["tasks"], table["squad_tasks"], table["ner_tasks"]
    has_wnli = "wnli" in tasks
    timed = any(row["inference_seq_per_s"] for row in table["rows"])  # not with --no_speed
    head = ["Model", "Parameters"] + (["Inference seq/s", "Speed-up"] if timed else [])
    head += ["Macro-score"] if tasks else []
    head += ["Macro w/o WNLI"] if has_wnli else []
    head += [_display(t) for t in tasks] + [f"{'SQuAD v2.0' if t == 'squad_v2' else 'SQuAD'} EM/F1" for t in squad]
    head += [f"{'NER' if t == 'ner' else t} entity F1" for t in ner]
    head += ["Share of teacher"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([":---"] + ["---:"] * (len(head) - 1)) + "|"]
    for row in table["rows"]:
        cells = [row["model"], _f(row["parameters"], ",d")]
        cells += [_f(row["inference_seq_per_s"], ".1f"), _f(row["speedup"], ".2f", "x")] if timed else []
        cells += [_f(row["macro"], ".1f")] if tasks else []
        cells += [_f(row["macro_without_wnli"], ".1f")] if has_wnli else []
        cells += [_f(row["scores"].get(t), ".1f") for t in tasks]
        cells += [f"{row[t]['exact']:.1f}/{row[t]['f1']:.1f}" if t in row else "-" for t in squad]
        cells += [f"{row[t]['f1']:.1f}" if t in row else "-" for t in ner]
        shares = []
        if "share_of_teacher" in row and row["share_of_teacher"] is not None:
            shares.append(f"{100 * row['share_of_teacher']:.0f}% (macro)")
        shares += [f"{100 * row[f'{t}_share_of_teacher']:.0f}% (SQuAD F1)"
                   for t in squad if f"{t}_share_of_teacher" in row]
        shares += [f"{100 * row[f'{t}_share_of_teacher']:.0f}% ({'NER' if t == 'ner' else t} F1)"
                   for t in ner if f"{t}_share_of_teacher" in row]
        cells.append(", ".join(shares) if shares else "-" if "share_of_teacher" in row else "(teacher)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    try:
        teacher = read_model(args.teacher, "teacher")
        students = [read_model(spec, "student") for spec in args.student]
        names = [m["name"] for m in [teacher] + students]
        if len(set(names)) != len(names):
            raise UserError("two models have the same name; name each --teacher / --student differently")
        if args.output and os.path.isdir(args.output):
            raise UserError(f"--output {args.output} is a directory; give a path prefix (OUTPUT.md, OUTPUT.json)")
    except UserError as error:
        fail(str(error))
    table = build_table(teacher, students, encoder_size_and_speed([teacher] + students, args))
    text = markdown(table)
    print(text, end="")
    if args.output:
        write_report(args.output, text, table)


if __name__ == "__main__":
    main()
