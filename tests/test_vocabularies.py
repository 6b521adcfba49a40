"""A teacher whose vocabulary extends the student's (extra ids at the end) is accepted, its extra logits dropped;
any other difference is one line. vocabularies.check_teacher_vocabulary, and train.py running with it."""
import json
import shutil

import pytest
import torch

from utils import UserError
from distil.vocabularies import check_teacher_vocabulary


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
    shutil.copytree(tiny["gpt2"], tmp_path / "swapped")
    table = json.loads((tmp_path / "swapped" / "vocab.json").read_text())
    a, b = sorted(table, key=table.get)[40:42]
    table[a], table[b] = table[b], table[a]
    (tmp_path / "swapped" / "vocab.json").write_text(json.dumps(table))
    (tmp_path / "swapped" / "tokenizer.json").unlink(missing_ok=True)
    swapped = AutoTokenizer.from_pretrained(tmp_path / "swapped")
    with pytest.raises(UserError, match=r"id 40 is .*2 shared ids differ"):
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
