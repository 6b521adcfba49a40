"""Distil a teacher (BERT, RoBERTa, GPT-2) into a smaller student.

Single process (GPU if there is one, else CPU):
    python train.py --student_type distilbert --student_config training_configs/distilbert-base-uncased.json \
        --teacher_type bert --teacher_name bert-base-uncased \
        --alpha_ce 5.0 --alpha_mlm 2.0 --alpha_cos 1.0 --alpha_clm 0.0 --mlm --freeze_pos_embs \
        --dump_path serialization_dir/my_first_training \
        --data_file data/binarized_text.bert-base-uncased.bin \
        --token_counts data/token_counts.bert-base-uncased.pickle --force

Several processes (one per GPU; gloo on a CPU-only machine):
    torchrun --nproc_per_node=4 train.py --n_gpu 4 <same flags>
Student and teacher sharded with FSDP2 instead of replicated with DDP (models that do not fit one GPU):
    torchrun --nproc_per_node=8 train.py --n_gpu 8 --fsdp --bf16 [--teacher_replicated] [--gradient_checkpointing] <same flags>

Flow: parse -> sanity_checks (flags alone) -> load and check everything (tokenizer, data, counts, student,
teacher) -> only then prepare the dump folder -> Distiller(...).train().
"""
import argparse
import functools
import os
import shutil
import sys

import numpy as np
import torch

from distil.checkpointing import find_resumable_checkpoint, is_sharded, load_checkpoint_file
from distiller import DistillationConfig, Distiller, TrainingError
from distil.divergences import add_kd_loss_arguments, check_kd_loss_args
from distil.rollouts import add_on_policy_arguments, build_on_policy, check_on_policy_args, check_on_policy_corpus
from distil.evaluation import evaluate
from grouped_batch_sampler import training_batch_sampler
from lm_seqs_dataset import MIN_SEQ_LEN, BinarizedCorpus, LmSeqsDataset, load_token_counts
from distil.masking import MlmMasking, smoothed_token_probs
from distil.models import AUTO, ENCODER, build_student, framing_token_ids, load_teacher, load_tokenizer, max_input_size
from distil.distributed.sharding import use_fsdp
from distil.schedule import plan_steps
from distil.teacher_cache import TeacherCache
from utils import (UserError, amp_dtype, cleanup_distributed, fail, git_info, init_distributed, logger, refuse_gguf,
                   set_seed, special_token_ids, user_input, write_json_atomic)
from distil.vocabularies import check_teacher_vocabulary, teacher_tokenizer_to_compare


