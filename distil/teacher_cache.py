"""Run the teacher once, train many students: the teacher's top-k predictions over a corpus, cached on disk.

    python scripts/cache_teacher.py --teacher_type gpt2 --teacher_name gpt2 --data_file data/x.gpt2.bin \
        --cache_dir cache/gpt2-k64 --k 64
    python train.py <the same data and student flags> --teacher_cache cache/gpt2-k64

A cache covers the positions the distillation loss reads: every real token for a causal LM (with a corpus that
carries a loss mask, conversations, only the positions predicting a masked token); for MLM every real token, or
only the predicted ones with --restrict_ce_to_mask. At each it stores the teacher's k likeliest
ids and their log-probabilities at temperature T, and the log of the mass left to the other ids (the tail: the
divergence is then taken over those k + 1 outcomes, see distil/divergences.py). For MLM the teacher's prediction
depends on the corruption of its input, so the cache fixes the corruption of every sequence for every epoch
it covers (masking.seeded_mlm_draw, seeded by (seed, epoch, index)) and training replays exactly that.

A cache folder:
    cache.json         identity (teacher, corpus, tokenizer, maximum length, mlm, temperature, k, masking) and
                       shapes; "complete" once every row is written (written atomically, last)
    progress.json      units ((epoch, sequence) pairs, in order) written so far: an interrupted build resumes
    tokenizer/         the tokenizer (train.py takes it when --tokenizer_name is not given)
    row_offsets.npy    (n_epochs * n_items + 1,) int64: first cached row of each (epoch, item)
    ids.bin            (n_rows, k) uint16 or int32: the top-k ids of each cached row
    log_probs.bin      (n_rows, k + 1) float16 or float32: their log-probabilities, then the tail's
    mlm_inputs.bin     (n_epochs, n_tokens) int32: each item's corrupted input in each epoch (MLM only)
    mlm_predicted.bin  (n_epochs, n_tokens) bool: the positions each item predicts in each epoch (MLM only)
"""
import hashlib
import json
import os
import shutil

import numpy as np
import torch
import torch.nn.functional as F

from distil.divergences import TopKTeacher
from distil.losses import IGNORE_INDEX
from distil.masking import (Batch, attention_mask_from_lengths, clm_labels, mask_and_rows_on_device,
                            loss_positions_of, non_padding_positions, prepare_batch_clm, seeded_mlm_draw)
from utils import UserError, logger, write_json_atomic

# Version 2 records the teacher (teacher_identity): a version-1 cache may hold a teacher whose token ids were
# never compared with its tokenizer's, so it is refused rather than trusted.
FORMAT = "distil-teacher-cache-2"
META = "cache.json"
PROGRESS = "progress.json"
# Settings of a training run that must equal the cache's, by train.py flag name (checked in check_run).
RUN_SETTINGS = ("mlm", "temperature", "restrict_ce_to_mask", "mlm_mask_prop", "word_mask", "word_keep", "word_rand",
                "mlm_smoothing")


def corpus_identity(corpus):
    """sha256 of a BinarizedCorpus's offsets and tokens (read a block at a time), and of its loss mask when it
    has one (the mask decides which rows are cached), and its sizes."""
    h = hashlib.sha256()
    block = 1 << 24
    for lo in range(0, corpus.n_sequences + 1, block):
        h.update(np.ascontiguousarray(corpus.offsets_block(lo, min(lo + block, corpus.n_sequences + 1)),
                                      dtype=np.int64).tobytes())
    for lo in range(0, corpus.n_tokens, block):
        h.update(np.ascontiguousarray(corpus.iter_blocks(lo, min(lo + block, corpus.n_tokens)), dtype=np.int64)
                 .tobytes())
    if corpus.loss_mask is not None:  # after the rest: an unmasked corpus keeps the identity it always had
        for lo in range(0, corpus.n_tokens, block):
            h.update(np.ascontiguousarray(corpus.loss_mask[lo: lo + block], dtype=np.uint8).tobytes())
    return {"sha256": h.hexdigest(), "n_sequences": corpus.n_sequences, "n_tokens": corpus.n_tokens}


