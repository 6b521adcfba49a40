"""Divergences between the teacher's and the student's next-token (or class) distributions (--kd_loss).

    forward_kl  KL(p_t || p_s) = sum p_t (log p_t - log p_s)             the seed's, mass-covering
    reverse_kl  KL(p_s || p_t) = sum p_s (log p_s - log p_t)             mode-seeking
    jsd         beta KL(p_t || m) + (1 - beta) KL(p_s || m),  m = beta p_t + (1 - beta) p_s,   0 < beta < 1
                (beta = 0.5 is the Jensen-Shannon divergence; it is bounded by log 2 and symmetric then)
    tvd         1/2 sum |p_t - p_s|                                      total variation, bounded by 1

Both distributions come in as log-probabilities (rows, n), softened by the temperature before they get
here; every function returns one value per row (summed over the last dimension). Training multiplies them
by T^2 whatever the divergence (as the seed does for forward KL: it keeps the gradient's scale as T moves).

`divergence_rows` is the one formula. The fused training loss (losses._WeightedLogitLoss) also needs the
gradient before backward runs, so `divergence_rows(..., with_grad=True)` gives it in closed form: each
divergence above is D(p_s) with dD/dp_s = g (up to a constant per row, which the softmax cancels), so w.r.t.
the student's softened logits z (p_s = softmax z) the gradient is p_s * (g - sum p_s g), with
    forward_kl  p_s - p_t directly (the seed's expression, kept bit for bit)
    reverse_kl  g = log p_s - log p_t
    jsd         g = (1 - beta) (log p_s - log m)
    tvd         g = sign(p_s - p_t) / 2
"""
import math
from typing import NamedTuple

import torch

KD_LOSSES = ("forward_kl", "reverse_kl", "jsd", "tvd")
DEFAULT_KD_LOSS = "forward_kl"
DEFAULT_JSD_BETA = 0.5


def add_kd_loss_arguments(add):
    """--kd_loss and --jsd_beta, for train.py and the task scripts (`add` is parser.add_argument)."""
    add("--kd_loss", default=DEFAULT_KD_LOSS, choices=KD_LOSSES,
        help="Divergence of the distillation term (--alpha_ce): forward_kl KL(teacher || student), the "
             "original's; reverse_kl KL(student || teacher); jsd, generalized Jensen-Shannon with --jsd_beta; "
             "tvd, total variation. Every one is multiplied by T^2.")
    add("--jsd_beta", default=DEFAULT_JSD_BETA, type=float,
        help="With --kd_loss jsd (ignored otherwise): weight beta in (0, 1) of the teacher in the mixture m = beta "
             "p_t + (1 - beta) p_s and of KL(p_t || m) in beta KL(p_t || m) + (1 - beta) KL(p_s || m). TRL's "
             "beta 0 and 1 are --kd_loss forward_kl and reverse_kl here.")


# TRL's GKD `beta` switches to a plain KL at its ends (0: forward, 1: reverse), where this mixture vanishes; a
# TRL user's beta 0 or 1 is refused with the --kd_loss that means it, rather than given a second meaning here.
_TRL_ENDPOINTS = {0.0: ("forward", "forward_kl"), 1.0: ("reverse", "reverse_kl")}


def check_kd_loss_args(kd_loss, beta):
    """A message naming the flag when --kd_loss / --jsd_beta cannot be used, else None. --jsd_beta is only read
    by --kd_loss jsd: with another divergence its value does not matter."""
    if kd_loss not in KD_LOSSES:
        return f"--kd_loss must be one of {', '.join(KD_LOSSES)}, got {kd_loss!r}"
    if kd_loss != "jsd":
        return None
    if beta in _TRL_ENDPOINTS:
        direction, flag = _TRL_ENDPOINTS[beta]
        return (f"--jsd_beta {beta:g} makes the mixture divergence vanish; for TRL's {direction} KL: use "
                f"--kd_loss {flag}")
    if not 0 < beta < 1:
        return f"--jsd_beta must be in (0, 1), got {beta}"
    return None


