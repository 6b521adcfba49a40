"""Task distillation: the loss maths against direct computations, then the scripts end to end on tiny local
models and data (teacher fine-tune -> student task-distil -> evaluate -> table, one process and two), exact
resume, and bad input."""
import json
import os
import random
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, expect_error, load_script, run_in_process, run_script, run_torchrun
from distil.losses import (classification_kd_loss, classification_loss, soft_target_kl, span_ce_loss, span_kd_loss,
                           task_distillation_loss)
from test_squad import make_records

SCRIPT_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


# ------------------------------------------------------------------------------------------------ losses


def test_soft_target_kl_equals_direct_computation():
    torch.manual_seed(0)
    s, t, T = torch.randn(3, 7), torch.randn(3, 7), 2.0
    expected = 0.0
    for row in range(3):
        p_t = torch.softmax(t[row] / T, -1)
        p_s = torch.softmax(s[row] / T, -1)
        expected += sum(p_t[i] * torch.log(p_t[i] / p_s[i]) for i in range(7))
    assert soft_target_kl(s, t, T) == pytest.approx(float(expected / 3 * T ** 2), rel=1e-5)
    # A masked-out position counts for nothing: same as the KL over the kept positions alone.
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[:, 5:] = False
    s_noisy = s.clone()
    s_noisy[:, 5:] = 100.0
    assert soft_target_kl(s_noisy, t, T, mask) == pytest.approx(float(soft_target_kl(s[:, :5], t[:, :5], T)), rel=1e-6)
    assert soft_target_kl(t, t, T) == pytest.approx(0.0, abs=1e-6)


@torch.no_grad()
def test_span_losses_match_the_model_and_leave_padding_out():
    from transformers import BertConfig, BertForQuestionAnswering

    torch.manual_seed(0)
    model = BertForQuestionAnswering(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=20)).eval()
    ids = torch.randint(5, 50, (4, 9))
    attn = torch.ones(4, 9, dtype=torch.long)
    attn[1, 6:] = 0
    starts, ends = torch.tensor([1, 2, 0, 30]), torch.tensor([3, 4, 0, 30])  # 30: outside, ignored as the model does
    out = model(input_ids=ids, attention_mask=attn, start_positions=starts, end_positions=ends)
    assert span_ce_loss(out.start_logits, out.end_logits, starts, ends) == pytest.approx(float(out.loss), rel=1e-6)

    t_start, t_end = torch.randn(4, 9), torch.randn(4, 9)
    kd = span_kd_loss(out.start_logits, out.end_logits, t_start, t_end, 3.0, attn)
    by_hand = 0.0
    for s, t in ((out.start_logits, t_start), (out.end_logits, t_end)):
        for row in range(4):
            n = int(attn[row].sum())
            by_hand += F.kl_div(F.log_softmax(s[row, :n] / 3.0, -1), F.softmax(t[row, :n] / 3.0, -1), reduction="sum")
    assert kd == pytest.approx(float(by_hand / 4 / 2 * 9.0), rel=1e-5)
    assert task_distillation_loss(torch.tensor(2.0), kd, 0.25, 0.5) == pytest.approx(0.5 + 0.5 * float(kd))
    assert task_distillation_loss(torch.tensor(2.0), None, 0.25, 0.5) == 2.0  # no teacher: the task loss alone


@torch.no_grad()
def test_classification_losses_match_the_model():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    ids = torch.randint(5, 50, (4, 6))
    for num_labels, labels in ((3, torch.tensor([0, 2, 1, 1])), (1, torch.tensor([0.5, 1.0, 4.0, 2.5]))):
        model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                         num_attention_heads=2, intermediate_size=20,
                                                         num_labels=num_labels)).eval()
        out = model(input_ids=ids, labels=labels)
        assert classification_loss(out.logits, labels) == pytest.approx(float(out.loss), rel=1e-6)
    teacher = torch.tensor([[1.0], [2.0], [0.0], [3.0]])
    assert classification_kd_loss(out.logits, teacher, 2.0) == pytest.approx(
        float(((out.logits - teacher) ** 2).mean()), rel=1e-6)


