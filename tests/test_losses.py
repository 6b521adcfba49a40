"""The loss functions at the top of distiller.py against the plain computations of the original scripts.

Every reference below is written out here with stock torch modules (masked_select + KLDivLoss, MSELoss,
CosineEmbeddingLoss, cross_entropy), the way the DistilBERT research scripts computed the losses; nothing
expected is produced by the code under test.
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import distiller
from distiller import IGNORE_INDEX, clm_loss, cosine_loss, lm_loss, soft_target_losses

VOCAB = 50


# ------------------------------------------------------------------------------------------ references


def _select(logits, mask):
    """Rows of (bs, seq, vocab) logits where mask (bs, seq) is true, as the original did it."""
    full = mask.unsqueeze(-1).expand_as(logits)
    return torch.masked_select(logits, full).view(-1, logits.size(-1))


def ref_ce(s, t, mask, temperature):
    s_sel, t_sel = _select(s, mask), _select(t, mask)
    kl = nn.KLDivLoss(reduction="batchmean")
    return kl(F.log_softmax(s_sel / temperature, dim=-1), F.softmax(t_sel / temperature, dim=-1)) * temperature ** 2


def ref_mse(s, t, mask):
    s_sel, t_sel = _select(s, mask), _select(t, mask)
    return nn.MSELoss(reduction="sum")(s_sel, t_sel) / s_sel.size(0)


def ref_cos(s_hidden, t_hidden, mask):
    dim = s_hidden.size(-1)
    full = mask.unsqueeze(-1).expand_as(s_hidden)
    s_sel = torch.masked_select(s_hidden, full).view(-1, dim)
    t_sel = torch.masked_select(t_hidden, full).view(-1, dim)
    target = s_sel.new_ones(s_sel.size(0))
    return nn.CosineEmbeddingLoss(reduction="mean")(s_sel, t_sel, target)


# ------------------------------------------------------------------------------------------ inputs


def _logits(bs=4, seq=9, vocab=VOCAB, dtype=torch.float64, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(bs, seq, vocab, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = (torch.randn(bs, seq, vocab, generator=g, dtype=torch.float64) * scale).to(dtype)
    return s, t


def _padding_mask(lengths, seq):
    return torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]


def _sparse_mask(bs, seq, seed=1, share=0.2):
    """A 'restrict to masked positions' style mask: a scattered few positions, some rows with none."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(bs, seq, generator=g) < share
    mask[0] = False  # a sequence with nothing to predict
    mask[1, 3] = True  # at least one selected position
    return mask


def _close(actual, expected, tol):
    assert torch.isfinite(torch.as_tensor(actual)).all()
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64).detach(), rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------ ce / mse values


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5, 4.0])
def test_ce_and_mse_match_reference_with_padding(temperature):
    s, t = _logits()
    mask = _padding_mask([9, 5, 1, 7], 9)
    ce, mse = soft_target_losses(s, t, mask, temperature)
    assert ce.dim() == 0 and mse.dim() == 0
    _close(ce, ref_ce(s, t, mask, temperature), 1e-5)
    _close(mse, ref_mse(s, t, mask), 1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.0])
def test_ce_and_mse_match_reference_on_sparse_masked_positions(temperature):
    s, t = _logits(bs=5, seq=12, seed=3)
    mask = _sparse_mask(5, 12)
    assert 0 < int(mask.sum()) < mask.numel() // 2
    ce, mse = soft_target_losses(s, t, mask, temperature)
    _close(ce, ref_ce(s, t, mask, temperature), 1e-5)
    _close(mse, ref_mse(s, t, mask), 1e-5)


def test_ce_and_mse_match_reference_float32():
    s, t = _logits(dtype=torch.float32, seed=5)
    mask = _padding_mask([9, 2, 8, 6], 9)
    ce, mse = soft_target_losses(s, t, mask, 2.0)
    _close(ce, ref_ce(s.double(), t.double(), mask, 2.0), 1e-5)
    _close(mse, ref_mse(s.double(), t.double(), mask), 1e-5)


def test_masked_out_positions_do_not_matter():
    s, t = _logits(seed=7)
    mask = _padding_mask([9, 4, 6, 2], 9)
    ce, mse = soft_target_losses(s, t, mask, 2.0)
    s2, t2 = s.clone(), t.clone()
    s2[~mask] = 1e4 * torch.randn_like(s2[~mask])
    t2[~mask] = -1e4
    ce2, mse2 = soft_target_losses(s2, t2, mask, 2.0)
    assert torch.equal(ce, ce2) and torch.equal(mse, mse2)


