"""MLM masking (mask_tokens, smoothed_token_probs) and CLM labels: statistics over many seeded batches."""
import math

import numpy as np
import pytest
import torch

from distil.losses import IGNORE_INDEX
from distil.masking import attention_mask_from_lengths, clm_labels, mask_tokens, smoothed_token_probs

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIALS = (PAD, CLS, SEP, MASK)  # as train.py passes special_tok_ids.values() (UNK is an ordinary token)
VOCAB = 100
SPLIT = (0.8, 0.1, 0.1)


def make_batch(g, bs=32, max_len=48, min_len=4, word_ids=None, word_weights=None):
    """[CLS] words... [SEP] [PAD]...: (bs, max_len) ids, (bs,) lengths (CPU, as the dataloader gives them)."""
    lengths = torch.randint(min_len, max_len + 1, (bs,), generator=g)
    lengths[0] = max_len  # the longest sequence fills the batch, like the collate function does
    if word_ids is None:
        words = torch.randint(5, VOCAB, (bs, max_len), generator=g)
    else:
        pick = torch.multinomial(word_weights, bs * max_len, replacement=True, generator=g)
        words = word_ids[pick].view(bs, max_len)
    ids = words.clone()
    ids[:, 0] = CLS
    ids[torch.arange(bs), lengths - 1] = SEP
    ids[torch.arange(max_len)[None, :] >= lengths[:, None]] = PAD
    return ids, lengths


def uniform_probs():
    return smoothed_token_probs(np.full(VOCAB, 50), SPECIALS, 0.7)


def _padding(ids, lengths):
    return ~attention_mask_from_lengths(lengths, ids.size(1))


# ------------------------------------------------------------------------------------------ token probs


def test_smoothed_token_probs_formula():
    counts = [0, 1, 4, 100, 7, 0, 25]
    probs = smoothed_token_probs(counts, [0, 3], 0.5)
    # max(count, 1) ** -0.5, specials 0, worked out by hand:
    expected = [0.0, 1.0, 0.5, 0.0, 7 ** -0.5, 1.0, 0.2]
    assert isinstance(probs, torch.Tensor) and probs.dtype == torch.float32 and probs.shape == (7,)
    torch.testing.assert_close(probs, torch.tensor(expected, dtype=torch.float32))

    probs07 = smoothed_token_probs(counts, [6], 0.7)
    expected07 = [1.0, 1.0, 4 ** -0.7, 100 ** -0.7, 7 ** -0.7, 1.0, 0.0]
    torch.testing.assert_close(probs07, torch.tensor(expected07, dtype=torch.float32))

    probs0 = smoothed_token_probs(np.array(counts), (1, 2), 0.0)  # no smoothing: every ordinary token 1
    torch.testing.assert_close(probs0, torch.tensor([1.0, 0, 0, 1, 1, 1, 1]))
    assert counts == [0, 1, 4, 100, 7, 0, 25]  # the input is left alone


def test_attention_mask_and_clm_labels_put_ignore_index_exactly_on_padding():
    lengths = torch.tensor([5, 2, 1, 4])
    attn = attention_mask_from_lengths(lengths, 5)
    expected = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    assert attn.dtype == torch.bool and torch.equal(attn, expected)

    ids = torch.tensor([[7, 8, 9, 10, 11], [12, 13, 0, 0, 0], [14, 0, 0, 0, 0], [15, 16, 17, 0, 0]])
    ids[3, 4] = 0  # padding; note the real token 0 below at a real position must stay a label
    ids[0, 2] = 0
    labels = clm_labels(ids, attn)
    assert torch.equal(labels, torch.tensor([[7, 8, 0, 10, 11], [12, 13, -100, -100, -100],
                                             [14, -100, -100, -100, -100], [15, 16, 17, 0, -100]]))
    assert torch.equal(ids[0], torch.tensor([7, 8, 0, 10, 11]))  # input not modified in place


# ------------------------------------------------------------------------------------------ mask_tokens


