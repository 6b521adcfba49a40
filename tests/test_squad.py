"""SQuAD windows, post-processing and the official EM/F1, on a tiny local tokenizer and hand-made questions."""
import random

import numpy as np
import pytest

from tasks.squad import best_spans, examples_from_records, postprocess_predictions, read_squad_examples, squad_features
from tasks.squad_metrics import exact_match, f1, normalize_answer, squad_scores
from utils import UserError


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny["bert"])


def make_records(lines, n_contexts=12, seed=0, long=True):
    """Questions whose answers are 1-4 whole words at known places of contexts of 1-4 corpus lines."""
    rng = random.Random(seed)
    pool = [line for line in lines if len(line.split()) > 8]
    records = []
    for c in range(n_contexts):
        context = " ".join(rng.sample(pool, rng.randint(2, 4) if long else 1))
        words = context.split(" ")
        for q in range(3):
            i, n = rng.randrange(len(words) - 4), rng.randint(1, 4)
            start = len(" ".join(words[:i])) + (1 if i else 0)
            text = " ".join(words[i:i + n])
            question = "which words follow " + " ".join(words[max(0, i - 3):i]) + " ?"
            records.append({"id": f"c{c}q{q}", "context": context, "question": question,
                            "answers": [{"text": text, "answer_start": start}]})
    return records


# ------------------------------------------------------------------------------------------------ windows


def test_every_training_window_holds_its_answer_exactly_or_points_at_cls(tiny, tokenizer):
    examples = examples_from_records(make_records(tiny["lines"]), "test", is_training=True)
    feats = squad_features(examples, tokenizer, max_seq_length=40, doc_stride=10, max_query_length=8,
                           is_training=True)
    eval_feats = squad_features(examples, tokenizer, max_seq_length=40, doc_stride=10, max_query_length=8,
                                is_training=False)
    n_windows = len(feats["input_ids"])
    assert n_windows > 2 * len(examples)  # contexts really are cut into several windows
    found = set()
    for f in range(n_windows):
        example = examples[feats["example_index"][f]]
        offsets = eval_feats["offset_mapping"][f]  # same windows, offsets kept for evaluation
        assert len(feats["input_ids"][f]) <= 40
        start, end = feats["start_positions"][f], feats["end_positions"][f]
        answer = example["answers"]["text"][0]
        a_start = example["answers"]["answer_start"][0]
        inside = [o for o in offsets if o is not None]
        if start == 0:
            assert end == 0
            # Pointing at CLS is right only when the answer is not wholly inside this window.
            assert inside[0][0] > a_start or inside[-1][1] < a_start + len(answer)
        else:
            assert offsets[start] is not None and offsets[end] is not None and start <= end
            assert example["context"][offsets[start][0]:offsets[end][1]] == answer
            found.add(example["id"])
    assert found == {e["id"] for e in examples}  # every answer fits a 40-token window somewhere


