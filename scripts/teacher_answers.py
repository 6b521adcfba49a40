"""Have a model (the teacher) answer every prompt of a file: sequence-level KD's data (Kim & Rush, 2016).

    python scripts/teacher_answers.py --model models/smollm2 --prompts data/squad_train.jsonl \
        --output data/squad_train.teacher.jsonl --max_new_tokens 64

Reads the formats scripts/binarized_chat.py reads (messages, or prompt / completion); a conversation's last
assistant turn, when it has one, is dropped from the prompt and kept as "reference". Writes one JSON line a
prompt, in the input's order: {"messages": prompt + the model's answer, "reference": ..., "finished": whether the
answer ended with the template's end-of-turn token rather than at --max_new_tokens}: a file binarized_chat.py
reads. Generation is batched over the KV cache, greedy unless --do_sample. Interrupted, the same command resumes
after the last complete batch; the batches and their seeds (from --seed and the batch's first prompt) are fixed
by the input order, so a resumed run writes the same lines as an uninterrupted one.

In the same pass (distil/answer_cache.py), --dump_file also writes the corpus binarized_chat.py would write from
--output, and --cache_dir the teacher's top-k over its answer tokens for train.py --teacher_cache, from the
logits the generation computed (no second teacher forward):

    python scripts/teacher_answers.py --model models/smollm2 --prompts data/squad_train.jsonl \
        --output data/squad_train.teacher.jsonl --max_new_tokens 64 \
        --dump_file data/squad_train.teacher --max_seq_length 512 --cache_dir cache/squad-teacher --k 64
"""
import argparse
import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from distil.conversations import (ConversationError, end_of_turn_ids, prompt_ids, read_records,  # noqa: E402
                                  split_prompt, to_messages)
from distil.answer_cache import SamePass  # noqa: E402
from distil.generation import generate, load_chat_lm, seeded_generator  # noqa: E402
from distil.models import max_input_size  # noqa: E402
from lm_seqs_dataset import MIN_SEQ_LEN  # noqa: E402
from utils import UserError, fail, logger  # noqa: E402

# what a resumed run must share with the run that wrote the first lines
SETTINGS = ("model", "prompts", "max_new_tokens", "batch_size", "do_sample", "temperature", "top_p", "seed",
            "messages_column", "dump_file", "max_seq_length", "cache_dir", "k", "cache_temperature", "log_probs_dtype")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Generate a model's answers to every prompt of a file.")
    parser.add_argument("--model", required=True, help="Model folder (a causal LM with its tokenizer and chat "
                                                      "template; scripts/convert_gguf.py makes one from a GGUF).")
    parser.add_argument("--prompts", required=True, help="Conversations or prompt / completion records (.jsonl, "
                                                         ".json or .parquet).")
    parser.add_argument("--output", required=True, help="The JSON Lines file to write (or to finish).")
    parser.add_argument("--max_new_tokens", type=int, default=128, help="Longest answer, in tokens.")
    parser.add_argument("--batch_size", type=int, default=8, help="Prompts generated together.")
    parser.add_argument("--do_sample", action="store_true", help="Sample (--temperature, --top_p) instead of "
                                                                 "greedy decoding.")
    parser.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature (with --do_sample).")
    parser.add_argument("--top_p", type=float, default=1.0, help="Nucleus sampling mass (with --do_sample).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the sampling draws.")
    parser.add_argument("--messages_column", default="messages", help="The field holding the message list.")
    parser.add_argument("--max_prompts", type=int, default=None, help="Answer only the first N prompts.")
    parser.add_argument("--n_gpu", type=int, default=1, help="0: run on the CPU even when a GPU is there.")
    parser.add_argument("--force", action="store_true", help="Start over, replacing --output (and --cache_dir).")
    same = parser.add_argument_group("the same pass: corpus and teacher cache of the answers")
    same.add_argument("--dump_file", default=None,
                      help="Also write the corpus binarized_chat.py would write from --output: '<dump_file>."
                           "<model folder's name>.bin' (a loss mask on the answers).")
    same.add_argument("--max_seq_length", type=int, default=1024,
                      help="With --dump_file: as binarized_chat.py's (a longer conversation is cut at a turn "
                           "boundary or dropped); with --cache_dir also the cache's, train.py's --max_seq_length.")
    same.add_argument("--cache_dir", default=None,
                      help="With --dump_file: also write the teacher cache of that corpus (train.py --teacher_cache) "
                           "from the generation's own logits.")
    same.add_argument("--k", type=int, default=64, help="With --cache_dir: teacher ids kept per position.")
    same.add_argument("--cache_temperature", type=float, default=2.0,
                      help="With --cache_dir: train.py's --temperature (cache_teacher.py's --temperature); "
                           "independent of the sampling --temperature.")
    same.add_argument("--log_probs_dtype", choices=["float16", "float32"], default="float16",
                      help="With --cache_dir: storage of the log-probabilities, as cache_teacher.py's.")
    return parser.parse_args(argv)


