"""Every step that can take more than a few seconds shows a progress bar whose total is what the step does, and
which ends at that total: train.py fed by a teacher cache, the task scripts' loop under --max_steps,
scripts/cache_teacher.py, scripts/evaluate.py and scripts/downstream_table.py (scripts/convert_gguf.py: in
tests/test_gguf.py, which has the optional packages it needs)."""
import json
import logging
import re

from conftest import load_script, run_script
from test_task_training import SCRIPT_ENV, glue_args, task_data  # noqa: F401 (a fixture)
from test_teacher_cache import small  # noqa: F401 (a fixture)


def bar_counts(text, desc):
    """(done, total) of every rendering of the bar named desc (tqdm redraws it with carriage returns)."""
    return [(int(a), int(b)) for a, b in re.findall(rf"{re.escape(desc)}:? .*?(\d+)/(\d+)", text.replace("\r", "\n"))]


def assert_bar_ends_at(text, desc, total):
    counts = bar_counts(text, desc)
    assert counts, text[-3000:]
    assert {t for _, t in counts} == {total}, counts  # one total from the first drawing to the last
    assert counts[-1] == (total, total), counts


def test_cache_build_and_a_cache_fed_run(tiny, small, tmp_path, capsys, caplog):  # noqa: F811
    caplog.set_level(logging.INFO, logger="distil")  # under pytest the root logger's level is WARNING
    data, _ = small["gpt2"]
    load_script("cache_teacher").main(["--teacher_type", "gpt2", "--teacher_name", str(tiny["gpt2"]), "--data_file",
                                       data, "--cache_dir", str(tmp_path / "cache"), "--n_gpu", "0", "--k", "8",
                                       "--batch_size", "8"])
    err = capsys.readouterr().err
    meta = json.loads((tmp_path / "cache" / "cache.json").read_text())
    n_sequences = json.loads((tmp_path / "cache" / "progress.json").read_text())["units"]
    assert_bar_ends_at(err, "Teacher cache", n_sequences)
    # The figure per position is the rows' (cache.json's), not the folder's with the tokenizer's copy in it.
    assert meta["bytes_per_row"] == 8 * 2 + 9 * 2
    assert f"{meta['bytes_per_row']} bytes per cached position" in caplog.text, caplog.text[-1500:]

    proc = run_script("train.py", "--student_type", "gpt2", "--student_config", tiny["gpt2_config"],
                      "--teacher_type", "gpt2", "--teacher_cache", tmp_path / "cache", "--alpha_ce", "2",
                      "--alpha_clm", "1", "--data_file", data, "--dump_path", tmp_path / "run", "--n_gpu", "0",
                      "--n_epoch", "1", "--batch_size", "4", "--gradient_accumulation_steps", "2", "--log_interval",
                      "5")
    batches = int(re.search(r"(\d+) batches per epoch", proc.stderr).group(1))
    assert_bar_ends_at(proc.stderr, "-Iter epoch 0", batches)
    assert "its outputs come from --teacher_cache" in proc.stderr  # not "No teacher: --alpha_ce ... are 0"


def test_task_loop_under_max_steps_ends_at_its_last_batch(task_data, tmp_path, capsys, caplog):  # noqa: F811
    import run_glue_w_distillation as glue

    caplog.set_level(logging.INFO, logger="distil")
    args = glue_args(task_data, tmp_path / "run", task_data["student"], "--max_steps", "3",
                     "--gradient_accumulation_steps", "2", "--logging_steps", "1")
    glue.main([str(a) for a in args[1:]] + ["--per_gpu_eval_batch_size", "16"])
    err = capsys.readouterr().err
    assert_bar_ends_at(err, "epoch 0", 6)  # 3 optimizer steps of 2 batches, in an epoch of 20
    assert_bar_ends_at(err, "Evaluating", 4)  # 60 dev rows in batches of 16
    assert len(re.findall(r"Step \d/3: loss \d", caplog.text)) == 3, caplog.text[-2000:]
    assert f"Saved the fine-tuned model (no teacher) to {tmp_path / 'run'}" in caplog.text


def test_evaluate_and_downstream_table(tiny, binarized, tmp_path, capsys):
    load_script("evaluate").main(["--model", str(tiny["gpt2"]), "--model_type", "gpt2", "--data_file",
                                  str(binarized["gpt2"][0]), "--max_batches", "3", "--batch_size", "4"])
    assert_bar_ends_at(capsys.readouterr().err, "Evaluating", 3)

    folders = []
    for name in ("teacher", "student"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "eval_results.json").write_text(json.dumps({"task": "sst2", "score": 50.0, "metrics": {},
                                                              "model": str(tiny["bert"])}))
        folders.append(str(folder))
    load_script("downstream_table").main(["--teacher", "T", folders[0], "--student", "S", folders[1],
                                          "--speed_rounds", "2", "--speed_batches", "1", "--speed_batch_size",
                                          "2", "--speed_seq_len", "8"])
    assert_bar_ends_at(capsys.readouterr().err, "Encoders: time", 2 * (1 + 1 + 2))  # load, warm-up, 2 rounds
