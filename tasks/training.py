"""The fine-tuning loop the task scripts share: run_squad_, run_glue_ and run_ner_w_distillation.py.

    trainer = TaskTrainer(args, ctx, student, teacher, train_set, loss_fn, tokenizer)
    trainer.train(on_log=evaluate)      # returns the number of optimizer steps

A task script builds the models, the tokenised training set (anything indexable whose rows are dicts of
lists and scalars, with a `lengths` list) and a `loss_fn(student_out, teacher_out, batch) -> (loss, terms)`;
this module owns everything else: batches of similar lengths padded to their longest row, torch.amp
(bf16 / fp16), DDP under torchrun (gloo on the CPU), gradient accumulation, AdamW with linear warmup then
decay, logging (tqdm on the master, TensorBoard, metrics.jsonl), and checkpoints: every --save_steps a
`checkpoint-N/` folder that `from_pretrained` loads, with `training_state.pt` beside the weights so that
`--resume` continues exactly (optimizer, schedule, scaler, every rank's random generators, position in
the epoch). Between log steps the loop never reads a device value on the host: running losses are summed
on the device and read at log time.
"""
import argparse
import contextlib
import os
import random
import re
import shutil
import tempfile
from types import SimpleNamespace

import torch
from torch.utils.data import DataLoader

from distil.checkpointing import rng_state, save_atomic, set_rng_state
from distil.divergences import add_kd_loss_arguments, check_kd_loss_args
from grouped_batch_sampler import training_batch_sampler
from tasks.batches import forward_inputs, pad_collate
from tasks.models import load_student
from tasks.unlabelled import (MixedBatchSampler, MixedSet, mixed_teacher_logits, teacher_predictions,
                              unlabelled_per_batch)
from utils import (UserError, amp_dtype, append_jsonl, cleanup_distributed, fail, init_distributed, logger, set_seed,
                   write_json_atomic)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.pt"
MUST_MATCH_ON_RESUME = ("per_gpu_train_batch_size", "gradient_accumulation_steps", "seed", "world_size",
                        "num_train_epochs", "max_steps", "unlabeled_ratio", "unlabeled_rows")


