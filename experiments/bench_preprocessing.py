"""Speed of the data preparation: tokenizing/binarizing, counting tokens, building the training index.

    python experiments/bench_preprocessing.py --text ../shared/data/wikitext-2/valid.txt \
        --tokenizer ../shared/tokenizers/bert-base-uncased --repeat 20 --synthetic_tokens 1e9 --json prep.json

Figures (lines/s count the non-empty lines, which are the sequences written):
  (i)   bare Rust tokenizer: one `backend_tokenizer.encode_batch_fast(lines)` call on all lines in memory
  (ii)  our scripts/binarized_data.py binarize(), end to end: read the file, tokenize, frame, write
  (iii) the original's way: a Python loop, one `tokenizer.encode("[CLS] line [SEP]")` per line, with the
        pure-Python tokenizer where transformers still has one (BertTokenizerLegacy); transformers 5 has
        none for byte-level BPE, so there only (iii-fast) is measured
  (iii-fast) the same one-line-at-a-time loop with the Rust-backed tokenizer
  (iv)  token counts: scripts/token_counts.py count_tokens() vs a collections.Counter over every id,
        as the original did (per sequence array, Counter.update); best of 3 runs each
  (v)   --synthetic_tokens N: a synthetic uint16 corpus of N tokens is written (streamed, low memory), then
        a fresh Python process opens it and builds LmSeqsDataset over it; its wall time and peak USS
        (private memory, sampled every 10 ms) are reported. The temporary corpus is deleted afterwards.
The text is concatenated --repeat times into a temporary file first, so start-up costs do not dominate.
"""
import argparse
import collections
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

BERT_SPECIAL = {"pad_token": 0, "unk_token": 100, "cls_token": 101, "sep_token": 102, "mask_token": 103}
SYNTHETIC_VOCAB = 30522
_SYNTHETIC_CHUNK = 1 << 24  # tokens generated and written at once: ~32 MB of uint16 (+ int64 temporaries)
# Classes of transformers 5 that still tokenize in pure Python, like the tokenizers the original used.
PYTHON_TOKENIZERS = {"bert": "BertTokenizerLegacy"}


# ------------------------------------------------------------------------------------------- helpers


def read_lines(path):
    """Non-empty stripped lines, decoded as binarized_data.py decodes them."""
    with open(path, "rb") as f:
        return [s for s in (raw.decode("utf-8", errors="replace").strip() for raw in f) if s]


def repeat_text(src, dst, times):
    with open(src, "rb") as f:
        data = f.read()
    if data and not data.endswith(b"\n"):
        data += b"\n"
    with open(dst, "wb") as f:
        for _ in range(times):
            f.write(data)


def timed(fn, repeat=1, runs=None):
    """(seconds, result) of fn(); with repeat > 1 the best of that many runs (for sub-second figures).

    Every run's time is appended to `runs` when given (the first one is what a one-shot script pays).
    """
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        elapsed = time.perf_counter() - t0
        best = min(best, elapsed)
        if runs is not None:
            runs.append(elapsed)
    return best, out


def python_tokenizer(tokenizer_type, folder):
    """The pure-Python tokenizer of this type, or None where transformers 5 no longer has one."""
    import transformers

    name = PYTHON_TOKENIZERS.get(tokenizer_type)
    cls = getattr(transformers, name, None) if name else None
    return cls.from_pretrained(folder) if cls is not None else None


def original_loop(tokenizer, lines, start, end):
    """The original binarized_data.py's inner loop: a string with the special tokens, encoded one by one."""
    out = []
    for line in lines:
        out.append(tokenizer.encode(f"{start} {line} {end}", add_special_tokens=False))
    return out


# ---------------------------------------------------------------------------------------- (i) - (iv)


