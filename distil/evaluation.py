"""Held-out evaluation of a student (and how closely it follows its teacher), its size and its speed.

Metrics (all token means over the positions the LM loss covers; with a corpus that carries a loss mask, a
conversation's assistant tokens only, the positions training reads):
    MLM  mlm_loss, pseudo_perplexity = exp(mlm_loss) over a fixed masking of 15% of the real tokens
    CLM  clm_loss, perplexity = exp(clm_loss) over every next-token prediction inside the sequences
    with a teacher: kl_teacher_student = KL(p_teacher || p_student) at temperature 1 and top1_agreement
    (fraction of positions where both argmaxes coincide), over the same positions.

The masking (masking.fixed_mlm_mask) is a pure function of (seed, index of the sequence in the dataset): the
numbers do not depend on the batch size, the batch order, the number of processes, the device, or any global
random state, so two evaluations of the same weights agree exactly and a curve over training measures the
weights alone. The per-position sums come from the same chunked formula training uses (distil/losses.py).

Precision and cost: the forwards run as in training, through models.RowLogitsLM (the vocabulary projection only
at the positions a metric reads, never over every position) and under autocast in the run's dtype (train.py
passes --bf16/--fp16; float32 otherwise); the cross-entropy, KL and argmax over those logits are computed in
float32. A DDP and an FSDP run of the same weights and precision therefore report the same numbers up to
float rounding. Every rank runs as many forwards as the busiest one (an FSDP forward is a collective).

`scripts/evaluate.py` is the command line; train.py hands `evaluate` to the Distiller for evaluation during
training; `count_parameters` and `inference_speed` feed the demo's table.
"""
import math
import time

import numpy as np
import torch

from distil.measuring import sync
from distil.losses import IGNORE_INDEX, logit_loss_sums
from distil.masking import attention_mask_from_lengths, clm_eval_labels, fixed_mlm_mask
from distil.models import RowLogitsLM
from utils import unwrap


def _shard(dataset, batch_size, max_batches, world_size, rank):
    """This rank's dataset indices, longest first (less padding), cut into batches, then None up to the number
    of batches of the rank with the most: every rank runs the same number of forwards. Under FSDP each forward
    is a collective (it gathers the weights), so a rank that finished early would wait in the final all-reduce
    while another still gathers: a hang. A None batch is run on some sequence and not counted."""
    n = len(dataset)
    if max_batches is not None:
        # A global budget, so the evaluated set (and the result) does not depend on the number of ranks.
        n = min(n, max_batches * batch_size)
    indices = np.arange(rank, n, world_size)
    lengths = getattr(dataset, "lengths", None)
    lengths = np.asarray(lengths)[indices] if lengths is not None else np.array([dataset[i][1] for i in indices])
    indices = indices[np.argsort(-lengths, kind="stable")]
    batches = [indices[i: i + batch_size] for i in range(0, len(indices), batch_size)]
    most = math.ceil(len(range(0, n, world_size)) / batch_size)  # rank 0 has the most sequences
    return batches + [None] * (most - len(batches))


def _collate(dataset, indices):
    batch = [dataset[int(i)] for i in indices]
    if hasattr(dataset, "batch_sequences"):
        return dataset.batch_sequences(batch)
    lengths = torch.tensor([b[1] for b in batch])
    out = torch.zeros(len(batch), int(lengths.max()), dtype=torch.long)
    for row, (ids, n) in enumerate(batch):
        out[row, :n] = torch.as_tensor(ids[:n])
    return out, lengths


def _position_sums(s_logits, t_logits, targets):
    """[sum CE, n, sum KL(t||s), n argmax agree] over row logits (n, vocab) and their targets (n,)."""
    ce, kl, agree = logit_loss_sums(s_logits, t_logits, targets, temperature=1.0)
    return torch.stack([ce, ce.new_tensor(targets.numel()), kl, agree])


def _targets(token_ids, lengths, indices, mlm, special, mask_id, seed, mask_prop, loss_mask=None):
    """(inputs, targets) on the host, targets (bs, L) with IGNORE_INDEX where no metric reads the logits: the
    fixed masking's positions (MLM), or each position followed by a real token (CLM: i predicts i + 1), a token
    of the corpus's loss mask when it has one (a conversation's assistant turns: what training read)."""
    if mlm:
        if loss_mask is not None:
            raise ValueError("a corpus with a loss mask (conversations) is for causal LMs; MLM evaluation "
                             "has no use for it")
        return fixed_mlm_mask(token_ids, lengths, indices, special_ids=special, mask_id=mask_id, seed=seed,
                              mask_prop=mask_prop)
    shifted = clm_eval_labels(token_ids, lengths, loss_mask)  # (bs, L - 1), aligned with positions 0 .. L - 2
    return token_ids, torch.cat([shifted, shifted.new_full((shifted.size(0), 1), IGNORE_INDEX)], dim=1)


def _row_model(model):
    """The model as a models.RowLogitsLM (vocabulary projection only at the given rows); an FSDP-sharded
    student already is one (its root), and must be called through it."""
    model = unwrap(model)
    return model if isinstance(model, RowLogitsLM) else RowLogitsLM(model)


def _set_eval(*models):
    """eval() on every model; returns what restores each submodule's own mode (frozen parts may differ)."""
    modes = [(m, m.training) for model in models if model is not None for m in model.modules()]
    for model in models:
        if model is not None:
            model.eval()
    return modes


def _exp(x):
    return math.exp(x) if x < 700 else math.inf


