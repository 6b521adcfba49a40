"""Teacher-written answers and generation-based scoring (issue 32, items 3 and 4): batched KV-cache generation
against transformers' own generate, seeded sampling, scripts/teacher_answers.py (output binarized_chat.py reads,
resume = an uninterrupted run, settings checked), scripts/generate_eval.py (EM / F1, response metrics, table)."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import expect_error, load_script, make_chat_model
from distil.conversations import end_of_turn_ids, prompt_ids
from distil.generation import completion_batch, generate, seeded_generator

QUESTIONS = ["what is the capital of France ?", "hello", "tell me more about Rome and Italy", "what is it ?",
             "is Paris nice ?", "thanks", "what is the answer ?"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                        {"role": "assistant", "content": "Paris"}]}) + "\n"
                               for q in QUESTIONS))
    teacher = make_chat_model(root / "teacher", "llama", layers=2)
    model = AutoModelForCausalLM.from_pretrained(teacher)
    with torch.no_grad():  # special tokens rarely likely: a random model's greedy answers are words, not ""
        model.model.embed_tokens.weight[:6] *= 0.01
    model.save_pretrained(teacher)
    return {"teacher": teacher,
            "student": make_chat_model(root / "student", "llama", layers=1, seed=3),
            "qwen2": make_chat_model(root / "qwen2", "qwen2"), "prompts": prompts}


@pytest.mark.parametrize("style", ["llama", "qwen2"])
def test_batched_greedy_generation_matches_transformers_generate(models, style):
    folder = models["teacher" if style == "llama" else "qwen2"]
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)
    stop = end_of_turn_ids(tokenizer)
    prompts = [prompt_ids(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS[:4]]
    rollouts = generate(model, prompts, stop_ids=stop, pad_id=0, max_new_tokens=10)  # left-padded, one batch
    for prompt, completion, finished in zip(prompts, rollouts.completions, rollouts.finished):
        ids = torch.tensor([prompt])  # an explicit mask: generate would take id 0 (BOS here) for padding
        reference = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                                   eos_token_id=stop, pad_token_id=0)[0, len(prompt):].tolist()
        assert completion == reference[: len(completion)] and len(completion) == len(reference)
        assert finished == (completion[-1] in stop) and not any(t in stop for t in completion[:-1])
    ids, lengths, mask = completion_batch(prompts, rollouts.completions, pad_id=0)
    assert mask.sum() == sum(map(len, rollouts.completions)) and not mask[0, : len(prompts[0])].any()


def test_sampling_is_fixed_by_the_seed(models):
    tokenizer = AutoTokenizer.from_pretrained(models["teacher"])
    model = AutoModelForCausalLM.from_pretrained(models["teacher"])
    prompts = [prompt_ids(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS[:3]]

    def draw(seed):
        return generate(model, prompts, stop_ids=[0], pad_id=0, max_new_tokens=12, temperature=1.0, top_p=0.95,
                        generator=seeded_generator(seed, 0)).completions

    assert draw(1) == draw(1) and draw(1) != draw(2)


def _answers(models, output, *extra):
    load_script("teacher_answers").main(["--model", models["teacher"], "--prompts", str(models["prompts"]),
                                         "--output", str(output), "--max_new_tokens", "6", "--batch_size", "2",
                                         "--n_gpu", "0", *map(str, extra)])
    return [json.loads(line) for line in output.read_text().splitlines()]


def test_teacher_answers_resume_as_if_never_interrupted(models, tmp_path, capsys):
    whole = _answers(models, tmp_path / "whole.jsonl", "--do_sample", "--seed", "5")
    assert len(whole) == len(QUESTIONS)
    assert all(r["reference"] == "Paris" and r["messages"][-1]["role"] == "assistant" for r in whole)
    assert [r["messages"][0]["content"] for r in whole] == QUESTIONS
    # an interruption after the second batch, in the middle of writing the third
    cut = tmp_path / "cut.jsonl"
    lines = (tmp_path / "whole.jsonl").read_text().splitlines(keepends=True)
    cut.write_text("".join(lines[:5]) + lines[5][:10])
    (tmp_path / "cut.jsonl.settings.json").write_text((tmp_path / "whole.jsonl.settings.json").read_text()
                                                      .replace("whole", "cut"))
    assert _answers(models, cut, "--do_sample", "--seed", "5") == whole
    assert _answers(models, tmp_path / "other.jsonl", "--do_sample", "--seed", "6") != whole
    expect_error(capsys, load_script("teacher_answers").main,
                 ["--model", models["teacher"], "--prompts", models["prompts"], "--output", cut,
                  "--max_new_tokens", "6", "--batch_size", "2", "--n_gpu", "0"], "--output", "do_sample")
    # what it writes, binarized_chat.py reads
    load_script("binarized_chat").main(["--file_path", str(cut), "--tokenizer_name", models["teacher"],
                                        "--dump_file", str(tmp_path / "answers")])
    assert (tmp_path / "answers.teacher.bin").exists()


def test_generate_eval_scores_a_model_against_its_own_answers(models, tmp_path):
    answers = tmp_path / "answers.jsonl"
    written = _answers(models, answers)
    for record in written:  # one extra accepted answer that never matches
        record["answers"] = ["nothing like it"]
    answers.write_text("".join(json.dumps(r) + "\n" for r in written))
    out = tmp_path / "scores"
    main = load_script("generate_eval").main
    main(["--models", models["teacher"], models["student"], "--data", str(answers), "--teacher", models["teacher"],
          "--output_dir", str(out), "--max_new_tokens", "6", "--batch_size", "3", "--n_gpu", "0"])
    teacher, student = (json.loads((out / f"{n}.json").read_text()) for n in ("teacher", "student"))
    # greedy answers are the references: the teacher matches every one of them, and agrees with itself
    assert teacher["exact"] == 100.0 and teacher["f1"] == 100.0 and teacher["n_examples"] == len(QUESTIONS)
    assert teacher["kl_teacher_student"] == pytest.approx(0.0, abs=1e-6) and teacher["top1_agreement"] == 1.0
    assert student["f1"] < 100.0 and student["kl_teacher_student"] > 0
    predictions = [json.loads(line) for line in (out / "student.predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == len(QUESTIONS)
    table = (out / "table.md").read_text()
    assert "| student |" in table and "| teacher |" in table
    # scored models are skipped on a rerun
    stamp = (out / "teacher.json").stat().st_mtime_ns
    main(["--models", models["teacher"], "--data", str(answers), "--output_dir", str(out), "--n_gpu", "0"])
    assert (out / "teacher.json").stat().st_mtime_ns == stamp