def check_same_pass_flags(args):
    """One-line errors for the --dump_file / --cache_dir combinations that cannot work."""
    if args.cache_dir and not args.dump_file:
        raise UserError("--cache_dir needs --dump_file: the cache indexes the corpus written in the same pass")
    if args.dump_file and args.max_seq_length < MIN_SEQ_LEN:
        raise UserError(f"--max_seq_length must be at least {MIN_SEQ_LEN} (train.py drops shorter sequences)")
    if args.cache_dir and args.k < 1:
        raise UserError(f"--k must be at least 1, got {args.k}")
    if args.cache_dir and args.cache_temperature <= 0:
        raise UserError("--cache_temperature must be > 0")


def read_prompts(path, messages_column, limit=None):
    """[(prompt messages, reference or None)] of every record, checked."""
    out = []
    for where, record in read_records(path, "--prompts"):
        messages, reference = split_prompt(to_messages(record, where, messages_column))
        if not messages or messages[-1]["role"] == "assistant":
            raise ConversationError(f"{where}: nothing to answer (the prompt must end with a user turn)")
        out.append((messages, reference))
        if limit is not None and len(out) == limit:
            break
    if not out:
        raise ConversationError(f"--prompts {path}: no prompt in the file")
    return out


def resume_point(args, settings, check=None):
    """How many prompts --output already answers (a whole number of batches), after checking it was written with
    the same settings (and calling check(), when given, before anything is cut); a partial last batch is cut off
    the file."""
    meta_path = args.output + ".settings.json"
    if args.force or not os.path.exists(args.output):
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w"):
            pass
        with open(meta_path, "w") as f:
            json.dump(settings, f, indent=1, sort_keys=True)
        return 0
    if not os.path.exists(meta_path):
        raise UserError(f"--output {args.output} exists but not {meta_path}: not written by this command; "
                        "give --force to replace it")
    with open(meta_path) as f:
        previous = json.load(f)
    changed = [k for k in SETTINGS if previous.get(k) != settings[k]]
    if changed:
        raise UserError(f"--output {args.output} was started with other settings ({', '.join(changed)}); "
                        "give the same ones to resume, or --force to start over")
    if check is not None:
        check()
    with open(args.output, "rb") as f:
        n_lines = f.read().count(b"\n")  # a line cut by a crash is dropped
    return keep_lines(args.output, n_lines - n_lines % args.batch_size)


def keep_lines(path, n):
    """Cut a JSON Lines file to its first n whole lines (a no-op when that is what it holds); returns n."""
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")[:n]
    kept = b"".join(line + b"\n" for line in lines)
    if kept != data:
        with open(path, "wb") as f:
            f.write(kept)
    return n


