"""Speed and memory of one distillation step: our `Distiller.step` against the original scripts' step.

    python scripts/benchmark.py --size tiny --config all                  # CPU, about 1-2 minutes
    python scripts/benchmark.py --size base --config all --device cuda --bf16 --json bench.json
    python scripts/benchmark.py --fsdp_ranks 1,2,4 --config gpt2_clm --size base --batch_size 2 --seq_len 128
                                      # FSDP2: per-rank memory of the same model on 1, 2 and 4 ranks (CPU, gloo)
    python scripts/benchmark.py --fsdp_ranks 8 --config gpt2_clm --size xl --device cuda --bf16 --gradient_checkpointing
                                      # FSDP2 on 8 GPUs, a student + teacher that do not fit one GPU under DDP
    python scripts/benchmark.py --config bert_mlm --steps 2 --warmup 1 --vocab_size 500 --hidden_size 32 \
        --teacher_layers 2 --student_layers 1 --batch_size 4 --seq_len 32      # a smoke run

Both sides run in this one process on the same randomly initialised models (the student starts from the
same weights), the same pre-generated batches with the same MLM masking (made once, before any timing,
with our `prepare_batch_mlm`/`prepare_batch_clm`) and the same seed, so only the step differs. The
REFERENCE step is written here the way the original research scripts worked: full logits from both
models, `masked_select` of the positions, KLDivLoss on softmaxes, CrossEntropyLoss on the full logits,
MSE and CosineEmbeddingLoss on `masked_select`ed tensors, backward, clip, AdamW, scheduler.

Configurations: bert_mlm (BERT teacher -> DistilBERT student, ce 5 / mlm 2 / cos 1), bert_mlm_restrict
(the same with --restrict_ce_to_mask), gpt2_clm (GPT-2 -> smaller GPT-2, ce 5 / clm 2 / cos 1).

Per configuration and side: sequences/s, real (non-padding) tokens/s, the step's transient peak memory
(above the steady state of weights and optimizer state), and a "loss only" micro-benchmark that times
losses + backward on fixed logits. On CUDA also MFU. Ratios are ours / reference: > 1 is faster for
throughput, < 1 is less memory.

--fsdp_ranks N1,N2,...: instead, for one configuration, the Distiller with --fsdp (sharding.py) under torchrun on
N1, then N2, ... processes of this machine (gloo on the CPU, NCCL on GPUs), and per rank: the bytes it holds of
the student's weights, gradients and optimizer state and of the teacher's weights (the sharded parts, which
fall as 1/ranks), the process memory after setup and at its peak over the steps (RSS on the CPU, the CUDA
allocator on a GPU), and the time per step. Each launch runs this script with --fsdp_worker; on several nodes,
launch that yourself: torchrun --nnodes ... scripts/benchmark.py --fsdp_worker out.json <flags>.
"""
import argparse
import contextlib
import copy
import dataclasses
import functools
import json
import logging
import math
import os
import sys
import tempfile
import time

import numpy as np
import subprocess

import psutil
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from benchmarking import PeakSampler, cpu_alloc_peak, cuda_sync_warnings, release_freed_host_memory, sync  # noqa: E402
from distiller import DistillationConfig, Distiller  # noqa: E402
from lm_seqs_dataset import LmSeqsDataset  # noqa: E402
from losses import distillation_losses  # noqa: E402
from masking import MlmMasking, smoothed_token_probs  # noqa: E402
from utils import RunContext  # noqa: E402

CONFIGS = ("bert_mlm", "bert_mlm_restrict", "gpt2_clm")
BERT_SPECIAL = {"pad_token": 0, "unk_token": 100, "cls_token": 101, "sep_token": 102, "mask_token": 103}
# Dense bf16 tensor-core peaks (no sparsity), by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
                   ("A100", 312e12), ("L40S", 362e12), ("A10G", 70e12))

# Model sizes. "tiny" is sized for a 2-core CPU (a default run of all configurations in ~1-2 minutes) but
# keeps the real vocabularies, because the vocabulary-sized tensors are what the loss code is about.
PRESETS = {
    "tiny": dict(vocab_bert=30522, vocab_gpt2=50257, hidden=256, heads=4, ffn=1024, teacher_layers=6,
                 student_layers=3, batch_size=8, seq_len=128, steps=3, warmup=1, loss_steps=2),
    "base": dict(vocab_bert=30522, vocab_gpt2=50257, hidden=768, heads=12, ffn=3072, teacher_layers=12,
                 student_layers=6, batch_size=16, seq_len=512, steps=20, warmup=5, loss_steps=10),
    # For --fsdp_ranks on GPUs: a 6.7B teacher and a 2.6B student (GPT-2 shapes). Under DDP a rank would hold
    # 2.6B x 16 bytes (fp32 weights, gradients, AdamW moments) + 6.7B x 4 bytes (fp32 teacher) = 69 GB
    # before activations: more than an 80 GB GPU has room for at this batch.
    "xl": dict(vocab_bert=30522, vocab_gpt2=50257, hidden=4096, heads=32, ffn=16384, teacher_layers=32,
               student_layers=12, batch_size=4, seq_len=1024, steps=5, warmup=2, loss_steps=2),
}


# ------------------------------------------------------------------------------------------- models


