"""Turning a batch of token ids into what the losses need: MLM corruption, labels, and the loss rows.

Training draws its masking at random (`mask_tokens`, XLM-style: count-smoothed weights, 80/10/10 split);
the held-out evaluation uses a fixed masking that depends only on (seed, sequence index)
(`fixed_mlm_mask`), so two evaluations of the same weights agree exactly. `prepare_batch_mlm` /
`prepare_batch_clm` build the `Batch` a training step takes, with every size known on the host.
"""
import dataclasses
import math
from typing import NamedTuple

import numpy as np
import torch

from distil.losses import IGNORE_INDEX


# ------------------------------------------------------------------------------------- training masking


def smoothed_token_probs(counts, special_ids, smoothing):
    """Masking weight of each token: count^-smoothing (rare tokens are masked more); specials never."""
    probs = np.maximum(np.asarray(counts, dtype=np.float64), 1) ** -smoothing
    probs[list(special_ids)] = 0.0
    return torch.from_numpy(probs.astype(np.float32))


def attention_mask_from_lengths(lengths, max_len):
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]  # (bs, max_len)


def mask_tokens(token_ids, lengths, token_probs, mask_prop, split, mask_id, vocab_size, generator=None,
                return_positions=False):
    """MLM corruption. Returns (corrupted ids, labels with IGNORE_INDEX where nothing is predicted).

    ceil(mask_prop * real tokens) positions are drawn without replacement with weights token_probs[id]
    (zero for special and padding tokens, so those are never picked); each is then replaced by the mask
    token, kept, or replaced by a random token with probabilities split = (mask, keep, rand). Sampling uses
    the exponential-race trick (top-k of weight / Exp(1)), which draws exactly like
    torch.multinomial(replacement=False) but never fails when fewer positions are eligible than asked for
    and needs no host synchronisation. lengths is a CPU tensor: the number to draw is known on the host.

    With return_positions, also returns the drawn flat positions, sorted: every masked position, and, when
    fewer positions were eligible than asked for, some that are not masked (their label is IGNORE_INDEX).
    Their number is known on the host, which is what lets the step select them without a synchronisation.
    """
    bs, max_len = token_ids.shape
    n_target = math.ceil(mask_prop * int(lengths.numpy().sum()))
    weights = token_probs[token_ids].flatten()  # (bs * max_len,)
    race = torch.empty_like(weights).exponential_(generator=generator) / weights  # inf where weight is 0
    picked = torch.topk(race, min(n_target, race.numel()), largest=False).indices
    pred_mask = torch.zeros_like(weights, dtype=torch.bool)
    pred_mask[picked] = True
    pred_mask &= weights > 0
    pred_mask = pred_mask.view(bs, max_len)

    u = torch.rand(token_ids.shape, device=token_ids.device, generator=generator)
    p_mask, p_keep = split[0], split[0] + split[1]
    random_ids = torch.randint(vocab_size, token_ids.shape, device=token_ids.device, generator=generator)
    corrupted = torch.where(u < p_mask, torch.full_like(token_ids, mask_id),
                            torch.where(u < p_keep, token_ids, random_ids))
    corrupted = torch.where(pred_mask, corrupted, token_ids)
    labels = torch.where(pred_mask, token_ids, torch.full_like(token_ids, IGNORE_INDEX))
    if return_positions:
        return corrupted, labels, picked.sort().values
    return corrupted, labels


def non_padding_positions(lengths, max_len, n_real=None):
    """Flat positions (row-major over (bs, max_len)) of the real tokens, in order, computed where `lengths` lives.

    n_real: their number when known on the host (it always is for training: the lengths come from the
    DataLoader); given, device lengths need no synchronisation (the output size is fixed in advance).
    """
    if n_real is None:
        n_real = int(lengths.sum())
    row = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths, output_size=n_real)
    starts = torch.cumsum(lengths, 0) - lengths  # where each row's tokens begin in the flat list of real tokens
    column = torch.arange(n_real, device=lengths.device) - starts[row]
    return row * max_len + column


