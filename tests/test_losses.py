"""distil/losses.py, the functions training and evaluation call, against the plain computations of the original scripts.

Every reference below is written out here with stock torch modules (masked_select + KLDivLoss, MSELoss,
CosineEmbeddingLoss, cross_entropy), the way the DistilBERT research scripts computed the losses; nothing
expected is produced by the code under test. The functions tested are the ones the loop runs:
`distillation_losses` (Distiller.compute_losses), `weighted_logit_loss` inside it, `cosine_loss`, and
`logit_loss_sums` (evaluation.evaluate).
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from distil import losses
from distil.divergences import TopKTeacher
from distil.losses import (IGNORE_INDEX, cosine_loss, distillation_losses, logit_loss_sums, rows_per_chunk,
                           weighted_logit_loss)

VOCAB = 50
ALPHA_KD = {"ce": 1.0, "mse": 0.0, "mlm": 0.0, "clm": 0.0, "cos": 0.0}


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


def _rows(mask):
    return mask.flatten().nonzero().squeeze(-1)


def _kd(s, t, mask, temperature, w_ce=1.0, w_mse=0.0):
    """(total, ce, mse) of the training step's fused loss on the rows of full logits where mask is true:
    the rows are selected as RowLogitsLM does (only those rows are ever projected to the vocabulary)."""
    rows = _rows(mask)
    total, ce, mse, _ = weighted_logit_loss(s.flatten(0, 1)[rows], t.flatten(0, 1)[rows], None, temperature, w_ce,
                                            w_mse, 0.0)
    return total, ce, mse


def _labels(bs, seq, vocab, lengths, seed, keep_share=1.0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(vocab, (bs, seq), generator=g)
    drop = torch.rand(bs, seq, generator=g) >= keep_share
    labels[drop | ~_padding_mask(lengths, seq)] = IGNORE_INDEX
    return labels


# ------------------------------------------------------------------------------------------ ce / mse values


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5, 4.0])
def test_ce_and_mse_match_reference_with_padding(temperature):
    s, t = _logits()
    mask = _padding_mask([9, 5, 1, 7], 9)
    _, ce, mse = _kd(s, t, mask, temperature)
    assert ce.dim() == 0 and mse.dim() == 0
    _close(ce, ref_ce(s, t, mask, temperature), 1e-5)
    _close(mse, ref_mse(s, t, mask), 1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.0])
def test_ce_and_mse_match_reference_on_sparse_masked_positions(temperature):
    s, t = _logits(bs=5, seq=12, seed=3)
    mask = _sparse_mask(5, 12)
    assert 0 < int(mask.sum()) < mask.numel() // 2
    _, ce, mse = _kd(s, t, mask, temperature)
    _close(ce, ref_ce(s, t, mask, temperature), 1e-5)
    _close(mse, ref_mse(s, t, mask), 1e-5)


def test_ce_and_mse_match_reference_float32():
    s, t = _logits(dtype=torch.float32, seed=5)
    mask = _padding_mask([9, 2, 8, 6], 9)
    _, ce, mse = _kd(s, t, mask, 2.0)
    _close(ce, ref_ce(s.double(), t.double(), mask, 2.0), 1e-5)
    _close(mse, ref_mse(s.double(), t.double(), mask), 1e-5)


def test_ce_hand_computed_two_token_vocab():
    # Row 0: student logits (0, 0)     -> p_s = (1/2, 1/2)
    #        teacher logits (0, ln 3)  -> p_t = (1/4, 3/4)
    #   KL(p_t || p_s) = 1/4 ln(1/2) + 3/4 ln(3/2) = -0.1732868 + 0.3040988 = 0.1308120
    #   squared error  = 0^2 + (ln 3)^2 = 1.2069490
    # Row 1: identical logits (1, -2) on both sides -> KL 0, squared error 0.
    # Averages over the 2 rows, T = 1: ce = 0.1308120 / 2 = 0.0654060, mse = 1.2069490 / 2 = 0.6034745.
    ln3 = math.log(3.0)
    s = torch.tensor([[0.0, 0.0], [1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[0.0, ln3], [1.0, -2.0]], dtype=torch.float64)
    total, ce, mse, lm = weighted_logit_loss(s, t, None, 1.0, 1.0, 0.0, 0.0)
    assert abs(ce.item() - 0.0654060) < 1e-6
    assert abs(mse.item() - 0.6034745) < 1e-6
    assert lm.item() == 0.0
    # d ce / d s = T (p_s - p_t) / n = (1/4, -1/4) / 2 on row 0, 0 on row 1.
    (g_ce,) = torch.autograd.grad(total, s)
    _close(g_ce, [[0.125, -0.125], [0.0, 0.0]], 1e-6)
    # d mse / d s = 2 (s - t) / n = (0, -ln 3) on row 0, 0 elsewhere.
    total, _, _, _ = weighted_logit_loss(s, t, None, 1.0, 0.0, 1.0, 0.0)
    (g_mse,) = torch.autograd.grad(total, s)
    _close(g_mse, [[0.0, -ln3], [0.0, 0.0]], 1e-6)

    # T = 2: logits halved -> p_s = (1/2, 1/2), p_t = (1, sqrt 3) / (1 + sqrt 3), then times T^2 = 4.
    r3 = math.sqrt(3.0)
    q0, q1 = 1.0 / (1.0 + r3), r3 / (1.0 + r3)
    expected_kl_row0 = q0 * math.log(q0 / 0.5) + q1 * math.log(q1 / 0.5)  # = 0.0363...
    _, ce2, mse2, _ = weighted_logit_loss(s.detach(), t, None, 2.0, 1.0, 0.0, 0.0)
    assert abs(ce2.item() - expected_kl_row0 * 4.0 / 2.0) < 1e-6
    assert abs(mse2.item() - 0.6034745) < 1e-6  # mse does not depend on the temperature


# ------------------------------------------------------------------------------------------ chunking


class _ChunkCounter:
    def __init__(self, monkeypatch):
        self.calls = 0
        original = losses.logit_losses_chunk

        def counting(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(losses, "logit_losses_chunk", counting)


@pytest.mark.parametrize("chunk_elements, rows_per_chunk_", [(3 * VOCAB, 3), (VOCAB + 7, 1), (1, 1), (8 * VOCAB, 8)])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_chunked_losses_equal_unchunked_and_reference(monkeypatch, chunk_elements, rows_per_chunk_, temperature):
    s, t = _logits(bs=3, seq=11, seed=11)
    mask = _padding_mask([11, 6, 9], 11)
    n = int(mask.sum())
    s_ref = s.clone().requires_grad_(True)
    ref = ref_ce(s_ref, t, mask, temperature), ref_mse(s_ref, t, mask)
    ref_grads = torch.autograd.grad(ref[0] + 0.3 * ref[1], s_ref)[0]

    s1 = s.clone().requires_grad_(True)
    total1, ce1, mse1 = _kd(s1, t, mask, temperature, 1.0, 0.3)  # default chunk size: one chunk
    g1 = torch.autograd.grad(total1, s1)[0]

    counter = _ChunkCounter(monkeypatch)
    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", chunk_elements)
    s2 = s.clone().requires_grad_(True)
    total2, ce2, mse2 = _kd(s2, t, mask, temperature, 1.0, 0.3)
    assert counter.calls == math.ceil(n / rows_per_chunk_) > 1
    g2 = torch.autograd.grad(total2, s2)[0]
    assert counter.calls == math.ceil(n / rows_per_chunk_)  # the gradient was written in forward: no recompute

    _close(ce2, ce1, 1e-6)
    _close(mse2, mse1, 1e-6)
    _close(g2, g1, 1e-6)
    _close(ce2, ref[0], 1e-5)
    _close(mse2, ref[1], 1e-5)
    _close(g2, ref_grads, 1e-4)


def test_chunking_cpu_cache_sized_gpu_few_chunks():
    """CPU: ~16 MB fp32 chunks. GPU: about 16 chunks (launch latency), never over 2**26 elements per chunk."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)  # a device object: no GPU needed
    vocab = 30522
    assert rows_per_chunk(32768, vocab, cpu) == (1 << 22) // vocab
    rows = rows_per_chunk(32768, vocab, gpu)
    assert -(-32768 // rows) <= 16 and rows * vocab <= 1 << 26
    assert rows_per_chunk(10**6, vocab, gpu) * vocab <= 1 << 26  # huge batches: capped, more chunks
    assert rows_per_chunk(100, vocab, gpu) == (1 << 22) // vocab  # small batches: as on the CPU
    assert rows_per_chunk(5, 10**8, cpu) == 1 and rows_per_chunk(5, 10**8, gpu) == 1


# ------------------------------------------------------------------------------------------ gradients


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("which_mask", ["padding", "sparse"])
def test_soft_target_gradients_match_autograd_through_reference(dtype, temperature, which_mask):
    s, t = _logits(bs=4, seq=10, dtype=dtype, seed=21)
    mask = _padding_mask([10, 3, 7, 1], 10) if which_mask == "padding" else _sparse_mask(4, 10, seed=4, share=0.3)
    s_ref = s.double().clone().requires_grad_(True)
    rce, rmse = ref_ce(s_ref, t.double(), mask, temperature), ref_mse(s_ref, t.double(), mask)
    for (w_ce, w_mse), ref in (((1.0, 0.0), rce), ((0.0, 1.0), rmse), ((2.0, 0.5), 2.0 * rce + 0.5 * rmse)):
        s_mine = s.clone().requires_grad_(True)
        t_mine = t.clone().requires_grad_(True)  # the teacher must get no gradient even if it asks for one
        total, _, _ = _kd(s_mine, t_mine, mask, temperature, w_ce, w_mse)
        total.backward()
        (g_ref,) = torch.autograd.grad(ref, s_ref, retain_graph=True)
        g = s_mine.grad
        assert g.dtype == dtype and g.shape == s.shape
        _close(g, g_ref, 1e-4)
        assert torch.all(g[~mask] == 0)  # rows never selected get exactly nothing
        assert t_mine.grad is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_student_logits(dtype):
    """Half-precision logits (autocast output): losses computed in fp32, gradient returned in the input dtype."""
    s, t = _logits(bs=3, seq=8, dtype=dtype, seed=31, scale=2.0)
    mask = _padding_mask([8, 5, 2], 8)
    s_mine = s.clone().requires_grad_(True)
    total, ce, mse = _kd(s_mine, t, mask, 2.0, 1.0, 1.0)
    assert ce.dtype == torch.float32 and mse.dtype == torch.float32
    # the values the low-precision tensors actually hold, in float64
    s_ref = s.double().requires_grad_(True)
    rce, rmse = ref_ce(s_ref, t.double(), mask, 2.0), ref_mse(s_ref, t.double(), mask)
    _close(ce, rce, 1e-5)
    _close(mse, rmse, 1e-5)
    (g,) = torch.autograd.grad(total, s_mine)
    (g_ref,) = torch.autograd.grad(rce + rmse, s_ref)
    assert g.dtype == dtype
    scale = g_ref.abs().max().item()
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-2, atol=1e-2 * scale)


