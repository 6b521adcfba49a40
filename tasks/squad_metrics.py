"""SQuAD's official scores: exact match and token F1, for v1.1 and v2.0.

    from tasks.squad_metrics import squad_scores
    squad_scores({"q1": ["Denver Broncos"]}, {"q1": "the Denver Broncos"})  # {'exact': 100.0, 'f1': 100.0, ...}

Both are computed on normalised text (lower case, punctuation and the articles a/an/the removed, runs of
whitespace collapsed), and a prediction gets the best score over the question's reference answers.
v2.0 adds unanswerable questions: their only reference is "", and a prediction scores 1 there only if it
is empty too (v2.0's rule for an empty side: 1 if both are empty, else 0).
"""
import collections
import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text):
    """Lower case, no punctuation, no articles, single spaces: the form both official scripts compare."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction, reference):
    return float(normalize_answer(prediction) == normalize_answer(reference))


def f1(prediction, reference, v2=False):
    """Token-overlap F1 of two answers. With v2=True an empty side scores 1 only against an empty side."""
    pred_tokens = normalize_answer(prediction).split()
    ref_tokens = normalize_answer(reference).split()
    if v2 and (not pred_tokens or not ref_tokens):
        return float(pred_tokens == ref_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(ref_tokens)
    n_same = sum(common.values())
    if n_same == 0:
        return 0.0
    precision = n_same / len(pred_tokens)
    recall = n_same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_scores(references, predictions, v2=False):
    """references: {question id: [answer texts]} ([] or [""] for unanswerable); predictions: {id: text}.

    Returns percentages: exact, f1, total, and with v2 the same split into HasAns_ / NoAns_ questions.
    A question without a prediction scores 0 (the official scripts warn and do the same).
    """
    exact, f1s, has_answer = {}, {}, {}
    for qid, answers in references.items():
        answers = [a for a in answers if normalize_answer(a)] if v2 else list(answers)
        has_answer[qid] = bool(answers)
        if not answers:
            answers = [""]  # v2.0: the only right answer to an unanswerable question is none
        prediction = predictions.get(qid, None)
        if prediction is None:
            exact[qid] = f1s[qid] = 0.0
            continue
        exact[qid] = max(exact_match(prediction, a) for a in answers)
        f1s[qid] = max(f1(prediction, a, v2=v2) for a in answers)
    out = _summary(exact, f1s, list(references))
    if v2:
        for prefix, wanted in (("HasAns_", True), ("NoAns_", False)):
            ids = [qid for qid in references if has_answer[qid] == wanted]
            if ids:
                out.update({prefix + k: v for k, v in _summary(exact, f1s, ids).items()})
    return out


def _summary(exact, f1s, ids):
    n = len(ids)
    if n == 0:
        return {"exact": 0.0, "f1": 0.0, "total": 0}
    return {"exact": 100.0 * sum(exact[i] for i in ids) / n, "f1": 100.0 * sum(f1s[i] for i in ids) / n, "total": n}
