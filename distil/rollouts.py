"""On-policy batches (GKD, MiniLLM): the student writes the answer, the teacher grades every token of it.

A batch of a loss-masked corpus (conversations, scripts/binarized_chat.py) chosen as on-policy is replaced by the
student's own answers to its prompts. A conversation's prompt is its tokens before the first masked one: the turns
before the first assistant turn and that turn's header (later turns of a multi-turn conversation are dropped). The
current student answers them all in one batch (distil/generation.py: eval mode, no gradient, KV cache, sampled at
--rollout_temperature / --rollout_top_p, stopped at the template's end-of-turn or --max_new_tokens), and the batch
to train on is prompt + answer with the loss mask on the answer's tokens, through its end-of-turn token and nothing
after. Teacher and student then score it as any masked batch (Distiller.step); only the teacher-graded terms apply:
there is no gold token for the LM term to read.

Which batches are on-policy and what each rollout draws depend only on (seed, epoch, batch index in the epoch,
rank), not on a generator that runs through the whole run: a resumed run makes the choices and draws an
uninterrupted one made, and the checkpoint's counters (and the student weights it restores, which write the
rollouts) are all the state there is. Neither stream touches a global generator (dropout's): a run whose draws pick
no batch trains exactly as one without on-policy batches; with λ = 0 nothing is drawn at all.
"""
import time

import numpy as np
import torch

from distil.conversations import ConversationError, check_chat_template, end_of_turn_ids
from distil.generation import completion_batch, generate, seeded_generator
from distil.masking import prepare_batch_clm
from utils import UserError

# SeedSequence keys of the two streams, so that the on/off choice and the rollout draws are independent
_CHOICE, _ROLLOUT = 0, 1


def add_on_policy_arguments(add):
    """train.py's on-policy flags (`add` is parser.add_argument)."""
    add("--lmbda", type=float, default=0.0,
        help="Share of on-policy batches, in [0, 1] (TRL GKD's lmbda): each batch is, with this probability (a seeded "
             "draw per batch), replaced by the student's own answers to its prompts, which the teacher scores live "
             "with --kd_loss on the answer tokens only. Needs a corpus with a loss mask (scripts/binarized_chat.py).")
    add("--max_new_tokens", type=int, default=128,
        help="With --lmbda: longest on-policy answer in tokens (an answer also stops at the template's end-of-turn "
             "token, and where the run's --max_seq_length would be passed).")
    add("--rollout_temperature", type=float, default=1.0,
        help="With --lmbda: sampling temperature of the student's answers (0: greedy; not --temperature, the KD "
             "softmax's).")
    add("--rollout_top_p", type=float, default=1.0,
        help="With --lmbda: nucleus sampling of the student's answers, in (0, 1] (1: the whole distribution).")


def check_on_policy_args(args):
    """Flag checks (sanity_checks): one-line UserErrors naming the flag."""
    if not 0.0 <= args.lmbda <= 1.0:
        raise UserError(f"--lmbda {args.lmbda}: must be in [0, 1] (the share of on-policy batches)")
    if args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens {args.max_new_tokens}: must be at least 1")
    if args.rollout_temperature < 0:
        raise UserError(f"--rollout_temperature {args.rollout_temperature}: must be >= 0 (0: greedy)")
    if not 0.0 < args.rollout_top_p <= 1.0:
        raise UserError(f"--rollout_top_p {args.rollout_top_p}: must be in (0, 1]")
    if args.lmbda == 0:
        return
    if args.mlm:
        raise UserError("--lmbda > 0 (on-policy batches) needs a causal student that generates: not with --mlm")
    if args.fsdp:
        raise UserError("--lmbda > 0 (on-policy batches) is not supported with --fsdp yet: run it under DDP "
                        "(torchrun without --fsdp), or set --lmbda 0")
    if args.alpha_ce <= 0:
        raise UserError("--lmbda > 0 needs --alpha_ce > 0: on-policy batches train on the teacher's --kd_loss alone")
    if args.teacher_name is None:
        raise UserError("--lmbda > 0 needs --teacher_name: on-policy answers are scored by the live teacher (a "
                        "--teacher_cache serves the off-policy batches only)")


def check_on_policy_corpus(args, corpus):
    """A corpus to take prompts from: it must say where each answer starts (its loss mask)."""
    if args.lmbda > 0 and corpus.loss_mask is None:
        raise UserError(f"--lmbda {args.lmbda}: --data_file {corpus.path} has no loss mask, so nothing says where "
                        "a prompt ends; binarize conversations with scripts/binarized_chat.py")