# ------------------------------------------------------------------------------------------------ flags


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Training")
    parser.add_argument("--force", action="store_true", help="Overwrite dump_path if it already exists.")
    parser.add_argument("--dump_path", type=str, required=True, help="The output directory (log, checkpoints, parameters, etc.)")
    parser.add_argument("--data_file", type=str, required=True,
                        help="The binarized file (tokenized + tokens_to_ids) grouped by sequence.")
    parser.add_argument("--student_type", type=str, choices=["distilbert", "roberta", "gpt2", "bert", AUTO, ENCODER],
                        required=True, help="The student type (DistilBERT, RoBERTa, GPT-2; BERT for a teacher-free "
                                            "BERT; auto: any masked (--mlm) or causal LM config; encoder: any "
                                            "model AutoModel builds, without an LM head, trained on hidden-state "
                                            "losses alone from unmasked text, with --teacher_type encoder).")
    parser.add_argument("--student_config", type=str, required=True, help="Path to the student configuration.")
    parser.add_argument("--student_pretrained_weights", default=None, type=str,
                        help="Load student initialization checkpoint: a state-dict file or a model folder.")
    parser.add_argument("--teacher_type", choices=["bert", "roberta", "gpt2", AUTO, ENCODER], default=None,
                        help="Teacher type (BERT, RoBERTa, GPT-2, or auto: any model AutoModelForMaskedLM (with "
                             "--mlm) or AutoModelForCausalLM loads; encoder: any model AutoModel loads, e.g. a "
                             "sentence-embedding encoder without an LM head). Required unless training without a "
                             "teacher.")
    parser.add_argument("--teacher_name", type=str, default=None,
                        help="The teacher model: a hub name or a local folder. Required unless training without "
                             "a teacher (--alpha_ce, --alpha_mse and --alpha_cos all 0).")
    parser.add_argument("--tokenizer_name", type=str, default=None,
                        help="Tokenizer folder or hub name (default: the teacher's, or the --teacher_cache's). "
                             "Needed without a teacher.")
    parser.add_argument("--assume_same_token_ids", action="store_true",
                        help="Only read with --tokenizer_name and a --teacher_name folder that holds no tokenizer: "
                             "take --tokenizer_name's token -> id table to be the teacher's, unchecked (the two "
                             "tables are compared whenever the teacher has a tokenizer; a table that differs makes "
                             "the teacher read the data as other tokens). Without it such a run is refused.")
    parser.add_argument("--teacher_cache", type=str, default=None,
                        help="A folder written by scripts/cache_teacher.py: train on the teacher's cached top-k "
                             "predictions (and, for MLM, its fixed masking) instead of loading the teacher. Not "
                             "with --alpha_mse, --alpha_cos or --alpha_hidden (it holds no logits or hidden "
                             "states).")

    parser.add_argument("--temperature", default=2.0, type=float, help="Temperature for the softmax temperature.")
    parser.add_argument("--alpha_ce", default=0.5, type=float, help="Linear weight for the distillation loss. Must be >=0.")
    parser.add_argument("--alpha_mlm", default=0.0, type=float,
                        help="Linear weight for the MLM loss. Must be >=0. Should be used in conjunction with `mlm` flag.")
    parser.add_argument("--alpha_clm", default=0.5, type=float, help="Linear weight for the CLM loss. Must be >=0.")
    parser.add_argument("--alpha_mse", default=0.0, type=float, help="Linear weight of the MSE loss. Must be >=0.")
    parser.add_argument("--alpha_cos", default=0.0, type=float,
                        help="Linear weight of the cosine embedding loss. Must be >=0.")
    add_kd_loss_arguments(parser.add_argument)
    add_on_policy_arguments(parser.add_argument)
    parser.add_argument("--alpha_hidden", default=0.0, type=float,
                        help="Linear weight of the intermediate-layer loss: student block outputs against the "
                             "teacher block outputs --hidden_layer_map names (mean over the pairs). Must be >=0.")
    parser.add_argument("--hidden_layer_map", type=str, default=None,
                        help="Student block -> teacher block pairs for --alpha_hidden, 0-based, comma-separated: "
                             "e.g. 0:0,1:3,2:5 for a student extracted from teacher layers 0,3,5.")
    parser.add_argument("--hidden_loss", choices=["cos", "mse"], default="cos",
                        help="Distance of the intermediate-layer loss: 1 - cosine, or the squared error averaged "
                             "over the hidden dimension (TinyBERT's).")

    parser.add_argument("--mlm", action="store_true",
                        help="The LM step: MLM or CLM. If `mlm` is True, the MLM is used over CLM.")
    parser.add_argument("--mlm_mask_prop", default=0.15, type=float,
                        help="Proportion of tokens for which we need to make a prediction.")
    parser.add_argument("--word_mask", default=0.8, type=float, help="Proportion of tokens to mask out.")
    parser.add_argument("--word_keep", default=0.1, type=float, help="Proportion of tokens to keep.")
    parser.add_argument("--word_rand", default=0.1, type=float, help="Proportion of tokens to randomly replace.")
    parser.add_argument("--mlm_smoothing", default=0.7, type=float,
                        help="Smoothing parameter to emphasize more rare tokens (see XLM, similar to word2vec).")
    parser.add_argument("--token_counts", type=str, help="The token counts in the data_file for MLM.")

    parser.add_argument("--restrict_ce_to_mask", action="store_true",
                        help="If true, compute the distillation loss only the [MLM] prediction distribution.")
    parser.add_argument("--hidden_projection", action="store_true",
                        help="Cosine loss between a student and a teacher of different hidden sizes, through a "
                             "learned linear projection (trained and checkpointed, not exported with the student).")
    parser.add_argument("--freeze_pos_embs", action="store_true",
                        help="Freeze the student's positional embeddings during distillation (RoBERTa, GPT-2, and a "
                             "DistilBERT with learned positions; sinusoidal ones are always frozen).")
    parser.add_argument("--freeze_token_type_embds", action="store_true",
                        help="Freeze token type embeddings during distillation if existent. For student_type in ['roberta'] only.")

    parser.add_argument("--n_epoch", type=int, default=3, help="Number of pass on the whole dataset.")
    parser.add_argument("--max_steps", type=int, default=None,
                        help="Stop after this many optimizer steps (the learning-rate schedule spans them); overrides "
                             "--n_epoch: as many passes over the data as needed, the last one cut short.")
    parser.add_argument("--max_seq_length", type=int, default=None,
                        help="Cut sequences (training and --eval_data_file) into chunks of at most this many tokens "
                             "(default: the longest the teacher, student and tokenizer accept). The student's "
                             "config is left as it is.")
    parser.add_argument("--batch_size", type=int, default=5, help="Batch size (for each process).")
    parser.add_argument("--group_by_size", action="store_false",
                        help="Grouping sequences of similar length into batches is ON by default; passing this "
                             "flag turns it OFF (the original's meaning, kept for compatibility).")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=50,
                        help="Gradient accumulation for larger training batches.")
    parser.add_argument("--warmup_prop", default=0.05, type=float, help="Linear warmup proportion.")
    parser.add_argument("--weight_decay", default=0.0, type=float, help="Weight decay if we apply some.")
    parser.add_argument("--learning_rate", default=5e-4, type=float, help="The initial learning rate for Adam.")
    parser.add_argument("--adam_epsilon", default=1e-6, type=float, help="Epsilon for Adam optimizer.")
    parser.add_argument("--max_grad_norm", default=5.0, type=float, help="Max gradient norm (<= 0: no clipping).")
    parser.add_argument("--initializer_range", default=0.02, type=float,
                        help="Random initialization range (std) of a student trained from scratch.")

    parser.add_argument("--fp16", action="store_true", help="Mixed precision in float16 (torch.amp + GradScaler).")
    parser.add_argument("--fp16_opt_level", type=str, default="O1",
                        help="Accepted for compatibility with apex command lines; ignored (torch.amp is used).")
    parser.add_argument("--bf16", action="store_true", help="Mixed precision in bfloat16 (torch.amp, no scaler).")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each transformer block of the student and the teacher (with DDP or "
                             "--fsdp); the first batches compile, with dynamic shapes (lengths vary).")
    parser.add_argument("--fsdp", action="store_true",
                        help="Shard the student (weights, gradients, optimizer state) and the teacher across the "
                             "processes with FSDP2 instead of a full copy on each (DDP). Needs torchrun with 2 or "
                             "more processes; with --bf16, bf16 weights and compute, fp32 gradient reduction.")
    parser.add_argument("--teacher_replicated", action="store_true",
                        help="With --fsdp: keep the whole teacher on every process (no all-gathers for its "
                             "forward) when it fits; the student stays sharded.")
    parser.add_argument("--gradient_checkpointing", action="store_true",
                        help="Recompute the student's blocks in backward instead of keeping their activations.")
    parser.add_argument("--n_gpu", type=int, default=1, help="Number of GPUs in the node (0: CPU).")
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=-1,
                        help="Set by torch.distributed.launch; torchrun sets LOCAL_RANK instead.")
    parser.add_argument("--seed", type=int, default=56, help="Random seed")
    parser.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes per rank.")

    parser.add_argument("--eval_data_file", type=str, default=None,
                        help="A binarized held-out file: evaluated every --eval_interval iterations and after each "
                             "epoch (MLM pseudo-perplexity on a fixed masking, or CLM perplexity; KL and top-1 "
                             "agreement with the teacher).")
    parser.add_argument("--eval_interval", type=int, default=0,
                        help="Evaluate every N iterations (0: only after each epoch).")
    parser.add_argument("--eval_batch_size", type=int, default=32, help="Batch size of the evaluation (per process).")
    parser.add_argument("--eval_max_batches", type=int, default=None,
                        help="Evaluate on at most this many batches of the held-out file (default: all of it).")
    parser.add_argument("--log_interval", type=int, default=500,
                        help="Every this many batches: the mean losses on the terminal, TensorBoard and metrics.jsonl.")
    parser.add_argument("--checkpoint_interval", type=int, default=4000, help="Checkpoint interval.")
    parser.add_argument("--save_pth", action="store_true",
                        help="Also write the original's weights-only files: model_epoch_N.pth after each epoch and "
                             "checkpoint.pth every --checkpoint_interval (off by default: checkpoints/ and the final "
                             "model.safetensors hold the same weights).")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                        help="Continue a run: the latest valid checkpoint in --dump_path, or the one given.")
    parser.add_argument("--save_total_limit", type=int, default=3,
                        help="Resumable checkpoints kept in dump_path/checkpoints (older ones are deleted).")
    parser.add_argument("--max_bad_steps", type=int, default=20,
                        help="Stop (with a checkpoint) after this many consecutive non-finite steps.")
    return parser.parse_args(argv)