def add_training_arguments(parser, max_seq_length, temperature=2.0):
    """The flags the task scripts share, with the original scripts' names and defaults. temperature: the
    distillation temperature's default (the original's 2.0 for SQuAD; 1.0 for GLUE and NER, where T = 2 and 4 lowered
    the student's held-out scores: docs/task-distillation.md)."""
    add = parser.add_argument
    add("--output_dir", required=True, help="Where the fine-tuned model, checkpoints, logs and predictions go.")
    add("--model_type", default="auto",
        help="Student type (bert, distilbert, roberta, ...; 'auto' reads it from the config). Checked against "
             "the config.")
    add("--model_name_or_path", required=True, help="Student: a model folder or hub name.")
    add("--teacher_type", default=None, help="Teacher type, checked against its config like --model_type.")
    add("--teacher_name_or_path", default=None,
        help="Teacher already fine-tuned on the task. Without it the student is simply fine-tuned.")
    add("--alpha_ce", default=0.5, type=float, help="Weight of the distillation term.")
    add("--temperature", default=temperature, type=float, help="Softmax temperature of the distillation term.")
    add_kd_loss_arguments(add)
    add("--config_name", default="", help="Student config, if not the one in --model_name_or_path.")
    add("--tokenizer_name", default="", help="Tokenizer, if not the one in --model_name_or_path.")
    add("--cache_dir", default="", help="Where downloaded models/data and preprocessed features are cached.")
    add("--max_seq_length", default=max_seq_length, type=int, help="Longest input after tokenisation.")
    add("--do_train", action="store_true")
    add("--do_eval", action="store_true")
    add("--evaluate_during_training", action="store_true", help="Evaluate at every logging step.")
    add("--do_lower_case", action="store_true",
        help="Accepted for compatibility: a fast tokenizer's saved normaliser decides lower-casing.")
    add("--per_gpu_train_batch_size", default=8, type=int, help="Batch size per process.")
    add("--per_gpu_eval_batch_size", default=8, type=int)
    add("--learning_rate", default=5e-5, type=float)
    add("--gradient_accumulation_steps", default=1, type=int)
    add("--weight_decay", default=0.0, type=float)
    add("--adam_epsilon", default=1e-8, type=float)
    add("--max_grad_norm", default=1.0, type=float)
    add("--num_train_epochs", default=3.0, type=float, help="May be fractional.")
    add("--max_steps", default=-1, type=int, help="If > 0: total optimizer steps (overrides --num_train_epochs).")
    add("--warmup_steps", default=0, type=int)
    add("--logging_steps", default=50, type=int)
    add("--save_steps", default=50, type=int, help="Checkpoint every N optimizer steps (0: only the final model).")
    add("--save_total_limit", default=0, type=int, help="Keep only the newest N checkpoints (0: keep all).")
    add("--eval_all_checkpoints", action="store_true", help="Evaluate every checkpoint-N folder too.")
    add("--no_cuda", action="store_true")
    add("--overwrite_output_dir", action="store_true")
    add("--overwrite_cache", action="store_true", help="Preprocess the data again instead of reading the cache.")
    add("--resume", action="store_true", help="Continue from the newest checkpoint in --output_dir.")
    add("--seed", default=42, type=int)
    add("--local_rank", default=-1, type=int, help="Set by the old torch.distributed.launch; torchrun uses env vars.")
    add("--fp16", action="store_true", help="float16 mixed precision (torch.amp + GradScaler; no apex).")
    add("--fp16_opt_level", default="O1", help="Accepted for compatibility and ignored.")
    add("--bf16", action="store_true", help="bfloat16 mixed precision (torch.amp).")
    add("--threads", default=1, type=int, help="Processes for preprocessing.")
    add("--max_train_samples", default=None, type=int,
        help="Train on a random subset of this many examples (drawn with --seed), e.g. to fit a CPU budget.")
    add("--max_eval_samples", default=None, type=int, help="Evaluate on the first N examples only.")
    add("--no_group_by_length", action="store_true",
        help="Plain shuffled batches instead of batches of similar lengths.")


def check_training_args(args):
    """Flag values a run cannot start with, as UserErrors naming the flag."""
    if not (args.do_train or args.do_eval):
        raise UserError("nothing to do: give --do_train and/or --do_eval")
    positive = ("per_gpu_train_batch_size", "per_gpu_eval_batch_size", "gradient_accumulation_steps",
                "max_seq_length", "logging_steps", "threads")
    for name in positive:
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.temperature <= 0:
        raise UserError(f"--temperature must be > 0, got {args.temperature}")
    kd_error = check_kd_loss_args(args.kd_loss, args.jsd_beta)
    if kd_error:
        raise UserError(kd_error)
    if args.learning_rate <= 0:
        raise UserError(f"--learning_rate must be > 0, got {args.learning_rate}")
    if args.do_train and args.num_train_epochs <= 0 and args.max_steps <= 0:
        raise UserError("--num_train_epochs must be > 0 (or give --max_steps)")
    if args.fp16 and args.bf16:
        raise UserError("--fp16 and --bf16 are exclusive")
    if args.max_train_samples is not None and args.max_train_samples < 1:
        raise UserError(f"--max_train_samples must be at least 1, got {args.max_train_samples}")
    if args.max_eval_samples is not None and args.max_eval_samples < 1:
        raise UserError(f"--max_eval_samples must be at least 1, got {args.max_eval_samples}")
    if args.do_train and args.teacher_name_or_path is None:
        logger.info("No --teacher_name_or_path: plain fine-tuning on the task loss (--alpha_* and --temperature "
                    "are not used).")