def without_padding_or_truncation(tokenizer_type, folder, workdir):
    """(folder to use, settings found): a copy without padding/truncation when the tokenizer.json sets them.

    Some tokenizer.json files (e.g. sentence-transformers exports of bert-base-uncased) turn on fixed-length
    padding and truncation in the Rust tokenizer; encode_batch_fast then returns padded, cut sequences,
    and the timings would compare different work. The one-line loops go through transformers, which
    ignores those settings.
    """
    from distil.preprocessing import load_framing_tokenizer

    tokenizer = load_framing_tokenizer(tokenizer_type, folder, "--tokenizer")[0]
    backend = tokenizer.backend_tokenizer
    found = {"padding": backend.padding, "truncation": backend.truncation}
    if not backend.padding and not backend.truncation:
        return folder, None
    backend.no_padding()
    backend.no_truncation()
    clean = os.path.join(workdir, "tokenizer")
    tokenizer.save_pretrained(clean)
    return clean, found


def bench_tokenization(args, workdir):
    from distil.preprocessing import binarize, load_framing_tokenizer

    text = os.path.join(workdir, "text.txt")
    repeat_text(args.text, text, args.repeat)
    lines = read_lines(text)
    n = len(lines)
    folder, settings = without_padding_or_truncation(args.tokenizer_type, args.tokenizer, workdir)
    if settings:
        print(f"WARNING: {args.tokenizer}/tokenizer.json turns on padding {settings['padding']} and truncation "
              f"{settings['truncation']}, which binarize() keeps: it would write padded, truncated sequences. "
              "Benchmarking a copy without them.", file=sys.stderr)
    tokenizer, start_id, end_id, prefix = load_framing_tokenizer(args.tokenizer_type, folder, "--tokenizer")
    if tokenizer.backend_tokenizer.padding or tokenizer.backend_tokenizer.truncation:
        raise RuntimeError(f"{folder}: padding/truncation still on after saving a copy without them")
    res = {"lines": n, "bytes": os.path.getsize(text), "repeat": args.repeat,
           "tokenizer_class": type(tokenizer).__name__, "tokenizer_padding_truncation_removed": settings is not None}

    # (i) the tokenizer alone, on the exact strings binarize() hands it
    inputs = [prefix + line for line in lines] if prefix else lines
    seconds, encodings = timed(lambda: tokenizer.backend_tokenizer.encode_batch_fast(inputs, add_special_tokens=False))
    res["tokens"] = sum(len(e.ids) for e in encodings) + 2 * n
    del encodings
    res["bare_tokenizer"] = {"seconds": seconds, "lines_per_s": n / seconds}

    # (ii) ours, end to end
    seconds, bin_path = timed(lambda: binarize(text, args.tokenizer_type, folder, os.path.join(workdir, "ours")))
    res["binarize"] = {"seconds": seconds, "lines_per_s": n / seconds}

    # (iii) the original's loop; a subset with --loop_lines (the rate is what matters)
    loop_lines = lines[: args.loop_lines] if args.loop_lines else lines
    start = tokenizer.convert_ids_to_tokens(start_id)
    end = tokenizer.convert_ids_to_tokens(end_id)
    slow = python_tokenizer(args.tokenizer_type, args.tokenizer)
    if slow is not None:
        seconds, ids_slow = timed(lambda: original_loop(slow, loop_lines, start, end))
        res["original_python"] = {"seconds": seconds, "lines": len(loop_lines),
                                  "lines_per_s": len(loop_lines) / seconds, "tokenizer_class": type(slow).__name__}
    seconds, ids_fast = timed(lambda: original_loop(tokenizer, loop_lines, start, end))
    res["original_fast"] = {"seconds": seconds, "lines": len(loop_lines), "lines_per_s": len(loop_lines) / seconds,
                            "tokenizer_class": type(tokenizer).__name__}
    # The three ways must produce the same ids, or the timings compare different work.
    from lm_seqs_dataset import BinarizedCorpus

    corpus = BinarizedCorpus.open(bin_path)
    k = min(200, len(loop_lines))
    ours = [corpus.sequence(i).tolist() for i in range(k)]
    res["same_ids_fast_loop"] = ours == ids_fast[:k]
    if slow is not None:
        res["same_ids_python_loop"] = ours == ids_slow[:k]

    baseline = res.get("original_python", res["original_fast"])
    res["ratio_binarize_vs_bare"] = res["binarize"]["lines_per_s"] / res["bare_tokenizer"]["lines_per_s"]
    res["ratio_binarize_vs_original"] = res["binarize"]["lines_per_s"] / baseline["lines_per_s"]
    res["ratio_binarize_vs_original_fast"] = res["binarize"]["lines_per_s"] / res["original_fast"]["lines_per_s"]

    # (iv) token counts
    from distil.preprocessing import count_tokens

    vocab = len(tokenizer)
    runs = []
    seconds, counts = timed(lambda: count_tokens(corpus, vocab), repeat=3, runs=runs)
    res["count_tokens"] = {"seconds": seconds, "first_seconds": runs[0], "tokens": int(corpus.n_tokens),
                           "tokens_per_s": corpus.n_tokens / seconds}
    # The original held the corpus as a list of per-sequence uint16 arrays (its pickle) and counted with a
    # Counter; loading that list is not timed, as the original's unpickling is not part of counting.
    arrays = [np.array(corpus.sequence(i)) for i in range(corpus.n_sequences)]

    def counter_loop():
        counter = collections.Counter()
        for seq in arrays:
            counter.update(seq)
        out = [0] * vocab
        for k_, v in counter.items():
            out[k_] = v
        return out

    runs = []
    seconds, counter_counts = timed(counter_loop, repeat=3, runs=runs)
    res["counter_loop"] = {"seconds": seconds, "first_seconds": runs[0], "tokens_per_s": corpus.n_tokens / seconds}
    res["same_counts"] = bool(np.array_equal(counts, np.asarray(counter_counts)))
    res["ratio_count_tokens_speedup"] = res["counter_loop"]["seconds"] / res["count_tokens"]["seconds"]
    return res


