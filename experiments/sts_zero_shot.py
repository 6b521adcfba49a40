#!/usr/bin/env python
"""Zero-shot sentence similarity: how well an encoder's mean-pooled embeddings rank sentence pairs, untrained
on the task (what a sentence-embedding model such as all-MiniLM-L6-v2 is for).

    python experiments/sts_zero_shot.py --sts_file ../shared/data/glue/STS-B/dev.tsv --output results/sts \\
        --model "all-MiniLM-L6-v2" MINILM_DIR --model "3 layers" runs/minilm-3l

Each model folder is loaded with AutoModel and its own tokenizer; a sentence's embedding is the mean of its
last hidden states over the real tokens; a pair's prediction is the cosine of the two embeddings. Scores are
Spearman's and Pearson's correlations (x 100) with the gold similarity (the `label` column; the sentences in
`sentence1` / `sentence2`). Prints a markdown table and writes OUTPUT.md and OUTPUT.json.
"""
import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tasks.glue import read_scored_pairs  # noqa: E402
from utils import UserError, fail, load_pretrained, write_report  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", nargs=2, action="append", required=True, metavar=("NAME", "MODEL_DIR"),
                        help="A name for the table and a model folder (AutoModel loads it); repeat for each model.")
    parser.add_argument("--sts_file", required=True,
                        help="Sentence pairs with gold similarities: a tsv / csv / json-lines file with sentence1, "
                             "sentence2 and label columns (e.g. GLUE's STS-B/dev.tsv).")
    parser.add_argument("--output", default=None, help="Write OUTPUT.md and OUTPUT.json (default: print only).")
    parser.add_argument("--max_seq_length", type=int, default=128, help="Longer sentences are truncated.")
    parser.add_argument("--batch_size", type=int, default=64, help="Sentences encoded at once.")
    return parser.parse_args(argv)


def embed(model, tokenizer, sentences, max_len, batch_size):
    """(n, dim) mean of the last hidden states over each sentence's real tokens."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(sentences), batch_size):
            enc = tokenizer(sentences[i: i + batch_size], padding=True, truncation=True, max_length=max_len,
                            return_tensors="pt")
            hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (bs, seq, 1)
            out.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
    return torch.cat(out)


def score(folder, pairs, max_len, batch_size):
    """{'spearman': ..., 'pearson': ...} (x 100) of one model folder on the pairs."""
    import torch
    from scipy import stats
    from transformers import AutoModel, AutoTokenizer

    model = load_pretrained(lambda: AutoModel.from_pretrained(folder), "--model", folder, "a model").eval()
    tokenizer = load_pretrained(lambda: AutoTokenizer.from_pretrained(folder), "--model", folder, "a tokenizer")
    first, second, gold = pairs
    a, b = embed(model, tokenizer, first, max_len, batch_size), embed(model, tokenizer, second, max_len, batch_size)
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1).numpy()
    return {"spearman": 100 * float(stats.spearmanr(cosine, gold)[0]),
            "pearson": 100 * float(stats.pearsonr(cosine, gold)[0])}


def main(argv=None):
    args = parse_args(argv)
    for name, folder in args.model:
        if not os.path.isdir(folder):
            raise UserError(f"--model {name} {folder}: no such folder")
    pairs = read_scored_pairs(args.sts_file, "--sts_file")
    rows = [{"model": name, "folder": folder, **score(folder, pairs, args.max_seq_length, args.batch_size)}
            for name, folder in args.model]
    lines = [f"Zero-shot similarity on {os.path.basename(args.sts_file)} ({len(pairs[2])} pairs; cosine of "
             "mean-pooled embeddings)", "", "| Model | Spearman | Pearson |", "|:---|---:|---:|"]
    lines += [f"| {r['model']} | {r['spearman']:.1f} | {r['pearson']:.1f} |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.output:
        write_report(args.output, text, {"sts_file": args.sts_file, "n_pairs": len(pairs[2]), "rows": rows})
    return rows


if __name__ == "__main__":
    try:
        main()
    except UserError as exc:
        fail(str(exc))
