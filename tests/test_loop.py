"""The loop's bookkeeping (distiller.py): the epoch loss, gradient accumulation at an epoch's end, and the
models it is handed (teacher dtype, hidden projection)."""
import json

import numpy as np
import pytest
import torch

from conftest import run_loop, tiny_distiller


def _records(dump, split):
    with open(dump / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def _epoch_records(dump, log_interval):
    distiller, _, _ = tiny_distiller("bert_mlm", dump, {"n_epoch": 2, "log_interval": log_interval}, n_batches=6)
    distiller.train()
    return _records(dump, "train_epoch"), [r["loss"] for r in _records(dump, "train")]


@pytest.fixture(scope="module")
def every_iteration(tmp_path_factory):
    """The reference run: every iteration's loss logged (logging draws nothing random, so a run with another
    --log_interval computes the very same losses)."""
    return _epoch_records(tmp_path_factory.mktemp("every1"), 1)


@pytest.mark.parametrize("log_interval", [4, 100])
def test_epoch_loss_is_the_mean_of_the_epoch_iteration_losses(tmp_path, every_iteration, log_interval):
    """Whatever --log_interval: no iteration dropped after the last log (4: logs at iterations 4, 8, 12 of two
    6-iteration epochs), none carried over from the previous epoch, and an epoch shorter than the interval
    (100) does not log 0."""
    reference_epochs, per_iteration = every_iteration
    epochs, _ = _epoch_records(tmp_path, log_interval)
    assert len(per_iteration) == 12  # 6 batches an epoch, 2 epochs
    expected = [np.mean(per_iteration[:6]), np.mean(per_iteration[6:])]
    assert [r["epoch"] for r in epochs] == [0, 1]
    for record, value in zip(epochs, expected):
        assert record["loss"] == pytest.approx(value, rel=1e-6)
    assert epochs == reference_epochs


def _equal_length_sequences(n, length=16, seed=0):
    rng = np.random.default_rng(seed)
    eos = 299
    return [np.concatenate([[eos], rng.integers(0, 299, size=length - 2), [eos]]).astype(np.int64) for _ in range(n)]


def _gradients_per_step(dump, batches_of, accumulation):
    """The gradient each optimizer step applies (recorded just before it), for a CLM run without dropout
    or clipping over 36 equal-length sequences cut into batches of `batches_of`."""
    flat = _equal_length_sequences(36)
    sequences = [flat[i: i + batches_of] for i in range(0, 36, batches_of)]
    distiller, prepare, batches = tiny_distiller(
        "gpt2_clm", dump, {"gradient_accumulation_steps": accumulation, "max_grad_norm": 0.0}, sequences=sequences,
        dropout=0.0)
    params = [p for p in distiller.student_lm.parameters() if p.requires_grad]
    seen = []
    distiller.optimizer.register_step_pre_hook(lambda *_: seen.append([p.grad.detach().clone() for p in params]))
    run_loop(distiller, prepare, batches)
    return seen


def test_a_short_last_accumulation_group_averages_over_the_batches_it_holds(tmp_path):
    """12 batches of 3 with accumulation 5: steps of 5, 5 and 2 batches, each the average of its batches'
    gradients, so equal to full-batch steps over the same sequences (batches of 15, 15 and 6). Before the
    fix the last step was scaled by 2/5."""
    accumulated = _gradients_per_step(tmp_path / "acc", batches_of=3, accumulation=5)
    full = _gradients_per_step(tmp_path / "full", batches_of=15, accumulation=1)
    assert len(accumulated) == len(full) == 3
    for step, (ours, ref) in enumerate(zip(accumulated, full)):
        for g, g_ref in zip(ours, ref):
            torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-7, msg=f"optimizer step {step}")


def test_teacher_is_stored_in_the_compute_dtype(tiny):
    """--bf16 / --fp16 load the frozen teacher in that dtype under DDP as under FSDP (autocast would cast its
    weights at every forward anyway); float32 otherwise."""
    import train

    common = ["--dump_path", "d", "--data_file", "f", "--student_type", "distilbert", "--student_config", "c",
              "--teacher_type", "bert", "--teacher_name", str(tiny["bert"]), "--mlm", "--alpha_clm", "0"]
    for flags, dtype in (([], torch.float32), (["--bf16"], torch.bfloat16), (["--fp16"], torch.float16)):
        assert train.build_teacher(train.parse_args(common + flags)).dtype == dtype, flags


def test_hidden_projection_does_not_depend_on_the_rank_generator():
    """Each rank's global generator is seeded apart (train.py: seed + rank); the projection must be identical
    on every rank, since FSDP shards each rank's own initial tensor."""
    from distil.models import hidden_projection

    draws = []
    for rank_seed in (56, 57):
        torch.manual_seed(rank_seed)
        draws.append(hidden_projection(32, 48, seed=56).weight)
    torch.testing.assert_close(draws[0], draws[1], rtol=0, atol=0)
    assert not torch.equal(draws[0], hidden_projection(32, 48, seed=1).weight)


def _weights_after_two_steps(dump, config_name, fuse, monkeypatch):
    from distiller import Distiller

    monkeypatch.setattr(Distiller, "fuse_head", fuse)
    distiller, prepare, batches = tiny_distiller(config_name, dump, {"alpha_mse": 0.5, "temperature": 2.0},
                                                 n_batches=2, dropout=0.0)
    assert distiller.student_lm.fused_head == fuse
    before = distiller.student.model.embed_tokens.weight.detach().clone()
    run_loop(distiller, prepare, batches)
    assert distiller.scheduler.last_epoch == 2 and not torch.equal(before, distiller.student.model.embed_tokens.weight)
    return {name: p.detach().clone() for name, p in distiller.student.named_parameters()}


def test_fused_head_trains_a_tied_llama_as_the_logits_path_does(tmp_path, monkeypatch):
    """Distiller.step on a 1-layer Llama student with tied embeddings (KD at T = 2, MSE, CLM, cosine): the
    weights after 2 optimizer steps are those of the logits path (Distiller.fuse_head off)."""
    ref = _weights_after_two_steps(tmp_path / "logits", "llama_clm", False, monkeypatch)
    fused = _weights_after_two_steps(tmp_path / "fused", "llama_clm", True, monkeypatch)
    assert "model.embed_tokens.weight" in ref and "lm_head.weight" not in ref  # tied: one parameter
    for name, value in ref.items():
        torch.testing.assert_close(fused[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("config_name, fused", [("llama_clm", True), ("gpt2_clm", True), ("bert_mlm", False)])
def test_the_fused_head_is_taken_for_plain_linear_heads_only(tmp_path, monkeypatch, config_name, fused):
    """Llama's and GPT-2's lm_head (a plain Linear) go through losses._FusedHeadLoss, DistilBERT's MLM head
    (transform, norm, projection) through the logits path, as the step really runs them."""
    from distil import losses

    calls = []
    for name in ("_FusedHeadLoss", "_WeightedLogitLoss"):
        function = getattr(losses, name)
        monkeypatch.setattr(function, "apply", lambda *a, _f=function.apply, _n=name: calls.append(_n) or _f(*a))
    distiller, prepare, batches = tiny_distiller(config_name, tmp_path, n_batches=2)
    batch = prepare(*batches[0])
    s_out, t_out = distiller._forward(batch.input_ids, batch.attention_mask, batch.rows, batch.padded)
    assert isinstance(s_out[0], losses.HeadRows) == fused and isinstance(t_out[0], losses.HeadRows) == fused
    run_loop(distiller, prepare, batches[:1])
    assert calls == ["_FusedHeadLoss" if fused else "_WeightedLogitLoss"]
