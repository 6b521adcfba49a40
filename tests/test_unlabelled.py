"""Unlabelled text in the task scripts (--unlabeled_file, tasks/unlabelled.py): the mixed batches (the same
labelled batches, a fixed number of unlabelled rows each, a stream that covers the unlabelled set pass by pass,
resumable and split between ranks without state), the losses (the task loss never reads an unlabelled row's
label, the distillation term reads every row), the teacher's cached outputs, and the flag checks. The scripts run
end to end with unlabelled text in tests/test_ner.py (resume included) and tests/test_task_training.py (GLUE)."""
import argparse

import torch
import torch.nn.functional as F

from conftest import expect_error
from distil.losses import IGNORE_INDEX, classification_loss, soft_target_divergence, token_ce_loss
from grouped_batch_sampler import training_batch_sampler
from tasks.unlabelled import MixedBatchSampler, MixedSet, mixed_teacher_logits


class Rows:
    """A TokenizedSet stand-in: rows with an id, and lengths."""

    def __init__(self, n, start=0):
        self.lengths = [5 + (i * 7) % 11 for i in range(n)]
        self.ids = list(range(start, start + n))

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, index):
        return {"input_ids": [self.ids[index]] * self.lengths[index]}


def batches(sampler, epochs):
    out = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        out.append([list(b) for b in sampler])
    return out


def mixed(labelled, unlabelled, per_batch, seed=3, rank=0, world_size=1):
    plain = training_batch_sampler(labelled, batch_size=4, group_by_size=True, max_len=16, world_size=world_size,
                                   rank=rank, seed=seed)
    data = MixedSet(labelled, unlabelled)
    return MixedBatchSampler(plain, data, per_batch, seed, rank=rank, world_size=world_size), data


def test_mixed_batches_keep_the_labelled_batches_and_cover_the_unlabelled_set():
    labelled, unlabelled = Rows(18), Rows(25, start=100)
    plain = batches(training_batch_sampler(labelled, batch_size=4, group_by_size=True, max_len=16, world_size=1,
                                           rank=0, seed=3), 3)
    sampler, data = mixed(labelled, unlabelled, per_batch=6)
    got = batches(sampler, 3)
    assert len(sampler) == len(plain[0]) == 5
    for epoch_plain, epoch_mixed in zip(plain, got):
        for a, b in zip(epoch_plain, epoch_mixed):
            assert b[:len(a)] == a  # the labelled batch, unchanged and first
            assert len(b) - len(a) == 6 and all(i >= 18 for i in b[len(a):])
    # The unlabelled rows, batch after batch, are permutations of the unlabelled set, one after the other.
    stream = [i - 18 for epoch in got for b, a in zip(epoch, [x for x in plain[got.index(epoch)]]) for i in b[len(a):]]
    assert len(stream) == 3 * 5 * 6
    for start in range(0, 75, 25):
        assert sorted(stream[start:start + 25]) == list(range(25))
    assert stream[:25] != stream[25:50]  # each pass is shuffled anew
    row = data[20]
    assert row["labelled"] == 0 and row["unlabelled_row"] == 2 and row["input_ids"][0] == 102
    assert data[3]["labelled"] == 1 and data[3]["unlabelled_row"] == -1


def test_a_resumed_epoch_and_each_rank_draw_as_the_uninterrupted_run():
    labelled, unlabelled = Rows(18), Rows(25, start=100)
    sampler, _ = mixed(labelled, unlabelled, per_batch=6)
    full = batches(sampler, 2)
    resumed, _ = mixed(labelled, unlabelled, per_batch=6)  # a new process: no state carried over
    resumed.set_epoch(1)
    resumed.skip = 3
    assert [list(b) for b in resumed] == full[1][3:]
    # Two ranks: disjoint labelled shares (the DistributedSampler's) and disjoint unlabelled rows within a pass.
    ranks = [mixed(labelled, unlabelled, per_batch=3, rank=r, world_size=2)[0] for r in (0, 1)]
    first = [next(iter(r))[-3:] for r in ranks]
    assert not set(first[0]) & set(first[1])