def test_mean_confidence_by_hand():
    import math

    from tasks.evaluation import mean_confidence

    # softmax([0, ln 3]) = [0.25, 0.75]; softmax([ln 4, 0, 0]) = [4/6, 1/6, 1/6]
    assert mean_confidence([[0.0, math.log(3)], [math.log(3), 0.0]]) == pytest.approx(0.75)
    assert mean_confidence([[math.log(4), 0.0, 0.0]]) == pytest.approx(4 / 6)
    assert mean_confidence([[1000.0, 0.0]]) == pytest.approx(1.0)  # no overflow


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def task_data(tiny, tmp_path_factory):
    """A DistilBERT student folder sharing the tiny BERT's tokenizer, a sentence task and a SQuAD file."""
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertForMaskedLM

    root = tmp_path_factory.mktemp("task")
    torch.manual_seed(0)
    student = root / "student"
    DistilBertForMaskedLM(DistilBertConfig.from_json_file(tiny["distilbert_config"])).save_pretrained(student)
    AutoTokenizer.from_pretrained(tiny["bert"]).save_pretrained(student)
    # A balanced, learnable sentence task: ten corpus words plus a keyword that decides the label.
    rng = random.Random(0)
    rows = []
    for i, line in enumerate(line for line in tiny["lines"] if len(line.split()) > 10):
        words = line.split()[:10]
        words.insert(rng.randrange(10), "zygote" if i % 2 else "xylophone")
        rows.append(f"{' '.join(words)}\t{i % 2}")
    (root / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows[:160]) + "\n")
    (root / "dev.tsv").write_text("sentence\tlabel\n" + "\n".join(rows[160:220]) + "\n")
    records = make_records(tiny["lines"], n_contexts=10, long=False)
    squad = {"version": "1.1", "data": [{"title": "t", "paragraphs": [
        {"context": r["context"], "qas": [{k: r[k] for k in ("id", "question", "answers")}]} for r in records]}]}
    (root / "squad.json").write_text(json.dumps(squad))
    return {"root": root, "student": student, "teacher": tiny["bert"], "train": root / "train.tsv",
            "dev": root / "dev.tsv", "squad": root / "squad.json"}


def glue_args(d, out, model, *extra):
    return ["run_glue_w_distillation.py", "--task_name", "sst2", "--train_file", d["train"], "--validation_file",
            d["dev"], "--model_name_or_path", model, "--output_dir", out, "--do_train", "--do_eval",
            "--per_gpu_train_batch_size", "8", "--learning_rate", "1e-3", "--logging_steps", "5", "--save_steps", "0",
            "--cache_dir", d["root"] / "cache", *extra]


def squad_args(d, out, model, *extra):
    return ["run_squad_w_distillation.py", "--train_file", d["squad"], "--predict_file", d["squad"],
            "--model_name_or_path", model, "--output_dir", out, "--do_train", "--do_eval", "--max_seq_length", "48",
            "--doc_stride", "16", "--max_query_length", "12", "--per_gpu_train_batch_size", "4", "--learning_rate",
            "1e-3", "--logging_steps", "4", "--save_steps", "0", "--cache_dir", d["root"] / "cache", *extra]


def results(folder):
    with open(os.path.join(folder, "eval_results.json")) as f:
        return json.load(f)


