"""The training step makes no device-to-host synchronisation between log intervals (issue: fast GPU step).

Checked on the CPU with a dispatch mode that records every operation that would block the host on a GPU.
The one allowed exception is inside transformers: for causal LMs given no attention mask, its mask builder
checks position_ids for packed sequences (`.all()`) in every forward. Avoiding it would mean passing an
explicit 4D causal mask, which keeps SDPA from its causal flash kernel: a worse trade than the wait.
"""
import os
import sys

import pytest
import torch

from conftest import REPO
from host_syncs import HostSyncRecorder

sys.path.insert(0, os.path.join(REPO, "scripts"))
import benchmark  # noqa: E402

ALLOWED = ("transformers/masking_utils.py", "find_packed_sequence_indices")


def _distiller(config_name, tmp_path, extra=None, device="cpu", bf16=False):
    """A Distiller on tiny random models, its prepare function, and six collated batches (one unpadded)."""
    device = torch.device(device)
    args = benchmark.parse_args(["--size", "tiny", "--config", config_name, "--batch_size", "3", "--seq_len", "24",
                                 "--hidden", "32", "--heads", "2", "--ffn", "64", "--teacher_layers", "2",
                                 "--student_layers", "1", "--vocab_size", "300", "--device", device.type]
                                + (["--bf16"] if bf16 else []))
    torch.manual_seed(0)
    teacher, student, student_type = benchmark.build_models(config_name, "tiny", args)
    teacher.to(device).eval().requires_grad_(False)
    student.to(device)
    special = benchmark.special_ids(config_name, 300)
    mlm = config_name.startswith("bert")
    sequences = benchmark.make_sequences(6, 3, 24, 300, special, mlm, seed=0)
    sequences[1] = [s[:12] for s in sequences[1]]  # one batch without padding: every sequence 12 tokens
    params = benchmark.make_params(config_name, student_type, device, args, special, 24, str(tmp_path))
    params.log_interval = 10_000
    for key, value in (extra or {}).items():
        setattr(params, key, value)
    distiller, dataset = benchmark.make_distiller(params, sequences, student, teacher)
    prepare = distiller.prepare_batch_mlm if mlm else distiller.prepare_batch_clm
    batches = [dataset.batch_sequences([(s, len(s)) for s in batch]) for batch in sequences]
    return distiller, prepare, batches


def _loop(distiller, prepare, batches):
    """The body of Distiller.train's loop, for each batch."""
    distiller.student.train()
    for token_ids, lengths in batches:
        distiller.step(*prepare(token_ids, lengths))
        distiller.iter()
        if distiller._at_boundary:
            distiller.after_optimizer_step()


def _run(distiller, prepare, batches):
    """_loop, recording host synchronisations."""
    with HostSyncRecorder() as recorder:
        _loop(distiller, prepare, batches)
    return recorder.events


def _ours(events):
    return [(op, stack) for op, stack in events if not all(part in stack for part in ALLOWED)]


@pytest.mark.parametrize("config_name, extra", [
    ("bert_mlm", None),
    ("bert_mlm_restrict", None),
    ("bert_mlm", {"gradient_accumulation_steps": 2, "alpha_mse": 0.5}),
    ("gpt2_clm", None),
])
def test_training_step_makes_no_host_sync(tmp_path, config_name, extra):
    distiller, prepare, batches = _distiller(config_name, tmp_path, extra)
    events = _run(distiller, prepare, batches)
    ours = _ours(events)
    assert not ours, "host synchronisations in the step:\n" + "\n".join(f"{op}\n{stack}" for op, stack in ours)
    # the step really ran: optimizer steps were taken (read after the loop, where a sync is fine)
    distiller._settle_outcomes()
    assert distiller.n_optimizer_steps == len(batches) // (extra or {}).get("gradient_accumulation_steps", 1)
    assert distiller.n_skipped_steps == 0


def test_the_recorder_sees_synchronisations(tmp_path):
    """The check above can fail: a step given no loss rows finds them with nonzero, and .item() is seen."""
    distiller, prepare, batches = _distiller("bert_mlm", tmp_path)
    batch = prepare(*batches[0])
    with HostSyncRecorder() as recorder:
        distiller.step(batch.input_ids, batch.attention_mask, batch.lm_labels)  # rows not given
        torch.ones(2).sum().item()
        torch.ones(3, 2)[torch.tensor([True, False, True])].sum()
    ops = [op for op, _ in _ours(recorder.events)]
    assert "aten.nonzero.default" in ops and "aten._local_scalar_dense.default" in ops
    assert "aten.index.Tensor" in ops


def test_a_skipped_step_leaves_the_weights_and_is_counted(tmp_path):
    """The optimizer step is skipped on the device when the gradient norm is not finite."""
    distiller, prepare, batches = _distiller("bert_mlm", tmp_path)
    _loop(distiller, prepare, batches[:1])
    before = {k: v.clone() for k, v in distiller.student.state_dict().items()}
    lr_before = distiller.scheduler.get_last_lr()[0]
    original = distiller.compute_losses
    distiller.compute_losses = lambda *a: {k: v * float("nan") for k, v in original(*a).items()}
    _loop(distiller, prepare, batches[2:3])
    distiller._settle_outcomes()
    assert distiller.n_skipped_steps == 1 and distiller.n_consecutive_bad_steps == 1
    assert distiller.n_optimizer_steps == 1
    for name, value in distiller.student.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(int(s["step"]) == 1 for s in distiller.optimizer.state.values())
    assert distiller.scheduler.get_last_lr()[0] != lr_before  # the schedule moves on, as documented
    distiller.compute_losses = original
    _loop(distiller, prepare, batches[3:4])
    distiller._settle_outcomes()
    assert distiller.n_optimizer_steps == 2 and distiller.n_consecutive_bad_steps == 0
    assert any(not torch.equal(v, before[k]) for k, v in distiller.student.state_dict().items())


@pytest.mark.parametrize("config_name, mask_prop", [("bert_mlm_restrict", 0.15), ("bert_mlm_restrict", 0.95),
                                                     ("bert_mlm", 0.15), ("gpt2_clm", None)])
def test_host_known_rows_give_the_same_losses(tmp_path, config_name, mask_prop):
    """The rows a Batch carries (found without a sync) give the losses of the rows found with nonzero.

    At mask_prop 0.95 more positions are drawn than are eligible (specials are never masked), so the drawn
    rows include unmasked ones, which must count for no loss.
    """
    extra = {"mlm_mask_prop": mask_prop} if mask_prop else None
    distiller, prepare, batches = _distiller(config_name, tmp_path, extra)
    distiller.student.eval()  # no dropout: the two forwards must agree
    for token_ids, lengths in batches[:3]:
        batch = prepare(token_ids, lengths)
        exact = distiller.loss_rows(batch.attention_mask, batch.lm_labels)
        if mask_prop == 0.95:
            assert len(batch.rows) > len(exact)
        with torch.no_grad():
            ours = distiller.compute_losses(*distiller._forward(batch.input_ids, batch.attention_mask, batch.rows,
                                                                batch.padded),
                                            batch.attention_mask, batch.lm_labels, batch.rows)
            ref = distiller.compute_losses(*distiller._forward(batch.input_ids, batch.attention_mask, exact),
                                           batch.attention_mask, batch.lm_labels, exact)
        assert set(ours) == set(ref)
        for name in ref:
            torch.testing.assert_close(ours[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)
