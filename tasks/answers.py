"""A model judged by what it generates: greedy answers to held-out prompts scored against their references.

    exact, f1            SQuAD's exact match and token F1 (tasks/squad_metrics.py), best over a record's references
    response_perplexity  exp of the mean cross-entropy on the reference answers' tokens (the assistant turns,
                         end-of-turn token included), read with the whole conversation as context
    kl_teacher_student, top1_agreement   with a teacher, over the same tokens (distil/evaluation.py)
    answer_tokens        mean length of the generated answers; unfinished: share cut at --max_new_tokens

scripts/generate_eval.py is the command line. The examples are read once (`read_examples`); every model is
scored on the same ones, in the same batches (file order), so models compare prompt for prompt.
"""
import math
import time

import numpy as np
import torch

from distil.conversations import (ConversationError, end_of_turn_ids, prompt_ids, read_records, render_with_mask,
                                  split_prompt, to_messages)
from distil.evaluation import evaluate
from distil.generation import generate
from distil.models import framing_token_ids
from lm_seqs_dataset import BinarizedCorpus, LmSeqsDataset
from tasks.squad_metrics import squad_scores
from utils import special_token_ids


def read_examples(path, messages_column="messages", limit=None):
    """[{'id', 'prompt' (messages), 'references' (answers), 'conversation' (prompt + first reference)}]: the last
    assistant turn of each record is its reference; a record's 'answers' list, when present, adds the others (SQuAD
    has several gold answers a question)."""
    examples = []
    for where, record in read_records(path, "--data"):
        prompt, reference = split_prompt(to_messages(record, where, messages_column))
        if reference is None:
            raise ConversationError(f"{where}: no assistant turn to score an answer against")
        extra = record.get("answers") if isinstance(record, dict) else None
        references = [reference] + [a for a in (extra or []) if isinstance(a, str) and a != reference]
        examples.append({"id": str(record.get("id", len(examples))), "prompt": prompt, "references": references,
                         "conversation": prompt + [{"role": "assistant", "content": reference}]})
        if limit is not None and len(examples) == limit:
            break
    if not examples:
        raise ConversationError(f"--data {path}: no example in the file")
    return examples


def generated_answers(model, tokenizer, examples, *, batch_size, max_new_tokens, device):
    """Greedy answers, in order: [(text, n tokens, finished)]."""
    stop = end_of_turn_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    out = []
    for lo in range(0, len(examples), batch_size):
        batch = examples[lo: lo + batch_size]
        rollouts = generate(model, [prompt_ids(tokenizer, e["prompt"]) for e in batch], stop_ids=stop, pad_id=pad_id,
                            max_new_tokens=max_new_tokens, device=device)
        for completion, finished in zip(rollouts.completions, rollouts.finished):
            out.append((tokenizer.decode(completion, skip_special_tokens=True).strip(), len(completion), finished))
    return out


def reference_dataset(tokenizer, examples):
    """The reference conversations as a loss-masked dataset in memory: what the response metrics read."""
    ids, masks = [], []
    for e in examples:
        seq, mask, _ = render_with_mask(tokenizer, e["conversation"], where=f"example {e['id']}")
        ids.append(np.asarray(seq, dtype=np.int64))
        masks.append(mask.astype(np.uint8))
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in ids], out=offsets[1:])
    corpus = BinarizedCorpus(np.concatenate(ids), offsets, {}, "<references>", np.concatenate(masks))
    special = framing_token_ids(special_token_ids(tokenizer), False)
    return LmSeqsDataset(corpus, special_tok_ids=special, mlm=False, max_len=int(offsets[-1]) + 1), special


def score_model(model, tokenizer, examples, *, teacher=None, batch_size=8, max_new_tokens=64, device="cpu"):
    """({metric: value}, [per-example predictions]) of one model; see the module docstring."""
    device = torch.device(device)
    start = time.time()
    answers = generated_answers(model, tokenizer, examples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                device=device)
    generation_s = time.time() - start
    scores = squad_scores({e["id"]: e["references"] for e in examples},
                          {e["id"]: text for e, (text, _, _) in zip(examples, answers)})
    dataset, special = reference_dataset(tokenizer, examples)
    # with a teacher, logits are compared over the tokenizer's ids (an embedding matrix may be padded beyond them)
    response = evaluate(model, dataset, mlm=False, batch_size=batch_size, device=device, special_tok_ids=special,
                        teacher=teacher, vocab_size=len(tokenizer) if teacher is not None else None)
    metrics = {"exact": scores["exact"], "f1": scores["f1"], "n_examples": len(examples),
               "response_perplexity": response["perplexity"], "response_tokens": response["n_tokens"],
               "answer_tokens": float(np.mean([n for _, n, _ in answers])),
               "unfinished": float(np.mean([not f for _, _, f in answers])), "generation_s": round(generation_s, 2)}
    if teacher is not None:
        metrics["kl_teacher_student"] = response["kl_teacher_student"]
        metrics["top1_agreement"] = response["top1_agreement"]
    predictions = [{"id": e["id"], "prediction": text, "references": e["references"], "finished": finished}
                   for e, (text, _, finished) in zip(examples, answers)]
    return metrics, predictions


def format_table(rows, columns=("exact", "f1", "response_perplexity", "kl_teacher_student", "answer_tokens",
                                "unfinished")):
    """A Markdown table: one row per (name, metrics)."""
    present = [c for c in columns if any(c in m for _, m in rows)]
    lines = ["| model | " + " | ".join(present) + " |", "|---" * (len(present) + 1) + "|"]
    for name, metrics in rows:
        cells = []
        for c in present:
            value = metrics.get(c)
            cells.append("" if value is None else f"{value:.2f}" if abs(value) < 1e6 and not math.isinf(value)
                         else f"{value:.3g}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
