#!/usr/bin/env python
"""Unlabelled English text for general distillation, one passage per line, from plain text files, SQuAD
contexts and GLUE sentences (labels and questions dropped), for scripts/binarized_data.py.

    python experiments/unlabelled_text.py --output data/unlabelled.txt \\
        --text ../shared/data/wikitext-2/valid.txt ../shared/data/wikitext-2/test.txt \\
        --squad ../shared/data/squad/train-from-dev-v1.1.json --glue ../shared/data/glue/SST-2/train.tsv

Paragraphs are cut at sentence ends into passages of at most --max_words words (a longer sentence is a
passage of its own), the length of the sentences and short paragraphs the downstream tasks read; WikiText
headings (`= Title =`) and blank lines are dropped; repeated passages are written once. Use training files
only: text from a set the models are scored on would leak into the student.
"""
import argparse
import itertools
import json
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tasks.glue import load_file  # noqa: E402
from utils import UserError, fail, user_input  # noqa: E402

SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
GLUE_TEXT_COLUMNS = ("sentence", "sentence1", "sentence2", "question1", "question2", "premise", "hypothesis")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="The text file to write (one passage per line).")
    parser.add_argument("--text", nargs="*", default=[], help="Plain text files, one paragraph per line.")
    parser.add_argument("--squad", nargs="*", default=[], help="SQuAD JSON files: their contexts are taken.")
    parser.add_argument("--glue", nargs="*", default=[],
                        help="GLUE-style tsv / csv / json-lines files: their sentence columns are taken.")
    parser.add_argument("--max_words", type=int, default=64, help="Longest passage, in words.")
    parser.add_argument("--max_passages", type=int, default=None,
                        help="Stop after this many passages (the first ones, in the order the inputs are given).")
    return parser.parse_args(argv)


def passages(paragraph, max_words):
    """The paragraph cut at sentence ends into runs of sentences of at most max_words words."""
    out, current = [], []
    for sentence in SENTENCE_END.split(paragraph.strip()):
        words = sentence.split()
        if current and len(current) + len(words) > max_words:
            out.append(" ".join(current))
            current = []
        current += words
    if current:
        out.append(" ".join(current))
    return out


def paragraphs(args):
    """Every paragraph of every input, in the order given."""
    for path in args.text:
        with user_input("--text"), open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line and not (line.startswith("=") and line.endswith("=")):  # WikiText headings
                    yield line
    for path in args.squad:
        with user_input("--squad"), open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise UserError(f"--squad {path}: not a SQuAD file (no 'data' list)")
        for article in data["data"]:
            for paragraph in article.get("paragraphs", []):
                yield paragraph["context"]
    for path in args.glue:
        data = load_file(path, "--glue")
        columns = [c for c in GLUE_TEXT_COLUMNS if c in data.column_names]
        if not columns:
            raise UserError(f"--glue {path}: no sentence column (columns: {', '.join(data.column_names)})")
        for column in columns:
            yield from (text for text in data[column] if text and text.strip())


def unique_passages(args):
    """Every passage of every input, each once, in the order given."""
    seen = set()
    for paragraph in paragraphs(args):
        for passage in passages(paragraph, args.max_words):
            if passage not in seen:
                seen.add(passage)
                yield passage


def main(argv=None):
    args = parse_args(argv)
    if args.max_words < 1 or (args.max_passages is not None and args.max_passages < 1):
        raise UserError("--max_words and --max_passages must be at least 1")
    if not (args.text or args.squad or args.glue):
        raise UserError("give some input: --text, --squad or --glue")
    n_passages = n_words = 0
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as out:
        for passage in itertools.islice(unique_passages(args), args.max_passages):
            n_passages += 1
            n_words += len(passage.split())
            out.write(passage + "\n")
    print(f"{args.output}: {n_passages} passages, {n_words} words")


if __name__ == "__main__":
    try:
        main()
    except UserError as exc:
        fail(str(exc))
