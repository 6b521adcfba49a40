"""Binarized corpora on disk and the training dataset built over them.

On disk (written by scripts/binarized_data.py) a corpus is one file:

    bytes [0, 4096)      header: MAGIC, uint32 length, JSON metadata (tokenizer, vocab size, special ids, ...)
    bytes [4096, ...)    all token ids of all sequences, back to back, in the smallest unsigned integer
                         type that holds the vocabulary (uint16 up to 65,536 tokens, else uint32)
    then, 8-aligned      int64 offsets, n_sequences + 1 of them: sequence i is tokens[offsets[i]:offsets[i+1]]
    then (version 2)     uint8 loss mask, one byte a token: 1 where a loss reads the token as a target (a
                         conversation's assistant turns, scripts/binarized_chat.py), 0 elsewhere

Version 2 is version 1 plus the loss mask (header key `loss_mask_at`); a corpus written without a mask is still
version 1, byte for byte what earlier releases wrote, and trains on every token as it always did.

`train.py` memory-maps it, so a billion-token corpus opens in seconds and the pages are shared between
the processes of a node instead of being copied into each. The original scripts' pickles (a list of
integer numpy arrays) still load, through an unpickler that can only build numpy arrays.

`LmSeqsDataset` turns a corpus into the training set the original scripts used: over-long sequences cut
into chunks that keep their start and end special tokens, very short or mostly-unknown sequences dropped.
The index is computed with vectorised numpy, a block of whole sequences at a time: no per-sequence Python
loop, and besides the index itself (13 bytes a training sequence) memory stays bounded whatever the corpus.
"""
import io
import json
import logging
import os
import pickle

import numpy as np
import torch
from torch.utils.data import Dataset

logger = logging.getLogger("distil")

MAGIC = b"DSTLBIN\x01"
NPY_MAGIC = b"\x93NUMPY"  # token counts (scripts/token_counts.py)
PICKLE_PROTOCOL_2_PLUS = b"\x80"  # how every pickle the original scripts wrote (protocol 4) begins
HEADER_BYTES = 4096
FORMAT_VERSION = 1  # a corpus without a loss mask
FORMAT_VERSION_LOSS_MASK = 2  # ... and with one (the mask after the offsets)
MIN_SEQ_LEN = 12  # the original dropped sequences of 11 tokens or fewer
MAX_UNK_RATIO = 0.5  # ... and sequences whose tokens are half or more unknown
# The index is built a block of whole sequences at a time so that only its result grows with the corpus.
# A block holds at most this many tokens (unless it is one longer sequence), bounding the token buffer and
# the unknown-token mask (a few bytes a token) ...
_UNK_SCAN_TOKENS = 1 << 22
# ... and at most this many sequences, bounding the per-sequence temporaries (a few int64 each).
_OFFSETS_CHUNK = 1 << 18


def token_dtype_for_vocab(vocab_size):
    """The smallest unsigned type that holds every id of a vocabulary of this size."""
    if vocab_size <= np.iinfo(np.uint16).max + 1:
        return np.dtype(np.uint16)
    if vocab_size <= np.iinfo(np.uint32).max + 1:
        return np.dtype(np.uint32)
    raise ValueError(f"vocabulary of {vocab_size} tokens is too large")


# --------------------------------------------------------------------------------------------- writing


