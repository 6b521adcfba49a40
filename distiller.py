"""The distillation loop: a student learns from a frozen teacher's soft predictions.

    distiller = Distiller(config, ctx, dataset, student, teacher, masking=masking)   # setup
    distiller.train()                                                               # epochs, then the final save

`train.py` builds everything a run needs (flags, models, data, the evaluation) and hands it over; this file
only runs the loop, in XLM's verbs: `step` (forward, losses, backward) -> `optimize` (accumulate, clip, step)
-> `iter` (counters, log, checkpoint) -> `end_epoch`. The loss maths is in distil/losses.py, the masking in
distil/masking.py, the model wrappers in distil/models.py,
the checkpoint format in distil/checkpointing.py. One process is just
a world of size 1: the same code runs under torchrun with DDP, or with the student and teacher sharded by
FSDP2 (config.fsdp: distil/distributed/sharding.py
decides how; the loop calls it where DDP and FSDP differ: setup, clipping,
saving, parameter statistics).
"""
import contextlib
import dataclasses
import os
import signal
import time

import psutil
import torch
from torch.utils.data import DataLoader

from distil import checkpointing
from distil.distributed.blocks import compile_blocks
from distil.divergences import DEFAULT_JSD_BETA, DEFAULT_KD_LOSS
from grouped_batch_sampler import training_batch_sampler
from distil.losses import IGNORE_INDEX, distillation_losses
from distil.masking import prepare_batch_clm, prepare_batch_mlm
from distil.models import ENCODER, RowLogitsLM, TeacherLM, hidden_projection
from distil.schedule import plan_steps, short_run_warnings
from distil.distributed.sharding import Fsdp
from distil.teacher_cache import WithIndices
from utils import amp_dtype, append_jsonl, logger, set_seed

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
LOSS_NAMES = ("ce", "mlm", "clm", "mse", "cos", "hidden")


@dataclasses.dataclass(frozen=True)
class DistillationConfig:
    """Everything the loop reads, with train.py's defaults (its flags of the same names fill it in)."""
    dump_path: str
    mlm: bool  # MLM (masked tokens) or CLM (next token) as the LM loss and the batch preparation
    student_type: str = "distilbert"  # checked on resume; "encoder": bare encoders, unmasked bidirectional batches
    temperature: float = 2.0
    alpha_ce: float = 0.5
    alpha_mlm: float = 0.0
    alpha_clm: float = 0.5
    alpha_mse: float = 0.0
    alpha_cos: float = 0.0
    alpha_hidden: float = 0.0
    hidden_layer_map: tuple = None  # ((student block, teacher block), ...) for alpha_hidden, 0-based
    hidden_loss: str = "cos"  # "cos" or "mse", see losses.hidden_layer_loss
    restrict_ce_to_mask: bool = False
    kd_loss: str = DEFAULT_KD_LOSS  # the divergence of the ce term (distil/divergences.py)
    jsd_beta: float = DEFAULT_JSD_BETA
    n_epoch: int = 3
    max_steps: int = None  # stop after this many optimizer steps, whatever n_epoch says (None: n_epoch epochs)
    batch_size: int = 5
    group_by_size: bool = True
    max_model_input_size: int = 512  # bucket boundaries of group_by_size
    gradient_accumulation_steps: int = 50
    warmup_prop: float = 0.05
    weight_decay: float = 0.0
    learning_rate: float = 5e-4
    adam_epsilon: float = 1e-6
    max_grad_norm: float = 5.0
    fp16: bool = False
    bf16: bool = False
    compile: bool = False
    num_workers: int = 0
    seed: int = 56
    log_interval: int = 500
    checkpoint_interval: int = 4000
    save_total_limit: int = 3
    save_pth: bool = False  # the original's weights-only checkpoint.pth / model_epoch_N.pth (extra copies)
    max_bad_steps: int = 20
    eval_interval: int = 0
    fsdp: bool = False  # shard student (and teacher) with FSDP2 (distil/distributed), not DDP; needs world size > 1
    teacher_replicated: bool = False  # with fsdp: keep the whole teacher on every rank
    lmbda: float = 0.0  # share of on-policy batches (distil/rollouts.py); checked on resume

    @classmethod
    def from_args(cls, args, **resolved):
        """From train.py's parsed flags (same names); `resolved` gives the fields no flag sets."""
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.name not in resolved}
        return cls(**values, **resolved)

    @property
    def alpha(self):
        return {name: getattr(self, f"alpha_{name}") for name in LOSS_NAMES}


def _plain(value):
    """A counter as a Python number (the running epoch loss is a device tensor)."""
    return float(value) if torch.is_tensor(value) else value


class TrainingError(Exception):
    """The run cannot go on (e.g. too many consecutive non-finite steps); a checkpoint was written first."""


