"""A teacher whose vocabulary extends the student's (extra ids at the end) is accepted, its extra logits dropped;
any other difference is one line. vocabularies.check_teacher_vocabulary, and train.py running with it."""
import json
import os
import shutil

import pytest
import torch

from utils import UserError
from distil.vocabularies import check_teacher_vocabulary


def swapped_tokenizer(tiny, folder, swap=True):
    """The tiny GPT-2 tokenizer with ids 40 and 41 swapped, saved in `folder`: the teacher's size, another
    token -> id table (what a --tokenizer_name of the right size but from another model is); swap=False: an
    unchanged copy."""
    os.makedirs(folder)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.isfile(os.path.join(tiny["gpt2"], name)):
            shutil.copy(os.path.join(tiny["gpt2"], name), folder)
    table = json.loads((folder / "vocab.json").read_text())
    if not swap:
        return folder
    a, b = sorted(table, key=table.get)[40:42]
    table[a], table[b] = table[b], table[a]
    (folder / "vocab.json").write_text(json.dumps(table))
    return folder


def _train_main(argv):
    """train.py's entry point in this process: a UserError becomes one `error:` line and exit status 2."""
    import train

    try:
        return train.main([str(a) for a in argv])
    except train.UserError as exc:
        train.fail(str(exc))


def _gpt2_run(tiny, data):
    return ["--student_type", "gpt2", "--student_config", str(tiny["gpt2_config"]), "--teacher_type", "gpt2",
            "--data_file", data, "--n_epoch", "1", "--batch_size", "16", "--gradient_accumulation_steps", "1",
            "--n_gpu", "0", "--alpha_ce", "1", "--alpha_clm", "1"]