def needs_teacher(args):
    """The teacher is only loaded when a loss reads its outputs (and no --teacher_cache stands for it);
    otherwise this is plain MLM/CLM training."""
    return (args.alpha_ce > 0 or args.alpha_mse > 0 or args.alpha_cos > 0 or args.alpha_hidden > 0) \
        and (args.teacher_cache is None or args.lmbda > 0)  # on-policy batches are scored live


def encoder_mode(args):
    """Bare encoders (--student_type / --teacher_type encoder): hidden-state losses only, on unmasked text."""
    return ENCODER in (args.student_type, args.teacher_type)


def bidirectional(args):
    """Whether sequences are framed and attended as an encoder's ([CLS] ... [SEP], attention mask)."""
    return args.mlm or encoder_mode(args)


def parse_layer_map(text):
    """--hidden_layer_map "0:0,1:3,2:5" -> ((0, 0), (1, 3), (2, 5)); None -> (). Ranges are checked against
    the models in check_compatibility."""
    if text is None:
        return ()
    pairs = []
    for item in text.split(","):
        student, sep, teacher = item.strip().partition(":")
        if not (sep and student.strip().isdigit() and teacher.strip().isdigit()):
            raise UserError(f"--hidden_layer_map {text}: expected student:teacher block pairs such as 0:0,1:3,2:5, "
                            f"got {item.strip()!r}")
        pairs.append((int(student), int(teacher)))
    students = [student for student, _ in pairs]
    for block in students:
        if students.count(block) > 1:
            raise UserError(f"--hidden_layer_map {text}: student block {block} is mapped twice")
    return tuple(pairs)


def check_encoder_flags(args):
    """Bare encoders have no LM head: only the hidden-state losses apply, and nothing reads LM outputs."""
    if args.student_type != ENCODER or args.teacher_type != ENCODER:
        raise UserError(f"--student_type encoder and --teacher_type encoder go together (got --student_type "
                        f"{args.student_type} --teacher_type {args.teacher_type})")
    on = [f"--alpha_{name} {getattr(args, f'alpha_{name}')}" for name in ("ce", "mse", "mlm", "clm")
          if getattr(args, f"alpha_{name}") != 0]
    if on:
        raise UserError(f"encoders have no LM head and learn from hidden states alone (--alpha_cos, --alpha_hidden): "
                        f"set {', '.join(on)} to 0")
    if args.eval_data_file is not None:
        raise UserError("--eval_data_file measures LM losses, which encoders without an LM head do not have")
    if args.fsdp:
        raise UserError("--fsdp is not supported with --student_type encoder yet (a small encoder fits one "
                        "device: use DDP)")


