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
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lm_seqs_dataset import BinarizedCorpus, save_token_counts  # noqa: E402
from utils import fail, logger  # noqa: E402

_BLOCK = 1 << 20  # tokens read, widened and counted at once: the block and its widened copy stay in cache


def count_tokens(corpus, vocab_size):
    """How often each id in [0, vocab_size) occurs in the corpus, as int64 counts.

    torch.bincount over int32 ids is about 2.3x numpy's bincount, which widens every id to int64 first;
    uint16 ids widen exactly to int32, uint32 ones (ids may pass 2**31) go to int64.
    """
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    wide = np.int32 if corpus.tokens.dtype == np.uint16 else np.int64
    buffer = np.empty(min(_BLOCK, max(corpus.n_tokens, 1)), dtype=corpus.tokens.dtype)
    for lo in range(0, corpus.n_tokens, _BLOCK):
        block = corpus.iter_blocks(lo, min(lo + _BLOCK, corpus.n_tokens), out=buffer)
        block_counts = torch.bincount(torch.from_numpy(block.astype(wide)), minlength=vocab_size)
        if len(block_counts) > vocab_size:
            bad = int(torch.nonzero(block_counts[vocab_size:])[0]) + vocab_size
            raise ValueError(f"{corpus.path}: token id {bad} is outside the vocabulary of {vocab_size} "
                             f"(--vocab_size)")
        counts += block_counts
    return counts.numpy()


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
