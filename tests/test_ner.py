"""NER: reading column files (CoNLL and GermEval), sub-word windows that keep every word, the entity metric
against hand-computed cases (and seqeval when installed), the token losses, then run_ner_w_distillation.py end to
end on a tiny tagger with a teacher (one process and two), label orders, exact resume, the table, bad input."""
import json
import os
import random
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import expect_error, load_script, run_in_process, run_script, run_torchrun
from distil.losses import IGNORE_INDEX as IGNORE, soft_target_divergence, token_ce_loss, token_kd_loss
from tasks.ner import check_tags, label_list, read_column_file, sentence_windows, word_predictions, write_predictions
from tasks.ner_metrics import entity_spans, ner_scores
from utils import UserError

SCRIPT_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O


Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER
"""
# Tweets: '#' is a token (hashtags), tokens may be empty or a space, and a sentence may start with an I- tag.
BTC = "RT\tO\n@\tB-ORG\nBBCNews\tB-ORG\n#\tO\n\tO\n \tO\n\n#\tO\nLondon\tI-LOC\n"
GERMEVAL = ("#\thttp://example.org/a\t[2010-07-04]\t\n1\tEurospeedway\tB-ORG\tO\n2\tLausitz\tI-ORG\tB-LOC\n"
            "3\t#\tO\tO\n\n#\thttp://example.org/b\t[2010-07-05]\n1\tGleich\tO\tO\n")


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return str(path)


# ------------------------------------------------------------------------------------------------ reading


def test_reads_conll_btc_and_germeval_and_writes_them_back(tmp_path):
    conll = read_column_file(write(tmp_path, "a.conll", CONLL), "--train_file")
    assert [s.words for s in conll.sentences] == [["EU", "rejects", "German", "call"], ["Peter", "Blackburn"]]
    assert [s.tags for s in conll.sentences] == [["B-ORG", "O", "B-MISC", "O"], ["B-PER", "I-PER"]]
    assert conll.sentences[1].lines == [9, 10]

    btc = read_column_file(write(tmp_path, "b.conll", BTC), "--train_file")
    assert [s.words for s in btc.sentences] == [["RT", "@", "BBCNews", "#", "", " "], ["#", "London"]]
    assert btc.sentences[1].tags == ["O", "I-LOC"]
    assert label_list(btc.sentences) == ["O", "I-LOC", "B-ORG"]  # O first, then by type, B- before I-

    path = write(tmp_path, "g.tsv", GERMEVAL)
    outer = read_column_file(path, "--validation_file")  # found to be GermEval by itself: outer tags
    assert [s.words for s in outer.sentences] == [["Eurospeedway", "Lausitz", "#"], ["Gleich"]]
    assert outer.sentences[0].tags == ["B-ORG", "I-ORG", "O"]
    assert read_column_file(path, "--validation_file", tag_column=4).sentences[0].tags == ["O", "B-LOC", "O"]
    with pytest.raises(UserError, match=r"line 1: tag 'http://example.org/a'"):  # read as CoNLL, the # line is a token
        read_column_file(path, "--validation_file", data_format="conll", tag_column=2)

    # predictions.txt: token, gold tag, predicted tag (the CoNLL evaluation layout), read back by the same reader.
    out = tmp_path / "out.txt"
    for data in (btc, outer, conll):
        predicted = [["O"] * len(s.words) for s in data.sentences]
        predicted[-1][-1] = "B-PER"
        write_predictions(data, predicted, str(out))
        back = read_column_file(str(out), "predictions")
        assert [s.words for s in back.sentences] == [s.words for s in data.sentences]
        assert [s.tags for s in back.sentences] == predicted
        assert [[f[1] for f in s.fields] for s in back.sentences] == [s.tags for s in data.sentences]  # gold
    assert out.read_text().splitlines()[:2] == ["EU B-ORG O", "rejects O O"]  # a space-separated input stays so
    write_predictions(outer, [s.tags for s in outer.sentences], str(out))
    assert out.read_text(encoding="utf-8").splitlines()[:2] == ["Eurospeedway\tB-ORG\tB-ORG", "Lausitz\tI-ORG\tI-ORG"]


def test_bad_files_are_one_line_errors_naming_file_and_line(tmp_path):
    with pytest.raises(UserError, match=r"x.conll: line 2: 1 column\(s\)"):
        read_column_file(write(tmp_path, "x.conll", "a\tO\nmalformed\n"), "--train_file")
    with pytest.raises(UserError, match=r"line 3: 4 column\(s\).*--tag_column 6"):
        read_column_file(write(tmp_path, "y.conll", CONLL), "--train_file", tag_column=6)
    with pytest.raises(UserError, match=r"line 1: tag 'ORG' is not O, B-TYPE or I-TYPE"):
        read_column_file(write(tmp_path, "z.conll", "EU\tORG\n"), "--train_file")
    with pytest.raises(UserError, match=r"not UTF-8 text"):
        bad = tmp_path / "latin1.conll"
        bad.write_bytes("M\xfcnchen\tB-LOC\n".encode("latin-1"))
        read_column_file(str(bad), "--train_file")
    with pytest.raises(UserError, match="no token lines"):
        read_column_file(write(tmp_path, "empty.conll", "\n\n"), "--train_file")
    data = read_column_file(write(tmp_path, "dev.conll", "a\tO\n\nb\tB-PER\nc\tI-PERpart\n"), "--validation_file")
    with pytest.raises(UserError, match=r"dev.conll: line 4: tag 'I-PERpart' is not among the 3 labels .*--labels"):
        check_tags(data, ["O", "B-PER", "I-PER"], "of --train_file t")


# ------------------------------------------------------------------------------------------------ windows


def test_windows_score_every_word_once_at_its_first_sub_token(tiny):
    from transformers import AutoTokenizer

    rng = random.Random(0)
    words = ["the", "zygote", "xylophonequixotic", "", " ", "\x96", "#", "city", "jubilant"] * 3
    sentences = [["river"], words, [rng.choice(words) for _ in range(40)]]
    tag_ids = [list(range(len(s))) for s in sentences]  # a distinct label per word: the order is checked too
    names = [str(i) for i in range(40)]
    for tok in (AutoTokenizer.from_pretrained(tiny["bert"]), AutoTokenizer.from_pretrained(tiny["roberta"],
                                                                                           add_prefix_space=True)):
        unk = tok.unk_token_id
        for max_len in (4, 9, 64):
            rows = sentence_windows(tok, sentences, tag_ids, max_len)
            assert max(len(ids) for ids in rows["input_ids"]) <= max_len
            assert all(len(ids) == len(lab) for ids, lab in zip(rows["input_ids"], rows["labels"]))
            for r, (ids, labels) in enumerate(zip(rows["input_ids"], rows["labels"])):
                words_here = sentences[rows["sentence"][r]][rows["first_word"][r]:]
                scored = [i for i, label in enumerate(labels) if label != IGNORE]
                for k, i in enumerate(scored):  # the scored token is the word's own first piece
                    alone = tok(words_here[k], add_special_tokens=False)["input_ids"]
                    assert ids[i] == (alone[0] if alone else unk)
                    assert labels[i] == rows["first_word"][r] + k
            # Logits that point at each scored position's label give back every word's label, in order.
            logits = []
            for labels in rows["labels"]:
                row = np.zeros((len(labels), 40))
                for i, label in enumerate(labels):
                    if label != IGNORE:
                        row[i, label] = 1.0
                logits.append(row)
            back = word_predictions(rows, logits, len(sentences), names)
            assert back == [[str(i) for i in range(len(s))] for s in sentences]
            if max_len == 4:  # the long sentence was cut into windows, and a long word lost its tail only
                assert rows["sentence"].count(1) > 1


# ------------------------------------------------------------------------------------------------ metric


def test_entity_metric_by_hand_including_i_tags_that_open_an_entity():
    assert entity_spans(["B-PER", "I-PER", "O", "I-LOC"]) == {("PER", 0, 2), ("LOC", 3, 4)}
    assert entity_spans(["B-PER", "B-PER", "I-LOC", "I-PER"]) == {("PER", 0, 1), ("PER", 1, 2), ("LOC", 2, 3),
                                                                  ("PER", 3, 4)}
    gold = [["B-PER", "I-PER", "O", "B-LOC"],
            ["B-ORG", "I-ORG", "I-ORG", "O"],
            ["I-PER", "I-PER", "B-PER", "O", "I-LOC"]]  # IOB1: B- only between two entities of one type
    pred = [["B-PER", "I-PER", "O", "I-LOC"],  # I-LOC opens the LOC entity: both match
            ["B-ORG", "I-ORG", "O", "B-PER"],  # ORG span too short, PER spurious
            ["I-PER", "I-PER", "I-PER", "O", "I-LOC"]]  # one PER over both gold PERs; LOC right
    # Gold entities 2 + 1 + 3 = 6, predicted 2 + 2 + 2 = 6, right 2 + 0 + 1 = 3. Tokens right 3 + 2 + 4 of 13.
    # PER: gold 3, predicted 3, right 1; LOC: 2, 2, 2; ORG: 1, 1, 0.
    m = ner_scores(gold, pred)
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((0.5, 0.5, 0.5))
    assert m["accuracy"] == pytest.approx(9 / 13)
    assert m["per_type"]["PER"] == pytest.approx({"precision": 1 / 3, "recall": 1 / 3, "f1": 1 / 3, "support": 3})
    assert m["per_type"]["LOC"]["f1"] == 1.0 and m["per_type"]["ORG"] == {"precision": 0.0, "recall": 0.0,
                                                                           "f1": 0.0, "support": 1}
    nothing = ner_scores([["O", "O"]], [["O", "O"]])
    assert nothing["f1"] == 0.0 and nothing["accuracy"] == 1.0 and nothing["per_type"] == {}


def test_entity_metric_matches_seqeval():
    seqeval = pytest.importorskip("seqeval.metrics", reason="seqeval (optional) is not installed")
    rng = random.Random(0)
    tags = ["O", "O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "I-ORG", "B-ORG"]
    gold = [[rng.choice(tags) for _ in range(rng.randint(1, 12))] for _ in range(300)]
    pred = [[t if rng.random() < 0.7 else rng.choice(tags) for t in s] for s in gold]
    m = ner_scores(gold, pred)
    assert m["precision"] == pytest.approx(seqeval.precision_score(gold, pred))
    assert m["recall"] == pytest.approx(seqeval.recall_score(gold, pred))
    assert m["f1"] == pytest.approx(seqeval.f1_score(gold, pred))
    assert m["accuracy"] == pytest.approx(seqeval.accuracy_score(gold, pred))
    report = seqeval.classification_report(gold, pred, output_dict=True)
    for kind, scores in m["per_type"].items():
        assert scores["f1"] == pytest.approx(report[kind]["f1-score"]) and scores["support"] == report[kind]["support"]


# ------------------------------------------------------------------------------------------------ losses


@torch.no_grad()
def test_token_losses_match_the_model_and_average_over_scored_tokens():
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(0)
    model = BertForTokenClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                  num_attention_heads=2, intermediate_size=20, num_labels=5)).eval()
    ids = torch.randint(5, 50, (3, 6))
    labels = torch.randint(0, 5, (3, 6))
    labels[:, 0] = IGNORE
    labels[1, 3:] = IGNORE
    out = model(input_ids=ids, labels=labels)
    assert token_ce_loss(out.logits, labels) == pytest.approx(float(out.loss), rel=1e-6)

    teacher = torch.randn(3, 6, 5)
    by_hand, n = 0.0, 0
    for b in range(3):
        for i in range(6):
            if labels[b, i] != IGNORE:
                by_hand += F.kl_div(F.log_softmax(out.logits[b, i] / 2.0, -1), F.softmax(teacher[b, i] / 2.0, -1),
                                    reduction="sum")
                n += 1
    kd = token_kd_loss(out.logits, teacher, labels, 2.0)
    assert kd == pytest.approx(float(by_hand / n * 4.0), rel=1e-5)
    scored = labels != IGNORE
    for kind in ("forward_kl", "jsd", "tvd"):  # --kd_loss: the shared divergence, on the scored tokens only
        assert token_kd_loss(out.logits, teacher, labels, 2.0, kind) == pytest.approx(
            float(soft_target_divergence(out.logits[scored], teacher[scored], 2.0, kd_loss=kind)), rel=1e-5)
    assert token_kd_loss(out.logits, teacher, torch.full_like(labels, IGNORE), 2.0) == 0.0


# ------------------------------------------------------------------------------------------------ end to end

# Names the tiny tokenizer splits into pieces whose first one (z, q, j, k, v) starts no corpus word.
ENTITIES = {"PER": ["zygote", "quixotic xylophone"], "LOC": ["jubilant", "kyoto"], "ORG": ["vexillology"]}


def make_sentences(lines, n, seed):
    """Corpus words (lines without the rare words, which serve as names) with one or two entities inserted, as
    (words, BIO tags)."""
    rng = random.Random(seed)
    names = {w for kind in ENTITIES.values() for name in kind for w in name.split()}
    pool = [line.lower().split()[:9] for line in lines if len(line.split()) > 9 and not names & set(line.split())]
    out = []
    for i in range(n):
        words = list(pool[i % len(pool)])
        tags = ["O"] * len(words)
        for _ in range(1 + i % 2):
            kind = rng.choice(sorted(ENTITIES))
            name = rng.choice(ENTITIES[kind]).split()
            at = rng.randrange(len(words) + 1)
            words[at:at] = name
            tags[at:at] = [f"B-{kind}"] + [f"I-{kind}"] * (len(name) - 1)
        out.append((words, tags))
    return out


def column_text(sentences):
    return "".join("".join(f"{w}\t{t}\n" for w, t in zip(words, tags)) + "\n" for words, tags in sentences)


@pytest.fixture(scope="module")
def ner_data(tiny, tmp_path_factory):
    """A DistilBERT student folder sharing the tiny BERT's tokenizer, train and dev column files, and a teacher:
    the tiny BERT fine-tuned on them in one process."""
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertForMaskedLM

    root = tmp_path_factory.mktemp("ner")
    torch.manual_seed(0)
    student = root / "student"
    DistilBertForMaskedLM(DistilBertConfig.from_json_file(tiny["distilbert_config"])).save_pretrained(student)
    AutoTokenizer.from_pretrained(tiny["bert"]).save_pretrained(student)
    (root / "train.conll").write_text(column_text(make_sentences(tiny["lines"], 120, 0)))
    (root / "dev.conll").write_text(column_text(make_sentences(tiny["lines"][150:], 30, 1)))
    d = {"root": root, "student": student, "train": root / "train.conll", "dev": root / "dev.conll",
         "lines": tiny["lines"]}
    d["teacher"] = root / "teacher"
    run_script(*ner_args(d, d["teacher"], tiny["bert"], "--num_train_epochs", "6"), env=SCRIPT_ENV)
    return d


def ner_args(d, out, model, *extra):
    return ["run_ner_w_distillation.py", "--train_file", d["train"], "--validation_file", d["dev"],
            "--model_name_or_path", model, "--output_dir", out, "--do_train", "--do_eval", "--max_seq_length", "64",
            "--per_gpu_train_batch_size", "8", "--learning_rate", "3e-3", "--warmup_steps", "5", "--logging_steps",
            "5", "--save_steps", "0", *extra]


def results(folder):
    with open(os.path.join(folder, "eval_results.json")) as f:
        return json.load(f)


def weights(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


@torch.no_grad()
def word_by_word(folder, data):
    """Each word's tag as the saved model predicts it, computed here: the whole sentence at once (no windows),
    the arg-max at the word's first sub-token."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    model = AutoModelForTokenClassification.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    out = []
    for s in data.sentences:
        enc = tok(s.words, is_split_into_words=True, return_tensors="pt")
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[0]
        firsts = {}
        for i, word in enumerate(enc.word_ids()):
            if word is not None:
                firsts.setdefault(word, i)
        out.append([model.config.id2label[int(logits[firsts[w]].argmax())] for w in range(len(s.words))])
    return out


