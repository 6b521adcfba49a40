"""The distillation loop: a student learns from a frozen teacher's soft predictions.

The loss is a weighted sum of five terms (weights --alpha_*):
    ce   KL(teacher || student) of the temperature-softened next-token distributions, times T^2
    mlm  cross-entropy of the student on the masked tokens (masked language modelling)
    clm  cross-entropy of the student on the next token (causal language modelling)
    mse  squared error between student and teacher logits
    cos  1 - cosine similarity between student and teacher last hidden states
Every term is an average over the positions it covers, so batch shape does not change its scale. The maths
lives in plain functions of tensors at the top of this file; `Distiller` only feeds them.
"""
import contextlib
import math
import os
import signal
import time
from typing import NamedTuple

import numpy as np
import psutil
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader
from torch.utils.data.distributed import DistributedSampler

from grouped_batch_sampler import GroupedBatchSampler, SkippableBatchSampler, create_lengths_groups
from lm_seqs_dataset import LmSeqsDataset
from utils import checkpoint_path, logger, rng_state, rotate_checkpoints, save_atomic, set_rng_state

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

IGNORE_INDEX = -100
RESUMABLE_COUNTERS = ("epoch", "n_iter", "n_total_iter", "n_optimizer_steps", "n_skipped_steps",
                      "n_consecutive_bad_steps", "n_sequences_epoch", "total_loss_epoch")
MUST_MATCH_ON_RESUME = ("world_size", "batch_size", "gradient_accumulation_steps", "seed", "group_by_size", "mlm",
                        "student_type", "n_epoch")
_CHUNK_ELEMENTS = 1 << 22  # logits elements processed at once in the fused losses: ~16 MB of fp32
_GPU_CHUNKS = 16  # on a GPU, the rows are split in about this many chunks instead (see _rows_per_chunk)
_GPU_MAX_CHUNK_ELEMENTS = 1 << 26


# ------------------------------------------------------------------------------------------ loss maths


def _rows_per_chunk(n, vocab, device):
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


def _logit_losses_chunk(s, t, labels, temperature, row_weight=None):
    """On a chunk of rows (fp32): sums of KL(p_t || p_s) at temperature T, squared error, and label
    cross-entropy, with the gradient of each sum w.r.t. s (KL's without its T factor). t or labels may be None.
    row_weight (rows,) in {0, 1} drops rows from the KL and squared-error terms (and their gradients).
    """
    zero = s.new_zeros(())
    kl = sq = ce = zero
    d_kl = diff = d_ce = None
    if t is not None:
        log_p_s = F.log_softmax(s / temperature, dim=-1)
        log_p_t = F.log_softmax(t / temperature, dim=-1)
        p_t = log_p_t.exp()
        kl_rows = (p_t * (log_p_t - log_p_s)).sum(-1)
        d_kl = log_p_s.exp_().sub_(p_t)  # p_s - p_t
        diff = s - t
        if row_weight is not None:
            kl_rows = kl_rows * row_weight
            d_kl.mul_(row_weight[:, None])
            diff.mul_(row_weight[:, None])
        kl = kl_rows.sum()
        sq = (diff * diff).sum()
    if labels is not None:
        has_label = labels != IGNORE_INDEX
        safe = labels.clamp(min=0)
        log_q = F.log_softmax(s, dim=-1)
        ce = -(log_q.gather(1, safe[:, None]).squeeze(1) * has_label).sum()
        d_ce = log_q.exp_()  # softmax - one-hot, on labelled rows only
        d_ce[torch.arange(len(safe), device=s.device), safe] -= 1.0
        d_ce *= has_label[:, None]
    return kl, sq, ce, d_kl, diff, d_ce


class _LogitLosses(torch.autograd.Function):
    """KD (KL), MSE and LM cross-entropy over selected rows of flat logits, computed in fp32 chunks.

    The straightforward version (masked_select both logit tensors, softmax them, KLDivLoss, then a separate
    cross-entropy) allocates several (positions x vocab) fp32 tensors and keeps them alive until backward.
    Here the only tensor of that size is the gradient itself, shared by the three losses: forward keeps
    only row indices, backward recomputes each chunk. With n rows and m labelled rows:
        d(KL T^2 / n)/ds = T/n (p_s - p_t);   d(MSE / n)/ds = 2/n (s - t);   d(CE / m)/ds = (q - onehot)/m
    """

    @staticmethod
    def forward(ctx, s_flat, t_flat, rows, labels, temperature):
        n = rows.numel()
        n_labels = int((labels != IGNORE_INDEX).sum()) if labels is not None else 0
        ctx.save_for_backward(s_flat, t_flat, rows, labels)
        ctx.temperature, ctx.n_labels = temperature, n_labels
        sums = s_flat.new_zeros(3, dtype=torch.float32)
        step = _rows_per_chunk(n, s_flat.size(-1), s_flat.device)
        for i in range(0, n, step):
            r = rows[i: i + step]
            t = t_flat[r].float() if t_flat is not None else None
            lab = labels[i: i + step] if labels is not None else None
            kl, sq, ce, _, _, _ = _logit_losses_chunk(s_flat[r].float(), t, lab, temperature)
            sums += torch.stack([kl, sq, ce])
        return sums[0] * temperature ** 2 / max(n, 1), sums[1] / max(n, 1), sums[2] / max(n_labels, 1)

    @staticmethod
    def backward(ctx, grad_kl, grad_mse, grad_lm):
        s_flat, t_flat, rows, labels = ctx.saved_tensors
        temperature, n = ctx.temperature, rows.numel()
        grad = torch.zeros_like(s_flat)
        step = _rows_per_chunk(n, s_flat.size(-1), s_flat.device)
        w_kl, w_mse = grad_kl * temperature / max(n, 1), grad_mse * 2.0 / max(n, 1)
        w_lm = grad_lm / max(ctx.n_labels, 1)
        for i in range(0, n, step):
            r = rows[i: i + step]
            t = t_flat[r].float() if t_flat is not None else None
            lab = labels[i: i + step] if labels is not None else None
            _, _, _, d_kl, diff, d_ce = _logit_losses_chunk(s_flat[r].float(), t, lab, temperature)
            g = 0
            if d_kl is not None:
                g = d_kl.mul_(w_kl).add_(diff.mul_(w_mse))
            if d_ce is not None:
                g = d_ce.mul_(w_lm).add_(g)
            grad[r] = g.to(grad.dtype)
        return grad, None, None, None, None


