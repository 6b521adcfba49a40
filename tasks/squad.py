"""SQuAD data: reading the official JSON, cutting contexts into windows, and turning span logits into answers.

    examples = read_squad_examples("train-v1.1.json", is_training=True)      # flat dicts, checked
    features = squad_features(examples, tokenizer, max_seq_length=384, doc_stride=128, max_query_length=64,
                              is_training=True)                              # one dict per window
    predictions, nbest, null_odds = postprocess_predictions(examples, eval_features, start_logits, end_logits)

A context longer than a window is cut into overlapping windows `doc_stride` tokens apart (the original's
meaning of the flag: the step between window starts, not the overlap). Each window is
`[CLS] question [SEP] context piece [SEP]` (or whatever order the tokenizer's template gives: XLNet's puts the
context first and CLS last); a training answer that does not lie wholly inside a window points at that window's
CLS token, which is also how SQuAD v2.0 marks unanswerable questions (its null score). Offsets map
every context token back to its characters, so an answer is always a slice of the original context.
A token seen by several windows is only allowed to start an answer in the window where it has the most
context on both sides (as in BERT's reference implementation).
"""
import collections
import json
import os

import numpy as np

from utils import UserError


# ------------------------------------------------------------------------------------------------ reading


def read_squad_examples(path, is_training, version_2_with_negative=False, flag=None):
    """The questions of an official-format SQuAD file, as flat dicts: id, title, context, question,
    answers {"text": [...], "answer_start": [...]}, is_impossible. `flag` (e.g. "--train_file") prefixes every
    error about the file.

    Every answer must be the slice of its context that answer_start points at; the first offence is
    refused with its question id, since a shifted answer would silently teach the wrong span.
    """
    source = f"{flag} {path}" if flag else path
    if not os.path.isfile(path):
        raise UserError(f"{source}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            articles = json.load(f)["data"]
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{source}: not a JSON file ({error})") from None
    except (KeyError, TypeError):
        raise UserError(f"{source}: not the SQuAD layout (no top-level 'data' list)") from None
    if not isinstance(articles, list) or not all(isinstance(a, dict) for a in articles):
        raise UserError(f"{source}: not the SQuAD layout ('data' must be a list of articles)")
    records = []
    for article in articles:
        for paragraph in article.get("paragraphs", []):
            for qa in paragraph.get("qas", []):
                if "context" not in paragraph:
                    raise UserError(f"{source}: a paragraph lacks the field 'context'")
                records.append(dict(qa, context=paragraph["context"], title=article.get("title", "")))
    return examples_from_records(records, source, is_training, version_2_with_negative)


def examples_from_records(records, source, is_training, version_2_with_negative=False):
    """Checked examples from flat question records: id, context, question, answers (a list of {text,
    answer_start}, or the hub's {text: [...], answer_start: [...]}), optional title and is_impossible."""
    examples = [_example(source, r, is_training, version_2_with_negative) for r in records]
    if not examples:
        raise UserError(f"{source}: no questions found")
    return examples


def _example(source, qa, is_training, v2):
    try:
        context, qid, question = qa["context"], str(qa["id"]), qa["question"]
    except KeyError as missing:
        raise UserError(f"{source}: a question lacks the field {missing}") from None
    answers = qa.get("answers") or []
    if isinstance(answers, dict):  # the hub's column layout
        answers = [{"text": t, "answer_start": a}
                   for t, a in zip(answers.get("text", []), answers.get("answer_start", []))]
    impossible = (bool(qa.get("is_impossible", False)) or not answers) if v2 else False
    if v2 and qa.get("is_impossible", False) and answers:
        raise UserError(f"{source}: question {qid} is marked is_impossible but has answers")
    texts, starts = [], []
    for answer in answers:
        text, start = answer.get("text"), answer.get("answer_start")
        if not isinstance(text, str) or not isinstance(start, int):
            raise UserError(f"{source}: question {qid}: an answer needs a 'text' string and an 'answer_start' integer")
        if context[start:start + len(text)] != text:
            raise UserError(f"{source}: question {qid}: answer_start {start} does not point at its answer "
                            f"{text!r} (the context there reads {context[start:start + len(text)]!r})")
        texts.append(text)
        starts.append(start)
    if is_training and not impossible and not texts:
        raise UserError(f"{source}: question {qid} has no answer; pass --version_2_with_negative for SQuAD v2.0")
    return {"id": qid, "title": qa.get("title", ""), "context": context, "question": question,
            "answers": {"text": texts, "answer_start": starts}, "is_impossible": impossible}


# ------------------------------------------------------------------------------------------------ windows


def _truncate_question(question, tokenizer, max_query_length):
    """The question cut after its max_query_length-th token (cut in characters, so the pair call re-tokenises
    exactly these tokens)."""
    enc = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) <= max_query_length:
        return question, len(enc["input_ids"])
    return question[:enc["offset_mapping"][max_query_length - 1][1]], max_query_length