def weights(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


def table(d, name, teacher, student):
    """scripts/downstream_table.py run in this process (its main(), as the command line calls it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("downstream_table", os.path.join(REPO, "scripts",
                                                                                    "downstream_table.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = d["root"] / name
    module.main(["--teacher", "T", str(teacher), "--student", "S", str(student), "--output", str(out), "--no_speed"])
    with open(f"{out}.json") as f:
        return json.load(f), (d["root"] / f"{name}.md").read_text()


@pytest.fixture(scope="module")
def squad_teacher(task_data):
    """A SQuAD teacher fine-tuned in two gloo processes (the first half of the two-process end-to-end run)."""
    folder = task_data["root"] / "squad_teacher"
    run_torchrun(*squad_args(task_data, folder, task_data["teacher"], "--num_train_epochs", "3"), env=SCRIPT_ENV)
    return folder


# ------------------------------------------------------------------------------------------------ end to end


GLUE_FAST = ("--learning_rate", "3e-3", "--warmup_steps", "10")


@pytest.fixture(scope="module")
def glue_teacher(task_data):
    """A BERT teacher fine-tuned on the sentence task by the script (its own tokenizer saved beside it)."""
    folder = task_data["root"] / "glue_teacher"
    run_script(*glue_args(task_data, folder, task_data["teacher"], "--num_train_epochs", "8", *GLUE_FAST),
               env=SCRIPT_ENV)
    return folder


def test_glue_end_to_end_one_process(task_data, glue_teacher):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    d = task_data
    teacher, student = glue_teacher, d["root"] / "glue_student"
    proc = run_script(*glue_args(d, student, d["student"], "--teacher_name_or_path", teacher, "--num_train_epochs",
                                 "4", *GLUE_FAST), env=SCRIPT_ENV)
    # The student's new head is said in one line, without transformers' LOAD REPORT table.
    assert "tensor(s) start from random init (the task head)" in proc.stderr and "LOAD REPORT" not in proc.stderr
    log = [json.loads(line) for line in (student / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "loss_task", "loss_ce"} <= set(log[-1]) and log[0]["loss_ce"] > 0

    # The script's accuracy equals one computed here, row by row, on the saved student.
    model = AutoModelForSequenceClassification.from_pretrained(student).eval()
    tok = AutoTokenizer.from_pretrained(student)
    rows = [line.split("\t") for line in d["dev"].read_text().splitlines()[1:]]
    correct = 0
    with torch.no_grad():
        for text, label in rows:
            enc = tok(text, truncation=True, max_length=64, return_tensors="pt")
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
            correct += int(logits.argmax(-1)) == int(label)
    assert results(student)["metrics"]["accuracy"] == pytest.approx(correct / len(rows))
    assert results(teacher)["metrics"]["accuracy"] > 0.7  # the label is learnable: the teacher learnt it

    tab, md = table(d, "glue_table", teacher, student)
    t_score, s_score = results(teacher)["score"], results(student)["score"]
    assert [r["model"] for r in tab["rows"]] == ["T", "S"] and tab["tasks"] == ["sst2"]
    assert tab["rows"][1]["share_of_teacher"] == pytest.approx(s_score / t_score)
    assert f"{100 * s_score / t_score:.0f}% (macro)" in md and "SST-2" in md


def test_squad_end_to_end_two_processes(task_data, squad_teacher):
    d = task_data
    teacher, student = squad_teacher, d["root"] / "squad_student"
    run_torchrun(*squad_args(d, student, d["student"], "--teacher_name_or_path", teacher, "--num_train_epochs", "1"),
             env=SCRIPT_ENV)
    two = results(student)
    assert two["task"] == "squad" and two["metrics"]["total"] == 30
    predictions = json.loads((student / "predictions.json").read_text())
    contexts = {r["id"]: r["context"] for r in make_records_from(d["squad"])}
    assert set(predictions) == set(contexts) and all(p in contexts[q] for q, p in predictions.items())

    # Evaluating the same weights in one process gives the same predictions: the two ranks' shares were
    # gathered back in order.
    single = d["root"] / "squad_single_eval"
    run_script("run_squad_w_distillation.py", "--predict_file", d["squad"], "--model_name_or_path", student,
               "--output_dir", single, "--do_eval", "--max_seq_length", "48", "--doc_stride", "16",
               "--max_query_length", "12", "--cache_dir", d["root"] / "cache", env=SCRIPT_ENV)
    assert json.loads((single / "predictions.json").read_text()) == predictions
    assert results(single)["metrics"] == two["metrics"]

    tab, _ = table(d, "squad_table", teacher, student)
    assert tab["squad_tasks"] == ["squad"]
    assert tab["rows"][1]["squad_share_of_teacher"] == pytest.approx(two["metrics"]["f1"] /
                                                                     results(teacher)["metrics"]["f1"])


def make_records_from(path):
    data = json.loads(path.read_text())
    return [dict(qa, context=p["context"]) for a in data["data"] for p in a["paragraphs"] for qa in p["qas"]]


def test_teacher_with_alpha_ce_zero_is_plain_fine_tuning_and_resume_is_exact(task_data, squad_teacher):
    """A teacher whose term weighs 0 changes nothing: same weights as fine-tuning without one (the teacher's
    forward draws no random numbers, and the task loss is the model's own, checked above). Then the plain run,
    resumed from its first checkpoint, ends with the same weights. The three runs are in-process
    (conftest.run_in_process: the script's __main__, without an interpreter start each); the script's real
    command lines run in test_squad_end_to_end_two_processes."""
    d = task_data
    plain, zero, cut = d["root"] / "plain", d["root"] / "alpha0", d["root"] / "resumed"
    steps = ("--max_steps", "7", "--save_steps", "3")
    run_in_process(*squad_args(d, plain, d["student"], *steps), env=SCRIPT_ENV)
    run_in_process(*squad_args(d, zero, d["student"], *steps, "--teacher_name_or_path", squad_teacher,
                               "--alpha_ce", "0", "--alpha_squad", "1"), env=SCRIPT_ENV)
    a, b = weights(plain), weights(zero)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first = [json.loads(line) for line in (zero / "metrics.jsonl").read_text().splitlines()][0]
    assert first["loss_ce"] > 0 and first["loss"] == pytest.approx(first["loss_squad"])  # the teacher did run

    shutil.copytree(plain, cut)
    shutil.rmtree(cut / "checkpoint-6")  # as if stopped between steps 6 and 7: resume from step 3
    os.remove(cut / "model.safetensors")
    run_in_process(*squad_args(d, cut, d["student"], *steps, "--resume"), env=SCRIPT_ENV)
    c = weights(cut)
    assert all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)
    assert (cut / "checkpoint-6").is_dir() and results(cut)["metrics"] == results(plain)["metrics"]


def test_glue_unlabelled_text_trains_the_kd_term_without_reading_a_label(task_data, glue_teacher):
    """--unlabeled_file: a file without a label column and the same file with nonsense labels train the same
    weights (the labels are never read), and with the same optimizer steps as the run without unlabelled text,
    whose weights they do not equal (the unlabelled rows reach the student through the teacher)."""
    d = task_data
    texts = [line.split("\t")[0] for line in d["dev"].read_text().splitlines()[1:]]
    bare, junk = d["root"] / "unlabelled.tsv", d["root"] / "unlabelled_junk.tsv"
    bare.write_text("sentence\n" + "\n".join(texts) + "\n")
    junk.write_text("sentence\tlabel\n" + "\n".join(f"{t}\t{7 + i}" for i, t in enumerate(texts)) + "\n")
    runs = {}
    for name, extra in (("none", ()), ("bare", ("--unlabeled_file", bare)), ("junk", ("--unlabeled_file", junk))):
        runs[name] = d["root"] / f"unlabelled_{name}"
        proc = run_in_process(*glue_args(d, runs[name], d["student"], "--teacher_name_or_path", glue_teacher,
                                         "--max_steps", "6", "--unlabeled_ratio", "1.5", *extra), env=SCRIPT_ENV)
        assert proc.returncode == 0, proc.stderr[-2000:]
    a, b, c = (weights(runs[k]) for k in ("bare", "junk", "none"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.allclose(a[k], c[k], atol=1e-5) for k in a)
    steps = [[json.loads(line)["step"] for line in (runs[k] / "metrics.jsonl").read_text().splitlines()]
             for k in ("bare", "none")]
    assert steps[0] == steps[1] == [5, 6]


# ------------------------------------------------------------------------------------------------ bad input


@pytest.fixture(scope="module")
def bad_teachers(task_data):
    """Teachers with a classification head that do not fit the student: 3 labels; a bigger vocabulary; the
    same vocabulary size with two tokens swapped."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertTokenizer

    root = task_data["root"]
    tok = AutoTokenizer.from_pretrained(task_data["student"])
    cfg = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
               max_position_embeddings=64)
    out = {}
    for name, vocab, labels in (("three_labels", len(tok), 3), ("big_vocab", len(tok) + 7, 2), ("swapped", len(tok), 2)):
        folder = root / f"teacher_{name}"
        BertForSequenceClassification(BertConfig(vocab_size=vocab, num_labels=labels, **cfg)).save_pretrained(folder)
        if name == "swapped":
            vocab_lines = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
            vocab_lines[10], vocab_lines[11] = vocab_lines[11], vocab_lines[10]
            (root / "swapped_vocab.txt").write_text("\n".join(vocab_lines) + "\n")
            BertTokenizer(str(root / "swapped_vocab.txt"), do_lower_case=True).save_pretrained(folder)
        else:
            tok.save_pretrained(folder)
        out[name] = folder
    return out


def test_bad_glue_input_is_refused_before_anything_is_written(task_data, bad_teachers, tmp_path, capsys):
    import run_glue_w_distillation as glue_script

    d = task_data
    out = tmp_path / "out"
    base = [a for a in glue_args(d, out, d["student"])[1:]]

    def with_train(text):
        path = tmp_path / f"train_{abs(hash(text))}.tsv"
        path.write_text(text)
        return [str(a) if a != d["train"] else str(path) for a in base]

    expect_error(capsys, glue_script.main, with_train("text\tlabel\nsome words\t1\n"),
                 "no column 'sentence'", "--text_column")
    expect_error(capsys, glue_script.main, with_train("sentence\tlabel\nsome words\t1\nmore words\t2\n"),
                 "row 2: label 2 is out of range for 2 classes")
    expect_error(capsys, glue_script.main, base + ["--teacher_name_or_path", bad_teachers["three_labels"]],
                 "the teacher predicts 3 label(s), the task has 2")
    expect_error(capsys, glue_script.main, base + ["--teacher_name_or_path", bad_teachers["big_vocab"]],
                 "teacher vocabulary of", "must share the tokenizer")
    expect_error(capsys, glue_script.main, base + ["--teacher_name_or_path", bad_teachers["swapped"]],
                 "the teacher's tokenizer differs from the student's")
    expect_error(capsys, glue_script.main, base + ["--teacher_name_or_path", d["teacher"]],
                 "fine-tune the teacher on the task first")  # a masked LM: its classifier would be random
    assert not out.exists()


def test_bad_squad_input_and_existing_output_dir(task_data, tmp_path, capsys):
    import run_squad_w_distillation as squad_script

    d = task_data
    data = json.loads(d["squad"].read_text())
    qa = data["data"][0]["paragraphs"][0]["qas"][0]
    qa["answers"][0]["answer_start"] += 1
    shifted = tmp_path / "shifted.json"
    shifted.write_text(json.dumps(data))
    out = tmp_path / "out"
    args = [str(a) for a in squad_args(d, out, d["student"])[1:]]
    expect_error(capsys, squad_script.main, [shifted if a == str(d["squad"]) else a for a in args],
                 f"question {qa['id']}: answer_start", "does not point at its answer")
    assert not out.exists()

    out.mkdir()
    (out / "keep.txt").write_text("precious")
    expect_error(capsys, squad_script.main, args, "--output_dir", "already exists", "--overwrite_output_dir")
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    expect_error(capsys, squad_script.main, args + ["--output_dir", d["student"], "--overwrite_output_dir"],
                 "holds an input of this run")


def test_malformed_model_and_data_files_name_their_flag(task_data, tmp_path, capsys):
    """Files that exist but are not what they should be: a student folder with corrupt weights, a SQuAD file that
    is not JSON. One error line naming the flag and the file, nothing written."""
    import run_squad_w_distillation as squad_script

    d = task_data
    corrupt = tmp_path / "corrupt_student"
    shutil.copytree(d["student"], corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 16 + b"not safetensors")
    out = tmp_path / "out"
    args = [str(a) for a in squad_args(d, out, corrupt)[1:]]
    expect_error(capsys, squad_script.main, args, "--model_name_or_path", corrupt)
    not_json = tmp_path / "train.json"
    not_json.write_text("{ not json")
    args = [str(a) for a in squad_args(d, out, d["student"])[1:]]
    flag_at = args.index("--train_file")
    args[flag_at + 1] = str(not_json)
    expect_error(capsys, squad_script.main, args, f"--train_file {not_json}", "not a JSON file")
    assert not out.exists()


# ------------------------------------------------------------------------------- what users really load


def test_forward_inputs_give_segment_ids_to_the_models_that_take_them():
    from transformers import BertConfig, BertModel, DistilBertConfig, DistilBertModel, RobertaConfig, RobertaModel

    from tasks.batches import forward_inputs

    ids = torch.randint(5, 50, (2, 6))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": (ids > 20).long(),
             "labels": torch.tensor([0, 1])}
    small = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20)
    bert = BertModel(BertConfig(**small))
    distilbert = DistilBertModel(DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=20))
    roberta = RobertaModel(RobertaConfig(**small, type_vocab_size=1))  # one segment embedding: segment 1 is no id
    assert set(forward_inputs(bert, batch)) == {"input_ids", "attention_mask", "token_type_ids"}
    assert set(forward_inputs(distilbert, batch)) == {"input_ids", "attention_mask"}
    assert set(forward_inputs(roberta, batch)) == {"input_ids", "attention_mask"}
    roberta(**forward_inputs(roberta, batch))