# ------------------------------------------------------------------------------------------ the fused term


@pytest.mark.parametrize("chunk_elements", [1 << 22, 5 * VOCAB + 3])
@pytest.mark.parametrize("weights", [(5.0, 0.1, 2.0), (1.0, 0.0, 0.0), (0.0, 0.0, 1.0)])
def test_weighted_logit_loss_value_and_gradient(monkeypatch, chunk_elements, weights):
    """w_ce*KD + w_mse*MSE + w_lm*CE, gradient computed in forward, against KLDivLoss / MSELoss / cross_entropy."""
    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", chunk_elements)
    w_ce, w_mse, w_lm = weights
    gen = torch.Generator().manual_seed(5)
    n, temperature = 19, 2.0
    s = torch.randn(n, VOCAB, generator=gen, dtype=torch.float64)
    t = torch.randn(n, VOCAB, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(0, VOCAB, (n,), generator=gen)
    labels[::3] = -100

    s_ref = s.clone().requires_grad_(True)
    terms_ref = (nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s_ref / temperature, -1),
                                                     F.softmax(t / temperature, -1)) * temperature ** 2,
                 nn.MSELoss(reduction="sum")(s_ref, t) / n,
                 F.cross_entropy(s_ref, labels, ignore_index=-100))
    ref = w_ce * terms_ref[0] + w_mse * terms_ref[1] + w_lm * terms_ref[2]
    (g_ref,) = torch.autograd.grad(3.0 * ref, s_ref)  # an outer factor, as gradient accumulation applies

    s_ours = s.clone().requires_grad_(True)
    total, ce, mse, lm = weighted_logit_loss(s_ours, t, labels, temperature, w_ce, w_mse, w_lm)
    (g,) = torch.autograd.grad(3.0 * total, s_ours)
    assert abs(total.item() - ref.item()) < 1e-5 * max(1.0, abs(ref.item()))
    for ours, expected, weight in zip((ce, mse, lm), terms_ref, weights):  # the unweighted terms, for logging
        if weight:
            assert abs(ours.item() - expected.item()) < 1e-5 * max(1.0, abs(expected.item()))
    if not w_lm:
        assert lm.item() == 0  # the labels are not even read
    assert not ce.requires_grad and not lm.requires_grad
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("chunk_elements", [1 << 22, 4 * VOCAB + 1])
def test_weighted_logit_loss_kd_rows_restrict_ce_and_mse(monkeypatch, chunk_elements):
    """kd_rows: KD and MSE over the chosen rows only (the others get no KD gradient); LM over labelled rows."""
    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", chunk_elements)
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


