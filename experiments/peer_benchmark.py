"""Our distillation step against TRL's GKDTrainer (the peer a user would otherwise pick), on the same work.

    python experiments/peer_benchmark.py --shape toy --steps 6 --warmup 2            # ~5 min on 2 CPU cores
    python experiments/peer_benchmark.py --shape smollm2 --batch_size 2 --steps 3 --warmup 1 --runs 1
    python experiments/peer_benchmark.py --shape toy --sides ours --steps 3          # without trl installed
    python experiments/peer_benchmark.py --shape toy --profile --steps 3 --warmup 1 --runs 1

The same work on both sides: forward KL(teacher || student) at temperature 1 alone (our --alpha_ce 1
--alpha_clm 0 --temperature 1; GKD with lmbda 0 (no on-policy generation), beta 0 (forward KL), seq_kd off),
at the same positions (every position that has a next token: GKD shifts its labels, so each sequence's last
position carries no loss on either side), fp32, no gradient checkpointing, AdamW with the same settings
(lr 5e-4, betas 0.9/0.98, eps 1e-6, no weight decay, clip 5.0, linear schedule with the same warm-up) and
batch size, on the same models (built from the same seed: the same weights, checked by a checksum) and the
same batches in the same order (pre-made token ids of fixed length, so there is no padding and no data
loading in the timed steps). Ours is `Distiller.step`, what train.py runs; TRL's is its own training loop
(`trainer.train()`), timed per optimizer step by a callback.

Each side runs in its own process (so the memory of one never hides the other's), interleaved: ours, TRL,
ours, TRL, ... (--runs pairs), and the figure of a side is the median over all its steady steps (those after
--warmup). Memory is the process's RSS: "rise" is its peak during training above its value just before the
first step (models, data and optimizer built; AdamW's moments are created by the first step on both sides),
"peak" the highest RSS of the run. Both sides' processes inherit the environment, so glibc's malloc settings
(MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_) set in the shell apply to both (docs/performance.md).

Shapes: "toy", a Llama pair (teacher 8 layers, student 4, width 256, FFN 1,024, 4 heads, vocabulary 8,192),
length 256, batch 8; "smollm2", SmolLM2-135M-Instruct's configuration (vocabulary 49,152, width 576, FFN 1,536,
9 heads / 3 KV heads, 30 layers, tied embeddings) as the teacher of a 15-layer student of the same width,
length 256. Weights are random (seeded): the step's time and memory do not depend on their values.

The machine's limit: the step's FLOPs (bench.models.step_flops: teacher forward, student forward and
backward, attention included) per second, against torch.mm's rate at the models' own matmul shapes measured in
the same run with the same threads; the ratio is the step's fraction of matmul throughput.

What TRL cannot express, so it is not compared: a temperature in the loss (GKDTrainer's loss always runs at
temperature 1; its `temperature` is the sampling temperature of on-policy generation), and a hard-label
cross-entropy term beside the KD term (our --alpha_clm / --alpha_mlm; GKD's loss is the divergence alone).
"""
import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import psutil
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from distil.measuring import PeakSampler, SavedForBackward, release_freed_host_memory  # noqa: E402
from utils import UserError, fail  # noqa: E402

TRL_MISSING = ("trl is not installed: this benchmark compares with TRL's GKDTrainer (pip install trl==1.16.0; "
               "an optional dependency), or run --sides ours for our side alone")
SHAPES = {
    "toy": dict(vocab=8192, hidden=256, ffn=1024, heads=4, kv_heads=4, teacher_layers=8, student_layers=4,
                tied=False, rope_theta=10000.0, seq_len=256, batch_size=8),
    "smollm2": dict(vocab=49152, hidden=576, ffn=1536, heads=9, kv_heads=3, teacher_layers=30, student_layers=15,
                    tied=True, rope_theta=100000.0, seq_len=256, batch_size=8),
}
# The AdamW / schedule settings of both sides: train.py's defaults (Distiller._setup_optimizer).
LR, BETAS, EPS, WEIGHT_DECAY, MAX_GRAD_NORM, WARMUP_PROP = 5e-4, (0.9, 0.98), 1e-6, 0.0, 5.0, 0.05


