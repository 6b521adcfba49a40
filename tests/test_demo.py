"""scripts/demo.py and its library (demo/data.py, demo/results.py): the stdlib corpus, and the whole pipeline in
its --quick size."""
import json
import math
import os
import re

import pytest

from demo import data as demo_data
from conftest import load_script, run_script
from demo.results import COLUMNS

demo = load_script("demo")

ROW_NAMES = ["teacher", "distilled", "baseline"]
NUMERIC = ["parameters", "mlm_loss", "pseudo_perplexity", "sequences_per_second", "speedup_vs_teacher"]
COMMON_WORDS = {"the", "a", "an", "is", "of", "to", "and", "in", "for", "if", "this", "be", "it", "with"}


# --------------------------------------------------------------------------------------------- corpus


@pytest.fixture(scope="module")
def stdlib_lines():
    return demo_data.stdlib_corpus(seed=0)


def test_stdlib_corpus_is_english_prose(stdlib_lines):
    assert len(stdlib_lines) > 2000  # the stdlib has ~10k such paragraphs; a few hundred means a broken walk
    assert len(set(stdlib_lines)) == len(stdlib_lines)
    for line in stdlib_lines:
        assert len(line.split()) >= demo_data.MIN_WORDS
        assert line == " ".join(line.split())  # one paragraph per line, whitespace normalised
        assert ">>>" not in line
    # English function words in nearly every line: catches code, tables or binary noise slipping through
    with_common = sum(1 for line in stdlib_lines if COMMON_WORDS & set(line.lower().split()))
    assert with_common / len(stdlib_lines) > 0.9


def test_stdlib_corpus_is_deterministic(stdlib_lines):
    assert demo_data.stdlib_corpus(seed=0) == stdlib_lines
    reshuffled = demo_data.stdlib_corpus(seed=1)
    assert reshuffled != stdlib_lines and sorted(reshuffled) == sorted(stdlib_lines)


def test_corpus_reads_docstrings_and_comments(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "test").mkdir()  # test suites are skipped
    (tmp_path / "pkg" / "mod.py").write_text(
        '"""Module docstring that explains what the whole module is for.\n\n'
        '>>> print("a doctest that must not be kept as prose")\n"""\n'
        "# A block comment that spans two lines and says\n# why the code below does what it does.\n"
        "x = 1  # a trailing comment is not a full-line comment at all\n"
        "def f():\n    'A function docstring that is long enough to be kept here.'\n"
        "    # settings = {'a': 1, 'b': [2, 3]}  # commented-out code is not prose\n"
    )
    (tmp_path / "test" / "test_mod.py").write_text('"""A test docstring that is long enough to be kept otherwise."""\n')
    (tmp_path / "broken.py").write_text('"""Unterminated docstring that would break the parser\n')
    lines = demo_data.stdlib_corpus(seed=0, root=str(tmp_path))
    assert sorted(lines) == sorted([
        "Module docstring that explains what the whole module is for.",
        "A block comment that spans two lines and says why the code below does what it does.",
        "A function docstring that is long enough to be kept here.",
    ])


@pytest.mark.parametrize("line, english", [
    ("Return the number of items in the queue, or zero if it is empty.", True),
    ("Return a new list.", False),  # too short
    ("result = {key: value for key, value in items if value is not None}", False),
    (">>> os.path.join('a', 'b') returns the joined path of both parts", False),
    ("x_1 y_2 z_3 __init__ __repr__ a_b c_d e_f g_h", False),
])
def test_looks_like_english(line, english):
    assert demo_data.looks_like_english(line) is english


def test_heldout_split_is_disjoint_and_small():
    lines = [f"line number {i} with enough words to count here" for i in range(1000)]
    train, heldout = demo_data.split_heldout(lines)
    assert len(heldout) == 50 and len(train) == 950
    assert not set(train) & set(heldout)


# --------------------------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    proc = run_script("scripts/demo.py", "--quick", "--workdir", workdir, timeout=600)
    return workdir, proc


def test_quick_demo_writes_results(quick_run):
    workdir, proc = quick_run
    with open(workdir / "results.json") as f:
        results = json.load(f)
    rows = results["rows"]
    assert [r["name"] for r in rows] == ROW_NAMES
    assert results["columns"] == COLUMNS + ["downstream: docstring or comment (accuracy)"]
    for row in rows:
        for key in NUMERIC:
            assert isinstance(row[key], (int, float)) and math.isfinite(row[key]) and row[key] > 0, (row["name"], key)
    teacher, distilled, baseline = rows
    for student in (distilled, baseline):
        assert student["parameters"] < teacher["parameters"]
        assert student["layers"] < teacher["layers"]
        assert math.isfinite(student["kl_to_teacher"]) and student["kl_to_teacher"] >= 0
        assert 0 <= student["top1_agreement"] <= 1
    assert teacher["speedup_vs_teacher"] == 1.0
    # trained at all: below the loss of a uniform guess over the vocabulary
    assert teacher["mlm_loss"] < results["chance_mlm_loss"]
    assert results["steps"]["distilled"] == results["steps"]["baseline"] > 0

    table = (workdir / "results.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| model"))
    assert [c.strip() for c in header.strip("|").split("|")] == results["columns"]
    body = [line for line in table.splitlines() if line.startswith("| ") and "|:---" not in line][1:4]
    assert len(body) == 3
    assert re.search(r"\| 2 \| [\d,]+ \| \d+\.\d{3} \|", body[1])  # the students' numbers are in the cells
    assert "Results" in proc.stdout and body[0] in proc.stdout