def divergence_rows(log_p_s, log_p_t, kd_loss=DEFAULT_KD_LOSS, beta=DEFAULT_JSD_BETA, with_grad=False):
    """(D per row (rows,), dD/dz (rows, n) or None) for log-probabilities log_p_s, log_p_t (rows, n), where z
    are the student's softened logits (log_p_s = log_softmax(z)). with_grad may overwrite log_p_s (forward_kl
    turns it into the gradient: the fused loss then keeps no second (rows, n) buffer). Differentiable by
    autograd without with_grad (the task scripts' losses go through autograd).

    Entries where both probabilities are 0 contribute 0; give such entries (e.g. padding positions) a very
    negative finite logit, not -inf, so that no 0 * inf appears (see soft_target_divergence in distil/losses.py).
    """
    if kd_loss == "forward_kl":
        p_t = log_p_t.exp()
        rows = (p_t * (log_p_t - log_p_s)).sum(-1)  # (rows,)
        return rows, (log_p_s.exp_().sub_(p_t) if with_grad else None)  # p_s - p_t
    p_s = log_p_s.exp()  # (rows, n)
    if kd_loss == "reverse_kl":
        g = log_p_s - log_p_t
        rows = (p_s * g).sum(-1)
    elif kd_loss == "jsd":
        log_m = torch.logaddexp(log_p_t + math.log(beta), log_p_s + math.log1p(-beta))  # (rows, n)
        g = log_p_s - log_m
        rows = beta * (log_p_t.exp() * (log_p_t - log_m)).sum(-1) + (1 - beta) * (p_s * g).sum(-1)
        g = g.mul_(1 - beta) if with_grad else None
    elif kd_loss == "tvd":
        delta = p_s - log_p_t.exp()
        rows = 0.5 * delta.abs().sum(-1)
        g = delta.sign_().mul_(0.5) if with_grad else None
    else:
        raise ValueError(f"unknown kd_loss {kd_loss!r} (one of {', '.join(KD_LOSSES)})")
    if not with_grad:
        return rows, None
    mean_g = (p_s * g).sum(-1, keepdim=True)  # (rows, 1)
    return rows, g.sub_(mean_g).mul_(p_s)


# ---- a teacher known only by its top k (--teacher_cache)
#
# A cached teacher row holds the k likeliest ids with their log-probabilities and the log of the mass the other
# V - k ids share (the tail). The divergence is then taken between the two distributions coarsened to k + 1
# outcomes (the k ids, and "any other id"), which is still a proper divergence: >= 0, and 0 only when student
# and teacher agree on those k + 1 probabilities. It is computed without a special case by completing the
# teacher over the whole vocabulary: the tail mass is spread over the tail ids in proportion to the student's
# own probabilities there. Every divergence above is an f-divergence, sum p_s f(p_t / p_s), so a constant
# ratio p_t / p_s over the tail makes the tail's share exactly the coarsened one, and its gradient (with the
# completed teacher held constant) is the coarsened gradient too. With k = V the tail is empty and this is the
# full distribution.

class TopKTeacher(NamedTuple):
    """A cached teacher's rows: ids (n, k) long; log_probs (n, k + 1) at the run's temperature, the last column
    the log of the tail mass (-inf when k is the vocabulary size)."""
    ids: torch.Tensor
    log_probs: torch.Tensor

    def rows(self, start, stop):
        return TopKTeacher(self.ids[start:stop], self.log_probs[start:stop].float())


# A tail mass of 0 (-inf) is clamped to this log: exp() of it is 0 in float32, and it keeps 0 * log 0 finite.
_EMPTY_TAIL_LOG = -1e4


def complete_teacher_log_probs(topk, log_p_s):
    """(rows, V) teacher log-probabilities from a TopKTeacher chunk: its k values at its ids, and the tail mass
    spread over the other ids as the student's log_p_s (rows, V) spreads there (see above)."""
    tail_only = log_p_s.scatter(1, topk.ids, float("-inf"))  # (rows, V): the student's tail, -inf elsewhere
    tail_lse = torch.logsumexp(tail_only, dim=-1, keepdim=True)  # (rows, 1): log of the student's tail mass
    tail = topk.log_probs[:, -1:].clamp(min=_EMPTY_TAIL_LOG)  # (rows, 1)
    # In place, one buffer. With an empty tail (k = V) this writes nan (-inf + inf) everywhere, and the scatter
    # then overwrites every entry.
    return tail_only.add_(tail - tail_lse).scatter_(1, topk.ids, topk.log_probs[:, :-1])