def shape_of(args):
    s = dict(SHAPES[args.shape])
    for key in ("vocab", "hidden", "ffn", "heads", "kv_heads", "teacher_layers", "student_layers", "seq_len",
                "batch_size"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    return s


def build_models(s, seed):
    """(teacher, student): Llama models with random weights drawn from `seed` (the same in every process)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def config(layers):
        return LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["ffn"],
                           num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                           num_hidden_layers=layers, max_position_embeddings=max(512, s["seq_len"]),
                           tie_word_embeddings=s["tied"], rope_theta=s["rope_theta"], rms_norm_eps=1e-5,
                           bos_token_id=1, eos_token_id=2, pad_token_id=0)

    torch.manual_seed(seed)
    teacher = LlamaForCausalLM(config(s["teacher_layers"]))
    student = LlamaForCausalLM(config(s["student_layers"]))
    teacher.eval().requires_grad_(False)
    return teacher, student


def make_batches(n, s, seed):
    """n batches of (batch_size, seq_len) token ids, Zipf-distributed, no padding."""
    rng = np.random.default_rng(seed)
    ids = 3 + (rng.zipf(1.2, size=(n, s["batch_size"], s["seq_len"])) - 1) % (s["vocab"] - 3)
    return [torch.from_numpy(b.astype(np.int64)) for b in ids]


def checksum(model):
    return float(sum(p.detach().double().sum() for p in model.parameters()))


# ------------------------------------------------------------------------------------------------ ours


def run_ours(s, batches, args, record):
    """train.py's step (Distiller.step) on the batches; fills record's per-step times and losses."""
    from bench.step import make_distiller
    from distiller import DistillationConfig, Distiller
    from distil.masking import Batch

    Distiller.fuse_head = not args.unfused_head
    teacher, student = build_models(s, args.seed)
    record["student_checksum"] = checksum(student)
    bs, seq = s["batch_size"], s["seq_len"]
    special = {"bos_token": 1, "eos_token": 2, "unk_token": 2, "pad_token": 0}
    sequences = [[row.numpy() for row in b] for b in batches]
    with tempfile.TemporaryDirectory() as dump:
        config = DistillationConfig(
            dump_path=dump, mlm=False, student_type="auto", temperature=1.0, alpha_ce=1.0, alpha_clm=0.0,
            batch_size=bs, gradient_accumulation_steps=1, n_epoch=1, warmup_prop=WARMUP_PROP,
            weight_decay=WEIGHT_DECAY, learning_rate=LR, adam_epsilon=EPS, max_grad_norm=MAX_GRAD_NORM,
            seed=args.seed, max_model_input_size=seq, group_by_size=False)
        distiller, _ = make_distiller(config, torch.device("cpu"), sequences, student, teacher, special)
        record["fused_head"] = distiller.student_lm.fused_head  # the path the step really takes
        record["warmup_steps"] = distiller.plan.warmup
        # GKD's positions: every one that has a next token (its labels are shifted), so not each row's last.
        rows = (torch.arange(bs)[:, None] * seq + torch.arange(seq - 1)[None, :]).flatten()
        mask = torch.ones(bs, seq, dtype=torch.bool)
        prepared = [Batch(ids, mask, ids, rows, False) for ids in batches]
        losses = record["losses"]
        original = distiller.compute_losses

        def compute_losses(*a, **kw):
            out = original(*a, **kw)
            losses.append(float(out["ce"]))
            return out

        distiller.compute_losses = compute_losses
        student.train()
        step = distiller.step
        if args.profile:
            return profile_steps(step, prepared, args, record)
        timed_steps(step, prepared, record)
        # one more step, untimed: what its forward leaves for the backward (the activation part of the floor)
        with SavedForBackward([*student.parameters(), *teacher.parameters()]) as saved:
            step(*prepared[-1])
        record["saved_for_backward"] = saved.bytes
        del losses[len(prepared):]
        del distiller


def timed_steps(step, batches, record):
    release_freed_host_memory()
    proc = psutil.Process()
    with PeakSampler(lambda: proc.memory_info().rss) as rss:
        for batch in batches:
            t0 = time.perf_counter()
            step(*batch)
            record["seconds"].append(time.perf_counter() - t0)
    record["rss_start"], record["rss_peak"] = rss.start_value, rss.peak


def profile_steps(step, batches, args, record):
    """Warm-up steps, then the rest under torch.profiler: the top operators by their own CPU time."""
    for batch in batches[:args.warmup]:
        step(*batch)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for batch in batches[args.warmup:]:
            step(*batch)
    record["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows,
                                                  max_name_column_width=40)


# ------------------------------------------------------------------------------------------------ TRL


def run_trl(s, batches, args, record):
    """TRL's GKDTrainer (lmbda 0, beta 0, seq_kd off) on the same batches, through its own training loop."""
    from datasets import Dataset
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    teacher, student = build_models(s, args.seed)
    record["student_checksum"] = checksum(student)
    # SFTTrainer needs a tokenizer (pad / eos ids); the batches are already token ids, so any will do.
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="</s>")),
                                        pad_token="<pad>", bos_token="<s>", eos_token="</s>")

    # One dataset item = one whole pre-made batch (batch size 1 + a collator that unwraps it), taken in order.
    dataset = Dataset.from_dict({"input_ids": [b.tolist() for b in batches]}).with_format("torch")

    def collate(items):
        ids = items[0]["input_ids"]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    losses, seconds = record["losses"], record["seconds"]
    proc = psutil.Process()
    state = {}

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **kw):
            release_freed_host_memory()
            state["sampler"] = PeakSampler(lambda: proc.memory_info().rss).__enter__()

        def on_step_begin(self, *a, **kw):
            state["t0"] = time.perf_counter()

        def on_step_end(self, *a, **kw):
            seconds.append(time.perf_counter() - state["t0"])

        def on_train_end(self, *a, **kw):
            state["sampler"].__exit__(None, None, None)

    n = len(batches)
    warmup = math.ceil(WARMUP_PROP * n)  # as Distiller's plan_steps rounds it (report() checks both agree)
    record["warmup_steps"] = warmup
    with tempfile.TemporaryDirectory() as out:
        config = GKDConfig(
            output_dir=out, lmbda=0.0, beta=0.0, seq_kd=False, temperature=1.0, gradient_checkpointing=False,
            bf16=False, fp16=False, use_cpu=True, per_device_train_batch_size=1, gradient_accumulation_steps=1,
            max_steps=n, learning_rate=LR, adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=EPS,
            weight_decay=WEIGHT_DECAY, max_grad_norm=MAX_GRAD_NORM, lr_scheduler_type="linear",
            warmup_steps=warmup, optim="adamw_torch_fused", train_sampling_strategy="sequential",
            report_to="none", save_strategy="no", logging_steps=10 ** 6, disable_tqdm=True,
            dataloader_num_workers=0, seed=args.seed, disable_dropout=True, max_length=None)
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                             data_collator=collate, processing_class=tokenizer, callbacks=[Timer()])
        original = trainer.compute_loss

        def compute_loss(*a, **kw):
            loss = original(*a, **kw)
            losses.append(float(loss.detach()))
            return loss

        trainer.compute_loss = compute_loss
        if args.profile:
            state_steps = []
            trainer.add_callback(_ProfileWindow(args.warmup, state_steps, args.profile_rows))
            trainer.train()
            record["profile"] = state_steps[0]
            return
        trainer.train()
        record["gradient_checkpointing"] = bool(trainer.model.is_gradient_checkpointing)
    record["rss_start"], record["rss_peak"] = state["sampler"].start_value, state["sampler"].peak