def check_cache_flags(args):
    """--teacher_cache: what it can stand for. The cache keeps the teacher's top-k distribution only."""
    if args.teacher_cache is None:
        return
    if args.teacher_name is not None and args.lmbda == 0:
        raise UserError("--teacher_cache replaces the teacher: drop --teacher_name (it is read only to score "
                        "on-policy batches, with --lmbda > 0)")
    if args.alpha_mse > 0 or args.alpha_cos > 0 or args.alpha_hidden > 0:
        raise UserError("--teacher_cache holds the teacher's top-k probabilities, not its logits or hidden states: "
                        "--alpha_mse, --alpha_cos and --alpha_hidden must be 0 with it")
    if not os.path.isdir(args.teacher_cache):
        raise UserError(f"--teacher_cache {args.teacher_cache}: no such folder")


def sanity_checks(args):
    """Checks that need only the flags. Raises UserError naming the flag."""
    check_cache_flags(args)
    check_on_policy_args(args)
    if needs_teacher(args):
        if args.teacher_type is None or args.teacher_name is None:
            raise UserError("--teacher_type and --teacher_name are required when --alpha_ce, --alpha_mse, "
                            "--alpha_cos or --alpha_hidden is > 0")
    else:
        if args.teacher_type is None:  # only used to pick the tokenizer class
            args.teacher_type = "bert" if args.student_type == "distilbert" else args.student_type
        if args.tokenizer_name is None and args.teacher_name is None and args.teacher_cache is None:
            raise UserError("without a teacher (--alpha_ce, --alpha_mse and --alpha_cos all 0), --tokenizer_name "
                            "must name the tokenizer")
    for flag in ("teacher_name", "tokenizer_name", "student_config", "student_pretrained_weights"):
        refuse_gguf(getattr(args, flag), f"--{flag}")
    auto = AUTO in (args.student_type, args.teacher_type) or encoder_mode(args)
    if encoder_mode(args):
        check_encoder_flags(args)  # no LM loss, hence no masking, no token counts
    elif args.mlm:
        if args.token_counts is None and args.teacher_cache is None:  # a cache brings its masking
            raise UserError("--mlm needs --token_counts (the output of scripts/token_counts.py)")
        if not auto and (args.student_type not in ("roberta", "distilbert", "bert")
                         or args.teacher_type not in ("roberta", "bert")):
            raise UserError(f"--mlm works with a distilbert/roberta student and a bert/roberta teacher, not "
                            f"--student_type {args.student_type} --teacher_type {args.teacher_type}")
        if args.alpha_clm != 0:
            raise UserError("--alpha_clm must be 0 with --mlm (the student is trained with the MLM loss)")
    else:
        if not auto and (args.student_type != "gpt2" or args.teacher_type != "gpt2"):
            raise UserError("without --mlm (causal LM) student and teacher must both be gpt2; add --mlm for "
                            f"--student_type {args.student_type} --teacher_type {args.teacher_type}")
        if args.alpha_mlm != 0:
            raise UserError("--alpha_mlm must be 0 without --mlm (the student is trained with the CLM loss)")
    if not (auto or args.teacher_type == args.student_type
            or (args.student_type == "distilbert" and args.teacher_type == "bert")):
        raise UserError(f"--student_type {args.student_type} cannot learn from --teacher_type {args.teacher_type}")
    if not os.path.isfile(args.student_config):
        raise UserError(f"--student_config {args.student_config}: no such file")
    if args.student_pretrained_weights is not None and not os.path.exists(args.student_pretrained_weights):
        raise UserError(f"--student_pretrained_weights {args.student_pretrained_weights}: no such file or folder")
    if args.freeze_token_type_embds and args.student_type not in ("roberta", AUTO, ENCODER):
        raise UserError("--freeze_token_type_embds only applies to --student_type roberta (or auto, encoder)")
    for name in ("ce", "mlm", "clm", "mse", "cos", "hidden"):
        if getattr(args, f"alpha_{name}") < 0:
            raise UserError(f"--alpha_{name} must be >= 0")
    if args.alpha_ce + args.alpha_mlm + args.alpha_clm + args.alpha_mse + args.alpha_cos + args.alpha_hidden <= 0:
        raise UserError("at least one of --alpha_ce/--alpha_mlm/--alpha_clm/--alpha_mse/--alpha_cos/--alpha_hidden "
                        "must be > 0")
    if args.alpha_hidden > 0 and args.hidden_layer_map is None:
        raise UserError("--alpha_hidden needs --hidden_layer_map (which teacher block each student block learns from)")
    if args.hidden_layer_map is not None and args.alpha_hidden == 0:
        raise UserError("--hidden_layer_map is only used with --alpha_hidden > 0")
    parse_layer_map(args.hidden_layer_map)
    if args.temperature <= 0:
        raise UserError("--temperature must be > 0")
    kd_error = check_kd_loss_args(args.kd_loss, args.jsd_beta)
    if kd_error:
        raise UserError(kd_error)
    if not 0 < args.mlm_mask_prop <= 1:
        raise UserError("--mlm_mask_prop must be in (0, 1]")
    split = (args.word_mask, args.word_keep, args.word_rand)
    if min(split) < 0 or abs(sum(split) - 1) > 1e-6:
        raise UserError(f"--word_mask/--word_keep/--word_rand must be >= 0 and sum to 1, got {split}")
    for flag in ("n_epoch", "batch_size", "gradient_accumulation_steps", "log_interval", "checkpoint_interval",
                 "save_total_limit", "max_bad_steps", "max_steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1")
    if args.max_seq_length is not None and args.max_seq_length < MIN_SEQ_LEN:
        raise UserError(f"--max_seq_length must be at least {MIN_SEQ_LEN} (shorter sequences are not trained on)")
    if not 0 <= args.warmup_prop <= 1:
        raise UserError("--warmup_prop must be in [0, 1]")
    if args.fp16 and args.bf16:
        raise UserError("--fp16 and --bf16 are exclusive")
    if args.eval_interval < 0 or args.eval_batch_size < 1 or (args.eval_max_batches is not None and args.eval_max_batches < 1):
        raise UserError("--eval_interval must be >= 0, --eval_batch_size and --eval_max_batches >= 1")
    if args.eval_data_file is not None and not os.path.exists(args.eval_data_file):
        raise UserError(f"--eval_data_file {args.eval_data_file}: no such file")
    if args.num_workers < 0:
        raise UserError("--num_workers must be >= 0")
    if args.teacher_replicated and not args.fsdp:
        raise UserError("--teacher_replicated only applies with --fsdp (under DDP every rank holds the whole teacher)")
    if args.fsdp and args.fp16:
        raise UserError("--fsdp runs in float32 or with --bf16, not --fp16 (its loss scaling would need the "
                        "overflow check agreed across shards)")


