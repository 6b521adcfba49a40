"""Count how often each token id occurs in a binarized corpus (for the MLM masking probabilities).

    python scripts/token_counts.py --data_file data/binarized_text.bert-base-uncased.bin \
        --token_counts_dump data/token_counts.bert-base-uncased.pickle --vocab_size 30522

The counts are written as a NumPy .npy payload (whatever the file is called: the README's `.pickle`
names keep working); train.py also reads the original scripts' pickled lists.
"""
import argparse
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lm_seqs_dataset import BinarizedCorpus, save_token_counts  # noqa: E402
from distil.preprocessing import count_tokens  # noqa: E402
from utils import UserError, fail, logger, user_input  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description="Token counts in the data for the MLM masking probabilities.")
    parser.add_argument("--data_file", type=str, default="data/dump.bert-base-uncased.bin",
                        help="The binarized dataset.")
    parser.add_argument("--token_counts_dump", type=str, default="data/token_counts.bert-base-uncased.pickle",
                        help="The dump file.")
    parser.add_argument("--vocab_size", default=None, type=int,
                        help="Vocabulary size (default: the one recorded in the data file, else 30522).")
    args = parser.parse_args(argv)
    try:
        with user_input("--data_file"):
            corpus = BinarizedCorpus.open(args.data_file)
        recorded = corpus.metadata.get("vocab_size")
        if args.vocab_size is not None and recorded is not None and args.vocab_size != recorded:
            raise ValueError(f"--vocab_size {args.vocab_size} but {corpus.path} was binarized with a vocabulary "
                             f"of {recorded} tokens")
        vocab_size = args.vocab_size if args.vocab_size is not None else (recorded or 30522)
        if vocab_size < 1:
            raise ValueError(f"--vocab_size must be positive, got {vocab_size}")
        t0 = time.time()
        logger.info("Counting occurrences for MLM smoothing in %s (%d tokens)", corpus.path, corpus.n_tokens)
        counts = count_tokens(corpus, vocab_size)
        os.makedirs(os.path.dirname(os.path.abspath(args.token_counts_dump)), exist_ok=True)
        save_token_counts(args.token_counts_dump, counts)
    except (UserError, ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    logger.info("Counted %d tokens over %d ids in %.2fs -> %s", int(counts.sum()), vocab_size, time.time() - t0,
                args.token_counts_dump)


if __name__ == "__main__":
    logging.getLogger("transformers").setLevel(logging.ERROR)
    main()
