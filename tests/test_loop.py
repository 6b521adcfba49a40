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
