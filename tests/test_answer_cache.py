"""Teacher-written answers in one teacher pass (issue 32, item 3): scripts/teacher_answers.py --dump_file writes the
corpus binarized_chat.py writes from its answers, byte for byte; --cache_dir the cache cache_teacher.py builds from
that corpus with a second forward (the same rows, log-probs to 1e-4), on which train.py --teacher_cache gives the
live teacher's losses; an interrupted run resumes to the same files; bad combinations are one-line errors."""
import json
import os

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import expect_error, load_script, make_chat_model

QUESTIONS = ["what is the capital of France ?", "hello", "tell me more about Rome and Italy", "what is it ?",
             "is Paris nice ?", "thanks"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("answer_cache")
    records = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "Paris"}]}
               for q in QUESTIONS]
    # a multi-turn prompt: its earlier answer is masked too, its rows come from the generation's prompt pass
    records.insert(2, {"messages": [{"role": "user", "content": "hello"},
                                    {"role": "assistant", "content": "yes thanks"},
                                    {"role": "user", "content": "what is it ?"},
                                    {"role": "assistant", "content": "no"}]})
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = {"root": root, "prompts": prompts, "n": len(records),
           "student": make_chat_model(root / "student", "llama", layers=1, seed=3),
           "qwen2": make_chat_model(root / "qwen2", "qwen2")}
    teacher = make_chat_model(root / "teacher", "llama", layers=2)
    model = AutoModelForCausalLM.from_pretrained(teacher)
    with torch.no_grad():  # special tokens rarely likely: the answers are words (their text re-tokenizes alike)
        model.model.embed_tokens.weight[:6] *= 0.01
    model.save_pretrained(teacher)
    out["llama"] = teacher
    return out


def _answers(setup, style, output, *extra, dump=None, cache=None, k=None):
    """teacher_answers.py with the same-pass outputs: (corpus path, cache folder)."""
    dump = dump or output.parent / f"same_{output.stem}"
    cache = cache or output.parent / f"cache_{output.stem}"
    load_script("teacher_answers").main([str(a) for a in [
        "--model", setup[style], "--prompts", setup["prompts"], "--output", output, "--max_new_tokens", "6",
        "--batch_size", "2", "--n_gpu", "0", "--do_sample", "--seed", "1", "--dump_file", dump,
        "--max_seq_length", "128", "--cache_dir", cache, "--k", k or 300, "--log_probs_dtype", "float32",
        "--cache_temperature", "2.0", *extra]])
    return f"{dump}.{os.path.basename(setup[style])}.bin", cache


def _done(corpus):
    return json.loads(open(corpus + ".parts/done.json").read())


def _full_distributions(cache_dir):
    """(row_offsets, item_offsets, (n_rows, V) log-probs) of a cache with k = V: order-free, for comparing."""
    meta = json.loads((cache_dir / "cache.json").read_text())
    n, k = meta["n_rows"], meta["k"]
    ids = np.fromfile(cache_dir / "ids.bin", dtype=meta["ids_dtype"]).reshape(n, k).astype(np.int64)
    log_probs = np.fromfile(cache_dir / "log_probs.bin", dtype=meta["log_probs_dtype"]).reshape(n, k + 1)
    full = np.full((n, meta["vocab_size"]), -np.inf, dtype=np.float32)
    np.put_along_axis(full, ids, log_probs[:, :k], axis=1)
    return np.load(cache_dir / "row_offsets.npy"), np.load(cache_dir / "item_offsets.npy"), full, meta


@pytest.mark.parametrize("style", ["llama", "qwen2"])
def test_same_pass_corpus_and_cache_equal_binarized_chat_and_cache_teacher(setup, tmp_path, style):
    corpus, cache = _answers(setup, style, tmp_path / "answers.jsonl")
    # (1) the corpus binarized_chat.py writes from the answers file: the same bytes (header included)
    load_script("binarized_chat").main(["--file_path", str(tmp_path / "answers.jsonl"), "--tokenizer_name",
                                        setup[style], "--dump_file", str(tmp_path / "chat"), "--max_seq_length",
                                        "128"])
    reference = tmp_path / f"chat.{os.path.basename(setup[style])}.bin"
    assert open(corpus, "rb").read() == reference.read_bytes()
    # (2) the cache cache_teacher.py builds from that corpus with a second teacher forward
    load_script("cache_teacher").main([str(a) for a in [
        "--teacher_type", "auto", "--teacher_name", setup[style], "--data_file", reference, "--cache_dir",
        tmp_path / "second", "--n_gpu", "0", "--k", "300", "--log_probs_dtype", "float32", "--temperature", "2.0",
        "--max_seq_length", "128"]])
    rows, items, same, meta = _full_distributions(cache)
    rows2, items2, second, meta2 = _full_distributions(tmp_path / "second")
    assert np.array_equal(rows, rows2) and np.array_equal(items, items2) and len(same) > 40
    np.testing.assert_allclose(same, second, atol=1e-4, rtol=0)  # every id's log-prob, not only the top ones
    for key in ("corpus", "tokenizer", "teacher", "max_len", "k", "temperature", "settings", "vocab_size", "n_rows"):
        assert meta[key] == meta2[key], key
    done = _done(corpus)
    assert done["prompts"] == setup["n"]
    if style == "llama":  # word-level: an answer's text re-tokenizes to the generated ids (unless a special token
        # was sampled and skipped in the text: this seed samples one): most rows come from the pass itself
        assert done["rescored"] < setup["n"] // 2
    else:  # sampled bytes of a byte-level BPE do not survive decoding: those answers take the teacher forward
        assert done["rescored"] > 0