def test_ce_hand_computed_two_token_vocab():
    # Row 0 (selected): student logits (0, 0)     -> p_s = (1/2, 1/2)
    #                   teacher logits (0, ln 3)  -> p_t = (1/4, 3/4)
    #   KL(p_t || p_s) = 1/4 ln(1/2) + 3/4 ln(3/2) = -0.1732868 + 0.3040988 = 0.1308120
    #   squared error  = 0^2 + (ln 3)^2 = 1.2069490
    # Row 1 (selected): identical logits (1, -2) on both sides -> KL 0, squared error 0.
    # Row 2 (NOT selected): wildly different logits, must not count.
    # Averages over the 2 selected rows, T = 1: ce = 0.1308120 / 2 = 0.0654060, mse = 1.2069490 / 2 = 0.6034745.
    ln3 = math.log(3.0)
    s = torch.tensor([[[0.0, 0.0], [1.0, -2.0], [50.0, -50.0]]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[[0.0, ln3], [1.0, -2.0], [-50.0, 50.0]]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False]])
    ce, mse = soft_target_losses(s, t, mask, 1.0)
    assert abs(ce.item() - 0.0654060) < 1e-6
    assert abs(mse.item() - 0.6034745) < 1e-6
    # d ce / d s = T (p_s - p_t) / n = (1/4, -1/4) / 2 on row 0, 0 on rows 1 and 2.
    # d mse / d s = 2 (s - t) / n = (0, -ln 3) on row 0, 0 elsewhere.
    (g_ce,) = torch.autograd.grad(ce, s, retain_graph=True)
    (g_mse,) = torch.autograd.grad(mse, s)
    _close(g_ce, [[[0.125, -0.125], [0.0, 0.0], [0.0, 0.0]]], 1e-6)
    _close(g_mse, [[[0.0, -ln3], [0.0, 0.0], [0.0, 0.0]]], 1e-6)

    # T = 2: logits halved -> p_s = (1/2, 1/2), p_t = (1, sqrt 3) / (1 + sqrt 3), then times T^2 = 4.
    r3 = math.sqrt(3.0)
    q0, q1 = 1.0 / (1.0 + r3), r3 / (1.0 + r3)
    expected_kl_row0 = q0 * math.log(q0 / 0.5) + q1 * math.log(q1 / 0.5)  # = 0.0363...
    ce2, mse2 = soft_target_losses(s.detach(), t, mask, 2.0)
    assert abs(ce2.item() - expected_kl_row0 * 4.0 / 2.0) < 1e-6
    assert abs(mse2.item() - 0.6034745) < 1e-6  # mse does not depend on the temperature


# ------------------------------------------------------------------------------------------ chunking


