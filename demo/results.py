"""The demo's results table: one row per model (held-out MLM loss, agreement with the teacher, size, speed, the
downstream score), and the inference speed measured with the models taking turns (scripts/demo.py).
"""
import math

COLUMNS = ["model", "layers", "parameters", "held-out MLM loss", "pseudo-perplexity", "KL to teacher",
           "top-1 agreement with teacher", "inference seq/s", "speed-up vs teacher"]


def _fmt(value, spec):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def results_markdown(rows, downstream_column=None):
    columns = COLUMNS + ([downstream_column] if downstream_column else [])
    lines = ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    for r in rows:
        cells = [r["label"], str(r["layers"]), f"{r['parameters']:,}", _fmt(r["mlm_loss"], ".3f"),
                 _fmt(r["pseudo_perplexity"], ".1f"), _fmt(r["kl_to_teacher"], ".3f"),
                 _fmt(r["top1_agreement"], ".1%"), _fmt(r["sequences_per_second"], ".0f"),
                 _fmt(r["speedup_vs_teacher"], ".2f") + ("x" if r["speedup_vs_teacher"] else "")]
        if downstream_column:
            cells.append(_fmt(r.get("downstream_score"), ".1f"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def measure_speed(model_dirs, data_file, batch_size, n_batches, rounds):
    """Sequences/s of each model on the held-out batches, with evaluation.inference_speed.

    The models take turns, round after round, and each keeps its median: on a shared machine a burst of
    load then slows every model alike instead of whichever was being timed (two identical students timed
    one after the other easily differ by 10%).
    """
    import logging
    import statistics

    import torch
    import transformers

    from distil.evaluation import inference_speed
    from lm_seqs_dataset import BinarizedCorpus, LmSeqsDataset
    from distil.models import max_input_size, model_classes
    from utils import special_token_ids

    logging.getLogger("distil").setLevel(logging.WARNING)
    transformers.utils.logging.disable_progress_bar()
    models = {}
    for name, (folder, model_type) in model_dirs.items():
        models[name] = model_classes(model_type)[1].from_pretrained(folder).eval()
    teacher_folder, teacher_type = model_dirs["teacher"]
    tokenizer = model_classes(teacher_type)[2].from_pretrained(teacher_folder)
    max_len = min(max_input_size(m.config, tokenizer) for m in models.values())
    dataset = LmSeqsDataset(BinarizedCorpus.open(data_file), special_tok_ids=special_token_ids(tokenizer), mlm=True,
                            max_len=max_len)
    samples = {name: [] for name in models}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, model in models.items():
                samples[name].append(inference_speed(model, dataset, batch_size, "cpu", n_batches))
    return {name: statistics.median(values) for name, values in samples.items()}


def downstream_column(downstream):
    """The main table's column for the downstream scores: the task's score, or the macro score of several."""
    tasks = downstream["tasks"]
    if len(tasks) == 1:
        from tasks.glue import get_task

        task = get_task(tasks[0])
        metric = "+".join(task.metrics) if task else "accuracy"
        return f"downstream: {task.display if task else tasks[0].replace('_', ' ')} ({metric.replace('_', ' ')})"
    return f"downstream macro score ({', '.join(tasks)})"


def build_rows(evals, layers, downstream=None):
    teacher_speed = evals["teacher"]["sequences_per_second"]
    labels = {"teacher": "teacher (BERT, pretrained here)", "distilled": "distilled student (DistilBERT)",
              "baseline": "baseline student (same init, no teacher)"}
    rows = []
    for name in ("teacher", "distilled", "baseline"):
        e = evals[name]
        rows.append({
            "name": name, "label": labels[name], "layers": layers[name], "parameters": e["n_parameters"],
            "mlm_loss": e["mlm_loss"], "pseudo_perplexity": e["pseudo_perplexity"],
            "kl_to_teacher": e.get("kl_teacher_student"), "top1_agreement": e.get("top1_agreement"),
            "sequences_per_second": e["sequences_per_second"],
            "speedup_vs_teacher": e["sequences_per_second"] / teacher_speed,
        })
    # downstream_table.py's rows are teacher, task-distilled (distilled) student, baseline student, in that order.
    for row, task_row in zip(rows, downstream["rows"] if downstream else []):
        row["downstream_score"] = task_row["macro"]
    return rows


# ============================================================================================ main
