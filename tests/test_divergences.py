"""--kd_loss: every divergence, in the fused training loss (losses.weighted_logit_loss, which writes its gradient
in forward) and in the task scripts' loss (losses.soft_target_divergence through autograd), against plain
autograd references written out here from the definitions, on random logits: values and gradients, masked
rows, temperatures other than 1, chunking, float16 logits. Plus a few values worked out by hand."""
import math

import pytest
import torch

from distil import losses
from distil.divergences import KD_LOSSES
from distil.losses import classification_kd_loss, soft_target_divergence, span_kd_loss, weighted_logit_loss

BETA = 0.3  # a generalized JSD weight other than the symmetric 0.5, so a swapped beta / (1 - beta) shows


def reference(p_s, p_t, kd_loss, beta=BETA):
    """D(p_t, p_s) per row from the definitions (plain torch, autograd does the gradient)."""
    if kd_loss == "forward_kl":
        return (p_t * (p_t.log() - p_s.log())).sum(-1)
    if kd_loss == "reverse_kl":
        return (p_s * (p_s.log() - p_t.log())).sum(-1)
    if kd_loss == "jsd":
        m = beta * p_t + (1 - beta) * p_s
        return beta * (p_t * (p_t / m).log()).sum(-1) + (1 - beta) * (p_s * (p_s / m).log()).sum(-1)
    return 0.5 * (p_t - p_s).abs().sum(-1)


def _logits(n=13, vocab=37, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, vocab, generator=g, dtype=torch.float64) * scale,
            torch.randn(n, vocab, generator=g, dtype=torch.float64) * scale)


@pytest.mark.parametrize("kd_loss", KD_LOSSES)
@pytest.mark.parametrize("temperature,chunk_elements", [(1.0, 1 << 22), (2.5, 37 * 4)])
def test_fused_loss_matches_autograd_reference(monkeypatch, kd_loss, temperature, chunk_elements):
    """Value and gradient of w_ce * ce (+ the LM term, which must not change) over the kd rows only."""
    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", chunk_elements)  # several chunks of 4 rows, or one
    s, t = _logits()
    kd_rows = torch.rand(13, generator=torch.Generator().manual_seed(1)) < 0.6
    kd_rows[0], kd_rows[1] = False, True
    labels = torch.randint(37, (13,), generator=torch.Generator().manual_seed(2))
    labels[::3] = losses.IGNORE_INDEX
    w_ce, w_lm = 1.7, 0.4

    s_ref = s.clone().requires_grad_(True)
    p_s, p_t = torch.softmax(s_ref / temperature, -1), torch.softmax(t / temperature, -1)
    ce_ref = reference(p_s, p_t, kd_loss)[kd_rows].mean() * temperature ** 2
    has = labels != losses.IGNORE_INDEX
    lm_ref = torch.nn.functional.cross_entropy(s_ref[has], labels[has])
    (w_ce * ce_ref + w_lm * lm_ref).backward()

    s_fused = s.float().requires_grad_(True)
    total, ce, mse, lm = weighted_logit_loss(s_fused, t.float(), labels, temperature, w_ce, 0.0, w_lm, kd_rows,
                                             kd_loss=kd_loss, jsd_beta=BETA)
    total.backward()
    torch.testing.assert_close(ce.double(), ce_ref.detach(), rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(lm.double(), lm_ref.detach(), rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(s_fused.grad.double(), s_ref.grad, rtol=1e-4, atol=1e-6)
    assert s_fused.grad[0].abs().sum() == s_fused.grad[0].abs().sum()  # finite
    assert float(ce) > 0


@pytest.mark.parametrize("kd_loss", ["reverse_kl", "jsd", "tvd"])
def test_fused_loss_float16_logits_keep_their_gradient(kd_loss):
    """--fp16: the gradient stored before backward (row-scaled float16) equals the float32 one to fp16 precision,
    with a loss scale of 2^16 coming in as a GradScaler would send it; no entry flushed to zero."""
    s, t = (x.half() for x in _logits(n=64, vocab=300, seed=4))  # the same inputs for both runs
    grads = []
    for dtype in (torch.float32, torch.float16):
        x = s.to(dtype).requires_grad_(True)
        total, *_ = weighted_logit_loss(x, t, None, 2.0, 5.0, 0.0, 0.0, kd_loss=kd_loss, jsd_beta=BETA)
        (total * 2.0 ** 16).backward()
        grads.append(x.grad.float() / 2.0 ** 16)
    ref, half = grads
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    nonzero = ref.abs() > ref.abs().amax(-1, keepdim=True) * 1e-3
    torch.testing.assert_close(half[nonzero], ref[nonzero], rtol=2e-2, atol=0.0)


def test_hand_computed_values():
    """Two-token distributions p_t = (1/4, 3/4), p_s = (1/2, 1/2), T = 1, one row:
        reverse KL = 1/2 ln(2) + 1/2 ln(2/3) = 0.1438410
        TVD        = 1/2 (1/4 + 1/4) = 0.25
        JSD beta=1/2: m = (3/8, 5/8); 1/2 [1/4 ln(2/3) + 3/4 ln(6/5)] + 1/2 [1/2 ln(4/3) + 1/2 ln(4/5)] = 0.0338221
    and for disjoint one-hot distributions JSD(1/2) = ln 2 (its bound), TVD = 1."""
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[0.0, math.log(3.0)]])
    expected = {"reverse_kl": 0.1438410, "tvd": 0.25, "jsd": 0.0338221}
    for kd_loss, value in expected.items():
        _, ce, _, _ = weighted_logit_loss(s, t, None, 1.0, 1.0, 0.0, 0.0, kd_loss=kd_loss, jsd_beta=0.5)
        assert abs(float(ce) - value) < 1e-6, kd_loss
    far_s, far_t = torch.tensor([[40.0, -40.0]]), torch.tensor([[-40.0, 40.0]])
    _, jsd, _, _ = weighted_logit_loss(far_s, far_t, None, 1.0, 1.0, 0.0, 0.0, kd_loss="jsd", jsd_beta=0.5)
    _, tvd, _, _ = weighted_logit_loss(far_s, far_t, None, 1.0, 1.0, 0.0, 0.0, kd_loss="tvd")
    assert abs(float(jsd) - math.log(2)) < 1e-6 and abs(float(tvd) - 1.0) < 1e-6