def test_train_py_on_the_same_pass_cache_gives_the_live_teacher_losses(setup, tmp_path):
    import train

    corpus, cache = _answers(setup, "llama", tmp_path / "answers.jsonl")
    args = ["--student_type", "auto", "--student_config", f"{setup['student']}/config.json",
            "--student_pretrained_weights", setup["student"], "--data_file", corpus, "--n_gpu", "0",
            "--batch_size", "2", "--gradient_accumulation_steps", "1", "--max_steps", "3", "--alpha_ce", "2",
            "--alpha_clm", "1", "--alpha_cos", "0", "--warmup_prop", "0", "--log_interval", "1", "--seed", "3",
            "--teacher_type", "auto"]
    train.main([str(a) for a in args + ["--teacher_name", setup["llama"], "--dump_path", tmp_path / "live"]])
    train.main([str(a) for a in args + ["--teacher_cache", cache, "--dump_path", tmp_path / "cached"]])

    def losses(dump):
        return [r for r in map(json.loads, (dump / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]

    live, cached = losses(tmp_path / "live"), losses(tmp_path / "cached")
    assert len(live) == len(cached) == 3
    for a, b in zip(live, cached):
        for key in ("loss", "loss_ce", "loss_clm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)


def test_an_interrupted_same_pass_resumes_to_the_same_files(setup, tmp_path, monkeypatch, capsys):
    from distil.answer_cache import SamePass

    whole_corpus, whole_cache = _answers(setup, "qwen2", tmp_path / "whole.jsonl")
    add_batch = SamePass.add_batch

    def crash_after_the_third_part(self, lo, *args):
        counts = add_batch(self, lo, *args)
        if lo == 4:  # its part written, its answer lines not: the resume must answer it again
            raise KeyboardInterrupt
        return counts

    monkeypatch.setattr(SamePass, "add_batch", crash_after_the_third_part)
    with pytest.raises(KeyboardInterrupt):
        _answers(setup, "qwen2", tmp_path / "cut.jsonl")
    assert len((tmp_path / "cut.jsonl").read_text().splitlines()) == 4
    assert len(os.listdir(str(tmp_path / "same_cut.qwen2.bin.parts"))) == 3
    monkeypatch.setattr(SamePass, "add_batch", add_batch)
    corpus, cache = _answers(setup, "qwen2", tmp_path / "cut.jsonl")
    assert (tmp_path / "cut.jsonl").read_text() == (tmp_path / "whole.jsonl").read_text()
    assert open(corpus, "rb").read()[4096:] == open(whole_corpus, "rb").read()[4096:]  # the header names the file
    for name in ("ids.bin", "log_probs.bin", "row_offsets.npy", "item_offsets.npy"):
        assert (cache / name).read_bytes() == (whole_cache / name).read_bytes(), name
    # a complete run is not redone silently; other cache settings are not mixed into a resumed one
    main = load_script("teacher_answers").main
    common = ["--model", setup["qwen2"], "--prompts", setup["prompts"], "--output", tmp_path / "cut.jsonl",
              "--max_new_tokens", "6", "--batch_size", "2", "--n_gpu", "0", "--do_sample", "--seed", "1",
              "--dump_file", tmp_path / "same_cut", "--max_seq_length", "128", "--cache_dir", cache,
              "--log_probs_dtype", "float32", "--cache_temperature", "2.0"]
    expect_error(capsys, main, common + ["--k", "300"], "--output", "complete", "--force")
    expect_error(capsys, main, common + ["--k", "8"], "--output", "other settings", "k")


def test_bad_same_pass_combinations_are_one_line_errors(setup, tmp_path, capsys):
    main = load_script("teacher_answers").main
    base = ["--model", setup["llama"], "--prompts", setup["prompts"], "--n_gpu", "0"]
    expect_error(capsys, main, base + ["--output", tmp_path / "a.jsonl", "--cache_dir", tmp_path / "c"],
                 "--cache_dir needs --dump_file")
    expect_error(capsys, main, base + ["--output", tmp_path / "a.jsonl", "--dump_file", tmp_path / "d",
                                       "--max_seq_length", "4"], "--max_seq_length must be at least 12")
    expect_error(capsys, main, base + ["--output", tmp_path / "a.jsonl", "--dump_file", tmp_path / "d",
                                       "--cache_dir", tmp_path / "c", "--max_seq_length", "4096"],
                 "--max_seq_length 4096", "--model accepts")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep me")
    expect_error(capsys, main, base + ["--output", tmp_path / "b.jsonl", "--dump_file", tmp_path / "d",
                                       "--max_seq_length", "128", "--cache_dir", tmp_path / "busy"],
                 "--cache_dir", "not empty", "--force")
    assert (tmp_path / "busy" / "x").read_text() == "keep me" and not (tmp_path / "b.jsonl").exists()
