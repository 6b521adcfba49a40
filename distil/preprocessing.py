"""Preprocessing a text corpus for train.py: tokenize it into a binarized file (`binarize`), and count its
tokens for the MLM masking weights (`count_tokens`). scripts/binarized_data.py and scripts/token_counts.py
are the command lines.

Each line is wrapped as `[CLS] line [SEP]` (bert), `<s> line </s>` (roberta) or `<|endoftext|> line
<|endoftext|>` (gpt2). The input is streamed in batches of lines through the Rust tokenizer, so memory stays
flat whatever the size of the corpus; blank lines are skipped. See lm_seqs_dataset.py for the file format.
"""
import itertools
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from lm_seqs_dataset import BinarizedWriter
from utils import check_hub_name, first_line, logger, special_token_ids

# Which special tokens frame a sequence, and whether the text needs the leading space that byte-level BPE
# sees after a special token (the original joined "<s> " + line, so the first word got its space; we
# keep that but drop the stray space-token the original also produced before the closing token).
TOKENIZER_TYPES = {
    "bert": ("BertTokenizer", "cls_token", "sep_token", ""),
    "roberta": ("RobertaTokenizer", "bos_token", "sep_token", " "),
    "gpt2": ("GPT2Tokenizer", "bos_token", "eos_token", " "),
    # any other model: its own tokenizer, framed like an encoder ([CLS]/[SEP]) when it has those tokens, else
    # like a decoder (BOS, or EOS when there is no BOS, and EOS); no extra space, the tokenizer knows its rules
    "auto": ("AutoTokenizer", None, None, ""),
}


NO_TOKEN = "none"  # --start_token / --end_token value: nothing on that side of each line


def _chosen_token_id(tokenizer, text, flag):
    """The id of the single token `text` names (a chat tokenizer's <|endoftext|>, ...), None for 'none'."""
    if text == NO_TOKEN:
        return None
    token_id = tokenizer.convert_tokens_to_ids(text)
    if token_id is None or (token_id == tokenizer.unk_token_id and text != tokenizer.unk_token):
        raise ValueError(f"{flag} {text!r}: not a token of the tokenizer (give one token as it is spelled in its "
                         f"vocabulary, e.g. {tokenizer.eos_token!r}, or {NO_TOKEN!r})")
    return int(token_id)


def load_framing_tokenizer(tokenizer_type, tokenizer_name, flag="--tokenizer_name", start_token=None, end_token=None):
    """(tokenizer, start id, end id, text prefix) of a --tokenizer_type: what binarize frames each line with.

    start_token / end_token: the framing the user chose instead of the type's (a token's text, or 'none':
    the id is then None and nothing is added on that side)."""
    import transformers

    class_name, start_attr, end_attr, prefix = TOKENIZER_TYPES[tokenizer_type]
    check_hub_name(flag, tokenizer_name)
    try:
        tokenizer = getattr(transformers, class_name).from_pretrained(tokenizer_name)
    except Exception as exc:  # malformed tokenizer files fail in many ways, all the folder's fault
        raise ValueError(f"{flag} {tokenizer_name}: cannot load a {tokenizer_type} tokenizer "
                         f"({first_line(exc)})") from None
    if start_attr is None:
        if tokenizer.cls_token_id is not None and tokenizer.sep_token_id is not None:
            start_attr, end_attr = "cls_token", "sep_token"
        else:
            start_attr = "bos_token" if tokenizer.bos_token_id is not None else "eos_token"
            end_attr = "eos_token"
    start_id = getattr(tokenizer, start_attr + "_id")
    end_id = getattr(tokenizer, end_attr + "_id")
    if (start_id is None and start_token is None) or (end_id is None and end_token is None):
        raise ValueError(f"{flag} {tokenizer_name}: the tokenizer has no {start_attr}/{end_attr}; choose the "
                         "framing with --start_token / --end_token")
    if start_token is not None:
        start_id = _chosen_token_id(tokenizer, start_token, "--start_token")
    if end_token is not None:
        end_id = _chosen_token_id(tokenizer, end_token, "--end_token")
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):  # transformers 5 builds one from an empty folder
        raise ValueError(f"{flag} {tokenizer_name}: no vocabulary found, only special tokens")
    return tokenizer, start_id, end_id, prefix


def tokenizer_slug(tokenizer_name):
    """A file-name-safe name: the folder's name for a local path, owner_model for a hub id."""
    if os.path.isdir(tokenizer_name):
        return os.path.basename(os.path.normpath(os.path.abspath(tokenizer_name)))
    return tokenizer_name.strip("/").replace("/", "_")