def test_the_seed_recipe_feeds_the_bert_teacher_its_segment_ids(task_data, squad_teacher, real_folders, tmp_path,
                                                                  monkeypatch):
    """--model_type distilbert with a DistilBERT folder as transformers saves it (DistilBertTokenizer, no
    token_type_ids) and --teacher_type bert: each window reaches the teacher with the segment ids its own
    tokenizer gives it (question 0, context 1), the inputs it was fine-tuned and is evaluated with."""
    import functools

    from transformers import AutoTokenizer, BertForQuestionAnswering

    import run_squad_w_distillation as squad_script
    from tasks.squad import read_squad_examples, squad_features

    seen = []
    original = BertForQuestionAnswering.forward

    @functools.wraps(original)
    def recording(self, *args, **kwargs):
        seen.append({k: kwargs.get(k) for k in ("input_ids", "attention_mask", "token_type_ids")})
        return original(self, *args, **kwargs)

    monkeypatch.setattr(BertForQuestionAnswering, "forward", recording)
    argv = squad_args(task_data, tmp_path / "out", real_folders["distilbert"], "--model_type", "distilbert",
                      "--teacher_type", "bert", "--teacher_name_or_path", squad_teacher, "--max_steps", "2")[1:]
    squad_script.main([str(a) for a in argv if a != "--do_eval"])
    # The same windows, cut by the teacher's own tokenizer.
    own = squad_features(read_squad_examples(str(task_data["squad"]), is_training=True),
                         AutoTokenizer.from_pretrained(squad_teacher), max_seq_length=48, doc_stride=16,
                         max_query_length=12, is_training=True)
    expected = {tuple(ids): types for ids, types in zip(own["input_ids"], own["token_type_ids"])}
    rows = [(ids[:int(mask.sum())].tolist(), types[:int(mask.sum())].tolist()) for batch in seen
            for ids, mask, types in zip(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])]
    assert len(rows) == 8  # two steps of 4 windows
    assert all(expected[tuple(ids)] == types for ids, types in rows)