def main(argv=None):
    import torch
    from tqdm import tqdm

    args = parse_args(argv)
    for flag in ("max_new_tokens", "batch_size"):
        if getattr(args, flag) < 1:
            fail(f"--{flag} must be at least 1")
    if args.do_sample and (args.temperature <= 0 or not 0 < args.top_p <= 1):
        fail("--temperature must be > 0 and --top_p in (0, 1] with --do_sample")
    try:
        check_same_pass_flags(args)
        prompts = read_prompts(args.prompts, args.messages_column, args.max_prompts)
        model, tokenizer = load_chat_lm(args.model, "--model")
        stop = end_of_turn_ids(tokenizer)
        if args.cache_dir and args.max_seq_length > max_input_size(model.config, tokenizer):
            raise UserError(f"--max_seq_length {args.max_seq_length} is longer than --model accepts "
                            f"({max_input_size(model.config, tokenizer)} tokens)")
        settings = {k: getattr(args, k) for k in SETTINGS}
        device = torch.device("cuda" if args.n_gpu > 0 and torch.cuda.is_available() else "cpu")
        same_pass = None
        if args.dump_file:
            same_pass = SamePass(model=model, tokenizer=tokenizer, model_name=args.model, output=args.output,
                                 dump_file=args.dump_file, cache_dir=args.cache_dir,
                                 max_seq_length=args.max_seq_length, k=min(args.k, model.config.vocab_size),
                                 temperature=args.cache_temperature, log_probs_dtype=args.log_probs_dtype,
                                 device=device)
            if args.force or not os.path.exists(args.output):
                same_pass.check_fresh_outputs(args.force)
        start = resume_point(args, settings, same_pass.check_unfinished if same_pass is not None else None)
        if same_pass is not None:  # the answers and the corpus / cache parts resume at the same batch
            start = keep_lines(args.output, same_pass.start(start))
    except (UserError, ConversationError) as exc:
        fail(str(exc))
    model.to(device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    temperature = args.temperature if args.do_sample else 0.0
    if start:
        logger.info("Resuming: %d of %d prompts already answered in %s", start, len(prompts), args.output)
    t0, n_tokens = time.time(), 0
    bar = tqdm(total=len(prompts), initial=start, desc="answers", unit=" prompts", disable=None, mininterval=2)
    with open(args.output, "a", encoding="utf-8") as out:
        for lo in range(start, len(prompts), args.batch_size):
            batch = prompts[lo: lo + args.batch_size]
            ids = [prompt_ids(tokenizer, messages) for messages, _ in batch]
            rollouts = generate(model, ids, stop_ids=stop, pad_id=pad_id, max_new_tokens=args.max_new_tokens,
                                temperature=temperature, top_p=args.top_p, generator=seeded_generator(args.seed, lo),
                                device=device, score=same_pass.score if args.cache_dir else None)
            lines, conversations = [], []
            for (messages, reference), completion, finished in zip(batch, rollouts.completions, rollouts.finished):
                n_tokens += len(completion)
                answer = tokenizer.decode(completion, skip_special_tokens=True).strip()
                conversations.append(messages + [{"role": "assistant", "content": answer}])
                lines.append(json.dumps({"messages": conversations[-1], "reference": reference,
                                         "finished": finished}) + "\n")
            if same_pass is not None:  # its part first: answer lines without one are answered again on resume
                try:
                    same_pass.add_batch(lo, conversations, ids, rollouts)
                except ConversationError as exc:
                    fail(str(exc))
            out.write("".join(lines))  # one write a batch: a crash leaves whole batches (and at most a cut line)
            out.flush()
            bar.update(len(batch))
    bar.close()
    elapsed = time.time() - t0
    logger.info("%d answers (%d new tokens in %.1fs, %.1f tokens/s) -> %s", len(prompts) - start, n_tokens, elapsed,
                n_tokens / max(elapsed, 1e-9), args.output)
    if same_pass is not None:
        try:
            same_pass.finish(len(prompts))
        except UserError as exc:
            fail(str(exc))


if __name__ == "__main__":
    logging.getLogger("transformers").setLevel(logging.ERROR)
    main()
