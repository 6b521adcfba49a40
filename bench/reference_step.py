"""The original research scripts' distillation step, as the benchmark's reference (scripts/benchmark.py): full
logits from both models, `masked_select` of the positions, the nn loss modules, backward, clip, AdamW, scheduler.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

def reference_losses(s_logits, t_logits, s_hidden, t_hidden, attn_mask, lm_labels, p):
    """{name: loss} with the original scripts' formulas (full logits, masked_select, nn loss modules)."""
    temperature, vocab = p.temperature, s_logits.size(-1)
    kd_mask = (lm_labels > -1) if (p.mlm and p.restrict_ce_to_mask) else attn_mask
    sel = kd_mask.unsqueeze(-1).expand_as(s_logits)  # (bs, seq, vocab)
    s_slct = torch.masked_select(s_logits, sel).view(-1, vocab)  # (n, vocab)
    t_slct = torch.masked_select(t_logits, sel).view(-1, vocab)
    losses = {}
    if p.alpha_ce > 0:
        losses["ce"] = nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s_slct / temperature, dim=-1),
                                                           F.softmax(t_slct / temperature, dim=-1)) * temperature ** 2
    lm_fct = nn.CrossEntropyLoss(ignore_index=-100)
    if p.alpha_mlm > 0:
        losses["mlm"] = lm_fct(s_logits.view(-1, vocab), lm_labels.view(-1))
    if p.alpha_clm > 0:
        shift_logits = s_logits[:, :-1, :].contiguous()
        shift_labels = lm_labels[:, 1:].contiguous()
        losses["clm"] = lm_fct(shift_logits.view(-1, vocab), shift_labels.view(-1))
    if p.alpha_mse > 0:
        losses["mse"] = nn.MSELoss(reduction="sum")(s_slct, t_slct) / s_slct.size(0)
    if p.alpha_cos > 0:
        dim = s_hidden.size(-1)
        hsel = attn_mask.unsqueeze(-1).expand_as(s_hidden)  # (bs, seq, dim)
        s_h = torch.masked_select(s_hidden, hsel).view(-1, dim)  # (n, dim)
        t_h = torch.masked_select(t_hidden, hsel).view(-1, dim)
        losses["cos"] = nn.CosineEmbeddingLoss(reduction="mean")(s_h, t_h, s_h.new_ones(s_h.size(0)))
    return losses


def weighted_total(losses, p):
    """The step's loss. Ours: the fused term "logits" (already alpha_ce * ce + alpha_mse * mse + alpha_lm * lm;
    the named terms beside it are detached copies for logging) plus alpha_cos * cos. The reference: every
    term times its alpha."""
    if "logits" in losses:
        return losses["logits"] + p.alpha_cos * losses.get("cos", 0.0)
    return sum(getattr(p, f"alpha_{k}") * v for k, v in losses.items())


class ReferenceStep:
    """The original scripts' step: forward both models, losses, backward, clip, AdamW, scheduler.

    The optimizer is torch's AdamW with its default (non-fused) implementation, as a straightforward port
    of the original would use; the schedule and hyper-parameters are the same as ours. With --bf16 the
    losses are computed inside autocast, which runs softmax, log_softmax and the loss modules in fp32 (as
    apex O1 did for the original); in fp32 runs the softmaxes are in the model's dtype, fp32.
    """

    def __init__(self, params, student, teacher, num_steps, device):
        from transformers import get_linear_schedule_with_warmup

        self.p, self.student, self.teacher, self.device = params, student, teacher, device
        self.amp_dtype = torch.bfloat16 if params.bf16 else None
        self.trainable = [x for x in student.parameters() if x.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=params.learning_rate, eps=params.adam_epsilon,
                                           betas=(0.9, 0.98), weight_decay=params.weight_decay)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, math.ceil(num_steps * params.warmup_prop),
                                                         num_steps)
        self.first_losses = None

    def step(self, input_ids, attention_mask, lm_labels, *unused):  # unused: our Batch's host-side extras
        p = self.p
        mask = attention_mask if p.mlm else None  # the original gave GPT-2 no attention mask
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            s_out = self.student(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
            with torch.no_grad():
                t_out = self.teacher(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
            losses = reference_losses(s_out.logits, t_out.logits, s_out.hidden_states[-1], t_out.hidden_states[-1],
                                      attention_mask, lm_labels, p)
            loss = weighted_total(losses, p)
        if self.first_losses is None:
            self.first_losses = {k: float(v.detach()) for k, v in dict(losses, total=loss).items()}
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, p.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