def _ProfileWindow(warmup, out, rows):
    """A callback that profiles TRL's steps after the warm-up ones (its loop cannot be entered step by step)."""
    from transformers import TrainerCallback

    class Window(TrainerCallback):
        prof = None

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == warmup and self.prof is None:
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                self.prof.__enter__()

        def on_train_end(self, *a, **kw):
            if self.prof is not None:
                self.prof.__exit__(None, None, None)
                out.append(self.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows,
                                                          max_name_column_width=40))

    return Window()


# ------------------------------------------------------------------------------------------------ one run


def run_side(side, args):
    """One side's run in this process: {seconds per step, losses, RSS, FLOPs per step, shapes}."""
    from bench.models import step_flops

    if args.threads:
        torch.set_num_threads(args.threads)
    s = shape_of(args)
    batches = make_batches(args.warmup + args.steps, s, args.seed)
    record = {"side": side, "seconds": [], "losses": [], "threads": torch.get_num_threads()}
    (run_ours if side == "ours" else run_trl)(s, batches, args, record)
    teacher, student = build_models(s, args.seed)
    tokens = s["batch_size"] * s["seq_len"]
    rows = s["batch_size"] * (s["seq_len"] - 1)
    # FLOPs each side executes: our LM heads run only at the loss rows, GKD's at every position.
    head_rows = [rows] if side == "ours" else None
    record["flops_per_step"] = step_flops(teacher, student, [(batches[0],)], head_rows=head_rows)
    record["tokens_per_step"] = tokens
    record["mm_flops_per_s"] = matmul_rate(s)  # right after the steps: the machine as this run saw it
    record["teacher_params"] = sum(p.numel() for p in teacher.parameters())
    record["student_params"] = sum(p.numel() for p in student.parameters())
    return record