def subsample(examples, max_train_samples, seed):
    """A seeded random subset of max_train_samples examples, kept in their original order (None: all)."""
    if max_train_samples is None or max_train_samples >= len(examples):
        return examples
    keep = sorted(random.Random(seed).sample(range(len(examples)), max_train_samples))
    return [examples[i] for i in keep]


def list_checkpoints(folder):
    """checkpoint-N folders written by this loop, oldest first, as (step, path)."""
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        match = CHECKPOINT_RE.match(name)
        path = os.path.join(folder, name)
        if match and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def newest_checkpoint(output_dir):
    """Path of the newest complete checkpoint-N folder, or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def prepare_output_dir(args, inputs=()):
    """Refuse an existing, non-empty --output_dir unless --overwrite_output_dir or --resume; never let it be one
    of the run's inputs. `inputs`: paths the run reads (models, data files). Called before anything is written.
    """
    out = os.path.abspath(args.output_dir)
    # Evaluating alone only adds result files, so it may write into the evaluated model's own folder.
    for path in inputs if args.do_train else ():
        if path and os.path.exists(path):
            path = os.path.abspath(path)
            if out == path or path.startswith(out + os.sep):
                raise UserError(f"--output_dir {args.output_dir} holds an input of this run ({path}); choose "
                                f"another folder")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--output_dir {args.output_dir} exists and is not a directory")
    busy = os.path.isdir(out) and os.listdir(out)
    if args.do_train and busy and not (args.overwrite_output_dir or args.resume):
        raise UserError(f"--output_dir {args.output_dir} already exists and is not empty; pass "
                        f"--overwrite_output_dir to overwrite it, or --resume to continue its training")
    if args.resume and not newest_checkpoint(out):
        raise UserError(f"--resume: no checkpoint-N folder with {STATE_FILE} in {args.output_dir}")


def clear_old_checkpoints(output_dir):
    """--overwrite_output_dir: checkpoints of an earlier run would be mistaken for this one's by --resume."""
    for _, path in list_checkpoints(output_dir):
        shutil.rmtree(path)


class TokenizedSet(torch.utils.data.Dataset):
    """The rows of a tokenised `datasets.Dataset`, restricted to `columns`, with each row's length (for
    batches of similar lengths and for sorting the evaluation)."""

    def __init__(self, data, columns):
        self.columns = [c for c in columns if c in data.column_names]
        self.data = data.select_columns(self.columns)
        self.lengths = [len(ids) for ids in data["input_ids"]]

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, index):
        return self.data[int(index)]


