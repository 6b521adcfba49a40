"""Host memory per rank while --fsdp sets up: the teacher loaded whole on every rank vs built on the meta device
and read shard by shard from its memory-mapped safetensors (distil/distributed/streamed_weights.py):
the peak anonymous memory
(what a rank owns; RSS also counts the file pages it maps, which the page cache shares between ranks) and RSS.

    python experiments/fsdp_host_memory.py                        # BERT-base teacher, DistilBERT student, 2 ranks
    python experiments/fsdp_host_memory.py --nproc 4 --teacher_layers 24 --hidden_size 1024 --heads 16

A teacher of the given shape with random weights is saved once (safetensors) in a temporary folder; then, for
each way of loading it, torchrun starts --nproc CPU (gloo) processes that each do what train.py --fsdp does
before training: load the teacher (models.load_teacher, with or without on_meta), build the student from its
config, and shard both (sharding.Fsdp). Each rank reports its memory before, after setup, and its peak.
"""
import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import psutil  # noqa: E402
import torch  # noqa: E402

from distil.measuring import PeakSampler  # noqa: E402

MODES = ("whole", "meta")


def _mb(n_bytes):
    return n_bytes / 2**20


def worker(args):
    """One rank: load, build and shard as train.py --fsdp does; rank 0 gathers every rank's figures."""
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    from distil.models import RowLogitsLM, TeacherLM, load_teacher
    from distil.distributed.sharding import Fsdp
    from utils import init_distributed

    ctx = init_distributed(n_gpu=0)
    before = psutil.Process().memory_info().rss
    with PeakSampler(anonymous_bytes) as anon:
        dtype = torch.bfloat16 if args.bf16 else None  # train.py --fsdp --bf16 stores the teacher in bf16
        teacher = load_teacher("bert", args.teacher_folder, mlm=True, dtype=dtype, on_meta=args.mode == "meta")
        student = DistilBertForMaskedLM(DistilBertConfig(vocab_size=args.vocab_size, dim=args.hidden_size,
                                                         n_layers=args.teacher_layers // 2, n_heads=args.heads,
                                                         hidden_dim=4 * args.hidden_size))
        plan = Fsdp(ctx, bf16=args.bf16)
        plan.shard_student(RowLogitsLM(student))
        plan.shard_teacher(TeacherLM(teacher))
    figures = {"rank": ctx.global_rank, "before": before, "after_setup": psutil.Process().memory_info().rss,
               "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # ru_maxrss: KiB on Linux
               "anon_before": anon.start_value, "anon_after_setup": anonymous_bytes(), "anon_peak": anon.peak}
    gathered = [None] * ctx.world_size
    torch.distributed.all_gather_object(gathered, figures)
    if ctx.is_master:
        with open(args.worker_out, "w") as f:
            json.dump(gathered, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def anonymous_bytes():
    """This process's anonymous resident memory (RssAnon): what it really owns. RSS also counts the pages of
    memory-mapped files it has touched, which the page cache shares between the ranks of a node."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def save_teacher(args, folder):
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.teacher_layers,
                        num_attention_heads=args.heads, intermediate_size=4 * args.hidden_size)
    model = BertForMaskedLM(config)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=2, help="Processes (ranks) per launch.")
    parser.add_argument("--teacher_layers", type=int, default=12, help="Teacher blocks (the student has half).")
    parser.add_argument("--hidden_size", type=int, default=768, help="Hidden size of both models.")
    parser.add_argument("--heads", type=int, default=12, help="Attention heads of both models.")
    parser.add_argument("--vocab_size", type=int, default=30522, help="Vocabulary size of both models.")
    parser.add_argument("--bf16", action="store_true", help="As train.py --fsdp --bf16: the teacher stored in bf16.")
    parser.add_argument("--json", type=str, default=None, help="Also write the figures to this JSON file.")
    parser.add_argument("--worker", choices=MODES, default=None, dest="mode", help=argparse.SUPPRESS)
    parser.add_argument("--teacher_folder", type=str, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker_out", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mode is not None:
        return worker(args)

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "teacher")
        n_params = save_teacher(args, folder)
        print(f"teacher: {n_params / 1e6:.1f}M parameters ({_mb(4 * n_params):.0f} MiB in fp32), {args.nproc} ranks")
        for mode in MODES:
            out = os.path.join(tmp, f"{mode}.json")
            command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
                       "--master_addr=127.0.0.1", f"--master_port={free_port()}", os.path.abspath(__file__), "--worker", mode,
                       "--teacher_folder", folder, "--worker_out", out,
                       "--teacher_layers", str(args.teacher_layers), "--hidden_size", str(args.hidden_size),
                       "--heads", str(args.heads), "--vocab_size", str(args.vocab_size)] + (["--bf16"] if args.bf16 else [])
            env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
            subprocess.run(command, check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
            with open(out) as f:
                results[mode] = json.load(f)
    print(f"MiB per rank; RSS counts the touched pages of memory-mapped files (shared by the ranks through the page "
          f"cache), anonymous memory does not")
    print(f"{'teacher loaded':<14} {'rank':>4} {'RSS before':>10} {'after setup':>11} {'peak':>6} {'anon before':>11} "
          f"{'after setup':>11} {'peak':>6}")
    for mode in MODES:
        for r in results[mode]:
            print(f"{mode:<14} {r['rank']:>4} {_mb(r['before']):>10.0f} {_mb(r['after_setup']):>11.0f} "
                  f"{_mb(r['peak']):>6.0f} {_mb(r['anon_before']):>11.0f} {_mb(r['anon_after_setup']):>11.0f} "
                  f"{_mb(r['anon_peak']):>6.0f}")
    for key, what in (("anon_peak", "anonymous memory"), ("peak", "RSS")):
        worst = {mode: max(r[key] for r in results[mode]) for mode in MODES}
        print(f"peak {what} on the busiest rank, meta / whole: {worst['meta'] / worst['whole']:.2f} "
              f"({_mb(worst['whole'] - worst['meta']):+.0f} MiB saved)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