def tokenizer_identity(tokenizer):
    """sha256 of a tokenizer's token -> id table and special tokens, and its size."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    payload = json.dumps([vocab, sorted(tokenizer.special_tokens_map.items(), key=str)], default=str)
    return {"sha256": hashlib.sha256(payload.encode()).hexdigest(), "size": len(tokenizer)}


def teacher_identity(name, config, own_tokenizer):
    """What names a teacher in cache.json: its name (a local folder as its real path), a sha256 of its config
    (before any vocabulary cut; paths and library versions left out) and tokenizer_identity of its own
    tokenizer (None when its folder has none: --assume_same_token_ids)."""
    fields = {k: v for k, v in config.to_dict().items()  # private keys hold paths and loading details
              if not k.startswith("_") and k not in ("transformers_version", "dtype", "torch_dtype")}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()
    return {"name": os.path.realpath(name) if os.path.isdir(name) else name, "config_sha256": digest,
            "vocabulary": tokenizer_identity(own_tokenizer) if own_tokenizer is not None else None}


def _ids_dtype(vocab_size):
    return np.uint16 if vocab_size <= 1 << 16 else np.int32


class TeacherCache:
    """A complete cache folder opened for reading (memory maps; nothing is read until a batch needs it)."""

    def __init__(self, path):
        self.path = path
        meta_path = os.path.join(path, META)
        if not os.path.isfile(meta_path):
            raise UserError(f"--teacher_cache {path}: no {META} there (not a teacher cache, or its build never "
                            "started)")
        try:
            with open(meta_path) as f:
                self.meta = json.load(f)
        except (OSError, ValueError) as exc:
            raise UserError(f"--teacher_cache {path}: unreadable {META} ({exc})") from None
        if self.meta.get("format") != FORMAT:
            raise UserError(f"--teacher_cache {path}: not a teacher cache of this version ({self.meta.get('format')}, "
                            f"this one reads {FORMAT}); build it again with scripts/cache_teacher.py")
        if not self.meta.get("complete"):
            raise UserError(f"--teacher_cache {path}: the build was interrupted; run scripts/cache_teacher.py again "
                            "with the same flags to finish it")
        m = self.meta
        self.k, self.vocab_size, self.n_epochs, self.mlm = m["k"], m["vocab_size"], m["n_epochs"], m["mlm"]
        self.row_offsets = np.load(os.path.join(path, "row_offsets.npy"))
        self.item_offsets = np.load(os.path.join(path, "item_offsets.npy"))
        self.n_items = len(self.item_offsets) - 1
        n_rows = int(self.row_offsets[-1])
        self.ids = np.memmap(os.path.join(path, "ids.bin"), dtype=m["ids_dtype"], mode="r", shape=(n_rows, self.k))
        self.log_probs = np.memmap(os.path.join(path, "log_probs.bin"), dtype=m["log_probs_dtype"], mode="r",
                                   shape=(n_rows, self.k + 1))
        if self.mlm:
            shape = (self.n_epochs, int(self.item_offsets[-1]))
            self.mlm_inputs = np.memmap(os.path.join(path, "mlm_inputs.bin"), dtype=np.int32, mode="r", shape=shape)
            self.mlm_predicted = np.memmap(os.path.join(path, "mlm_predicted.bin"), dtype=bool, mode="r", shape=shape)

    def check_run(self, *, corpus, tokenizer, max_len, vocab_size, n_epochs, max_steps, dataset, settings):
        """Refuse (UserError, one line naming the flag) a training run the cache was not built for. n_epochs: the
        passes over the data the run's plan starts (--n_epoch, or what --max_steps needs)."""
        m, where = self.meta, f"--teacher_cache {self.path}"
        if not m.get("teacher"):
            raise UserError(f"{where} records no teacher (a benchmark's cache); build it with "
                            "scripts/cache_teacher.py")
        if corpus_identity(corpus) != m["corpus"]:
            raise UserError(f"{where} was built from another corpus ({m['data_file']}, {m['corpus']['n_sequences']} "
                            f"sequences) than --data_file {corpus.path}")
        if tokenizer_identity(tokenizer) != m["tokenizer"]:
            raise UserError(f"{where} was built with another tokenizer ({m['tokenizer']['size']} tokens) than this "
                            f"run's ({len(tokenizer)} tokens)")
        if max_len != m["max_len"] or len(dataset) != self.n_items:
            raise UserError(f"{where} was built for sequences of at most {m['max_len']} tokens, this run cuts them "
                            f"at {max_len} (its --max_seq_length, or the student's and tokenizer's limit): run with "
                            f"--max_seq_length {m['max_len']} or build the cache with scripts/cache_teacher.py "
                            f"--max_seq_length {max_len}")
        if vocab_size != self.vocab_size:
            raise UserError(f"{where} holds distributions over {self.vocab_size} ids, the student's vocabulary has "
                            f"{vocab_size}")
        for name in RUN_SETTINGS:
            if name in m["settings"] and settings[name] != m["settings"][name]:
                raise UserError(f"{where} was built with --{name} {m['settings'][name]}, this run has "
                                f"--{name} {settings[name]}")
        if self.mlm and n_epochs > self.n_epochs:
            cause = f"--max_steps {max_steps} needs {n_epochs} epochs" if max_steps else f"--n_epoch is {n_epochs}"
            raise UserError(f"{where} fixes the masking of {self.n_epochs} epochs, {cause}; build it with "
                            f"scripts/cache_teacher.py --n_epoch {n_epochs}")

    def epoch_slot(self, epoch):
        """Which stored epoch serves training epoch `epoch` (a causal LM's cache holds one, valid for all)."""
        return epoch if self.mlm else 0

    def prepare_batch(self, token_ids, lengths, indices, epoch, device, loss_mask=None):
        """A DataLoader batch of dataset items `indices` -> (masking.Batch, TopKTeacher) on the device, in the
        row order the step uses (row-major over (bs, seq)): the cached masking (MLM) and teacher rows.

        As the live path (masking.prepare_batch_*): the attention mask, labels and loss rows are built on the
        device from the lengths; what crosses from the host is the ids, the lengths and the cached values
        (each sequence's real tokens only), and nothing waits for the device.

        loss_mask: the batch's (a loss-masked corpus, causal LMs): the rows are then those
        masking.prepare_batch_clm reads, and the cache holds only those."""
        bs, max_len = token_ids.shape
        if loss_mask is not None:  # a causal LM's cache: one stored epoch
            batch = prepare_batch_clm(token_ids, lengths, device, loss_mask)
            return batch, self._teacher_rows(indices, 0, batch.rows, device)
        slot = self.epoch_slot(epoch)
        if slot >= self.n_epochs:  # check_run refuses such a run before training
            raise ValueError(f"{self.path}: the cache fixes the masking of {self.n_epochs} epochs, not epoch {epoch}")
        attn_mask, real_rows = mask_and_rows_on_device(lengths, max_len, device)
        token_ids = token_ids.to(device, non_blocking=True)
        if self.mlm:
            spans = [(int(self.item_offsets[i]), n) for i, n in zip(indices.tolist(), lengths.tolist())]
            # the batch's real tokens, in row-major order: their cached corruption and which ones are predicted
            corrupted = np.concatenate([self.mlm_inputs[slot, lo: lo + n] for lo, n in spans])
            predicted = np.flatnonzero(np.concatenate([self.mlm_predicted[slot, lo: lo + n] for lo, n in spans]))
            inputs = token_ids.clone()
            inputs.view(-1)[real_rows] = _to_device(corrupted, device).long()
            predicted_rows = real_rows[_to_device(predicted, device)]
            labels = torch.full_like(token_ids, IGNORE_INDEX)
            labels.view(-1)[predicted_rows] = token_ids.view(-1)[predicted_rows]
            rows = predicted_rows if self.meta["settings"].get("restrict_ce_to_mask") else real_rows
        else:
            inputs, labels, rows = token_ids, clm_labels(token_ids, attn_mask), real_rows
        padded = bool((lengths.numpy() < max_len).any())
        return Batch(inputs, attn_mask, labels, rows, padded), self._teacher_rows(indices, slot, rows, device)

    def _teacher_rows(self, indices, slot, rows, device):
        """The cached rows of dataset items `indices` in stored epoch `slot`, as a TopKTeacher on the device,
        checked to be as many as the batch reads (rows: its flat loss positions)."""
        units = slot * self.n_items + indices.numpy()
        spans = list(zip(self.row_offsets[units], self.row_offsets[units + 1]))
        ids = np.concatenate([self.ids[a:b] for a, b in spans])
        log_probs = np.concatenate([self.log_probs[a:b] for a, b in spans])
        if len(ids) != rows.numel():
            raise ValueError(f"{self.path}: {len(ids)} cached rows for a batch that reads {rows.numel()}; the cache "
                             "does not match this data")
        return TopKTeacher(_to_device(ids.astype(np.int32, copy=False), device).long(), _to_device(log_probs, device))