def squad_features(examples, tokenizer, max_seq_length, doc_stride, max_query_length, is_training,
                   example_indices=None):
    """One feature per window, as dicts of lists: input_ids, token_type_ids (the tokenizer's segment ids, even for
    a tokenizer that returns none by default, such as DistilBERT's: a BERT teacher needs them), attention_mask,
    example_index, cls_index (where the window's CLS token is), and for training start/end_positions, for
    evaluation offset_mapping (None outside the context) and token_is_max_context. `examples` is a list of
    read_squad_examples dicts;
    example_indices their positions in the whole set (default 0, 1, ...), when given a slice of it.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"the tokenizer {type(tokenizer).__name__} is not a fast tokenizer: SQuAD windows need "
                        f"its offset mappings")
    pad_on_right = tokenizer.padding_side == "right"
    features = collections.defaultdict(list)
    n_special = tokenizer.num_special_tokens_to_add(pair=True)
    for index, example in zip(example_indices or range(len(examples)), examples):
        question, n_question = _truncate_question(example["question"].lstrip(), tokenizer, max_query_length)
        room = max_seq_length - n_question - n_special  # context tokens per window
        if room < 1:
            raise UserError(f"--max_seq_length {max_seq_length} leaves no room for the context after a "
                            f"{n_question}-token question; raise it or lower --max_query_length")
        # The tokenizer's stride is the overlap between windows; ours is the step between their starts.
        overlap = min(max(room - doc_stride, 0), room - 1)
        first, second = (question, example["context"]) if pad_on_right else (example["context"], question)
        enc = tokenizer(first, second, truncation="only_second" if pad_on_right else "only_first",
                        max_length=max_seq_length, stride=overlap, return_overflowing_tokens=True,
                        return_offsets_mapping=True, return_token_type_ids=True)
        context_id = 1 if pad_on_right else 0
        windows = []
        for w in range(len(enc["input_ids"])):
            seq_ids = enc.sequence_ids(w)
            offsets = [o if s == context_id else None for o, s in zip(enc["offset_mapping"][w], seq_ids)]
            windows.append(offsets)
            for key in ("input_ids", "token_type_ids", "attention_mask"):
                if key in enc:
                    features[key].append(enc[key][w])
            features["example_index"].append(index)
            cls_index = _cls_index(enc["input_ids"][w], seq_ids, tokenizer)
            features["cls_index"].append(cls_index)
            if is_training:
                start, end = _answer_positions(example, offsets, cls_index)
                features["start_positions"].append(start)
                features["end_positions"].append(end)
            else:
                features["offset_mapping"].append(offsets)
        if not is_training:
            features["token_is_max_context"].extend(_max_context_flags(windows))
    return dict(features)


def _cls_index(input_ids, sequence_ids, tokenizer):
    """Position of the CLS token the template added to a window (0 for a tokenizer without one)."""
    cls = tokenizer.cls_token_id
    return next((i for i, (t, s) in enumerate(zip(input_ids, sequence_ids)) if t == cls and s is None), 0)


def _answer_positions(example, offsets, cls_index):
    """Token indices of the first answer inside this window, or (CLS, CLS) when it is not wholly inside."""
    if example["is_impossible"] or not example["answers"]["text"]:
        return cls_index, cls_index
    start_char = example["answers"]["answer_start"][0]
    end_char = start_char + len(example["answers"]["text"][0])
    inside = [i for i, o in enumerate(offsets) if o is not None]
    if not inside or offsets[inside[0]][0] > start_char or offsets[inside[-1]][1] < end_char:
        return cls_index, cls_index
    start = next(i for i in inside if offsets[i][1] > start_char)  # first token reaching into the answer
    end = next(i for i in reversed(inside) if offsets[i][0] < end_char)  # last token starting inside it
    return start, end


def _max_context_flags(windows):
    """For each window, per token: is this the window where the token has the most context around it?

    Score of a token in a window: min(tokens on its left, tokens on its right) + 0.01 * window length,
    tokens being identified by their character offsets.
    """
    best = {}  # token offsets -> (best score, its window)
    for w, offsets in enumerate(windows):
        inside = [i for i, o in enumerate(offsets) if o is not None]
        for rank, i in enumerate(inside):
            score = min(rank, len(inside) - 1 - rank) + 0.01 * len(inside)
            key = tuple(offsets[i])
            if key not in best or score > best[key][0]:
                best[key] = (score, w)
    return [[o is not None and best[tuple(o)][1] == w for o in offsets] for w, offsets in enumerate(windows)]


# ------------------------------------------------------------------------------------------ post-processing


def best_spans(start_logits, end_logits, offsets, max_context, n_best_size, max_answer_length):
    """The n_best_size highest-scoring valid spans of one window: [(score, start, end)], best first.

    Valid: both ends inside the context, end >= start, at most max_answer_length tokens, and a start token
    this window has the most context for. start_logits/end_logits: (seq_len,) numpy arrays.
    """
    # The top candidates among the positions that may start / end an answer (taking the top positions overall
    # first, as the original did, lets a high CLS or question logit crowd real candidates out).
    in_context = np.zeros(len(start_logits), dtype=bool)  # (seq_len,)
    in_context[:len(offsets)] = [o is not None for o in offsets[:len(start_logits)]]
    can_start = in_context.copy()
    can_start[:len(max_context)] &= np.asarray(max_context[:len(start_logits)], dtype=bool)
    starts = _top(start_logits, can_start, n_best_size)
    ends = _top(end_logits, in_context, n_best_size)
    spans = []
    for s in starts:
        for e in ends:
            if e < s or e - s + 1 > max_answer_length:
                continue
            spans.append((float(start_logits[s] + end_logits[e]), int(s), int(e)))
    spans.sort(key=lambda x: -x[0])
    return spans[:n_best_size]


def _top(logits, allowed, k):
    """Indices of the k largest logits among the allowed positions, largest first."""
    order = np.argsort(-np.where(allowed, logits, -np.inf), kind="stable")[:k]
    return [int(i) for i in order if allowed[i]]


def _first_of_each_text(candidates):
    """The candidates (best first) without the repeats of a text seen earlier: spans in different places or
    windows often read the same."""
    seen = set()
    out = []
    for c in candidates:
        if c["text"] not in seen:
            seen.add(c["text"])
            out.append(c)
    return out


def postprocess_predictions(examples, features, all_start_logits, all_end_logits, n_best_size=20,
                            max_answer_length=30, version_2_with_negative=False, null_score_diff_threshold=0.0):
    """Answers from the windows' logits. Returns (predictions {id: text}, nbest {id: [{text, probability,
    start_logit, end_logit}]}, null_odds {id: null score - best span score} (v2.0 only, else {})).

    features: squad_features(..., is_training=False) output; all_*_logits: one (seq_len,) array per window.
    With v2.0 the answer is "" when the null score (CLS start + CLS end, lowest over the windows) beats the
    best span by more than null_score_diff_threshold. A text is listed once, at its best score, before the list
    is cut to n_best_size (so repeats neither take places nor split the probability).
    """
    by_example = collections.defaultdict(list)
    for f, example_index in enumerate(features["example_index"]):
        by_example[example_index].append(f)
    predictions, nbest_out, null_odds = {}, {}, {}
    for index, example in enumerate(examples):
        candidates, null_score = [], None
        for f in by_example.get(index, []):
            start, end = np.asarray(all_start_logits[f]), np.asarray(all_end_logits[f])
            offsets = features["offset_mapping"][f]
            cls = features["cls_index"][f]
            score_null = float(start[cls] + end[cls])
            if null_score is None or score_null < null_score:
                null_score = score_null
            for score, s, e in best_spans(start, end, offsets, features["token_is_max_context"][f],
                                          n_best_size, max_answer_length):
                text = example["context"][offsets[s][0]:offsets[e][1]]
                candidates.append({"text": text, "start_logit": float(start[s]), "end_logit": float(end[e]),
                                   "score": score})
        candidates.sort(key=lambda c: -c["score"])
        candidates = _first_of_each_text(candidates)[:n_best_size]
        if version_2_with_negative and null_score is not None:
            candidates.append({"text": "", "start_logit": null_score / 2, "end_logit": null_score / 2,
                               "score": null_score})
            candidates.sort(key=lambda c: -c["score"])
        if not candidates:  # no valid span at all (e.g. a one-token context)
            candidates = [{"text": "", "start_logit": 0.0, "end_logit": 0.0, "score": 0.0}]
        scores = np.array([c["score"] for c in candidates])
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        nbest_out[example["id"]] = [
            {"text": c["text"], "probability": float(p), "start_logit": c["start_logit"], "end_logit": c["end_logit"]}
            for c, p in zip(candidates, probs)]
        best_span = next((c for c in candidates if c["text"]), None)
        if not version_2_with_negative:
            predictions[example["id"]] = best_span["text"] if best_span else ""
            continue
        best_score = best_span["score"] if best_span else float("-inf")
        diff = null_score - best_score if null_score is not None else float("inf")
        null_odds[example["id"]] = diff
        predictions[example["id"]] = "" if diff > null_score_diff_threshold else best_span["text"]
    return predictions, nbest_out, null_odds