def prompts_of(token_ids, lengths, loss_mask):
    """Each row's prompt (a list of ids): its tokens before the first one the loss mask marks."""
    prompts = []
    for row, length in enumerate(lengths.tolist()):
        marked = np.flatnonzero(loss_mask[row, :length].numpy())
        if len(marked) == 0:
            raise ValueError(f"an on-policy batch holds a sequence (row {row}) without a masked token: where its "
                             "answer starts is unknown")
        prompts.append(token_ids[row, : int(marked[0])].tolist())
    return prompts


class OnPolicy:
    """Chooses the on-policy batches and builds them. One per process: `rank` keys its draws, so each rank
    answers its own prompts with draws of its own."""

    def __init__(self, lmbda, *, seed, rank, stop_ids, pad_id, max_len, max_new_tokens=128, temperature=1.0,
                 top_p=1.0, amp_dtype=None):
        self.lmbda = float(lmbda)
        self.seed, self.rank = int(seed), int(rank)
        self.stop_ids, self.pad_id, self.max_len = list(stop_ids), int(pad_id), int(max_len)
        self.max_new_tokens, self.temperature, self.top_p = int(max_new_tokens), float(temperature), float(top_p)
        self.amp_dtype = amp_dtype
        self._reset_stats()

    def _reset_stats(self, since=None):
        self.since = since  # the wall clock's start: the first choice (not the setup before training)
        self.seconds, self.n_batches, self.n_tokens, self.n_answers, self.n_cut = 0.0, 0, 0, 0, 0

    def chooses(self, epoch, index):
        """Whether batch `index` of `epoch` (on this rank) is on-policy: a draw of its own, below lmbda."""
        if self.since is None:
            self.since = time.perf_counter()
        draw = np.random.default_rng([self.seed, _CHOICE, int(epoch), int(index), self.rank]).random()
        return bool(draw < self.lmbda)

    @staticmethod
    def alpha(alpha):
        """The loss weights of an on-policy batch: the run's, without the LM term (no gold token to predict)."""
        return dict(alpha, clm=0.0, mlm=0.0)

    def rollouts(self, student, token_ids, lengths, loss_mask, epoch, index):
        """(ids, lengths, loss_mask) on the CPU: the batch's prompts followed by the student's answers, the mask on
        the answers (through their end-of-turn token). student: the plain model (not a DDP wrapper)."""
        prompts = prompts_of(token_ids, lengths, loss_mask)
        # prompt + answer must fit the models: a sequence of the corpus fits, and its prompt is shorter than it
        room = min(self.max_new_tokens, self.max_len - max(len(p) for p in prompts))
        device = next(student.parameters()).device
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            out = generate(student, prompts, stop_ids=self.stop_ids, pad_id=self.pad_id, max_new_tokens=room,
                           temperature=self.temperature, top_p=self.top_p, device=device,
                           generator=seeded_generator(self.seed, _ROLLOUT, epoch, index, self.rank))
        self.seconds += time.perf_counter() - start
        self.n_batches += 1
        self.n_answers += len(prompts)
        self.n_tokens += sum(len(c) for c in out.completions)
        self.n_cut += sum(not f for f in out.finished)
        return completion_batch(prompts, out.completions, self.pad_id)

    def batch(self, student, token_ids, lengths, loss_mask, epoch, index, device):
        """The on-policy masking.Batch that replaces a DataLoader batch, on the device."""
        ids, new_lengths, mask = self.rollouts(student, token_ids, lengths, loss_mask, epoch, index)
        return prepare_batch_clm(ids, new_lengths, device, mask)

    def log_fields(self):
        """metrics.jsonl fields since the last call: generation seconds and their share of the wall time, how many
        batches were on-policy, the mean answer length, the answers cut at --max_new_tokens."""
        now = time.perf_counter()
        wall = max(now - (self.since or now), 1e-9)
        fields = {"rollout_seconds": self.seconds, "rollout_share": self.seconds / wall,
                  "on_policy_batches": self.n_batches,
                  "rollout_mean_tokens": self.n_tokens / self.n_answers if self.n_answers else 0.0,
                  "rollout_cut": self.n_cut}
        self._reset_stats(since=now)
        return fields


def build_on_policy(args, tokenizer, pad_id, max_len, rank, amp_dtype=None):
    """train.py's OnPolicy from its flags, or None with --lmbda 0 (no on-policy batch is ever drawn)."""
    if args.lmbda == 0:
        return None
    try:
        check_chat_template(tokenizer, "--lmbda: tokenizer", tokenizer.name_or_path)
        stop_ids = end_of_turn_ids(tokenizer)
    except ConversationError as exc:
        raise UserError(f"{exc} (on-policy answers stop at the template's end-of-turn token)") from None
    return OnPolicy(args.lmbda, seed=args.seed, rank=rank, stop_ids=stop_ids, pad_id=pad_id, max_len=max_len,
                    max_new_tokens=args.max_new_tokens, temperature=args.rollout_temperature,
                    top_p=args.rollout_top_p, amp_dtype=amp_dtype)