def matmul_rate(s, repeats=3):
    """torch.mm FLOP/s at the models' matmul shapes ((tokens x in) @ (in x out) for each projection of a block and
    the LM head, weighted as one block + the head): the machine's dense fp32 rate for this work."""
    t, d, f, v = s["batch_size"] * s["seq_len"], s["hidden"], s["ffn"], s["vocab"]
    kv = d // s["heads"] * s["kv_heads"]
    shapes = [(t, d, d), (t, d, kv), (t, d, kv), (t, d, d), (t, d, f), (t, d, f), (t, f, d), (t, d, v)]
    mats = [(torch.randn(m, k), torch.randn(k, n)) for m, k, n in shapes]
    for a, b in mats:
        torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for a, b in mats:
            torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return sum(2 * m * k * n for m, k, n in shapes) / best


# ------------------------------------------------------------------------------------------------ main


def summarise(records, warmup):
    steady = [x for r in records for x in r["seconds"][warmup:]]
    sec = statistics.median(steady)
    # The fastest steady step: on a shared machine, the one the other processes disturbed least.
    return {"s_per_step": sec, "best_s_per_step": min(steady), "tokens_per_s": records[0]["tokens_per_step"] / sec,
            "flops_per_s": records[0]["flops_per_step"] / sec,
            "best_flops_per_s": records[0]["flops_per_step"] / min(steady),
            "rise": statistics.median(r["rss_peak"] - r["rss_start"] for r in records),
            "peak": max(r["rss_peak"] for r in records), "steady_steps": len(steady)}