@torch.no_grad()
def evaluate(model, dataset, *, mlm, batch_size, device, special_tok_ids, vocab_size=None, teacher=None, seed=0,
             mask_prop=0.15, max_batches=None, world_size=1, rank=0, amp_dtype=None, progress=False):
    """Evaluate `model` (and its agreement with `teacher`) on `dataset`; see the module docstring.

    dataset: items (token ids, length), e.g. LmSeqsDataset. special_tok_ids: {name: id} as
    utils.special_token_ids returns (MLM needs 'mask_token'; every listed id is excluded from masking).
    vocab_size: if given, logits are cut to their first vocab_size columns (models whose embedding matrix
    was padded beyond the tokenizer). max_batches: evaluate only the first max_batches * batch_size
    sequences of the dataset (all ranks together). With world_size > 1 every rank must call this: rank r
    takes the sequences i % world_size == r, every rank runs as many forwards as the busiest one, and when
    torch.distributed is initialised the sums are all-reduced so that every rank returns the same global numbers.
    amp_dtype: run the forwards under autocast in this dtype (the training run's --bf16/--fp16); the
    losses over the logits are computed in float32 either way. progress: a progress bar over the batches (the
    command line; off inside training, whose own bar stays on screen).

    Returns {'mlm_loss', 'pseudo_perplexity'} (MLM) or {'clm_loss', 'perplexity'} (CLM), plus
    'kl_teacher_student' and 'top1_agreement' with a teacher, 'n_tokens' and 'n_sequences'.
    """
    device = torch.device(device)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if mlm and "mask_token" not in special_tok_ids:
        raise ValueError("MLM evaluation needs special_tok_ids['mask_token']")
    special = sorted(set(special_tok_ids.values()))
    student_lm = _row_model(model)
    teacher_lm = _row_model(teacher) if teacher is not None else None
    modes = _set_eval(student_lm, teacher_lm)
    try:
        sums = torch.zeros(5, dtype=torch.float64, device=device)  # CE, n tokens, KL, agreements, sequences
        from tqdm import tqdm

        batches = _shard(dataset, batch_size, max_batches, world_size, rank)
        for indices in tqdm(batches, desc="Evaluating", unit="batch", disable=not progress, mininterval=2):
            counted = indices is not None
            indices = indices if counted else np.zeros(1, dtype=np.int64)  # a forward to keep step with the others
            token_ids, lengths, *loss_mask = _collate(dataset, indices)
            inputs, targets = _targets(token_ids, lengths, indices, mlm, special, special_tok_ids.get("mask_token"),
                                       seed, mask_prop, loss_mask[0] if loss_mask else None)
            targets = targets.flatten()
            rows = (targets != IGNORE_INDEX).nonzero().squeeze(-1)  # on the host: no device synchronisation
            # Same call as training: CLM pads on the right, where a causal model cannot look anyway.
            mask = attention_mask_from_lengths(lengths, token_ids.size(1)).to(device) if mlm else None
            inputs, device_rows = inputs.to(device), rows.to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                s_logits = student_lm(inputs, mask, device_rows)[0]
                t_logits = teacher_lm(inputs, mask, device_rows)[0] if teacher_lm is not None else None
            if not counted:
                continue
            if vocab_size is not None:
                s_logits = s_logits[..., :vocab_size]
                t_logits = t_logits[..., :vocab_size] if t_logits is not None else None
            if t_logits is not None and t_logits.size(-1) != s_logits.size(-1):
                raise ValueError(f"student logits have {s_logits.size(-1)} columns, the teacher's "
                                 f"{t_logits.size(-1)}; pass vocab_size to compare the shared vocabulary")
            sums[:4] += _position_sums(s_logits, t_logits, targets[rows].to(device))
            sums[4] += len(indices)
        if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
    finally:
        for module, training in modes:
            module.training = training

    ce, n, kl, agree, n_seq = sums.tolist()
    name = "mlm" if mlm else "clm"
    loss = ce / n if n else math.nan
    out = {f"{name}_loss": loss, "pseudo_perplexity" if mlm else "perplexity": _exp(loss) if n else math.nan,
           "n_tokens": int(n), "n_sequences": int(n_seq)}
    if teacher is not None:
        out["kl_teacher_student"] = kl / n if n else math.nan
        out["top1_agreement"] = agree / n if n else math.nan
    return out


# ------------------------------------------------------------------------------------------- size and speed


def count_parameters(model, trainable_only=False):
    """Number of parameters; a tensor shared by two modules (tied embeddings) counts once, as
    Module.parameters() yields it once."""
    return sum(p.numel() for p in unwrap(model).parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def inference_speed(model, dataset, batch_size, device, n_batches, warmup=1):
    """Forward passes per second, in sequences/s, over the first n_batches batches of dataset (in order).

    Batches are built and moved to the device before the clock starts, and `warmup` batches run first
    (kernel selection, allocator growth), so the number measures the model alone.
    """
    model = unwrap(model)
    device = torch.device(device)
    n = len(dataset)
    if n == 0 or n_batches < 1:
        raise ValueError("inference_speed needs a non-empty dataset and n_batches >= 1")
    batches = []
    for b in range(warmup + n_batches):
        indices = [(b * batch_size + j) % n for j in range(batch_size)]  # wrap around a small dataset
        token_ids, lengths = _collate(dataset, indices)[:2]
        attn = attention_mask_from_lengths(lengths, token_ids.size(1))
        batches.append((token_ids.to(device), attn.to(device)))
    modes = _set_eval(model)
    try:
        for token_ids, attn in batches[:warmup]:
            model(input_ids=token_ids, attention_mask=attn)
        sync(device)
        start = time.perf_counter()
        for token_ids, attn in batches[warmup:]:
            model(input_ids=token_ids, attention_mask=attn)
        sync(device)
        elapsed = time.perf_counter() - start
    finally:
        for module, training in modes:
            module.training = training
    return n_batches * batch_size / elapsed