@pytest.fixture(scope="module")
def permuted_teacher(task_data, glue_teacher):
    """The fine-tuned GLUE teacher saved with its labels in the other order (label2id and the head's rows swapped
    together): the very same predictions, by name."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(glue_teacher)
    with torch.no_grad():
        model.classifier.weight.copy_(model.classifier.weight.flip(0))
        model.classifier.bias.copy_(model.classifier.bias.flip(0))
    names = [model.config.id2label[i] for i in (1, 0)]
    model.config.id2label, model.config.label2id = dict(enumerate(names)), {n: i for i, n in enumerate(names)}
    folder = task_data["root"] / "glue_teacher_permuted"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(glue_teacher).save_pretrained(folder)
    return folder


def test_a_classifier_in_its_own_label_order_is_read_by_name(task_data, glue_teacher, permuted_teacher, tmp_path,
                                                             capsys, caplog):
    import logging

    import run_glue_w_distillation as glue_script

    caplog.set_level(logging.INFO, logger="distil")  # under pytest the root logger's level is WARNING

    d = task_data
    assert json.loads((permuted_teacher / "config.json").read_text())["id2label"] == {"0": "positive",
                                                                                      "1": "negative"}
    config_before = (permuted_teacher / "config.json").read_text()

    def run(out, model, *extra, evaluate=True, train=False):
        args = [a for a in glue_args(d, out, model, *extra)[1:] if a not in ("--do_train", "--do_eval")]
        glue_script.main([str(a) for a in args] + ["--do_eval"] * evaluate + ["--do_train"] * train)

    # --do_eval: the same scores as the teacher in the task's order (reading it in place would invert them).
    run(tmp_path / "eval", permuted_teacher)
    assert results(tmp_path / "eval")["metrics"] == pytest.approx(results(glue_teacher)["metrics"])
    assert results(glue_teacher)["metrics"]["accuracy"] > 0.7
    assert (permuted_teacher / "config.json").read_text() == config_before

    # Distilled from either teacher, the student learns the same thing, step for step.
    steps = ("--max_steps", "2", "--logging_steps", "1")
    run(tmp_path / "from_plain", d["student"], "--teacher_name_or_path", glue_teacher, *steps, evaluate=False,
        train=True)
    run(tmp_path / "from_permuted", d["student"], "--teacher_name_or_path", permuted_teacher, *steps, evaluate=False,
        train=True)
    a, b = weights(tmp_path / "from_plain"), weights(tmp_path / "from_permuted")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # The log names each teacher, its labels in its own order, its own score, and how its outputs are read.
    score = results(glue_teacher)["score"]
    assert (f"Teacher: {glue_teacher} (BertForSequenceClassification, " in caplog.text
            and f"its labels in output order: negative, positive; its own evaluation "
                f"({glue_teacher / 'eval_results.json'}): sst2 score {score:.2f}" in caplog.text), caplog.text[-3000:]
    assert (f"Teacher: {permuted_teacher} " in caplog.text and "its labels in output order: positive, negative"
            in caplog.text)
    assert (f"--teacher_name_or_path {permuted_teacher}: its outputs (positive, negative) are read in the task's "
            "order (negative, positive), by label name") in caplog.text
    assert f"Saved the fine-tuned student (distilled from {permuted_teacher}) to {tmp_path / 'from_permuted'}" \
        in caplog.text

    # Labels that name other classes cannot be read in the task's order: refused, nothing written.
    renamed = tmp_path / "renamed"
    shutil.copytree(permuted_teacher, renamed)
    config = json.loads((renamed / "config.json").read_text())
    config.update(id2label={"0": "good", "1": "bad"}, label2id={"good": 0, "bad": 1})
    (renamed / "config.json").write_text(json.dumps(config))
    out = tmp_path / "refused"
    expect_error(capsys, glue_script.main,
                 [a for a in glue_args(d, out, d["student"], "--teacher_name_or_path", renamed)[1:]],
                 f"--teacher_name_or_path {renamed}: the model's labels (good, bad) are not the task's "
                 f"(negative, positive)")
    assert not out.exists()


def test_an_xlnet_with_a_cls_last_tokenizer_trains_and_evaluates(task_data, real_folders, tmp_path):
    """A real XLNet (no position limit, max_position_embeddings -1) with its layout: context first, CLS last."""
    import run_squad_w_distillation as squad_script

    out = tmp_path / "xlnet"
    argv = squad_args(task_data, out, real_folders["xlnet"], "--model_type", "xlnet", "--max_steps", "3")[1:]
    squad_script.main([str(a) for a in argv])
    assert json.loads((out / "config.json").read_text())["architectures"] == ["XLNetForQuestionAnsweringSimple"]
    contexts = {r["id"]: r["context"] for r in make_records_from(task_data["squad"])}
    predictions = json.loads((out / "predictions.json").read_text())
    assert set(predictions) == set(contexts) and all(p and p in contexts[q] for q, p in predictions.items())


def test_the_squad_feature_cache_follows_the_tokenizer_not_its_path(task_data, tmp_path):
    """Another tokenizer of the same size saved at the same path (two tokens swapped) gets its own windows."""
    from transformers import AutoTokenizer, BertTokenizer

    import run_squad_w_distillation as squad_script

    args = squad_script.parse_args(["--output_dir", str(tmp_path / "out"), "--model_name_or_path", "m",
                                    "--cache_dir", str(tmp_path / "cache")])
    folder = tmp_path / "tokenizer"
    tok = AutoTokenizer.from_pretrained(task_data["teacher"])
    tok.save_pretrained(folder)
    first = squad_script._cache_path(args, AutoTokenizer.from_pretrained(folder), str(task_data["squad"]), False)
    vocab = sorted(tok.get_vocab(), key=tok.get_vocab().get)
    vocab[10], vocab[11] = vocab[11], vocab[10]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(tmp_path / "vocab.txt"), do_lower_case=True).save_pretrained(folder)
    swapped = AutoTokenizer.from_pretrained(folder)
    assert len(swapped) == len(tok) and swapped.name_or_path == str(folder)
    assert squad_script._cache_path(args, swapped, str(task_data["squad"]), False) != first


def test_share_of_teacher_is_on_the_tasks_both_have(tmp_path):
    """A teacher run on more tasks than the student: the share compares the tasks they share."""
    folders = {}
    for model, scores in (("T", {"sst2": 80.0, "mrpc": 60.0}), ("S", {"sst2": 72.0})):
        for task, score in scores.items():
            folder = tmp_path / f"{model}_{task}"
            folder.mkdir()
            (folder / "eval_results.json").write_text(json.dumps({"task": task, "score": score, "metrics": {}}))
            folders.setdefault(model, []).append(str(folder))
    load_script("downstream_table").main(["--teacher", "T", *folders["T"], "--student", "S", *folders["S"],
                                          "--output", str(tmp_path / "table"), "--no_speed"])
    rows = json.loads((tmp_path / "table.json").read_text())["rows"]
    assert rows[1]["share_of_teacher"] == pytest.approx(72.0 / 80.0)
    assert "90% (macro)" in (tmp_path / "table.md").read_text()