class _ChunkCounter:
    def __init__(self, monkeypatch):
        self.calls = 0
        original = distiller._logit_losses_chunk

        def counting(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(distiller, "_logit_losses_chunk", counting)


@pytest.mark.parametrize("chunk_elements, rows_per_chunk", [(3 * VOCAB, 3), (VOCAB + 7, 1), (1, 1), (8 * VOCAB, 8)])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_chunked_soft_target_losses_equal_unchunked_and_reference(monkeypatch, chunk_elements, rows_per_chunk,
                                                                  temperature):
    s, t = _logits(bs=3, seq=11, seed=11)
    mask = _padding_mask([11, 6, 9], 11)
    n = int(mask.sum())
    s_ref = s.clone().requires_grad_(True)
    ref = ref_ce(s_ref, t, mask, temperature), ref_mse(s_ref, t, mask)
    ref_grads = torch.autograd.grad(ref[0] + 0.3 * ref[1], s_ref)[0]

    s1 = s.clone().requires_grad_(True)
    ce1, mse1 = soft_target_losses(s1, t, mask, temperature)  # default chunk size: one chunk
    g1 = torch.autograd.grad(ce1 + 0.3 * mse1, s1)[0]

    counter = _ChunkCounter(monkeypatch)
    monkeypatch.setattr(distiller, "_CHUNK_ELEMENTS", chunk_elements)
    s2 = s.clone().requires_grad_(True)
    ce2, mse2 = soft_target_losses(s2, t, mask, temperature)
    forward_chunks = counter.calls
    assert forward_chunks == math.ceil(n / rows_per_chunk) > 1
    g2 = torch.autograd.grad(ce2 + 0.3 * mse2, s2)[0]
    assert counter.calls == 2 * forward_chunks  # backward recomputes every chunk

    _close(ce2, ce1, 1e-6)
    _close(mse2, mse1, 1e-6)
    _close(g2, g1, 1e-6)
    _close(ce2, ref[0], 1e-5)
    _close(mse2, ref[1], 1e-5)
    _close(g2, ref_grads, 1e-4)


# ------------------------------------------------------------------------------------------ gradients


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("which_mask", ["padding", "sparse"])
def test_soft_target_gradients_match_autograd_through_reference(dtype, temperature, which_mask):
    s, t = _logits(bs=4, seq=10, dtype=dtype, seed=21)
    mask = _padding_mask([10, 3, 7, 1], 10) if which_mask == "padding" else _sparse_mask(4, 10, seed=4, share=0.3)
    s_mine = s.clone().requires_grad_(True)
    t_mine = t.clone().requires_grad_(True)  # the teacher must get no gradient even if it asks for one
    ce, mse = soft_target_losses(s_mine, t_mine, mask, temperature)

    s_ref = s.double().requires_grad_(True)
    rce, rmse = ref_ce(s_ref, t.double(), mask, temperature), ref_mse(s_ref, t.double(), mask)

    for mine, ref in ((ce, rce), (mse, rmse), (2.0 * ce + 0.5 * mse, 2.0 * rce + 0.5 * rmse)):
        (g,) = torch.autograd.grad(mine, s_mine, retain_graph=True)
        (g_ref,) = torch.autograd.grad(ref, s_ref, retain_graph=True)
        assert g.dtype == dtype and g.shape == s.shape
        _close(g, g_ref, 1e-4)
        assert torch.all(g[~mask] == 0)  # unselected positions get exactly nothing

    (ce + mse).backward()
    assert t_mine.grad is None
    assert s_mine.grad is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_soft_target_losses_low_precision_student(dtype):
    """Half-precision logits (autocast output): losses computed in fp32, gradient returned in the input dtype."""
    s, t = _logits(bs=3, seq=8, dtype=dtype, seed=31, scale=2.0)
    mask = _padding_mask([8, 5, 2], 8)
    s_mine = s.clone().requires_grad_(True)
    ce, mse = soft_target_losses(s_mine, t, mask, 2.0)
    assert ce.dtype == torch.float32 and mse.dtype == torch.float32
    # the values the low-precision tensors actually hold, in float64
    s_ref = s.double().requires_grad_(True)
    rce, rmse = ref_ce(s_ref, t.double(), mask, 2.0), ref_mse(s_ref, t.double(), mask)
    _close(ce, rce, 1e-5)
    _close(mse, rmse, 1e-5)
    (g,) = torch.autograd.grad(ce + mse, s_mine)
    (g_ref,) = torch.autograd.grad(rce + rmse, s_ref)
    assert g.dtype == dtype
    scale = g_ref.abs().max().item()
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-2, atol=1e-2 * scale)


# ------------------------------------------------------------------------------------------ lm / clm