# ------------------------------------------------------------------------------------------ the step's losses


def _alpha(**weights):
    return {name: weights.get(name, 0.0) for name in ("ce", "mlm", "clm", "mse", "cos")}


@pytest.mark.parametrize("restrict", [False, True])
def test_distillation_losses_mlm_match_the_original_formulas(restrict):
    """The MLM step's losses (Distiller.compute_losses) on its loss rows: non-padding ones, or only the masked
    ones with --restrict_ce_to_mask, against the original's full-logit computations."""
    bs, seq = 4, 10
    s, t = _logits(bs=bs, seq=seq, seed=81)
    g = torch.Generator().manual_seed(2)
    s_hidden, t_hidden = torch.randn(bs, seq, 8, generator=g, dtype=torch.float64), torch.randn(bs, seq, 8, generator=g,
                                                                                              dtype=torch.float64)
    attn = _padding_mask([10, 6, 9, 3], seq)
    labels = _labels(bs, seq, VOCAB, [10, 6, 9, 3], seed=3, keep_share=0.3)
    labels[3, 1] = 7
    kd_mask = (labels != IGNORE_INDEX) if restrict else attn
    rows = _rows(kd_mask)
    alpha = _alpha(ce=5.0, mlm=2.0, mse=0.5, cos=1.0)
    s_rows = s.flatten(0, 1)[rows].clone().requires_grad_(True)
    out = distillation_losses(s_rows, t.flatten(0, 1)[rows], s_hidden, t_hidden, attn, labels, rows, alpha=alpha,
                              temperature=2.0, mlm=True, restrict_ce_to_mask=restrict)
    assert set(out) == {"logits", "ce", "mlm", "mse", "cos"}
    ref = {"ce": ref_ce(s, t, kd_mask, 2.0), "mse": ref_mse(s, t, kd_mask),
           "mlm": F.cross_entropy(s.view(-1, VOCAB), labels.view(-1), ignore_index=-100),
           "cos": ref_cos(s_hidden, t_hidden, attn)}
    for name, value in ref.items():
        _close(out[name], value, 1e-5)
    _close(out["logits"], 5.0 * ref["ce"] + 2.0 * ref["mlm"] + 0.5 * ref["mse"], 1e-5)