def check_dump_path(args, ctx):
    """Master only (other ranks would race with the master creating the folder)."""
    if args.resume is not None:
        if not os.path.isdir(args.dump_path):
            raise UserError(f"--resume: --dump_path {args.dump_path} does not exist")
        if args.force:
            logger.warning("--force is ignored with --resume: the run folder is never cleared when resuming.")
        return
    if not ctx.is_master or not os.path.exists(args.dump_path):
        return
    if not args.force:
        raise UserError(f"--dump_path {args.dump_path} already exists; use --force to overwrite it")
    _check_safe_to_clear(args)


def _check_safe_to_clear(args):
    """--force deletes dump_path: refuse when that would delete an input or something that is not a run."""
    dump = os.path.realpath(args.dump_path)
    if not os.path.isdir(dump):
        raise UserError(f"--dump_path {args.dump_path} exists and is not a folder; not deleting it")
    protected = {os.path.realpath(p) for p in (os.getcwd(), os.path.expanduser("~"), "/",
                                               os.path.dirname(os.path.abspath(__file__)))}
    if any(os.path.commonpath([dump, p]) == dump for p in protected):  # is, or contains, such a folder
        raise UserError(f"--dump_path {args.dump_path} is or contains a folder --force must not delete")
    for flag in ("data_file", "token_counts", "student_config", "student_pretrained_weights", "teacher_name",
                 "tokenizer_name", "teacher_cache"):
        value = getattr(args, flag)
        if value and os.path.exists(value):
            if os.path.commonpath([dump, os.path.realpath(value)]) == dump:
                raise UserError(f"--{flag} {value} lies inside --dump_path {args.dump_path}, which --force would delete")


# ------------------------------------------------------------------------------------------------ models


def build_tokenizer(args):
    """The tokenizer: --tokenizer_name, else the teacher's (or the one its cache keeps)."""
    if args.tokenizer_name:
        return load_tokenizer(args.teacher_type, args.tokenizer_name, "--tokenizer_name", args.mlm)
    if args.teacher_name is None and args.teacher_cache is not None:
        return load_tokenizer(args.teacher_type, os.path.join(args.teacher_cache, "tokenizer"), "--teacher_cache",
                              args.mlm)
    return load_tokenizer(args.teacher_type, args.teacher_name, "--teacher_name", args.mlm)


def build_teacher(args):
    """The frozen teacher, or None when no loss needs it."""
    if not needs_teacher(args):
        if args.teacher_cache is not None:
            logger.info("No teacher loaded: its outputs come from --teacher_cache %s.", args.teacher_cache)
        else:
            logger.info("No teacher: --alpha_ce, --alpha_mse and --alpha_cos are 0, training on the LM loss alone.")
        return None
    # Stored in the run's compute dtype (bf16/fp16, DDP or FSDP): it is frozen, and autocast would cast its
    # weights to that dtype at every forward anyway; float32 storage would only double its memory.
    dtype = amp_dtype(bf16=args.bf16, fp16=args.fp16)
    # Sharded (--fsdp): built on the meta device, each rank reads only its shards after sharding (distil/distributed)
    on_meta = args.fsdp and not args.teacher_replicated
    return load_teacher(args.teacher_type, args.teacher_name, args.mlm, dtype=dtype, on_meta=on_meta)