def test_quick_demo_prints_the_commands_it_runs(quick_run):
    workdir, proc = quick_run
    for script in ("scripts/binarized_data.py", "scripts/token_counts.py", "train.py",
                   "scripts/extract_distilbert.py", "scripts/evaluate.py"):
        assert f"$ python {script}" in proc.stdout
    assert (workdir / "runs" / "distilled" / "config.json").is_file()
    assert (workdir / "runs" / "baseline" / "metrics.jsonl").is_file()


def test_quick_demo_downstream_stage(quick_run):
    """Teacher fine-tuned on the docstring-or-comment task, distilled student task-distilled from it, baseline
    fine-tuned alone; their scores in the main table and in the downstream table."""
    workdir, proc = quick_run
    results = json.loads((workdir / "results.json").read_text())
    runs = {role: workdir / "runs" / f"{demo_data.STDLIB_TASK}_{role}" for role in ROW_NAMES}
    scores = {role: json.loads((runs[role] / "eval_results.json").read_text()) for role in ROW_NAMES}
    for role, row in zip(ROW_NAMES, results["rows"]):
        assert scores[role]["task"] == demo_data.STDLIB_TASK and 0 <= scores[role]["metrics"]["accuracy"] <= 1
        assert row["downstream_score"] == pytest.approx(scores[role]["score"])
    assert results["downstream"]["tasks"] == [demo_data.STDLIB_TASK]
    # Only the distilled student learnt from the fine-tuned teacher.
    last = {role: json.loads((runs[role] / "metrics.jsonl").read_text().splitlines()[-1]) for role in ROW_NAMES}
    assert "loss_ce" in last["distilled"] and "loss_ce" not in last["baseline"]
    dev = (workdir / "data" / f"{demo_data.STDLIB_TASK}_dev.tsv").read_text().splitlines()
    assert dev[0] == "sentence\tlabel" and {line.rsplit("\t", 1)[1] for line in dev[1:]} == {"docstring", "comment"}
    assert scores["teacher"]["n_examples"] == len(dev) - 1  # scored on every held-out paragraph
    md = (workdir / "results.md").read_text()
    assert "## Downstream" in md and "task-distilled" in md
    for script in ("run_glue_w_distillation.py", "scripts/downstream_table.py"):
        assert f"$ python {script}" in proc.stdout


def test_docstring_or_comment_labels_and_glue_folders(tmp_path):
    (tmp_path / "mod.py").write_text(
        '"""A module docstring that is long enough to be kept as one paragraph."""\n'
        "# A block comment that is long enough to be kept as one paragraph too.\n"
        "x = 1\n")
    kinds = dict(demo_data.stdlib_paragraphs(str(tmp_path)))
    assert kinds == {"A module docstring that is long enough to be kept as one paragraph.": "docstring",
                     "A block comment that is long enough to be kept as one paragraph too.": "comment"}
    assert demo_data.docstring_or_comment_rows(["unknown line", *kinds], kinds) == list(kinds.items())

    glue = tmp_path / "glue"
    for name, files in (("SST-2", ["train.tsv", "dev.tsv"]), ("CoLA", ["train.tsv", "dev.tsv"]),
                        ("MNLI", ["train.tsv", "dev_matched.tsv"]), ("RTE", ["train.tsv"]), ("notes", ["dev.tsv"])):
        (glue / name).mkdir(parents=True)
        for f in files:
            (glue / name / f).write_text("sentence\tlabel\n")
    assert [(t, os.path.basename(dev)) for t, _, dev in demo_data.find_glue_tasks(str(glue))] == [
        ("cola", "dev.tsv"), ("mnli", "dev_matched.tsv"), ("sst2", "dev.tsv")]  # RTE lacks its dev set


def test_glue_dir_without_tasks_is_refused_before_any_step(tmp_path, capsys):
    assert demo.main(["--quick", "--glue_dir", str(tmp_path), "--workdir", str(tmp_path / "out")]) == 2
    assert "--glue_dir" in capsys.readouterr().err and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------- failures


def test_failing_step_is_named_and_exits_nonzero(tmp_path):
    # Lines of ~10 tokens: binarized fine, then all dropped by train.py's 12-token minimum.
    corpus = tmp_path / "short.txt"
    corpus.write_text("".join(f"tiny line {i} of eight words only here\n" for i in range(60)))
    proc = run_script("scripts/demo.py", "--quick", "--corpus", corpus, "--workdir", tmp_path / "out",
                      expect_ok=False)
    assert proc.returncode == 1
    assert "error: step 4 (Pretrain the teacher" in proc.stderr
    assert "command: python train.py" in proc.stderr
    assert "no training sequence left" in proc.stderr  # the tail of the failing step's log
    assert not (tmp_path / "out" / "results.json").exists()


def test_refuses_a_workdir_it_did_not_make(tmp_path, capsys):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    assert demo.main(["--quick", "--workdir", str(tmp_path)]) == 2
    assert precious.read_text() == "keep me"
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--workdir" in errors[0] and "not empty and was not made by this demo" in errors[0]


@pytest.mark.parametrize("content", [None, b"DSTLBIN\x01\x00\x00binary"])
def test_a_missing_or_binary_corpus_is_one_error_before_anything_is_written(tmp_path, capsys, content):
    corpus = tmp_path / "corpus.bin"
    if content is not None:
        corpus.write_bytes(content * 100)
    workdir = tmp_path / "out"
    assert demo.main(["--quick", "--corpus", str(corpus), "--workdir", str(workdir)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: --corpus {corpus}"), errors
    assert not workdir.exists()