def _to_device(array, device):
    """A host array on the device: through pinned memory to a GPU, so the copy does not wait (a non-blocking
    copy from pageable memory may)."""
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


# ------------------------------------------------------------------------------------------------ building


def _mlm_draws(dataset, item_offsets, token_probs, n_epochs, masking):
    """(inputs (n_epochs, n_tokens) int32, predicted (n_epochs, n_tokens) bool) of every item in every epoch."""
    n_tokens = int(item_offsets[-1])
    inputs = np.empty((n_epochs, n_tokens), dtype=np.int32)
    predicted = np.empty((n_epochs, n_tokens), dtype=bool)
    for epoch in range(n_epochs):
        for index in range(len(dataset)):
            ids, n = dataset[index]
            lo = item_offsets[index]
            inputs[epoch, lo: lo + n], predicted[epoch, lo: lo + n] = seeded_mlm_draw(
                ids, token_probs, epoch=epoch, index=index, **masking)
    return inputs, predicted


def topk_rows(t_logits, k, temperature):
    """(ids (..., k), log-probs (..., k + 1)): the top k of log_softmax(t / T) and the tail's log-mass, for
    logits (..., V)."""
    log_p = F.log_softmax(t_logits.float() / temperature, dim=-1)  # (..., V)
    values, ids = log_p.topk(k, dim=-1)  # (..., k), sorted
    tail = torch.logsumexp(log_p.scatter_(-1, ids, float("-inf")), dim=-1, keepdim=True)  # -inf if k = V
    return ids, torch.cat([values, tail], dim=-1)


