#!/usr/bin/env python
"""Linear probe of a frozen encoder on sentence pairs: what its pair representation knows before fine-tuning.

    python experiments/pair_probe.py --train_file ../shared/data/glue/STS-B/train.tsv \\
        --dev_file ../shared/data/glue/STS-B/dev.tsv --max_train_samples 1200 \\
        --model "all-MiniLM-L6-v2" MINILM_DIR --model "3 layers" runs/minilm-3l

Each pair is encoded as the task scripts encode it (one sequence, `[CLS] a [SEP] b [SEP]`, the model's own
tokenizer), through the frozen model (AutoModel). Three features per pair: the [CLS] hidden state, the pooler
output (when the model has a pooler) and the mean of the last hidden states over the real tokens. A ridge
regression (closed form, a bias, penalty --ridge) fitted on the training pairs predicts the gold similarity of
the dev pairs; Spearman's correlation (x 100) on dev is reported per feature, with the features' mean standard
deviation (a pooler whose tanh output barely varies gives a fine-tuned head little to start from).

Why: when fine-tuning a small student on a pair-regression task fails, this separates "the encoder does not
carry the information" (the probe fails too) from "the fine-tuning recipe does not reach it" (the probe works).
Prints a markdown table; --output writes OUTPUT.md and OUTPUT.json.
"""
import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tasks.glue import read_scored_pairs  # noqa: E402
from utils import UserError, fail, load_pretrained, write_report  # noqa: E402

FEATURES = ("cls", "pooler", "mean")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", nargs=2, action="append", required=True, metavar=("NAME", "MODEL_DIR"),
                        help="A name for the table and a model folder (AutoModel loads it); repeat for each model.")
    parser.add_argument("--train_file", required=True,
                        help="Pairs the probe is fitted on: sentence1, sentence2 and a numeric label column.")
    parser.add_argument("--dev_file", required=True, help="Pairs the probe is scored on (same columns).")
    parser.add_argument("--max_train_samples", type=int, default=None,
                        help="Fit on the first N training pairs only (default: all of them).")
    parser.add_argument("--ridge", type=float, default=1.0, help="Ridge penalty on the probe's weights.")
    parser.add_argument("--max_seq_length", type=int, default=128, help="Longer pairs are truncated.")
    parser.add_argument("--batch_size", type=int, default=64, help="Pairs encoded at once.")
    parser.add_argument("--output", default=None, help="Write OUTPUT.md and OUTPUT.json (default: print only).")
    args = parser.parse_args(argv)
    if args.max_train_samples is not None and args.max_train_samples < 2:
        raise UserError(f"--max_train_samples must be at least 2, got {args.max_train_samples}")
    if args.ridge < 0:
        raise UserError(f"--ridge must be 0 or more, got {args.ridge}")
    return args


def pair_features(model, tokenizer, pairs, max_len, batch_size):
    """{feature: (n, dim) float64 array} of the pairs, encoded as one sequence each."""
    import torch

    first, second, _ = pairs
    out = {name: [] for name in FEATURES}
    with torch.no_grad():
        for i in range(0, len(first), batch_size):
            enc = tokenizer(first[i: i + batch_size], second[i: i + batch_size], padding=True, truncation=True,
                            max_length=max_len, return_tensors="pt")
            result = model(**enc)
            hidden = result.last_hidden_state  # (bs, seq, dim)
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out["cls"].append(hidden[:, 0])
            out["mean"].append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
            if getattr(result, "pooler_output", None) is not None:
                out["pooler"].append(result.pooler_output)
    return {name: torch.cat(rows).double().numpy() for name, rows in out.items() if rows}


def ridge_fit_predict(x_train, y_train, x_dev, penalty):
    """Dev predictions of a ridge regression with an unpenalised bias, fitted in closed form."""
    import numpy as np

    mean_x, mean_y = x_train.mean(0), y_train.mean()
    xc = x_train - mean_x
    weights = np.linalg.solve(xc.T @ xc + penalty * np.eye(xc.shape[1]), xc.T @ (y_train - mean_y))
    return (x_dev - mean_x) @ weights + mean_y


def probe(folder, train, dev, args):
    """{feature: {'spearman': ..., 'feature_std': ...}} of one frozen model."""
    import numpy as np
    from scipy import stats
    from transformers import AutoModel, AutoTokenizer

    model = load_pretrained(lambda: AutoModel.from_pretrained(folder), "--model", folder, "a model").eval()
    tokenizer = load_pretrained(lambda: AutoTokenizer.from_pretrained(folder), "--model", folder, "a tokenizer")
    f_train = pair_features(model, tokenizer, train, args.max_seq_length, args.batch_size)
    f_dev = pair_features(model, tokenizer, dev, args.max_seq_length, args.batch_size)
    y_train, y_dev = np.asarray(train[2]), np.asarray(dev[2])
    return {name: {"spearman": 100 * float(stats.spearmanr(ridge_fit_predict(f_train[name], y_train, f_dev[name],
                                                                              args.ridge), y_dev)[0]),
                   "feature_std": float(f_train[name].std(0).mean())}
            for name in f_train}


def main(argv=None):
    args = parse_args(argv)
    for name, folder in args.model:
        if not os.path.isdir(folder):
            raise UserError(f"--model {name} {folder}: no such folder")
    train = read_scored_pairs(args.train_file, "--train_file")
    if args.max_train_samples is not None:
        train = tuple(column[: args.max_train_samples] for column in train)
    dev = read_scored_pairs(args.dev_file, "--dev_file")
    rows = [{"model": name, "folder": folder, "features": probe(folder, train, dev, args)}
            for name, folder in args.model]
    lines = [f"Frozen-encoder ridge probe: fitted on {len(train[2])} pairs of {os.path.basename(args.train_file)}, "
             f"Spearman on {len(dev[2])} pairs of {os.path.basename(args.dev_file)} (feature std in brackets)", "",
             "| Model | " + " | ".join(FEATURES) + " |", "|:---|" + "---:|" * len(FEATURES)]
    for row in rows:
        cells = [f"{row['features'][f]['spearman']:.1f} ({row['features'][f]['feature_std']:.3f})"
                 if f in row["features"] else "-" for f in FEATURES]
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.output:
        write_report(args.output, text, {"train_file": args.train_file, "dev_file": args.dev_file,
                                         "n_train": len(train[2]), "ridge": args.ridge, "rows": rows})
    return rows


if __name__ == "__main__":
    try:
        main()
    except UserError as exc:
        fail(str(exc))
