"""Unlabelled in-domain examples that train the distillation term alone (--unlabeled_file), mixed into the
labelled batches: the GLUE and NER scripts' lever for a student with few labels and a teacher that has more.

    add_unlabelled_arguments(parser)                       # --unlabeled_file, --unlabeled_ratio
    mixed = MixedSet(train_set, unlabelled_set)            # labelled rows first, then the unlabelled ones
    sampler = MixedBatchSampler(labelled_batches, mixed, per_batch=round(ratio * batch_size), seed, rank, world)

Every training batch is one labelled batch (the same one, in the same order, as a run without unlabelled
text) followed by `per_batch` unlabelled rows. An epoch is still one pass over the labelled set, so a run
with unlabelled text takes exactly the optimizer steps of the same run without it. The unlabelled rows come
from an endless stream: seeded permutations of the unlabelled set, one after the other; batch k of the run
(counted over epochs) reads the stream at a position that depends only on (seed, k, rank), so resuming
mid-epoch draws the same rows as the uninterrupted run without saving any state. Under DDP each rank reads
its own positions of the same stream.

Each row carries `labelled` (1 or 0). An unlabelled row's labels are placeholders that say which positions a
loss reads (a word's first sub-token for NER); the task loss reads labelled rows only, the distillation term
every row. The teacher's predictions on the unlabelled set are computed once, before training
(`teacher_predictions`), and read back per batch: the teacher is in eval mode, so they are what a forward in
the loop would give, and a row seen in several epochs costs one teacher forward.
"""
import os

import torch

from utils import UserError


def add_unlabelled_arguments(parser):
    add = parser.add_argument
    add("--unlabeled_file", default=None,
        help="Unlabelled in-domain text in the task's own format (labels absent, or present and never read): "
             "its examples train the distillation term alone, mixed into the labelled batches. Needs "
             "--teacher_name_or_path.")
    add("--unlabeled_ratio", default=1.0, type=float,
        help="Unlabelled examples per labelled example in each batch (each batch of --per_gpu_train_batch_size "
             "labelled examples carries round(ratio x batch size) unlabelled ones).")


def check_unlabelled_args(args):
    """The flag combinations a run with --unlabeled_file cannot start with, as UserErrors."""
    if args.unlabeled_file is None:
        return
    if not os.path.isfile(args.unlabeled_file):
        raise UserError(f"--unlabeled_file {args.unlabeled_file}: no such file")
    if not args.do_train:
        raise UserError("--unlabeled_file trains the distillation term: it needs --do_train")
    if not args.teacher_name_or_path:
        raise UserError("--unlabeled_file needs --teacher_name_or_path: unlabelled examples train the distillation "
                        "term alone, which only a teacher gives")
    if args.unlabeled_ratio <= 0 or unlabelled_per_batch(args) < 1:
        raise UserError(f"--unlabeled_ratio {args.unlabeled_ratio} gives no unlabelled example per batch of "
                        f"{args.per_gpu_train_batch_size}; it must be > 0 (at least 1 / batch size)")
    if args.alpha_ce <= 0:
        raise UserError(f"--unlabeled_file with --alpha_ce {args.alpha_ce}: unlabelled examples would train nothing")


def unlabelled_per_batch(args):
    return int(round(args.unlabeled_ratio * args.per_gpu_train_batch_size))


class MixedSet(torch.utils.data.Dataset):
    """The labelled rows (indices 0..n_labelled-1) then the unlabelled rows, each with `labelled` (1 / 0) and,
    for unlabelled rows, `unlabelled_row` (its index in the unlabelled set, for the teacher's cached outputs)."""

    def __init__(self, labelled, unlabelled):
        self.labelled, self.unlabelled = labelled, unlabelled
        self.n_labelled = len(labelled)
        self.lengths = list(labelled.lengths) + list(unlabelled.lengths)

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, index):
        index = int(index)
        if index < self.n_labelled:
            return {**self.labelled[index], "labelled": 1, "unlabelled_row": -1}
        row = index - self.n_labelled
        return {**self.unlabelled[row], "labelled": 0, "unlabelled_row": row}


class MixedBatchSampler:
    """A labelled batch sampler (training_batch_sampler's, skippable) whose batches each gain `per_batch`
    unlabelled rows of `mixed` (a MixedSet), drawn from a seeded stream that depends only on the batch's
    number in the run: resuming (skip) and DDP ranks need no state."""

    def __init__(self, labelled_batches, mixed, per_batch, seed, rank=0, world_size=1):
        self.labelled_batches = labelled_batches
        self.n_labelled, self.n_unlabelled = mixed.n_labelled, len(mixed.unlabelled)
        self.per_batch, self.seed, self.rank, self.world_size = per_batch, seed, rank, world_size
        self.epoch = 0
        self._permutations = {}

    @property
    def sampler(self):
        return self.labelled_batches.sampler

    @property
    def skip(self):
        return self.labelled_batches.skip

    @skip.setter
    def skip(self, value):
        self.labelled_batches.skip = value

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.labelled_batches.set_epoch(epoch)

    def __len__(self):
        return len(self.labelled_batches)

    def __iter__(self):
        first = self.labelled_batches.skip  # read before the labelled iterator consumes it
        for number, batch in enumerate(iter(self.labelled_batches), start=first):
            yield list(batch) + self.unlabelled_rows(self.epoch * len(self) + number)

    def _permutation(self, n_pass):
        if n_pass not in self._permutations:
            if len(self._permutations) > 2:  # the stream only moves forward: keep the last passes
                self._permutations.pop(min(self._permutations))
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + n_pass)
            self._permutations[n_pass] = torch.randperm(self.n_unlabelled, generator=generator).tolist()
        return self._permutations[n_pass]

    def unlabelled_rows(self, batch_number):
        """Indices into the MixedSet of the unlabelled rows that go with the run's batch `batch_number`."""
        start = (batch_number * self.world_size + self.rank) * self.per_batch
        rows = []
        for position in range(start, start + self.per_batch):
            n_pass, offset = divmod(position, self.n_unlabelled)
            rows.append(self.n_labelled + self._permutation(n_pass)[offset])
        return rows


def teacher_predictions(teacher, unlabelled, pad_token_id, batch_size, ctx, amp_dtype, per_position):
    """The teacher's logits on every unlabelled row, once (eval mode: what the loop's forward would give): a
    list of CPU tensors, (n_labels,) per row or (length, n_labels) per row for per-token tasks."""
    from tasks.evaluation import predict

    logits = predict(teacher, unlabelled, ["logits"], pad_token_id, batch_size, ctx, amp_dtype=amp_dtype,
                     per_position=per_position)["logits"]
    return [torch.as_tensor(row) for row in logits]


def mixed_teacher_logits(live, cached, rows, seq_len):
    """The batch's teacher logits: `live` (n_labelled, ...) for its labelled rows (the first ones), then the cached
    rows of its unlabelled ones (`rows`: their indices in the unlabelled set), per-token rows padded to seq_len."""
    parts = [cached[r] for r in rows]
    if live.dim() == 3:  # (bs, seq_len, n_labels): pad each cached row; padding is never read by the loss
        parts = [torch.nn.functional.pad(p, (0, 0, 0, seq_len - p.size(0))) for p in parts]
    unlabelled = torch.stack(parts).to(live.device, live.dtype)
    return torch.cat([live, unlabelled])

