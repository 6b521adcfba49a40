"""Tokenize a text corpus (one sequence per line) and store the token ids, ready for train.py.

    python scripts/binarized_data.py --file_path data/dump.txt --tokenizer_type bert \
        --tokenizer_name bert-base-uncased --dump_file data/binarized_text

writes data/binarized_text.bert-base-uncased.bin (see lm_seqs_dataset.py for the format; the work is done
by preprocessing.binarize). Each line is wrapped as `[CLS] line [SEP]` (bert), `<s> line </s>` (roberta) or
`<|endoftext|> line <|endoftext|>` (gpt2); blank lines are skipped. --start_token / --end_token choose other
framing tokens, or none: an instruct/chat tokenizer's BOS and EOS are often its turn markers (<|im_start|>,
<|im_end|>), which `auto` would put around every line; its document separator (<|endoftext|>) fits a plain corpus.
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from distil.preprocessing import TOKENIZER_TYPES, binarize  # noqa: E402
from utils import UserError, fail  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description="Preprocess the data to avoid re-doing it several times by "
                                                 "(tokenization + token_to_ids).")
    parser.add_argument("--file_path", type=str, default="data/dump.txt", help="The path to the data.")
    parser.add_argument("--tokenizer_type", type=str, default="bert", choices=sorted(TOKENIZER_TYPES))
    parser.add_argument("--tokenizer_name", type=str, default="bert-base-uncased",
                        help="The tokenizer to use: a hub name or a local folder.")
    parser.add_argument("--dump_file", type=str, default="data/dump",
                        help="The dump file prefix; '.<tokenizer>.bin' is appended.")
    parser.add_argument("--batch_lines", type=int, default=10_000, help="Lines tokenized per batch.")
    parser.add_argument("--start_token", default=None,
                        help="The token put before each line instead of the --tokenizer_type's (its text, e.g. "
                             "'<|endoftext|>'), or 'none'. auto's own choice: [CLS] when the tokenizer has [CLS] and "
                             "[SEP], else BOS, else EOS.")
    parser.add_argument("--end_token", default=None,
                        help="The token put after each line instead of the --tokenizer_type's, or 'none'. auto's "
                             "own choice: [SEP] when the tokenizer has [CLS] and [SEP], else EOS.")
    args = parser.parse_args(argv)
    if args.batch_lines < 1:
        fail("--batch_lines must be at least 1")
    try:
        binarize(args.file_path, args.tokenizer_type, args.tokenizer_name, args.dump_file, args.batch_lines,
                 start_token=args.start_token, end_token=args.end_token)
    except (ValueError, UserError) as exc:
        fail(str(exc))


if __name__ == "__main__":
    logging.getLogger("transformers").setLevel(logging.ERROR)
    main()