def logit_losses(s_logits, t_logits, labels, temperature):
    """(ce, mse, lm) over all rows of (n, vocab) logits, fused so backward writes one gradient buffer.

    t_logits may be None (no teacher: ce = mse = 0) and labels None (lm = 0); labels is (n,) with
    IGNORE_INDEX on rows that predict nothing. ce and mse are averaged over the n rows, lm over labelled rows.
    """
    vocab = s_logits.size(-1)
    s_flat = s_logits.reshape(-1, vocab)
    rows = torch.arange(s_flat.size(0), device=s_logits.device)
    t_flat = t_logits.detach().reshape(-1, vocab) if t_logits is not None else None
    return _LogitLosses.apply(s_flat, t_flat, rows, labels, float(temperature))


class _WeightedLogitLoss(torch.autograd.Function):
    """w_ce * KD + w_mse * MSE + w_lm * LM over (n, vocab) logits, with its gradient computed in forward.

    What the training step uses: the weights are known before backward, so forward writes the weighted
    gradient into one buffer (the logits' dtype) chunk by chunk and keeps nothing else. Neither the student
    nor the teacher logits are saved for backward, so both can be freed as soon as forward returns, and no
    softmax is recomputed. Also returns the three unweighted terms (detached) for logging.

    The row counts that normalise the terms stay on the device (no host synchronisation): KD and MSE
    average over the rows with kd_rows true (all rows when None), LM over the labelled rows.
    """

    @staticmethod
    def forward(ctx, s_flat, t_flat, labels, temperature, w_ce, w_mse, w_lm, kd_rows):
        n = s_flat.size(0)
        row_weight = kd_rows.to(torch.float32) if kd_rows is not None else None
        n_kd = row_weight.sum().clamp(min=1) if row_weight is not None else float(max(n, 1))
        n_labels = (labels != IGNORE_INDEX).sum().clamp(min=1) if labels is not None else 1.0
        c_kl = w_ce * temperature / n_kd  # gradient factors, see _LogitLosses
        c_mse = w_mse * 2.0 / n_kd
        c_lm = w_lm / n_labels
        grad = torch.empty_like(s_flat)
        sums = s_flat.new_zeros(3, dtype=torch.float32)
        step = _rows_per_chunk(n, s_flat.size(-1), s_flat.device)
        for i in range(0, n, step):
            t = t_flat[i: i + step].float() if t_flat is not None else None
            lab = labels[i: i + step] if labels is not None else None
            w = row_weight[i: i + step] if row_weight is not None else None
            kl, sq, ce, d_kl, diff, d_ce = _logit_losses_chunk(s_flat[i: i + step].float(), t, lab, temperature, w)
            sums += torch.stack([kl, sq, ce])
            g = torch.zeros_like(d_ce if d_ce is not None else d_kl)
            if d_kl is not None:
                g.add_(d_kl.mul_(c_kl)).add_(diff.mul_(c_mse))
            if d_ce is not None:
                g.add_(d_ce.mul_(c_lm))
            grad[i: i + step] = g
        ctx.save_for_backward(grad)
        ce = sums[0] * temperature ** 2 / n_kd
        mse = sums[1] / n_kd
        lm = sums[2] / n_labels
        total = w_ce * ce + w_mse * mse + w_lm * lm
        ctx.mark_non_differentiable(ce, mse, lm)
        return total, ce, mse, lm

    @staticmethod
    def backward(ctx, grad_total, *unused):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None, None, None, None, None


def weighted_logit_loss(s_logits, t_logits, labels, temperature, w_ce, w_mse, w_lm, kd_rows=None):
    """(w_ce * ce + w_mse * mse + w_lm * lm, ce, mse, lm) over (n, vocab) logits; terms as in logit_losses.

    kd_rows (n,) bool, optional: the rows ce and mse average over (default: all of them).
    """
    vocab = s_logits.size(-1)
    t_flat = t_logits.detach().reshape(-1, vocab) if t_logits is not None and (w_ce or w_mse) else None
    return _WeightedLogitLoss.apply(s_logits.reshape(-1, vocab), t_flat, labels if w_lm else None,
                                    float(temperature), float(w_ce), float(w_mse), float(w_lm),
                                    kd_rows if t_flat is not None else None)


