"""GLUE metrics against hand computations, label checks, and reading task files."""
import numpy as np
import pytest

from tasks.glue import (binary_f1, get_task, glue_metrics, infer_custom_task, label_ids, load_file,
                         matthews_correlation, task_score)
from conftest import expect_error
from utils import UserError


def test_matthews_and_f1_by_hand():
    preds, labels = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    # tp 2, tn 1, fp 1, fn 1: MCC = (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6; F1 = 2*(2/3)*(2/3)/(4/3) = 2/3.
    assert matthews_correlation(preds, labels) == pytest.approx(1 / 6)
    assert binary_f1(preds, labels) == pytest.approx(2 / 3)
    assert matthews_correlation([1, 1, 1], [1, 0, 1]) == 0.0  # constant prediction: undefined, reported as 0
    assert binary_f1([0, 0], [1, 1]) == 0.0


def test_glue_metrics_and_scores():
    logits = np.array([[0.1, 0.9], [2.0, -1.0], [0.0, 1.0], [0.3, 0.2]])  # predictions 1, 0, 1, 0
    labels = [1, 0, 0, 0]
    m = glue_metrics(get_task("MRPC"), logits, labels)
    assert m["accuracy"] == 0.75 and m["f1"] == pytest.approx(2 / 3)  # tp 1, fp 1, fn 0
    assert task_score(get_task("mrpc"), m) == pytest.approx(100 * (0.75 + 2 / 3) / 2)
    assert set(glue_metrics(get_task("cola"), logits, labels)) == {"matthews_correlation"}

    x = np.array([0.5, 1.0, 3.0, 2.0, 4.5])
    y = [1.0, 2.0, 2.5, 4.0, 5.0]
    m = glue_metrics(get_task("stsb"), x[:, None], y)
    assert m["pearson"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    # Ranks of x: 1 2 4 3 5, of y: 1 2 3 4 5; Spearman = 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 12/120.
    assert m["spearmanr"] == pytest.approx(0.9)


def test_task_names():
    assert get_task("SST-2").name == "sst2" and get_task("sts-b").is_regression
    assert get_task("my_task") is None


def test_labels_checked_with_their_row():
    sst2 = get_task("sst2")
    assert label_ids([0, 1, "1", "positive"], sst2, "f") == [0, 1, 1, 1]
    with pytest.raises(UserError, match=r"f: row 3: label 2 is out of range for 2 classes"):
        label_ids([0, 1, 2], sst2, "f")
    with pytest.raises(UserError, match=r"row 1: label -1"):
        label_ids([-1], sst2, "f")
    with pytest.raises(UserError, match=r"row 2: label 'maybe' is not one of the labels"):
        label_ids(["negative", "maybe"], sst2, "f")
    with pytest.raises(UserError, match="regression"):
        label_ids([0.5], sst2, "f")
    assert label_ids(["2.5", 3], get_task("stsb"), "f") == [2.5, 3.0]


def test_tasks_of_your_own():
    t = infer_custom_task("topic", ["b", "a", "c", "a"])
    assert t.num_labels == 3 and t.label_names == ("a", "b", "c")
    assert label_ids(["c", "a"], t, "f", t.label_names) == [2, 0]
    assert infer_custom_task("score", [0.5, 1.25]).is_regression
    assert infer_custom_task("ids", [0, 3, 1]).num_labels == 4
    with pytest.raises(UserError, match="--num_labels 2"):
        infer_custom_task("topic", ["a", "b", "c"], num_labels=2)


def test_tsv_with_quotes_and_na_text(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text('sentence1\tsentence2\tlabel\n"He said ""no"", twice."\tNA\t1\nnull\tplain text\t0\n')
    data = load_file(str(path), "--train_file", cache_dir=str(tmp_path / "cache"))
    assert data["sentence1"] == ['He said "no", twice.', "null"]
    assert data["sentence2"] == ["NA", "plain text"]  # text stays text
    assert list(data["label"]) == [1, 0]
    jsonl = tmp_path / "dev.jsonl"
    jsonl.write_text('{"sentence": "good", "label": 1}\n{"sentence": "bad", "label": 0}\n')
    assert load_file(str(jsonl), "--validation_file", cache_dir=str(tmp_path / "cache"))["sentence"] == ["good", "bad"]
    txt = tmp_path / "train.txt"
    txt.write_text("a\n")
    with pytest.raises(UserError, match="unknown format .txt"):
        load_file(str(txt), "--train_file")


def test_text_pair_column_alone_names_the_second_sentence(tmp_path):
    import argparse

    from tasks.glue import text_columns

    path = tmp_path / "pairs.tsv"
    path.write_text("sentence\tother\tlabel\nfirst words\tsecond words\t1\n")
    data = load_file(str(path), "--train_file", cache_dir=str(tmp_path / "cache"))

    def columns(text_column=None, text_pair_column=None):
        args = argparse.Namespace(text_column=text_column, text_pair_column=text_pair_column, label_column="label")
        return text_columns(data, None, args, "f")

    assert columns() == ("sentence", None)
    assert columns(text_pair_column="other") == ("sentence", "other")  # was silently a single-sentence task
    assert columns(text_column="other") == ("other", None)
    assert columns("other", "sentence") == ("other", "sentence")
    with pytest.raises(UserError, match="no column 'missing'.*--text_pair_column"):
        columns(text_pair_column="missing")


def test_pairs_tokenised_with_a_distilbert_tokenizer_carry_segment_ids(tiny, real_folders, tmp_path):
    """The rows a BERT teacher reads have its segment ids even when the student's tokenizer (DistilBERT's) returns
    none by default: the same ids as the teacher's own tokenizer gives."""
    import argparse

    from transformers import AutoTokenizer

    from run_glue_w_distillation import tokenize

    path = tmp_path / "mrpc.tsv"
    path.write_text("sentence1\tsentence2\tlabel\n" + "".join(f"{a}\t{b}\t{i % 2}\n" for i, (a, b) in enumerate(
        zip(tiny["lines"][1:9], tiny["lines"][11:19]))))
    data = load_file(str(path), "--train_file", cache_dir=str(tmp_path / "cache"))
    args = argparse.Namespace(task_name="mrpc", text_column=None, text_pair_column=None, label_column="label",
                              max_seq_length=32, overwrite_cache=True, threads=1)
    rows = {}
    for name, folder in (("student", real_folders["distilbert"]), ("teacher", tiny["bert"])):
        rows[name] = tokenize(args, AutoTokenizer.from_pretrained(folder), data, get_task("mrpc"), "f")
    assert rows["student"]["input_ids"] == rows["teacher"]["input_ids"]
    assert rows["student"]["token_type_ids"] == rows["teacher"]["token_type_ids"]
    assert all(1 in row for row in rows["student"]["token_type_ids"])


def test_a_file_that_does_not_fit_the_named_task_is_refused_and_the_columns_read_are_said(tiny, tmp_path, capsys,
                                                                                          caplog):
    """--task_name sst2 given MRPC's two-sentence file used to train silently as a pair task."""
    import logging

    import run_glue_w_distillation as glue

    caplog.set_level(logging.INFO, logger="distil")
    pairs, single = tmp_path / "pairs.tsv", tmp_path / "single.tsv"
    pairs.write_text("sentence1\tsentence2\tlabel\n" + "".join(f"{a}\t{b}\t{i % 2}\n" for i, (a, b) in enumerate(
        zip(tiny["lines"][1:9], tiny["lines"][11:19]))))
    single.write_text("sentence\tlabel\n" + "".join(f"{a}\t{i % 2}\n" for i, a in enumerate(tiny["lines"][1:9])))

    def argv(task, train, *extra):
        return ["--task_name", task, "--train_file", train, "--model_name_or_path", tiny["bert"], "--output_dir",
                tmp_path / f"out_{task}_{train.stem}", "--do_train", "--max_steps", "1", "--cache_dir",
                tmp_path / "cache", *extra]

    expect_error(capsys, glue.main, argv("sst2", pairs), f"--train_file {pairs}", "--task_name sst2 is a "
                 "single-sentence task", "sentence pairs (sentence1, sentence2", "--text_column")
    expect_error(capsys, glue.main, argv("mrpc", single), f"--train_file {single}", "--task_name mrpc is a "
                 "sentence-pair task", "one text column (sentence")
    assert not list(tmp_path.glob("out_*"))
    # Both texts read, and said so; naming the column is the way to read one text of a pair file.
    glue.main([str(a) for a in argv("mrpc", pairs)])
    assert f"--train_file {pairs}: text from column 'sentence1' paired with 'sentence2', label from column " \
           "'label' (a sentence-pair task)" in caplog.text
    glue.main([str(a) for a in argv("sst2", pairs, "--text_column", "sentence2")])
    assert "text from column 'sentence2', label from column 'label' (a single-sentence task)" in caplog.text