def check_text_file(path, flag, sample_bytes=1 << 16):
    """Refuse a file that is not text (e.g. a binarized corpus or a model file given by mistake): NUL bytes, or
    more than 1% of its first 64 KiB not decodable as UTF-8. Text with a few stray bytes passes (they are
    read as U+FFFD)."""
    with open(path, "rb") as f:
        head = f.read(sample_bytes)
    text = head.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - (1 if len(head) == sample_bytes else 0)  # a character cut at the sample's end
    if b"\0" in head or bad > 0.01 * max(len(text), 1):
        raise ValueError(f"{flag} {path}: not a text file (binary content in its first {len(head):,} bytes); "
                         "expected one sequence per line of UTF-8 text")


def frame(ids, start_id, end_id):
    """Flat ids of the batch (a list of id lists) with each sequence wrapped in start/end ids (None: nothing on
    that side), plus lengths."""
    n = len(ids)
    n_start, n_end = int(start_id is not None), int(end_id is not None)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=n)
    body = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
    framed_lengths = lengths + n_start + n_end
    ends = np.cumsum(framed_lengths)
    out = np.empty(int(ends[-1]) if n else 0, dtype=np.int64)
    if n_start:
        out[ends - framed_lengths] = start_id
    if n_end:
        out[ends - 1] = end_id
    seq_of_token = np.repeat(np.arange(n), lengths)
    out[np.arange(len(body)) + (n_start + n_end) * seq_of_token + n_start] = body
    return out, framed_lengths


def read_line_batches(path, batch_lines, progress):
    """Yield lists of non-empty, stripped lines; counts bytes for the progress bar."""
    batch = []
    with open(path, "rb") as f:
        for raw in f:
            progress.update(len(raw))
            line = raw.decode("utf-8", errors="replace").strip()
            if line:
                batch.append(line)
                if len(batch) == batch_lines:
                    yield batch
                    batch = []
    if batch:
        yield batch


def binarize(file_path, tokenizer_type, tokenizer_name, dump_file, batch_lines=10_000, start_token=None,
             end_token=None):
    if not os.path.isfile(file_path):
        raise ValueError(f"--file_path {file_path}: no such file")
    if os.path.getsize(file_path) == 0:
        raise ValueError(f"--file_path {file_path}: the file is empty")
    check_text_file(file_path, "--file_path")
    tokenizer, start_id, end_id, prefix = load_framing_tokenizer(tokenizer_type, tokenizer_name,
                                                                 start_token=start_token, end_token=end_token)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    # A tokenizer.json may switch on fixed padding/truncation (the real bert-base-uncased one pads to 128):
    # corpus sequences must keep their true length, long ones are chunked later by the dataset.
    if backend is not None:
        backend.no_padding()
        backend.no_truncation()
    out_path = f"{dump_file}.{tokenizer_slug(tokenizer_name)}.bin"
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    logger.info("Binarizing %s with %s (%s, %d tokens) into %s", file_path, tokenizer_name, type(tokenizer).__name__,
                len(tokenizer), out_path)

    from tqdm import tqdm

    metadata = {"tokenizer_type": tokenizer_type, "tokenizer_name": tokenizer_name,
                "source": os.path.basename(file_path),
                "special_ids": special_token_ids(tokenizer), "framing": [start_id, end_id]}
    t0, n_lines = time.time(), 0
    progress = tqdm(total=os.path.getsize(file_path), unit="B", unit_scale=True, desc="binarize",
                    disable=None, mininterval=2)

    def encode(batch):
        texts = [prefix + line for line in batch] if prefix else batch
        if backend is None:  # a tokenizer without a Rust backend (auto only): slower, same result
            return tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]

    # The Rust tokenizer releases the GIL, so batch k+1 is tokenized while batch k is framed and written.
    with BinarizedWriter(out_path, vocab_size=len(tokenizer), metadata=metadata) as writer, \
            ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for batch in read_line_batches(file_path, batch_lines, progress):
            future = pool.submit(encode, batch)
            if pending is not None:
                writer.add_flat(*frame(pending.result(), start_id, end_id))
            pending = future
            n_lines += len(batch)
        if pending is not None:
            writer.add_flat(*frame(pending.result(), start_id, end_id))
        if n_lines == 0:
            raise ValueError(f"--file_path {file_path}: no non-empty line to binarize")
    progress.close()
    elapsed = time.time() - t0
    logger.info("%d sequences, %d tokens in %.1fs (%.0f lines/s) -> %s", n_lines, writer.n_tokens, elapsed,
                n_lines / max(elapsed, 1e-9), out_path)
    return out_path