def test_the_task_loss_reads_labelled_rows_only_and_the_kd_term_every_row():
    torch.manual_seed(0)
    # Per-token (NER): two rows of 5 positions, the second unlabelled; 3 labels.
    logits = torch.randn(2, 5, 3, requires_grad=True)
    labels = torch.tensor([[IGNORE_INDEX, 1, 2, IGNORE_INDEX, 0], [IGNORE_INDEX, 0, 0, 0, IGNORE_INDEX]])
    labelled = torch.tensor([1, 0])
    task = token_ce_loss(logits, labels, labelled)
    other = labels.clone()
    other[1, 1:4] = torch.tensor([2, 1, 2])  # other placeholders on the unlabelled row: the same loss
    assert token_ce_loss(logits, other, labelled) == task
    direct = F.cross_entropy(logits[0, [1, 2, 4]], torch.tensor([1, 2, 0]))
    assert torch.allclose(task, direct)
    grad, = torch.autograd.grad(task, logits)
    assert grad[1].abs().sum() == 0 and grad[0].abs().sum() > 0
    # Per example (GLUE): classification and regression, the mean over the labelled rows alone.
    logits = torch.randn(4, 2)
    labels, labelled = torch.tensor([1, 0, 0, 1]), torch.tensor([1, 1, 0, 0])
    assert torch.allclose(classification_loss(logits, labels, labelled), F.cross_entropy(logits[:2], labels[:2]))
    scores, targets = torch.randn(4, 1), torch.tensor([0.5, 2.0, -100.0, 3.0])
    assert torch.allclose(classification_loss(scores, targets, labelled), F.mse_loss(scores[:2, 0], targets[:2]))
    assert torch.allclose(classification_loss(scores, targets), F.mse_loss(scores[:, 0], targets))


def test_the_ner_loss_trains_unlabelled_rows_through_the_teacher_alone():
    import run_ner_w_distillation as script

    args = argparse.Namespace(temperature=2.0, kd_loss="forward_kl", jsd_beta=0.5, alpha_task=0.5, alpha_ce=0.5)
    loss_fn = script.make_loss_fn(args, None, None)
    torch.manual_seed(1)
    student = torch.randn(2, 4, 3, requires_grad=True)
    teacher = torch.randn(2, 4, 3)
    labels = torch.tensor([[IGNORE_INDEX, 2, 1, IGNORE_INDEX], [IGNORE_INDEX, 0, 0, IGNORE_INDEX]])
    batch = {"labels": labels, "labelled": torch.tensor([1, 0])}
    loss, terms = loss_fn(argparse.Namespace(logits=student), argparse.Namespace(logits=teacher), batch)
    # The KD term averages over every scored position of both rows; the task term over the labelled row's.
    kd = soft_target_divergence(student[:, 1:3].reshape(-1, 3), teacher[:, 1:3].reshape(-1, 3), 2.0)
    assert torch.allclose(terms["loss_ce"], kd)
    assert torch.allclose(terms["loss_task"], F.cross_entropy(student[0, 1:3], torch.tensor([2, 1])))
    grad, = torch.autograd.grad(terms["loss_task"], student, retain_graph=True)
    assert grad[1].abs().sum() == 0
    grad, = torch.autograd.grad(loss, student)
    assert grad[1, 1:3].abs().sum() > 0  # the unlabelled row learns, from the teacher


def test_cached_teacher_rows_are_padded_behind_the_live_ones():
    live = torch.randn(2, 6, 3)
    cached = [torch.randn(4, 3), torch.randn(6, 3), torch.randn(2, 3)]
    out = mixed_teacher_logits(live, cached, [2, 0], 6)
    assert out.shape == (4, 6, 3)
    assert torch.equal(out[:2], live) and torch.equal(out[2, :2], cached[2]) and torch.equal(out[3, :4], cached[0])
    out = mixed_teacher_logits(torch.randn(2, 3), [torch.randn(3), torch.randn(3)], [1], 9)
    assert out.shape == (3, 3)


def test_bad_unlabelled_flags_are_one_line_errors(tmp_path, capsys):
    import run_glue_w_distillation as glue
    import run_ner_w_distillation as ner

    text = tmp_path / "u.tsv"
    text.write_text("sentence\nsome text\n")
    base = ["--task_name", "sst2", "--train_file", text, "--validation_file", text, "--model_name_or_path",
            tmp_path / "m", "--output_dir", tmp_path / "out", "--do_train"]
    expect_error(capsys, glue.main, base + ["--unlabeled_file", text], "--unlabeled_file needs --teacher_name_or_path")
    expect_error(capsys, glue.main, base + ["--unlabeled_file", tmp_path / "none.tsv"],
                 f"--unlabeled_file {tmp_path / 'none.tsv'}: no such file")
    teacher = ["--teacher_name_or_path", tmp_path / "t", "--unlabeled_file", text]
    expect_error(capsys, glue.main, base + teacher + ["--unlabeled_ratio", "0.01"], "--unlabeled_ratio 0.01")
    expect_error(capsys, glue.main, base + teacher + ["--alpha_ce", "0"], "would train nothing")
    conll = tmp_path / "u.conll"
    conll.write_text("a\tO\n")
    expect_error(capsys, ner.main, ["--train_file", conll, "--model_name_or_path", tmp_path / "m", "--output_dir",
                                    tmp_path / "out", "--do_eval", "--validation_file", conll, "--unlabeled_file", conll],
                 "--unlabeled_file trains the distillation term: it needs --do_train")
    assert not (tmp_path / "out").exists()
