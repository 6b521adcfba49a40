"""FSDP2 memory per rank (scripts/benchmark.py --fsdp_ranks): one rank of the Distiller with --fsdp on pre-made
batches, measuring what it holds; and the launcher that torchruns the script on each number of ranks.
"""
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import psutil
import torch

from bench.models import build_models, special_ids
from bench.step import make_config, make_distiller, make_sequences, step_alloc_peak
from distil.measuring import PeakSampler, release_freed_host_memory, sync
from utils import RunContext

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root, above this package

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
        from distil.models import enable_gradient_checkpointing

        enable_gradient_checkpointing(student)
    n_teacher, n_student = (sum(p.numel() for p in m.parameters()) for m in (teacher, student))
    vocab = student.config.vocab_size
    special = special_ids(config_name, vocab)
    sequences = make_sequences(args.warmup + args.steps, args.batch_size, args.seq_len, vocab, special,
                               config_name.startswith("bert"), args.seed)
    proc = psutil.Process()
    with tempfile.TemporaryDirectory() as dump:
        config = dataclasses.replace(make_config(config_name, student_type, args, args.seq_len, dump), fsdp=True,
                                     teacher_replicated=args.teacher_replicated, compile=args.compile)
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


def bench_fsdp_ranks(args, argv, script):
    """torchrun `script` (scripts/benchmark.py) with --fsdp_worker on each number of ranks of args.fsdp_ranks, on this machine."""
    import socket

    results = []
    for n in args.fsdp_ranks:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "ranks.json")
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--master_addr=127.0.0.1",
                   f"--master_port={port}", script, "--fsdp_worker", out, *_worker_argv(argv)]
            t0 = time.time()
            subprocess.run(cmd, check=True, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"))
            with open(out) as f:
                results.append(json.load(f))
            print(f"[{n} ranks: {time.time() - t0:.0f}s]", file=sys.stderr, flush=True)
    return results