def build_models(config_name, size, args):
    """(teacher, student, student_type) with random weights, built from configs (no network)."""
    from transformers import (BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM, GPT2Config,
                              GPT2LMHeadModel)

    p = dict(PRESETS[size])
    for key in ("hidden", "heads", "ffn", "teacher_layers", "student_layers"):
        if getattr(args, key, None) is not None:
            p[key] = getattr(args, key)
    seq_len = args.seq_len or p["seq_len"]
    positions = max(512, seq_len)
    if config_name.startswith("bert"):
        vocab = args.vocab_size or p["vocab_bert"]
        teacher = BertForMaskedLM(BertConfig(
            vocab_size=vocab, hidden_size=p["hidden"], num_hidden_layers=p["teacher_layers"],
            num_attention_heads=p["heads"], intermediate_size=p["ffn"], max_position_embeddings=positions))
        student = DistilBertForMaskedLM(DistilBertConfig(
            vocab_size=vocab, dim=p["hidden"], n_layers=p["student_layers"], n_heads=p["heads"], hidden_dim=p["ffn"],
            max_position_embeddings=positions))
        return teacher, student, "distilbert"
    vocab = args.vocab_size or p["vocab_gpt2"]
    common = dict(vocab_size=vocab, n_embd=p["hidden"], n_head=p["heads"], n_inner=p["ffn"],
                  n_positions=max(1024, seq_len), bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    teacher = GPT2LMHeadModel(GPT2Config(n_layer=p["teacher_layers"], **common))
    student = GPT2LMHeadModel(GPT2Config(n_layer=p["student_layers"], **common))
    return teacher, student, "gpt2"


def special_ids(config_name, vocab):
    if config_name.startswith("bert"):
        return dict(BERT_SPECIAL)
    eos = vocab - 1  # GPT-2's <|endoftext|> is its last id; it also pads, as in the original
    return {"bos_token": eos, "eos_token": eos, "unk_token": eos}


def matmul_params(model):
    """Parameters that take part in a matmul per token: all but the position / token-type tables.

    The word-embedding table counts once, for the (tied) output projection; the lookup itself is free.
    An untied head is counted by itself, and the input table then not at all.
    """
    n = 0
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    input_table = model.get_input_embeddings().weight
    for name, param in model.named_parameters():
        if any(k in name for k in ("position", "wpe", "token_type")):
            continue
        if param is input_table and not tied:
            continue
        n += param.numel()
    return n


def model_shape(model):
    c = model.config
    layers = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layers", None) or c.n_layer
    dim = getattr(c, "hidden_size", None) or getattr(c, "dim", None) or c.n_embd
    return layers, dim


def step_flops(teacher, student, batches):
    """Model flops of the steps on these batches (padding included: the models compute it).

    Per token: teacher forward 2*N_t, student forward + backward 6*N_s, with N the matmul parameters
    (matmul_params). Attention scores and weighted sum add 2*2*S*d per token per layer forward (S the
    padded length, d the hidden size): 4*L_t*S*d_t for the teacher, 3x that for the student,
    12*L_s*S*d_s. Softmaxes, norms, losses and the optimizer are not counted.
    """
    n_t, n_s = matmul_params(teacher), matmul_params(student)
    (l_t, d_t), (l_s, d_s) = model_shape(teacher), model_shape(student)
    total = 0
    for ids, *_ in batches:
        bs, s = ids.shape
        total += bs * s * (2 * n_t + 6 * n_s + 4 * l_t * s * d_t + 12 * l_s * s * d_s)
    return total


def device_peak_flops(device, override):
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


# -------------------------------------------------------------------------------------------- batches


def make_sequences(n_batches, batch_size, seq_len, vocab, special, mlm, seed):
    """Batches of token-id sequences, framed like binarized_data.py output.

    Lengths follow a log-normal (median ~ seq_len / 2, clipped to [12, seq_len]) across batches, and vary
    by at most 3 tokens inside a batch, because train.py groups sequences into 4-token-wide length buckets
    (--group_by_size is on by default). Token ids are Zipf-distributed so the MLM masking weights matter.
    """
    rng = np.random.default_rng(seed)
    # BERT's ids below 999 are special and [unusedN] tokens; a smoke-test vocabulary just skips the specials.
    first_id = (999 if vocab > 2 * 999 else max(special.values()) + 1) if mlm else 0
    start = special["cls_token"] if mlm else special["bos_token"]
    end = special["sep_token"] if mlm else special["eos_token"]
    out = []
    for _ in range(n_batches):
        center = int(np.clip(np.exp(rng.normal(math.log(seq_len / 2), 0.5)), 12, seq_len))
        batch = []
        for _ in range(batch_size):
            length = int(np.clip(center - rng.integers(0, 4), 12, seq_len))
            body = first_id + (rng.zipf(1.2, size=length - 2) - 1) % (vocab - 1 - first_id)
            batch.append(np.concatenate([[start], body, [end]]).astype(np.int64))
        out.append(batch)
    return out


def make_config(config_name, student_type, args, max_len, dump_path):
    """The DistillationConfig of this configuration: train.py's defaults, the README's loss weights."""
    mlm = config_name.startswith("bert")
    return DistillationConfig(
        dump_path=dump_path, mlm=mlm, student_type=student_type, alpha_ce=5.0, alpha_cos=1.0,
        alpha_mlm=2.0 if mlm else 0.0, alpha_clm=0.0 if mlm else 2.0,
        restrict_ce_to_mask=config_name == "bert_mlm_restrict", batch_size=args.batch_size,
        gradient_accumulation_steps=1, n_epoch=1, seed=args.seed, bf16=args.bf16, compile=args.compile,
        max_model_input_size=max_len)


def make_distiller(config, device, sequences, student, teacher, special, ctx=None):
    """A Distiller over these pre-made batches, in one process unless ctx (a RunContext) says otherwise (its
    TensorBoard files go to config.dump_path)."""
    flat = [s for batch in sequences for s in batch]
    dataset = LmSeqsDataset(flat, special_tok_ids=special, mlm=config.mlm, max_len=config.max_model_input_size)
    masking = None
    if config.mlm:
        counts = np.bincount(np.concatenate(flat), minlength=student.config.vocab_size)
        masking = MlmMasking(token_probs=smoothed_token_probs(counts, special.values(), 0.7).to(device),
                             mask_prop=0.15, split=(0.8, 0.1, 0.1), mask_id=special["mask_token"],
                             vocab_size=student.config.vocab_size, restrict_to_mask=config.restrict_ce_to_mask)
    ctx = ctx or RunContext(device=device)
    return Distiller(config, ctx, dataset, student, teacher, masking=masking), dataset


# ----------------------------------------------------------------------------------------- the steps


def reference_losses(s_logits, t_logits, s_hidden, t_hidden, attn_mask, lm_labels, p):
    """{name: loss} with the original scripts' formulas (full logits, masked_select, nn loss modules)."""
    temperature, vocab = p.temperature, s_logits.size(-1)
    kd_mask = (lm_labels > -1) if (p.mlm and p.restrict_ce_to_mask) else attn_mask
    sel = kd_mask.unsqueeze(-1).expand_as(s_logits)  # (bs, seq, vocab)
    s_slct = torch.masked_select(s_logits, sel).view(-1, vocab)  # (n, vocab)
    t_slct = torch.masked_select(t_logits, sel).view(-1, vocab)
    losses = {}
    if p.alpha_ce > 0:
        losses["ce"] = nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s_slct / temperature, dim=-1),
                                                           F.softmax(t_slct / temperature, dim=-1)) * temperature ** 2
    lm_fct = nn.CrossEntropyLoss(ignore_index=-100)
    if p.alpha_mlm > 0:
        losses["mlm"] = lm_fct(s_logits.view(-1, vocab), lm_labels.view(-1))
    if p.alpha_clm > 0:
        shift_logits = s_logits[:, :-1, :].contiguous()
        shift_labels = lm_labels[:, 1:].contiguous()
        losses["clm"] = lm_fct(shift_logits.view(-1, vocab), shift_labels.view(-1))
    if p.alpha_mse > 0:
        losses["mse"] = nn.MSELoss(reduction="sum")(s_slct, t_slct) / s_slct.size(0)
    if p.alpha_cos > 0:
        dim = s_hidden.size(-1)
        hsel = attn_mask.unsqueeze(-1).expand_as(s_hidden)  # (bs, seq, dim)
        s_h = torch.masked_select(s_hidden, hsel).view(-1, dim)  # (n, dim)
        t_h = torch.masked_select(t_hidden, hsel).view(-1, dim)
        losses["cos"] = nn.CosineEmbeddingLoss(reduction="mean")(s_h, t_h, s_h.new_ones(s_h.size(0)))
    return losses


