"""Bad input to train.py and the scripts: exit status 2, one `error:` line naming the flag or file, no traceback.

All these failures happen before any training step, so the runs are short; they are prepared together and run
in one module fixture (in-process but for two), then each case is checked by its own test.
"""
import os
import pickle
import shutil

import numpy as np
import pytest

from conftest import run_in_process, run_script

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _check_one_error(proc, *needles):
    """returncode 2, exactly one stderr line starting with 'error:', containing every needle; no traceback."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert str(needle) in errors[0], (needle, errors[0])
    return errors[0]


def _train_args(tiny, binarized, dump, *, data=None, counts=None, config=None, extra=()):
    bert_data, bert_counts = binarized["bert"]
    return ["train.py", "--student_type", "distilbert", "--student_config", config or tiny["distilbert_config"],
            "--teacher_type", "bert", "--teacher_name", tiny["bert"], "--mlm",
            "--alpha_ce", "1.0", "--alpha_mlm", "1.0", "--alpha_clm", "0.0",
            "--data_file", data or bert_data, "--token_counts", counts or bert_counts, "--dump_path", dump,
            "--n_gpu", "0", "--n_epoch", "1", "--batch_size", "4", "--gradient_accumulation_steps", "1",
            *extra]


@pytest.fixture(scope="module")
def runs(tiny, binarized, tmp_path_factory):
    """{case: CompletedProcess, or the AssertionError run_script raised when it succeeded}, plus `details`."""
    from transformers import BertTokenizer, DistilBertConfig

    root = tmp_path_factory.mktemp("bad_input")
    bert_vocab = len(BertTokenizer.from_pretrained(str(tiny["bert"])))
    cases, details = {}, {"root": root, "bert_vocab": bert_vocab}

    def dump(name):
        return root / f"dump_{name}"

    # ---- train.py
    # data binarized with the gpt2 tokenizer, fed to the bert teacher
    cases["gpt2_data"] = _train_args(tiny, binarized, dump("gpt2_data"), data=binarized["gpt2"][0])

    # a hand-written (legacy pickle, so no recorded vocabulary) corpus with one id far beyond the vocabulary
    big = details["big"] = root / "big_id.pickle"
    seqs = [np.array([2] + [10 + (i + j) % 50 for j in range(20)] + [3], dtype=np.uint16) for i in range(30)]
    seqs[7][5] = 5000
    with open(big, "wb") as f:
        pickle.dump(seqs, f)
    cases["large_id"] = _train_args(tiny, binarized, dump("large_id"), data=big)

    # token counts of another vocabulary
    cases["counts_size"] = _train_args(tiny, binarized, dump("counts_size"), counts=binarized["gpt2"][1])

    # a student whose vocabulary differs from the teacher's
    other_vocab = details["other_vocab"] = root / "student_other_vocab.json"
    DistilBertConfig(vocab_size=bert_vocab + 7, dim=32, n_layers=1, n_heads=2, hidden_dim=37,
                     max_position_embeddings=64).to_json_file(other_vocab)
    cases["student_vocab"] = _train_args(tiny, binarized, dump("student_vocab"), config=other_vocab)

    # a student with another hidden size, with the cosine loss on
    wider = root / "student_wider.json"
    DistilBertConfig(vocab_size=bert_vocab, dim=48, n_layers=1, n_heads=2, hidden_dim=37,
                     max_position_embeddings=64).to_json_file(wider)
    cases["hidden_cos"] = _train_args(tiny, binarized, dump("hidden_cos"), config=wider,
                                      extra=["--alpha_cos", "1.0"])

    # an existing dump path without --force
    exists = details["dump_exists"] = dump("exists")
    exists.mkdir()
    (exists / "marker.txt").write_text("previous run, keep me")
    cases["dump_exists"] = _train_args(tiny, binarized, exists)

    # --force while the data file lies inside the dump path
    inside = dump("inside")
    inside.mkdir()
    inside_data = inside / "data.bin"
    shutil.copyfile(binarized["bert"][0], inside_data)
    (inside / "marker.txt").write_text("previous run, keep me")
    cases["force_data_inside"] = _train_args(tiny, binarized, inside, data=inside_data, extra=["--force"])
    details["force_data_inside"] = (inside, inside_data)

    # files that exist but cannot be read as what they should be (nothing may be written for any of them)
    not_json = details["not_json"] = root / "student_not_json.json"
    not_json.write_text("{ this is not json")
    cases["config_not_json"] = _train_args(tiny, binarized, dump("config_not_json"), config=not_json)
    broken = {}
    for name, filename, content in (
            ("corrupt_weights", "model.safetensors", os.urandom(4096)),
            ("truncated_weights", "model.safetensors", (tiny["bert"] / "model.safetensors").read_bytes()[:20_000]),
            ("unknown_model_type", "config.json", b'{"model_type": "no_such_model"}')):
        folder = broken[name] = details[name] = root / f"teacher_{name}"
        shutil.copytree(tiny["bert"], folder)
        (folder / filename).write_bytes(content)
        cases[f"teacher_{name}"] = _train_args(tiny, binarized, dump(f"teacher_{name}"),
                                               extra=["--teacher_name", folder])
    cases["student_folder_corrupt"] = _train_args(
        tiny, binarized, dump("student_folder_corrupt"),
        extra=["--student_pretrained_weights", broken["corrupt_weights"]])
    garbage_st = details["garbage_safetensors"] = root / "init.safetensors"
    garbage_st.write_bytes(os.urandom(2048))
    cases["student_weights_garbage_safetensors"] = _train_args(
        tiny, binarized, dump("student_weights_garbage_safetensors"), extra=["--student_pretrained_weights", garbage_st])
    prose = details["prose"] = root / "prose.txt"
    prose.write_text("the king won the war\n" * 300)
    cases["data_is_text"] = _train_args(tiny, binarized, dump("data_is_text"), data=prose)
    cases["data_is_counts"] = _train_args(tiny, binarized, dump("data_is_counts"), data=binarized["bert"][1])
    cases["counts_is_corpus"] = _train_args(tiny, binarized, dump("counts_is_corpus"), counts=binarized["bert"][0])
    cases["eval_data_is_text"] = _train_args(tiny, binarized, dump("eval_data_is_text"),
                                             extra=["--eval_data_file", prose])

    # flag-only mistakes
    cases["alpha_clm_mlm"] = _train_args(tiny, binarized, dump("clm"), extra=["--alpha_clm", "0.5"])
    cases["word_mask"] = _train_args(tiny, binarized, dump("word_mask"), extra=["--word_mask", "0.5"])

    # ---- binarized_data.py; each case writes into its own folder, which must stay empty
    text = root / "one_line.txt"
    text.write_text("the king won the war\n")
    empty, blank = root / "empty.txt", root / "blank.txt"
    empty.write_text("")
    blank.write_text("\n\n   \n\t\n")
    not_a_tokenizer = details["not_a_tokenizer"] = root / "not_a_tokenizer"
    not_a_tokenizer.mkdir()
    for case, corpus, tokenizer in (("bin_missing", root / "no_such_corpus.txt", tiny["bert"]),
                                    ("bin_empty", empty, tiny["bert"]), ("bin_blank", blank, tiny["bert"]),
                                    ("bin_no_vocab", text, not_a_tokenizer),
                                    ("bin_binary", binarized["bert"][0], tiny["bert"])):
        details[case] = (corpus, root / f"out_{case}")
        cases[case] = ["scripts/binarized_data.py", "--file_path", corpus, "--tokenizer_type", "bert",
                       "--tokenizer_name", tokenizer, "--dump_file", root / f"out_{case}" / "dump"]

    # In-process (conftest.run_in_process: the script's __main__ block, so the same exit status and error line),
    # one case after another: each saves an interpreter start and the torch/transformers imports (~3-5 s of CPU
    # each, ~2.5 minutes in all). These cases stay real command lines, so the exit status and the lone error line
    # are also checked as a user's shell sees them: one train.py case and one binarized_data.py case.
    in_a_subprocess = {"gpt2_data", "bin_binary"}

    def run(case):
        args = cases[case]
        try:
            if case in in_a_subprocess:
                return run_script(*args, expect_ok=False, env=OFFLINE, timeout=180)
            return run_in_process(*args, expect_ok=False, env=OFFLINE)
        except AssertionError as exc:  # it succeeded: reported by the case's own test
            return exc

    results = {case: run(case) for case in cases}
    return results, details


def _result(runs, case):
    results, _ = runs
    proc = results[case]
    if isinstance(proc, Exception):
        raise proc
    return proc


def test_data_binarized_with_another_tokenizer(runs, binarized, tiny):
    from transformers import GPT2Tokenizer

    _, details = runs
    assert len(GPT2Tokenizer.from_pretrained(str(tiny["gpt2"]))) != details["bert_vocab"]
    _check_one_error(_result(runs, "gpt2_data"), "--data_file", binarized["gpt2"][0])


def test_data_with_an_id_beyond_the_vocabulary(runs):
    _, details = runs
    _check_one_error(_result(runs, "large_id"), "--data_file", details["big"], "5000")


def test_token_counts_of_the_wrong_size(runs, binarized):
    _check_one_error(_result(runs, "counts_size"), "--token_counts", binarized["gpt2"][1])


def test_student_with_another_vocabulary(runs):
    _, details = runs
    _check_one_error(_result(runs, "student_vocab"), "--student_config", details["other_vocab"],
                     details["bert_vocab"] + 7)


def test_cosine_loss_needs_equal_hidden_sizes(runs):
    _check_one_error(_result(runs, "hidden_cos"), "--alpha_cos", "48", "32")


def test_existing_dump_path_without_force(runs):
    _, details = runs
    dump = details["dump_exists"]
    _check_one_error(_result(runs, "dump_exists"), "--dump_path", dump, "--force")
    assert os.listdir(dump) == ["marker.txt"]
    assert (dump / "marker.txt").read_text() == "previous run, keep me"


def test_force_refuses_to_delete_the_data_file(runs, binarized):
    _, details = runs
    dump, data = details["force_data_inside"]
    _check_one_error(_result(runs, "force_data_inside"), "--data_file", data, "--dump_path")
    assert sorted(os.listdir(dump)) == ["data.bin", "marker.txt"]
    assert (dump / "marker.txt").read_text() == "previous run, keep me"
    assert data.read_bytes() == open(binarized["bert"][0], "rb").read()


@pytest.mark.parametrize("case, flag, file_key, words", [
    ("config_not_json", "--student_config", "not_json", "cannot load a distilbert config"),
    ("teacher_corrupt_weights", "--teacher_name", "corrupt_weights", "cannot load a bert model"),
    ("teacher_truncated_weights", "--teacher_name", "truncated_weights", "cannot load a bert model"),
    ("teacher_unknown_model_type", "--teacher_name", "unknown_model_type", "cannot load a bert model"),
    ("student_folder_corrupt", "--student_pretrained_weights", "corrupt_weights", "cannot load a distilbert model"),
    ("student_weights_garbage_safetensors", "--student_pretrained_weights", "garbage_safetensors",
     "cannot load a state dict"),
    ("data_is_text", "--data_file", "prose", "not a binarized corpus"),
    ("data_is_counts", "--data_file", None, "token counts?), not a binarized corpus"),
    ("counts_is_corpus", "--token_counts", None, "a binarized corpus, not token counts"),
    ("eval_data_is_text", "--eval_data_file", "prose", "not a binarized corpus"),
])
def test_a_file_of_the_wrong_kind_is_one_error_naming_flag_and_file(runs, binarized, case, flag, file_key, words):
    _, details = runs
    path = details[file_key] if file_key else binarized["bert"][{"data_is_counts": 1, "counts_is_corpus": 0}[case]]
    line = _check_one_error(_result(runs, case), flag, path, words)
    assert line.index(flag) < line.index(str(path))  # "error: --flag path: what is wrong"


def test_binarizing_a_binary_file_is_refused(runs):
    _, details = runs
    corpus, out = details["bin_binary"]
    _check_one_error(_result(runs, "bin_binary"), "--file_path", corpus, "not a text file")
    assert not out.exists()


def test_alpha_clm_with_mlm(runs):
    _check_one_error(_result(runs, "alpha_clm_mlm"), "--alpha_clm", "--mlm")


def test_word_mask_split_not_summing_to_one(runs):
    _check_one_error(_result(runs, "word_mask"), "--word_mask")


def test_failed_train_runs_created_no_dump_folder(runs):
    _, details = runs
    created = sorted(p for p in os.listdir(details["root"]) if p.startswith("dump_"))
    assert created == ["dump_exists", "dump_inside"]  # the ones the fixture made itself


def test_force_never_clears_a_folder_holding_the_working_directory(tiny, binarized, tmp_path, monkeypatch):
    """In-process (check_dump_path only checks; deleting comes later), so a failure here deletes nothing."""
    import train
    from utils import RunContext, UserError

    dump = tmp_path / "runs"
    (dump / "inner").mkdir(parents=True)

    def args_for(dump_path):
        return train.parse_args([str(a) for a in _train_args(tiny, binarized, dump_path, extra=["--force"])[1:]])

    monkeypatch.chdir(dump / "inner")
    for dump_path in (dump, dump / "inner", "..", "."):
        with pytest.raises(UserError, match="--dump_path"):
            train.check_dump_path(args_for(dump_path), RunContext())
    monkeypatch.chdir(tmp_path)
    train.check_dump_path(args_for(dump / "inner"), RunContext())  # control: an ordinary old run folder may be cleared
    assert (dump / "inner").is_dir()


# ----------------------------------------------------------------------------------------- binarized_data.py


@pytest.mark.parametrize("case", ["bin_missing", "bin_empty", "bin_blank"])
def test_binarize_missing_or_empty_corpus(runs, case):
    _, details = runs
    corpus, out = details[case]
    _check_one_error(_result(runs, case), "--file_path", corpus)
    assert not out.exists() or os.listdir(out) == []  # neither the output nor a temporary file


def test_binarize_folder_without_a_tokenizer(runs):
    _, details = runs
    _, out = details["bin_no_vocab"]
    _check_one_error(_result(runs, "bin_no_vocab"), "--tokenizer_name", details["not_a_tokenizer"])
    assert not out.exists() or os.listdir(out) == []
