"""experiments/ablation.py without its two-hour run: the commands its dry run prints are ones the scripts accept,
the default layer choice, and the table's statistics against hand computations. (The end-to-end run on tiny
local models is cheap to try by hand: docs/real-teacher.md; CI never needs the GGUF teacher.)"""
import shlex

import pytest

from conftest import load_script
from test_docs import parser_of


def test_dry_run_commands_parse_with_each_scripts_own_parser(tmp_path, capsys):
    gguf = tmp_path / "teacher.Q4_1.gguf"
    gguf.write_bytes(b"GGUF" + bytes(16))
    text = tmp_path / "lines.txt"
    text.write_text("one line of text\n")
    ablation = load_script("experiments/ablation")
    ablation.main(["--teacher", str(gguf), "--train_text", str(text), "--eval_text", str(text),
                   "--workdir", str(tmp_path / "work"), "--seeds", "0,1", "--dry_run"])
    commands = [shlex.split(line.strip())[1:] for line in capsys.readouterr().out.splitlines()
                if line.strip().startswith("python ")]
    scripts = [c[0] for c in commands]
    assert scripts[:4] == ["scripts/convert_gguf.py", "scripts/binarized_data.py", "scripts/binarized_data.py",
                           "scripts/extract.py"]
    assert scripts.count("train.py") == 6 and scripts.count("scripts/evaluate.py") == 8
    for script, *args in commands:
        parser_of(script).parse_args(args)  # exits (fails the test) on a flag or value the script does not take
    trains = [c for c in commands if c[0] == "train.py"]
    distilled = [c for c in trains if "--alpha_ce" in c and c[c.index("--alpha_ce") + 1] == "5"]
    assert len(distilled) == 4 and all("--max_steps" in c and "--max_seq_length" in c for c in trains)
    assert not (tmp_path / "work").exists()  # a dry run writes nothing


def test_arms_choose_which_runs_train_and_an_unknown_arm_is_refused(tmp_path, capsys):
    gguf = tmp_path / "teacher.Q4_1.gguf"
    gguf.write_bytes(b"GGUF" + bytes(16))
    text = tmp_path / "lines.txt"
    text.write_text("one line of text\n")
    base = ["--teacher", str(gguf), "--train_text", str(text), "--eval_text", str(text),
            "--workdir", str(tmp_path / "work"), "--seeds", "0,1,2", "--dry_run"]
    load_script("experiments/ablation").main(base + ["--arms", "distilled,no_teacher"])
    dumps = [line.split("--dump_path ")[1].split()[0] for line in capsys.readouterr().out.splitlines()
             if line.strip().startswith("python train.py")]
    assert [d.rsplit("/", 1)[1] for d in dumps] == [f"{arm}_seed{s}" for s in (0, 1, 2)
                                                    for arm in ("distilled", "no_teacher")]
    with pytest.raises(SystemExit) as exit_info:
        load_script("experiments/ablation").main(base + ["--arms", "distilled,teacherless"])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "--arms" in err and "teacherless" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("seeds", ["0,x", "1.5", "0,--5", ","])
def test_seeds_that_are_not_integers_are_refused_in_one_line(tmp_path, capsys, seeds):
    text = tmp_path / "lines.txt"
    text.write_text("one line of text\n")
    with pytest.raises(SystemExit) as exit_info:
        load_script("experiments/ablation").main(["--teacher", str(text), "--train_text", str(text),
                                                  "--eval_text", str(text), "--workdir", str(tmp_path / "work"),
                                                  "--seeds", seeds, "--dry_run"])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "--seeds" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "work").exists()


def test_default_layers_keep_a_first_and_a_last_block():
    default_layers = load_script("experiments/ablation").default_layers
    assert default_layers(30) == [0, 1, 2, 3, 4, 5, 6, 7, 23, 24, 25, 26, 27, 28, 29]
    assert default_layers(4) == [0, 3]


def test_table_means_spreads_and_paired_gain():
    ablation = load_script("experiments/ablation")

    def record(ppl, kl=0.5, top1=0.4):
        return {"perplexity": ppl, "kl_teacher_student": kl, "top1_agreement": top1, "train_seconds": 60.0}

    records = {"teacher": {"perplexity": 20.0}, "student_init": record(5000.0)}
    for seed, (kd, plain) in enumerate([(30.0, 33.0), (32.0, 36.0), (34.0, 36.0)]):
        records[("distilled", seed)] = record(kd)
        records[("no_teacher", seed)] = record(plain)
    table = ablation.results_table(records, [0, 1, 2])
    assert "| distilled | 3 | 32.00 \u00b1 2.00 [30.00, 34.00] |" in table
    assert "| no_teacher | 3 | 35.00 \u00b1 1.73 [33.00, 36.00] |" in table
    assert "| teacher | 1 | 20.00 |" in table
    # no_teacher - distilled, seed by seed: 3, 4, 2 -> mean 3, sample std 1
    assert "3.00 \u00b1 1.00 [2.00, 4.00] over 3 seed(s)" in table
    assert "distilled_random_init" not in table  # an arm without runs has no row
    # One seed: the value alone, no spread nobody measured.
    one = ablation.results_table(records, [1])
    assert "| distilled | 1 | 32.00 | 0.500 | 0.400 | 60 |" in one and "\u00b1" not in one
    assert "same seed): 4.00 over 1 seed(s)." in one