def check_vocabularies(args, student, teacher, tokenizer):
    """The teacher's vocabulary against the student's and the run's tokenizer (distil/vocabularies.py): a
    --tokenizer_name is compared token by token with the teacher's own tokenizer, and a teacher vocabulary that
    extends the student's is cut to it. Once per run, before check_compatibility."""
    if teacher is None:
        return
    teacher_tokenizer = teacher_tokenizer_to_compare(args.teacher_type, args.teacher_name, args.tokenizer_name,
                                                     args.mlm, args.assume_same_token_ids)
    check_teacher_vocabulary(teacher, student.config.vocab_size, tokenizer, "--student_config", args.student_config,
                             args.teacher_name, teacher_tokenizer, args.tokenizer_name)


def check_compatibility(args, student, teacher, tokenizer, corpus, counts, special_tok_ids):
    """Cross-object checks after check_vocabularies: hidden sizes, data ids, token counts."""
    t_vocab = teacher.config.vocab_size if teacher is not None else student.config.vocab_size
    if args.alpha_cos > 0 or args.alpha_hidden > 0:
        s_dim, t_dim = student.config.hidden_size, teacher.config.hidden_size
        if s_dim != t_dim and not args.hidden_projection:
            flag = "--alpha_cos" if args.alpha_cos > 0 else "--alpha_hidden"
            raise UserError(f"{flag} needs equal hidden sizes: student {s_dim} (--student_config "
                            f"{args.student_config}) vs teacher {t_dim} (--teacher_name {args.teacher_name}); "
                            "add --hidden_projection to learn a projection between them")
    if args.alpha_hidden > 0:
        check_layer_map(args.hidden_layer_map, student.config, teacher.config)
    if corpus.max_token_id >= t_vocab:
        raise UserError(f"--data_file {corpus.path}: token id {corpus.max_token_id} is outside the teacher's "
                        f"vocabulary of {t_vocab}; was it binarized with another tokenizer?")
    recorded = corpus.metadata.get("vocab_size")
    if recorded is not None and recorded not in (t_vocab, len(tokenizer)):
        raise UserError(f"--data_file {corpus.path} was binarized with a {recorded}-token tokenizer; the teacher "
                        f"has {t_vocab} tokens")
    if counts is not None and len(counts) not in (t_vocab, len(tokenizer)):
        raise UserError(f"--token_counts {args.token_counts} holds counts for {len(counts)} ids; the vocabulary "
                        f"has {t_vocab}")
    if encoder_mode(args):
        needed, purpose = ("cls_token", "sep_token", "pad_token"), "an encoder's sequences"
    elif args.mlm:
        needed, purpose = ("cls_token", "sep_token", "pad_token", "mask_token"), "MLM"
    else:
        needed, purpose = ("bos_token", "eos_token"), "CLM"
    missing = [n for n in needed if n not in special_tok_ids]
    if missing:
        raise UserError(f"--teacher_name {args.teacher_name}: its tokenizer lacks {', '.join(missing)}, needed for "
                        f"{purpose}")


def check_layer_map(text, s_config, t_config):
    """Every block --hidden_layer_map names exists in its model."""
    for (side, config), blocks in zip((("student", s_config), ("teacher", t_config)),
                                      zip(*parse_layer_map(text))):
        n = getattr(config.get_text_config(), "num_hidden_layers", None)
        if not isinstance(n, int):
            raise UserError(f"--hidden_layer_map: cannot tell how many blocks the {side} ({config.model_type}) has")
        for block in blocks:
            if block >= n:
                raise UserError(f"--hidden_layer_map {text}: the {side} has no block {block} (it has {n}: 0 to "
                                f"{n - 1})")


# ------------------------------------------------------------------------------------------------ main


def planned_epochs(args, ctx, dataset, max_len):
    """Passes over the data the run will start: --n_epoch, or as many as --max_steps needs. The plan
    Distiller makes (schedule.plan_steps), from the length of the same batch sampler, known before training."""
    sampler = training_batch_sampler(dataset, batch_size=args.batch_size, group_by_size=args.group_by_size,
                                     max_len=max_len, world_size=ctx.world_size, rank=ctx.global_rank, seed=args.seed)
    return plan_steps(len(sampler), args.n_epoch, args.gradient_accumulation_steps, args.warmup_prop,
                      args.max_steps).n_epochs


def check_loss_mask(args, corpus, max_len=None):
    """A corpus with a loss mask (scripts/binarized_chat.py: conversations, the assistant's tokens as targets) is
    for causal students, and its conversations must fit max_len: the dataset would cut a longer one into chunks,
    through its answers, where binarized_chat.py cuts at turn boundaries."""
    if corpus.loss_mask is None:
        return
    if bidirectional(args):
        raise UserError(f"--data_file {corpus.path} carries a loss mask (conversations), which only a causal "
                        "student (--student_type gpt2/auto, no --mlm) trains on")
    longest = int(np.diff(np.asarray(corpus.offsets)).max()) if corpus.n_sequences else 0
    if max_len is not None and longest > max_len:
        raise UserError(f"--data_file {corpus.path} holds conversations of up to {longest} tokens, longer than this "
                        f"run's {max_len} (--max_seq_length or the models' limit); binarize it with "
                        f"scripts/binarized_chat.py --max_seq_length {max_len}, which cuts them at turn boundaries")