def test_distillation_losses_clm_predict_the_next_token():
    """CLM: position i predicts token i + 1 (the original's shifted cross-entropy); padding predicts nothing."""
    bs, seq = 3, 12
    s, t = _logits(bs=bs, seq=seq, seed=43)
    lengths = [12, 8, 3]
    attn = _padding_mask(lengths, seq)
    ids = _labels(bs, seq, VOCAB, lengths, seed=2)  # token ids, IGNORE_INDEX on padding: what the step gets
    rows = _rows(attn)
    out = distillation_losses(s.flatten(0, 1)[rows], t.flatten(0, 1)[rows], None, None, attn, ids, rows,
                              alpha=_alpha(ce=1.0, clm=1.0), temperature=1.0, mlm=False)
    shift = F.cross_entropy(s[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1), ignore_index=-100)
    _close(out["clm"], shift, 1e-5)
    _close(out["ce"], ref_ce(s, t, attn, 1.0), 1e-5)
    # A token at position 0 is never a target (nothing precedes it): changing it changes nothing.
    ids2 = ids.clone()
    ids2[:, 0] = (ids2[:, 0] + 1) % VOCAB
    out2 = distillation_losses(s.flatten(0, 1)[rows], t.flatten(0, 1)[rows], None, None, attn, ids2, rows,
                               alpha=_alpha(ce=1.0, clm=1.0), temperature=1.0, mlm=False)
    assert torch.equal(out2["clm"], out["clm"])


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
    rows = _rows(attn)
    ours = distillation_losses(out.logits.flatten(0, 1)[rows], None, None, None, attn, labels, rows,
                               alpha=_alpha(clm=1.0), temperature=1.0, mlm=False)["clm"]
    _close(ours, out.loss, 1e-5)
    # and not the unpadded loss: padding really is ignored
    with torch.no_grad():
        all_labelled = model(input_ids=ids, attention_mask=attn.long(), labels=ids).loss
    assert abs(all_labelled.item() - ours.item()) > 1e-4


