"""Ours against the reference, one configuration (scripts/benchmark.py): the same models, batches, masking and seed
on both sides; the timed steps (throughput, transient peak memory), and the loss-only micro-benchmark on fixed
logits.
"""
import copy
import functools
import math
import tempfile
import time

import numpy as np
import psutil
import torch

from bench.models import build_models, device_peak_flops, model_shape, special_ids, step_flops
from distil.measuring import PeakSampler, cpu_alloc_peak, cuda_sync_warnings, release_freed_host_memory, sync
from distiller import DistillationConfig, Distiller
from lm_seqs_dataset import LmSeqsDataset
from distil.losses import distillation_losses
from distil.masking import MlmMasking, smoothed_token_probs
from bench.reference_step import ReferenceStep, reference_losses, weighted_total
from utils import RunContext

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


def our_losses(s_rows, t_rows, s_hidden, t_hidden, attn_mask, lm_labels, rows, p):
    """{name: loss} from the training step's own loss function (losses.distillation_losses), on the logits
    taken at the loss rows only (n, vocab): what Distiller.step feeds it."""
    return distillation_losses(s_rows, t_rows, s_hidden, t_hidden, attn_mask, lm_labels, rows, alpha=p.alpha,
                               temperature=p.temperature, mlm=p.mlm, restrict_ce_to_mask=p.restrict_ce_to_mask)


def loss_rows(attn_mask, lm_labels, p):
    """Flat positions whose logits some loss reads: the masked ones with restrict_ce_to_mask, else non-padding."""
    keep = (lm_labels != -100) if (p.mlm and p.restrict_ce_to_mask) else attn_mask
    return keep.flatten().nonzero().squeeze(-1)  # (n,)


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
        # No empty_cache here: the timed steps would then pay cudaMalloc again for what the warm-up had cached.
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
    timed = batches[args.warmup:]
    # MFU of the FLOPs each side executes: ours runs both LM heads only at the loss rows (fewer still with
    # --restrict_ce_to_mask), the reference at every position (which is also the usual "model FLOPs").
    executed = {"ours": step_flops(teacher, ref_student, timed, head_rows=[b.rows.numel() for b in timed]),
                "reference": step_flops(teacher, ref_student, timed)}
    result["model_flops_per_run"] = executed["reference"]
    result["peak_flops"] = peak_flops
    for side in ("ours", "reference"):
        r = result[side]
        r["executed_flops"] = executed[side]
        r["mfu"] = executed[side] / r["seconds"] / peak_flops if peak_flops else None
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
