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

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lm_seqs_dataset import BinarizedCorpus, save_token_counts  # noqa: E402
from utils import fail, logger  # noqa: E402

_READ_BLOCK = 1 << 24  # tokens read from the file at once, into one reused buffer
_COUNT_BLOCK = 1 << 20  # tokens per bincount: its int64 widening then stays in cache (about 2x faster)


def count_tokens(corpus, vocab_size):
    counts = np.zeros(vocab_size, dtype=np.int64)
    buffer = np.empty(min(_READ_BLOCK, max(corpus.n_tokens, 1)), dtype=corpus.tokens.dtype)
    for lo in range(0, corpus.n_tokens, _READ_BLOCK):
        block = corpus.iter_blocks(lo, min(lo + _READ_BLOCK, corpus.n_tokens), out=buffer)
        for i in range(0, len(block), _COUNT_BLOCK):
            block_counts = np.bincount(block[i: i + _COUNT_BLOCK], minlength=vocab_size)
            if len(block_counts) > vocab_size:
                bad = int(np.flatnonzero(block_counts[vocab_size:])[0]) + vocab_size
                raise ValueError(f"{corpus.path}: token id {bad} is outside the vocabulary of {vocab_size} "
                                 f"(--vocab_size)")
            counts += block_counts
    return counts


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
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    logger.info("Counted %d tokens over %d ids in %.2fs -> %s", int(counts.sum()), vocab_size, time.time() - t0,
                args.token_counts_dump)


if __name__ == "__main__":
    logging.getLogger("transformers").setLevel(logging.ERROR)
    main()
