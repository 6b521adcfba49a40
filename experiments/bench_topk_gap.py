"""How much of a real teacher's signal a top-k cache keeps: the distillation loss and its gradient from the top k
(plus the tail, as train.py --teacher_cache computes them) against the full distribution, for several k.

    python experiments/bench_topk_gap.py --teacher /path/to/model_folder [--gguf_file model.gguf] \
        --text ../shared/data/wikitext-2/wiki.valid.tokens --k 1,8,64,512

The teacher is any causal LM folder (a GGUF file inside it is loaded through transformers' gguf_file=,
dequantized to float32); the student is the teacher with every --keep_every-th layer kept (an extracted
student, as scripts/extract.py builds). On --n_seqs sequences of --seq_len tokens, it prints per k: the
teacher's mean top-k mass, the loss over k ids + tail relative to the full loss, and the cosine between the two
gradients w.r.t. the student's logits (1: the same training signal); log-probabilities rounded to float16, as
the cache stores them by default.
"""
import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from distil.divergences import KD_LOSSES, TopKTeacher  # noqa: E402
from distil.losses import weighted_logit_loss  # noqa: E402
from distil.teacher_cache import topk_rows  # noqa: E402
from utils import UserError, fail, load_pretrained  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Top-k cache against the full teacher distribution.")
    parser.add_argument("--teacher", required=True, help="A causal LM folder.")
    parser.add_argument("--gguf_file", default=None, help="A GGUF file in that folder to load (dequantized).")
    parser.add_argument("--text", required=True, help="A text file; its first lines are tokenized.")
    parser.add_argument("--k", default="1,8,64,512", help="Comma-separated k.")
    parser.add_argument("--n_seqs", type=int, default=4, help="Sequences measured.")
    parser.add_argument("--seq_len", type=int, default=128, help="Tokens per sequence.")
    parser.add_argument("--keep_every", type=int, default=5, help="The student keeps every N-th teacher layer.")
    parser.add_argument("--temperature", type=float, default=2.0, help="train.py's --temperature.")
    parser.add_argument("--kd_loss", choices=KD_LOSSES, default="forward_kl", help="train.py's --kd_loss.")
    return parser.parse_args(argv)


def main(argv=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = parse_args(argv)
    extra = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    teacher = load_pretrained(lambda: AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32, **extra),
                              "--teacher", args.teacher, "a causal LM").eval()
    tokenizer = load_pretrained(lambda: AutoTokenizer.from_pretrained(args.teacher, **extra), "--teacher",
                                args.teacher, "a tokenizer")
    student = copy.deepcopy(teacher)
    layers = student.model.layers
    student.model.layers = torch.nn.ModuleList(layers[i] for i in range(0, len(layers), args.keep_every))
    student.config.num_hidden_layers = len(student.model.layers)
    with open(args.text, encoding="utf-8") as f:
        ids = tokenizer(f.read(2_000_000), return_tensors="pt").input_ids[0]
    n = args.n_seqs * args.seq_len
    if len(ids) < n:
        raise UserError(f"--text {args.text}: {len(ids)} tokens, fewer than --n_seqs x --seq_len = {n}")
    batch = ids[:n].view(args.n_seqs, args.seq_len)
    with torch.no_grad():
        t_logits = teacher(batch, use_cache=False).logits.flatten(0, 1).float()  # (n, V)
        s_logits = student(batch, use_cache=False).logits.flatten(0, 1).float()
    vocab = t_logits.size(-1)

    def loss_and_grad(teacher_rows):
        s = s_logits.clone().requires_grad_(True)
        total, ce, _, _ = weighted_logit_loss(s, teacher_rows, None, args.temperature, 1.0, 0.0, 0.0,
                                              kd_loss=args.kd_loss)
        total.backward()
        return float(ce), s.grad.flatten()

    full_loss, full_grad = loss_and_grad(t_logits)
    print(f"teacher {args.teacher} ({sum(p.numel() for p in teacher.parameters()) / 1e6:.0f}M, {vocab} ids), student "
          f"{student.config.num_hidden_layers} of its {len(layers)} layers; {n} positions, T = {args.temperature}, "
          f"{args.kd_loss}: full loss {full_loss:.4f}")
    print("| k | teacher top-k mass | loss (k + tail) / full | gradient cosine |")
    print("|---:|---:|---:|---:|")
    for k in sorted({int(x) for x in args.k.split(",")} | {vocab}):
        ids_k, log_probs = topk_rows(t_logits, min(k, vocab), args.temperature)
        log_probs = log_probs.half().float()  # as the cache stores them by default
        loss, grad = loss_and_grad(TopKTeacher(ids_k, log_probs))
        mass = float((1 - log_probs[:, -1].exp()).mean())
        cosine = float(torch.nn.functional.cosine_similarity(grad.double(), full_grad.double(), dim=0))
        print(f"| {min(k, vocab)} | {mass:.3f} | {loss / full_loss:.4f} | {cosine:.4f} |")


if __name__ == "__main__":
    try:
        main()
    except UserError as exc:
        fail(str(exc))