def test_distillation_losses_return_only_the_weighted_terms():
    s, t = _logits(bs=2, seq=5, seed=5)
    attn = _padding_mask([5, 3], 5)
    rows = _rows(attn)
    hidden = torch.randn(2, 5, 4, dtype=torch.float64)
    out = distillation_losses(s.flatten(0, 1)[rows], t.flatten(0, 1)[rows], hidden, hidden, attn,
                              torch.full((2, 5), IGNORE_INDEX), rows, alpha=_alpha(cos=1.0), temperature=2.0,
                              mlm=True)
    assert set(out) == {"cos"}  # no logit loss: no fused term, the LM head is not needed
    assert abs(out["cos"].item()) < 1e-6  # identical hidden states


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
    no_labels = torch.full((10,), IGNORE_INDEX)

    s_var = s.flatten(0, 1).clone().requires_grad_(True)
    h_var = hidden_s.clone().requires_grad_(True)
    total, ce, mse, lm = weighted_logit_loss(s_var, t.flatten(0, 1), no_labels, 2.0, 5.0, 1.0, 2.0, kd_rows=empty.flatten())
    cos = cosine_loss(h_var, hidden_t, empty)
    for name, value in {"ce": ce, "mse": mse, "lm": lm, "total": total, "cos": cos}.items():
        assert value.dim() == 0, name
        assert not torch.isnan(value), name
        assert value.item() == 0.0, name
    (total + cos).backward()
    for grad in (s_var.grad, h_var.grad):
        assert grad is not None
        assert torch.isfinite(grad.float()).all()
        assert torch.all(grad == 0)
    # CLM with only position 0 labelled: position 0 is never a target, so there is nothing to predict either
    ids = torch.full((2, 5), IGNORE_INDEX)
    ids[:, 0] = 3
    rows = torch.arange(10)
    out = distillation_losses(s.flatten(0, 1), None, None, None, ~empty, ids, rows, alpha=_alpha(clm=1.0),
                              temperature=1.0, mlm=False)
    assert out["clm"].item() == 0.0