def mask_and_rows_on_device(lengths, max_len, device):
    """(attention mask, non-padding rows) on the device, built there from the CPU lengths alone.

    Only the lengths cross from the host: the DataLoader pinned them with the batch (pin_memory on a GPU), so
    the copy is truly asynchronous. A mask or row list built on the host would be pageable memory, and a
    non-blocking copy from pageable memory may wait for the GPU, which would undo the sync-free step.
    """
    n_real = int(lengths.numpy().sum())
    lengths = lengths.to(device, non_blocking=True)
    return attention_mask_from_lengths(lengths, max_len), non_padding_positions(lengths, max_len, n_real)


class Batch(NamedTuple):
    """What Distiller.step takes: device tensors, and facts about them known on the host."""
    input_ids: torch.Tensor  # (bs, seq), MLM-corrupted for MLM
    attention_mask: torch.Tensor  # (bs, seq) bool, true at real tokens
    lm_labels: torch.Tensor  # (bs, seq), IGNORE_INDEX where nothing is predicted
    rows: torch.Tensor  # flat positions whose logits a loss reads
    padded: bool  # whether any sequence is shorter than seq
    # (bs, seq) bool, only with a loss-masked corpus: the positions every loss reads (those predicting a masked
    # token), for the terms over hidden states; None: every real position, the attention mask
    loss_positions: torch.Tensor = None


def clm_labels(token_ids, attention_mask):
    return token_ids.masked_fill(~attention_mask, IGNORE_INDEX)


@dataclasses.dataclass(frozen=True)
class MlmMasking:
    """How training corrupts a batch for MLM (train.py's --mlm_* and --word_* flags)."""
    token_probs: torch.Tensor  # (vocab,) masking weight of each token id, on the training device
    mask_prop: float  # share of the real tokens to predict
    split: tuple  # (mask, keep, random) probabilities of a drawn position
    mask_id: int
    vocab_size: int  # random replacements are drawn below this id
    restrict_to_mask: bool = False  # loss rows: only the drawn positions (--restrict_ce_to_mask)


def _padded(lengths, max_len):
    return bool((lengths.numpy() < max_len).any())


def prepare_batch_mlm(token_ids, lengths, device, masking):
    """(bs, seq) ids and CPU lengths -> a Batch on the device: corrupted ids, attention mask, MLM labels,
    and the flat positions whose logits a loss reads (masked ones with restrict_to_mask, else real tokens).
    Every size is known on the host, so the step that follows makes no device synchronisation.
    """
    max_len = token_ids.size(1)
    attn_mask, real_rows = mask_and_rows_on_device(lengths, max_len, device)
    token_ids = token_ids.to(device, non_blocking=True)
    restrict = masking.restrict_to_mask
    token_ids, labels, *drawn = mask_tokens(token_ids, lengths, masking.token_probs, masking.mask_prop,
                                            masking.split, masking.mask_id, masking.vocab_size,
                                            return_positions=restrict)
    rows = drawn[0] if restrict else real_rows
    return Batch(token_ids, attn_mask, labels, rows, _padded(lengths, max_len))


def loss_positions_of(loss_mask):
    """(bs, seq) bool: position i is read by the losses when token i + 1 is a target (loss_mask (bs, seq), the
    corpus's per-token mask; False on padding). The last position predicts nothing."""
    positions = torch.zeros_like(loss_mask)
    positions[:, :-1] = loss_mask[:, 1:]
    return positions


def prepare_batch_clm(token_ids, lengths, device, loss_mask=None):
    """(bs, seq) ids and CPU lengths -> a Batch on the device; labels are the ids themselves (the step shifts
    them: position i predicts token i + 1), IGNORE_INDEX on padding.

    loss_mask (bs, seq) CPU bool, from a corpus that carries one (a conversation's assistant tokens): every loss
    then reads only the positions that predict a masked token. The model still reads the whole sequence; a
    token outside the mask is context, never a target. The rows are found on the host, where the mask is.
    """
    max_len = token_ids.size(1)
    if loss_mask is None:
        attn_mask, rows = mask_and_rows_on_device(lengths, max_len, device)
        token_ids = token_ids.to(device, non_blocking=True)
        return Batch(token_ids, attn_mask, clm_labels(token_ids, attn_mask), rows, _padded(lengths, max_len))
    positions = loss_positions_of(loss_mask)
    rows = positions.flatten().nonzero().squeeze(-1)
    labels = token_ids.masked_fill(~loss_mask, IGNORE_INDEX)
    attn_mask = attention_mask_from_lengths(lengths, max_len)
    return Batch(token_ids.to(device), attn_mask.to(device), labels.to(device), rows.to(device),
                 _padded(lengths, max_len), positions.to(device))