class BinarizedWriter:
    """Streams sequences into a corpus file. The file appears under its name only once complete.

    with BinarizedWriter(path, vocab_size=30522, metadata={...}) as w:
        w.add_batch([ids, ids, ...])
    """

    def __init__(self, path, vocab_size, metadata=None, loss_mask=False):
        self.path = path
        self.loss_mask = bool(loss_mask)  # then every add_flat brings a mask; written after the offsets
        self.vocab_size = int(vocab_size)
        self.dtype = token_dtype_for_vocab(self.vocab_size)
        self.metadata = dict(metadata or {})
        self.tmp_path = f"{path}.tmp-{os.getpid()}"
        self._lengths = []
        self.n_tokens = 0
        self.max_token_id = -1
        self._file = None
        self._mask_file = None  # the mask streams into a side file, appended to the corpus when it is complete
        self.n_loss_tokens = 0

    def __enter__(self):
        self._file = open(self.tmp_path, "wb")
        self._file.write(b"\0" * HEADER_BYTES)
        if self.loss_mask:
            self._mask_file = open(self.tmp_path + ".mask", "w+b")
        return self

    def add_batch(self, sequences):
        """Append sequences (each a list or array of ints)."""
        if not sequences:
            return
        lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
        flat = np.fromiter((t for s in sequences for t in s), dtype=np.int64, count=int(lengths.sum()))
        self.add_flat(flat, lengths)

    def add_flat(self, flat_ids, lengths, loss_mask=None):
        """Append sequences given as one flat id array plus their lengths (the fast path); loss_mask: one bool a
        token, given exactly when the writer was opened with loss_mask=True."""
        flat_ids = np.asarray(flat_ids)
        if (loss_mask is None) == self.loss_mask:
            raise ValueError("a loss mask must come with every batch of a masked corpus, and only then")
        if loss_mask is not None:
            loss_mask = np.asarray(loss_mask, dtype=bool)
            if loss_mask.shape != flat_ids.shape:
                raise ValueError(f"loss mask of {loss_mask.size} tokens for {flat_ids.size} token ids")
            loss_mask.astype(np.uint8).tofile(self._mask_file)
            self.n_loss_tokens += int(np.count_nonzero(loss_mask))
        if flat_ids.size:
            lo, hi = int(flat_ids.min()), int(flat_ids.max())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"token id {hi if hi >= self.vocab_size else lo} outside the vocabulary "
                                 f"of {self.vocab_size} tokens")
            self.max_token_id = max(self.max_token_id, hi)
        flat_ids.astype(self.dtype, copy=False).tofile(self._file)
        self._lengths.append(np.asarray(lengths, dtype=np.int64))
        self.n_tokens += int(flat_ids.size)

    def __exit__(self, exc_type, exc, tb):
        finished = False
        try:
            if exc_type is None:
                self._finish()
                finished = True
        finally:
            self._file.close()
            if self._mask_file is not None:
                self._mask_file.close()
                os.remove(self._mask_file.name)
            if not finished and os.path.exists(self.tmp_path):  # also when _finish itself failed
                os.remove(self.tmp_path)
        return False

    def _finish(self):
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        pad = (-self.n_tokens * self.dtype.itemsize) % 8
        self._file.write(b"\0" * pad)
        offsets_at = HEADER_BYTES + self.n_tokens * self.dtype.itemsize + pad
        offsets.tofile(self._file)
        header = dict(self.metadata)
        header.update(format_version=FORMAT_VERSION, token_dtype=self.dtype.name, vocab_size=self.vocab_size,
                      n_sequences=int(len(lengths)), n_tokens=int(self.n_tokens),
                      max_token_id=int(self.max_token_id), offsets_at=int(offsets_at))
        if self.loss_mask:
            self._mask_file.seek(0)
            while block := self._mask_file.read(1 << 24):
                self._file.write(block)
            header.update(format_version=FORMAT_VERSION_LOSS_MASK, loss_mask_at=int(offsets_at + offsets.nbytes),
                          n_loss_tokens=int(self.n_loss_tokens))
        blob = json.dumps(header, sort_keys=True).encode()
        if len(MAGIC) + 4 + len(blob) > HEADER_BYTES:
            raise ValueError("corpus metadata too large for the header")
        self._file.seek(0)
        self._file.write(MAGIC + np.uint32(len(blob)).tobytes() + blob)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp_path, self.path)


# --------------------------------------------------------------------------------------------- reading


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler for the original scripts' files: it can build numpy arrays and nothing else.

    Anything else a pickle asks for (a function to call, a class to instantiate) is refused before it
    runs, so a tampered file cannot execute code.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # pickle protocol 5 (the original's pickle.HIGHEST_PROTOCOL on Python >= 3.8) rebuilds arrays this way
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load '{module}.{name}': only numpy arrays are allowed")