def test_empty_selection_inside_a_sum_with_other_losses_keeps_their_gradients():
    """A zero term must not poison a sum: the total gradient equals the other term's gradient alone."""
    s, t = _logits(bs=2, seq=6, seed=71)
    labels = _labels(2, 6, VOCAB, [6, 4], seed=9).flatten()
    s1 = s.flatten(0, 1).clone().requires_grad_(True)
    total, _, _, _ = weighted_logit_loss(s1, t.flatten(0, 1), labels, 2.0, 1.0, 1.0, 1.0,
                                         kd_rows=torch.zeros(12, dtype=torch.bool))
    (g1,) = torch.autograd.grad(total, s1)
    s2 = s.flatten(0, 1).clone().requires_grad_(True)
    (g2,) = torch.autograd.grad(F.cross_entropy(s2, labels, ignore_index=-100), s2)
    _close(g1, g2, 1e-6)


# ------------------------------------------------------------------------------------------ evaluation sums


@pytest.mark.parametrize("chunk_elements", [1 << 22, 3 * VOCAB])
def test_logit_loss_sums_match_direct_computation(monkeypatch, chunk_elements):
    """evaluation.evaluate's per-position sums: cross-entropy, KL(teacher || student) at T = 1, agreement."""
    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", chunk_elements)
    s, t = _logits(bs=1, seq=17, seed=91)
    s, t = s[0], t[0]
    labels = torch.randint(0, VOCAB, (17,), generator=torch.Generator().manual_seed(1))
    ce, kl, agree = logit_loss_sums(s, t, labels)
    assert ce.dtype == torch.float64
    _close(ce, F.cross_entropy(s, labels, reduction="sum"), 1e-5)
    _close(kl, F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum"), 1e-5)
    assert agree.item() == int((s.argmax(-1) == t.argmax(-1)).sum())
    ce_only, kl_none, agree_none = logit_loss_sums(s, None, labels)
    assert ce_only.item() == ce.item() and kl_none.item() == 0 and agree_none.item() == 0


# ------------------------------------------------------------------------------------------ --fp16


@pytest.mark.parametrize("n_rows, vocab, terms", [(256, 30522, "kd"), (2560, 30522, "kd"), (32768, 2048, "kd"),
                                                  (2560, 2048, "all")])
def test_fp16_logits_keep_their_gradient_under_a_grad_scaler(n_rows, vocab, terms):
    """--fp16: the fused term's gradient, written in forward before the GradScaler's factor exists, must not
    underflow in its float16 buffer. Relative L2 error against an fp32 reference within 1% (without the
    per-row storage scale: about 3% at 2,560 x 30,522 and 32,768 x 2,048, with a third of the entries zero)."""
    w_ce, w_mse, w_lm = (5.0, 0.0, 0.0) if terms == "kd" else (5.0, 0.01, 2.0)
    g = torch.Generator().manual_seed(n_rows)
    s16 = (torch.randn(n_rows, vocab, generator=g) * 3).half()
    t16 = (torch.randn(n_rows, vocab, generator=g) * 3).half()
    labels = torch.randint(0, vocab, (n_rows,), generator=g)
    labels[::3] = IGNORE_INDEX

    s_ref = s16.float().requires_grad_(True)  # the same values, in fp32 arithmetic and an fp32 gradient
    ref = (w_ce * F.kl_div(F.log_softmax(s_ref / 2.0, -1), F.log_softmax(t16.float() / 2.0, -1), log_target=True,
                           reduction="batchmean") * 4.0
           + w_mse * F.mse_loss(s_ref, t16.float(), reduction="sum") / n_rows
           + w_lm * F.cross_entropy(s_ref, labels, ignore_index=IGNORE_INDEX))
    (g_ref,) = torch.autograd.grad(ref, s_ref)

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    s_ours = s16.clone().requires_grad_(True)
    total, *_ = weighted_logit_loss(s_ours, t16, labels, 2.0, w_ce, w_mse, w_lm)
    scaler.scale(total / 50).backward()  # 50 accumulation steps, the README's recipe
    assert s_ours.grad.dtype == torch.float16
    grad = s_ours.grad.float() / (2.0 ** 16 / 50)
    error = ((grad - g_ref).norm() / g_ref.norm()).item()
    assert error < 0.01, f"relative L2 error {error:.2%}"
    assert abs(total.item() - ref.item()) < 1e-4 * abs(ref.item())


# ------------------------------------------------------------------------------------------ the fused head
#
# A plain linear head (Llama, GPT-2, ...) is projected inside the loss, chunk by chunk (losses.HeadRows,
# _FusedHeadLoss). Reference: the same tiny models through the logits path (models.RowLogitsLM without
# fuse_head: the head module's own forward, then _WeightedLogitLoss), which the tests above check against the
# original formulas.

FUSED_CASES = {
    "kl_clm_mse": dict(alpha=dict(ce=5.0, clm=2.0, mse=0.1), temperature=2.0),
    "reverse_kl": dict(alpha=dict(ce=1.0, clm=1.0), kd_loss="reverse_kl"),
    "jsd": dict(alpha=dict(ce=1.0, clm=1.0), kd_loss="jsd"),
    "cached_teacher": dict(alpha=dict(ce=2.0, clm=1.0), temperature=2.0, cached=True),
    "no_teacher": dict(alpha=dict(clm=1.0), teacher=False),
    "kd_rows": dict(alpha=dict(ce=2.0, mlm=1.0, mse=0.5), restrict=True),
    "loss_mask": dict(alpha=dict(ce=1.0, clm=1.0), subset=True),
}


def _tiny_llama(layers, seed, tie=True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=37, max_position_embeddings=64,
                         tie_word_embeddings=tie)
    model = LlamaForCausalLM(config).eval()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    return model


def _run_head_path(fuse, case, ids, lm_labels, rows):
    """(detached losses, {name: gradient} of every student parameter, gradient of the last hidden states)."""
    from distil.models import RowLogitsLM, TeacherLM
    from distil.teacher_cache import topk_rows

    temperature = case.get("temperature", 1.0)
    student_lm = RowLogitsLM(_tiny_llama(1, seed=1), fuse_head=fuse)
    assert student_lm.fused_head == fuse
    s_logits, s_hidden = student_lm(ids, None, rows)
    assert isinstance(s_logits, losses.HeadRows) == fuse
    s_hidden.retain_grad()
    t_logits = None
    if case.get("teacher", True):
        t_logits, _ = TeacherLM(_tiny_llama(2, seed=2).requires_grad_(False), fuse_head=fuse)(ids, None, rows)
        if case.get("cached"):  # the cache's own top-k rows of the unfused teacher's logits
            reference, _ = TeacherLM(_tiny_llama(2, seed=2), fuse_head=False)(ids, None, rows)
            t_logits = TopKTeacher(*topk_rows(reference, 7, temperature))
    attn = torch.ones(ids.shape, dtype=torch.bool)
    out = distillation_losses(s_logits, t_logits, s_hidden, None, attn, lm_labels, rows,
                              alpha=_alpha(**case["alpha"]), temperature=temperature, mlm=case.get("restrict", False),
                              restrict_ce_to_mask=case.get("restrict", False),
                              kd_loss=case.get("kd_loss", "forward_kl"))
    (3.0 * out["logits"]).backward()  # an outer factor, as gradient accumulation and a GradScaler apply
    grads = {name: p.grad for name, p in student_lm.model.named_parameters()}
    return {k: v.detach() for k, v in out.items()}, grads, s_hidden.grad


@pytest.mark.parametrize("chunk_elements", [1 << 22, 3 * 97 + 5])
@pytest.mark.parametrize("name", list(FUSED_CASES))
def test_fused_head_gives_the_losses_and_gradients_of_the_logits_path(monkeypatch, name, chunk_elements):
    """Same losses, and the same gradients for the tied head/embedding weight, every base parameter and the
    hidden states, in one chunk and in several (3 rows each)."""
    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", chunk_elements)
    case = FUSED_CASES[name]
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (2, 9), generator=gen)
    lm_labels = ids.clone()
    if case.get("restrict"):  # MLM-style labels: only some positions carry one (kd_rows = the labelled rows)
        lm_labels[:, ::3] = IGNORE_INDEX
    rows = torch.tensor([0, 2, 3, 5, 8, 9, 10, 14, 16]) if case.get("subset") else torch.arange(18)
    ref_losses, ref_grads, ref_hidden = _run_head_path(False, case, ids, lm_labels, rows)
    fused_losses, fused_grads, fused_hidden = _run_head_path(True, case, ids, lm_labels, rows)
    assert set(fused_losses) == set(ref_losses)
    for key, value in ref_losses.items():
        torch.testing.assert_close(fused_losses[key], value, rtol=1e-6, atol=1e-6)  # fp32 rounding of KL ~ 0
    assert "model.embed_tokens.weight" in ref_grads  # the head's weight: its gradient from head and embedding
    for key, value in ref_grads.items():
        assert fused_grads[key] is not None, key
        torch.testing.assert_close(fused_grads[key], value, rtol=1e-5, atol=1e-6 * value.abs().max().item())
    torch.testing.assert_close(fused_hidden, ref_hidden, rtol=1e-5, atol=1e-6 * ref_hidden.abs().max().item())


