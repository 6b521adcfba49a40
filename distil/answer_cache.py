"""Teacher-written answers as training data in one teacher pass: the corpus and the teacher cache, from the
generation itself (scripts/teacher_answers.py --dump_file / --cache_dir).

The corpus is exactly what scripts/binarized_chat.py writes from the answers file: each prompt plus the teacher's
decoded answer rendered with the chat template (conversations.render_with_mask), cut by --max_seq_length
(fit_length), with the same header. The cache holds, at each position that predicts a masked token, the
teacher's top-k at --cache_temperature: the rows scripts/cache_teacher.py would compute with a second forward.

Where they come from: generation computes the teacher's logits at every prompt position (the prefill) and after
every answer token it feeds back; the logits at position i of prompt + answer are the teacher's prediction of token
i + 1 with everything before it in context, what a forward over the conversation gives there. They serve a
corpus position when the rendered conversation holds the same tokens up to it. That is the rule, checked per
conversation, not assumed: an answer whose decoded text re-tokenizes into other ids (a special token skipped,
a leading space stripped, BPE merging across a boundary differently), or one cut at --max_new_tokens whose
template closes a turn with more than one token, gets its rows from one teacher forward over its rendered
conversation instead (counted: "rescored"). So the cache always matches the corpus token for token.

While the command runs, each batch's corpus sequences and cache rows go to a file of their own in
'<corpus>.parts/' (written atomically, before the batch's answer lines), so an interrupted run resumes after the
last batch both hold; the corpus and the cache are assembled from them once every prompt is answered.
"""
import json
import os
import shutil

import numpy as np
import torch

from distil.conversations import fit_length, render_with_mask
from distil.models import framing_token_ids
from distil.preprocessing import chat_corpus_metadata, chat_corpus_path
from distil.teacher_cache import teacher_identity, topk_rows, write_causal_cache
from lm_seqs_dataset import BinarizedCorpus, BinarizedWriter, LmSeqsDataset
from utils import UserError, logger, special_token_ids, write_json_atomic

DONE = "done.json"


def rows_from_pass(ids, mask, sequence, scores):
    """The generation pass's rows at the positions of `ids` (a rendered conversation) that predict a masked token,
    or None when the pass did not compute them on the same tokens.

    sequence: prompt + completion as generated; scores: generation's scores of it (row i predicts token i + 1)."""
    positions = np.flatnonzero(np.asarray(mask)[1:])  # position p predicts token p + 1
    last = int(positions[-1])
    if last >= len(scores[0]) or list(ids[: last + 1]) != list(sequence[: last + 1]):
        return None
    index = torch.from_numpy(positions)
    return tuple(s[index] for s in scores)