def _meta(*, k, vocab_size, mlm, n_epochs, max_len, temperature, teacher, data_file, corpus, tokenizer, settings,
          log_probs_dtype):
    """cache.json of a build that has not finished (one place for what identifies a cache)."""
    return {"format": FORMAT, "complete": False, "k": int(k), "vocab_size": int(vocab_size), "mlm": bool(mlm),
            "n_epochs": int(n_epochs), "max_len": int(max_len), "temperature": float(temperature),
            "teacher": teacher, "data_file": data_file, "corpus": corpus_identity(corpus),
            "tokenizer": tokenizer_identity(tokenizer) if tokenizer is not None else None,
            "settings": settings, "ids_dtype": np.dtype(_ids_dtype(vocab_size)).name,
            "log_probs_dtype": log_probs_dtype}


def _finish(path, meta, tokenizer, n_rows):
    """Save the tokenizer, then mark the cache complete (cache.json written atomically, last)."""
    if tokenizer is not None:
        tokenizer.save_pretrained(os.path.join(path, "tokenizer"))
    meta["complete"] = True
    meta["n_rows"] = n_rows
    meta["bytes_per_row"] = (meta["k"] * np.dtype(meta["ids_dtype"]).itemsize
                             + (meta["k"] + 1) * np.dtype(meta["log_probs_dtype"]).itemsize)
    write_json_atomic(os.path.join(path, META), meta)
    return meta


def write_causal_cache(path, *, rows, dataset, corpus, tokenizer, data_file, max_len, vocab_size, k, temperature,
                       teacher, log_probs_dtype="float16", force=False, written_by=None):
    """A causal LM's cache from rows already computed (scripts/teacher_answers.py: the generation pass's own
    logits), in the layout build_cache writes. rows(index) -> (ids (n, k), log-probs (n, k + 1)) of dataset
    item `index`: the rows build_cache's teacher forward would give it, in the same order."""
    meta = _meta(k=k, vocab_size=vocab_size, mlm=False, n_epochs=1, max_len=max_len, temperature=temperature,
                 teacher=teacher, data_file=data_file, corpus=corpus, tokenizer=tokenizer,
                 settings={"mlm": False, "temperature": float(temperature)}, log_probs_dtype=log_probs_dtype)
    if written_by:
        meta["written_by"] = written_by
    _start_or_resume(path, meta, force)
    lengths = np.asarray(dataset.lengths, dtype=np.int64)
    item_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    parts = [rows(index) for index in range(len(dataset))]
    row_offsets = np.concatenate([[0], np.cumsum([len(ids) for ids, _ in parts])]).astype(np.int64)
    n_rows = int(row_offsets[-1])
    np.save(os.path.join(path, "row_offsets.npy"), row_offsets)
    np.save(os.path.join(path, "item_offsets.npy"), item_offsets)
    ids_file = np.memmap(os.path.join(path, "ids.bin"), dtype=meta["ids_dtype"], mode="w+", shape=(max(n_rows, 1), k))
    lp_file = np.memmap(os.path.join(path, "log_probs.bin"), dtype=log_probs_dtype, mode="w+",
                        shape=(max(n_rows, 1), k + 1))
    for (ids, log_probs), lo, hi in zip(parts, row_offsets[:-1], row_offsets[1:]):
        ids_file[lo:hi] = np.asarray(ids).astype(meta["ids_dtype"])
        lp_file[lo:hi] = np.asarray(log_probs).astype(log_probs_dtype)
    ids_file.flush()
    lp_file.flush()
    del ids_file, lp_file
    return _finish(path, meta, tokenizer, n_rows)