def test_labels_and_unchanged_positions_and_no_special_or_padding_ever_chosen():
    g = torch.Generator().manual_seed(0)
    probs = uniform_probs()
    seen_chosen = 0
    for _ in range(60):
        ids, lengths = make_batch(g)
        orig = ids.clone()
        corrupted, labels = mask_tokens(ids, lengths, probs, 0.15, SPLIT, MASK, VOCAB, generator=g)
        assert torch.equal(ids, orig)  # inputs untouched
        assert corrupted.shape == ids.shape and labels.shape == ids.shape
        assert corrupted.dtype == ids.dtype and labels.dtype == ids.dtype
        chosen = labels != IGNORE_INDEX
        seen_chosen += int(chosen.sum())
        # labels: the original id where chosen, IGNORE_INDEX elsewhere
        assert torch.equal(labels[chosen], orig[chosen])
        assert torch.all(labels[~chosen] == IGNORE_INDEX)
        # not chosen -> unchanged
        assert torch.equal(corrupted[~chosen], orig[~chosen])
        # never a special token, never padding
        special = torch.isin(orig, torch.tensor(SPECIALS))
        assert not chosen[special].any()
        pad = _padding(orig, lengths)
        assert not chosen[pad].any()
        assert torch.all(labels[pad] == IGNORE_INDEX) and torch.all(corrupted[pad] == PAD)
        assert torch.all(corrupted[:, 0] == CLS)
        assert torch.all(corrupted[torch.arange(ids.size(0)), lengths - 1] == SEP)
        # every id stays inside the vocabulary
        assert corrupted.min() >= 0 and corrupted.max() < VOCAB
    assert seen_chosen > 5000


def test_masked_share_is_mask_prop():
    g = torch.Generator().manual_seed(1)
    probs = uniform_probs()
    for mask_prop in (0.15, 0.3):
        n_chosen = n_real = 0
        for _ in range(100):
            ids, lengths = make_batch(g, min_len=10)
            _, labels = mask_tokens(ids, lengths, probs, mask_prop, SPLIT, MASK, VOCAB, generator=g)
            chosen = int((labels != IGNORE_INDEX).sum())
            total = int(lengths.sum())
            # plenty of eligible (non-special) tokens, so exactly ceil(mask_prop * real tokens) are chosen
            assert chosen == math.ceil(mask_prop * total)
            n_chosen += chosen
            n_real += total
        assert n_real > 50000
        assert abs(n_chosen / n_real - mask_prop) < 0.01


def test_fewer_eligible_positions_than_asked_chooses_all_eligible_and_nothing_else():
    # mask_prop 1.0 asks for every real token, but [CLS]/[SEP] (probability 0) may never be picked.
    g = torch.Generator().manual_seed(2)
    ids, lengths = make_batch(g, bs=6, max_len=12)
    _, labels = mask_tokens(ids, lengths, uniform_probs(), 1.0, SPLIT, MASK, VOCAB, generator=g)
    eligible = ~_padding(ids, lengths) & ~torch.isin(ids, torch.tensor(SPECIALS))
    assert torch.equal(labels != IGNORE_INDEX, eligible)
    # a batch of nothing but specials: nothing at all is chosen, and nothing breaks
    only_specials = torch.tensor([[CLS, SEP, PAD], [CLS, SEP, PAD]])
    corrupted, labels = mask_tokens(only_specials, torch.tensor([2, 2]), uniform_probs(), 0.5, SPLIT, MASK, VOCAB,
                                    generator=g)
    assert torch.all(labels == IGNORE_INDEX) and torch.equal(corrupted, only_specials)