def _labels(bs, seq, vocab, lengths, seed, keep_share=1.0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(vocab, (bs, seq), generator=g)
    drop = torch.rand(bs, seq, generator=g) >= keep_share
    labels[drop | ~_padding_mask(lengths, seq)] = IGNORE_INDEX
    return labels


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lm_loss_matches_cross_entropy(dtype):
    s, _ = _logits(bs=4, seq=10, dtype=dtype, seed=41)
    labels = _labels(4, 10, VOCAB, [10, 4, 7, 2], seed=1, keep_share=0.3)
    labels[1, 0] = 5  # make sure something is labelled
    s_mine = s.clone().requires_grad_(True)
    s_ref = s.double().requires_grad_(True)
    loss = lm_loss(s_mine, labels)
    ref = F.cross_entropy(s_ref.view(-1, VOCAB), labels.view(-1), ignore_index=-100)
    _close(loss, ref, 1e-5)
    # mean over the labelled positions, spelled out
    n = int((labels != IGNORE_INDEX).sum())
    ref_sum = F.cross_entropy(s.double().view(-1, VOCAB), labels.view(-1), ignore_index=-100, reduction="sum")
    _close(loss, ref_sum / n, 1e-5)
    (g,) = torch.autograd.grad(loss, s_mine)
    (g_ref,) = torch.autograd.grad(ref, s_ref)
    _close(g, g_ref, 1e-4)


def test_clm_loss_matches_shifted_cross_entropy():
    s, _ = _logits(bs=3, seq=12, seed=43)
    labels = _labels(3, 12, VOCAB, [12, 8, 3], seed=2)
    loss = clm_loss(s, labels)
    shift_logits = s[:, :-1, :].contiguous()
    shift_labels = labels[:, 1:].contiguous()
    ref = F.cross_entropy(shift_logits.view(-1, VOCAB), shift_labels.view(-1), ignore_index=-100)
    _close(loss, ref, 1e-5)
    # A label at position 0 is never a target (nothing precedes it): changing it changes nothing.
    labels2 = labels.clone()
    labels2[:, 0] = (labels2[:, 0] + 1) % VOCAB
    assert torch.equal(clm_loss(s, labels2), loss)


def test_clm_loss_matches_gpt2_lm_head_loss():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    vocab = 64
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=16, n_layer=1, n_head=2, n_positions=32,
                                       bos_token_id=0, eos_token_id=0)).eval()
    g = torch.Generator().manual_seed(3)
    lengths = [14, 9, 5]
    ids = torch.randint(1, vocab, (3, 14), generator=g)
    attn = _padding_mask(lengths, 14)
    ids[~attn] = 0  # pad with eos like GPT-2 training data
    labels = ids.masked_fill(~attn, IGNORE_INDEX)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attn.long(), labels=labels)
    ours = clm_loss(out.logits, labels)
    _close(ours, out.loss, 1e-5)
    # and not the unpadded loss: padding really is ignored
    with torch.no_grad():
        all_labelled = model(input_ids=ids, attention_mask=attn.long(), labels=ids).loss
    assert abs(all_labelled.item() - ours.item()) > 1e-4


# ------------------------------------------------------------------------------------------ cosine


@pytest.mark.parametrize("which_mask", ["padding", "sparse"])
def test_cosine_loss_matches_cosine_embedding_loss(which_mask):
    g = torch.Generator().manual_seed(51)
    s = torch.randn(4, 9, 16, generator=g, dtype=torch.float64)
    t = torch.randn(4, 9, 16, generator=g, dtype=torch.float64) + 0.5 * s
    mask = _padding_mask([9, 5, 1, 7], 9) if which_mask == "padding" else _sparse_mask(4, 9, seed=5)
    s_mine = s.clone().requires_grad_(True)
    s_ref = s.clone().requires_grad_(True)
    loss = cosine_loss(s_mine, t, mask)
    ref = ref_cos(s_ref, t, mask)
    _close(loss, ref, 1e-5)
    (gm,) = torch.autograd.grad(loss, s_mine)
    (gr,) = torch.autograd.grad(ref, s_ref)
    _close(gm, gr, 1e-4)


def test_cosine_loss_hand_computed():
    # (1, 0) vs (1, 0): cos 1 -> 0;  (1, 0) vs (0, 3): cos 0 -> 1;  (1, 1) vs (-2, -2): cos -1 -> 2.
    # A padded position with anything in it is ignored. Mean = (0 + 1 + 2) / 3 = 1.
    s = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [5.0, 1.0]]])
    t = torch.tensor([[[1.0, 0.0], [0.0, 3.0], [-2.0, -2.0], [-1.0, 7.0]]])
    mask = torch.tensor([[True, True, True, False]])
    assert abs(cosine_loss(s, t, mask).item() - 1.0) < 1e-6


# ------------------------------------------------------------------------------------------ nothing to predict


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_every_loss_is_exactly_zero_when_nothing_is_selected(dtype):
    s, t = _logits(bs=2, seq=5, dtype=dtype, seed=61)
    hidden_s = torch.randn(2, 5, 8, dtype=torch.float64).to(dtype)
    hidden_t = torch.randn(2, 5, 8, dtype=torch.float64).to(dtype)
    empty = torch.zeros(2, 5, dtype=torch.bool)
    no_labels = torch.full((2, 5), IGNORE_INDEX)
    clm_only_first = no_labels.clone()
    clm_only_first[:, 0] = 3  # position 0 is never a CLM target, so CLM still has nothing to predict

    s_var = s.clone().requires_grad_(True)
    h_var = hidden_s.clone().requires_grad_(True)
    ce, mse = soft_target_losses(s_var, t, empty, 2.0)
    losses = {"ce": ce, "mse": mse, "mlm": lm_loss(s_var, no_labels), "clm": clm_loss(s_var, no_labels),
              "clm_first": clm_loss(s_var, clm_only_first), "cos": cosine_loss(h_var, hidden_t, empty)}
    for name, value in losses.items():
        assert value.dim() == 0, name
        assert not torch.isnan(value), name
        assert value.item() == 0.0, name

    total = sum(losses.values())
    total.backward()
    for grad in (s_var.grad, h_var.grad):
        assert grad is not None
        assert torch.isfinite(grad.float()).all()
        assert torch.all(grad == 0)