class Distiller:
    """Runs the distillation: build the data pipeline and optimizer, then `train()`.

    config: a DistillationConfig; ctx: the utils.RunContext of this process; dataset: an LmSeqsDataset;
    student, teacher: models already on ctx.device (teacher None: plain MLM/CLM training); masking: a
    masking.MlmMasking (MLM only); tokenizer: saved with the final student; evaluator: called as
    evaluator(student, teacher=teacher) -> {metric: value} every config.eval_interval iterations and after
    each epoch (collective: every rank calls it); teacher_cache: a teacher_cache.TeacherCache that replaces the
    teacher (None then) and, for MLM, the masking; on_policy: a rollouts.OnPolicy (train.py --lmbda) that picks the
    batches the student answers itself, scored by the live teacher.
    """

    fuse_head = True  # False: the logits path for every head (tests compare the two; not a user option)

    def __init__(self, config, ctx, dataset, student, teacher, masking=None, tokenizer=None, evaluator=None,
                 teacher_cache=None, on_policy=None):
        self.config = config
        self.ctx = ctx
        self.dump_path = config.dump_path
        self.is_master = ctx.is_master
        self.multi_gpu = ctx.multi_gpu
        self.device = ctx.device
        self.student = student
        self.teacher = teacher
        self.tokenizer = tokenizer
        self.dataset = dataset
        self.evaluator = evaluator
        self.mlm = config.mlm
        self.masking = masking
        self.temperature = config.temperature
        self.alpha = config.alpha
        self.teacher_cache = teacher_cache
        self.on_policy = on_policy  # a rollouts.OnPolicy: which batches the student answers itself (--lmbda)
        # Bare encoders (no LM head) learn on hidden states alone, from unmasked text: see prepare_batch_plain.
        self.bare = config.student_type == ENCODER
        if self.mlm and masking is None and not self.bare and teacher_cache is None:
            raise ValueError("an MLM run needs its masking (masking.MlmMasking)")

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
        self.total_loss_epoch = 0.0  # sum of the epoch's finite iteration losses (a device tensor once training)
        self.n_finite_iter_epoch = 0  # how many they are: a skipped, non-finite iteration is left out
        self.last_log = time.time()
        self._running = {}  # loss name -> (sum tensor, count) since the last log, kept on the device
        self._pending_outcomes = []  # (iteration, host copy of "skipped", event) not yet read by the host
        self._host_group = None  # process group for host-side agreement (stop signals)

        self._setup_data()
        self._setup_precision()
        self._setup_models()
        self._setup_compile()
        self._setup_fsdp()  # before the optimizer: sharding replaces the parameters
        self._setup_optimizer()
        self._setup_ddp()
        if self.is_master:
            from tensorboardX import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=os.path.join(self.dump_path, "log", "train"), flush_secs=60)
            self.tensorboard.add_text(tag="config/training", text_string=str(dataclasses.asdict(config)),
                                      global_step=0)

    # -- setup ------------------------------------------------------------------------------------------

    def _setup_data(self):
        c = self.config
        self.batch_sampler = training_batch_sampler(self.dataset, batch_size=c.batch_size,
                                                    group_by_size=c.group_by_size, max_len=c.max_model_input_size,
                                                    world_size=self.ctx.world_size, rank=self.ctx.global_rank,
                                                    seed=c.seed)
        # Its own generator, so creating the epoch's iterator does not draw from the global RNG (which would
        # make a resumed run diverge from an uninterrupted one).
        # With a teacher cache the batches also carry their items' indices (the cache is keyed by them).
        dataset = WithIndices(self.dataset) if self.teacher_cache is not None else self.dataset
        collate = dataset.collate if self.teacher_cache is not None else self.dataset.batch_sequences
        self.dataloader = DataLoader(dataset, batch_sampler=self.batch_sampler,
                                     collate_fn=collate, num_workers=c.num_workers,
                                     pin_memory=self.device.type == "cuda", persistent_workers=c.num_workers > 0,
                                     generator=torch.Generator().manual_seed(c.seed))
    def _setup_precision(self):
        p = self.config
        self.amp_dtype = amp_dtype(bf16=p.bf16, fp16=p.fp16)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=p.fp16)
        if self.amp_dtype is None and self.device.type == "cuda":
            # A float32 run on a GPU: TF32 matmuls (10-bit mantissa inputs, fp32 accumulation), the usual speed/
            # precision trade for training; without it fp32 matmuls run at a fraction of the tensor cores' rate.
            torch.set_float32_matmul_precision("high")

    def _setup_optimizer(self):
        p = self.config
        self.plan = plan_steps(len(self.dataloader), p.n_epoch, p.gradient_accumulation_steps, p.warmup_prop,
                               p.max_steps)
        self.num_steps_total = self.plan.total
        if self.is_master:
            for warning in short_run_warnings(self.plan, len(self.dataloader), p.gradient_accumulation_steps,
                                              p.warmup_prop):
                logger.warning("SHORT RUN: %s.", warning)
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
            self.optimizer, num_warmup_steps=self.plan.warmup, num_training_steps=self.num_steps_total)

    def _setup_models(self):
        self.hidden_projection = None
        s_dim = self.student.config.hidden_size
        t_dim = self.teacher.config.hidden_size if self.teacher is not None else s_dim
        hidden_losses = self.alpha["cos"] > 0 or self.alpha["hidden"] > 0
        if hidden_losses and s_dim != t_dim:  # train.py refuses this without --hidden_projection
            self.hidden_projection = hidden_projection(s_dim, t_dim, seed=self.config.seed).to(self.device)
            logger.info("Hidden-state losses through a learned %d -> %d projection (not part of the exported "
                        "student).", s_dim, t_dim)
        pairs = (self.config.hidden_layer_map or ()) if self.alpha["hidden"] > 0 else ()
        # The one decision of the fused head: where a model's head is a plain Linear (models.fusable_head), the
        # training loss gets its hidden rows and the head, and projects them chunk by chunk (losses.HeadRows):
        # no (rows x vocabulary) logits, teacher's or gradient, is ever whole. Not under --fsdp: the head's
        # weight is a shard, gathered only inside the sharded module's own forward, so the loss cannot read it.
        fuse = self.fuse_head and not self.config.fsdp
        self.student_lm = RowLogitsLM(self.student, self.hidden_projection, blocks=[s for s, _ in pairs],
                                      bare=self.bare, fuse_head=fuse)
        self.teacher_lm = (TeacherLM(self.teacher, blocks=[t for _, t in pairs], bare=self.bare, fuse_head=fuse)
                           if self.teacher is not None else None)

    def _setup_compile(self):
        """--compile: each transformer block of the student and the teacher (blocks.compile_blocks); the
        embeddings, the mask construction and the head at the loss rows stay eager. Under DDP and FSDP alike."""
        if not self.config.compile:
            return
        n_blocks = compile_blocks(self.student)
        if self.teacher is not None:
            compile_blocks(self.teacher)
        logger.info("torch.compile: %d student blocks (and the teacher's) compile during the first batches.",
                    n_blocks)

    def _setup_fsdp(self):
        """Under config.fsdp, shard the student (the RowLogitsLM wrapper is the root) and the teacher."""
        self.sharding = None
        if not self.config.fsdp:
            return
        if not torch.distributed.is_initialized():  # train.py runs a single process unsharded
            raise ValueError("fsdp needs an initialised process group (torchrun)")
        if self.config.fp16:
            raise ValueError("fsdp runs in float32 or bfloat16 (not float16)")
        self.sharding = Fsdp(self.ctx, bf16=self.config.bf16, shard_teacher=not self.config.teacher_replicated)
        self.student_lm = self.sharding.shard_student(self.student_lm)
        if self.teacher_lm is not None:
            self.teacher_lm = self.sharding.shard_teacher(self.teacher_lm)

    def _setup_ddp(self):
        self.model = self.student_lm
        if self.sharding is not None:
            # No DDP: FSDP reduce-scatters the gradients itself. Stop signals are agreed as under DDP (below).
            backend = torch.distributed.get_backend()
            self._host_group = None if backend == "gloo" else torch.distributed.new_group(backend="gloo")
        elif self.ctx.distributed:  # several processes, or one under torchrun (a one-rank group)
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

    # -- batches ----------------------------------------------------------------------------------------

    def prepare_batch_mlm(self, token_ids, lengths):
        """A DataLoader batch -> a masking.Batch on the device, MLM-corrupted (see masking.prepare_batch_mlm)."""
        return prepare_batch_mlm(token_ids, lengths, self.device, self.masking)

    def prepare_batch_clm(self, token_ids, lengths, loss_mask=None):
        """A DataLoader batch -> a masking.Batch on the device for next-token prediction (with a corpus's loss
        mask: the losses read only the positions predicting a masked token)."""
        return prepare_batch_clm(token_ids, lengths, self.device, loss_mask)

    def prepare_batch_plain(self, token_ids, lengths):
        """A DataLoader batch -> a masking.Batch on the device, the text as it is (bare encoders).

        Not masked: with no MLM loss, corrupting the input would only teach the student the teacher's view
        of [MASK]-riddled text, which no downstream use (tasks, sentence embeddings) ever shows it. The
        batch is the CLM one (ids unchanged, attention mask, non-padding rows); _forward gives the encoders
        the attention mask."""
        return prepare_batch_clm(token_ids, lengths, self.device)

    def prepare_batch(self, token_ids, lengths, loss_mask=None):
        """The batch preparation of this run: plain (bare encoders), MLM or CLM; loss_mask (bs, seq) only from a
        corpus that carries one (conversations: train.py allows it for CLM alone)."""
        if loss_mask is not None:
            return self.prepare_batch_clm(token_ids, lengths, loss_mask)
        if self.bare:
            return self.prepare_batch_plain(token_ids, lengths)
        if self.mlm:
            return self.prepare_batch_mlm(token_ids, lengths)
        return self.prepare_batch_clm(token_ids, lengths)

    # -- training ---------------------------------------------------------------------------------------

    def train(self):
        """The whole run: n_epoch passes over the data (from where a resumed run left off), then the final save.

        Returns early, with self.interrupted set, when SIGTERM/SIGINT/SIGUSR1 reached any rank: all ranks stop
        at the same optimizer-step boundary and the master writes a resumable checkpoint first.
        """
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        acc = self.config.gradient_accumulation_steps
        logger.info("Starting training: %d epoch(s), %d batches per epoch per process, %d optimizer steps of "
                    "%d batch(es) each (the progress bar counts batches).", self.plan.n_epochs, len(self.dataloader),
                    self.num_steps_total, acc)
        self.student.train()
        if self.teacher is not None:
            self.teacher.eval()
        previous_handlers = self._install_signal_handlers()
        try:
            # Log lines (the loss every --log_interval) go above the bar instead of cutting it in two.
            with logging_redirect_tqdm():
                while self.epoch < self.plan.n_epochs and not self.reached_max_steps():
                    logger.info("--- Starting epoch %d/%d", self.epoch, self.plan.n_epochs - 1)
                    self.batch_sampler.set_epoch(self.epoch)
                    self.batch_sampler.skip = self.n_iter  # > 0 only when resuming mid-epoch
                    # Updated by hand: a bar that wraps the loader shows a stale count when the loop breaks.
                    bar = tqdm(desc=f"-Iter epoch {self.epoch}", disable=not self.is_master, mininterval=5,
                               initial=self.n_iter, total=self.epoch_batches(), unit="batch")
                    if self._run_epoch(bar):
                        return
                    bar.close()
                    self.end_epoch()
        finally:
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
        logger.info("Training is finished; saving the final student.")
        self.save_final()
        if self.is_master:
            self.tensorboard.close()

    def _run_epoch(self, bar):
        """The batches of one epoch, up to its end or --max_steps; True when a signal stopped the run."""
        for token_ids, lengths, *extra in self.dataloader:  # extra: the indices (teacher cache) or the loss mask
            if self.on_policy is not None and self.on_policy.chooses(self.epoch, self.n_iter):
                # the loss mask is last in extra; the student answers the prompts, the live teacher grades
                batch = self.on_policy.batch(self.student, token_ids, lengths, extra[-1], self.epoch, self.n_iter,
                                             self.device)
                self.step(*batch, alpha=self.on_policy.alpha(self.alpha))
            elif self.teacher_cache is not None:
                batch, cached = self.teacher_cache.prepare_batch(token_ids, lengths, extra[0], self.epoch,
                                                                 self.device, *extra[1:])
                self.step(*batch, teacher_rows=cached)
            else:
                self.step(*self.prepare_batch(token_ids, lengths, *extra))
            self.n_sequences_epoch += token_ids.size(0)
            bar.update(1)
            self.iter(bar)
            if self._at_boundary and self.after_optimizer_step():
                bar.close()
                self.interrupted = True
                return True
            if self._at_boundary and self.reached_max_steps():
                logger.info("--max_steps %d reached at iteration %d.", self.config.max_steps, self.n_total_iter)
                break
        return False

    def epoch_batches(self):
        """How many batches this epoch will run: all of them, or up to the group that makes the max_steps-th
        optimizer step (groups start at the epoch's first batch, so a resumed n_iter is a group boundary)."""
        n = len(self.dataloader)
        if self.config.max_steps:
            left = max(0, self.config.max_steps - self.scheduler.last_epoch)
            n = min(n, self.n_iter + left * self.config.gradient_accumulation_steps)
        return n

    def reached_max_steps(self):
        """Whether config.max_steps optimizer steps (skipped ones included, as the schedule counts them) are done."""
        return bool(self.config.max_steps) and self.scheduler.last_epoch >= self.config.max_steps

    def loss_rows(self, attn_mask, lm_labels):
        """Flat positions whose logits some loss reads, found on the device (one synchronisation).

        Only for a batch given without them: prepare_batch_mlm/clm compute them without a synchronisation.
        """
        if self.config.restrict_ce_to_mask and self.mlm:
            return (lm_labels != IGNORE_INDEX).flatten().nonzero().squeeze(-1)
        return attn_mask.flatten().nonzero().squeeze(-1)

    def _forward(self, token_ids, attn_mask, rows, padded=True, teacher_rows=None):
        """Student and teacher (logits at rows, last hidden states) under autocast, the logits as losses.HeadRows
        for a fused head (_setup_models); with teacher_rows (a cached teacher's divergences.TopKTeacher) those
        stand for the teacher's logits, and it has no hidden states.

        CLM needs no attention mask: padding is on the right, so causal attention never sees it. Neither does
        a batch without padding (known on the host), which also lets SDPA pick its fastest kernel.
        """
        mask = attn_mask if ((self.mlm or self.bare) and padded) else None
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            s_out = self.model(token_ids, mask, rows)
            t_out = (teacher_rows, None) if teacher_rows is not None else None
            if self.teacher_lm is not None and teacher_rows is None:  # a mixed run's cached batch: no forward
                with torch.no_grad():
                    t_out = self.teacher_lm(token_ids, mask, rows)
        return s_out, t_out

    def compute_losses(self, s_out, t_out, attn_mask, lm_labels, rows, alpha=None):
        """{name: scalar tensor} for every loss with a positive weight (losses.distillation_losses), from the
        (row logits, last hidden states) of student and teacher. alpha: this batch's weights (default the run's)."""
        (s_logits, s_hidden, *s_layers), (t_logits, t_hidden, *t_layers) = s_out, (t_out or (None, None))
        return distillation_losses(s_logits, t_logits, s_hidden, t_hidden, attn_mask, lm_labels, rows,
                                   alpha=alpha or self.alpha, temperature=self.temperature, mlm=self.mlm,
                                   restrict_ce_to_mask=self.config.restrict_ce_to_mask,
                                   kd_loss=self.config.kd_loss, jsd_beta=self.config.jsd_beta,
                                   s_layers=s_layers[0] if s_layers else None,
                                   t_layers=t_layers[0] if t_layers else None, hidden_loss=self.config.hidden_loss)

    def step(self, input_ids, attention_mask, lm_labels, rows=None, padded=True, loss_positions=None,
             teacher_rows=None, alpha=None):
        """One forward/backward on a batch; the optimizer steps every gradient_accumulation_steps batches.

        rows and padded come with a Batch from prepare_batch_mlm/clm; without rows they are found here.
        loss_positions (bs, seq) bool, from a loss-masked corpus: the positions the hidden-state terms (cosine,
        hidden) average over instead of every real one; rows then hold only those positions, so the logit terms
        read them alone too.
        teacher_rows: the cached teacher at those rows (TeacherCache.prepare_batch), instead of a teacher forward.
        alpha: the loss weights of this batch (an on-policy batch has no LM term), default the run's.
        """
        alpha = alpha or self.alpha
        if rows is None:
            rows = self.loss_rows(attention_mask, lm_labels)
        acc = self.config.gradient_accumulation_steps
        # The last batch of an epoch always closes an accumulation group, so an epoch ends on a real step.
        self._at_boundary = (self.n_iter + 1) % acc == 0 or self.n_iter + 1 == len(self.dataloader)
        # DDP decides at forward time whether the backward all-reduces: no_sync must hold the forward too, or
        # every micro-batch is all-reduced. Under FSDP the gradients are reduce-scattered after every batch and
        # accumulate as shards: skipping that (as no_sync does) would keep a full unsharded gradient per rank.
        ddp = self.ctx.distributed and self.sharding is None  # self.model is the DDP module
        with self.model.no_sync() if (ddp and not self._at_boundary) else contextlib.nullcontext():
            s_out, t_out = self._forward(input_ids, attention_mask, rows, padded, teacher_rows)
            read = attention_mask if loss_positions is None else loss_positions
            losses = self.compute_losses(s_out, t_out, read, lm_labels, rows, alpha)
            del s_out, t_out  # the logits (or head rows) are not needed by backward: free them before it runs
            # "logits" already holds alpha_ce * ce + alpha_mse * mse + alpha_lm * lm (and their gradient)
            loss = losses.pop("logits", 0.0) + alpha["cos"] * losses.get("cos", 0.0)
            if "hidden" in losses:
                loss = loss + alpha["hidden"] * losses["hidden"]
            losses["total"] = loss.detach()
            for name, value in losses.items():
                total, count = self._running.get(name, (0.0, 0))
                self._running[name] = (total + value.detach().float(), count + 1)
            finite = torch.isfinite(losses["total"])  # on the device, read at epoch end
            self.total_loss_epoch = self.total_loss_epoch + torch.where(finite, losses["total"].float(), 0.0)
            self.n_finite_iter_epoch = self.n_finite_iter_epoch + finite.to(torch.int64)
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
        acc = self.config.gradient_accumulation_steps
        # The epoch's last group may hold fewer than acc batches: the step averages over those it really holds.
        group_size = min(acc, len(self.dataloader) - self.n_iter // acc * acc)
        self.scaler.scale(loss / group_size).backward()
        if not self._at_boundary:  # set by step(), which holds DDP's no_sync around forward and backward
            return
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.student_lm.parameters() if p.grad is not None]
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm > 0 else float("inf")
        if self.sharding is not None:
            grad_norm = self.sharding.clip_grad_norm_(params, max_norm)  # the global norm of the shards
        else:
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
        if self.n_total_iter % self.config.log_interval == 0:
            self.log_tensorboard(bar)
            self.last_log = time.time()
        if self.n_total_iter % self.config.checkpoint_interval == 0:
            self._checkpoint_due = True  # written at the next optimizer-step boundary
        eval_interval = self.config.eval_interval
        if eval_interval and self.n_total_iter % eval_interval == 0:
            self.evaluate()

    def evaluate(self):
        """Held-out metrics from the evaluator train.py gave (evaluation.evaluate). Collective: every rank
        evaluates its shard and gets the global numbers."""
        if self.evaluator is None:
            return None
        if self.sharding is not None:  # sharded models run through their FSDP roots (RowLogitsLM without rows)
            metrics = self.evaluator(self.student_lm, teacher=self.teacher_lm)
        else:
            metrics = self.evaluator(self.student, teacher=self.teacher)
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
        if self.n_consecutive_bad_steps + len(self._pending_outcomes) >= self.config.max_bad_steps:
            self._settle_outcomes()  # waits for this step, but only when the limit may be reached now
        if self.n_consecutive_bad_steps >= self.config.max_bad_steps:
            self.save_training_state()
            raise TrainingError(f"{self.n_consecutive_bad_steps} consecutive steps with a non-finite loss or "
                                f"gradient (iteration {self.n_total_iter}); the last good state is in "
                                f"{checkpointing.checkpoint_path(self.dump_path, self.n_total_iter)}")
        if self._agree_to_stop():
            self.save_training_state()
            if self.is_master:
                logger.warning("Stopped by %s at iteration %d. Checkpoint: %s. Resume with the same command plus "
                               "--resume.", self.stop_signal or "a signal on another rank", self.n_total_iter,
                               checkpointing.checkpoint_path(self.dump_path, self.n_total_iter))
            return True
        if self._checkpoint_due:
            self._checkpoint_due = False
            if self.config.save_pth:  # the original's weights-only copy; the resumable checkpoint holds them too
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
        if bar is not None:
            bar.set_postfix({"loss": f"{averages.get('total', float('nan')):.4f}"})
        stats = None
        if self.sharding is not None:  # collective: each rank holds a shard of every parameter
            stats = self.sharding.parameter_statistics((n, p) for n, p in self.student.named_parameters()
                                                       if p.requires_grad)
        rollouts = self.on_policy.log_fields() if self.on_policy is not None else {}
        if not self.is_master:
            return
        step = self.n_total_iter
        # The same speed and memory figures as TensorBoard's global/* scalars, under the same meaning.
        usage = {"speed": (time.time() - self.last_log) / self.config.log_interval,  # seconds per iteration
                 "rss_mb": psutil.Process().memory_info().rss / 1e6}
        if self.device.type == "cuda":
            usage["memory_usage"] = torch.cuda.max_memory_allocated(self.device) / 1e6
        terms = ", ".join(f"{k} {v:.4f}" for k, v in averages.items() if k != "total")
        logger.info("Optimizer step %d/%d (batch %d): loss %.4f (%s), lr %.3g", self.n_optimizer_steps,
                    self.num_steps_total, step, averages.get("total", float("nan")), terms,
                    self.scheduler.get_last_lr()[0])
        self.write_metrics({"split": "train", "step": step, "optimizer_step": self.n_optimizer_steps,
                            "epoch": self.epoch, "lr": self.scheduler.get_last_lr()[0],
                            "skipped_steps": self.n_skipped_steps,
                            **{f"loss_{k}" if k != "total" else "loss": v for k, v in averages.items()}, **usage,
                            **rollouts})
        tb = self.tensorboard
        for name, value in averages.items():
            tb.add_scalar(tag=f"losses/loss_{name}" if name != "total" else "losses/loss", scalar_value=value,
                          global_step=step)
        tb.add_scalar("learning_rate/lr", self.scheduler.get_last_lr()[0], step)
        tb.add_scalar("global/skipped_steps", self.n_skipped_steps, step)
        for name, value in {**usage, **rollouts}.items():
            tb.add_scalar(f"global/{name}", value, step)
        if getattr(self, "_last_grad_norm", None) is not None:
            tb.add_scalar("global/grad_norm", float(self._last_grad_norm), step)
        if stats is not None:
            for name, (mean, std) in stats.items():
                tb.add_scalar(f"parameter_mean/{name}", mean, step)
                tb.add_scalar(f"parameter_std/{name}", std, step)
            return
        for name, param in self.student.named_parameters():
            if param.requires_grad:
                tb.add_scalar(f"parameter_mean/{name}", param.data.float().mean().item(), step)
                tb.add_scalar(f"parameter_std/{name}", param.data.float().std().item() if param.numel() > 1 else 0.0,
                              step)

    def end_epoch(self):
        """Epoch checkpoint (master), the epoch's mean loss, counters reset."""
        logger.info("%d sequences trained on this process in epoch %d.", self.n_sequences_epoch, self.epoch)
        self.evaluate()
        epoch_loss = self.epoch_mean_loss()
        if self.config.save_pth:  # the original's per-epoch weights; the resumable checkpoint below holds them too
            self.save_checkpoint(checkpoint_name=f"model_epoch_{self.epoch}.pth")
        if self.is_master and self.n_iter:
            logger.info("Epoch %d: mean loss %.6g over %d iterations.", self.epoch, epoch_loss, self.n_iter)
            self.tensorboard.add_scalar("epoch/loss", epoch_loss, self.epoch)
            self.write_metrics({"split": "train_epoch", "epoch": self.epoch, "step": self.n_total_iter,
                                "loss": epoch_loss})
        self.epoch += 1
        self.n_sequences_epoch = 0
        self.n_iter = 0
        self.total_loss_epoch = 0.0
        self.n_finite_iter_epoch = 0
        self.save_training_state()

    def epoch_mean_loss(self):
        """The mean of the epoch's iteration losses, over every rank's iterations, non-finite ones (skipped
        steps) left out (collective, on the host group: once an epoch, so reading the device sums is fine)."""
        sums = torch.tensor([float(self.total_loss_epoch), float(self.n_finite_iter_epoch)], dtype=torch.float64)
        if self.multi_gpu:
            torch.distributed.all_reduce(sums, group=self._host_group)
        return float(sums[0] / sums[1]) if sums[1] else float("nan")

    def write_metrics(self, record):
        """One JSON line per log in dump_path/metrics.jsonl: the machine-readable twin of TensorBoard."""
        append_jsonl(os.path.join(self.dump_path, "metrics.jsonl"), record)

    # -- saving -----------------------------------------------------------------------------------------

    def student_state_dict(self):
        """The student's full weights on the master (None on the other ranks). Under FSDP: collective, the
        shards gathered one tensor at a time to the master's CPU (sharding.Fsdp.gather_state_dict)."""
        if self.sharding is not None:
            state = self.sharding.gather_state_dict(self.student_lm, prefix="model.")
            return state if self.is_master else None
        return self.student.state_dict() if self.is_master else None

    def save_checkpoint(self, checkpoint_name="checkpoint.pth"):
        """Student weights (a plain state dict), written atomically by the master. Every rank calls it (under
        FSDP they all take part in gathering the weights)."""
        state = self.student_state_dict()
        if not self.is_master:
            return
        path = os.path.join(self.dump_path, checkpoint_name)
        tmp = f"{path}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, path)

    def _trainer_state(self, rngs):
        """Everything but the weights and the optimizer's per-parameter state."""
        return {
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rngs,
            "counters": {name: _plain(getattr(self, name)) for name in checkpointing.RESUMABLE_COUNTERS},
            "run": self._run_identity(),
        }

    def save_training_state(self):
        """Everything needed to continue exactly: weights, optimizer, schedule, scaler, counters, every rank's RNG.

        Collective (every rank contributes its RNG state); only the master writes, atomically, then rotates.
        Under FSDP every rank writes its own shards into a checkpoint folder (checkpointing.save_sharded).
        """
        self._settle_outcomes()
        rngs = [checkpointing.rng_state()]
        if self.multi_gpu:
            rngs = [None] * self.ctx.world_size
            torch.distributed.all_gather_object(rngs, checkpointing.rng_state())
        if self.sharding is not None:
            state = dict(self._trainer_state(rngs), hidden_projection=self.hidden_projection is not None)
            checkpointing.save_sharded(checkpointing.checkpoint_path(self.dump_path, self.n_total_iter, sharded=True),
                                       self.student_lm, self.optimizer, state, self.is_master)
            if self.is_master:
                checkpointing.rotate_checkpoints(self.dump_path, self.config.save_total_limit)
            return
        if not self.is_master:
            return
        state = {
            "format": checkpointing.FORMAT,
            "student": self.student.state_dict(),
            "hidden_projection": self.hidden_projection.state_dict() if self.hidden_projection is not None else None,
            "optimizer": self.optimizer.state_dict(),
            **self._trainer_state(rngs),
        }
        checkpointing.save_atomic(state, checkpointing.checkpoint_path(self.dump_path, self.n_total_iter))
        checkpointing.rotate_checkpoints(self.dump_path, self.config.save_total_limit)

    def _run_identity(self):
        """The settings a resumed run must share with the checkpoint (checkpointing.MUST_MATCH_ON_RESUME)."""
        values = dict(dataclasses.asdict(self.config), world_size=self.ctx.world_size)
        return {name: values[name] for name in checkpointing.MUST_MATCH_ON_RESUME}

    def load_training_state(self, state, path):
        """Continue from a checkpoint written by save_training_state (see train.py --resume).

        A sharded checkpoint (--fsdp) written at the end of an epoch may be resumed on another number of ranks:
        DCP reshards the weights and optimizer state, the next epoch's data is dealt to the new ranks, the
        learning-rate schedule goes on from the steps taken over the new run's total, and the random
        generators are seeded afresh. In the middle of an epoch the position in the data only has a meaning
        on the same number of ranks.
        """
        sharded = state.get("format") == checkpointing.SHARDED_FORMAT
        if sharded != (self.sharding is not None):
            raise ValueError(f"{path}: written {'with' if sharded else 'without'} fsdp, this run is "
                             f"{'not ' if self.sharding is None else ''}sharded")
        rng = None
        if sharded:
            rng = self._load_sharded_state(state, path)
        else:
            checkpointing.check_same_run(state, self._run_identity(), path)
            self.student.load_state_dict(state["student"])
            if (state.get("hidden_projection") is None) != (self.hidden_projection is None):
                raise ValueError(f"{path}: the checkpoint and this run disagree on the hidden projection")
            if self.hidden_projection is not None:
                self.hidden_projection.load_state_dict(state["hidden_projection"])
            self.optimizer.load_state_dict(state["optimizer"])
            rng = state["rng"][self.ctx.global_rank]
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        for name, value in state["counters"].items():
            setattr(self, name, value)
        if "n_finite_iter_epoch" not in state["counters"]:  # written before that counter existed
            self.n_finite_iter_epoch = self.n_iter
        if rng is not None:
            checkpointing.set_rng_state(rng)
        else:  # another number of ranks: no generator state to continue, a fresh seed per rank and epoch
            set_seed(self.config.seed + self.ctx.global_rank + 1000 * self.epoch)
        logger.info("Resumed from %s: epoch %d, %d batches into it, iteration %d.", path, self.epoch, self.n_iter,
                    self.n_total_iter)

    def _load_sharded_state(self, state, path):
        """Checks and the shards of a sharded checkpoint; returns this rank's RNG state, or None when the
        checkpoint was written by another number of ranks."""
        run = self._run_identity()
        saved_world = state["run"].get("world_size")
        resharding = saved_world != run["world_size"]
        if resharding and state["counters"]["n_iter"] != 0:
            raise ValueError(f"{path}: written mid-epoch by {saved_world} ranks, this run has {run['world_size']}; a "
                             "sharded checkpoint can change its number of ranks only at the end of an epoch")
        checkpointing.check_same_run(state, dict(run, world_size=saved_world) if resharding else run, path)
        if state["hidden_projection"] != (self.hidden_projection is not None):
            raise ValueError(f"{path}: the checkpoint and this run disagree on the hidden projection")
        checkpointing.load_sharded(path, self.student_lm, self.optimizer)
        if resharding:
            logger.warning("Resuming on %d ranks a checkpoint written by %d at the end of epoch %d: weights and "
                           "optimizer resharded, random generators seeded afresh.", run["world_size"], saved_world,
                           state["counters"]["epoch"] - 1)
            return None
        return state["rng"][self.ctx.global_rank]

    def save_final(self):
        """A folder that `from_pretrained(dump_path)` loads: config, weights, and the teacher's tokenizer.

        Every rank calls it; the master writes. Under FSDP the weights are gathered to the master's CPU first
        (no rank holds a second full copy on its device) and written from there, as safetensors."""
        state = self.student_state_dict() if self.sharding is not None else None
        if not self.is_master:
            return
        if state is None:
            self.student.save_pretrained(self.dump_path)
        else:
            # save_pretrained drops the duplicate key of tied weights from the dict it is given: pass a copy
            self.student.save_pretrained(self.dump_path, state_dict=dict(state))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(self.dump_path)