class SamePass:
    """Per batch of answers, the corpus sequences and their cache rows; at the end, the corpus and the cache.

    dump_file: the corpus prefix (as binarized_chat.py's --dump_file); cache_dir: None for the corpus alone."""

    def __init__(self, *, model, tokenizer, model_name, output, dump_file, cache_dir, max_seq_length, k,
                 temperature, log_probs_dtype, device):
        self.model, self.tokenizer, self.model_name, self.output = model, tokenizer, model_name, output
        self.corpus_path = chat_corpus_path(dump_file, model_name)
        self.parts = self.corpus_path + ".parts"
        self.cache_dir, self.max_seq_length = cache_dir, max_seq_length
        self.k, self.temperature, self.log_probs_dtype, self.device = k, temperature, log_probs_dtype, device
        self.vocab_size = model.config.vocab_size

    # -- resuming ---------------------------------------------------------------------------------------

    def check_fresh_outputs(self, force):
        """Before any generation: refuse a --cache_dir that holds something else (unless force)."""
        if self.cache_dir and os.path.exists(self.cache_dir) and os.listdir(self.cache_dir) and not force:
            raise UserError(f"--cache_dir {self.cache_dir} exists and is not empty; use --force to replace it")

    def check_unfinished(self):
        """Refuse to resume a run that finished (its answers, corpus and cache all written): nothing is cut."""
        if os.path.isfile(os.path.join(self.parts, DONE)):
            raise UserError(f"--output {self.output} is complete, and so are --dump_file's corpus "
                            f"{self.corpus_path}{' and --cache_dir ' + str(self.cache_dir) if self.cache_dir else ''}"
                            "; use --force to answer again")

    def start(self, answered):
        """Prompts the answers and the parts both hold (a whole number of batches): the run resumes there. A
        fresh run (answered 0) empties the parts folder."""
        if answered == 0:
            shutil.rmtree(self.parts, ignore_errors=True)
        os.makedirs(self.parts, exist_ok=True)
        held = 0
        while held < answered and os.path.isfile(self._part(held)):
            held = self._next(held)
        for name in os.listdir(self.parts):  # batches past the resume point are answered again
            if name.startswith("batch-") and int(name[6:15]) >= held:
                os.remove(os.path.join(self.parts, name))
        return held

    def _part(self, lo):
        return os.path.join(self.parts, f"batch-{lo:09d}.npz")

    def _next(self, lo):
        with np.load(self._part(lo)) as part:
            return lo + int(part["n_prompts"])

    # -- one batch --------------------------------------------------------------------------------------

    def score(self, logits):
        """generate's score: the cache row of every position (None without --cache_dir: nothing is kept)."""
        ids, log_probs = topk_rows(logits[..., : self.vocab_size], self.k, self.temperature)
        return ids.to(torch.int32), log_probs

    def add_batch(self, lo, conversations, prompts, rollouts):
        """Render the batch's conversations (prompt + decoded answer) as binarized_chat.py does, take their cache
        rows from the pass (or a forward when the pass's tokens differ), and write the batch's part file."""
        sequences, masks, rows, rescore = [], [], [], []
        counts = {"dropped": 0, "cut": 0, "rescored": 0}
        for n, (messages, prompt, completion) in enumerate(zip(conversations, prompts, rollouts.completions)):
            ids, mask, turn_ends = render_with_mask(self.tokenizer, messages, f"{self.output}: answer {lo + n}")
            fitted = fit_length(ids, mask, turn_ends, self.max_seq_length)
            if fitted is None:
                counts["dropped"] += 1
                continue
            counts["cut"] += len(fitted[0]) < len(ids)
            ids, mask = fitted
            sequences.append(ids)
            masks.append(np.asarray(mask, dtype=bool))
            if self.cache_dir:
                found = rows_from_pass(ids, mask, list(prompt) + list(completion), rollouts.scores[n])
                rows.append(found)
                if found is None:
                    rescore.append(len(rows) - 1)
        if rescore:
            counts["rescored"] = len(rescore)
            for i, found in zip(rescore, self._forward_rows([sequences[i] for i in rescore],
                                                            [masks[i] for i in rescore])):
                rows[i] = found
        payload = {"n_prompts": np.int64(len(prompts)), "tokens": np.concatenate(sequences).astype(np.int64)
                   if sequences else np.zeros(0, np.int64), "lengths": np.array([len(s) for s in sequences],
                                                                                 dtype=np.int64),
                   "mask": np.concatenate(masks) if masks else np.zeros(0, bool),
                   "counts": np.array([counts["dropped"], counts["cut"], counts["rescored"]], dtype=np.int64)}
        if self.cache_dir:
            payload["row_counts"] = np.array([len(r[0]) for r in rows], dtype=np.int64)
            payload["row_ids"] = torch.cat([r[0] for r in rows]).numpy() if rows else np.zeros((0, self.k), np.int32)
            payload["row_log_probs"] = torch.cat([r[1] for r in rows]).numpy() if rows else \
                np.zeros((0, self.k + 1), np.float32)
        tmp = self._part(lo) + ".tmp.npz"
        np.savez(tmp, **payload)
        os.replace(tmp, self._part(lo))  # whole or absent: a crash leaves the batch to answer again
        return counts

    @torch.no_grad()
    def _forward_rows(self, sequences, masks):
        """Cache rows of conversations the pass cannot serve: one teacher forward over them (right-padded, as
        scripts/cache_teacher.py runs it), the rows at the positions predicting a masked token."""
        width = max(len(s) for s in sequences)
        ids = torch.zeros((len(sequences), width), dtype=torch.long)
        attention = torch.zeros_like(ids)
        for row, sequence in enumerate(sequences):
            ids[row, : len(sequence)] = torch.as_tensor(sequence)
            attention[row, : len(sequence)] = 1
        was_training = self.model.training
        self.model.eval()
        try:
            logits = self.model(input_ids=ids.to(self.device), attention_mask=attention.to(self.device)).logits
        finally:
            self.model.train(was_training)
        out = []
        for row, mask in enumerate(masks):
            positions = torch.from_numpy(np.flatnonzero(mask[1:])).to(logits.device)
            out.append(tuple(t.cpu() for t in self.score(logits[row, positions])))
        return out

    # -- the end ----------------------------------------------------------------------------------------

    def finish(self, n_prompts):
        """Assemble the corpus (and the cache) from the parts of every batch; returns the summed counts."""
        los, lo = [], 0
        while lo < n_prompts:
            los.append(lo)
            lo = self._next(lo)
        parts = [dict(np.load(self._part(lo))) for lo in los]
        counts = dict(zip(("dropped", "cut", "rescored"), np.sum([p["counts"] for p in parts], axis=0).tolist()))
        if not any(len(p["lengths"]) for p in parts):
            raise UserError(f"--dump_file: no conversation left to binarize (all {counts['dropped']} longer than "
                            f"--max_seq_length {self.max_seq_length} at their first answer)")
        metadata = chat_corpus_metadata(self.tokenizer, self.model_name, self.output, "assistant", self.max_seq_length)
        with BinarizedWriter(self.corpus_path, vocab_size=len(self.tokenizer), metadata=metadata,
                             loss_mask=True) as writer:
            for part in parts:  # one conversation at a time, as binarize_conversations adds them
                bounds = np.concatenate([[0], np.cumsum(part["lengths"])])
                for a, b in zip(bounds[:-1], bounds[1:]):
                    writer.add_flat(part["tokens"][a:b], [b - a], part["mask"][a:b])
        logger.info("%d conversations, %d of them cut at a turn boundary and %d dropped (longer than "
                    "--max_seq_length %d) -> %s", sum(len(p["lengths"]) for p in parts), counts["cut"],
                    counts["dropped"], self.max_seq_length, self.corpus_path)
        if self.cache_dir:
            self._write_cache(parts)
            logger.info("Teacher cache of the same pass -> %s (%d of the answers re-tokenized differently from "
                        "the generated ids and were scored by a teacher forward)", self.cache_dir, counts["rescored"])
        for lo in los:
            os.remove(self._part(lo))
        write_json_atomic(os.path.join(self.parts, DONE), {"prompts": n_prompts, **counts})
        return counts

    def _write_cache(self, parts):
        corpus = BinarizedCorpus.open(self.corpus_path)
        special = framing_token_ids(special_token_ids(self.tokenizer), False, corpus.metadata.get("framing"))
        # the items train.py will read (LmSeqsDataset drops sequences under 12 tokens or half unknown)
        dataset = LmSeqsDataset(corpus, special_tok_ids=special, mlm=False, max_len=self.max_seq_length)
        counts = np.concatenate([p["row_counts"] for p in parts])
        first = np.concatenate([[0], np.cumsum(counts)])
        row_ids = np.concatenate([p["row_ids"] for p in parts])
        row_log_probs = np.concatenate([p["row_log_probs"] for p in parts])
        sequence_of = np.searchsorted(np.asarray(corpus.offsets), dataset.starts, side="right") - 1
        if dataset.wrapped.any() or not np.array_equal(np.asarray(corpus.offsets)[sequence_of], dataset.starts):
            raise ValueError(f"{self.corpus_path}: a conversation was cut into chunks; the cache cannot index it")

        def rows(index):
            s = int(sequence_of[index])
            return row_ids[first[s]: first[s + 1]], row_log_probs[first[s]: first[s + 1]]

        write_causal_cache(self.cache_dir, rows=rows, dataset=dataset, corpus=corpus, tokenizer=self.tokenizer,
                           data_file=corpus.path, max_len=self.max_seq_length, vocab_size=self.vocab_size, k=self.k,
                           temperature=self.temperature, teacher=teacher_identity(self.model_name, self.model.config,
                                                                                  self.tokenizer),
                           log_probs_dtype=self.log_probs_dtype, force=True, written_by="scripts/teacher_answers.py")