def find_checkpoint(args):
    """(path, state) to resume from, or (None, None) when not resuming. Corrupted files are named.

    A sharded checkpoint (a folder, written with --fsdp) yields only its trainer state here; the Distiller
    reads its shards once the sharded student exists. It resumes only with --fsdp, and a one-file checkpoint
    only without."""
    if args.resume is None:
        return None, None
    if args.resume != "latest":
        path, state = args.resume, load_checkpoint_file(args.resume)
    else:
        path, state = find_resumable_checkpoint(args.dump_path)
        if path is None:
            raise UserError(f"--resume: no valid checkpoint in {os.path.join(args.dump_path, 'checkpoints')}")
    if is_sharded(path) and not args.fsdp:
        raise UserError(f"--resume {path}: a sharded checkpoint written with --fsdp; resume it with --fsdp under "
                        "torchrun (2 or more processes)")
    if not is_sharded(path) and args.fsdp:
        raise UserError(f"--resume {path}: written without --fsdp; resume it without --fsdp")
    return path, state


def prepare_dump_path(args, ctx, resolved):
    """Clear (with --force) and create the dump folder, with the run's parameters in it; master only, everyone
    waits for it. resolved: values main() worked out that no flag gives (written beside the flags)."""
    if args.resume is not None:
        return
    if ctx.is_master:
        if os.path.exists(args.dump_path):
            logger.info("--force: removing the previous content of %s", args.dump_path)
            shutil.rmtree(args.dump_path)
        os.makedirs(args.dump_path)
        logger.info("Experiment will be dumped and logged in %s", args.dump_path)
        params = dict(vars(args), **resolved, world_size=ctx.world_size, n_nodes=ctx.n_nodes,
                      device=str(ctx.device), command_line=" ".join(sys.argv))
        write_json_atomic(os.path.join(args.dump_path, "parameters.json"), params)
        write_json_atomic(os.path.join(args.dump_path, "git_log.json"), git_info())
    if ctx.multi_gpu:
        torch.distributed.barrier()


def build_evaluator(args, ctx, student, teacher, tokenizer, special_tok_ids, max_len):
    """evaluation.evaluate bound to the --eval_* flags, or None without --eval_data_file. The loop and the
    evaluation meet here, not inside each other."""
    if args.eval_data_file is None:
        return None
    with user_input("--eval_data_file"):
        eval_corpus = BinarizedCorpus.open(args.eval_data_file)
    check_compatibility(args, student, teacher, tokenizer, eval_corpus, None, special_tok_ids)
    eval_dataset = LmSeqsDataset(eval_corpus, special_tok_ids=special_tok_ids, mlm=args.mlm, max_len=max_len)
    if len(eval_dataset) == 0:
        raise UserError(f"--eval_data_file {eval_corpus.path}: no sequence left after filtering")
    return functools.partial(evaluate, dataset=eval_dataset, mlm=args.mlm, batch_size=args.eval_batch_size,
                             device=ctx.device, special_tok_ids=special_tok_ids,
                             vocab_size=student.config.vocab_size, seed=args.seed, mask_prop=args.mlm_mask_prop,
                             max_batches=args.eval_max_batches, world_size=ctx.world_size, rank=ctx.global_rank,
                             amp_dtype=amp_dtype(bf16=args.bf16, fp16=args.fp16))