# ------------------------------------------------------------------------------------------------ (v)


def write_synthetic_corpus(path, n_tokens, seed):
    """n_tokens of [CLS] random ids [SEP] sequences (lengths 20..400), streamed in chunks."""
    from lm_seqs_dataset import BinarizedWriter

    rng = np.random.default_rng(seed)
    metadata = {"tokenizer_type": "bert", "tokenizer_name": "synthetic", "special_ids": BERT_SPECIAL}
    written = 0
    with BinarizedWriter(path, vocab_size=SYNTHETIC_VOCAB, metadata=metadata) as writer:
        while written < n_tokens:
            want = min(_SYNTHETIC_CHUNK, n_tokens - written)
            lengths = rng.integers(20, 401, size=want // 20 + 1)
            ends = np.cumsum(lengths)
            lengths = lengths[: int(np.searchsorted(ends, want, side="left")) + 1]
            lengths[-1] -= int(lengths.sum()) - want  # the last sequence is cut to land on `want` exactly
            if lengths[-1] < 2:  # too short to hold [CLS] [SEP]: give its tokens to the previous sequence
                lengths = np.append(lengths[:-2], lengths[-2] + lengths[-1]) if len(lengths) > 1 else lengths
            flat = rng.integers(999, SYNTHETIC_VOCAB, size=want, dtype=np.uint16)
            ends = np.cumsum(lengths)
            flat[ends - lengths] = BERT_SPECIAL["cls_token"]
            flat[ends - 1] = BERT_SPECIAL["sep_token"]
            writer.add_flat(flat, lengths)
            written += want
    return path


def child_build_dataset(path, out_json):
    """Runs in a fresh interpreter: open the corpus and build the training index, sampling its own USS."""
    from distil.measuring import PeakSampler  # the same sampler as the step benchmark
    from lm_seqs_dataset import BinarizedCorpus, LmSeqsDataset

    logging.getLogger("distil").setLevel(logging.WARNING)
    proc = psutil.Process()
    with PeakSampler(lambda: proc.memory_full_info().uss, interval=0.01) as uss:
        t0 = time.perf_counter()
        dataset = LmSeqsDataset(BinarizedCorpus.open(path), special_tok_ids=dict(BERT_SPECIAL), mlm=True, max_len=512)
        seconds = time.perf_counter() - t0
    with open(out_json, "w") as f:
        json.dump({"seconds": seconds, "uss_before": uss.start_value, "uss_peak": uss.peak,
                   "sequences": len(dataset), "tokens": int(dataset.lengths.sum())}, f)


def bench_synthetic(n_tokens, workdir, seed):
    path = os.path.join(workdir, "synthetic.bin")
    seconds_write, _ = timed(lambda: write_synthetic_corpus(path, n_tokens, seed))
    size = os.path.getsize(path)
    out_json = os.path.join(workdir, "child.json")
    # The child's whole life is timed too (interpreter, imports), to show what a fresh train.py pays.
    cmd = [sys.executable, os.path.abspath(__file__), "--_child_build", path, "--_child_out", out_json]
    seconds_proc, proc = timed(lambda: subprocess.run(cmd, capture_output=True, text=True))
    if proc.returncode != 0:
        raise RuntimeError(f"dataset build subprocess failed:\n{proc.stderr[-3000:]}")
    with open(out_json) as f:
        child = json.load(f)
    os.remove(path)
    return {"tokens": n_tokens, "file_bytes": size, "write_seconds": seconds_write,
            "write_tokens_per_s": n_tokens / seconds_write, "build_seconds": child["seconds"],
            "process_seconds": seconds_proc, "uss_before_bytes": child["uss_before"],
            "uss_peak_bytes": child["uss_peak"], "uss_growth_bytes": child["uss_peak"] - child["uss_before"],
            "sequences": child["sequences"], "dataset_tokens": child["tokens"]}


# --------------------------------------------------------------------------------------------- output


def _rate(x):
    return f"{x:,.0f}"


def print_table(res):
    rows = []
    if "tokenization" in res:
        t = res["tokenization"]
        print(f"\ntext: {t['lines']:,} non-empty lines, {t['tokens']:,} tokens, {t['bytes'] / 2**20:.1f} MB "
              f"(x{t['repeat']}), tokenizer {t['tokenizer_class']}")
        for name, key in (("(i)   bare encode_batch_fast", "bare_tokenizer"),
                          ("(ii)  ours: binarize() end to end", "binarize")):
            rows.append((name, t[key]["seconds"], t[key]["lines_per_s"], ""))
        if "original_python" in t:
            o = t["original_python"]
            rows.append((f"(iii) original loop, {o['tokenizer_class']}", o["seconds"], o["lines_per_s"],
                         f"{o['lines']:,} lines"))
        o = t["original_fast"]
        rows.append((f"(iii) original loop, {o['tokenizer_class']} (Rust)", o["seconds"], o["lines_per_s"],
                     f"{o['lines']:,} lines"))
        print(f"{'step':<46} {'seconds':>9} {'lines/s':>12}")
        for name, sec, rate, note in rows:
            print(f"{name:<46} {sec:>9.2f} {_rate(rate):>12}  {note}")
        print(f"ratio (ii)/(i)   ours vs bare tokenizer:      {t['ratio_binarize_vs_bare']:.2f}")
        print(f"ratio (ii)/(iii) ours vs original loop:       {t['ratio_binarize_vs_original']:.1f}x"
              f"   (vs the Rust one-line loop: {t['ratio_binarize_vs_original_fast']:.1f}x)")
        same = [t["same_ids_fast_loop"], t.get("same_ids_python_loop", True)]
        print(f"same ids from all ways (first 200 lines):     {all(same)}")
        c, k = t["count_tokens"], t["counter_loop"]
        print(f"(iv)  count_tokens {c['seconds']:.3f}s ({_rate(c['tokens_per_s'])} tokens/s) vs Counter loop "
              f"{k['seconds']:.2f}s ({_rate(k['tokens_per_s'])} tokens/s): "
              f"{t['ratio_count_tokens_speedup']:.1f}x faster, same counts: {t['same_counts']}  (best of 3; first "
              f"runs {c['first_seconds']:.3f}s vs {k['first_seconds']:.2f}s)")
    if "synthetic" in res:
        s = res["synthetic"]
        print(f"(v)   synthetic corpus {s['tokens']:,} tokens ({s['file_bytes'] / 2**30:.2f} GiB) written in "
              f"{s['write_seconds']:.1f}s; LmSeqsDataset in a fresh process: build {s['build_seconds']:.2f}s "
              f"(process {s['process_seconds']:.1f}s), {s['sequences']:,} sequences, peak USS "
              f"{s['uss_peak_bytes'] / 2**20:.0f} MB ({s['uss_growth_bytes'] / 2**20:+.0f} MB over "
              f"{s['uss_before_bytes'] / 2**20:.0f} MB after imports)")


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Preprocessing speed: binarize, count tokens, build the dataset.")
    parser.add_argument("--text", type=str, default=None, help="A text file, one sequence per line.")
    parser.add_argument("--tokenizer", type=str, default=None, help="A tokenizer folder (or hub name).")
    parser.add_argument("--tokenizer_type", choices=["bert", "roberta", "gpt2"], default="bert",
                        help="As binarized_data.py --tokenizer_type.")
    parser.add_argument("--repeat", type=int, default=1, help="Concatenate the text this many times first.")
    parser.add_argument("--loop_lines", type=int, default=0,
                        help="Time the one-line-at-a-time loops on this many lines only (0: all).")
    parser.add_argument("--synthetic_tokens", type=float, default=0,
                        help="Also time building LmSeqsDataset over a synthetic corpus of this many tokens (e.g. 1e9).")
    parser.add_argument("--tmp_dir", type=str, default=None, help="Where the temporary files go (default: system).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the synthetic corpus.")
    parser.add_argument("--json", type=str, default=None, help="Also write every figure to this JSON file.")
    parser.add_argument("--_child_build", type=str, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_child_out", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child_build is None:
        if (args.text is None) != (args.tokenizer is None):
            parser.error("--text and --tokenizer go together")
        if args.text is None and not args.synthetic_tokens:
            parser.error("nothing to do: give --text and --tokenizer, and/or --synthetic_tokens")
        if args.text is not None and not os.path.isfile(args.text):
            parser.error(f"--text {args.text}: no such file")
        if args.text is not None:
            from distil.preprocessing import check_text_file, load_framing_tokenizer
            from utils import fail

            try:
                check_text_file(args.text, "--text")
                load_framing_tokenizer(args.tokenizer_type, args.tokenizer, "--tokenizer")  # now, not after timing
            except ValueError as exc:
                fail(str(exc))
        if args.repeat < 1 or args.loop_lines < 0 or args.synthetic_tokens < 0:
            parser.error("--repeat must be >= 1, --loop_lines and --synthetic_tokens >= 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args._child_build is not None:
        child_build_dataset(args._child_build, args._child_out)
        return None
    logging.getLogger("distil").setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the one-line loops warn about every line longer than 512 tokens
    res = {"args": {k: v for k, v in vars(args).items() if not k.startswith("_")}}
    workdir = tempfile.mkdtemp(prefix="bench_prep_", dir=args.tmp_dir)
    try:
        if args.text is not None:
            res["tokenization"] = bench_tokenization(args, workdir)
        if args.synthetic_tokens:
            res["synthetic"] = bench_synthetic(int(args.synthetic_tokens), workdir, args.seed)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print_table(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