class TaskTrainer:
    """Fine-tunes `student` on `train_set`, with `teacher` (eval mode, no gradients) if given.

    unlabelled: a TokenizedSet whose rows train the distillation term alone (tasks/unlabelled.py), mixed into
    every batch (--unlabeled_ratio); per_token: the task's logits are per token (NER), not per example.
    """

    def __init__(self, args, ctx, student, teacher, train_set, loss_fn, tokenizer, pad_token_id, unlabelled=None,
                 per_token=False):
        self.args, self.ctx = args, ctx
        self.device = ctx.device
        self.student, self.teacher, self.tokenizer = student, teacher, tokenizer
        self.loss_fn = loss_fn
        self.train_set = train_set
        self.unlabelled, self.per_token = unlabelled, per_token
        self.unlabelled_teacher = None  # the teacher's logits on the unlabelled rows, computed once
        self.global_step = 0  # optimizer steps done
        self.epoch = 0
        self.batches_done = 0  # batches of the current epoch already trained on (resume skips them)
        self._running = {}  # loss name -> device tensor summed since the last log
        self._running_batches = 0
        self._setup_data(pad_token_id)
        self._setup_precision()
        self._setup_optimizer()
        self._setup_ddp()
        if unlabelled is not None:
            self._cache_unlabelled_teacher(pad_token_id)
        self.tensorboard = None
        if ctx.is_master:
            from tensorboardX import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=os.path.join(args.output_dir, "log", "train"), flush_secs=60)

    # -- setup ------------------------------------------------------------------------------------------

    def _setup_data(self, pad_token_id):
        a = self.args
        self.batch_sampler = training_batch_sampler(
            self.train_set, batch_size=a.per_gpu_train_batch_size, group_by_size=not a.no_group_by_length,
            max_len=a.max_seq_length, world_size=self.ctx.world_size, rank=self.ctx.global_rank, seed=a.seed)
        dataset = self.train_set
        if self.unlabelled is not None:
            # The same labelled batches, in the same order, each followed by its unlabelled rows.
            dataset = MixedSet(self.train_set, self.unlabelled)
            self.batch_sampler = MixedBatchSampler(self.batch_sampler, dataset, unlabelled_per_batch(a), a.seed,
                                                   rank=self.ctx.global_rank, world_size=self.ctx.world_size)
        self.dataloader = DataLoader(dataset, batch_sampler=self.batch_sampler,
                                     collate_fn=lambda rows: pad_collate(rows, pad_token_id),
                                     pin_memory=self.device.type == "cuda",
                                     # Its own generator: starting an epoch's iterator would otherwise draw from the
                                     # global RNG, and a resumed run's dropout would drift from the original's.
                                     generator=torch.Generator().manual_seed(a.seed))
        steps_per_epoch = max(1, len(self.dataloader) // a.gradient_accumulation_steps)
        self.total_steps = a.max_steps if a.max_steps > 0 else max(1, int(steps_per_epoch * a.num_train_epochs))

    def _setup_precision(self):
        self.amp_dtype = amp_dtype(bf16=self.args.bf16, fp16=self.args.fp16)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.args.fp16)

    def _setup_optimizer(self):
        a = self.args
        # Biases and normalisation weights (1-D parameters) are not decayed; matching names such as
        # "LayerNorm.weight" misses DistilBERT's sa_layer_norm.
        decay = [p for p in self.student.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.student.parameters() if p.requires_grad and p.ndim < 2]
        groups = [{"params": decay, "weight_decay": a.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=a.learning_rate, eps=a.adam_epsilon,
                                           fused=self.device.type in ("cuda", "cpu"))
        from transformers import get_linear_schedule_with_warmup

        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, num_warmup_steps=a.warmup_steps,
                                                         num_training_steps=self.total_steps)

    def _setup_ddp(self):
        self.model = self.student
        if self.ctx.multi_gpu:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.student, device_ids=ids, output_device=ids[0] if ids else None)
        if self.teacher is not None:
            self.teacher.eval()

    def _cache_unlabelled_teacher(self, pad_token_id):
        import time

        start = time.perf_counter()
        self.unlabelled_teacher = teacher_predictions(
            self.teacher, self.unlabelled, pad_token_id, self.args.per_gpu_eval_batch_size, self.ctx, self.amp_dtype,
            per_position=self.per_token)
        logger.info("Unlabelled: %d examples from --unlabeled_file %s, %d in each batch of %d labelled; the "
                    "teacher's predictions on them computed once (%.1f s).", len(self.unlabelled),
                    self.args.unlabeled_file, unlabelled_per_batch(self.args), self.args.per_gpu_train_batch_size,
                    time.perf_counter() - start)

    # -- training ---------------------------------------------------------------------------------------

    def train(self, on_log=None):
        """Train until total_steps optimizer steps; on_log(global_step) is called at each logging step
        (evaluation during training), on every rank. Returns the number of optimizer steps done."""
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        a = self.args
        logger.info("Training: %d examples, %d batches per epoch per process, %d optimizer steps of %d batch(es) "
                    "each, %d process(es).", len(self.train_set), len(self.dataloader), self.total_steps,
                    a.gradient_accumulation_steps, self.ctx.world_size)
        self.student.train()
        accumulated = 0
        with logging_redirect_tqdm():  # log lines above the bar, not through it
            while self.global_step < self.total_steps:
                self.batch_sampler.set_epoch(self.epoch)
                self.batch_sampler.skip = self.batches_done  # > 0 only when resuming mid-epoch
                # The batches this epoch will run (the last epoch stops at total_steps). Updated by hand: a bar
                # wrapping the loader keeps a stale count when the loop breaks out of it.
                left = (self.total_steps - self.global_step) * a.gradient_accumulation_steps - accumulated
                bar = tqdm(desc=f"epoch {self.epoch}", disable=not self.ctx.is_master, mininterval=5, unit="batch",
                           initial=self.batches_done, total=min(len(self.dataloader), self.batches_done + left))
                for batch in self.dataloader:
                    accumulated += 1
                    boundary = accumulated == a.gradient_accumulation_steps
                    self.step(batch, sync_gradients=boundary)
                    self.batches_done += 1
                    bar.update(1)
                    if not boundary:
                        continue
                    accumulated = 0
                    self.optimize()
                    if self.global_step % a.logging_steps == 0 or self.global_step == self.total_steps:
                        self.log(bar)
                        if on_log is not None:
                            on_log(self.global_step)
                    if a.save_steps > 0 and self.global_step % a.save_steps == 0:
                        self.save_checkpoint()
                    if self.global_step >= self.total_steps:
                        break
                bar.close()
                if self.global_step < self.total_steps:
                    self.epoch += 1
                    self.batches_done = 0
        if self.tensorboard is not None:
            self.tensorboard.close()
        return self.global_step

    def step(self, batch, sync_gradients=True):
        """Forward, loss and backward of one batch; gradients accumulate until the next optimize()."""
        unlabelled_rows = batch.pop("unlabelled_row", None)
        # Labelled rows come first; counted on the host, before the batch moves, so the step does not wait.
        n_labelled = int(batch["labelled"].sum()) if "labelled" in batch else None
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            teacher_out = None
            if self.teacher is not None:
                with torch.no_grad():
                    if n_labelled is None:
                        teacher_out = self.teacher(**forward_inputs(self.teacher, batch))
                    else:  # live on the labelled rows, read back on the unlabelled ones
                        labelled = {k: v[:n_labelled] for k, v in batch.items()}
                        live = self.teacher(**forward_inputs(self.teacher, labelled)).logits
                        teacher_out = SimpleNamespace(logits=mixed_teacher_logits(
                            live, self.unlabelled_teacher, unlabelled_rows[n_labelled:].tolist(),
                            batch["input_ids"].size(1)))
            # DDP all-reduces gradients in backward; skip that until the last batch of an accumulation.
            sync = self.model.no_sync() if self.ctx.multi_gpu and not sync_gradients else contextlib.nullcontext()
            with sync:
                student_out = self.model(**forward_inputs(self.model, batch))
                loss, terms = self.loss_fn(student_out, teacher_out, batch)
                self.scaler.scale(loss / self.args.gradient_accumulation_steps).backward()
        for name, value in {"loss": loss, **terms}.items():
            value = value.detach().float()
            self._running[name] = self._running[name] + value if name in self._running else value
        self._running_batches += 1

    def optimize(self):
        """Clip, step, schedule: one optimizer step."""
        self.scaler.unscale_(self.optimizer)
        # A device tensor: read only when logging, so the step does not wait for the device.
        self._grad_norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.args.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1

    def log(self, bar=None):
        """Averages since the last log: to TensorBoard, metrics.jsonl and the progress bar (master only).
        The one place the loop reads device values."""
        n = max(self._running_batches, 1)
        record = {"step": self.global_step, "epoch": self.epoch, "split": "train",
                  "learning_rate": self.scheduler.get_last_lr()[0], "grad_norm": float(self._grad_norm)}
        record.update({name: float(total) / n for name, total in self._running.items()})
        self._running, self._running_batches = {}, 0
        if not self.ctx.is_master:
            return
        for name, value in record.items():
            if name not in ("step", "split", "epoch"):
                self.tensorboard.add_scalar(f"train/{name}", value, self.global_step)
        self.write_metrics(record)
        terms = ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in ("step", "epoch", "split", "loss",
                                                                              "learning_rate", "grad_norm"))
        logger.info("Step %d/%d: loss %.4f%s, lr %.3g", self.global_step, self.total_steps, record["loss"],
                    f" ({terms})" if terms else "", record["learning_rate"])
        if bar is not None:
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['learning_rate']:.2e}")

    def write_metrics(self, record):
        """Append one JSON line to output_dir/metrics.jsonl (master only): TensorBoard's machine-readable twin."""
        if self.ctx.is_master:
            append_jsonl(os.path.join(self.args.output_dir, "metrics.jsonl"), record)
            if self.tensorboard is not None and record.get("split") == "eval":
                for name, value in record.items():
                    if isinstance(value, (int, float)) and name != "step":
                        self.tensorboard.add_scalar(f"eval/{name}", value, record["step"])

    # -- checkpoints ------------------------------------------------------------------------------------

    def save_checkpoint(self):
        """output_dir/checkpoint-N: a from_pretrained folder plus training_state.pt. Collective (every rank
        hands over its random generators); the master writes into a temporary folder, then renames it."""
        rngs = [rng_state()]
        if self.ctx.multi_gpu:
            rngs = [None] * self.ctx.world_size
            torch.distributed.all_gather_object(rngs, rng_state())
        if not self.ctx.is_master:
            return
        final = os.path.join(self.args.output_dir, f"checkpoint-{self.global_step}")
        staging = tempfile.mkdtemp(prefix=".checkpoint-", dir=self.args.output_dir)
        try:
            self.save_model(staging)
            state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "scaler": self.scaler.state_dict(), "rng": rngs, "global_step": self.global_step,
                     "epoch": self.epoch, "batches_done": self.batches_done,
                     "run": {name: self._run_value(name) for name in MUST_MATCH_ON_RESUME}}
            save_atomic(state, os.path.join(staging, STATE_FILE))
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        logger.info("Saved checkpoint %s", final)
        if self.args.save_total_limit > 0:
            for _, old in list_checkpoints(self.args.output_dir)[:-self.args.save_total_limit]:
                shutil.rmtree(old)

    def _run_value(self, name):
        if name == "world_size":
            return self.ctx.world_size
        if name in ("unlabeled_ratio", "unlabeled_rows"):  # None for runs without unlabelled text
            if self.unlabelled is None:
                return None
            return len(self.unlabelled) if name == "unlabeled_rows" else self.args.unlabeled_ratio
        return getattr(self.args, name)

    def save_model(self, folder):
        """The student (unwrapped) and its tokenizer, loadable with from_pretrained(folder)."""
        os.makedirs(folder, exist_ok=True)
        self.student.save_pretrained(folder)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(folder)
        write_json_atomic(os.path.join(folder, "training_args.json"), vars(self.args))

    def load_checkpoint(self, folder):
        """Continue from checkpoint-N (the student's weights were already loaded from it by the script)."""
        path = os.path.join(folder, STATE_FILE)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated, corrupted: unusable either way
            raise UserError(f"{path}: cannot be read ({str(exc).splitlines()[0][:200]})") from None
        for name in MUST_MATCH_ON_RESUME:
            if state["run"].get(name) != self._run_value(name):
                raise UserError(f"--resume: {folder} was written with {name}={state['run'].get(name)!r}, this run "
                                f"has {self._run_value(name)!r}; resuming exactly needs the same value")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.global_step, self.epoch, self.batches_done = state["global_step"], state["epoch"], state["batches_done"]
        if len(state["rng"]) != self.ctx.world_size:
            raise UserError(f"--resume: {folder} was written by {len(state['rng'])} processes, this run has "
                            f"{self.ctx.world_size}")
        set_rng_state(state["rng"][self.ctx.global_rank])
        if self.batches_done >= len(self.dataloader):  # saved at the very end of an epoch
            self.epoch, self.batches_done = self.epoch + 1, 0
        logger.info("Resumed from %s: step %d, epoch %d, %d batches into it.", folder, self.global_step, self.epoch,
                    self.batches_done)