def test_windows_start_doc_stride_tokens_apart_and_questions_are_cut(tiny, tokenizer):
    examples = examples_from_records(make_records(tiny["lines"], n_contexts=4), "test", is_training=False)
    long_question = dict(examples[0], id="long", question=" ".join(["river city king"] * 20))
    feats = squad_features([long_question] + examples, tokenizer, max_seq_length=48, doc_stride=7,
                           max_query_length=6, is_training=False)
    sep = tokenizer.sep_token_id
    for f, ids in enumerate(feats["input_ids"]):
        if feats["example_index"][f] == 0:
            assert ids.index(sep) - 1 == 6  # [CLS] + 6 question tokens, then [SEP]
    for index in range(len(examples) + 1):
        windows = [f for f, e in enumerate(feats["example_index"]) if e == index]
        firsts = []
        for f in windows:
            offsets = feats["offset_mapping"][f]
            firsts.append(next(o[0] for o in offsets if o is not None))
        # The first context token of each window: consecutive windows start 7 tokens apart.
        all_tokens = tokenizer(examples[max(index - 1, 0)]["context"] if index else long_question["context"],
                               add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        starts = [o[0] for o in all_tokens]
        positions = [starts.index(c) for c in firsts]
        assert positions == [7 * k for k in range(len(windows))]


def test_each_context_token_has_exactly_one_max_context_window(tiny, tokenizer):
    examples = examples_from_records(make_records(tiny["lines"], n_contexts=5), "test", is_training=False)
    feats = squad_features(examples, tokenizer, max_seq_length=32, doc_stride=6, max_query_length=8,
                           is_training=False)
    for index in range(len(examples)):
        counts = {}
        for f, e in enumerate(feats["example_index"]):
            if e != index:
                continue
            for o, flag in zip(feats["offset_mapping"][f], feats["token_is_max_context"][f]):
                if o is not None:
                    counts[tuple(o)] = counts.get(tuple(o), 0) + int(flag)
        assert counts and set(counts.values()) == {1}


# ------------------------------------------------------------------------------------------ post-processing


def test_best_spans_never_invalid():
    rng = np.random.default_rng(0)
    seq = 30
    offsets = [None] * 6 + [(i * 3, i * 3 + 2) for i in range(20)] + [None] * 4  # question, context, padding
    max_context = [o is not None and i % 5 != 0 for i, o in enumerate(offsets)]
    for _ in range(200):
        start, end = rng.normal(size=seq), rng.normal(size=seq)
        for score, s, e in best_spans(start, end, offsets, max_context, n_best_size=10, max_answer_length=4):
            assert offsets[s] is not None and offsets[e] is not None  # inside the context
            assert s <= e and e - s + 1 <= 4
            assert max_context[s]
            assert score == pytest.approx(start[s] + end[e])


def windows_with_random_logits(tiny, tokenizer, seed):
    """(examples, evaluation windows, start logits, end logits) of four contexts, logits drawn with `seed`."""
    examples = examples_from_records(make_records(tiny["lines"], n_contexts=4), "test", is_training=False)
    feats = squad_features(examples, tokenizer, max_seq_length=32, doc_stride=8, max_query_length=8,
                           is_training=False)
    rng = np.random.default_rng(seed)
    starts = [rng.normal(size=len(ids)) for ids in feats["input_ids"]]
    ends = [rng.normal(size=len(ids)) for ids in feats["input_ids"]]
    return examples, feats, starts, ends


def test_postprocess_answers_are_context_slices_and_v2_threshold(tiny, tokenizer):
    examples, feats, starts, ends = windows_with_random_logits(tiny, tokenizer, seed=1)
    preds, nbest, null_odds = postprocess_predictions(examples, feats, starts, ends, n_best_size=5,
                                                      max_answer_length=3)
    assert null_odds == {}
    for e in examples:
        assert preds[e["id"]] and preds[e["id"]] in e["context"]
        assert len(tokenizer(preds[e["id"]], add_special_tokens=False)["input_ids"]) <= 3
        assert nbest[e["id"]][0]["text"] == preds[e["id"]]
        assert sum(c["probability"] for c in nbest[e["id"]]) == pytest.approx(1.0)
    # v2.0: a huge CLS score makes every answer empty; a threshold above the gap brings the spans back.
    for s, en in zip(starts, ends):
        s[0], en[0] = 50.0, 50.0
    preds2, _, odds = postprocess_predictions(examples, feats, starts, ends, n_best_size=5, max_answer_length=3,
                                              version_2_with_negative=True)
    assert set(preds2.values()) == {""} and all(v > 0 for v in odds.values())
    preds3, _, _ = postprocess_predictions(examples, feats, starts, ends, n_best_size=5, max_answer_length=3,
                                           version_2_with_negative=True, null_score_diff_threshold=1000.0)
    assert preds3 == preds


# ------------------------------------------------------------------------------------------------ metrics


@pytest.mark.parametrize("prediction, reference, expected", [
    ("The  Cat!", "cat", 1.0),                   # case, article, punctuation, whitespace
    ("an apple", "apple", 1.0),
    ("U.S.", "US", 1.0),
    ("theory", "the ory", 0.0),                 # "the" is an article only as a word
    ("Denver Broncos", "Broncos of Denver", 0.0),
])
def test_exact_match_normalisation(prediction, reference, expected):
    assert exact_match(prediction, reference) == expected


def test_normalize_answer():
    assert normalize_answer("  The Quick, brown FOX.  ") == "quick brown fox"


def test_f1_by_hand():
    # pred tokens {big, red, dog}, reference {red, dog, barked}: 2 in common, P = R = 2/3.
    assert f1("the big red dog", "red dog barked") == pytest.approx(2 / 3)
    # repeated tokens count as often as both sides have them: pred [a1 a1 b], ref [a1 b]: common 2, P 2/3, R 1.
    assert f1("a1 a1 b", "a1 b") == pytest.approx(2 * (2 / 3) / (2 / 3 + 1))
    assert f1("", "cat") == 0.0
    assert f1("", "", v2=True) == 1.0 and f1("cat", "", v2=True) == 0.0


def test_squad_scores_max_over_references_and_v2_empty_answers():
    refs = {"q1": ["Denver Broncos", "the Broncos"], "q2": ["in 1990"], "q3": ["seven"]}
    preds = {"q1": "Broncos", "q2": "1990", "q3": "eight"}
    out = squad_scores(refs, preds)
    # q1: EM with "the Broncos" (1), q2: EM 0, F1 = 2*(1*0.5)/(1.5) = 2/3, q3: 0.
    assert out["exact"] == pytest.approx(100 / 3)
    assert out["f1"] == pytest.approx(100 * (1 + 2 / 3 + 0) / 3)
    assert out["total"] == 3

    refs2 = {"a": [], "b": ["Paris"], "c": [""]}
    out2 = squad_scores(refs2, {"a": "", "b": "", "c": "London"}, v2=True)
    assert out2["exact"] == pytest.approx(100 / 3) and out2["f1"] == pytest.approx(100 / 3)
    assert out2["NoAns_exact"] == 50.0 and out2["NoAns_total"] == 2
    assert out2["HasAns_exact"] == 0.0 and out2["HasAns_total"] == 1
    assert squad_scores({"x": ["cat"]}, {})["exact"] == 0.0  # a missing prediction scores 0


# ------------------------------------------------------------------------------------------------ reading


def test_answer_start_must_match_its_context(tmp_path):
    import json

    bad = {"data": [{"title": "t", "paragraphs": [{"context": "The cat sat on the mat.", "qas": [
        {"id": "ok", "question": "who?", "answers": [{"text": "cat", "answer_start": 4}]},
        {"id": "shifted", "question": "where?", "answers": [{"text": "mat", "answer_start": 3}]}]}]}]}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(UserError, match="question shifted: answer_start 3 does not point at its answer 'mat'"):
        read_squad_examples(str(path), is_training=True)


# ------------------------------------------------------------------------------------- real tokenizer layouts


def test_a_distilbert_tokenizer_gives_the_segment_ids_a_bert_teacher_was_trained_with(tiny, tokenizer, real_folders):
    """DistilBERT checkpoints save a DistilBertTokenizer, which returns no token_type_ids by default: the windows
    must still carry the BERT teacher's segment ids (question 0, context 1), as its own tokenizer makes them."""
    from transformers import AutoTokenizer

    distil = AutoTokenizer.from_pretrained(real_folders["distilbert"])
    assert "token_type_ids" not in distil("a question", "a context")  # the layout this test is about
    examples = examples_from_records(make_records(tiny["lines"], n_contexts=4), "test", is_training=True)
    ours = squad_features(examples, distil, max_seq_length=40, doc_stride=10, max_query_length=8, is_training=True)
    teachers = squad_features(examples, tokenizer, max_seq_length=40, doc_stride=10, max_query_length=8,
                              is_training=True)
    assert ours["input_ids"] == teachers["input_ids"]
    assert ours["token_type_ids"] == teachers["token_type_ids"]
    assert all(1 in row for row in ours["token_type_ids"])


def test_windows_of_a_cls_last_tokenizer_point_at_their_own_cls(tiny, real_folders):
    """XLNet's layout: context first, CLS last. An answer outside a window, and the v2.0 null score, are at that
    window's CLS token, not at position 0 (a context token there)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(real_folders["xlnet"])
    examples = examples_from_records(make_records(tiny["lines"], n_contexts=4), "test", is_training=True)
    train = squad_features(examples, tok, max_seq_length=40, doc_stride=10, max_query_length=8, is_training=True)
    evals = squad_features(examples, tok, max_seq_length=40, doc_stride=10, max_query_length=8, is_training=False)
    assert evals["offset_mapping"][0][0] is not None  # position 0 is context with this tokenizer
    outside = 0
    for f, ids in enumerate(train["input_ids"]):
        start, end = train["start_positions"][f], train["end_positions"][f]
        offsets = evals["offset_mapping"][f]
        if offsets[start] is None:  # no answer in this window: both ends on the CLS token, the window's last
            assert ids[start] == ids[end] == tok.cls_token_id and start == end == len(ids) - 1
            outside += 1
        else:
            example = examples[train["example_index"][f]]
            assert example["context"][offsets[start][0]:offsets[end][1]] == example["answers"]["text"][0]
    assert outside > 0
    # v2.0: a high score on CLS (wherever it is) and nowhere else answers nothing.
    starts = [np.where(np.asarray(ids) == tok.cls_token_id, 50.0, 0.0) for ids in evals["input_ids"]]
    preds, _, odds = postprocess_predictions(examples, evals, starts, starts, n_best_size=5, max_answer_length=3,
                                             version_2_with_negative=True)
    assert set(preds.values()) == {""} and all(v > 0 for v in odds.values())


def test_nbest_lists_each_answer_text_once(tiny, tokenizer):
    """Contexts repeat words ("the", "of"), and windows overlap: many spans read the same. Each text is listed
    once, at its best score, and the list is still filled to n_best_size with distinct texts."""
    examples, feats, starts, ends = windows_with_random_logits(tiny, tokenizer, seed=2)
    preds, nbest, _ = postprocess_predictions(examples, feats, starts, ends, n_best_size=20, max_answer_length=2)
    for e in examples:
        texts = [c["text"] for c in nbest[e["id"]]]
        assert len(texts) == len(set(texts)) == 20 and texts[0] == preds[e["id"]]
        scores = [c["start_logit"] + c["end_logit"] for c in nbest[e["id"]]]
        assert scores == sorted(scores, reverse=True)