def our_losses(s_rows, t_rows, s_hidden, t_hidden, attn_mask, lm_labels, rows, p):
    """{name: loss} from the training step's own loss function (losses.distillation_losses), on the logits
    taken at the loss rows only (n, vocab): what Distiller.step feeds it."""
    return distillation_losses(s_rows, t_rows, s_hidden, t_hidden, attn_mask, lm_labels, rows, alpha=p.alpha,
                               temperature=p.temperature, mlm=p.mlm, restrict_ce_to_mask=p.restrict_ce_to_mask)


def loss_rows(attn_mask, lm_labels, p):
    """Flat positions whose logits some loss reads: the masked ones with restrict_ce_to_mask, else non-padding."""
    keep = (lm_labels != -100) if (p.mlm and p.restrict_ce_to_mask) else attn_mask
    return keep.flatten().nonzero().squeeze(-1)  # (n,)


def weighted_total(losses, p):
    """The step's loss. Ours: the fused term "logits" (already alpha_ce * ce + alpha_mse * mse + alpha_lm * lm;
    the named terms beside it are detached copies for logging) plus alpha_cos * cos. The reference: every
    term times its alpha."""
    if "logits" in losses:
        return losses["logits"] + p.alpha_cos * losses.get("cos", 0.0)
    return sum(getattr(p, f"alpha_{k}") * v for k, v in losses.items())