def main(argv=None):
    args = parse_args(argv)
    sanity_checks(args)
    ctx = init_distributed(args.n_gpu, args.local_rank)
    args.fsdp = use_fsdp(args.fsdp, ctx)  # one process: unsharded, with a warning
    check_dump_path(args, ctx)
    resume_path, resume_state = find_checkpoint(args)
    set_seed(args.seed)
    if args.fp16:
        logger.warning("--fp16 uses torch.amp with a GradScaler; --fp16_opt_level %s is ignored.", args.fp16_opt_level)

    cache = TeacherCache(args.teacher_cache) if args.teacher_cache is not None else None
    tokenizer = build_tokenizer(args)
    teacher = build_teacher(args)
    max_len = max_input_size(teacher.config if teacher is not None else None, tokenizer)

    logger.info("Loading data from %s", args.data_file)
    with user_input("--data_file"):
        corpus = BinarizedCorpus.open(args.data_file)
    special_tok_ids = framing_token_ids(special_token_ids(tokenizer), bidirectional(args),
                                        corpus.metadata.get("framing"))
    counts = None
    masked = args.mlm and not encoder_mode(args)  # encoders learn from unmasked text (Distiller.prepare_batch_plain)
    if masked and cache is None:  # a cache brings its masking
        with user_input("--token_counts"):
            counts = load_token_counts(args.token_counts)

    student = build_student(args.student_type, args.student_config, mlm=args.mlm,
                            pretrained_weights=args.student_pretrained_weights,
                            initializer_range=args.initializer_range, freeze_pos_embs=args.freeze_pos_embs,
                            freeze_token_type_embds=args.freeze_token_type_embds,
                            gradient_checkpointing=args.gradient_checkpointing)
    max_len = min(max_len, max_input_size(student.config))
    if args.max_seq_length is not None:
        if args.max_seq_length > max_len:
            raise UserError(f"--max_seq_length {args.max_seq_length} is longer than the models accept ({max_len} "
                            "tokens)")
        max_len = args.max_seq_length
    elif cache is not None:  # the length the cache cut at: its teacher's limit, or its own --max_seq_length
        max_len = min(max_len, cache.meta["max_len"])
    check_vocabularies(args, student, teacher, tokenizer)
    check_compatibility(args, student, teacher, tokenizer, corpus, counts, special_tok_ids)
    check_loss_mask(args, corpus, max_len)
    check_on_policy_corpus(args, corpus)

    dataset = LmSeqsDataset(corpus, special_tok_ids=special_tok_ids, mlm=bidirectional(args), max_len=max_len)
    if len(dataset) == 0:
        raise UserError(f"--data_file {corpus.path}: no training sequence left after filtering (sequences need "
                        "at least 12 tokens)")
    on_policy = build_on_policy(args, tokenizer, dataset.pad_id, max_len, ctx.global_rank,
                                amp_dtype(bf16=args.bf16, fp16=args.fp16))
    if cache is not None:
        cache.check_run(corpus=corpus, tokenizer=tokenizer, max_len=max_len, vocab_size=student.config.vocab_size,
                        n_epochs=planned_epochs(args, ctx, dataset, max_len), max_steps=args.max_steps,
                        dataset=dataset, settings=vars(args))
        logger.info("Training from the cache %s of --teacher_name %s.", args.teacher_cache,
                    cache.meta["teacher"]["name"])
    evaluator = build_evaluator(args, ctx, student, teacher, tokenizer, special_tok_ids, max_len)
    masking = None
    if masked and cache is None:
        counts = np.pad(counts, (0, max(0, student.config.vocab_size - len(counts))))
        token_probs = smoothed_token_probs(counts, special_tok_ids.values(), args.mlm_smoothing)
        masking = MlmMasking(token_probs=token_probs.to(ctx.device), mask_prop=args.mlm_mask_prop,
                             split=(args.word_mask, args.word_keep, args.word_rand),
                             mask_id=special_tok_ids["mask_token"], vocab_size=student.config.vocab_size,
                             restrict_to_mask=args.restrict_ce_to_mask)

    resolved = {"special_tok_ids": special_tok_ids, "max_model_input_size": max_len}
    if cache is not None:  # the teacher this run learns from, as the cache recorded it
        resolved["cached_teacher"] = cache.meta["teacher"]
    prepare_dump_path(args, ctx, resolved)
    if ctx.is_master:
        student.config.save_pretrained(args.dump_path)
    if not args.fsdp:  # under FSDP the sharding moves each unit to the device as it shards it
        student.to(ctx.device)
        if teacher is not None:
            teacher.to(ctx.device)
    # Different masking and dropout on each rank; the models were already initialised identically above.
    set_seed(args.seed + ctx.global_rank)

    config = DistillationConfig.from_args(args, max_model_input_size=max_len, mlm=bidirectional(args),
                                          hidden_layer_map=parse_layer_map(args.hidden_layer_map))
    distiller = Distiller(config, ctx, dataset, student, teacher, masking=masking, tokenizer=tokenizer,
                          evaluator=evaluator, teacher_cache=cache, on_policy=on_policy)
    if resume_state is not None:
        distiller.load_training_state(resume_state, resume_path)
        del resume_state
    distiller.train()
    if ctx.multi_gpu:
        # Every rank leaves together. A rank that exits right after the last collective (the checkpoint's
        # all_gather_object) can otherwise finalise Python while a gloo worker thread still releases that
        # collective's tensors, which needs the GIL: the worker then aborts the process (SIGABRT).
        torch.distributed.barrier()
    if not distiller.interrupted:
        logger.info("Let's go get some drinks.")
    if ctx.is_master:
        logger.info("%s", describe_output(args.dump_path))
    return distiller


def describe_output(folder):
    """One line: the run's folder and what is in it, with the sizes that matter (the last line of a run)."""
    def size(path):
        if os.path.isdir(path):
            return sum(size(os.path.join(path, name)) for name in os.listdir(path))
        return os.path.getsize(path)

    def human(n):
        return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"

    meaning = {"checkpoints": "resumable: weights + optimizer state, for --resume", "log": "TensorBoard"}
    parts = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            inside = sorted(os.listdir(path))
            what = f"{', '.join(inside[:3])}{', ...' if len(inside) > 3 else ''}; {human(size(path))}"
            parts.append(f"{name}/ ({what}{'; ' + meaning[name] if name in meaning else ''})")
        else:
            parts.append(f"{name} ({human(size(path))})")
    return f"Output in {folder}: {', '.join(parts)}"


if __name__ == "__main__":
    try:
        main()
    except (UserError, FileNotFoundError, ValueError, TrainingError) as exc:
        fail(str(exc))
    finally:
        cleanup_distributed()
