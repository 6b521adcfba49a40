"""The loss maths of distillation, as plain functions of tensors (no model, no loop).

The pretraining objective is a weighted sum of six terms (weights --alpha_*):
    ce      KL(teacher || student) of the temperature-softened next-token distributions, times T^2 (or another
            divergence, --kd_loss: distil/divergences.py)
    mlm     cross-entropy of the student on the masked tokens (masked language modelling)
    clm     cross-entropy of the student on the next token (causal language modelling)
    mse     squared error between student and teacher logits, summed over the vocabulary
    cos     1 - cosine similarity between student and teacher last hidden states
    hidden  student block outputs against chosen teacher block outputs (1 - cosine, or squared error),
            averaged over the pairs (--hidden_layer_map)
Every term is an average over the positions it covers, so batch shape does not change its scale.

The three logit terms share one formula, `logit_losses_chunk`, applied to a chunk of rows at a time:
training calls it through `weighted_logit_loss` (which also writes the gradient), the held-out evaluation
through `logit_loss_sums` (values only). Where a model's head is a plain linear projection, training hands the
loss the hidden rows and the head (`HeadRows`) instead of the logits, and the loss projects them chunk by chunk
(`_FusedHeadLoss`): no (rows x vocabulary) tensor is then ever whole.
"""
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from distil.divergences import (DEFAULT_JSD_BETA, DEFAULT_KD_LOSS, TopKTeacher, complete_teacher_log_probs,
                                 divergence_rows)

IGNORE_INDEX = -100  # label of a position that predicts nothing (padding, unmasked tokens)

_CHUNK_ELEMENTS = 1 << 22  # logits elements processed at once in the fused losses: ~16 MB of fp32
_GPU_CHUNKS = 16  # on a GPU, the rows are split in about this many chunks instead (see rows_per_chunk)
_GPU_MAX_CHUNK_ELEMENTS = 1 << 26
# A float16 gradient buffer holds each row scaled by a power of two that brings its largest entry to about
# this value (see _WeightedLogitLoss): well inside float16's range (65504), far above its smallest normal.
_FP16_ROW_TARGET = 2.0 ** 14