def test_mask_keep_random_split_is_80_10_10():
    g = torch.Generator().manual_seed(3)
    probs = uniform_probs()
    n_mask = n_same = n_other = 0
    random_ids = []
    for _ in range(300):
        ids, lengths = make_batch(g)
        corrupted, labels = mask_tokens(ids, lengths, probs, 0.15, SPLIT, MASK, VOCAB, generator=g)
        chosen = labels != IGNORE_INDEX
        new, old = corrupted[chosen], ids[chosen]
        is_mask = new == MASK
        is_same = new == old
        n_mask += int(is_mask.sum())
        n_same += int(is_same.sum())
        other = ~is_mask & ~is_same
        n_other += int(other.sum())
        random_ids.append(new[other])
    n = n_mask + n_same + n_other
    assert n > 35000
    # A random replacement is uniform over the vocabulary: it shows as the mask id with probability 1/V and
    # as the original token with probability 1/V (original tokens are never the mask id).
    p_rand = SPLIT[2]
    expected = {"mask": SPLIT[0] + p_rand / VOCAB, "same": SPLIT[1] + p_rand / VOCAB,
                "other": p_rand * (1 - 2 / VOCAB)}
    observed = {"mask": n_mask / n, "same": n_same / n, "other": n_other / n}
    for key, p in expected.items():
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(observed[key] - p) < max(5 * sigma, 0.005), (key, observed[key], p)
    # the random replacements cover the vocabulary (specials included), roughly uniformly
    random_ids = torch.cat(random_ids)
    hist = torch.bincount(random_ids, minlength=VOCAB).double()
    assert (hist[[PAD, CLS, SEP, UNK]] > 0).all()
    assert hist[MASK] == 0 and hist.max() < 4 * hist.sum() / VOCAB


def test_split_extremes():
    g = torch.Generator().manual_seed(4)
    ids, lengths = make_batch(g, bs=16)
    corrupted, labels = mask_tokens(ids, lengths, uniform_probs(), 0.2, (1.0, 0.0, 0.0), MASK, VOCAB, generator=g)
    chosen = labels != IGNORE_INDEX
    assert chosen.any() and torch.all(corrupted[chosen] == MASK)
    corrupted, labels = mask_tokens(ids, lengths, uniform_probs(), 0.2, (0.0, 1.0, 0.0), MASK, VOCAB, generator=g)
    assert (labels != IGNORE_INDEX).any() and torch.equal(corrupted, ids)


def _per_token_rates(smoothing, n_batches=60, seed=5):
    """Masking rate per occurrence of frequent ids (5..54) and of rare ids (55..99)."""
    g = torch.Generator().manual_seed(seed)
    counts = np.zeros(VOCAB)
    counts[5:55] = 10000
    counts[55:] = 10
    probs = smoothed_token_probs(counts, SPECIALS, smoothing)
    word_ids = torch.arange(5, VOCAB)
    word_weights = torch.where(word_ids < 55, 0.9 / 50, 0.1 / 45).double()  # ~10% of the text is rare ids
    frequent_seen = frequent_chosen = rare_seen = rare_chosen = 0
    for _ in range(n_batches):
        ids, lengths = make_batch(g, word_ids=word_ids, word_weights=word_weights)
        _, labels = mask_tokens(ids, lengths, probs, 0.15, SPLIT, MASK, VOCAB, generator=g)
        chosen = labels != IGNORE_INDEX
        frequent = (ids >= 5) & (ids < 55)
        rare = ids >= 55
        frequent_seen += int(frequent.sum())
        rare_seen += int(rare.sum())
        frequent_chosen += int((chosen & frequent).sum())
        rare_chosen += int((chosen & rare).sum())
    assert rare_seen > 2000 and frequent_seen > 20000
    return frequent_chosen / frequent_seen, rare_chosen / rare_seen, rare_seen, frequent_seen


def test_smoothing_masks_rare_tokens_more_often():
    freq_rate, rare_rate, _, _ = _per_token_rates(0.7)
    # weights: 10**-0.7 = 0.1995 for rare vs 10000**-0.7 = 0.00158 for frequent, 126 times larger
    assert rare_rate > 3 * freq_rate
    assert freq_rate < 0.15 < rare_rate


def test_no_smoothing_masks_every_token_at_the_same_rate():
    freq_rate, rare_rate, rare_seen, freq_seen = _per_token_rates(0.0)
    p = 0.15 * 1.1  # about mask_prop * real / eligible tokens
    sigma = math.sqrt(p * (1 - p) * (1 / rare_seen + 1 / freq_seen))
    assert abs(rare_rate - freq_rate) < 5 * sigma
    assert 0.15 < freq_rate < 0.2


