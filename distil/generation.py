"""Batched generation with the KV cache: prompts (token ids) in, completions and their loss masks out.

`generate` runs one forward over the left-padded prompts, then one forward a new token over the cache, greedy or
sampled (temperature, top-p) from a torch.Generator the caller seeds: the same prompts in the same batches with
the same seed give the same completions whatever ran before. A completion ends with the first end-of-turn token
(kept: the student must learn to stop) or at max_new_tokens. The only per-token Python work is the loop itself.

`load_chat_lm` loads a model folder to generate with (its tokenizer must have a chat template).
`completion_batch` lays prompt + completion rows out as train.py's batches are (right padding, a loss mask on the
completion tokens): what scripts/teacher_answers.py scores and what on-policy training (a student's own rollouts)
will train on.
"""
from typing import NamedTuple

import os

import numpy as np
import torch

from distil.conversations import ConversationError, check_chat_template
from utils import first_line


def load_chat_lm(folder, flag):
    """(model, tokenizer) of a causal LM folder, the tokenizer with a chat template; errors name the flag."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(folder):
        raise ConversationError(f"{flag} {folder}: no such folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder)
    except Exception as exc:  # a broken folder fails in many ways, all of them the folder's
        raise ConversationError(f"{flag} {folder}: cannot load a causal LM with its tokenizer "
                                f"({first_line(exc)})") from None
    check_chat_template(tokenizer, flag, folder)
    return model, tokenizer


class Rollouts(NamedTuple):
    completions: list  # per prompt: the generated ids, up to and including the end-of-turn token when reached
    finished: list  # per prompt: whether an end-of-turn token ended it (False: cut at max_new_tokens)
    # with generate(score=...): per prompt, score's output at every position whose logits the pass computed with
    # that row's own tokens in context, in sequence order (row i: the prediction of token i + 1 of prompt +
    # completion); else None
    scores: list = None


def seeded_generator(seed, *keys):
    """A CPU torch.Generator seeded from (seed, *keys) (e.g. the index of a batch's first prompt), so one batch's
    draws do not depend on the batches before it: a resumed run samples what an uninterrupted one did."""
    state = np.random.SeedSequence([int(seed), *map(int, keys)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _pick(logits, temperature, top_p, generator):
    """Next ids (bs,) from last-position logits (bs, vocab): argmax at temperature 0, else a draw from the
    temperature-scaled distribution cut to its top-p nucleus."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # mass before a token already reaches top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    # multinomial draws on the CPU from the seeded generator (the same on every device)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@torch.no_grad()
def generate(model, prompts, *, stop_ids, pad_id, max_new_tokens, temperature=0.0, top_p=1.0, generator=None,
             device="cpu", score=None):
    """Rollouts of `model` (a causal LM) for prompts (lists of ids), all in one batch.

    stop_ids: the end-of-turn ids (conversations.end_of_turn_ids); pad_id: any id (padding is masked out).
    temperature 0: greedy. The model runs in eval mode (no dropout) and is put back in its mode after.

    score: a function of raw logits (..., vocab) -> a tuple of tensors (..., *): applied to every position's
    logits the pass computes (the prompt's, then each new token's), so what a teacher forward over prompt +
    completion would give comes out of the generation itself (scripts/teacher_answers.py --cache_dir). A row's
    scores cover its prompt and every completion token the pass fed back: all but the last token of a completion
    that stopped first in its batch, one past the last when it was cut at max_new_tokens."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    device = torch.device(device)
    lengths = torch.tensor([len(p) for p in prompts])
    width = int(lengths.max())
    ids = torch.full((len(prompts), width), int(pad_id), dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):  # left padding: every prompt ends where generation starts
        ids[row, width - len(prompt):] = torch.as_tensor(prompt)
        attention[row, width - len(prompt):] = 1
    ids, attention = ids.to(device), attention.to(device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    stop = torch.tensor(sorted(stop_ids), device=device)
    was_training = model.training
    model.eval()
    try:
        out = model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True)
        cache, logits = out.cache, out.logits[:, -1]
        # every prompt position's scores (left padding included, dropped below), then one column a fed token
        scored = [tuple(t.cpu() for t in score(out.logits))] if score is not None else None
        done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        new = []
        for _ in range(max_new_tokens):
            token = _pick(logits, temperature, top_p, generator)
            token = torch.where(done, torch.full_like(token, int(pad_id)), token)
            new.append(token)
            done |= torch.isin(token, stop)
            if bool(done.all()):
                break
            attention = torch.cat([attention, attention.new_ones((len(prompts), 1))], dim=1)
            positions = positions[:, -1:] + 1
            out = model(input_ids=token[:, None], attention_mask=attention, position_ids=positions,
                        cache=cache, use_cache=True)
            cache, logits = out.cache, out.logits[:, -1]
            if scored is not None:
                scored.append(tuple(t.cpu() for t in score(out.logits)))
    finally:
        model.train(was_training)
    generated = torch.stack(new, dim=1).cpu().numpy()  # (bs, steps)
    stops = np.isin(generated, np.asarray(sorted(stop_ids)))
    completions, finished = [], []
    for row in range(len(prompts)):
        hits = np.flatnonzero(stops[row])
        end = int(hits[0]) + 1 if len(hits) else generated.shape[1]
        completions.append(generated[row, :end].tolist())
        finished.append(bool(len(hits)))
    if scored is None:
        return Rollouts(completions, finished)
    columns = [torch.cat(parts, dim=1) for parts in zip(*scored)]  # each (bs, width + tokens fed, *)
    n_fed = len(scored) - 1
    scores = [tuple(c[row, width - len(prompt): width + min(len(completions[row]), n_fed)] for c in columns)
              for row, prompt in enumerate(prompts)]
    return Rollouts(completions, finished, scores)


def completion_batch(prompts, completions, pad_id):
    """(ids (bs, L) long, lengths (bs,) long, loss_mask (bs, L) bool): each prompt followed by its completion,
    right-padded, the mask True on the completion's tokens: the layout of a loss-masked corpus's batch."""
    lengths = torch.tensor([len(p) + len(c) for p, c in zip(prompts, completions)])
    ids = torch.full((len(prompts), int(lengths.max())), int(pad_id), dtype=torch.long)
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        ids[row, : len(prompt) + len(completion)] = torch.as_tensor(list(prompt) + list(completion))
        mask[row, len(prompt): len(prompt) + len(completion)] = True
    return ids, lengths, mask
