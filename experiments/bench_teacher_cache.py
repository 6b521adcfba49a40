"""What a teacher cache costs and saves: building it, its size per token for several k, and the training step
with the cache against the same step with the live teacher (same student, batches and seed), in one run.

    python experiments/bench_teacher_cache.py --size tiny --k 8,64,512          # CPU, about a minute on 2 cores
    python experiments/bench_teacher_cache.py --size base --k 64 --steps 3

Models are benchmark_models' presets with random weights (GPT-2 shapes, the real 50,257-token vocabulary, a
causal LM so every position is cached); sequences as scripts/benchmark.py makes them. Printed per k: build
time and bytes per cached position; then step time and memory, cache (the largest k) vs live teacher, with
their ratios. Memory: the teacher's weights (resident only in the live run) and the step's transient peak
(CPU: bytes the allocator holds at once during a step, benchmarking.cpu_alloc_peak; CUDA: max allocated).
"""
import argparse
import copy
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.models import PRESETS, build_models, special_ids  # noqa: E402
from bench.step import make_config, make_distiller, make_sequences  # noqa: E402
from distil.measuring import cpu_alloc_peak, sync  # noqa: E402
from distil.models import TeacherLM  # noqa: E402
from distil.teacher_cache import TeacherCache, build_cache, cache_size_bytes  # noqa: E402
from utils import UserError, fail, set_seed  # noqa: E402

CONFIG = "gpt2_clm"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Teacher cache against the live teacher: build cost, size, step.")
    parser.add_argument("--size", choices=["tiny", "base"], default="tiny", help="benchmark_models preset.")
    parser.add_argument("--k", default="8,64,512", help="Comma-separated cache sizes; the step uses the largest.")
    parser.add_argument("--steps", type=int, default=None, help="Timed steps per side (default: the preset's).")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed steps per side first.")
    parser.add_argument("--batch_size", type=int, default=None, help="Sequences per batch (default: the preset's).")
    parser.add_argument("--seq_len", type=int, default=None, help="Longest sequence (default: the preset's).")
    parser.add_argument("--log_probs_dtype", choices=["float16", "float32"], default="float16",
                        help="Storage of the cached log-probabilities.")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="Default: cuda if available.")
    parser.add_argument("--seed", type=int, default=56, help="Seed of the models and batches.")
    parser.add_argument("--json", default=None, help="Also write the figures to this JSON file.")
    args = parser.parse_args(argv)
    p = PRESETS[args.size]
    args.steps = args.steps or p["steps"]
    args.batch_size = args.batch_size or p["batch_size"]
    args.seq_len = args.seq_len or p["seq_len"]
    args.ks = sorted({int(k) for k in args.k.split(",")})
    if args.steps < 1 or args.warmup < 0 or min(args.ks) < 1:
        raise UserError("--steps and every --k must be at least 1, --warmup at least 0")
    # build_models reads these overrides; the benchmark keeps the preset's
    args.vocab_size = args.hidden = args.heads = args.ffn = args.teacher_layers = args.student_layers = None
    args.bf16 = args.compile = False
    return args


