"""Entity-level precision, recall and F1 (the CoNLL convention, as conlleval and seqeval's default mode), and
token accuracy, as plain functions of tag lists.

    entity_spans(["B-PER", "I-PER", "O", "I-LOC"])    # {("PER", 0, 2), ("LOC", 3, 4)}
    ner_scores(gold_sentences, predicted_sentences)  # {"precision", "recall", "f1", "accuracy", "per_type"}

An entity is a maximal run of tags of one type: it opens at B-TYPE, or at I-TYPE when the tag before is O,
another type, or the start of the sentence (an I- tag can open an entity: that is how IOB1 files, and a
model's stray I- predictions, are read), and it continues over the I-TYPE tags that follow. A predicted
entity counts only when a gold entity has the same type and exactly the same span. Precision, recall and F1
are micro-averaged over all entities; per type over that type's. A ratio with nothing to divide by is 0.
"""
from collections import Counter


def entity_spans(tags):
    """{(type, start, end)}: the entities of one sentence's tags (end excluded)."""
    spans, kind, start = set(), None, 0
    for i, tag in enumerate(list(tags) + ["O"]):  # the closing O ends an entity that runs to the last word
        prefix, _, tag_type = tag.partition("-")
        continues = prefix == "I" and tag_type == kind
        if kind is not None and not continues:
            spans.add((kind, start, i))
            kind = None
        if prefix in ("B", "I") and not continues:
            kind, start = tag_type, i
    return spans


def _prf(tp, n_pred, n_gold):
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def ner_scores(gold, predicted):
    """Entity precision / recall / F1, overall and per type, and token accuracy.

    gold, predicted: lists of sentences, each a list of tags (the same lengths). Returns {"precision",
    "recall", "f1", "accuracy", "per_type": {type: {"precision", "recall", "f1", "support"}}}, as fractions;
    support is the number of gold entities of the type.
    """
    if len(gold) != len(predicted) or any(len(g) != len(p) for g, p in zip(gold, predicted)):
        raise ValueError("gold and predicted tags must have the same sentences and lengths")
    tp, n_pred, n_gold = Counter(), Counter(), Counter()
    correct = total = 0
    for g_tags, p_tags in zip(gold, predicted):
        g, p = entity_spans(g_tags), entity_spans(p_tags)
        tp.update(kind for kind, _, _ in g & p)
        n_pred.update(kind for kind, _, _ in p)
        n_gold.update(kind for kind, _, _ in g)
        correct += sum(a == b for a, b in zip(g_tags, p_tags))
        total += len(g_tags)
    precision, recall, f1 = _prf(sum(tp.values()), sum(n_pred.values()), sum(n_gold.values()))
    per_type = {}
    for kind in sorted(set(n_gold) | set(n_pred)):
        p, r, f = _prf(tp[kind], n_pred[kind], n_gold[kind])
        per_type[kind] = {"precision": p, "recall": r, "f1": f, "support": n_gold[kind]}
    return {"precision": precision, "recall": recall, "f1": f1, "accuracy": correct / total if total else 0.0,
            "per_type": per_type}