def report(results, args, s, mm):
    mib = 2 ** 20
    load = os.getloadavg()
    first = results["ours"][0]
    print(f"\nshape {args.shape}: teacher {first['teacher_params'] / 1e6:.1f}M, student "
          f"{first['student_params'] / 1e6:.1f}M parameters, vocabulary {s['vocab']}, batch {s['batch_size']} x "
          f"{s['seq_len']} tokens, fp32, {first['threads']} threads, torch {torch.__version__}; "
          f"{len(results['ours'])} run(s) per side, interleaved, {args.steps} timed steps after {args.warmup} "
          f"warm-up; load average now {load[0]:.1f}")
    print("ours: " + ("the fused head (the loss projects the hidden rows chunk by chunk)" if first.get("fused_head")
                      else "the logits path (--unfused_head)"))
    sides = [k for k in ("ours", "trl") if results.get(k)]
    summary = {k: summarise(results[k], args.warmup) for k in sides}
    # The machine's limit: the fastest torch.mm rate any run saw (each measures it right after its steps). On a
    # shared machine a single measurement may see another load than the steps did; the fastest is the limit.
    mm = max([mm] + [r["mm_flops_per_s"] for k in sides for r in results[k]])
    header = (f"{'side':<6} {'s/step':>8} {'tokens/s':>9} {'GFLOP/s':>8} {'of mm':>6} {'best s':>7} {'of mm':>6} "
              f"{'rise MiB':>9} {'peak MiB':>9}")
    print(header)
    print("-" * len(header))
    for k in sides:
        r = summary[k]
        print(f"{k:<6} {r['s_per_step']:>8.3f} {r['tokens_per_s']:>9.0f} {r['flops_per_s'] / 1e9:>8.1f} "
              f"{100 * r['flops_per_s'] / mm:>5.0f}% {r['best_s_per_step']:>7.3f} "
              f"{100 * r['best_flops_per_s'] / mm:>5.0f}% "
              f"{r['rise'] / mib:>9.0f} {r['peak'] / mib:>9.0f}")
    state = 12 * first["student_params"]
    saved = statistics.median(r["saved_for_backward"] for r in results["ours"])
    floor = state + saved
    summary["floor"] = floor
    print(f"memory floor of the rise: the student's gradients and AdamW moments (12 bytes x "
          f"{first['student_params'] / 1e6:.1f}M parameters, {state / mib:.0f} MiB) + what our forward keeps for "
          f"the backward ({saved / mib:.0f} MiB, measured) = {floor / mib:.0f} MiB; ours rose "
          f"{summary['ours']['rise'] / floor:.2f}x it"
          + (f", TRL {summary['trl']['rise'] / floor:.2f}x" if "trl" in summary else ""))
    print(f"torch.mm at the models' shapes, same threads: {mm / 1e9:.1f} GFLOP/s, the fastest any run measured; "
          "\"of mm\": the FLOPs a step executes per second over it, at the median and at the fastest steady step")
    for k in sides:
        per_run = ", ".join(f"{statistics.median(r['seconds'][args.warmup:]):.3f}" for r in results[k])
        print(f"  {k}: median s/step per run {per_run}; losses of run 1: "
              + " ".join(f"{x:.6f}" for x in results[k][0]["losses"]))
    if "trl" in summary:
        o, t = summary["ours"], summary["trl"]
        # The load of a shared machine moves between runs: a pair (ours, then TRL right after) saw about the same.
        pairs = [statistics.median(b["seconds"][args.warmup:]) / statistics.median(a["seconds"][args.warmup:])
                 for a, b in zip(results["ours"], results["trl"])]
        summary["pair_speedups"] = pairs
        print(f"ours vs TRL, per interleaved pair (TRL's median s/step / ours): "
              + ", ".join(f"{x:.2f}x" for x in pairs) + f"; median {statistics.median(pairs):.2f}x")
        print(f"ours vs TRL, fastest steady step: {o['best_s_per_step']:.3f} s against {t['best_s_per_step']:.3f} s, "
              f"{t['best_s_per_step'] / o['best_s_per_step']:.2f}x")
        print(f"ours vs TRL, pooled (misleading when the load moves between runs: prefer the pairs): "
              f"{o['tokens_per_s'] / t['tokens_per_s']:.2f}x the tokens/s; "
              f"training-time RSS rise "
              f"{o['rise'] / t['rise']:.2f}x, peak RSS {o['peak'] / t['peak']:.2f}x")
        a, b = results["ours"][0], results["trl"][0]
        rel = abs(a["losses"][0] - b["losses"][0]) / abs(b["losses"][0])
        drift = max(abs(x - y) / abs(y) for x, y in zip(a["losses"], b["losses"]))
        same = (a["student_checksum"] == b["student_checksum"] and a["warmup_steps"] == b["warmup_steps"]
                and not b["gradient_checkpointing"])
        print(f"first-step loss: ours {a['losses'][0]:.8f}, TRL {b['losses'][0]:.8f}, relative difference "
              f"{rel:.1e} (largest over run 1's {len(b['losses'])} steps: {drift:.1e}); same initial student "
              f"weights and warm-up, TRL without gradient checkpointing: {same}")
        if rel > 1e-5 or not same:
            print("WARNING: the two sides do not compute the same first step")
        summary["first_loss_rel_diff"], summary["loss_drift"] = rel, drift
    summary["matmul_flops_per_s"] = mm
    return summary


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Our distillation step against TRL's GKDTrainer: same models, "
                                                 "batches, loss and optimizer (see the module docstring).")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="toy", help="The model pair and batch shape.")
    parser.add_argument("--steps", type=int, default=6, help="Timed (steady) steps per run.")
    parser.add_argument("--warmup", type=int, default=2, help="Steps per run before the timed ones.")
    parser.add_argument("--runs", type=int, default=2, help="Runs per side, interleaved: ours, TRL, ours, TRL, ...")
    parser.add_argument("--sides", choices=["both", "ours", "trl"], default="both", help="Which side(s) to run.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores).")
    parser.add_argument("--seed", type=int, default=56, help="Seed of the weights and the token ids.")
    parser.add_argument("--profile", action="store_true",
                        help="Instead of timing: profile the steps after --warmup (torch.profiler), top operators.")
    parser.add_argument("--profile_rows", type=int, default=15, help="With --profile: operators shown.")
    parser.add_argument("--unfused_head", action="store_true",
                        help="Run our side with the logits path (the head's logits whole, then the chunked loss) "
                             "instead of the fused head train.py uses: measures what fusing costs and saves.")
    parser.add_argument("--json", type=str, default=None, help="Also write every figure to this JSON file.")
    for key, kind in (("vocab", int), ("hidden", int), ("ffn", int), ("heads", int), ("kv_heads", int),
                      ("teacher_layers", int), ("student_layers", int), ("seq_len", int), ("batch_size", int)):
        parser.add_argument(f"--{key}", type=kind, default=None, help=f"Override the shape's {key} (smoke runs).")
    parser.add_argument("--worker", nargs=2, metavar=("SIDE", "OUT"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.runs < 1:
        raise UserError(f"need --steps >= 1, --warmup >= 0, --runs >= 1 (got {args.steps}, {args.warmup}, "
                        f"{args.runs})")
    if shape_of(args)["seq_len"] < 2:
        raise UserError("--seq_len must be at least 2 (the loss reads positions that have a next token)")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(map(str, argv))
    args = parse_args(argv)
    if args.worker:
        side, out = args.worker
        with open(out, "w") as f:
            json.dump(run_side(side, args), f)
        return None
    sides = {"both": ["ours", "trl"], "ours": ["ours"], "trl": ["trl"]}[args.sides]
    if "trl" in sides and importlib.util.find_spec("trl") is None:
        raise UserError(TRL_MISSING)
    results = {k: [] for k in sides}
    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(1 if args.profile else args.runs):
            for side in sides:
                out = os.path.join(tmp, f"{side}{i}.json")
                cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", side, out]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise UserError(f"the {side} run failed: {proc.stderr.strip().splitlines()[-1:]}")
                with open(out) as f:
                    results[side].append(json.load(f))
                if not args.profile:
                    print(f"run {i + 1} {side}: median {statistics.median(results[side][-1]['seconds']):.3f} "
                          "s/step", flush=True)
    if args.profile:
        for side in sides:
            print(f"\nprofile of {side}, {args.steps} step(s) after {args.warmup}:\n{results[side][0]['profile']}")
        return results
    s = shape_of(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    mm = matmul_rate(s)
    summary = report(results, args, s, mm)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "shape": s, "summary": summary, "runs": results}, f, indent=1)
    return summary


if __name__ == "__main__":
    try:
        main()
    except UserError as exc:
        fail(str(exc))