def rows_per_chunk(n, vocab, device):
    """Rows of (n, vocab) logits each chunk of the fused losses takes.

    A chunk costs about fifteen kernel launches. On the CPU small chunks stay in cache. On a GPU, 16k rows at
    _CHUNK_ELEMENTS would be a hundred chunks of tiny kernels, bound by launch latency, so the rows are cut in
    about _GPU_CHUNKS chunks instead: the chunk temporaries then add up to about half of one (n, vocab) fp32
    tensor, and never more than _GPU_MAX_CHUNK_ELEMENTS per temporary.
    """
    rows = max(1, _CHUNK_ELEMENTS // vocab)
    if device.type == "cuda":
        rows = max(rows, min(math.ceil(n / _GPU_CHUNKS), _GPU_MAX_CHUNK_ELEMENTS // vocab))
    return rows


def logit_losses_chunk(s, t, labels, temperature, row_weight=None, with_grads=True, kd_loss=DEFAULT_KD_LOSS,
                       beta=DEFAULT_JSD_BETA):
    """On a chunk of rows of fp32 logits s, t (rows, vocab): the sums over rows of KL(p_t || p_s) at
    temperature T (or the divergence kd_loss, see distil/divergences.py), of the squared error, and of the label
    cross-entropy; with_grads also gives the gradient of each sum w.r.t. s (KL's without its 1/T factor,
    squared error's without its 2): (kl, sq, ce, d_kl, diff, d_ce). t may also be a divergences.TopKTeacher
    (a cached teacher: no squared error then, sq = 0 and diff None). t or labels may be None (their terms are
    then 0, their gradients None); labels (rows,) hold IGNORE_INDEX on rows without a target. row_weight
    (rows,) in {0, 1} drops rows from the KL and squared-error terms (and their gradients).
    """
    zero = s.new_zeros(())
    kl = sq = ce = zero
    d_kl = diff = d_ce = None
    if t is not None:
        log_p_s = F.log_softmax(s / temperature, dim=-1)  # (rows, vocab)
        cached = isinstance(t, TopKTeacher)
        log_p_t = complete_teacher_log_probs(t, log_p_s) if cached else F.log_softmax(t / temperature, dim=-1)
        kl_rows, d_kl = divergence_rows(log_p_s, log_p_t, kd_loss, beta, with_grad=with_grads)  # (rows,)
        diff = None if cached else s - t
        if row_weight is not None:
            kl_rows = kl_rows * row_weight
            if diff is not None:
                diff.mul_(row_weight[:, None])
            if with_grads:
                d_kl.mul_(row_weight[:, None])
        kl = kl_rows.sum()
        if diff is not None:
            sq = (diff * diff).sum()
        if not with_grads:
            diff = None
    if labels is not None:
        has_label = labels != IGNORE_INDEX  # (rows,)
        safe = labels.clamp(min=0)
        log_q = F.log_softmax(s, dim=-1)
        ce = -(log_q.gather(1, safe[:, None]).squeeze(1) * has_label).sum()
        if with_grads:
            d_ce = log_q.exp_()  # softmax - one-hot, on labelled rows only
            d_ce[torch.arange(len(safe), device=s.device), safe] -= 1.0
            d_ce *= has_label[:, None]
    return kl, sq, ce, d_kl, diff, d_ce


class HeadRows(NamedTuple):
    """A LM's output at the loss rows when its head is a plain linear projection (models.RowLogitsLM with
    fuse_head): the last hidden states there, hidden (n, dim), and the head's weight (vocab, dim) and bias
    (vocab,) or None, standing for the logits hidden @ weight.T + bias that the loss computes chunk by chunk.
    dtype: the autocast dtype the head would have run in (None: autocast was off)."""
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    dtype: torch.dtype | None

    @property
    def compute_dtype(self):
        """The dtype of the logits, as the head module would have computed them."""
        return self.dtype or self.weight.dtype


def _row_source(x):
    """A function (start, stop) -> those rows of x as fp32 logits (or a TopKTeacher chunk), for a logit argument
    of the fused losses: (n, vocab) logits, a divergences.TopKTeacher, or HeadRows (projected here, the weight
    cast to the head's dtype once, as autocast would); None for None."""
    if x is None:
        return None
    if isinstance(x, TopKTeacher):
        return x.rows
    if isinstance(x, HeadRows):
        dtype = x.compute_dtype
        weight = x.weight.detach().to(dtype)
        bias = x.bias.detach().to(dtype) if x.bias is not None else None
        return lambda i, j: F.linear(x.hidden[i: j].detach().to(dtype), weight, bias).float()
    return lambda i, j: x[i: j].float()


def _normalisers(n, labels, kd_rows, temperature, w_ce, w_mse, w_lm):
    """(row_weight (n,) fp32 or None, n_kd, n_labels, (c_kl, c_mse, c_lm)): the row counts the terms average
    over, kept on the device (no host synchronisation), and the gradient factors of _WeightedLogitLoss's
    docstring."""
    row_weight = kd_rows.to(torch.float32) if kd_rows is not None else None
    n_kd = row_weight.sum().clamp(min=1) if row_weight is not None else float(max(n, 1))
    n_labels = (labels != IGNORE_INDEX).sum().clamp(min=1) if labels is not None else 1.0
    return row_weight, n_kd, n_labels, (w_ce * temperature / n_kd, w_mse * 2.0 / n_kd, w_lm / n_labels)


def _weighted_chunk(s, t, labels, row_weight, temperature, factors, kd_loss, beta):
    """On one chunk of fp32 student logits s (rows, vocab): ((3,) sums of KL, squared error and CE, the fp32
    gradient of the weighted loss w.r.t. s (rows, vocab)), from logit_losses_chunk."""
    c_kl, c_mse, c_lm = factors
    kl, sq, ce, d_kl, diff, d_ce = logit_losses_chunk(s, t, labels, temperature, row_weight, kd_loss=kd_loss, beta=beta)
    g = torch.zeros_like(d_ce if d_ce is not None else d_kl)
    if d_kl is not None:
        g.add_(d_kl.mul_(c_kl))
        if diff is not None:
            g.add_(diff.mul_(c_mse))
    if d_ce is not None:
        g.add_(d_ce.mul_(c_lm))
    return torch.stack([kl, sq, ce]), g


def _weighted_terms(sums, n_kd, n_labels, temperature, w_ce, w_mse, w_lm):
    """(total, ce, mse, lm) from the summed (3,) KL, squared error and CE."""
    ce = sums[0] * temperature ** 2 / n_kd
    mse = sums[1] / n_kd
    lm = sums[2] / n_labels
    return w_ce * ce + w_mse * mse + w_lm * lm, ce, mse, lm


class _WeightedLogitLoss(torch.autograd.Function):
    """w_ce * KD + w_mse * MSE + w_lm * LM over (n, vocab) logits, with its gradient computed in forward.

    The straightforward version (masked_select both logit tensors, softmax them, KLDivLoss, then a separate
    cross-entropy) allocates several (positions x vocab) fp32 tensors and keeps them alive until backward.
    Here the weights are known before backward, so forward writes the weighted gradient into one buffer (the
    logits' dtype) chunk by chunk, in fp32 arithmetic, and keeps nothing else. Neither the student nor the
    teacher logits are saved for backward, so both can be freed as soon as forward returns, and no softmax is
    recomputed. With n_kd rows in the KD/MSE average and m labelled rows:
        d(KL T^2 / n_kd)/ds = T/n_kd (p_s - p_t);   d(MSE / n_kd)/ds = 2/n_kd (s - t);   d(CE / m)/ds = (q - onehot)/m
    (another --kd_loss D: T/n_kd dD/dz with z = s/T, from divergences.divergence_rows, in place of p_s - p_t).
    Also returns the three unweighted terms (detached) for logging.

    The row counts that normalise the terms stay on the device (no host synchronisation): KD and MSE
    average over the rows with kd_rows true (all rows when None), LM over the labelled rows.

    float16 logits (--fp16): the gradient is computed before backward, so before a GradScaler's factor
    reaches it, and its entries (about w T / n_rows times a probability) sit mostly below float16's normal
    range: stored as they are, most would flush to zero. Each row is therefore stored times a power of two
    that brings its largest entry near _FP16_ROW_TARGET (exact, no rounding), and backward divides it back
    out while applying the incoming factor, in fp32, chunk by chunk. The buffer stays float16, plus one fp32
    scale per row. bfloat16 and float32 have float32's exponent range and need none of this.
    """

    @staticmethod
    def forward(ctx, s_flat, t_flat, labels, temperature, w_ce, w_mse, w_lm, kd_rows, kd_loss, beta):
        n = s_flat.size(0)
        row_weight, n_kd, n_labels, factors = _normalisers(n, labels, kd_rows, temperature, w_ce, w_mse, w_lm)
        grad = torch.empty_like(s_flat)
        row_scale = s_flat.new_empty(n, dtype=torch.float32) if grad.dtype == torch.float16 else None
        sums = s_flat.new_zeros(3, dtype=torch.float32)
        teacher = _row_source(t_flat)
        step = rows_per_chunk(n, s_flat.size(-1), s_flat.device)
        for i in range(0, n, step):
            chunk_sums, g = _weighted_chunk(s_flat[i: i + step].float(), teacher and teacher(i, i + step),
                                            labels[i: i + step] if labels is not None else None,
                                            row_weight[i: i + step] if row_weight is not None else None,
                                            temperature, factors, kd_loss, beta)
            sums += chunk_sums
            if row_scale is not None:
                peak = g.abs().amax(dim=-1).clamp(min=2.0 ** -100)  # (rows,); an all-zero row keeps its zeros
                scale = torch.exp2(torch.floor(torch.log2(_FP16_ROW_TARGET / peak)))
                g.mul_(scale[:, None])
                row_scale[i: i + step] = scale
            grad[i: i + step] = g
        ctx.save_for_backward(grad, row_scale)
        total, ce, mse, lm = _weighted_terms(sums, n_kd, n_labels, temperature, w_ce, w_mse, w_lm)
        ctx.mark_non_differentiable(ce, mse, lm)
        return total, ce, mse, lm

    @staticmethod
    def backward(ctx, grad_total, *unused):
        grad, row_scale = ctx.saved_tensors
        if row_scale is None:
            return grad * grad_total.to(grad.dtype), *(None,) * 9
        factor = grad_total.float() / row_scale  # (n,): the incoming factor, and the storage scale undone
        out = torch.empty_like(grad)
        step = rows_per_chunk(grad.size(0), grad.size(-1), grad.device)
        for i in range(0, grad.size(0), step):
            out[i: i + step] = grad[i: i + step].float() * factor[i: i + step, None]
        return out, *(None,) * 9


class _FusedHeadLoss(torch.autograd.Function):
    """_WeightedLogitLoss with the student's vocabulary projection inside it: from hidden rows h (n, dim) and a
    linear head (weight (vocab, dim), bias), each chunk of rows is projected (the student's, and a HeadRows
    teacher's, in the head's autocast dtype, then fp32 as above), its losses and gradient d_logits computed as
    _WeightedLogitLoss does, and at once pushed through the head: d_h[chunk] = d_logits @ W, dW += d_logits^T
    h[chunk], db += d_logits summed over rows, into fp32 accumulators. So no (n, vocab) tensor is ever whole
    (the unfused path holds three: student logits, teacher logits, gradient buffer) and the FLOPs are the
    same, nothing recomputed. Forward keeps d_h (n, dim) and dW (vocab, dim), the size of the weight and of
    the gradient it will receive anyway; backward only multiplies them by the incoming factor.

    That factor includes a GradScaler's scale, applied here in fp32 to fp32 buffers, so the float16 per-row
    rescaling of _WeightedLogitLoss is not needed on this path. Under float16 autocast the gradient matmuls
    run in fp32, though: d_logits (about w T / n_rows times a probability) would mostly flush to zero as
    float16 inputs. Under bfloat16 they run in bfloat16, as autocast runs the head's backward today.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, dtype, t_arg, labels, temperature, w_ce, w_mse, w_lm, kd_rows, kd_loss,
                beta):
        n, vocab = hidden.size(0), weight.size(0)
        row_weight, n_kd, n_labels, factors = _normalisers(n, labels, kd_rows, temperature, w_ce, w_mse, w_lm)
        dtype = dtype or weight.dtype  # the logits' dtype (HeadRows.compute_dtype); each cast made once
        w_c, h_c = weight.detach().to(dtype), hidden.detach().to(dtype)
        b_c = bias.detach().to(dtype) if bias is not None else None
        grad_dtype = torch.float32 if dtype == torch.float16 else dtype
        exact = grad_dtype == dtype
        w_g = w_c if exact else weight.detach().to(grad_dtype)
        h_g = h_c if exact else hidden.detach().to(grad_dtype)
        teacher = _row_source(t_arg)
        want_w, want_b = ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        d_hidden = hidden.new_empty(hidden.shape, dtype=torch.float32)
        d_weight = weight.new_zeros(weight.shape, dtype=torch.float32) if want_w else None
        d_bias = weight.new_zeros(vocab, dtype=torch.float32) if want_b else None
        sums = hidden.new_zeros(3, dtype=torch.float32)
        step = rows_per_chunk(n, vocab, hidden.device)
        for i in range(0, n, step):
            s = F.linear(h_c[i: i + step], w_c, b_c).float()  # (rows, vocab)
            chunk_sums, g = _weighted_chunk(s, teacher and teacher(i, i + step),
                                            labels[i: i + step] if labels is not None else None,
                                            row_weight[i: i + step] if row_weight is not None else None,
                                            temperature, factors, kd_loss, beta)
            sums += chunk_sums
            g_g = g.to(grad_dtype)  # (rows, vocab)
            d_hidden[i: i + step] = g_g @ w_g
            if want_w:
                if grad_dtype == torch.float32:
                    d_weight.addmm_(g_g.t(), h_g[i: i + step])
                else:
                    d_weight += g_g.t() @ h_g[i: i + step]
            if want_b:
                d_bias += g.sum(0)
        # Intermediates, not inputs or outputs: kept on ctx (not save_for_backward) so backward can hand dW to
        # autograd as the only reference, which the parameter's gradient then takes over without a copy.
        ctx.grads = d_hidden, d_weight, d_bias
        ctx.dtypes = hidden.dtype, weight.dtype
        total, ce, mse, lm = _weighted_terms(sums, n_kd, n_labels, temperature, w_ce, w_mse, w_lm)
        ctx.mark_non_differentiable(ce, mse, lm)
        return total, ce, mse, lm

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total, *unused):
        d_hidden, d_weight, d_bias = ctx.grads
        ctx.grads = None
        factor = grad_total.float()
        h_dtype, w_dtype = ctx.dtypes
        d_hidden = d_hidden.mul_(factor).to(h_dtype)
        d_weight = d_weight.mul_(factor).to(w_dtype) if d_weight is not None else None
        d_bias = d_bias.mul_(factor).to(w_dtype) if d_bias is not None else None
        return d_hidden, d_weight, d_bias, *(None,) * 10


def weighted_logit_loss(s_logits, t_logits, labels, temperature, w_ce, w_mse, w_lm, kd_rows=None,
                        kd_loss=DEFAULT_KD_LOSS, jsd_beta=DEFAULT_JSD_BETA):
    """(w_ce * ce + w_mse * mse + w_lm * lm, ce, mse, lm) over (n, vocab) logits, the three terms detached.

    ce is KL(p_t || p_s) at temperature T summed over the vocabulary, averaged over rows, times T^2 (so
    gradients keep their scale as T changes); mse is the squared error summed over the vocabulary, averaged
    over rows; lm is the mean cross-entropy over the rows whose label (n,) is not IGNORE_INDEX. t_logits may
    be None (no teacher: ce = mse = 0) or a divergences.TopKTeacher (a cached teacher's top k: mse = 0), and
    labels None (lm = 0). Either logits argument may also be HeadRows (hidden rows and a linear head): the
    projection then runs inside the loss, chunk by chunk (_FusedHeadLoss for the student's). kd_rows (n,) bool,
    optional: the rows ce and mse average over (default: all of them). Nothing to average over gives 0, never
    NaN. kd_loss, jsd_beta: the divergence ce is (distil/divergences.py; forward KL by default).
    """
    t_flat = None
    if t_logits is not None and (w_ce or w_mse):
        plain = not isinstance(t_logits, (TopKTeacher, HeadRows))
        t_flat = t_logits.detach().reshape(-1, t_logits.size(-1)) if plain else t_logits
    labels = labels if w_lm else None
    kd_rows = kd_rows if t_flat is not None else None
    weights = float(temperature), float(w_ce), float(w_mse), float(w_lm), kd_rows, kd_loss, float(jsd_beta)
    if isinstance(s_logits, HeadRows):
        return _FusedHeadLoss.apply(*s_logits, t_flat, labels, *weights)
    return _WeightedLogitLoss.apply(s_logits.reshape(-1, s_logits.size(-1)), t_flat, labels, *weights)


@torch.no_grad()
def logit_loss_sums(s_logits, t_logits, labels, temperature=1.0):
    """Held-out sums over (n, vocab) logits: (sum of label cross-entropy, sum of KL(p_t || p_s) at
    temperature T, number of rows where both argmaxes agree), as float64 tensors. labels (n,) may hold
    IGNORE_INDEX; t_logits may be None (KL and agreement are then 0)."""
    n, vocab = s_logits.shape
    sums = torch.zeros(3, dtype=torch.float64, device=s_logits.device)
    step = rows_per_chunk(n, vocab, s_logits.device)
    for i in range(0, n, step):
        s = s_logits[i: i + step].float()
        t = t_logits[i: i + step].float() if t_logits is not None else None
        kl, _, ce, _, _, _ = logit_losses_chunk(s, t, labels[i: i + step], temperature, with_grads=False)
        sums[0] += ce.double()
        sums[1] += kl.double()
        if t is not None:
            sums[2] += (s.argmax(-1) == t.argmax(-1)).sum().double()
    return sums


def cosine_loss(s_hidden, t_hidden, mask):
    """Mean (1 - cos) between student and teacher hidden states (..., dim) at the positions where mask is true.

    Computed at every position and averaged with the mask as weights: selecting the positions first would
    need their count on the host (a device synchronisation every step).
    """
    cos = F.cosine_similarity(s_hidden.float(), t_hidden.float(), dim=-1)  # (...,)
    weight = mask.to(cos.dtype)
    return torch.where(mask, 1.0 - cos, 0.0).sum() / weight.sum().clamp(min=1)


def hidden_layer_loss(s_layers, t_layers, mask, kind="cos"):
    """The mean over layer pairs of a per-position distance between student and teacher hidden states,
    averaged over the positions where mask (bs, seq) is true: 1 - cosine (kind "cos"), or the squared error
    averaged over the hidden dimension (kind "mse"). s_layers, t_layers: sequences of (bs, seq, dim)."""
    total = 0.0
    for s, t in zip(s_layers, t_layers, strict=True):
        if kind == "cos":
            total = total + cosine_loss(s, t, mask)
        else:
            sq = (s.float() - t.float()).pow(2).mean(-1)  # (bs, seq)
            total = total + torch.where(mask, sq, 0.0).sum() / mask.sum().clamp(min=1)
    return total / len(s_layers)


def distillation_losses(s_logits, t_logits, s_hidden, t_hidden, attn_mask, lm_labels, rows, *, alpha, temperature,
                        mlm, restrict_ce_to_mask=False, kd_loss=DEFAULT_KD_LOSS, jsd_beta=DEFAULT_JSD_BETA,
                        s_layers=None, t_layers=None, hidden_loss="cos"):
    """The losses of one training step: {name: scalar} for every term with a positive weight in `alpha`
    ({'ce', 'mlm', 'clm', 'mse', 'cos', and optionally 'hidden'}), plus 'logits' when a logit or LM term
    is on: the fused alpha_ce * ce + alpha_mse * mse + alpha_lm * lm that carries the gradient of those
    three (the named ones are detached, for logging). The step's loss is losses['logits'] + alpha['cos'] *
    losses['cos'] + alpha['hidden'] * losses['hidden'], each present term.

    s_logits, t_logits: (n, vocab) logits at the flat positions `rows` (n,) of the (bs, seq) batch, where a
    loss reads them, or HeadRows standing for them (t_logits None without a teacher, or a TopKTeacher);
    s_hidden, t_hidden: (bs, seq, dim) last hidden states;
    attn_mask: (bs, seq) bool, the positions the hidden-state terms average over (the real tokens; with a
    loss-masked corpus, the positions predicting a masked token); lm_labels: (bs, seq) MLM labels (IGNORE_INDEX
    where nothing is predicted), or for CLM the token ids themselves (IGNORE_INDEX on padding): position i
    predicts token i + 1.
    With restrict_ce_to_mask (MLM), ce and mse cover only the rows that carry a label. kd_loss, jsd_beta: the
    divergence ce is (distil/divergences.py). s_layers, t_layers: the paired block outputs for 'hidden'
    (hidden_layer_loss of kind hidden_loss).
    """
    losses = {}
    lm_name = "mlm" if alpha["mlm"] > 0 else "clm" if alpha["clm"] > 0 else None
    labels = kd_rows = None
    if mlm:
        row_labels = lm_labels.flatten()[rows]  # (n,)
        if restrict_ce_to_mask:
            kd_rows = row_labels != IGNORE_INDEX  # drawn positions that were not eligible carry no loss
        labels = row_labels if lm_name == "mlm" else None
    elif lm_name == "clm":
        labels = F.pad(lm_labels[:, 1:], (0, 1), value=IGNORE_INDEX).flatten()[rows]  # i predicts token i + 1
    use_teacher_logits = alpha["ce"] > 0 or alpha["mse"] > 0
    if use_teacher_logits or lm_name is not None:
        w_lm = alpha[lm_name] if lm_name is not None else 0.0
        losses["logits"], losses["ce"], losses["mse"], lm = weighted_logit_loss(
            s_logits, t_logits, labels, temperature, alpha["ce"], alpha["mse"], w_lm, kd_rows, kd_loss, jsd_beta)
        if lm_name is not None:
            losses[lm_name] = lm
    if alpha["cos"] > 0:
        losses["cos"] = cosine_loss(s_hidden, t_hidden, attn_mask)
    if alpha.get("hidden", 0) > 0:
        losses["hidden"] = hidden_layer_loss(s_layers, t_layers, attn_mask, hidden_loss)
    return {k: v for k, v in losses.items() if k == "logits" or alpha[k] > 0}


# ---- task distillation (GLUE, SQuAD)
#
# Fine-tuning with a teacher already fine-tuned on the task ("a second step of distillation"):
#     loss = alpha_task * task loss + alpha_ce * distillation term
# where the distillation term is T^2 * KL(teacher_T || student_T) of the temperature-softened output
# distributions (classes for classification, start and end positions for SQuAD), or the divergence --kd_loss
# names (distil/divergences.py), or the squared error to the teacher's prediction for regression. Without a
# teacher the loss is the task loss alone, unweighted, as in the original run_squad_w_distillation.py.


# A masked-out entry's logit: exp() of it is exactly 0 next to any real logit, yet it stays finite, so the
# divergences see 0 * (finite) there, never 0 * inf = nan (in values or in autograd's gradients).
_MASKED_LOGIT = torch.finfo(torch.float32).min / 4


def soft_target_divergence(s_logits, t_logits, temperature, mask=None, kd_loss=DEFAULT_KD_LOSS,
                           jsd_beta=DEFAULT_JSD_BETA):
    """T^2 * D(softmax(t / T), softmax(s / T)) over the last dimension, averaged over rows; D is KL(p_t || p_s)
    by default, or the divergence kd_loss names (distil/divergences.py).

    s_logits, t_logits: (..., n) with the same shape; mask: (..., n) bool, True where the distribution may
    put mass (e.g. non-padding positions). Masked-out entries are excluded from both softmaxes, so they
    contribute nothing. Computed in float32 whatever the logits' dtype, differentiable by autograd.
    """
    s = s_logits.float() / temperature  # (..., n)
    t = t_logits.float() / temperature  # (..., n)
    if mask is not None:
        s = s.masked_fill(~mask, _MASKED_LOGIT)
        t = t.masked_fill(~mask, _MASKED_LOGIT)
    rows, _ = divergence_rows(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), kd_loss, jsd_beta)  # (...)
    return rows.mean() * temperature ** 2


def soft_target_kl(s_logits, t_logits, temperature, mask=None):
    """T^2 * KL(softmax(t / T) || softmax(s / T)), averaged over rows (soft_target_divergence's default)."""
    return soft_target_divergence(s_logits, t_logits, temperature, mask)


def span_ce_loss(start_logits, end_logits, start_positions, end_positions):
    """(CE(start) + CE(end)) / 2, the extractive-QA loss transformers' *ForQuestionAnswering models compute.

    start_logits, end_logits: (bs, seq_len); positions: (bs,). Positions outside the sequence are clamped to
    seq_len and ignored, as those models do.
    """
    seq_len = start_logits.size(1)
    start_positions = start_positions.clamp(0, seq_len)  # (bs,)
    end_positions = end_positions.clamp(0, seq_len)  # (bs,)
    start = F.cross_entropy(start_logits.float(), start_positions, ignore_index=seq_len)
    end = F.cross_entropy(end_logits.float(), end_positions, ignore_index=seq_len)
    return (start + end) / 2


def span_kd_loss(s_start, s_end, t_start, t_end, temperature, attention_mask, kd_loss=DEFAULT_KD_LOSS,
                 jsd_beta=DEFAULT_JSD_BETA):
    """T^2 * (KL(start) + KL(end)) / 2 over the positions that may hold an answer (attention_mask: the
    non-padding ones), each KL (or kd_loss's divergence) a per-window sum averaged over windows. All logits
    (bs, seq_len)."""
    mask = attention_mask.bool()  # (bs, seq_len)
    start = soft_target_divergence(s_start, t_start, temperature, mask, kd_loss, jsd_beta)
    end = soft_target_divergence(s_end, t_end, temperature, mask, kd_loss, jsd_beta)
    return (start + end) / 2


def classification_loss(logits, labels, labelled=None):
    """Cross-entropy for classification (logits (bs, n_labels), labels (bs,) long), squared error for
    regression (logits (bs, 1), labels (bs,) float): what transformers' *ForSequenceClassification compute.
    labelled: (bs,) 1 for the rows whose label is read, 0 for unlabelled rows (their labels are placeholders);
    the mean is over the labelled rows. None: every row."""
    if logits.size(-1) == 1:
        errors = (logits.float().squeeze(-1) - labels.float()) ** 2
        if labelled is None:
            return errors.mean()
        keep = labelled.float()
        return (errors * keep).sum() / keep.sum().clamp(min=1)
    if labelled is not None:
        labels = torch.where(labelled.bool(), labels, torch.full_like(labels, IGNORE_INDEX))
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)


def classification_kd_loss(s_logits, t_logits, temperature, kd_loss=DEFAULT_KD_LOSS, jsd_beta=DEFAULT_JSD_BETA):
    """T^2 * KL (or kd_loss's divergence) on the class distribution, or for regression ((bs, 1) logits) the
    squared error to the teacher's prediction (no temperature: there is no distribution to soften)."""
    if s_logits.size(-1) == 1:
        return F.mse_loss(s_logits.float(), t_logits.float())
    return soft_target_divergence(s_logits, t_logits, temperature, kd_loss=kd_loss, jsd_beta=jsd_beta)


def token_ce_loss(logits, labels, labelled=None, ignore_index=IGNORE_INDEX):
    """Cross-entropy per scored token, averaged over the scored tokens of the batch (what transformers'
    *ForTokenClassification compute). logits (bs, seq_len, n_labels); labels (bs, seq_len), ignore_index where
    a position is not scored (a word's later sub-tokens, special tokens, padding). labelled: (bs,) 0 for rows
    whose labels are placeholders (unlabelled text), which the loss does not read; None: every row."""
    if labelled is not None:
        labels = torch.where(labelled.bool().unsqueeze(-1), labels, torch.full_like(labels, ignore_index))
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=ignore_index)


def token_kd_loss(s_logits, t_logits, labels, temperature, kd_loss=DEFAULT_KD_LOSS, jsd_beta=DEFAULT_JSD_BETA,
                  ignore_index=IGNORE_INDEX):
    """T^2 * KL(teacher_T || student_T) (or kd_loss's divergence) on the label distribution of each scored
    token, averaged over the scored tokens. Logits (bs, seq_len, n_labels) in the same label order; labels
    (bs, seq_len) only say which positions are scored. No scored token: 0."""
    scored = (labels != ignore_index).unsqueeze(-1)  # (bs, seq_len, 1)
    # Unscored positions get the teacher's own logits: every divergence is 0 there and torch.where passes them
    # no gradient, so the mean over all positions, rescaled, is the mean over the scored ones, with no host
    # synchronisation to count or gather them.
    s = torch.where(scored, s_logits.float(), t_logits.float())  # (bs, seq_len, n_labels)
    n_all, n_scored = scored[..., 0].numel(), scored.sum().clamp(min=1)
    divergence = soft_target_divergence(s.flatten(0, 1), t_logits.float().flatten(0, 1), temperature,
                                        kd_loss=kd_loss, jsd_beta=jsd_beta)
    return divergence * (n_all / n_scored)


def task_distillation_loss(task_loss, kd_loss, alpha_task, alpha_ce):
    """alpha_task * task + alpha_ce * kd; the task loss alone, unweighted, when there is no teacher (kd None)."""
    if kd_loss is None:
        return task_loss
    return alpha_task * task_loss + alpha_ce * kd_loss