def soft_target_losses(s_logits, t_logits, mask, temperature):
    """(ce, mse) between student and teacher logits over the positions where `mask` is true.

    s_logits, t_logits: (..., vocab); mask: (...) bool. ce is KL(p_t || p_s) at temperature T, summed over
    the vocabulary, averaged over positions, times T^2 (so gradients keep their scale as T changes);
    mse is the squared error summed over the vocabulary, averaged over positions. No position gives 0, 0.
    """
    vocab = s_logits.size(-1)
    rows = mask.reshape(-1).nonzero().squeeze(-1)  # (n,)
    ce, mse, _ = _LogitLosses.apply(s_logits.reshape(-1, vocab), t_logits.detach().reshape(-1, vocab), rows, None,
                                    float(temperature))
    return ce, mse


def lm_loss(logits, labels):
    """Mean cross-entropy over positions whose label is not IGNORE_INDEX (0 if there are none)."""
    logits = logits.reshape(-1, logits.size(-1))  # (n, vocab)
    labels = labels.reshape(-1)
    rows = (labels != IGNORE_INDEX).nonzero().squeeze(-1)
    total = F.cross_entropy(logits[rows].float(), labels[rows], reduction="sum")
    return total / max(rows.numel(), 1)


def clm_loss(logits, labels):
    """Next-token prediction: position i predicts labels[i + 1]."""
    return lm_loss(logits[:, :-1], labels[:, 1:])


def cosine_loss(s_hidden, t_hidden, mask):
    """Mean (1 - cos) between student and teacher hidden states at the positions where mask is true.

    Computed at every position and averaged with the mask as weights: selecting the positions first would
    need their count on the host (a device synchronisation every step).
    """
    cos = F.cosine_similarity(s_hidden.float(), t_hidden.float(), dim=-1)  # (..., )
    weight = mask.to(cos.dtype)
    return torch.where(mask, 1.0 - cos, 0.0).sum() / weight.sum().clamp(min=1)


class TrainingError(Exception):
    """The run cannot go on (e.g. too many consecutive non-finite steps); a checkpoint was written first."""


# ------------------------------------------------------------------------------------ running the models

_PLAIN_HEAD_CAUSAL_LMS = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")


def split_lm_head(model):
    """(base, head, base kwargs) with logits == head(base(...).last_hidden_state), or None when unknown.

    Knowing the split lets the loop compute the vocabulary projection, the most expensive matmul of a small
    student, only at the positions a loss reads (non-padding, or only the masked ones).
    """
    from transformers import BertForMaskedLM, DistilBertForMaskedLM, GPT2LMHeadModel, RobertaForMaskedLM

    if isinstance(model, DistilBertForMaskedLM):
        def head(h):
            return model.vocab_projector(model.vocab_layer_norm(model.activation(model.vocab_transform(h))))
        return model.distilbert, head, {}
    if isinstance(model, BertForMaskedLM):
        return model.bert, model.cls, {}
    if isinstance(model, RobertaForMaskedLM):
        return model.roberta, model.lm_head, {}
    if isinstance(model, GPT2LMHeadModel) or type(model).__name__ in _PLAIN_HEAD_CAUSAL_LMS:
        base = model.transformer if isinstance(model, GPT2LMHeadModel) else model.model
        return base, model.lm_head, {"use_cache": False}  # training: no KV cache to build
    return None


def _is_plain_bidirectional(model):
    from transformers import BertForMaskedLM, DistilBertForMaskedLM, RobertaForMaskedLM

    return isinstance(model, (BertForMaskedLM, DistilBertForMaskedLM, RobertaForMaskedLM))