def test_empty_selection_inside_a_sum_with_other_losses_keeps_their_gradients():
    """A zero term must not poison a sum: the total gradient equals the other term's gradient alone."""
    s, t = _logits(bs=2, seq=6, seed=71)
    labels = _labels(2, 6, VOCAB, [6, 4], seed=9)
    s1 = s.clone().requires_grad_(True)
    ce, mse = soft_target_losses(s1, t, torch.zeros(2, 6, dtype=torch.bool), 2.0)
    (g1,) = torch.autograd.grad(ce + mse + lm_loss(s1, labels), s1)
    s2 = s.clone().requires_grad_(True)
    (g2,) = torch.autograd.grad(F.cross_entropy(s2.view(-1, VOCAB), labels.view(-1), ignore_index=-100), s2)
    _close(g1, g2, 1e-6)


# ------------------------------------------------------------------------------ fused KD + MSE + LM loss


@pytest.mark.parametrize("chunk_elements", [1 << 22, 1, 5 * VOCAB])
@pytest.mark.parametrize("with_teacher", [True, False])
def test_fused_logit_losses_equal_separate_references(monkeypatch, chunk_elements, with_teacher):
    """logit_losses (one gradient buffer for all three terms) equals KLDivLoss / MSELoss / cross_entropy."""
    from distiller import logit_losses

    monkeypatch.setattr(distiller, "_CHUNK_ELEMENTS", chunk_elements)
    gen = torch.Generator().manual_seed(3)
    n = 23
    s = torch.randn(n, VOCAB, generator=gen, dtype=torch.float64)
    t = torch.randn(n, VOCAB, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(0, VOCAB, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < 0.6] = -100  # most rows predict nothing, as with MLM
    temperature = 2.0

    s_ref = s.clone().requires_grad_(True)
    lm_ref = F.cross_entropy(s_ref, labels, ignore_index=-100)
    terms_ref = [lm_ref]
    if with_teacher:
        ce_ref = nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s_ref / temperature, -1),
                                                      F.softmax(t / temperature, -1)) * temperature ** 2
        mse_ref = nn.MSELoss(reduction="sum")(s_ref, t) / n
        terms_ref += [ce_ref, mse_ref]
    weights = [0.7, 1.3, 0.2]
    g_ref = torch.autograd.grad(sum(w * x for w, x in zip(weights, terms_ref)), s_ref)[0]

    s_ours = s.clone().requires_grad_(True)
    ce, mse, lm = logit_losses(s_ours, t if with_teacher else None, labels, temperature)
    terms = [lm] + ([ce, mse] if with_teacher else [])
    g = torch.autograd.grad(sum(w * x for w, x in zip(weights, terms)), s_ours)[0]
    for ours, ref in zip(terms, terms_ref):
        assert abs(ours.item() - ref.item()) < 1e-5 * max(1.0, abs(ref.item()))  # fp32 sums of ~250
    if not with_teacher:
        assert ce.item() == 0 and mse.item() == 0
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


def test_fused_logit_losses_with_nothing_to_predict_give_zero():
    from distiller import logit_losses

    s = torch.randn(4, VOCAB, requires_grad=True)
    labels = torch.full((4,), -100)
    ce, mse, lm = logit_losses(s, s.detach().clone(), labels, 2.0)
    assert lm.item() == 0 and torch.isfinite(ce) and abs(ce.item()) < 1e-6
    (g,) = torch.autograd.grad(ce + mse + lm, s)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("chunk_elements", [1 << 22, 5 * VOCAB + 3])