def timed_steps(run_step, batches, warmup, device):
    """(median seconds per step, transient peak bytes of one step) of run_step(batch) over batches."""
    for batch in batches[:warmup]:
        run_step(batch)
    times = []
    for batch in batches[warmup:]:
        sync(device)
        start = time.perf_counter()
        run_step(batch)
        sync(device)
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run_step(batches[warmup])
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = cpu_alloc_peak(lambda: run_step(batches[warmup]))
    return statistics.median(times), peak


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    set_seed(args.seed)
    teacher, student, student_type = build_models(CONFIG, args.size, args)
    teacher.to(device).eval().requires_grad_(False)
    vocab = student.config.vocab_size
    special = special_ids(CONFIG, vocab)
    n_batches = args.warmup + args.steps
    sequences = make_sequences(n_batches, args.batch_size, args.seq_len, vocab, special, False, args.seed)
    work = tempfile.mkdtemp(prefix="bench_cache_")
    config = dataclasses.replace(make_config(CONFIG, student_type, args, args.seq_len, os.path.join(work, "run")),
                                 alpha_cos=0.0)  # the cache holds no hidden states: the same loss on both sides
    _, dataset = make_distiller(config, device, sequences, copy.deepcopy(student).to(device), None, special)
    n_tokens = int(sum(len(s) for batch in sequences for s in batch))
    figures = {"size": args.size, "device": str(device), "vocab": vocab, "tokens": n_tokens, "caches": {}}
    print(f"{args.size}: teacher {sum(p.numel() for p in teacher.parameters()) / 1e6:.1f}M parameters, student "
          f"{sum(p.numel() for p in student.parameters()) / 1e6:.1f}M, vocabulary {vocab}, {n_tokens} tokens "
          f"({n_batches} batches of {args.batch_size}), {device}")
    print("| k | build s | build tokens/s | bytes per position | vs fp32 logits |")
    print("|---:|---:|---:|---:|---:|")
    for k in args.ks:
        folder = os.path.join(work, f"k{k}")
        start = time.perf_counter()
        build_cache(folder, teacher_lm=TeacherLM(teacher), dataset=dataset, corpus=dataset.corpus, tokenizer=None,
                    data_file="<benchmark>", max_len=args.seq_len, vocab_size=vocab, mlm=False, k=min(k, vocab),
                    temperature=config.temperature, n_epochs=1, settings={"mlm": False}, batch_size=args.batch_size,
                    device=device, log_probs_dtype=args.log_probs_dtype)
        seconds = time.perf_counter() - start
        per_pos = cache_size_bytes(folder) / n_tokens
        figures["caches"][k] = {"build_s": seconds, "bytes_per_position": per_pos}
        print(f"| {k} | {seconds:.2f} | {n_tokens / seconds:.0f} | {per_pos:.0f} | 1/{vocab * 4 / per_pos:.0f} |")

    cache = TeacherCache(os.path.join(work, f"k{args.ks[-1]}"))
    batches = [dataset.batch_sequences([dataset[i] for i in range(b * args.batch_size, (b + 1) * args.batch_size)])
               for b in range(n_batches)]
    indices = [torch.arange(b * args.batch_size, (b + 1) * args.batch_size) for b in range(n_batches)]

    live, _ = make_distiller(config, device, sequences, copy.deepcopy(student).to(device), teacher, special)
    live.student.train()
    live_time, live_peak = timed_steps(lambda b: live.step(*live.prepare_batch_clm(*b)), batches, args.warmup, device)
    del live
    cached, _ = make_distiller(config, device, sequences, copy.deepcopy(student).to(device), None, special)
    cached.student.train()
    order = {id(b): i for i, b in enumerate(batches)}

    def cached_step(b):
        batch, rows = cache.prepare_batch(*b, indices[order[id(b)]], 0, device)
        cached.step(*batch, teacher_rows=rows)

    cache_time, cache_peak = timed_steps(cached_step, batches, args.warmup, device)
    teacher_bytes = sum(p.numel() * p.element_size() for p in teacher.parameters())
    figures.update(live_step_s=live_time, cache_step_s=cache_time, live_peak_bytes=live_peak,
                   cache_peak_bytes=cache_peak, teacher_weight_bytes=teacher_bytes, step_k=args.ks[-1])
    mb = 1e6
    print(f"\nstep (median of {args.steps}; cache k = {args.ks[-1]}):")
    print("| | live teacher | teacher cache | cache / live |")
    print("|---|---:|---:|---:|")
    print(f"| step time (s) | {live_time:.3f} | {cache_time:.3f} | {cache_time / live_time:.2f} |")
    if live_peak and cache_peak:
        print(f"| step transient peak (MB) | {live_peak / mb:.0f} | {cache_peak / mb:.0f} | "
              f"{cache_peak / live_peak:.2f} |")
    print(f"| teacher weights held (MB) | {teacher_bytes / mb:.0f} | 0 | 0 |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    try:
        main()
    except UserError as exc:
        fail(str(exc))