class ReferenceStep:
    """The original scripts' step: forward both models, losses, backward, clip, AdamW, scheduler.

    The optimizer is torch's AdamW with its default (non-fused) implementation, as a straightforward port
    of the original would use; the schedule and hyper-parameters are the same as ours. With --bf16 the
    losses are computed inside autocast, which runs softmax, log_softmax and the loss modules in fp32 (as
    apex O1 did for the original); in fp32 runs the softmaxes are in the model's dtype, fp32.
    """

    def __init__(self, params, student, teacher, num_steps, device):
        from transformers import get_linear_schedule_with_warmup

        self.p, self.student, self.teacher, self.device = params, student, teacher, device
        self.amp_dtype = torch.bfloat16 if params.bf16 else None
        self.trainable = [x for x in student.parameters() if x.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=params.learning_rate, eps=params.adam_epsilon,
                                           betas=(0.9, 0.98), weight_decay=params.weight_decay)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, math.ceil(num_steps * params.warmup_prop),
                                                         num_steps)
        self.first_losses = None

    def step(self, input_ids, attention_mask, lm_labels, *unused):  # unused: our Batch's host-side extras
        p = self.p
        mask = attention_mask if p.mlm else None  # the original gave GPT-2 no attention mask
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            s_out = self.student(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
            with torch.no_grad():
                t_out = self.teacher(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
            losses = reference_losses(s_out.logits, t_out.logits, s_out.hidden_states[-1], t_out.hidden_states[-1],
                                      attention_mask, lm_labels, p)
            loss = weighted_total(losses, p)
        if self.first_losses is None:
            self.first_losses = {k: float(v.detach()) for k, v in dict(losses, total=loss).items()}
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, p.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()


def capture_first_losses(distiller):
    """Record the losses of the next Distiller step (to check both sides compute the same thing)."""
    captured = {}
    original = distiller.compute_losses

    def wrapped(*a, **kw):
        losses = original(*a, **kw)
        if not captured:
            captured.update({k: float(v.detach()) for k, v in losses.items() if k != "logits"})
            captured["total"] = float(weighted_total(losses, distiller.config).detach())
        return losses

    distiller.compute_losses = wrapped
    return captured


def timed_run(step, batches, warmup, device):
    """Warm-up steps, then the timed ones. Returns seconds and the transient peak memory in bytes.

    Memory is measured after the warm-up, so the steady state (weights, optimizer state) is
    the baseline and the figure is what one step adds at its peak: activations, logits, loss buffers,
    gradients. On CUDA from the allocator's peak; on the CPU from RSS sampled every 5 ms.
    """
    for batch in batches[:warmup]:
        step(*batch)
    sync(device)
    timed = batches[warmup:]
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        start_mem = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        for batch in timed:
            step(*batch)
        sync(device)
        seconds = time.perf_counter() - t0
        return seconds, torch.cuda.max_memory_allocated(device) - start_mem
    release_freed_host_memory()
    proc = psutil.Process()
    with PeakSampler(lambda: proc.memory_info().rss) as rss:
        t0 = time.perf_counter()
        for batch in timed:
            step(*batch)
        seconds = time.perf_counter() - t0
    return seconds, rss.peak - rss.start_value


def step_alloc_peak(step, batch, device):
    """Peak tensor memory one more step allocates (CPU: profiler; CUDA: the timed peak is already exact)."""
    if device.type != "cpu":
        return None
    release_freed_host_memory()
    return cpu_alloc_peak(lambda: step(*batch))


def loss_only(fn, inputs, p, warmup, steps, device):
    """Time and peak memory of losses + backward on fixed inputs: fn(*inputs, p); inputs[0] (student logits)
    and inputs[2] (student hidden states) require grad.

    The inputs exist before the measurement, so the peak is what the loss computation itself adds,
    gradients of the logits included.
    """
    s_logits, s_hidden = inputs[0], inputs[2]
    amp = torch.bfloat16 if p.bf16 else None

    def once():
        s_logits.grad = s_hidden.grad = None
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            total = weighted_total(fn(*inputs, p), p)
        total.backward()
        return total

    for _ in range(warmup):
        once()
    s_logits.grad = s_hidden.grad = None
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        once()
    sync(device)
    seconds = (time.perf_counter() - t0) / max(steps, 1)
    s_logits.grad = s_hidden.grad = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        value = float(once().detach())
        peak = torch.cuda.max_memory_allocated(device) - start
    else:
        release_freed_host_memory()
        result = []
        peak = cpu_alloc_peak(lambda: result.append(float(once().detach())))
        value = result[0]
    s_logits.grad = s_hidden.grad = None
    return {"ms": seconds * 1e3, "peak_bytes": peak, "loss": value}


def loss_only_inputs(batch, student, p, device):
    """Random logits and hidden states shaped like this batch's outputs; the batch's masks and labels.

    Returns the reference's inputs (full logits) and ours (the logits at the loss rows, as the step feeds
    them, and the rows).
    """
    ids, attn_mask, labels = batch[:3]
    bs, s = ids.shape
    vocab = student.config.vocab_size
    _, d = model_shape(student)
    dtype = torch.bfloat16 if p.bf16 else torch.float32
    g = torch.Generator(device=device).manual_seed(p.seed)
    s_logits = (torch.randn(bs, s, vocab, generator=g, device=device) * 2).to(dtype).requires_grad_()
    t_logits = (torch.randn(bs, s, vocab, generator=g, device=device) * 2).to(dtype)
    s_hidden = torch.randn(bs, s, d, generator=g, device=device).to(dtype).requires_grad_()
    t_hidden = torch.randn(bs, s, d, generator=g, device=device).to(dtype)
    full = (s_logits, t_logits, s_hidden, t_hidden, attn_mask, labels)
    rows = loss_rows(attn_mask, labels, p)
    selected = (s_logits.detach().flatten(0, 1)[rows].requires_grad_(), t_logits.flatten(0, 1)[rows],
                s_hidden, t_hidden, attn_mask, labels, rows)
    return full, selected


def bench_loss_only(batch, student, p, args, device):
    """The loss-only measurements of one configuration, ours and the reference; inputs freed before returning."""
    full, selected = loss_only_inputs(batch, student, p, device)
    out = {"shape": list(full[0].shape), "rows": int(selected[0].size(0))}
    for side, fn, inputs in (("ours", our_losses, selected), ("reference", reference_losses, full)):
        out[side] = loss_only(fn, inputs, p, args.loss_warmup, args.loss_steps, device)
    values = [out[k]["loss"] for k in ("ours", "reference")]
    out["same_loss"] = max(values) - min(values) <= 1e-3 * max(1.0, abs(values[1]))
    return out


# ---------------------------------------------------------------------------------------- one config


def bench_config(config_name, args, device):
    size = args.size
    torch.manual_seed(args.seed)
    teacher, student, student_type = build_models(config_name, size, args)
    vocab = student.config.vocab_size
    special = special_ids(config_name, vocab)
    mlm = config_name.startswith("bert")
    n_batches = args.warmup + args.steps
    sequences = make_sequences(n_batches, args.batch_size, args.seq_len, vocab, special, mlm, args.seed)
    teacher.to(device).eval().requires_grad_(False)
    init_state = copy.deepcopy(student.state_dict())
    result = {"config": config_name, "student_type": student_type, "vocab_size": vocab,
              "teacher_params": sum(x.numel() for x in teacher.parameters()),
              "student_params": sum(x.numel() for x in student.parameters())}

    with tempfile.TemporaryDirectory() as dump:
        # --- ours
        params = make_config(config_name, student_type, args, args.seq_len, dump)
        student.to(device)
        distiller, dataset = make_distiller(params, device, sequences, student, teacher, special)
        torch.manual_seed(args.seed)
        prepare = distiller.prepare_batch_mlm if mlm else distiller.prepare_batch_clm
        batches = [prepare(*dataset.batch_sequences([(s, len(s)) for s in batch])) for batch in sequences]
        real_tokens = sum(int(b.attention_mask.sum()) for b in batches[args.warmup:])
        n_seqs = args.batch_size * args.steps
        student.train()
        if args.compile:  # every batch shape compiles once before anything is timed
            for batch in batches:
                distiller.step(*batch)
        first = capture_first_losses(distiller)
        torch.manual_seed(args.seed)
        seconds, peak = timed_run(distiller.step, batches, args.warmup, device)
        alloc = step_alloc_peak(distiller.step, batches[-1], device)
        result["ours"] = {"seconds": seconds, "peak_step_bytes": peak, "alloc_peak_bytes": alloc,
                          "first_losses": dict(first), "host_syncs": None}
        if device.type == "cuda":
            result["ours"]["host_syncs"] = len(cuda_sync_warnings(functools.partial(distiller.step, *batches[-1])))
        del distiller, dataset
        student.to("cpu")
        del student
        release_freed_host_memory()
        if device.type == "cuda":
            torch.cuda.empty_cache()

        # --- reference: a fresh student with the same initial weights
        _, ref_student, _ = build_models(config_name, size, args)
        ref_student.load_state_dict(init_state)
        ref_student.to(device).train()
        ref = ReferenceStep(params, ref_student, teacher, num_steps=n_batches, device=device)
        torch.manual_seed(args.seed)
        seconds, peak = timed_run(ref.step, batches, args.warmup, device)
        alloc = step_alloc_peak(ref.step, batches[-1], device)
        result["reference"] = {"seconds": seconds, "peak_step_bytes": peak, "alloc_peak_bytes": alloc,
                               "first_losses": ref.first_losses}

        # --- loss only, shaped like the longest batch
        del ref
        ref_student.to("cpu")
        release_freed_host_memory()
        longest = max(batches, key=lambda b: b[0].numel())
        result["loss_only"] = bench_loss_only(longest, ref_student, params, args, device)

    for side in ("ours", "reference"):
        r = result[side]
        r["sequences_per_s"] = n_seqs / r["seconds"]
        r["tokens_per_s"] = real_tokens / r["seconds"]
    peak_flops = device_peak_flops(device, args.peak_flops)
    flops = step_flops(teacher, ref_student, batches[args.warmup:])
    result["model_flops_per_run"] = flops
    result["peak_flops"] = peak_flops
    for side in ("ours", "reference"):
        r = result[side]
        r["mfu"] = flops / r["seconds"] / peak_flops if peak_flops else None
    result["ratios"] = ratios(result)
    del teacher, ref_student
    release_freed_host_memory()
    return result


def _ratio(a, b):
    return a / b if (a is not None and b) else None


def ratios(result):
    o, r, lo = result["ours"], result["reference"], result["loss_only"]
    return {"throughput": _ratio(o["sequences_per_s"], r["sequences_per_s"]),
            "peak_step_mem": _ratio(o["peak_step_bytes"], r["peak_step_bytes"]),
            "alloc_peak": _ratio(o["alloc_peak_bytes"], r["alloc_peak_bytes"]),
            "loss_only_time": _ratio(lo["ours"]["ms"], lo["reference"]["ms"]),
            "loss_only_peak_mem": _ratio(lo["ours"]["peak_bytes"], lo["reference"]["peak_bytes"])}


# ------------------------------------------------------------------------------- FSDP2: memory per rank


def local_bytes(tensors):
    """Bytes this rank holds of these tensors: a sharded (DTensor) one counts its local shard only."""
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


def fsdp_worker(args):
    """One rank of a --fsdp_ranks launch: the Distiller with fsdp=True on args.config, warm-up and timed steps
    on pre-made batches, then this rank's memory; rank 0 writes every rank's figures to args.fsdp_worker."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = args.device == "cuda"
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl", device_id=device)
    else:
        torch.distributed.init_process_group("gloo")
    ctx = RunContext(world_size=world, global_rank=rank, local_rank=local_rank, device=device)
    config_name = args.config
    torch.manual_seed(args.seed)  # the same weights on every rank, as train.py builds them
    # On a GPU the models are built there (each rank's host memory then never holds them whole); sharding frees
    # the full copies block by block.
    with torch.device(device) if cuda else contextlib.nullcontext():
        teacher, student, student_type = build_models(config_name, args.size, args)
    teacher.eval().requires_grad_(False)
    if args.gradient_checkpointing:
        from models import enable_gradient_checkpointing

        enable_gradient_checkpointing(student)
    n_teacher, n_student = (sum(p.numel() for p in m.parameters()) for m in (teacher, student))
    vocab = student.config.vocab_size
    special = special_ids(config_name, vocab)
    sequences = make_sequences(args.warmup + args.steps, args.batch_size, args.seq_len, vocab, special,
                               config_name.startswith("bert"), args.seed)
    proc = psutil.Process()
    with tempfile.TemporaryDirectory() as dump:
        config = dataclasses.replace(make_config(config_name, student_type, args, args.seq_len, dump), fsdp=True,
                                     teacher_replicated=args.teacher_replicated, compile=False)
        distiller, dataset = make_distiller(config, device, sequences, student, teacher, special, ctx=ctx)
        del student, teacher
        prepare = distiller.prepare_batch_mlm if config.mlm else distiller.prepare_batch_clm
        batches = [prepare(*dataset.batch_sequences([(s, len(s)) for s in batch])) for batch in sequences]
        distiller.student.train()
        release_freed_host_memory()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        after_setup = torch.cuda.memory_allocated(device) if cuda else proc.memory_info().rss
        with PeakSampler(lambda: proc.memory_info().rss) as rss:
            for batch in batches[:args.warmup]:
                distiller.step(*batch)
            sync(device)
            t0 = time.perf_counter()
            for batch in batches[args.warmup:]:
                distiller.step(*batch)
            sync(device)
            seconds = (time.perf_counter() - t0) / args.steps
        after_steps = proc.memory_info().rss
        # live tensor bytes at the peak of one more step, above what exists before it (CPU: profiler)
        step_peak = step_alloc_peak(distiller.step, batches[-1], device)
        trainable = [p for p in distiller.student_lm.parameters() if p.requires_grad]
        optimizer_state = [v for state in distiller.optimizer.state.values() for v in state.values()
                           if torch.is_tensor(v)]
        mine = {
            "rank": rank, "student_bytes": local_bytes(distiller.student_lm.parameters()),
            "grad_bytes": local_bytes(trainable),  # the sharded gradients have the shape and dtype of the shards
            "optimizer_bytes": local_bytes(optimizer_state),
            "teacher_bytes": local_bytes(distiller.teacher_lm.parameters()),
            "after_setup_bytes": after_setup, "rss_peak_bytes": rss.peak, "rss_after_steps_bytes": after_steps,
            "step_alloc_peak_bytes": step_peak,
            "cuda_peak_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
            "seconds_per_step": seconds,
        }
        mine["sharded_bytes"] = sum(mine[k] for k in ("student_bytes", "grad_bytes", "optimizer_bytes",
                                                       "teacher_bytes"))
        ranks = [None] * world
        torch.distributed.all_gather_object(ranks, mine)
        if rank == 0:
            payload = {"world_size": world, "config": config_name, "size": args.size, "device": str(device),
                       "device_name": torch.cuda.get_device_name(device) if cuda else "cpu", "bf16": args.bf16,
                       "batch_size": args.batch_size, "seq_len": args.seq_len, "teacher_params": n_teacher,
                       "student_params": n_student, "teacher_replicated": args.teacher_replicated,
                       "gradient_checkpointing": args.gradient_checkpointing, "torch": torch.__version__,
                       "ranks": ranks}
            with open(args.fsdp_worker, "w") as f:
                json.dump(payload, f, indent=2)
    torch.distributed.barrier()  # no rank exits while another still finishes the last collective (train.py)
    torch.distributed.destroy_process_group()


def _worker_argv(argv):
    """This command line for the workers: without --fsdp_ranks and --json (and their values)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--fsdp_ranks", "--json"):
            skip = True
        elif not arg.startswith(("--fsdp_ranks=", "--json=")):
            out.append(arg)
    return out


def bench_fsdp_ranks(args, argv):
    """torchrun this script with --fsdp_worker on each number of ranks of args.fsdp_ranks, on this machine."""
    import socket

    results = []
    for n in args.fsdp_ranks:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "ranks.json")
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--master_addr=127.0.0.1",
                   f"--master_port={port}", os.path.abspath(__file__), "--fsdp_worker", out, *_worker_argv(argv)]
            t0 = time.time()
            subprocess.run(cmd, check=True, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"))
            with open(out) as f:
                results.append(json.load(f))
            print(f"[{n} ranks: {time.time() - t0:.0f}s]", file=sys.stderr, flush=True)
    return results


def print_fsdp_table(results):
    first = results[0]
    gpu = first["device"] != "cpu"
    print(f"\nFSDP2 per rank: {first['config']}, size {first['size']}, teacher {first['teacher_params'] / 1e6:.1f}M "
          f"and student {first['student_params'] / 1e6:.1f}M parameters, batch {first['batch_size']}, seq_len <= "
          f"{first['seq_len']}, {'bf16' if first['bf16'] else 'fp32'}, {first['device_name']}, torch {first['torch']}"
          f"{', teacher replicated' if first['teacher_replicated'] else ''}"
          f"{', gradient checkpointing' if first['gradient_checkpointing'] else ''}")
    print("MiB, the largest over the ranks. sharded = student weights + gradients + optimizer state + teacher "
          f"weights held by the rank; x = sharded / the same on {first['world_size']} rank(s). "
          + ("alloc: the CUDA allocator after setup, and its peak over the steps." if gpu else
             "step: tensor bytes one step adds at its peak (profiler): gathered units, activations, logits, "
             "gradients before their reduce-scatter. RSS: process memory after setup and at its peak over the "
             "steps (it includes ~0.4 GB of torch and transformers code, and memory the allocator keeps)."))
    header = (f"{'ranks':>5} {'student':>8} {'grads':>8} {'optim':>8} {'teacher':>8} {'sharded':>8} {'x':>5} "
              + ("" if gpu else f"{'step':>6} ") + f"{'alloc' if gpu else 'RSS':>9} {'peak':>9} {'s/step':>7}")
    print(header)
    print("-" * len(header))
    base = max(r["sharded_bytes"] for r in first["ranks"])
    for res in results:
        top = {k: max((r[k] for r in res["ranks"]), key=lambda v: -1 if v is None else v)
               for k in res["ranks"][0] if k != "rank"}
        peak = top["cuda_peak_bytes"] if gpu else top["rss_peak_bytes"]
        print(f"{res['world_size']:>5} {_mb(top['student_bytes']):>8} {_mb(top['grad_bytes']):>8} "
              f"{_mb(top['optimizer_bytes']):>8} {_mb(top['teacher_bytes']):>8} {_mb(top['sharded_bytes']):>8} "
              f"{top['sharded_bytes'] / base:>5.2f} " + ("" if gpu else f"{_mb(top['step_alloc_peak_bytes']):>6} ")
              + f"{_mb(top['after_setup_bytes']):>9} {_mb(peak):>9} "
              f"{top['seconds_per_step']:>7.2f}")
    ddp = 16 * first["student_params"] + 4 * first["teacher_params"]
    print(f"Under DDP every rank holds all of it, at any number of ranks: 16 bytes per student parameter (fp32 "
          f"weights, gradients, two AdamW moments) + 4 per teacher parameter (fp32) = {ddp / 2**20:.0f} MiB.")


# --------------------------------------------------------------------------------------------- output


def _mb(x):
    return "-" if x is None else f"{x / 2**20:.0f}"


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def print_table(results, args, device):
    mem_note = "CUDA allocator peak" if device.type == "cuda" else "RSS growth, sampled every 5 ms"
    name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"\ndevice {device}{name}, size {args.size}, batch {args.batch_size}, seq_len <= {args.seq_len}, "
          f"{args.steps} timed steps after {args.warmup} warm-up, {'bf16 autocast' if args.bf16 else 'fp32'}"
          f"{', ours compiled' if args.compile else ''}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"step peak: what a step adds at its peak above weights + optimizer state ({mem_note}); alloc peak: "
          "torch CPU allocations live at once in one step (profiler). ratio = ours / reference.")
    if args.compile:
        print("compiled: ours ran every batch once, untimed, to compile, so its 1st loss is a later step's.")
    header = (f"{'config':<18} {'side':<10} {'seq/s':>8} {'tok/s':>9} {'step peak MB':>12} {'alloc peak MB':>13} "
              f"{'MFU':>6} {'1st loss':>9}")
    print(header)
    print("-" * len(header))
    for res in results:
        for side in ("ours", "reference"):
            r = res[side]
            mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            total = (r.get("first_losses") or {}).get("total")
            print(f"{res['config'] if side == 'ours' else '':<18} {side:<10} {r['sequences_per_s']:>8.2f} "
                  f"{r['tokens_per_s']:>9.0f} {_mb(r['peak_step_bytes']):>12} {_mb(r['alloc_peak_bytes']):>13} "
                  f"{mfu:>6} {_fmt(total, '.4f'):>9}")
        q = res["ratios"]
        print(f"{'':<18} {'ratio':<10} {_fmt(q['throughput'], '.2f'):>8} {_fmt(q['throughput'], '.2f'):>9} "
              f"{_fmt(q['peak_step_mem'], '.2f'):>12} {_fmt(q['alloc_peak'], '.2f'):>13}")
    syncs = [(res["config"], res["ours"].get("host_syncs")) for res in results]
    if any(n is not None for _, n in syncs):
        print("host synchronisations in one of our steps (CUDA sync debug mode): "
              + ", ".join(f"{name} {n}" for name, n in syncs))
    if any(r["peak_flops"] for r in results):
        print(f"MFU against {results[0]['peak_flops'] / 1e12:.0f} TFLOP/s (dense bf16 peak, or --peak_flops)")

    peak_note = "CUDA allocator" if device.type == "cuda" else "profiler, CPU allocations"
    print(f"\nloss only: losses + backward on fixed random logits shaped like the longest batch; peak = memory the "
          f"computation adds ({peak_note}). ours = the step's loss function (losses.distillation_losses) on the logits "
          "at the loss rows only, what the step feeds it; reference = the original's losses on the full logits.")
    header = f"{'config':<18} {'logits':>17} {'rows':>6} {'side':<10} {'ms':>9} {'peak MB':>9} {'time ratio':>10} " \
             f"{'mem ratio':>9} {'loss':>9}"
    print(header)
    print("-" * len(header))
    for res in results:
        lo, q = res["loss_only"], res["ratios"]
        shape = "x".join(map(str, lo["shape"]))
        for side, t_ratio, m_ratio in (("ours", q["loss_only_time"], q["loss_only_peak_mem"]),
                                       ("reference", None, None)):
            r = lo[side]
            first = side == "ours"
            print(f"{res['config'] if first else '':<18} {shape if first else '':>17} "
                  f"{str(lo['rows']) if first else '':>6} {side:<10} {r['ms']:>9.1f} {_mb(r['peak_bytes']):>9} "
                  f"{_fmt(t_ratio, '.2f'):>10} {_fmt(m_ratio, '.2f'):>9} {r['loss']:>9.4f}")
        if not lo["same_loss"]:
            print(f"{'':<18} WARNING: the two loss values differ")


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Distillation step throughput and memory: ours vs the original's.")
    parser.add_argument("--config", choices=list(CONFIGS) + ["all"], default="all", help="Which configuration(s).")
    parser.add_argument("--size", choices=sorted(PRESETS), default=None,
                        help="Model sizes (default: tiny on the CPU, base on CUDA).")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="Default: cuda if available.")
    parser.add_argument("--steps", type=int, default=None, help="Timed steps (default from --size).")
    parser.add_argument("--warmup", type=int, default=None, help="Warm-up steps before timing (default from --size).")
    parser.add_argument("--loss_steps", type=int, default=None,
                        help="Timed loss-only iterations (default from --size).")
    parser.add_argument("--loss_warmup", type=int, default=1, help="Loss-only warm-up iterations.")
    parser.add_argument("--batch_size", type=int, default=None, help="Sequences per batch (default from --size).")
    parser.add_argument("--seq_len", type=int, default=None, help="Longest sequence (default from --size).")
    parser.add_argument("--vocab_size", type=int, default=None, help="Override the vocabulary (smoke tests).")
    parser.add_argument("--hidden_size", dest="hidden", type=int, default=None, help="Override the hidden size.")
    parser.add_argument("--heads", type=int, default=None, help="Override the number of attention heads.")
    parser.add_argument("--ffn", type=int, default=None, help="Override the feed-forward size.")
    parser.add_argument("--teacher_layers", type=int, default=None, help="Override the teacher depth.")
    parser.add_argument("--student_layers", type=int, default=None, help="Override the student depth.")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast for both sides (CUDA).")
    parser.add_argument("--compile", action="store_true",
                        help="train.py --compile for ours (student and teacher forwards); the batches run once "
                             "untimed first, so compilation is not timed. The reference stays eager.")
    parser.add_argument("--peak_flops", type=float, default=None, help="Device peak FLOP/s for MFU (else a table).")
    parser.add_argument("--seed", type=int, default=56, help="Seed of the models, batches, masking and dropout.")
    parser.add_argument("--json", type=str, default=None, help="Also write every figure to this JSON file.")
    parser.add_argument("--fsdp_ranks", type=str, default=None,
                        help="Comma-separated numbers of processes, e.g. 1,2,4: per-rank memory of --config under "
                             "FSDP2 on each (see the module docstring) instead of the comparison with the reference.")
    parser.add_argument("--teacher_replicated", action="store_true", help="With --fsdp_ranks: train.py's flag.")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="With --fsdp_ranks: train.py's flag.")
    parser.add_argument("--fsdp_worker", type=str, default=None, help=argparse.SUPPRESS)  # one rank, under torchrun
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    if args.size is None:
        args.size = "base" if args.device == "cuda" else "tiny"
    preset = PRESETS[args.size]
    for key in ("steps", "warmup", "loss_steps", "batch_size", "seq_len"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1 or args.seq_len < 16:
        parser.error("need --steps >= 1, --warmup >= 0, --batch_size >= 1, --seq_len >= 16")
    if args.vocab_size is not None and args.vocab_size <= 2 * max(BERT_SPECIAL.values()):
        parser.error(f"--vocab_size must be above {2 * max(BERT_SPECIAL.values())} (BERT's special ids go to 103)")
    if args.fsdp_ranks is not None or args.fsdp_worker is not None:
        if args.config == "all":
            parser.error("--fsdp_ranks measures one configuration: give --config")
        if args.compile:
            parser.error("--fsdp_ranks: --compile is not supported with FSDP")
    if args.fsdp_ranks is not None:
        try:
            args.fsdp_ranks = [int(n) for n in args.fsdp_ranks.split(",")]
        except ValueError:
            parser.error(f"--fsdp_ranks {args.fsdp_ranks}: expected comma-separated numbers, e.g. 1,2,4")
        if min(args.fsdp_ranks) < 1:
            parser.error("--fsdp_ranks: every number of ranks must be at least 1")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(map(str, argv))
    args = parse_args(argv)
    logging.getLogger("distil").setLevel(logging.WARNING)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if args.fsdp_worker:
        return fsdp_worker(args)
    if args.fsdp_ranks:
        results = bench_fsdp_ranks(args, argv)
        print_fsdp_table(results)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "fsdp": results}, f, indent=2)
        return results
    device = torch.device(args.device)
    names = CONFIGS if args.config == "all" else (args.config,)
    results = []
    for name in names:
        t0 = time.time()
        results.append(bench_config(name, args, device))
        print(f"[{name}: {time.time() - t0:.0f}s]", file=sys.stderr, flush=True)
    print_table(results, args, device)
    if args.json:
        payload = {"args": {k: v for k, v in vars(args).items()}, "device": str(device),
                   "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   "torch": torch.__version__, "threads": torch.get_num_threads(), "results": results}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
    return results


if __name__ == "__main__":
    main()