def load_legacy_pickle(path):
    """Load a pickle written by the original scripts without ever executing code from it."""
    with open(path, "rb") as f:
        try:
            return _NumpyOnlyUnpickler(io.BufferedReader(f)).load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
            raise ValueError(f"{path}: not a valid legacy pickle ({exc})") from None


def resolve_data_file(path):
    """Accept the README's `binarized_text.<tok>.pickle` names for the `.bin` files we now write."""
    if not os.path.exists(path) and path.endswith(".pickle"):
        candidate = path[: -len(".pickle")] + ".bin"
        if os.path.exists(candidate):
            logger.info("%s does not exist; using %s (the binarized format that replaced the pickle)", path, candidate)
            return candidate
    return path


class BinarizedCorpus:
    """Read-only view of a binarized corpus: `tokens` (flat) and `offsets` (n_sequences + 1).

    Opened from a file, both are memory maps: nothing is read until used.
    """

    def __init__(self, tokens, offsets, metadata, path, loss_mask=None):
        self.tokens = tokens
        self.offsets = offsets
        self.metadata = metadata
        self.path = path
        self.loss_mask = loss_mask  # None, or one uint8 a token (1: a loss reads it), aligned with tokens

    @property
    def n_sequences(self):
        return len(self.offsets) - 1

    @property
    def n_tokens(self):
        return int(self.offsets[-1])

    @property
    def max_token_id(self):
        if "max_token_id" not in self.metadata:
            self.metadata["max_token_id"] = int(self.tokens.max()) if len(self.tokens) else -1
        return self.metadata["max_token_id"]

    def sequence(self, i):
        return self.tokens[self.offsets[i]: self.offsets[i + 1]]

    def iter_blocks(self, start, stop, out=None):
        """Token ids [start, stop) as a private array (not a mapping of the file: keeps USS low).

        With `out` (a buffer of the token dtype) the ids are read into its beginning when they fit, so a
        loop over blocks reuses one buffer instead of faulting in fresh pages for every block.
        """
        return self._read(self.tokens, HEADER_BYTES, start, stop, out)

    def offsets_block(self, start, stop):
        """offsets[start:stop] as a private array, read like `iter_blocks`."""
        return self._read(self.offsets, self.metadata.get("offsets_at"), start, stop)

    def iter_sequence_blocks(self, max_tokens=None):
        """The corpus as consecutive runs of whole sequences, each given by its offsets (n + 1 of them).

        A run has at most _OFFSETS_CHUNK sequences and, with max_tokens, at most that many tokens unless
        it is one longer sequence: whatever the corpus, work done a run at a time stays bounded.
        """
        lo = 0
        while lo < self.n_sequences:
            off = self.offsets_block(lo, min(lo + _OFFSETS_CHUNK, self.n_sequences) + 1)
            i = 0
            while i < len(off) - 1:
                j = len(off) - 1
                if max_tokens is not None:
                    j = min(j, int(np.searchsorted(off, off[i] + max_tokens, side="right")) - 1)
                j = max(j, i + 1)
                yield off[i: j + 1]
                i = j
            lo += len(off) - 1

    def _read(self, array, file_pos, start, stop, out=None):
        # Reading a memory map would make every page it touches count in this process's private memory
        # (USS) while only this process maps it; read() goes through the page cache, which is not.
        if not isinstance(array, np.memmap):
            return array[start:stop]
        n = stop - start
        if out is not None and len(out) >= n and out.dtype == array.dtype:
            out = out[:n]
        else:
            out = np.empty(n, dtype=array.dtype)
        if n == 0:
            return out
        view = memoryview(out).cast("B")
        with open(self.path, "rb", buffering=0) as f:
            f.seek(file_pos + start * array.itemsize)
            done = 0
            while done < len(view):
                got = f.readinto(view[done:])
                if not got:
                    raise ValueError(f"{self.path}: file shrank while being read")
                done += got
        return out

    def _offsets_are_valid(self, n_tokens):
        """offsets start at 0, never decrease and end at n_tokens (checked a chunk at a time)."""
        previous = 0
        for lo in range(0, len(self.offsets), _OFFSETS_CHUNK):
            chunk = self.offsets_block(lo, min(lo + _OFFSETS_CHUNK, len(self.offsets)))
            if lo == 0 and chunk[0] != 0:
                return False
            if chunk[0] < previous or np.any(chunk[1:] < chunk[:-1]):
                return False
            previous = chunk[-1]
        return previous == n_tokens

    @classmethod
    def open(cls, path):
        """Open a corpus (our format, or a legacy pickle); every problem names the file."""
        path = resolve_data_file(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: data file not found")
        size = os.path.getsize(path)
        if size == 0:
            raise ValueError(f"{path}: data file is empty")
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
        if head.startswith(MAGIC):
            return cls._open_binarized(path, head, size)
        if head.startswith(NPY_MAGIC):
            raise ValueError(f"{path}: a NumPy array (token counts?), not a binarized corpus")
        if not head.startswith(PICKLE_PROTOCOL_2_PLUS):
            raise ValueError(f"{path}: not a binarized corpus (scripts/binarized_data.py writes them) nor the "
                             "original scripts' pickle")
        return cls._open_legacy(path)

    @classmethod
    def _open_binarized(cls, path, head, size):
        try:
            n = int(np.frombuffer(head[len(MAGIC): len(MAGIC) + 4], dtype=np.uint32)[0])
            meta = json.loads(head[len(MAGIC) + 4: len(MAGIC) + 4 + n].decode())
            dtype = np.dtype(meta["token_dtype"])
            n_seq, n_tok, off_at = int(meta["n_sequences"]), int(meta["n_tokens"]), int(meta["offsets_at"])
            version = int(meta.get("format_version", FORMAT_VERSION))
            mask_at = int(meta["loss_mask_at"]) if version >= FORMAT_VERSION_LOSS_MASK else None
            if min(n_seq, n_tok, off_at) < 0:
                raise ValueError("negative size")
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise ValueError(f"{path}: corrupted header ({exc})") from None
        if version > FORMAT_VERSION_LOSS_MASK:
            raise ValueError(f"{path}: corpus format version {version}, newer than this code reads "
                             f"({FORMAT_VERSION_LOSS_MASK}); update the repository")
        expected = off_at + (n_seq + 1) * 8
        if mask_at is not None:
            if mask_at != expected:
                raise ValueError(f"{path}: corrupted header (loss mask at byte {mask_at}, expected {expected})")
            expected += n_tok
        if size != expected:
            raise ValueError(f"{path}: truncated or corrupted ({size} bytes, the header promises {expected})")
        tokens = np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(n_tok,)) if n_tok else \
            np.zeros(0, dtype=dtype)
        # Mapped, not read: an index over billions of tokens need not sit in every process's memory.
        offsets = np.memmap(path, dtype=np.int64, mode="r", offset=off_at, shape=(n_seq + 1,))
        loss_mask = None
        if mask_at is not None:
            loss_mask = np.memmap(path, dtype=np.uint8, mode="r", offset=mask_at, shape=(n_tok,)) if n_tok else \
                np.zeros(0, dtype=np.uint8)
        corpus = cls(tokens, offsets, meta, path, loss_mask)
        if not corpus._offsets_are_valid(n_tok):
            raise ValueError(f"{path}: corrupted sequence offsets")
        return corpus

    @classmethod
    def _open_legacy(cls, path):
        data = load_legacy_pickle(path)
        if not isinstance(data, (list, tuple)) or not all(
            isinstance(s, np.ndarray) and s.ndim == 1 and s.dtype.kind in "iu" for s in data
        ):
            raise ValueError(f"{path}: a legacy data pickle must hold a list of 1-D integer numpy arrays")
        lengths = np.fromiter((len(s) for s in data), dtype=np.int64, count=len(data))
        offsets = np.zeros(len(data) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.concatenate(data) if len(data) else np.zeros(0, dtype=np.int64)
        if len(tokens) and tokens.min() < 0:
            raise ValueError(f"{path}: negative token id")
        logger.info("Loaded legacy pickle %s (%d sequences); re-binarize for memory-mapped loading.", path, len(data))
        return cls(tokens, offsets, {"format": "legacy-pickle"}, path)


def save_token_counts(path, counts):
    """Write counts as a .npy payload (whatever the file is called), atomically."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(counts, dtype=np.int64), allow_pickle=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_token_counts(path, vocab_size=None):
    """Per-id occurrence counts, from our .npy payload or from the original's pickled list."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: token counts file not found")
    with open(path, "rb") as f:
        head = f.read(len(MAGIC))
    if head.startswith(MAGIC):
        raise ValueError(f"{path}: a binarized corpus, not token counts (scripts/token_counts.py makes them)")
    if not head.startswith((NPY_MAGIC, PICKLE_PROTOCOL_2_PLUS)):
        raise ValueError(f"{path}: not token counts (a .npy array from scripts/token_counts.py, or the original "
                         "scripts' pickle)")
    if head.startswith(NPY_MAGIC):
        try:
            counts = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise ValueError(f"{path}: truncated or corrupted token counts ({exc})") from None
    else:
        raw = load_legacy_pickle(path)
        try:
            counts = np.asarray(raw, dtype=np.int64)
        except (TypeError, ValueError):
            raise ValueError(f"{path}: a token counts pickle must hold a list of integers") from None
    if counts.ndim != 1 or counts.dtype.kind not in "iu" or (counts.size and counts.min() < 0):
        raise ValueError(f"{path}: token counts must be a 1-D array of non-negative integers")
    if vocab_size is not None and len(counts) != vocab_size:
        raise ValueError(f"{path}: holds counts for {len(counts)} token ids but the vocabulary has {vocab_size}")
    return counts.astype(np.int64, copy=False)


# --------------------------------------------------------------------------------------------- dataset


class LmSeqsDataset(Dataset):
    """The training sequences: item i is (token_ids: np.int64 array, length: int), plus (with a corpus that
    carries a loss mask, `has_loss_mask`) its loss mask: a bool array, True at the tokens a loss reads as targets.

    data: a BinarizedCorpus, or a list of token-id arrays. special_tok_ids: {name: id} under the original's
    names ('cls_token', 'sep_token' for MLM; 'bos_token', 'eos_token' for CLM; 'pad_token', 'unk_token').
    max_len: the longest sequence the models accept; longer ones are cut into chunks of at most that length.
    """

    def __init__(self, data, *, special_tok_ids, mlm, max_len):
        self.corpus = data if isinstance(data, BinarizedCorpus) else _corpus_from_list(data)
        ids = special_tok_ids
        self.bos_id = ids["cls_token"] if mlm else ids["bos_token"]
        self.eos_id = ids["sep_token"] if mlm else ids["eos_token"]
        self.pad_id = ids["pad_token"] if mlm else ids.get("pad_token", ids["unk_token"])
        self.unk_id = ids.get("unk_token")
        self.max_len = int(max_len)
        if self.max_len < 3:
            raise ValueError(f"maximum input size {self.max_len} leaves no room between the special tokens")

        # A view is a slice [start, start + length) of the flat token array; `wrapped` views are chunks
        # of a long sequence and get the start/end special tokens added around them when read.
        self.starts, self.lengths, self.wrapped = self._build_index()
        self.print_statistics()

    # -- index construction ---------------------------------------------------------------------------

    def _build_index(self):
        """(starts int64, lengths int32, wrapped bool) of the views that pass every filter, in corpus order.

        One pass over the corpus, a run of whole sequences at a time. The result arrays are allocated for
        the most views there can be, filled from the front and trimmed in place at the end: pages never
        written cost no memory, and no step holds a second copy of the index.
        """
        # Byte-level BPE (GPT-2, RoBERTa) has no unknown token: its "unk" is the boundary token itself.
        scan_unk = self.unk_id is not None and self.unk_id not in (self.bos_id, self.eos_id)
        capacity = self._max_views()
        starts = np.empty(capacity, dtype=np.int64)
        lengths = np.empty(capacity, dtype=np.int32 if self.max_len <= np.iinfo(np.int32).max else np.int64)
        wrapped = np.empty(capacity, dtype=bool)
        n = n_long = n_chunks = n_short = n_unk = 0
        token_buf = mask_buf = None
        for off in self.corpus.iter_sequence_blocks(_UNK_SCAN_TOKENS):
            seq_lens = np.diff(off)
            long = seq_lens > self.max_len
            block = None
            if scan_unk or long.any():
                if token_buf is None:
                    token_buf = np.empty(_UNK_SCAN_TOKENS, dtype=self.corpus.tokens.dtype)
                block = self.corpus.iter_blocks(int(off[0]), int(off[-1]), out=token_buf)
            v_starts, v_lens, v_wrapped = self._block_views(off, seq_lens, long, block)
            n_long += int(np.count_nonzero(long))
            n_chunks += int(np.count_nonzero(v_wrapped))

            keep = v_lens >= MIN_SEQ_LEN
            n_kept = int(np.count_nonzero(keep))
            n_short += len(keep) - n_kept
            if scan_unk and n_kept:
                if mask_buf is None or len(mask_buf) <= len(block):
                    mask_buf = np.empty(max(_UNK_SCAN_TOKENS, len(block)) + 1, dtype=bool)
                candidates = np.flatnonzero(keep)
                # a wrapped view's slice holds no wrapping tokens; the ratio is still over its full length
                body_lens = v_lens[candidates] - 2 * v_wrapped[candidates]
                unk = _count_in_slices(block, self.unk_id, v_starts[candidates] - off[0], body_lens, mask_buf)
                keep[candidates] = unk / v_lens[candidates] < MAX_UNK_RATIO
                still = int(np.count_nonzero(keep))
                n_unk += n_kept - still
                n_kept = still

            starts[n: n + n_kept] = v_starts[keep]
            lengths[n: n + n_kept] = v_lens[keep]
            wrapped[n: n + n_kept] = v_wrapped[keep]
            n += n_kept

        for array in (starts, lengths, wrapped):
            array.resize(n, refcheck=False)  # in place (no copy): nothing else refers to them yet
        if n_long:
            logger.info("Splitting %d too-long sequences into %d chunks.", n_long, n_chunks)
        for removed, reason in ((n_short, "too short (11 tokens or fewer)"), (n_unk, "half or more unknown tokens")):
            if removed:
                logger.info("Removed %d sequences: %s.", removed, reason)
        return starts, lengths, wrapped

    def _max_views(self):
        """How many views there are at most: long sequences count as if none had boundary tokens to drop."""
        piece = self.max_len - 2
        total = 0
        for off in self.corpus.iter_sequence_blocks():
            lens = np.diff(off)
            long = lens > self.max_len
            total += len(lens) - int(np.count_nonzero(long)) + int((-(-lens[long] // piece)).sum())
        return total

    def _block_views(self, off, seq_lens, long, block):
        """(starts, lengths, wrapped) of the views of a run of sequences, in corpus order.

        off: the run's offsets; seq_lens, long: its sequences' lengths and which are too long; block: its
        token ids (read only when some are).
        """
        seq_starts = off[:-1]
        if not long.any():
            return seq_starts, seq_lens, np.zeros(len(seq_lens), dtype=bool)

        # Long sequences: drop their own boundary tokens, cut the content into max_len - 2 pieces, and
        # re-wrap every piece so each chunk starts and ends like a real sequence.
        first = seq_starts[long] - off[0]
        has_bos = block[first] == self.bos_id
        has_eos = block[first + seq_lens[long] - 1] == self.eos_id
        body_starts, body_lens = seq_starts.copy(), seq_lens.copy()
        body_starts[long] += has_bos
        body_lens[long] -= has_bos
        body_lens[long] -= has_eos
        piece = self.max_len - 2
        per_seq = np.ones_like(seq_lens)
        per_seq[long] = -(-body_lens[long] // piece)
        # Expanding each sequence into its views in place keeps corpus order without sorting.
        seq = np.repeat(np.arange(len(seq_lens)), per_seq)
        k = np.arange(len(seq)) - np.repeat(np.cumsum(per_seq) - per_seq, per_seq)  # piece index in its sequence
        starts = body_starts[seq] + k * piece
        lens = body_lens[seq] - k * piece
        wrapped = long[seq]
        lens[wrapped] = np.minimum(lens[wrapped], piece) + 2
        return starts, lens, wrapped

    # -- access -----------------------------------------------------------------------------------------

    def __len__(self):
        return len(self.lengths)

    @property
    def has_loss_mask(self):
        return self.corpus.loss_mask is not None

    def __getitem__(self, index):
        start, length = int(self.starts[index]), int(self.lengths[index])
        if self.wrapped[index]:
            out = np.empty(length, dtype=np.int64)
            out[0], out[-1] = self.bos_id, self.eos_id
            out[1:-1] = self.corpus.tokens[start: start + length - 2]
            if not self.has_loss_mask:
                return out, length
            mask = np.zeros(length, dtype=bool)  # the added framing tokens are no target
            mask[1:-1] = self.corpus.loss_mask[start: start + length - 2]
            return out, length, mask
        ids = np.asarray(self.corpus.tokens[start: start + length], dtype=np.int64)
        if not self.has_loss_mask:
            return ids, length
        return ids, length, self.corpus.loss_mask[start: start + length].astype(bool)

    def print_statistics(self):
        if len(self.lengths) == 0:
            logger.warning("No sequence left after filtering.")
            return
        logger.info("%d sequences, %d tokens, length mean %.1f / median %d / max %d.", len(self.lengths),
                    int(self.lengths.sum()), float(self.lengths.mean()), int(np.median(self.lengths)),
                    int(self.lengths.max()))
        if self.has_loss_mask:
            logger.info("The corpus carries a loss mask: the losses read %d of its %d tokens as targets.",
                        int(self.corpus.metadata.get("n_loss_tokens", -1)), self.corpus.n_tokens)

    def batch_sequences(self, batch):
        """Collate [(ids, length), ...] into (token_ids (bs, max_len) long, lengths (bs,) long); items with a
        loss mask also give loss_mask (bs, max_len) bool, False on padding.

        Padding uses the pad token; for GPT-2, which has none, the unknown token as in the original
        (those positions are excluded from every loss by the attention mask and labels).
        """
        lengths = np.fromiter((b[1] for b in batch), dtype=np.int64, count=len(batch))
        out = np.full((len(batch), int(lengths.max())), self.pad_id, dtype=np.int64)
        for row, (ids, n, *_) in enumerate(batch):
            out[row, :n] = ids
        if len(batch[0]) == 2:
            return torch.from_numpy(out), torch.from_numpy(lengths)
        mask = np.zeros(out.shape, dtype=bool)
        for row, (_, n, item_mask) in enumerate(batch):
            mask[row, :n] = item_mask
        return torch.from_numpy(out), torch.from_numpy(lengths), torch.from_numpy(mask)


def _count_in_slices(block, value, starts, lens, mask):
    """How many ids equal `value` in each block[starts[i]: starts[i] + lens[i]] (every lens[i] > 0).

    mask: a bool buffer of at least len(block) + 1 items, overwritten.
    """
    if len(starts) == 0:
        return np.zeros(0, dtype=np.int32)
    mask = mask[: len(block) + 1]
    np.equal(block, value, out=mask[:-1])
    mask[-1] = False  # reduceat takes only indices inside the array: this lets a slice end at the block's end
    bounds = np.empty(2 * len(starts), dtype=np.int64)
    bounds[0::2] = starts
    bounds[1::2] = starts + lens
    # reduceat sums from each bound to the next: the even results are the slices, the odd ones the gaps
    # between them (an empty gap gives one item instead of 0; those are dropped anyway).
    return np.add.reduceat(mask, bounds, dtype=np.int32)[0::2]


def _corpus_from_list(sequences):
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences]) if len(sequences) else \
        np.zeros(0, np.int64)
    return BinarizedCorpus(tokens, offsets, {}, "<memory>")