def _padded_teacher(tiny, extra, folder=None):
    """The tiny GPT-2 teacher with `extra` random rows appended to its (tied) embedding table, as a model
    padded to a round size is; saved with its tokenizer when folder is given."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    teacher = GPT2LMHeadModel.from_pretrained(tiny["gpt2"]).eval()
    vocab = teacher.config.vocab_size
    teacher.resize_token_embeddings(vocab + extra, mean_resizing=False)
    with torch.no_grad():
        teacher.get_input_embeddings().weight[vocab:] = torch.randn(extra, teacher.config.n_embd) * 5
    if folder is not None:
        teacher.save_pretrained(folder)
        AutoTokenizer.from_pretrained(tiny["gpt2"]).save_pretrained(folder)
    return teacher, vocab


def test_extension_is_cut_to_the_student_and_keeps_every_shared_logit(tiny):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny["gpt2"])
    teacher, vocab = _padded_teacher(tiny, 12)
    ids = torch.randint(vocab, (2, 9))
    with torch.no_grad():
        before = teacher(ids).logits
    assert before.shape[-1] == vocab + 12 and before[..., vocab:].abs().max() > 1  # the extra ids do carry mass
    check_teacher_vocabulary(teacher, vocab, tokenizer, "--student_config", "s.json", "t", teacher_tokenizer=tokenizer)
    with torch.no_grad():
        after = teacher(ids).logits
    assert teacher.config.vocab_size == vocab and after.shape[-1] == vocab
    torch.testing.assert_close(after, before[..., :vocab], rtol=0, atol=0)


def test_other_vocabularies_are_refused(tiny, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny["gpt2"])
    teacher, vocab = _padded_teacher(tiny, 4)
    with pytest.raises(UserError, match="the teacher's is smaller"):
        check_teacher_vocabulary(teacher, vocab + 8, tokenizer, "--student_config", "s.json", "t")
    # the student's tokenizer gives two shared ids other tokens
    swapped = AutoTokenizer.from_pretrained(swapped_tokenizer(tiny, tmp_path / "swapped"))
    with pytest.raises(UserError, match=r"id 40 is .*2 ids differ"):
        check_teacher_vocabulary(teacher, vocab, swapped, "--student_config", "s.json", "t",
                                 teacher_tokenizer=tokenizer)
    # a student smaller than the tokenizer could not predict its last tokens
    with pytest.raises(UserError, match="cannot predict"):
        check_teacher_vocabulary(teacher, vocab - 1, tokenizer, "--student_config", "s.json", "t")
    assert teacher.config.vocab_size == vocab + 4  # nothing was cut


def test_train_distils_from_a_padded_teacher(tiny, binarized, tmp_path):
    """train.py end to end (in process) with a teacher 8 ids larger than the student, live and from a cache
    built with --student_config; the evaluation's KL against the teacher runs over the shared ids."""
    import train
    from conftest import load_script

    from test_teacher_cache import subset_corpus

    _padded_teacher(tiny, 8, tmp_path / "teacher")
    data = subset_corpus(binarized["gpt2"][0], tmp_path / "data.bin", 40)
    common = ["--student_type", "gpt2", "--student_config", str(tiny["gpt2_config"]), "--teacher_type", "gpt2",
              "--data_file", data, "--n_epoch", "1", "--batch_size", "16", "--gradient_accumulation_steps", "1",
              "--n_gpu", "0", "--alpha_ce", "1", "--alpha_clm", "1"]
    train.main(common + ["--teacher_name", str(tmp_path / "teacher"), "--dump_path", str(tmp_path / "live"),
                         "--eval_data_file", data, "--eval_max_batches", "1"])
    records = [json.loads(line) for line in (tmp_path / "live" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["split"] == "eval" and r["kl_teacher_student"] >= 0 for r in records)
    load_script("cache_teacher").main(["--teacher_type", "gpt2", "--teacher_name", str(tmp_path / "teacher"),
                                       "--data_file", data, "--student_type", "gpt2", "--student_config",
                                       str(tiny["gpt2_config"]), "--k", "8", "--n_gpu", "0", "--cache_dir",
                                       str(tmp_path / "cache")])
    train.main(common + ["--teacher_cache", str(tmp_path / "cache"), "--dump_path", str(tmp_path / "cached")])
    assert (tmp_path / "cached" / "model.safetensors").is_file()


def test_a_same_size_tokenizer_with_other_ids_is_refused(tiny, binarized, tmp_path, capsys):
    """Equal sizes used to end the check at once: a --tokenizer_name of the teacher's size with two ids swapped
    trained to the end, the teacher reading each swapped id as the other token. Now the two token -> id tables
    are compared whenever the run's tokenizer is not the teacher's own, whatever the sizes."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from conftest import expect_error
    from test_teacher_cache import subset_corpus

    teacher = GPT2LMHeadModel.from_pretrained(tiny["gpt2"])
    swapped = swapped_tokenizer(tiny, tmp_path / "swapped")
    own = AutoTokenizer.from_pretrained(tiny["gpt2"])
    with pytest.raises(UserError, match=r"id 40 is .*2 ids differ"):
        check_teacher_vocabulary(teacher, teacher.config.vocab_size, AutoTokenizer.from_pretrained(swapped),
                                 "--student_config", "s.json", "t", teacher_tokenizer=own)
    data = subset_corpus(binarized["gpt2"][0], tmp_path / "data.bin", 40)
    argv = _gpt2_run(tiny, data) + ["--teacher_name", tiny["gpt2"], "--tokenizer_name", swapped, "--dump_path",
                                    tmp_path / "run"]
    expect_error(capsys, _train_main, argv, f"--tokenizer_name {swapped}", "id 40", f"--teacher_name {tiny['gpt2']}")
    assert not (tmp_path / "run").exists()
    # the teacher's own table from another folder: compared by content, accepted
    same = swapped_tokenizer(tiny, tmp_path / "same", swap=False)
    i = argv.index("--tokenizer_name")
    _train_main(argv[:i + 1] + [same] + argv[i + 2:] + ["--max_steps", "1"])
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_a_teacher_folder_without_a_tokenizer_needs_the_explicit_flag(tiny, binarized, tmp_path, capsys):
    """With --tokenizer_name and a teacher folder holding no tokenizer there is nothing to compare the ids
    with: refused in one line naming --assume_same_token_ids, which lets the run go on unchecked."""
    from transformers import GPT2LMHeadModel

    from conftest import expect_error
    from test_teacher_cache import subset_corpus

    GPT2LMHeadModel.from_pretrained(tiny["gpt2"]).save_pretrained(tmp_path / "bare")  # weights only
    data = subset_corpus(binarized["gpt2"][0], tmp_path / "data.bin", 40)
    argv = _gpt2_run(tiny, data) + ["--teacher_name", tmp_path / "bare", "--tokenizer_name", tiny["gpt2"],
                                    "--dump_path", tmp_path / "run", "--max_steps", "1"]
    expect_error(capsys, _train_main, argv, f"--teacher_name {tmp_path / 'bare'}", "no tokenizer",
                 "--assume_same_token_ids")
    assert not (tmp_path / "run").exists()
    _train_main(argv + ["--assume_same_token_ids"])
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_a_teacher_streamed_from_safetensors_is_cut_too(tiny, tmp_path):
    """--fsdp builds the teacher on the meta device and streams its weights from the checkpoint after the cut:
    the rows the student keeps are read (the file holds the teacher's full table), and the streamed teacher's
    logits are the whole teacher's over the shared ids."""
    from transformers import AutoTokenizer

    from distil.models import TeacherLM, load_teacher

    whole, vocab = _padded_teacher(tiny, 9, tmp_path / "teacher")
    streamed = load_teacher("gpt2", str(tmp_path / "teacher"), mlm=False, on_meta=True)
    assert streamed.get_input_embeddings().weight.device.type == "meta"
    tokenizer = AutoTokenizer.from_pretrained(tiny["gpt2"])
    check_teacher_vocabulary(streamed, vocab, tokenizer, "--student_config", "s.json", "t")
    lm = TeacherLM(streamed)
    streamed.streamed_weights.load_shards(lm, torch.device("cpu"), prefix="model.")
    ids = torch.randint(vocab, (2, 9))
    with torch.no_grad():
        expected = whole(ids).logits[..., :vocab]
        got = streamed(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_fsdp_trains_from_a_padded_teacher(tiny, binarized, tmp_path):
    """The same under torchrun with 2 gloo ranks: each rank streams its shard of the cut tables (rank 1's rows
    start half-way through the student's ids, not the teacher's)."""
    from conftest import run_torchrun
    from test_teacher_cache import subset_corpus

    _padded_teacher(tiny, 9, tmp_path / "teacher")
    data = subset_corpus(binarized["gpt2"][0], tmp_path / "data.bin", 40)
    proc = run_torchrun("train.py", *_gpt2_run(tiny, data), "--fsdp", "--teacher_name", tmp_path / "teacher",
                        "--dump_path", tmp_path / "run", "--max_steps", "2", "--batch_size", "8")
    assert "Teacher built on the meta device" in proc.stderr
    assert "FSDP: teacher sharded over 2 ranks" in proc.stderr
    assert (tmp_path / "run" / "model.safetensors").is_file()
