"""experiments/instruction_distillation.py without its two-hour run: the commands its dry run prints are ones the
scripts accept, SQuAD questions become conversations binarized_chat.py reads, and the table's statistics."""
import json
import shlex

import pytest

from conftest import load_script
from test_docs import parser_of

SQUAD = {"data": [{"title": "t", "paragraphs": [
    {"context": "Paris is the capital of France.",
     "qas": [{"id": f"q{i}", "question": f"Question {i}?", "answers": [{"text": "Paris", "answer_start": 0},
                                                                     {"text": "Paris.", "answer_start": 0}]}
             for i in range(5)]}]}]}


def _base(tmp_path):
    squad = tmp_path / "squad.json"
    squad.write_text(json.dumps(SQUAD))
    gguf = tmp_path / "teacher.Q4_1.gguf"
    gguf.write_bytes(b"GGUF" + bytes(16))
    return ["--teacher", str(gguf), "--squad_train", str(squad), "--squad_heldout", str(squad), "--workdir",
            str(tmp_path / "work"), "--seeds", "0,1", "--dry_run"]


def test_dry_run_commands_parse_with_each_scripts_own_parser(tmp_path, capsys):
    load_script("experiments/instruction_distillation").main(_base(tmp_path))
    commands = [shlex.split(line.strip())[1:] for line in capsys.readouterr().out.splitlines()
                if line.strip().startswith("python ")]
    scripts = [c[0] for c in commands]
    assert scripts[:5] == ["scripts/convert_gguf.py", "scripts/teacher_answers.py", "scripts/binarized_chat.py",
                           "scripts/binarized_chat.py", "scripts/extract.py"]
    assert scripts.count("train.py") == 14 and scripts.count("scripts/generate_eval.py") == 16  # 7 arms x 2 seeds
    for script, *args in commands:
        parser_of(script).parse_args(args)  # exits (fails the test) on a flag or value the script does not take
    trains = [c for c in commands if c[0] == "train.py"]
    kd = [c for c in trains if c[c.index("--alpha_ce") + 1] != "0"]
    assert len(kd) == 10 and all("--max_steps" in c and "--seed" in c for c in trains)
    # issue 33's arms: reverse KL, lambda 0 / 0.5 / 1 (an on-policy run answers at the scored length)
    lambdas = sorted(c[c.index("--lmbda") + 1] if "--lmbda" in c else "0" for c in trains
                     if "--kd_loss" in c and c[c.index("--kd_loss") + 1] == "reverse_kl")
    assert lambdas == ["0", "0", "0.5", "0.5", "1", "1"]
    assert all(c[c.index("--max_new_tokens") + 1] == "32" for c in trains if "--lmbda" in c)
    teacher_data = [c for c in trains if "train.teacher_answers" not in c[c.index("--data_file") + 1]
                    and "/teacher." in c[c.index("--data_file") + 1]]
    assert len(teacher_data) == 4  # arms (c) and (d) read the teacher's answers
    assert not (tmp_path / "work").exists()  # a dry run writes nothing


def test_squad_questions_become_conversations_with_every_gold_answer(tmp_path):
    module = load_script("experiments/instruction_distillation")
    squad = tmp_path / "squad.json"
    squad.write_text(json.dumps(SQUAD))
    records = module.squad_conversations(str(squad), 3)
    assert len(records) == 3 and records == module.squad_conversations(str(squad), 3)  # fixed draw
    first = records[0]
    assert first["answers"] == ["Paris", "Paris."] and first["messages"][1] == {"role": "assistant",
                                                                                 "content": "Paris"}
    assert "Context: Paris is the capital of France." in first["messages"][0]["content"]


def test_table_statistics_and_bad_arms(tmp_path, capsys):
    module = load_script("experiments/instruction_distillation")
    records = {("gold", 0): {"f1": 10.0, "exact": 5.0, "response_perplexity": 3.0, "kl_teacher_student": 0.5,
                             "train_seconds": 10},
               ("gold", 1): {"f1": 14.0, "exact": 7.0, "response_perplexity": 5.0, "kl_teacher_student": 0.7,
                             "train_seconds": 30}}
    table = module.results_table(records, [0, 1])
    assert "| gold | 2 | 12.0 \u00b1 2.8 [10.0, 14.0] |" in table and "| 20 |" in table  # std of 10, 14: 2.83
    # One seed: the value alone, no spread nobody measured (as the ablation's table).
    one = module.results_table({("gold", 0): records[("gold", 0)]}, [0])
    assert "| gold | 1 | 10.0 | 5.0 | 3.00 | 0.500 | 10 |" in one and "\u00b1" not in one
    with pytest.raises(SystemExit):
        module.main(_base(tmp_path) + ["--arms", "gold,nope"])
    err = capsys.readouterr().err
    assert "--arms" in err and len(err.strip().splitlines()) == 1