def seeded_mlm_draw(ids, token_probs, *, mask_prop, split, mask_id, vocab_size, seed, epoch, index):
    """The MLM corruption of one sequence in one epoch, fixed by (seed, epoch, index): what a teacher cache
    stores (distil/teacher_cache.py) and training with it replays. Returns (corrupted ids, predicted: bool), numpy.

    The same recipe as `mask_tokens` (count-smoothed weights token_probs (vocab,) numpy, zero for specials;
    the split between mask, keep and random), drawn per sequence instead of per batch: ceil(mask_prop * length)
    positions (at most the eligible ones), so that the draw does not depend on which batch the sequence
    lands in.
    """
    ids = np.asarray(ids)
    rng = np.random.default_rng([int(seed), int(epoch), int(index)])
    weights = token_probs[ids].astype(np.float64)  # (length,)
    n_pick = min(math.ceil(mask_prop * len(ids)), int(np.count_nonzero(weights)))
    with np.errstate(divide="ignore"):
        race = rng.exponential(size=len(ids)) / weights  # inf where the weight is 0: never picked
    predicted = np.zeros(len(ids), dtype=bool)
    if n_pick:
        predicted[np.argpartition(race, n_pick - 1)[:n_pick]] = True
    u = rng.random(len(ids))
    random_ids = rng.integers(vocab_size, size=len(ids))
    corrupted = np.where(u < split[0], mask_id, np.where(u < split[0] + split[1], ids, random_ids))
    return np.where(predicted, corrupted, ids).astype(ids.dtype), predicted


# ------------------------------------------------------------------------------------- evaluation masking


def fixed_mlm_mask(token_ids, lengths, indices, *, special_ids, mask_id, seed=0, mask_prop=0.15):
    """Deterministic MLM corruption for evaluation: (input ids, labels with IGNORE_INDEX elsewhere).

    token_ids (bs, L) and lengths (bs,) as batch_sequences returns them (CPU); indices: the dataset index
    of each row. In row r, ceil(mask_prop * n) of its n eligible tokens (real, not special) are chosen
    uniformly without replacement by a generator seeded with (seed, indices[r]), and all of them become the
    mask token. Training's 80/10/10 split and count-smoothed weights are left out on purpose: the kept and
    random-replaced positions add noise to the number without measuring anything extra, and uniform weights
    make the loss an unbiased average over the corpus's tokens.
    """
    token_ids = torch.as_tensor(token_ids)
    lengths = torch.as_tensor(lengths)
    ids = token_ids.numpy()
    special = np.fromiter((int(i) for i in special_ids), dtype=np.int64)
    labels = np.full(ids.shape, IGNORE_INDEX, dtype=np.int64)
    for row, (index, length) in enumerate(zip(indices, lengths.tolist())):
        eligible = np.flatnonzero(~np.isin(ids[row, :length], special))
        n_pick = math.ceil(mask_prop * len(eligible))
        if n_pick == 0:
            continue
        # SeedSequence mixes (seed, index) into independent streams; seed * K + index would collide.
        rng = np.random.default_rng([int(seed), int(index)])
        picked = eligible[rng.choice(len(eligible), size=n_pick, replace=False)]
        labels[row, picked] = ids[row, picked]
    labels = torch.from_numpy(labels)
    inputs = torch.where(labels != IGNORE_INDEX, torch.full_like(token_ids, mask_id), token_ids)
    return inputs, labels


def clm_eval_labels(token_ids, lengths, loss_mask=None):
    """Targets of next-token prediction: row r, position i predicts token i + 1 while i + 1 < length (and, with
    a corpus's loss mask (bs, L), only when token i + 1 is masked: the positions training reads)."""
    real = attention_mask_from_lengths(torch.as_tensor(lengths), token_ids.size(1))
    if loss_mask is not None:
        real = real & loss_mask
    return clm_labels(token_ids, real)[:, 1:]  # (bs, L - 1), aligned with logits[:, :-1]