# ------------------------------------------------------------------------------------------ token counts

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


# ------------------------------------------------------------------------------------------ conversations

TRAIN_ON = ("assistant", "all")  # --train_on: the assistant's tokens (a loss mask in the corpus), or every token


def chat_corpus_path(dump_file, tokenizer_name):
    """Where a conversation corpus is written: '<dump_file>.<tokenizer>.bin'."""
    return f"{dump_file}.{tokenizer_slug(tokenizer_name)}.bin"


def chat_corpus_metadata(tokenizer, tokenizer_name, file_path, train_on, max_seq_length):
    """The header of a conversation corpus (binarize_conversations, and scripts/teacher_answers.py --dump_file,
    which writes the corpus binarize_conversations would write from its answers)."""
    return {"tokenizer_type": "auto", "tokenizer_name": tokenizer_name, "source": os.path.basename(file_path),
            "special_ids": special_token_ids(tokenizer), "framing": [None, None],
            "conversations": {"train_on": train_on, "max_seq_length": max_seq_length}}


def binarize_conversations(file_path, tokenizer_name, dump_file, max_seq_length, train_on="assistant",
                           messages_column="messages", text_column=None):
    """Conversations (distil/conversations.py's formats) -> a corpus with a loss mask on the assistant's tokens.

    Each conversation is rendered with the tokenizer's chat template; one longer than max_seq_length is cut after
    its last assistant turn that fits, or dropped when none does (both counted). train_on='all', or a
    text_column (plain text records, each followed by EOS), writes a corpus without a mask: every token trained,
    as binarized_data.py's. Returns (path, {counts}).
    """
    import transformers
    from tqdm import tqdm

    from distil.conversations import check_chat_template, read_records, render_with_mask, fit_length, to_messages

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_name)
    except Exception as exc:  # malformed tokenizer files fail in many ways, all the folder's fault
        raise ValueError(f"--tokenizer_name {tokenizer_name}: cannot load a tokenizer ({first_line(exc)})") from None
    if text_column is None:
        check_chat_template(tokenizer, "--tokenizer_name", tokenizer_name)
    elif tokenizer.eos_token_id is None:
        raise ValueError(f"--tokenizer_name {tokenizer_name}: the tokenizer has no EOS token to end each text with")
    masked = text_column is None and train_on == "assistant"
    out_path = chat_corpus_path(dump_file, tokenizer_name)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    metadata = chat_corpus_metadata(tokenizer, tokenizer_name, file_path, "text" if text_column else train_on,
                                    max_seq_length)
    counts = {"conversations": 0, "cut": 0, "dropped": 0, "tokens": 0, "loss_tokens": 0}
    with BinarizedWriter(out_path, vocab_size=len(tokenizer), metadata=metadata, loss_mask=masked) as writer:
        for where, record in tqdm(read_records(file_path), desc="binarize", unit=" records", disable=None,
                                  mininterval=2):
            if text_column is not None:
                text = record.get(text_column) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise ValueError(f"{where}: no string field {text_column!r} (--text_column)")
                ids = tokenizer(text, add_special_tokens=False)["input_ids"][: max_seq_length - 1]
                ids, mask, turn_ends = ids + [tokenizer.eos_token_id], None, None
            else:
                messages = to_messages(record, where, messages_column)
                ids, mask, turn_ends = render_with_mask(tokenizer, messages, where, train_on)
                fitted = fit_length(ids, mask, turn_ends, max_seq_length)
                if fitted is None:
                    counts["dropped"] += 1
                    continue
                counts["cut"] += len(fitted[0]) < len(ids)
                ids, mask = fitted
            counts["conversations"] += 1
            counts["tokens"] += len(ids)
            counts["loss_tokens"] += int(mask.sum()) if mask is not None else len(ids)
            writer.add_flat(np.asarray(ids, dtype=np.int64), [len(ids)], mask if masked else None)
        if counts["conversations"] == 0:
            raise ValueError(f"--file_path {file_path}: no conversation left to binarize "
                             f"({counts['dropped']} longer than --max_seq_length {max_seq_length} at their first "
                             "answer)")
    logger.info("%d conversations, %d tokens, %d of them targets; %d cut at a turn boundary and %d dropped "
                "(longer than --max_seq_length %d) -> %s", counts["conversations"], counts["tokens"],
                counts["loss_tokens"], counts["cut"], counts["dropped"], max_seq_length, out_path)
    return out_path, counts