class RowLogitsLM(torch.nn.Module):
    """Wraps a LM: forward returns (logits at the selected flat rows (n, vocab), last hidden states).

    DDP wraps this module (not the bare model) so gradient hooks see the forward that really runs.
    Models whose head cannot be split run whole and their logits are selected afterwards.
    """

    def __init__(self, model, hidden_projection=None):
        super().__init__()
        self.model = model
        self.hidden_projection = hidden_projection  # student dim -> teacher dim, for the cosine loss
        self._split = (split_lm_head(model),)  # a tuple: not registered twice as submodules
        self._prepare_mask = _is_plain_bidirectional(model)

    def forward(self, input_ids, attention_mask, rows):
        split = self._split[0]
        if attention_mask is not None and self._prepare_mask:
            attention_mask = self.prepared_attention_mask(attention_mask)
        if split is None:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
            logits, hidden = out.logits.flatten(0, 1)[rows], out.hidden_states[-1]
        else:
            base, head, kwargs = split
            hidden = base(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state  # (bs, seq, dim)
            logits = head(hidden.flatten(0, 1)[rows])  # (n, vocab)
        if self.hidden_projection is not None:
            hidden = self.hidden_projection(hidden)  # (bs, seq, teacher dim)
        return logits, hidden

    def prepared_attention_mask(self, attention_mask):
        """The 4D mask the encoder would build from the 2D one, built without checking for padding first.

        Given a 2D mask, transformers tests `mask.all()` to drop it when nothing is padded: a device
        synchronisation in every forward. The caller knows that on the host (and passes no mask then);
        a prepared 4D mask is used as it is.
        """
        from transformers.masking_utils import create_bidirectional_mask

        bs, seq = attention_mask.shape
        shape_only = torch.empty((bs, seq, 0), dtype=self.model.dtype, device=attention_mask.device)
        return create_bidirectional_mask(config=self.model.config, inputs_embeds=shape_only,
                                         attention_mask=attention_mask, allow_is_bidirectional_skip=False)


class TeacherLM(RowLogitsLM):
    """RowLogitsLM for the frozen teacher: the same forward, without autograd.

    Its own forward (a distinct code object) also gives a compiled teacher its own compilation cache, so
    the teacher's and the student's graphs do not evict each other (they differ at least in grad mode).
    """

    def forward(self, input_ids, attention_mask, rows):
        with torch.no_grad():
            return super().forward(input_ids, attention_mask, rows)


# ---------------------------------------------------------------------------------------- batch preparation


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


def non_padding_positions(lengths, max_len):
    """Flat positions (row-major over (bs, max_len)) of the real tokens, computed on the host from CPU lengths."""
    lengths = lengths.numpy()
    return torch.from_numpy(np.flatnonzero(np.arange(max_len)[None, :] < lengths[:, None]))


class Batch(NamedTuple):
    """What Distiller.step takes: device tensors, and facts about them known on the host."""
    input_ids: torch.Tensor  # (bs, seq), MLM-corrupted for MLM
    attention_mask: torch.Tensor  # (bs, seq) bool, true at real tokens
    lm_labels: torch.Tensor  # (bs, seq), IGNORE_INDEX where nothing is predicted
    rows: torch.Tensor  # flat positions whose logits a loss reads
    padded: bool  # whether any sequence is shorter than seq


def clm_labels(token_ids, attention_mask):
    return token_ids.masked_fill(~attention_mask, IGNORE_INDEX)


# --------------------------------------------------------------------------------------------- the loop


class Distiller:
    """Runs the distillation: build the data pipeline and optimizer, then `train()`."""

    def __init__(self, params, dataset: LmSeqsDataset, token_probs, student, teacher, tokenizer=None,
                 eval_dataset=None):
        self.params = params
        self.dump_path = params.dump_path
        self.is_master = params.is_master
        self.multi_gpu = params.multi_gpu
        self.device = params.device
        self.student = student
        self.teacher = teacher
        self.tokenizer = tokenizer
        self.dataset = dataset
        self.eval_dataset = eval_dataset
        self.mlm = params.mlm
        self.temperature = params.temperature
        self.alpha = {name: getattr(params, f"alpha_{name}") for name in ("ce", "mlm", "clm", "mse", "cos")}
        self.vocab_size = student.config.vocab_size

        self.sampler = DistributedSampler(dataset, num_replicas=params.world_size, rank=params.global_rank,
                                          shuffle=True, seed=params.seed)
        if params.group_by_size:
            groups = create_lengths_groups(lengths=dataset.lengths, k=params.max_model_input_size)
            batch_sampler = GroupedBatchSampler(self.sampler, group_ids=groups, batch_size=params.batch_size)
        else:
            batch_sampler = BatchSampler(self.sampler, batch_size=params.batch_size, drop_last=False)
        self.batch_sampler = SkippableBatchSampler(batch_sampler)
        # Its own generator, so creating the epoch's iterator does not draw from the global RNG (which would
        # make a resumed run diverge from an uninterrupted one).
        self.dataloader = DataLoader(dataset, batch_sampler=self.batch_sampler, collate_fn=dataset.batch_sequences,
                                     num_workers=params.num_workers, pin_memory=self.device.type == "cuda",
                                     persistent_workers=params.num_workers > 0,
                                     generator=torch.Generator().manual_seed(params.seed))

        if self.mlm:
            self.token_probs = token_probs.to(self.device)
            self.mask_split = (params.word_mask, params.word_keep, params.word_rand)
            self.mask_id = params.special_tok_ids["mask_token"]

        self.epoch = 0
        self.n_iter = 0
        self.n_total_iter = 0
        self.n_optimizer_steps = 0
        self.n_skipped_steps = 0
        self.n_consecutive_bad_steps = 0
        self.stop_signal = None  # name of the signal that asked us to stop, set by the handler
        self.interrupted = False  # True when train() returned early on a signal
        self._at_boundary = False
        self._checkpoint_due = False
        self.n_sequences_epoch = 0
        self.total_loss_epoch = 0.0
        self.last_log = time.time()
        self._running = {}  # loss name -> (sum tensor, count) since the last log, kept on the device
        self._pending_outcomes = []  # (iteration, host copy of "skipped", event) not yet read by the host
        self._host_group = None  # process group for host-side agreement (stop signals)

        self._setup_precision()
        self._setup_models()
        self._setup_optimizer()
        self._setup_ddp()
        if self.is_master:
            from tensorboardX import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=os.path.join(self.dump_path, "log", "train"), flush_secs=60)
            self.tensorboard.add_text(tag="config/training", text_string=str(vars(params)), global_step=0)

    # -- setup ------------------------------------------------------------------------------------------

    def _setup_precision(self):
        p = self.params
        self.amp_dtype = torch.bfloat16 if p.bf16 else torch.float16 if p.fp16 else None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=p.fp16)

    def _setup_optimizer(self):
        p = self.params
        steps_per_epoch = math.ceil(len(self.dataloader) / p.gradient_accumulation_steps)
        self.num_steps_total = steps_per_epoch * p.n_epoch
        # Biases and normalisation weights (every 1-D parameter) are not decayed. The original matched the
        # names "bias" and "LayerNorm.weight", which missed DistilBERT's sa_layer_norm/output_layer_norm.
        decay, no_decay = [], []
        for _, param in self.student_lm.named_parameters():  # the student, and the hidden projection if any
            if param.requires_grad:
                (decay if param.ndim >= 2 else no_decay).append(param)
        groups = [{"params": decay, "weight_decay": p.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        n_trainable = sum(x.numel() for x in decay + no_decay)
        n_total = sum(x.numel() for x in self.student.parameters())
        logger.info("Student: %d trainable parameters out of %d.", n_trainable, n_total)
        # Fused (CPU and CUDA): one kernel per step, and it can skip a step on a device-side flag.
        self.optimizer = torch.optim.AdamW(groups, lr=p.learning_rate, eps=p.adam_epsilon, betas=(0.9, 0.98),
                                           fused=True)
        from transformers import get_linear_schedule_with_warmup

        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer, num_warmup_steps=math.ceil(self.num_steps_total * p.warmup_prop),
            num_training_steps=self.num_steps_total)

    def _setup_models(self):
        self.hidden_projection = None
        s_dim = self.student.config.hidden_size
        t_dim = self.teacher.config.hidden_size if self.teacher is not None else s_dim
        if self.alpha["cos"] > 0 and s_dim != t_dim:  # train.py refuses this without --hidden_projection
            self.hidden_projection = torch.nn.Linear(s_dim, t_dim, bias=False).to(self.device)
            logger.info("Cosine loss through a learned %d -> %d projection (not part of the exported student).",
                        s_dim, t_dim)
        self.student_lm = RowLogitsLM(self.student, self.hidden_projection)
        self.teacher_lm = TeacherLM(self.teacher) if self.teacher is not None else None

    def _setup_ddp(self):
        self.model = self.student_lm
        if self.multi_gpu:
            from torch.nn.parallel import DistributedDataParallel

            # The LM head is only unused when no loss reads the logits (cosine loss alone).
            head_unused = all(self.alpha[k] == 0 for k in ("ce", "mlm", "clm", "mse"))
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.model, device_ids=device_ids,
                                                 output_device=device_ids[0] if device_ids else None,
                                                 find_unused_parameters=head_unused)
            # Agreeing on a stop through NCCL would mean reading a GPU tensor (a sync) every optimizer step.
            backend = torch.distributed.get_backend()
            self._host_group = None if backend == "gloo" else torch.distributed.new_group(backend="gloo")
        if getattr(self.params, "compile", False):
            # The wrappers, not the bare models: what is compiled is the forward the step really runs (the
            # encoder, then the head at the loss rows). The DDP module compiles with graph breaks at its buckets.
            logger.info("torch.compile: the forwards compile during the first batches of each new shape.")
            # dynamic=True: batch length and row count change every batch; one graph serves them all.
            self.model = torch.compile(self.model, dynamic=True)
            if self.teacher_lm is not None:
                self.teacher_lm = torch.compile(self.teacher_lm, dynamic=True)

    # -- batches ----------------------------------------------------------------------------------------

    def prepare_batch_mlm(self, token_ids, lengths):
        """(bs, seq) ids and CPU lengths -> a Batch on the device: corrupted ids, attention mask, MLM labels,
        and the flat positions whose logits a loss reads (masked ones with --restrict_ce_to_mask, else real
        tokens). Every size is known on the host, so the step that follows makes no device synchronisation.
        """
        max_len = token_ids.size(1)
        attn_mask = attention_mask_from_lengths(lengths, max_len).to(self.device, non_blocking=True)
        token_ids = token_ids.to(self.device, non_blocking=True)
        restrict = self.params.restrict_ce_to_mask
        token_ids, labels, *drawn = mask_tokens(token_ids, lengths, self.token_probs, self.params.mlm_mask_prop,
                                                self.mask_split, self.mask_id, self.vocab_size,
                                                return_positions=restrict)
        rows = drawn[0] if restrict else non_padding_positions(lengths, max_len).to(self.device, non_blocking=True)
        return Batch(token_ids, attn_mask, labels, rows, self._padded(lengths, max_len))

    def prepare_batch_clm(self, token_ids, lengths):
        max_len = token_ids.size(1)
        attn_mask = attention_mask_from_lengths(lengths, max_len).to(self.device, non_blocking=True)
        token_ids = token_ids.to(self.device, non_blocking=True)
        rows = non_padding_positions(lengths, max_len).to(self.device, non_blocking=True)
        return Batch(token_ids, attn_mask, clm_labels(token_ids, attn_mask), rows, self._padded(lengths, max_len))

    @staticmethod
    def _padded(lengths, max_len):
        return bool((lengths.numpy() < max_len).any())

    # -- training ---------------------------------------------------------------------------------------

    def train(self):
        """The whole run: n_epoch passes over the data (from where a resumed run left off), then the final save.

        Returns early, with self.interrupted set, when SIGTERM/SIGINT/SIGUSR1 reached any rank: all ranks stop
        at the same optimizer-step boundary and the master writes a resumable checkpoint first.
        """
        from tqdm import tqdm

        logger.info("Starting training: %d epochs, %d batches per epoch per process, %d optimizer steps.",
                    self.params.n_epoch, len(self.dataloader), self.num_steps_total)
        self.student.train()
        if self.teacher is not None:
            self.teacher.eval()
        previous_handlers = self._install_signal_handlers()
        try:
            while self.epoch < self.params.n_epoch:
                logger.info("--- Starting epoch %d/%d", self.epoch, self.params.n_epoch - 1)
                self.batch_sampler.set_epoch(self.epoch)
                self.batch_sampler.skip = self.n_iter  # > 0 only when resuming mid-epoch
                bar = tqdm(self.dataloader, desc=f"-Iter epoch {self.epoch}", disable=not self.is_master,
                           mininterval=5, initial=self.n_iter, total=len(self.dataloader))
                for token_ids, lengths in bar:
                    prepare = self.prepare_batch_mlm if self.mlm else self.prepare_batch_clm
                    self.step(*prepare(token_ids, lengths))
                    self.n_sequences_epoch += token_ids.size(0)
                    self.iter(bar)
                    if self._at_boundary and self.after_optimizer_step():
                        bar.close()
                        self.interrupted = True
                        return
                bar.close()
                self.end_epoch()
        finally:
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
        logger.info("Training is finished; saving the final student.")
        if self.is_master:
            self.save_final()
            self.tensorboard.close()

    def loss_rows(self, attn_mask, lm_labels):
        """Flat positions whose logits some loss reads, found on the device (one synchronisation).

        Only for a batch given without them: prepare_batch_mlm/clm compute them without a synchronisation.
        """
        if self.params.restrict_ce_to_mask and self.mlm:
            return (lm_labels != IGNORE_INDEX).flatten().nonzero().squeeze(-1)
        return attn_mask.flatten().nonzero().squeeze(-1)

    def _forward(self, token_ids, attn_mask, rows, padded=True):
        """Student and teacher (logits at rows, last hidden states) under autocast.

        CLM needs no attention mask: padding is on the right, so causal attention never sees it. Neither does
        a batch without padding (known on the host), which also lets SDPA pick its fastest kernel.
        """
        mask = attn_mask if (self.mlm and padded) else None
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            s_out = self.model(token_ids, mask, rows)
            t_out = None
            if self.teacher_lm is not None:
                with torch.no_grad():
                    t_out = self.teacher_lm(token_ids, mask, rows)
        return s_out, t_out

    def compute_losses(self, s_out, t_out, attn_mask, lm_labels, rows):
        """{name: scalar tensor} for every loss with a positive weight; logits are already row-selected."""
        (s_logits, s_hidden), (t_logits, t_hidden) = s_out, (t_out or (None, None))
        losses = {}
        lm_name = "mlm" if self.alpha["mlm"] > 0 else "clm" if self.alpha["clm"] > 0 else None
        labels = kd_rows = None
        if self.mlm:
            row_labels = lm_labels.flatten()[rows]
            if self.params.restrict_ce_to_mask:
                kd_rows = row_labels != IGNORE_INDEX  # drawn positions that were not eligible carry no loss
            labels = row_labels if lm_name == "mlm" else None
        elif lm_name == "clm":
            labels = F.pad(lm_labels[:, 1:], (0, 1), value=IGNORE_INDEX).flatten()[rows]  # i predicts token i + 1
        use_teacher_logits = self.alpha["ce"] > 0 or self.alpha["mse"] > 0
        if use_teacher_logits or lm_name is not None:
            # One fused term carries the gradient of ce + mse + mlm/clm; the others are logged detached.
            w_lm = self.alpha[lm_name] if lm_name is not None else 0.0
            losses["logits"], losses["ce"], losses["mse"], lm = weighted_logit_loss(
                s_logits, t_logits, labels, self.temperature, self.alpha["ce"], self.alpha["mse"], w_lm, kd_rows)
            if lm_name is not None:
                losses[lm_name] = lm
        if self.alpha["cos"] > 0:
            losses["cos"] = cosine_loss(s_hidden, t_hidden, attn_mask)
        return {k: v for k, v in losses.items() if k == "logits" or self.alpha[k] > 0}

    def step(self, input_ids, attention_mask, lm_labels, rows=None, padded=True):
        """One forward/backward on a batch; the optimizer steps every gradient_accumulation_steps batches.

        rows and padded come with a Batch from prepare_batch_mlm/clm; without rows they are found here.
        """
        if rows is None:
            rows = self.loss_rows(attention_mask, lm_labels)
        s_out, t_out = self._forward(input_ids, attention_mask, rows, padded)
        losses = self.compute_losses(s_out, t_out, attention_mask, lm_labels, rows)
        del s_out, t_out  # the logits are not needed by backward: free them before it runs
        # "logits" already holds alpha_ce * ce + alpha_mse * mse + alpha_lm * lm (and their gradient)
        loss = losses.pop("logits", 0.0) + self.alpha["cos"] * losses.get("cos", 0.0)
        losses["total"] = loss.detach()
        for name, value in losses.items():
            total, count = self._running.get(name, (0.0, 0))
            self._running[name] = (total + value.detach().float(), count + 1)
        self.optimize(loss)

    def optimize(self, loss):
        """Backward, and on accumulation boundaries: unscale, clip, then an optimizer step that is skipped when
        the gradient norm is not finite.

        The skip is decided on the device (the fused AdamW reads a found_inf flag, as under a GradScaler), so
        the loop never waits for the GPU here; the host learns the outcome from a copy made without blocking
        (see _settle_outcomes). The norm is the one after DDP's all-reduce, the same on every rank, so a
        non-finite loss on one rank makes all ranks skip the same step instead of one rank exiting. The
        learning-rate schedule advances at every boundary, skipped or not (as in PyTorch's AMP recipe).
        """
        acc = self.params.gradient_accumulation_steps
        # The last batch of an epoch always closes an accumulation group, so an epoch ends on a real step.
        boundary = (self.n_iter + 1) % acc == 0 or self.n_iter + 1 == len(self.dataloader)
        self._at_boundary = boundary
        sync_ctx = self.model.no_sync() if (self.multi_gpu and not boundary) else contextlib.nullcontext()
        with sync_ctx:
            self.scaler.scale(loss / acc).backward()
        if not boundary:
            return
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.student_lm.parameters() if p.grad is not None]
        max_norm = self.params.max_grad_norm if self.params.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self._last_grad_norm = grad_norm.detach()
        bad = ~torch.isfinite(grad_norm)
        self.optimizer.grad_scale, self.optimizer.found_inf = None, bad.to(torch.float32)
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.grad_scale, self.optimizer.found_inf
        self.scheduler.step()
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self._pending_outcomes.append((self.n_total_iter + 1, *self._host_copy(bad)))

    @staticmethod
    def _host_copy(flag):
        """(host tensor, event): a copy of a device flag that is valid once event has completed."""
        if flag.device.type != "cuda":
            return flag, None
        host = torch.empty(flag.shape, dtype=flag.dtype, pin_memory=True)
        host.copy_(flag, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event

    def _settle_outcomes(self, keep_last=0):
        """Count the skipped and the applied optimizer steps whose outcome the host has not read yet.

        With keep_last=1 the newest one is left pending: every older one finished on the device long ago,
        so reading it does not stall the loop.
        """
        while len(self._pending_outcomes) > keep_last:
            iteration, host, event = self._pending_outcomes.pop(0)
            if event is not None:
                event.synchronize()
            if bool(host.numpy()):
                self.n_skipped_steps += 1
                self.n_consecutive_bad_steps += 1
                logger.warning("Non-finite loss or gradient at iteration %d: step skipped on every rank (%d so far, "
                               "%d in a row).", iteration, self.n_skipped_steps, self.n_consecutive_bad_steps)
            else:
                self.n_optimizer_steps += 1
                self.n_consecutive_bad_steps = 0

    def iter(self, bar=None):
        """Counters, periodic logging and checkpointing after each batch."""
        self.n_iter += 1
        self.n_total_iter += 1
        if self.n_total_iter % self.params.log_interval == 0:
            self.log_tensorboard(bar)
            self.last_log = time.time()
        if self.n_total_iter % self.params.checkpoint_interval == 0:
            self._checkpoint_due = True  # written at the next optimizer-step boundary
        eval_interval = getattr(self.params, "eval_interval", 0)
        if eval_interval and self.n_total_iter % eval_interval == 0:
            self.evaluate()

    def evaluate(self):
        """Held-out metrics (see scripts/evaluate.py). Collective: every rank evaluates its shard."""
        if self.eval_dataset is None:
            return None
        from scripts.evaluate import evaluate

        p = self.params
        metrics = evaluate(self.student, self.eval_dataset, mlm=self.mlm, batch_size=p.eval_batch_size,
                           device=self.device, special_tok_ids=p.special_tok_ids, vocab_size=self.vocab_size,
                           teacher=self.teacher, seed=p.seed, mask_prop=p.mlm_mask_prop,
                           max_batches=p.eval_max_batches, world_size=p.world_size, rank=p.global_rank)
        logger.info("Evaluation at iteration %d: %s", self.n_total_iter,
                    ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
        if self.is_master:
            for name, value in metrics.items():
                self.tensorboard.add_scalar(f"eval/{name}", value, self.n_total_iter)
            self.write_metrics({"split": "eval", "step": self.n_total_iter, "epoch": self.epoch, **metrics})
        return metrics

    def after_optimizer_step(self):
        """At an optimizer-step boundary: agree on stopping, give up after too many bad steps, checkpoint.

        Returns True when the run must stop now (a signal). Every decision here is the same on all ranks:
        the stop flag is all-reduced and the bad-step counter follows the all-reduced gradient norm.
        """
        self._settle_outcomes(keep_last=1)
        if self.n_consecutive_bad_steps + len(self._pending_outcomes) >= self.params.max_bad_steps:
            self._settle_outcomes()  # waits for this step, but only when the limit may be reached now
        if self.n_consecutive_bad_steps >= self.params.max_bad_steps:
            self.save_training_state()
            raise TrainingError(f"{self.n_consecutive_bad_steps} consecutive steps with a non-finite loss or "
                                f"gradient (iteration {self.n_total_iter}); the last good state is in "
                                f"{checkpoint_path(self.dump_path, self.n_total_iter)}")
        if self._agree_to_stop():
            self.save_training_state()
            if self.is_master:
                logger.warning("Stopped by %s at iteration %d. Checkpoint: %s. Resume with the same command plus "
                               "--resume.", self.stop_signal or "a signal on another rank", self.n_total_iter,
                               checkpoint_path(self.dump_path, self.n_total_iter))
            return True
        if self._checkpoint_due:
            self._checkpoint_due = False
            if self.is_master:
                self.save_checkpoint()
            self.save_training_state()
        return False

    def _agree_to_stop(self):
        """Whether a stop signal reached any rank. Host-side only: over NCCL it goes through a gloo group."""
        if not self.multi_gpu:
            return self.stop_signal is not None
        flag = torch.tensor([1 if self.stop_signal else 0], dtype=torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._host_group)
        return bool(flag.numpy()[0])

    def _install_signal_handlers(self):
        def request_stop(signum, frame):
            if self.stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: the user really wants out now
            self.stop_signal = signal.Signals(signum).name
            logger.warning("%s received: stopping at the next optimizer step.", self.stop_signal)

        previous = {}
        for sig in STOP_SIGNALS:
            try:
                previous[sig] = signal.signal(sig, request_stop)
            except ValueError:  # not the main thread (e.g. embedded use): no signal handling
                pass
        return previous

    def log_tensorboard(self, bar=None):
        """Averages since the last log (the only host sync of the loop), learning rate, memory, speed."""
        self._settle_outcomes()
        averages = {name: (total / max(count, 1)).item() if torch.is_tensor(total) else 0.0
                    for name, (total, count) in self._running.items()}
        self._running = {}
        self.total_loss_epoch += averages.get("total", 0.0) * self.params.log_interval
        if bar is not None:
            bar.set_postfix({"loss": f"{averages.get('total', float('nan')):.4f}"})
        if not self.is_master:
            return
        step = self.n_total_iter
        self.write_metrics({"split": "train", "step": step, "epoch": self.epoch,
                            "lr": self.scheduler.get_last_lr()[0], "skipped_steps": self.n_skipped_steps,
                            **{f"loss_{k}" if k != "total" else "loss": v for k, v in averages.items()}})
        tb = self.tensorboard
        for name, value in averages.items():
            tb.add_scalar(tag=f"losses/loss_{name}" if name != "total" else "losses/loss", scalar_value=value,
                          global_step=step)
        tb.add_scalar("learning_rate/lr", self.scheduler.get_last_lr()[0], step)
        tb.add_scalar("global/skipped_steps", self.n_skipped_steps, step)
        if self.device.type == "cuda":
            tb.add_scalar("global/memory_usage", torch.cuda.max_memory_allocated(self.device) / 1e6, step)
        tb.add_scalar("global/rss_mb", psutil.Process().memory_info().rss / 1e6, step)
        tb.add_scalar("global/speed", (time.time() - self.last_log) / self.params.log_interval, step)
        if getattr(self, "_last_grad_norm", None) is not None:
            tb.add_scalar("global/grad_norm", float(self._last_grad_norm), step)
        for name, param in self.student.named_parameters():
            if param.requires_grad:
                tb.add_scalar(f"parameter_mean/{name}", param.data.float().mean().item(), step)
                tb.add_scalar(f"parameter_std/{name}", param.data.float().std().item() if param.numel() > 1 else 0.0,
                              step)

    def end_epoch(self):
        """Epoch checkpoint (master), epoch averages, counters reset."""
        logger.info("%d sequences trained on this process in epoch %d.", self.n_sequences_epoch, self.epoch)
        self.evaluate()
        if self.is_master:
            self.save_checkpoint(checkpoint_name=f"model_epoch_{self.epoch}.pth")
            if self.n_iter:
                self.tensorboard.add_scalar("epoch/loss", self.total_loss_epoch / self.n_iter, self.epoch)
        self.epoch += 1
        self.n_sequences_epoch = 0
        self.n_iter = 0
        self.total_loss_epoch = 0.0
        self.save_training_state()

    def write_metrics(self, record):
        """One JSON line per log in dump_path/metrics.jsonl: the machine-readable twin of TensorBoard."""
        import json

        with open(os.path.join(self.dump_path, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")

    # -- saving -----------------------------------------------------------------------------------------

    def save_checkpoint(self, checkpoint_name="checkpoint.pth"):
        """Student weights (a plain state dict), written atomically. Master only."""
        path = os.path.join(self.dump_path, checkpoint_name)
        tmp = f"{path}.tmp"
        torch.save(self.student.state_dict(), tmp)
        os.replace(tmp, path)

    def save_training_state(self):
        """Everything needed to continue exactly: weights, optimizer, schedule, scaler, counters, every rank's RNG.

        Collective (every rank contributes its RNG state); only the master writes, atomically, then rotates.
        """
        self._settle_outcomes()
        rngs = [rng_state()]
        if self.multi_gpu:
            rngs = [None] * self.params.world_size
            torch.distributed.all_gather_object(rngs, rng_state())
        if not self.is_master:
            return
        state = {
            "format": "distil-checkpoint-v1",
            "student": self.student.state_dict(),
            "hidden_projection": self.hidden_projection.state_dict() if self.hidden_projection is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rngs,
            "counters": {name: getattr(self, name) for name in RESUMABLE_COUNTERS},
            "run": {name: getattr(self.params, name) for name in MUST_MATCH_ON_RESUME},
        }
        save_atomic(state, checkpoint_path(self.dump_path, self.n_total_iter))
        rotate_checkpoints(self.dump_path, self.params.save_total_limit)

    def load_training_state(self, state, path):
        """Continue from a checkpoint written by save_training_state (see train.py --resume)."""
        for name in MUST_MATCH_ON_RESUME:
            saved, now = state["run"].get(name), getattr(self.params, name)
            if saved != now:
                raise ValueError(f"{path}: written with {name}={saved!r}, this run has {name}={now!r}; resuming "
                                 "exactly needs the same value")
        self.student.load_state_dict(state["student"])
        if (state.get("hidden_projection") is None) != (self.hidden_projection is None):
            raise ValueError(f"{path}: the checkpoint and this run disagree on the hidden projection")
        if self.hidden_projection is not None:
            self.hidden_projection.load_state_dict(state["hidden_projection"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        for name, value in state["counters"].items():
            setattr(self, name, value)
        set_rng_state(state["rng"][self.params.global_rank])
        logger.info("Resumed from %s: epoch %d, %d batches into it, iteration %d.", path, self.epoch, self.n_iter,
                    self.n_total_iter)

    def save_final(self):
        """A folder that `from_pretrained(dump_path)` loads: config, weights, and the teacher's tokenizer."""
        self.student.save_pretrained(self.dump_path)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(self.dump_path)