def test_fused_head_with_a_bias_and_kd_rows_against_autograd(monkeypatch):
    """HeadRows with a bias (no stock head here has one), kd_rows and a HeadRows teacher, over several chunks:
    the gradients of hidden rows, weight and bias are autograd's through F.linear and the logits path."""
    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", 4 * VOCAB + 1)
    gen = torch.Generator().manual_seed(11)
    n, dim = 17, 8
    h, w, b = (torch.randn(*shape, generator=gen) for shape in ((n, dim), (VOCAB, dim), (VOCAB,)))
    t_h, t_w = torch.randn(n, dim, generator=gen), torch.randn(VOCAB, dim, generator=gen)
    labels = torch.randint(0, VOCAB, (n,), generator=gen)
    labels[::4] = IGNORE_INDEX
    kd_rows = torch.rand(n, generator=gen) > 0.3
    results = []
    for fused in (False, True):
        params = [x.clone().requires_grad_(True) for x in (h, w, b)]
        s = losses.HeadRows(*params, None) if fused else F.linear(*params)
        t = losses.HeadRows(t_h, t_w, None, None) if fused else F.linear(t_h, t_w)
        total, ce, mse, lm = weighted_logit_loss(s, t, labels, 2.0, 5.0, 0.3, 2.0, kd_rows=kd_rows)
        (2.0 * total).backward()
        results.append((torch.stack([total, ce, mse, lm]).detach(), *(p.grad for p in params)))
    for ref, ours in zip(*results):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())
    assert results[1][3].abs().sum() > 0  # the bias did get a gradient


def test_fused_head_under_bf16_autocast_projects_as_autocast_does():
    """--bf16: the forward records autocast's dtype, so the loss computes bf16 logits as the head module would
    (the same loss to float32 rounding) and gradients within bf16's precision of the logits path."""
    from distil.models import RowLogitsLM

    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(5))
    labels = F.pad(ids[:, 1:], (0, 1), value=IGNORE_INDEX).flatten()
    results = []
    for fuse in (False, True):
        model = _tiny_llama(1, seed=1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            s_logits, _ = RowLogitsLM(model, fuse_head=fuse)(ids, None, torch.arange(18))
        assert s_logits.dtype == torch.bfloat16  # the logits', or autocast's that HeadRows recorded
        total, *_ = weighted_logit_loss(s_logits, None, labels, 1.0, 0.0, 0.0, 1.0)
        total.backward()
        results.append((total.detach(), model.model.embed_tokens.weight.grad, model.model.norm.weight.grad))
    (ref_total, *ref_grads), (total, *grads) = results
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=1e-6)
    for g, g_ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, g_ref, rtol=2e-2, atol=2e-2 * g_ref.abs().max().item())
