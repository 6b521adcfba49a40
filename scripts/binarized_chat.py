"""Tokenize conversations with the tokenizer's chat template into a corpus for train.py, with a loss mask on the
assistant's tokens (docs/instruction-distillation.md).

    python scripts/binarized_chat.py --file_path data/chat.jsonl --tokenizer_name teacher/ \
        --dump_file data/chat --max_seq_length 512

writes data/chat.<tokenizer>.bin. Input: JSON Lines (or a JSON array, or a parquet file) of records with
`messages` ([{"role", "content"}, ...]) or `prompt` / `completion` (strings or message lists). Every assistant turn
of a multi-turn conversation is a target; the rest is context the models read. --train_on all trains on every
token (no mask); --text_column reads plain text records instead of conversations.
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from distil.preprocessing import TRAIN_ON, binarize_conversations  # noqa: E402
from utils import fail  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description="Binarize conversations (chat template + assistant-token mask).")
    parser.add_argument("--file_path", required=True,
                        help="Conversations: .jsonl (one record a line), .json (JSON Lines or one array) or "
                             ".parquet.")
    parser.add_argument("--tokenizer_name", required=True,
                        help="Tokenizer folder or hub name; it must have a chat template (unless --text_column).")
    parser.add_argument("--dump_file", default="data/chat", help="The dump file prefix; '.<tokenizer>.bin' is "
                                                                 "appended.")
    parser.add_argument("--max_seq_length", type=int, default=1024,
                        help="Longest conversation in tokens: a longer one is cut after its last whole assistant "
                             "turn that fits, or dropped when its first answer does not fit (both counted).")
    parser.add_argument("--train_on", default="assistant", choices=TRAIN_ON,
                        help="Which tokens the losses read: every assistant turn's (a loss mask in the corpus), "
                             "or all of them (no mask, as binarized_data.py).")
    parser.add_argument("--messages_column", default="messages",
                        help="The field holding the message list (records without it are read as "
                             "prompt / completion).")
    parser.add_argument("--text_column", default=None,
                        help="Read this field as plain text instead of conversations (each text followed by EOS, "
                             "every token trained).")
    args = parser.parse_args(argv)
    if args.max_seq_length < 12:
        fail("--max_seq_length must be at least 12 (train.py drops shorter sequences)")
    try:
        binarize_conversations(args.file_path, args.tokenizer_name, args.dump_file, args.max_seq_length,
                               train_on=args.train_on, messages_column=args.messages_column,
                               text_column=args.text_column)
    except ValueError as exc:
        fail(str(exc))


if __name__ == "__main__":
    logging.getLogger("transformers").setLevel(logging.ERROR)
    main()