def build_cache(path, *, teacher_lm, dataset, corpus, tokenizer, data_file, max_len, vocab_size, mlm, k,
                temperature, n_epochs, settings, batch_size, device, log_probs_dtype="float16", token_probs=None,
                masking=None, force=False, teacher=None):
    """Write (or finish) the cache folder `path`; see the module docstring. teacher_lm: a models.TeacherLM on
    `device`; teacher: its teacher_identity (a resumed build must have the same); masking:
    masking.seeded_mlm_draw's keyword arguments but epoch and index (MLM). tokenizer and teacher may be None
    (benchmarks: nothing then identifies them, and train.py refuses the cache)."""
    n_epochs = n_epochs if mlm else 1  # a causal LM's teacher sees the same input every epoch
    lengths = np.asarray(dataset.lengths, dtype=np.int64)
    masked = getattr(dataset, "has_loss_mask", False)
    if masked and mlm:
        raise UserError("a corpus with a loss mask (conversations) is for causal LMs: drop --mlm")
    item_offsets = np.concatenate([[0], np.cumsum(lengths)])
    meta = _meta(k=k, vocab_size=vocab_size, mlm=mlm, n_epochs=n_epochs, max_len=max_len, temperature=temperature,
                 teacher=teacher, data_file=data_file, corpus=corpus, tokenizer=tokenizer, settings=settings,
                 log_probs_dtype=log_probs_dtype)
    done = _start_or_resume(path, meta, force)
    if mlm:
        inputs, predicted = _mlm_draws(dataset, item_offsets, token_probs, n_epochs, masking)
        restrict = settings.get("restrict_ce_to_mask")
        counts = predicted.astype(np.int64) if restrict else np.ones_like(predicted, np.int64)
        rows_per_unit = np.add.reduceat(counts, item_offsets[:-1], axis=1).reshape(-1)  # (n_epochs * n_items,)
        for name, array in (("mlm_inputs.bin", inputs), ("mlm_predicted.bin", predicted)):
            array.tofile(os.path.join(path, name))  # deterministic: rewritten identically on resume
    elif masked:  # the positions predicting a masked token: masking.loss_positions_of, per item
        rows_per_unit = np.array([int(np.count_nonzero(dataset[i][2][1:])) for i in range(len(dataset))],
                                 dtype=np.int64)
    else:
        rows_per_unit = lengths
    row_offsets = np.concatenate([[0], np.cumsum(rows_per_unit)]).astype(np.int64)
    np.save(os.path.join(path, "row_offsets.npy"), row_offsets)
    np.save(os.path.join(path, "item_offsets.npy"), item_offsets.astype(np.int64))
    n_rows = int(row_offsets[-1])
    mode = "r+" if done else "w+"
    ids_file = np.memmap(os.path.join(path, "ids.bin"), dtype=meta["ids_dtype"], mode=mode, shape=(max(n_rows, 1), k))
    lp_file = np.memmap(os.path.join(path, "log_probs.bin"), dtype=log_probs_dtype, mode=mode,
                        shape=(max(n_rows, 1), k + 1))
    n_items = len(dataset)
    n_units = n_epochs * n_items
    logger.info("Teacher cache %s: %d rows of top-%d, %d units (epoch, sequence) to go of %d.", path, n_rows, k,
                n_units - done, n_units)
    from tqdm import tqdm

    bar = tqdm(desc="Teacher cache", total=n_units, initial=done, unit="seq", mininterval=5)
    unit = done
    while unit < n_units:
        epoch, first = divmod(unit, n_items)
        last = min(first + batch_size, n_items)
        items = [dataset[i] for i in range(first, last)]
        token_ids, lens, *item_mask = dataset.batch_sequences(items)
        bs, width = token_ids.shape
        attn = attention_mask_from_lengths(lens, width)
        if mlm:
            for row, index in enumerate(range(first, last)):
                lo, n = item_offsets[index], int(lens[row])
                token_ids[row, :n] = torch.from_numpy(inputs[epoch, lo: lo + n].astype(np.int64))
            if settings.get("restrict_ce_to_mask"):
                keep = np.zeros((bs, width), dtype=bool)
                for row, index in enumerate(range(first, last)):
                    lo, n = item_offsets[index], int(lens[row])
                    keep[row, :n] = predicted[epoch, lo: lo + n]
                rows = torch.from_numpy(np.flatnonzero(keep))
            else:
                rows = non_padding_positions(lens, width)
        elif masked:
            rows = loss_positions_of(item_mask[0]).flatten().nonzero().squeeze(-1)
        else:
            rows = non_padding_positions(lens, width)
        padded = bool((lens.numpy() < width).any())
        # As the training step runs the teacher: no mask for a causal LM or a batch without padding.
        mask = attn.to(device) if (mlm and padded) else None
        with torch.no_grad():
            t_logits, _ = teacher_lm(token_ids.to(device), mask, rows.to(device))
        ids, log_probs = topk_rows(t_logits[:, :vocab_size], k, temperature)
        lo, hi = row_offsets[unit], row_offsets[unit + (last - first)]
        ids_file[lo:hi] = ids.cpu().numpy().astype(meta["ids_dtype"])
        lp_file[lo:hi] = log_probs.cpu().numpy().astype(log_probs_dtype)
        unit += last - first
        ids_file.flush()
        lp_file.flush()
        write_json_atomic(os.path.join(path, PROGRESS), {"units_done": unit, "units": n_units})
        bar.update(last - first)
    bar.close()
    return _finish(path, meta, tokenizer, n_rows)