@pytest.mark.parametrize("weights", [(5.0, 0.1, 2.0), (1.0, 0.0, 0.0), (0.0, 0.0, 1.0)])
def test_weighted_logit_loss_value_and_gradient(monkeypatch, chunk_elements, weights):
    """The training step's fused term: w_ce*KD + w_mse*MSE + w_lm*CE, gradient computed in forward."""
    from distiller import weighted_logit_loss

    monkeypatch.setattr(distiller, "_CHUNK_ELEMENTS", chunk_elements)
    w_ce, w_mse, w_lm = weights
    gen = torch.Generator().manual_seed(5)
    n, temperature = 19, 2.0
    s = torch.randn(n, VOCAB, generator=gen, dtype=torch.float64)
    t = torch.randn(n, VOCAB, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(0, VOCAB, (n,), generator=gen)
    labels[::3] = -100

    s_ref = s.clone().requires_grad_(True)
    ref = (w_ce * nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s_ref / temperature, -1),
                                                       F.softmax(t / temperature, -1)) * temperature ** 2
           + w_mse * nn.MSELoss(reduction="sum")(s_ref, t) / n
           + w_lm * F.cross_entropy(s_ref, labels, ignore_index=-100))
    (g_ref,) = torch.autograd.grad(3.0 * ref, s_ref)  # an outer factor, as gradient accumulation applies

    s_ours = s.clone().requires_grad_(True)
    total, ce, mse, lm = weighted_logit_loss(s_ours, t, labels, temperature, w_ce, w_mse, w_lm)
    (g,) = torch.autograd.grad(3.0 * total, s_ours)
    assert abs(total.item() - ref.item()) < 1e-5 * max(1.0, abs(ref.item()))
    assert not ce.requires_grad and not lm.requires_grad
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("chunk_elements", [1 << 22, 4 * VOCAB + 1])
def test_weighted_logit_loss_kd_rows_restrict_ce_and_mse(monkeypatch, chunk_elements):
    """kd_rows: KD and MSE over the chosen rows only (the others get no KD gradient); LM over labelled rows."""
    from distiller import weighted_logit_loss

    monkeypatch.setattr(distiller, "_CHUNK_ELEMENTS", chunk_elements)
    gen = torch.Generator().manual_seed(7)
    n, temperature, (w_ce, w_mse, w_lm) = 13, 3.0, (5.0, 0.5, 2.0)
    s = torch.randn(n, VOCAB, generator=gen, dtype=torch.float64)
    t = torch.randn(n, VOCAB, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(0, VOCAB, (n,), generator=gen)
    labels[[1, 4, 9]] = -100
    kd_rows = torch.ones(n, dtype=torch.bool)
    kd_rows[[0, 4, 12]] = False
    keep = kd_rows.nonzero().squeeze(-1)

    s_ref = s.clone().requires_grad_(True)
    ref = (w_ce * nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s_ref[keep] / temperature, -1),
                                                       F.softmax(t[keep] / temperature, -1)) * temperature ** 2
           + w_mse * nn.MSELoss(reduction="sum")(s_ref[keep], t[keep]) / len(keep)
           + w_lm * F.cross_entropy(s_ref, labels, ignore_index=-100))
    (g_ref,) = torch.autograd.grad(ref, s_ref)

    s_ours = s.clone().requires_grad_(True)
    total, ce, mse, lm = weighted_logit_loss(s_ours, t, labels, temperature, w_ce, w_mse, w_lm, kd_rows=kd_rows)
    (g,) = torch.autograd.grad(total, s_ours)
    assert abs(total.item() - ref.item()) < 1e-5 * max(1.0, abs(ref.item()))
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)
    # no row chosen: ce and mse are 0, not NaN
    none = torch.zeros(n, dtype=torch.bool)
    total, ce, mse, lm = weighted_logit_loss(s.clone().requires_grad_(True), t, labels, temperature, w_ce, w_mse,
                                             w_lm, kd_rows=none)
    assert ce.item() == 0 and mse.item() == 0 and torch.isfinite(total)


def test_chunking_cpu_cache_sized_gpu_few_chunks():
    """CPU: ~16 MB fp32 chunks. GPU: about 16 chunks (launch latency), never over 2**26 elements per chunk."""
    from distiller import _rows_per_chunk

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)  # a device object: no GPU needed
    vocab = 30522
    assert _rows_per_chunk(32768, vocab, cpu) == (1 << 22) // vocab
    rows = _rows_per_chunk(32768, vocab, gpu)
    assert -(-32768 // rows) <= 16 and rows * vocab <= 1 << 26
    assert _rows_per_chunk(10**6, vocab, gpu) * vocab <= 1 << 26  # huge batches: capped, more chunks
    assert _rows_per_chunk(100, vocab, gpu) == (1 << 22) // vocab  # small batches: as on the CPU
    assert _rows_per_chunk(5, 10**8, cpu) == 1 and _rows_per_chunk(5, 10**8, gpu) == 1
