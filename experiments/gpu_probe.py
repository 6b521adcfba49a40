"""The first minute on a GPU: what the device is and the facts the rest of experiments/gpu_checks.sh depends on.

    python experiments/gpu_probe.py --json probe.json                  # on a CUDA machine
    python experiments/gpu_probe.py --device cpu --size tiny            # the dry run (experiments/gpu_checks.sh DRY=1)

1. device: its name, the dense bf16 peak the benchmark's MFU uses for that name (bench.models), and a
   measured bf16 matmul rate against it;
2. copy stall: how long the host waits in a non_blocking host-to-device copy of a batch-sized tensor while the
   GPU is busy, from pageable and from pinned memory (a pageable copy waits for the GPU: that is why the
   training batch is pinned and the masks are built on the device);
3. attention kernel: the SDPA kernels a causal LM's forward runs eagerly, with --compile's per-block
   compilation (blocks.compile_blocks), and with the whole model compiled (what --compile used to do);
4. evaluation cost: evaluation.evaluate on a BERT-shaped masked LM, float32 and bf16 autocast, seconds and the
   CUDA allocator's peak.
"""
import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from distil.measuring import sync  # noqa: E402
from bench.models import peak_flops_of  # noqa: E402

SIZES = {  # (hidden, layers, heads, vocab, eval batch, eval length, matmul size)
    "tiny": dict(hidden=64, layers=2, heads=2, vocab=1000, eval_batch=4, eval_len=32, matmul=256),
    "base": dict(hidden=768, layers=12, heads=12, vocab=30522, eval_batch=32, eval_len=512, matmul=8192),
}


def probe_device(device, size):
    out = {"torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        props = torch.cuda.get_device_properties(device)
        out.update(name=name, capability=f"{props.major}.{props.minor}", memory_gib=props.total_memory / 2**30,
                   cuda=torch.version.cuda, table_peak_bf16=peak_flops_of(name))
    n = size["matmul"]
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 20
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    out["measured_bf16_matmul_flops"] = 2 * n**3 * reps / (time.perf_counter() - t0)
    if out.get("table_peak_bf16"):
        out["measured_over_table_peak"] = out["measured_bf16_matmul_flops"] / out["table_peak_bf16"]
    return out


def probe_copy_stall(device, size):
    """Host seconds spent in x.to(device, non_blocking=True) while a ~100 ms GPU workload is queued."""
    if device.type != "cuda":
        return {"skipped": "pinned memory needs a CUDA device"}
    shape = (size["eval_batch"], size["eval_len"])
    busy = torch.randn(4096, 4096, device=device)
    out = {}
    for kind in ("pageable", "pinned"):
        host = torch.randint(0, 1000, shape, pin_memory=kind == "pinned")
        sync(device)
        for _ in range(40):  # queue work on the GPU
            busy = busy @ busy / 64
        t0 = time.perf_counter()
        host.to(device, non_blocking=True)
        out[f"{kind}_host_ms"] = (time.perf_counter() - t0) * 1e3
        sync(device)
    return out


def _sdpa_ops(run):
    from torch.profiler import profile

    with profile() as prof:
        run()
    return sorted({e.key for e in prof.key_averages() if "attention" in e.key.lower()})


def probe_attention(device, size, backend):
    """SDPA kernels of a causal LM's forward (no padding: no mask), eager and compiled two ways."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from distil.distributed.blocks import compile_blocks
    from distil.models import RowLogitsLM

    # One block is enough to see the kernel, and keeps three compilations short.
    config = GPT2Config(vocab_size=size["vocab"], n_embd=size["hidden"], n_layer=1, n_head=size["heads"],
                        n_positions=size["eval_len"], bos_token_id=0, eos_token_id=0)
    ids = torch.randint(0, size["vocab"], (2, size["eval_len"]), device=device)
    rows = torch.arange(ids.numel(), device=device)
    amp = dict(device_type=device.type, dtype=torch.bfloat16)
    out = {}
    for mode in ("eager", "per_block", "whole_model"):
        torch._dynamo.reset()
        model = GPT2LMHeadModel(config).to(device).eval()
        lm = RowLogitsLM(model)
        if mode == "per_block":
            compile_blocks(model) if backend == "inductor" else _compile_blocks_with(model, backend)
        elif mode == "whole_model":
            lm = torch.compile(lm, dynamic=True, backend=backend)

        def forward():
            with torch.no_grad(), torch.autocast(**amp):
                lm(ids, None, rows)
            sync(device)

        forward()  # compiles
        out[mode] = _sdpa_ops(forward)
    return out


def _compile_blocks_with(model, backend):
    """compile_blocks with another backend (the dry run: inductor's code generation is slow on a CPU)."""
    from unittest import mock

    from distil.distributed.blocks import compile_blocks

    original = torch.compile
    with mock.patch.object(torch, "compile", lambda fn, **kw: original(fn, **dict(kw, backend=backend))):
        compile_blocks(model)


def probe_eval(device, size):
    """evaluation.evaluate of a BERT-shaped masked LM (random weights and tokens), fp32 and bf16 autocast."""
    from transformers import BertConfig, BertForMaskedLM

    from distil.evaluation import evaluate

    config = BertConfig(vocab_size=size["vocab"], hidden_size=size["hidden"], num_hidden_layers=size["layers"],
                        num_attention_heads=size["heads"], intermediate_size=4 * size["hidden"],
                        max_position_embeddings=size["eval_len"])
    model = BertForMaskedLM(config).to(device)
    special = {"pad_token": 0, "unk_token": 1, "cls_token": 2, "sep_token": 3, "mask_token": 4}
    g = torch.Generator().manual_seed(0)
    n = 2 * size["eval_batch"]
    data = [(torch.randint(5, size["vocab"], (size["eval_len"],), generator=g).numpy(), size["eval_len"])
            for _ in range(n)]
    out = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        kwargs = dict(mlm=True, batch_size=size["eval_batch"], device=device, special_tok_ids=special,
                      amp_dtype=dtype)
        evaluate(model, data[: size["eval_batch"]], **kwargs)  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        metrics = evaluate(model, data, **kwargs)
        sync(device)
        out[name] = {"seconds": time.perf_counter() - t0, "sequences": n, "mlm_loss": metrics["mlm_loss"],
                     "cuda_peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
                     else None}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (the dry run).")
    parser.add_argument("--size", choices=sorted(SIZES), default="base", help="Model and tensor sizes.")
    parser.add_argument("--compile_backend", default="inductor",
                        help="torch.compile backend of the attention probe (the dry run uses aot_eager).")
    parser.add_argument("--json", default=None, help="Also write the figures to this JSON file.")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available (use --device cpu for a dry run)")
    size = SIZES[args.size]
    results = {}
    for name, probe in (("device", lambda: probe_device(device, size)),
                        ("copy_stall", lambda: probe_copy_stall(device, size)),
                        ("attention", lambda: probe_attention(device, size, args.compile_backend)),
                        ("eval", lambda: probe_eval(device, size))):
        t0 = time.perf_counter()
        try:
            results[name] = probe()
        except Exception as exc:  # one probe failing must not hide the others' figures
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"{name} ({time.perf_counter() - t0:.1f} s): {json.dumps(results[name], default=str)}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
