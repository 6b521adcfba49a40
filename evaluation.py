"""Held-out evaluation of a student (and how closely it follows its teacher), its size and its speed.

Metrics (all token means over the positions the LM loss covers):
    MLM  mlm_loss, pseudo_perplexity = exp(mlm_loss) over a fixed masking of 15% of the real tokens
    CLM  clm_loss, perplexity = exp(clm_loss) over every next-token prediction inside the sequences
    with a teacher: kl_teacher_student = KL(p_teacher || p_student) at temperature 1 and top1_agreement
    (fraction of positions where both argmaxes coincide), over the same positions.

The masking (masking.fixed_mlm_mask) is a pure function of (seed, index of the sequence in the dataset): the
numbers do not depend on the batch size, the batch order, the number of processes, the device, or any global
random state, so two evaluations of the same weights agree exactly and a curve over training measures the
weights alone. The per-position sums come from the same chunked formula training uses (losses.py).

`scripts/evaluate.py` is the command line; train.py hands `evaluate` to the Distiller for evaluation during
training; `count_parameters` and `inference_speed` feed the demo's table.
"""
import math
import time

import numpy as np
import torch

from benchmarking import sync
from losses import IGNORE_INDEX, logit_loss_sums
from masking import attention_mask_from_lengths, clm_eval_labels, fixed_mlm_mask
from utils import unwrap


def _shard(dataset, batch_size, max_batches, world_size, rank):
    """This rank's dataset indices, longest first (less padding), cut into batches."""
    n = len(dataset)
    if max_batches is not None:
        # A global budget, so the evaluated set (and the result) does not depend on the number of ranks.
        n = min(n, max_batches * batch_size)
    indices = np.arange(rank, n, world_size)
    lengths = getattr(dataset, "lengths", None)
    lengths = np.asarray(lengths)[indices] if lengths is not None else np.array([dataset[i][1] for i in indices])
    indices = indices[np.argsort(-lengths, kind="stable")]
    return [indices[i: i + batch_size] for i in range(0, len(indices), batch_size)]


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
    """[sum CE, n, sum KL(t||s), n argmax agree] over the rows of flat logits whose target is not ignored."""
    vocab = s_logits.size(-1)
    targets = targets.reshape(-1)
    rows = (targets != IGNORE_INDEX).nonzero().squeeze(-1)  # evaluation may wait for the device
    s_rows = s_logits.reshape(-1, vocab)[rows]  # (n, vocab)
    t_rows = t_logits.reshape(-1, t_logits.size(-1))[rows] if t_logits is not None else None
    ce, kl, agree = logit_loss_sums(s_rows, t_rows, targets[rows], temperature=1.0)
    return torch.stack([ce, ce.new_tensor(rows.numel()), kl, agree])


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
             mask_prop=0.15, max_batches=None, world_size=1, rank=0):
    """Evaluate `model` (and its agreement with `teacher`) on `dataset`; see the module docstring.

    dataset: items (token ids, length), e.g. LmSeqsDataset. special_tok_ids: {name: id} as
    utils.special_token_ids returns (MLM needs 'mask_token'; every listed id is excluded from masking).
    vocab_size: if given, logits are cut to their first vocab_size columns (models whose embedding matrix
    was padded beyond the tokenizer). max_batches: evaluate only the first max_batches * batch_size
    sequences of the dataset (all ranks together). With world_size > 1 every rank must call this: rank r
    takes the sequences i % world_size == r, and when torch.distributed is initialised the sums are
    all-reduced so that every rank returns the same global numbers.

    Returns {'mlm_loss', 'pseudo_perplexity'} (MLM) or {'clm_loss', 'perplexity'} (CLM), plus
    'kl_teacher_student' and 'top1_agreement' with a teacher, 'n_tokens' and 'n_sequences'.
    """
    model = unwrap(model)
    teacher = unwrap(teacher) if teacher is not None else None
    device = torch.device(device)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if mlm and "mask_token" not in special_tok_ids:
        raise ValueError("MLM evaluation needs special_tok_ids['mask_token']")
    special = sorted(set(special_tok_ids.values()))
    modes = _set_eval(model, teacher)
    try:
        sums = torch.zeros(5, dtype=torch.float64, device=device)  # CE, n tokens, KL, agreements, sequences
        for indices in _shard(dataset, batch_size, max_batches, world_size, rank):
            token_ids, lengths = _collate(dataset, indices)
            attn = attention_mask_from_lengths(lengths, token_ids.size(1))
            if mlm:
                inputs, targets = fixed_mlm_mask(token_ids, lengths, indices, special_ids=special,
                                                 mask_id=special_tok_ids["mask_token"], seed=seed,
                                                 mask_prop=mask_prop)
            else:
                inputs, targets = token_ids, clm_eval_labels(token_ids, lengths)
            inputs, attn = inputs.to(device), attn.to(device)
            targets = targets.to(device)
            # Same call as training: CLM pads on the right, where a causal model cannot look anyway.
            mask = attn if mlm else None
            s_logits = model(input_ids=inputs, attention_mask=mask).logits
            t_logits = teacher(input_ids=inputs, attention_mask=mask).logits if teacher is not None else None
            if vocab_size is not None:
                s_logits = s_logits[..., :vocab_size]
                t_logits = t_logits[..., :vocab_size] if t_logits is not None else None
            if not mlm:
                s_logits = s_logits[:, :-1]
                t_logits = t_logits[:, :-1] if t_logits is not None else None
            if t_logits is not None and t_logits.size(-1) != s_logits.size(-1):
                raise ValueError(f"student logits have {s_logits.size(-1)} columns, the teacher's "
                                 f"{t_logits.size(-1)}; pass vocab_size to compare the shared vocabulary")
            sums[:4] += _position_sums(s_logits, t_logits, targets)
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
        token_ids, lengths = _collate(dataset, indices)
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