DISTILL = ("--num_train_epochs", "3", "--save_steps", "20")


@pytest.fixture(scope="module")
def distilled(ner_data):
    """The student task-distilled from the teacher in one process, with a checkpoint every 20 steps."""
    d = ner_data
    student = d["root"] / "student_distilled"
    run_script(*ner_args(d, student, d["student"], "--teacher_name_or_path", d["teacher"], *DISTILL), env=SCRIPT_ENV)
    return student


def test_end_to_end_one_process_with_a_teacher_and_the_table(ner_data, distilled):
    d = ner_data
    teacher, student = d["teacher"], distilled
    log = [json.loads(line) for line in (student / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "loss_task", "loss_ce"} <= set(log[-1]) and log[0]["loss_ce"] > 0
    assert results(teacher)["metrics"]["f1"] > 0.6  # the entities are learnable: the teacher learnt them

    # predictions.txt is the dev file with predicted tags; they are the saved model's own, word by word, and the
    # scores are those of these predictions.
    dev = read_column_file(str(d["dev"]), "--validation_file")
    predicted = read_column_file(str(student / "predictions.txt"), "predictions")
    assert [s.words for s in predicted.sentences] == [s.words for s in dev.sentences]
    assert [s.tags for s in predicted.sentences] == word_by_word(student, dev)
    assert [[f[1] for f in s.fields] for s in predicted.sentences] == [s.tags for s in dev.sentences]  # gold
    scores = ner_scores([s.tags for s in dev.sentences], [s.tags for s in predicted.sentences])
    record = results(student)
    assert record["metrics"] == pytest.approx({k: scores[k] for k in ("precision", "recall", "f1", "accuracy")})
    assert record["task"] == "ner" and record["score"] == pytest.approx(100 * scores["f1"])
    assert 1 / len(record["labels"]) < record["mean_confidence"] <= 1
    assert set(record["per_type"]) <= {"PER", "LOC", "ORG"}

    table = load_script("downstream_table")
    out = d["root"] / "table"
    table.main(["--teacher", "T", str(teacher), "--student", "S", str(student), "--output", str(out), "--no_speed"])
    tab, md = json.loads((d["root"] / "table.json").read_text()), (d["root"] / "table.md").read_text()
    share = record["score"] / results(teacher)["score"]
    assert tab["ner_tasks"] == ["ner"] and tab["rows"][1]["ner_share_of_teacher"] == pytest.approx(share)
    assert "NER entity F1" in md and f"{100 * share:.0f}% (NER F1)" in md and "Macro" not in md


def test_teacher_in_another_label_order_teaches_the_same(ner_data, distilled, tmp_path):
    """A teacher whose head lists the labels in another order (its config says which) gives the student the same
    losses and weights (to rounding): its logits are read by label name. Evaluated alone, it scores as before."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    d = ner_data
    model = AutoModelForTokenClassification.from_pretrained(d["teacher"])
    n = model.config.num_labels
    perm = list(reversed(range(n)))  # new output j is old output perm[j]
    with torch.no_grad():
        model.classifier.weight.copy_(model.classifier.weight[perm])
        model.classifier.bias.copy_(model.classifier.bias[perm])
    names = [model.config.id2label[perm[j]] for j in range(n)]
    model.config.id2label, model.config.label2id = dict(enumerate(names)), {x: j for j, x in enumerate(names)}
    permuted = tmp_path / "teacher_permuted"
    model.save_pretrained(permuted)
    AutoTokenizer.from_pretrained(d["teacher"]).save_pretrained(permuted)

    b = tmp_path / "b"
    run_script(*ner_args(d, b, d["student"], "--teacher_name_or_path", permuted, *DISTILL), env=SCRIPT_ENV)
    # The permuted head's matrix product rounds differently (~3e-8 in the logits), which 45 Adam steps grow to
    # ~3e-5 in the weights; a teacher read in the wrong order would change the KD term from the first step.
    log_a, log_b = ([json.loads(line)["loss_ce"] for line in (f / "metrics.jsonl").read_text().splitlines()]
                    for f in (distilled, b))
    assert log_b == pytest.approx(log_a, rel=1e-5)
    wa, wb = weights(distilled), weights(b)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-4) for k in wa)
    import run_ner_w_distillation as script

    original_order = ",".join(results(d["teacher"])["labels"])  # read through the permutation
    script.main([str(x) for x in ["--validation_file", d["dev"], "--model_name_or_path", permuted, "--output_dir",
                                  tmp_path / "eval", "--do_eval", "--max_seq_length", "64",
                                  "--labels", original_order]])
    assert results(tmp_path / "eval")["metrics"] == results(d["teacher"])["metrics"]


def test_two_processes_and_exact_resume(ner_data, distilled, tmp_path):
    d = ner_data
    two = tmp_path / "two"
    run_torchrun(*ner_args(d, two, d["student"], "--teacher_name_or_path", d["teacher"], "--num_train_epochs", "2"),
                 env=SCRIPT_ENV)
    dev = read_column_file(str(d["dev"]), "--validation_file")
    # The two ranks' shares of the evaluation were gathered back in order: every word's tag is the model's own.
    assert [s.tags for s in read_column_file(str(two / "predictions.txt"), "p").sentences] == word_by_word(two, dev)
    assert results(two)["n_examples"] == len(dev.sentences)

    # Resume: the one-process distillation run, stopped after its first checkpoint, ends with the same weights.
    full, cut = distilled, tmp_path / "resumed"
    shutil.copytree(full, cut)
    for name in os.listdir(cut):
        if name.startswith("checkpoint-") and name != "checkpoint-20":
            shutil.rmtree(cut / name)
    os.remove(cut / "model.safetensors")
    run_script(*ner_args(d, cut, d["student"], "--teacher_name_or_path", d["teacher"], *DISTILL, "--resume"),
               env=SCRIPT_ENV)
    a, c = weights(full), weights(cut)
    assert all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)
    assert results(cut)["metrics"] == results(full)["metrics"]


def test_unlabelled_text_trains_with_the_same_steps_and_resumes_exactly(ner_data, distilled, tmp_path):
    """--unlabeled_file (tokens only, one per line): the run takes the labelled run's optimizer steps, its
    distillation term reads the unlabelled sentences too (so the weights differ), and a run stopped at its first
    checkpoint and resumed ends with the same weights (the unlabelled stream is drawn again, not saved)."""
    d = ner_data
    unlabelled = tmp_path / "unlabelled.txt"
    sentences = make_sentences(d["lines"][200:], 40, 2)
    unlabelled.write_text("".join("\n".join(words) + "\n\n" for words, _ in sentences))
    full = tmp_path / "with_unlabelled"
    flags = ("--teacher_name_or_path", d["teacher"], *DISTILL, "--unlabeled_file", unlabelled, "--unlabeled_ratio", "2")
    proc = run_in_process(*ner_args(d, full, d["student"], *flags), env=SCRIPT_ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = [json.loads(line)["step"] for line in (full / "metrics.jsonl").read_text().splitlines()]
    plain = [json.loads(line)["step"] for line in (distilled / "metrics.jsonl").read_text().splitlines()]
    assert steps == plain
    a, b = weights(full), weights(distilled)
    assert any(not torch.allclose(a[k], b[k], atol=1e-4) for k in a)

    cut = tmp_path / "resumed"
    shutil.copytree(full, cut)
    for name in os.listdir(cut):
        if name.startswith("checkpoint-") and name != "checkpoint-20":
            shutil.rmtree(cut / name)
    os.remove(cut / "model.safetensors")
    proc = run_in_process(*ner_args(d, cut, d["student"], *flags, "--resume"), env=SCRIPT_ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    c = weights(cut)
    assert all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)


def test_hub_data_set_with_class_label_tags(ner_data, tmp_path):
    """--dataset_name: a data set with tokens / ner_tags columns, tags as ClassLabel ids as on the hub (here a
    DatasetDict saved with save_to_disk, which --dataset_name also takes, since the tests run offline)."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Sequence, Value

    import run_ner_w_distillation as script

    d = ner_data
    labels = results(d["teacher"])["labels"]
    dev = read_column_file(str(d["dev"]), "--validation_file")
    features = Features({"tokens": Sequence(Value("string")), "ner_tags": Sequence(ClassLabel(names=labels))})
    rows = {"tokens": [s.words for s in dev.sentences],
            "ner_tags": [[labels.index(t) for t in s.tags] for s in dev.sentences]}
    hub = tmp_path / "hub"
    DatasetDict({"validation": Dataset.from_dict(rows, features=features)}).save_to_disk(hub)
    script.main([str(x) for x in ["--dataset_name", hub, "--model_name_or_path", d["teacher"], "--output_dir",
                                  tmp_path / "out", "--do_eval", "--max_seq_length", "64"]])
    assert results(tmp_path / "out")["metrics"] == results(d["teacher"])["metrics"]


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_input_is_one_line_and_writes_nothing(ner_data, tmp_path, capsys):
    import run_ner_w_distillation as script
    from transformers import AutoModelForTokenClassification

    d = ner_data
    out = tmp_path / "out"
    base = [str(a) for a in ner_args(d, out, d["student"])[1:]]

    def with_file(flag, text):
        path = write(tmp_path, f"f{abs(hash(text))}.conll", text)
        args = list(base)
        args[args.index(flag) + 1] = path
        return args, path

    args, path = with_file("--train_file", "a\tO\nb\tB-PER\n\nc\n")
    expect_error(capsys, script.main, args, f"--train_file {path}: line 4", "1 column(s)")
    expect_error(capsys, script.main, base + ["--tag_column", "3"], "line 1: 2 column(s)", "--tag_column 3")
    args, path = with_file("--validation_file", "alice\tB-PER\nparis\tB-CITY\n")
    expect_error(capsys, script.main, args, f"{path}: line 2: tag 'B-CITY' is not among the 5 labels of --train_file",
                 "--labels")
    expect_error(capsys, script.main, base + ["--labels", "O,B-PER,I-PER"], "is not among the 3 labels (--labels")

    other = tmp_path / "teacher_other_labels"
    model = AutoModelForTokenClassification.from_pretrained(d["teacher"])
    model.config.id2label = {i: f"X{i}" for i in range(model.config.num_labels)}
    model.save_pretrained(other)
    shutil.copy(d["teacher"] / "tokenizer.json", other)
    shutil.copy(d["teacher"] / "tokenizer_config.json", other)
    expect_error(capsys, script.main, base + ["--teacher_name_or_path", other], "--teacher_name_or_path",
                 "are not the task's")
    expect_error(capsys, script.main, base + ["--teacher_name_or_path", d["student"]],
                 "fine-tune the teacher on the task first")  # a masked LM: its tagging head would be random
    assert not out.exists()
