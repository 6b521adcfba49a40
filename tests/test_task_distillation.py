"""experiments/task_distillation.py, without training anything: the labelled / unlabelled split (the same
examples, no label left in the unlabelled file, which the task scripts read as unlabelled text), the commands
each arm runs, and the table's per-seed differences."""
import pytest

from conftest import load_script
from tasks.glue import load_file
from tasks.ner import read_column_file

CONLL = "".join(f"w{i}a\tB-PER\nw{i}b\tO\n\n" for i in range(10))
TSV = "sentence1\tsentence2\tlabel\n" + "".join(f"first {i}\tsecond {i}\t{i % 2}\n" for i in range(10))


def protocol(tmp_path, kind, text, *extra):
    module = load_script("experiments/task_distillation")
    train = tmp_path / ("train.conll" if kind == "ner" else "train.tsv")
    train.write_text(text)
    for name in ("teacher", "student"):
        (tmp_path / name).mkdir(exist_ok=True)
    args = module.parse_args(["--kind", kind, "--task_name", "btc" if kind == "ner" else "mrpc", "--teacher_model",
                              str(tmp_path / "teacher"), "--student_model", str(tmp_path / "student"), "--train_file",
                              str(train), "--validation_file", str(train), "--workdir", str(tmp_path / "work"),
                              *extra])
    return module, module.Measurement(args)


@pytest.mark.parametrize("kind", ["ner", "glue"])
def test_the_split_keeps_every_example_once_and_no_label_in_the_unlabelled_file(tmp_path, kind):
    module, m = protocol(tmp_path, kind, CONLL if kind == "ner" else TSV, "--labelled_fraction", "0.3")
    paths = m.split()
    if kind == "ner":
        labelled = read_column_file(paths["labelled"], "l")
        unlabelled = read_column_file(paths["unlabelled"], "u", with_tags=False)
        assert all(len(f) == 1 for s in unlabelled.sentences for f in s.fields)  # the token alone
        words = sorted(w for d in (labelled, unlabelled) for s in d.sentences for w in s.words)
        assert words == sorted(f"w{i}{x}" for i in range(10) for x in "ab")
        assert len(labelled.sentences) == 3 and {t for s in labelled.sentences for t in s.tags} == {"B-PER", "O"}
    else:
        labelled, unlabelled = load_file(paths["labelled"], "l"), load_file(paths["unlabelled"], "u")
        assert unlabelled.column_names == ["sentence1", "sentence2"]
        assert len(labelled) == 3 and len(unlabelled) == 7
        assert sorted(list(labelled["sentence1"]) + list(unlabelled["sentence1"])) == sorted(f"first {i}"
                                                                                             for i in range(10))
        assert all(int(s.split()[1]) % 2 == y for s, y in zip(labelled["sentence1"], labelled["label"]))


def test_each_arm_runs_its_recipe_and_the_table_gives_per_seed_differences(tmp_path, capsys):
    module, m = protocol(tmp_path, "ner", CONLL, "--arms", "alone,paper,unlabelled", "--seeds", "0", "--dry_run")
    m.run()
    out = capsys.readouterr().out
    lines = {name: next(line for line in out.splitlines() if f"runs/{name}_seed0 " in line)
             for name in ("alone", "paper", "unlabelled")}
    assert "--teacher_name_or_path" not in lines["alone"]
    assert "--alpha_task 0.5 --alpha_ce 0.5 --temperature 2" in lines["paper"]
    assert "--unlabeled_file" in lines["unlabelled"] and "--unlabeled_file" not in lines["paper"]

    def record(score, seconds=10):
        return {"score": score, "metrics": {"precision": 0.5, "recall": 0.4}, "per_type": {"PER": {"f1": 0.3, "precision": 0.2, "recall": 0.6}},
                "train_seconds": seconds}

    records = {("alone", 0): record(50), ("alone", 1): record(52), ("paper", 0): record(51), ("paper", 1): record(55)}
    table = module.results_table("ner", None, None, records, [0, 1], ["alone", "paper"])
    paper = next(line for line in table.splitlines() if line.startswith("| paper"))
    # differences +1 and +3: mean 2.0, sample std 1.41
    assert "| 2.0 ± 1.4 [1.0, 3.0] |" in paper and "53.0 ± 2.8 [51.0, 55.0]" in paper
    assert "| PER 30.0 (20/60) |" in paper