# ------------------------------------------------------------------------------------------ both scripts


def start_run(args, data_files):
    """The first steps both task scripts share, once the flags are checked: refuse an --output_dir that is in
    use, set up the processes and the seed, and with --resume point the student at the newest checkpoint.
    Returns (RunContext, that checkpoint folder or None)."""
    prepare_output_dir(args, inputs=[args.model_name_or_path, args.teacher_name_or_path, *data_files])
    ctx = init_distributed(n_gpu=0 if args.no_cuda or not torch.cuda.is_available() else 1, local_rank=args.local_rank)
    set_seed(args.seed)
    resume_from = newest_checkpoint(args.output_dir) if args.resume else None
    if resume_from:
        args.model_name_or_path = resume_from  # the student continues from its checkpointed weights
    return ctx, resume_from


def train_and_evaluate(args, ctx, student, teacher, train_set, loss_fn, tokenizer, evaluate, model_class,
                       resume_from=None, unlabelled=None, per_token=False, **config_overrides):
    """The second half both task scripts share, once every input is checked: with --do_train, fine-tune (and
    evaluate at each log with --evaluate_during_training) then save the student in --output_dir; with
    --do_eval, evaluate every checkpoint (--eval_all_checkpoints, reloaded as model_class with the student's
    config_overrides) and the final model.

    evaluate(model, out_folder, model_path) -> metrics or None (None on the ranks that do not write).
    """
    os.makedirs(args.output_dir, exist_ok=True)  # every input checked: from here on, the run writes
    if args.do_train:
        if ctx.is_master and args.overwrite_output_dir and not args.resume:
            clear_old_checkpoints(args.output_dir)
        trainer = TaskTrainer(args, ctx, student, teacher, train_set, loss_fn, tokenizer, tokenizer.pad_token_id,
                              unlabelled=unlabelled, per_token=per_token)
        if resume_from:
            trainer.load_checkpoint(resume_from)

        def on_log(step):
            if args.evaluate_during_training:  # the latest evaluation's outputs land in output_dir/eval
                metrics = evaluate(student, os.path.join(args.output_dir, "eval"), None)
                if metrics is not None:
                    trainer.write_metrics({"step": step, "split": "eval", **metrics})

        trainer.train(on_log=on_log)
        if ctx.is_master:
            trainer.save_model(args.output_dir)
            what = (f"student (distilled from {args.teacher_name_or_path})" if teacher is not None
                    else "model (no teacher)")
            logger.info("Saved the fine-tuned %s to %s", what, args.output_dir)
    if args.do_eval:
        if args.eval_all_checkpoints:
            for _, folder in list_checkpoints(args.output_dir):
                checkpoint_args = argparse.Namespace(**dict(vars(args), model_name_or_path=folder, config_name=""))
                model = load_student(checkpoint_args, model_class, **config_overrides)
                evaluate(model.to(ctx.device), folder, folder)
        evaluate(student, args.output_dir, args.output_dir if args.do_train else args.model_name_or_path)


def task_main(run, args):
    """The task scripts' entry point: run(args) -> RunContext; every rank leaves together; a UserError is one
    `error:` line and exit status 2; the process group is always torn down."""
    try:
        ctx = run(args)
        if ctx.multi_gpu:
            # A rank exiting right after the last collective (the evaluation's all_gather_object) can finalise
            # Python while a gloo worker thread still releases that collective's tensors, and the process then
            # aborts (see train.py).
            torch.distributed.barrier()
    except UserError as error:
        fail(str(error))
    finally:
        cleanup_distributed()
