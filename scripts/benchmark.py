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
REFERENCE step (bench/reference_step.py) is written the way the original research scripts worked: full logits from both
models, `masked_select` of the positions, KLDivLoss on softmaxes, CrossEntropyLoss on the full logits,
MSE and CosineEmbeddingLoss on `masked_select`ed tensors, backward, clip, AdamW, scheduler.

Configurations: bert_mlm (BERT teacher -> DistilBERT student, ce 5 / mlm 2 / cos 1), bert_mlm_restrict
(the same with --restrict_ce_to_mask), gpt2_clm (GPT-2 -> smaller GPT-2, ce 5 / clm 2 / cos 1).

Per configuration and side: sequences/s, real (non-padding) tokens/s, the step's transient peak memory
(above the steady state of weights and optimizer state), and a "loss only" micro-benchmark that times
losses + backward on fixed logits. On CUDA also MFU. Ratios are ours / reference: > 1 is faster for
throughput, < 1 is less memory.

--fsdp_ranks N1,N2,...: instead, for one configuration, the Distiller with --fsdp (distil/distributed) under torchrun on
N1, then N2, ... processes of this machine (gloo on the CPU, NCCL on GPUs), and per rank: the bytes it holds of
the student's weights, gradients and optimizer state and of the teacher's weights (the sharded parts, which
fall as 1/ranks), the process memory after setup and at its peak over the steps (RSS on the CPU, the CUDA
allocator on a GPU), and the time per step. Each launch runs this script with --fsdp_worker; on several nodes,
launch that yourself: torchrun --nnodes ... scripts/benchmark.py --fsdp_worker out.json <flags>.
"""
import argparse
import json
import logging
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from bench.fsdp import bench_fsdp_ranks, fsdp_worker  # noqa: E402
from bench.models import BERT_SPECIAL, CONFIGS, PRESETS  # noqa: E402
from bench.step import bench_config  # noqa: E402


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
        print(f"MFU against {results[0]['peak_flops'] / 1e12:.0f} TFLOP/s (dense bf16 peak, or --peak_flops), of the "
              "FLOPs each side executes (ours: the LM heads only at the loss rows; reference: at every position)")

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
                        help="train.py --compile for ours (each transformer block of student and teacher; also with "
                             "--fsdp_ranks); the batches run once "
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
        results = bench_fsdp_ranks(args, argv, os.path.abspath(__file__))
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