def _identity(meta):
    """What a build is, without how far it got."""
    return {k: v for k, v in meta.items() if k not in ("complete", "n_rows", "bytes_per_row", "written_by")}


def _describe(teacher):
    """A teacher_identity in a message: --teacher_name, and the start of its config and vocabulary digests."""
    if not teacher:
        return "no recorded teacher"
    vocabulary = (teacher.get("vocabulary") or {}).get("sha256", "unchecked")
    return f"--teacher_name {teacher['name']} (config {teacher['config_sha256'][:12]}, vocabulary {vocabulary[:12]})"


def _start_or_resume(path, meta, force):
    """Units already written (0 for a fresh build). A folder holding another build is refused unless force."""
    meta_path = os.path.join(path, META)
    if os.path.exists(path) and not os.path.isfile(meta_path) and os.listdir(path) and not force:
        raise UserError(f"--cache_dir {path} exists and is not a teacher cache; use --force to overwrite it")
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        same = _identity(old) == _identity(meta)
        if old.get("teacher") != meta["teacher"] and old.get("format") == FORMAT and not force:
            raise UserError(f"--cache_dir {path} was begun with {_describe(old.get('teacher'))}, this build has "
                            f"{_describe(meta['teacher'])}: run it with the first teacher, or use --force to replace "
                            "it")
        if old.get("complete") and same and not force:
            raise UserError(f"--cache_dir {path} already holds this complete cache; use --force to build it again")
        if not same and not force:
            raise UserError(f"--cache_dir {path} holds a cache built with other settings; use --force to replace it")
        if same and not old.get("complete") and not force:
            progress = os.path.join(path, PROGRESS)
            if os.path.isfile(progress):
                with open(progress) as f:
                    done = int(json.load(f)["units_done"])
                logger.info("Resuming the build of %s after %d units.", path, done)
                return done
    if os.path.exists(path):
        shutil.rmtree(path)
    os.makedirs(path)
    write_json_atomic(meta_path, meta)
    return 0


def cache_size_bytes(path):
    """Bytes of every file in a cache folder."""
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)



class WithIndices(torch.utils.data.Dataset):
    """A dataset whose batches also carry their items' indices (the cache is keyed by them)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return index, self.dataset[index]

    def collate(self, batch):
        """(token_ids, lengths) as the dataset collates them, then the indices (bs,), then the loss mask when the
        dataset has one."""
        token_ids, lengths, *loss_mask = self.dataset.batch_sequences([item for _, item in batch])
        return token_ids, lengths, torch.tensor([index for index, _ in batch], dtype=torch.int64), *loss_mask