@pytest.mark.parametrize("n_target, mask_prop", [(1, 0.2), (2, 0.4)])
def test_draws_follow_token_weights_without_replacement(n_target, mask_prop):
    """[CLS] a b c [SEP]: ceil(mask_prop * 5) positions drawn without replacement with weights 1, 2, 5."""
    token_probs = torch.zeros(VOCAB)
    token_probs[[10, 11, 12]] = torch.tensor([1.0, 2.0, 5.0])
    ids = torch.tensor([[CLS, 10, 11, 12, SEP]])
    lengths = torch.tensor([5])
    assert math.ceil(mask_prop * 5) == n_target
    g = torch.Generator().manual_seed(6)
    trials = 6000
    picked = torch.zeros(3)
    for _ in range(trials):
        _, labels = mask_tokens(ids, lengths, token_probs, mask_prop, SPLIT, MASK, VOCAB, generator=g)
        chosen = labels[0, 1:4] != IGNORE_INDEX
        assert int(chosen.sum()) == n_target
        picked += chosen.float()
    w = [1.0, 2.0, 5.0]
    total = sum(w)
    if n_target == 1:
        expected = [x / total for x in w]
    else:
        # P(i is picked) = 1 - P(the other two are picked); P({j, k}) = wj/S wk/(S-wj) + wk/S wj/(S-wk)
        expected = []
        for i in range(3):
            j, k = [x for x in range(3) if x != i]
            p_jk = w[j] / total * w[k] / (total - w[j]) + w[k] / total * w[j] / (total - w[k])
            expected.append(1 - p_jk)
        # = (0.4405, 0.7455, 0.8140), summing to 2
    rates = (picked / trials).tolist()
    for r, p in zip(rates, expected):
        assert abs(r - p) < 5 * math.sqrt(p * (1 - p) / trials), (rates, expected)


def test_same_generator_seed_gives_same_masking():
    g = torch.Generator().manual_seed(7)
    ids, lengths = make_batch(g)
    a = mask_tokens(ids, lengths, uniform_probs(), 0.15, SPLIT, MASK, VOCAB, generator=torch.Generator().manual_seed(9))
    b = mask_tokens(ids, lengths, uniform_probs(), 0.15, SPLIT, MASK, VOCAB, generator=torch.Generator().manual_seed(9))
    c = mask_tokens(ids, lengths, uniform_probs(), 0.15, SPLIT, MASK, VOCAB, generator=torch.Generator().manual_seed(10))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


# ------------------------------------------------------------------------------------------ batch preparation


def _host_to_device_copies(prepare):
    """The host tensors `prepare()` sends to the training device (every Tensor.to call's source)."""
    sources = []
    original = torch.Tensor.to

    def recording_to(self, *args, **kwargs):
        sources.append(self)
        return original(self, *args, **kwargs)

    torch.Tensor.to = recording_to
    try:
        batch = prepare()
    finally:
        torch.Tensor.to = original
    return batch, sources


@pytest.mark.parametrize("mlm", [True, False])
def test_only_the_dataloaders_tensors_cross_to_the_device(mlm):
    """The DataLoader pins token_ids and lengths (pin_memory on a GPU); the attention mask and the loss rows
    are built on the device from the lengths, not on the host: a non-blocking copy from pageable host memory
    may wait for the GPU. The rows are the real tokens' flat positions, in order, as on the host."""
    from distil.masking import MlmMasking, prepare_batch_clm, prepare_batch_mlm

    ids, lengths = make_batch(torch.Generator().manual_seed(0), bs=5, max_len=9)
    masking = MlmMasking(token_probs=uniform_probs(), mask_prop=0.15, split=SPLIT, mask_id=MASK, vocab_size=VOCAB)
    device = torch.device("cpu")
    batch, sources = _host_to_device_copies(
        lambda: prepare_batch_mlm(ids, lengths, device, masking) if mlm else prepare_batch_clm(ids, lengths, device))
    assert sources and all(source is ids or source is lengths for source in sources)
    real = torch.arange(9)[None, :] < lengths[:, None]
    assert torch.equal(batch.attention_mask, real)
    assert batch.rows.tolist() == np.flatnonzero(real.numpy()).tolist()
