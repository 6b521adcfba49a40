"""Bounding a run and its sequences: --max_steps (the schedule follows), --max_seq_length in train.py and
scripts/evaluate.py, and the warning before a run that will make too few optimizer steps to learn."""
import json
import math
import re

import pytest

from conftest import load_script, run_script
from distil.schedule import FEW_STEPS, plan_steps, short_run_warnings


def test_a_few_dozen_batches_at_the_default_accumulation_is_flagged():
    # The case: 36 batches, the original default --gradient_accumulation_steps 50, one epoch.
    plan = plan_steps(36, 1, 50, 0.05)
    assert (plan.total, plan.warmup) == (1, 1)
    warnings = " ".join(short_run_warnings(plan, 36, 50, 0.05))
    assert "only 1 optimizer step" in warnings and "--gradient_accumulation_steps 50" in warnings
    assert "never leaves warmup" in warnings and "--warmup_prop" in warnings
    # A run long enough to learn is left alone.
    plan = plan_steps(36 * 50, 1, 50, 0.05)
    assert plan.total == 36 and short_run_warnings(plan, 36 * 50, 50, 0.05) == []
    # Enough steps, but a warmup as long as the run.
    plan = plan_steps(100, 1, 1, 1.0)
    assert [w for w in short_run_warnings(plan, 100, 1, 1.0) if "warmup" in w]
    assert plan_steps(100, 1, 1, 0.0, max_steps=FEW_STEPS - 1).total == FEW_STEPS - 1


def test_max_steps_spans_epochs():
    plan = plan_steps(10, 3, 4, 0.0, max_steps=7)  # 3 steps per epoch (4 + 4 + 2 batches)
    assert (plan.total, plan.n_epochs, plan.steps_per_epoch) == (7, 3, 3)
    assert plan_steps(10, 3, 4, 0.0).total == 9


def _train(tiny, binarized, dump, *extra):
    data, _ = binarized["gpt2"]
    return run_script("train.py", "--student_type", "gpt2", "--teacher_type", "gpt2", "--student_config",
                      tiny["gpt2_config"], "--teacher_name", tiny["gpt2"], "--alpha_ce", "1", "--alpha_clm", "1",
                      "--data_file", data, "--dump_path", dump, "--n_gpu", "0", "--batch_size", "64",
                      "--max_seq_length", "16", *extra)


def test_default_accumulation_warns_before_training(tiny, binarized, tmp_path):
    proc = _train(tiny, binarized, tmp_path / "run", "--n_epoch", "1", "--log_interval", "1000")
    warning = [line for line in proc.stderr.splitlines() if "SHORT RUN" in line]
    assert warning and "--gradient_accumulation_steps 50" in warning[0], proc.stderr[-2000:]
    assert proc.stderr.index("SHORT RUN") < proc.stderr.index("Starting training")


def test_max_steps_and_max_seq_length(tiny, binarized, tmp_path):
    dump = tmp_path / "run"
    # More steps than one epoch holds (45 batches of chunks of 16 tokens): the run goes into a second epoch and stops mid-way.
    proc = _train(tiny, binarized, dump, "--gradient_accumulation_steps", "1", "--log_interval", "1",
                  "--warmup_prop", "0", "--n_epoch", "1", "--max_steps", "60")
    params = json.loads((dump / "parameters.json").read_text())
    assert params["max_model_input_size"] == 16
    assert json.loads((dump / "config.json").read_text())["n_positions"] == 64  # the student config is untouched
    assert "too-long sequences into" in proc.stderr
    records = [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    batches = int(re.search(r"(\d+) batches per epoch", proc.stderr).group(1))
    assert batches < 60  # so that the 60 steps need a second epoch
    assert len(train) == 60 and {r["epoch"] for r in train} == set(range(math.ceil(60 / batches)))
    # Linear decay over exactly the 60 steps: after step k the rate is lr * (60 - k) / 60.
    for k, record in enumerate(train, start=1):
        assert record["lr"] == pytest.approx(5e-4 * (60 - k) / 60, abs=1e-12)
    assert all(r["speed"] > 0 and r["rss_mb"] > 0 for r in train)  # metrics.jsonl carries TensorBoard's figures
    assert [r["optimizer_step"] for r in train] == list(range(1, 61))  # one optimizer step per batch here
    assert (dump / "model.safetensors").is_file()


def test_evaluate_cuts_every_model_the_same_way(tiny, binarized, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    from utils import UserError

    data, _ = binarized["gpt2"]
    short = tmp_path / "short"  # a model whose config accepts fewer positions than the teacher's 64
    config = GPT2Config.from_pretrained(tiny["gpt2"])
    config.n_positions = 32
    GPT2LMHeadModel(config).save_pretrained(short)
    GPT2Tokenizer.from_pretrained(tiny["gpt2"]).save_pretrained(short)
    main = load_script("evaluate").main
    common = ["--model_type", "gpt2", "--data_file", str(data), "--max_batches", "2", "--max_seq_length", "24"]
    a = main(["--model", str(tiny["gpt2"]), *common])
    b = main(["--model", str(short), *common])
    assert a["max_seq_length"] == b["max_seq_length"] == 24
    assert (a["n_sequences"], a["n_tokens"]) == (b["n_sequences"], b["n_tokens"])
    # Without the flag each model would be cut at its own limit: the data would differ.
    c = main(["--model", str(tiny["gpt2"]), *common[:-2]])
    assert c["max_seq_length"] == 64 and c["n_tokens"] != a["n_tokens"]
    with pytest.raises(UserError, match="--max_seq_length 40 is longer than the models accept [(]32"):
        main(["--model", str(short), *common[:-1], "40"])


def test_a_short_run_shows_what_it_does_and_names_what_it_wrote(tiny, binarized, tmp_path):
    """The issue's run (--max_steps 4, batches of 4, 2 per step): the bar counts the 8 batches the run makes (not
    the epoch's 45), a loss line every --log_interval batches, the last line names the folder and its files, and
    no per-epoch .pth beside model.safetensors (the checkpoint is the weights plus AdamW's two moments)."""
    dump = tmp_path / "run"
    proc = _train(tiny, binarized, dump, "--max_steps", "4", "--batch_size", "4", "--gradient_accumulation_steps",
                  "2", "--log_interval", "2", "--warmup_prop", "0")
    totals = set(re.findall(r"-Iter epoch 0:.*?\| *\d+/(\d+) ", proc.stderr))
    assert totals == {"8"}, proc.stderr[-3000:]
    assert re.search(r"-Iter epoch 0: 100%.*\| 8/8 ", proc.stderr), proc.stderr[-3000:]
    steps = re.findall(r"Optimizer step (\d)/4 \(batch (\d)\): loss \d+\.\d+ \(ce \d", proc.stderr)
    assert steps == [("1", "2"), ("2", "4"), ("3", "6"), ("4", "8")], proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert f"Output in {dump}: " in last and "model.safetensors (" in last and "checkpoints/ (step_" in last, last
    assert not list(dump.glob("*.pth"))
    weights = (dump / "model.safetensors").stat().st_size
    checkpoint = next((dump / "checkpoints").iterdir()).stat().st_size
    # weights, exp_avg and exp_avg_sq (+ counters and RNG states, a few kB): no fourth copy
    assert 2.9 < checkpoint / weights < 3.5