@pytest.mark.parametrize("kd_loss", KD_LOSSES)
def test_task_loss_matches_reference_with_padding(kd_loss):
    """The task scripts' term: masked entries (SQuAD's padding) leave both softmaxes, the gradient stays finite
    and equals the reference over the kept entries; T = 3; the classification and span wrappers pass the
    choice through."""
    s, t = _logits(n=4, vocab=9, seed=6)
    attn = torch.ones(4, 9, dtype=torch.long)
    attn[1, 6:] = 0
    attn[3, 2:] = 0
    x = s.float().requires_grad_(True)
    got = soft_target_divergence(x, t.float(), 3.0, attn.bool(), kd_loss, BETA)
    got.backward()
    ref_s = s.clone().requires_grad_(True)
    rows = []
    for r in range(4):
        n = int(attn[r].sum())
        rows.append(reference(torch.softmax(ref_s[r, :n] / 3.0, -1), torch.softmax(t[r, :n] / 3.0, -1), kd_loss))
    ref = torch.stack(rows).mean() * 9.0
    ref.backward()
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-5, atol=1e-7)
    assert torch.isfinite(x.grad).all() and (x.grad[~attn.bool()] == 0).all()
    torch.testing.assert_close(x.grad.double(), ref_s.grad, rtol=1e-4, atol=1e-7)
    span = span_kd_loss(x, x, t.float(), t.float(), 3.0, attn, kd_loss, BETA)
    torch.testing.assert_close(span, got)
    cls = classification_kd_loss(x[:, :5], t[:, :5].float(), 3.0, kd_loss, BETA)
    torch.testing.assert_close(cls, soft_target_divergence(x[:, :5], t[:, :5].float(), 3.0, kd_loss=kd_loss,
                                                           jsd_beta=BETA))


def test_flags_refuse_a_bad_choice():
    """train.py and the task scripts check --jsd_beta with the other flags (the one-line exit-2 path that every
    UserError takes is tested in test_bad_input.py)."""
    import argparse

    from tasks import training as task_training
    import train
    from utils import UserError

    args = train.parse_args(["--dump_path", "unused", "--data_file", "unused", "--student_type", "gpt2",
                             "--student_config", __file__, "--teacher_type", "gpt2", "--teacher_name", "unused",
                             "--kd_loss", "jsd", "--jsd_beta", "1"])
    with pytest.raises(UserError, match=r"--jsd_beta 1 .*TRL's reverse KL: use --kd_loss reverse_kl"):
        train.sanity_checks(args)
    parser = argparse.ArgumentParser()
    task_training.add_training_arguments(parser, 128)
    args = parser.parse_args(["--output_dir", "o", "--model_name_or_path", "m", "--do_train", "--kd_loss", "jsd",
                              "--jsd_beta", "0"])
    with pytest.raises(UserError, match="--jsd_beta 0 .*TRL's forward KL: use --kd_loss forward_kl"):
        task_training.check_training_args(args)
    args = parser.parse_args(["--output_dir", "o", "--model_name_or_path", "m", "--do_train", "--kd_loss", "jsd",
                              "--jsd_beta", "1.5"])
    with pytest.raises(UserError, match=r"--jsd_beta must be in \(0, 1\)"):
        task_training.check_training_args(args)
    assert parser.parse_args(["--output_dir", "o", "--model_name_or_path", "m"]).kd_loss == "forward_kl"


def test_jsd_beta_is_only_checked_for_jsd():
    """--jsd_beta only weighs --kd_loss jsd: with another divergence any value is ignored, as its help says (a
    --kd_loss tvd --jsd_beta 1 run was refused). Within jsd, TRL's endpoints are refused with the equivalent flag."""
    from distil.divergences import check_kd_loss_args

    for kd_loss in ("forward_kl", "reverse_kl", "tvd"):
        for beta in (0.0, 1.0, 7.0):
            assert check_kd_loss_args(kd_loss, beta) is None, (kd_loss, beta)
    assert check_kd_loss_args("jsd", 0.25) is None
    assert "--kd_loss forward_kl" in check_kd_loss_args("jsd", 0.0)
    assert "--kd_loss reverse_kl" in check_kd_loss_args("jsd", 1.0)
