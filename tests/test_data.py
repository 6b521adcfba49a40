"""The data pipeline: the binarized format, binarized_data.py, token_counts.py, legacy pickles, LmSeqsDataset."""
import collections
import re
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

import lm_seqs_dataset
from distil import preprocessing
from conftest import expect_error, load_script, run_in_process, run_script
from lm_seqs_dataset import (BinarizedCorpus, BinarizedWriter, LmSeqsDataset, load_legacy_pickle, load_token_counts,
                             resolve_data_file, save_token_counts)




def _sequences(corpus):
    return [np.asarray(corpus.sequence(i)).tolist() for i in range(corpus.n_sequences)]


def _error_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


# ------------------------------------------------------------------------------------------- the format


def test_round_trip_random_sequences(tmp_path):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 30522, size=int(n)).tolist() for n in rng.integers(0, 80, size=300)]
    seqs[17] = []  # an empty sequence is still a sequence
    path = tmp_path / "corpus.bin"
    with BinarizedWriter(str(path), vocab_size=30522, metadata={"tokenizer_name": "my-tok", "extra": [1, 2]}) as w:
        w.add_batch(seqs[:100])
        w.add_batch([])
        lengths = [len(s) for s in seqs[100:]]
        w.add_flat(np.array([t for s in seqs[100:] for t in s], dtype=np.int64), lengths)

    assert os.listdir(tmp_path) == ["corpus.bin"]
    corpus = BinarizedCorpus.open(str(path))
    assert corpus.tokens.dtype == np.uint16
    assert isinstance(corpus.tokens, np.memmap)
    assert corpus.n_sequences == 300
    assert corpus.n_tokens == sum(len(s) for s in seqs)
    assert _sequences(corpus) == seqs
    assert corpus.metadata["tokenizer_name"] == "my-tok"
    assert corpus.metadata["extra"] == [1, 2]
    assert corpus.metadata["vocab_size"] == 30522
    assert corpus.max_token_id == max(max(s) for s in seqs if s)


@pytest.mark.parametrize("vocab_size, ids, dtype", [
    (65536, [0, 65535, 1, 65534], np.uint16),
    (65537, [0, 65536, 1], np.uint32),
    (119547, [0, 65535, 65536, 70000, 119546, 3], np.uint32),
])
def test_token_dtype_follows_vocabulary(tmp_path, vocab_size, ids, dtype):
    path = str(tmp_path / "c.bin")
    with BinarizedWriter(path, vocab_size=vocab_size) as w:
        w.add_batch([ids, ids[::-1]])
    corpus = BinarizedCorpus.open(path)
    assert corpus.tokens.dtype == dtype
    assert _sequences(corpus) == [ids, ids[::-1]]
    assert corpus.max_token_id == max(ids)


@pytest.mark.parametrize("bad", [100, 5000, -1])
def test_writer_refuses_ids_outside_vocabulary_and_leaves_nothing(tmp_path, bad):
    path = tmp_path / "c.bin"
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        with BinarizedWriter(str(path), vocab_size=100) as w:
            w.add_batch([[1, 2, 3]])
            w.add_batch([[4, bad, 5]])
    assert os.listdir(tmp_path) == []


def test_failed_write_keeps_the_older_file(tmp_path):
    path = str(tmp_path / "c.bin")
    with BinarizedWriter(path, vocab_size=100, metadata={"version": "old"}) as w:
        w.add_batch([[1, 2, 3], [4, 5]])
    with pytest.raises(ValueError):
        with BinarizedWriter(path, vocab_size=100, metadata={"version": "new"}) as w:
            w.add_batch([[7, 8, 9]])
            w.add_batch([[1000]])
    with pytest.raises(RuntimeError):  # any exception inside the block, not only the writer's own
        with BinarizedWriter(path, vocab_size=100, metadata={"version": "new"}) as w:
            w.add_batch([[7, 8, 9]])
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == ["c.bin"]
    corpus = BinarizedCorpus.open(path)
    assert corpus.metadata["version"] == "old"
    assert _sequences(corpus) == [[1, 2, 3], [4, 5]]


def test_failure_while_finishing_leaves_nothing(tmp_path):
    path = tmp_path / "c.bin"
    with pytest.raises(ValueError, match="too large"):
        with BinarizedWriter(str(path), vocab_size=100, metadata={"notes": "x" * 5000}) as w:
            w.add_batch([[1, 2, 3]])
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------- binarized_data.py

START_END = {"bert": ("[CLS]", "[SEP]"), "roberta": ("<s>", "</s>"), "gpt2": ("<|endoftext|>", "<|endoftext|>")}
PREFIX = {"bert": "", "roberta": " ", "gpt2": " "}


def _hf_tokenizer(kind, folder):
    import transformers

    cls = {"bert": transformers.BertTokenizer, "roberta": transformers.RobertaTokenizer,
           "gpt2": transformers.GPT2Tokenizer}[kind]
    return cls.from_pretrained(str(folder))


def _expected_sequences(kind, tokenizer, lines):
    start, end = (tokenizer.convert_tokens_to_ids(t) for t in START_END[kind])
    assert tokenizer.unk_token_id not in (start, end) or kind == "gpt2"
    return [[start] + tokenizer(PREFIX[kind] + line.strip(), add_special_tokens=False)["input_ids"] + [end]
            for line in lines if line.strip()]


@pytest.mark.parametrize("kind", ["bert", "roberta", "gpt2"])
def test_binarized_data_matches_the_tokenizer(tiny, binarized, kind):
    data, _ = binarized[kind]
    assert os.path.basename(data) == f"data_{kind}.{kind}.bin"  # tokenizer folder name in the file name
    tokenizer = _hf_tokenizer(kind, tiny[kind])
    expected = _expected_sequences(kind, tokenizer, tiny["lines"])
    assert len(expected) < len(tiny["lines"])  # the corpus does have blank lines
    corpus = BinarizedCorpus.open(data)
    assert corpus.metadata["vocab_size"] == len(tokenizer)
    assert corpus.metadata["tokenizer_type"] == kind
    got = _sequences(corpus)
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g == e, f"sequence {i}"


def test_binarize_blank_lines_batches_and_folder_name(tiny, tmp_path):
    folder = tmp_path / "My-Tokenizer.v2"
    shutil.copytree(tiny["bert"], folder)
    lines = ["the king won the war", "", "   ", "\t", "  a small village on the river  ", "", "the", "famous ship"]
    text = tmp_path / "text.txt"
    text.write_text("\n".join(lines) + "\n\n")
    out = preprocessing.binarize(str(text), "bert", str(folder) + os.sep, str(tmp_path / "out" / "dump"),
                                  batch_lines=2)
    assert out == str(tmp_path / "out" / "dump.My-Tokenizer.v2.bin")
    assert sorted(os.listdir(tmp_path / "out")) == ["dump.My-Tokenizer.v2.bin"]
    expected = _expected_sequences("bert", _hf_tokenizer("bert", folder), lines)
    assert len(expected) == 4
    assert _sequences(BinarizedCorpus.open(out)) == expected


def test_tokenizer_slug(tmp_path):
    slug = preprocessing.tokenizer_slug
    assert slug("bert-base-uncased") == "bert-base-uncased"
    assert slug("FacebookAI/roberta-base") == "FacebookAI_roberta-base"
    assert slug("org/name") == "org_name"
    folder = tmp_path / "models" / "tok-dir"
    folder.mkdir(parents=True)
    assert slug(str(folder)) == "tok-dir"
    assert slug(str(folder) + "/") == "tok-dir"


# -------------------------------------------------------------------------------------- token_counts.py
# The refusals run in-process (conftest.run_in_process: the script's own __main__, same exit status and error
# line); test_token_counts_script_on_a_handwritten_corpus runs the real command line.


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_token_counts_match_a_counter(tiny, binarized, kind):
    data, counts_file = binarized[kind]
    vocab = len(_hf_tokenizer(kind, tiny[kind]))
    counts = load_token_counts(str(counts_file), vocab_size=vocab)
    assert counts.shape == (vocab,)
    expected = collections.Counter(t for s in _sequences(BinarizedCorpus.open(data)) for t in s)
    assert sum(expected.values()) > 1000
    assert {i: int(c) for i, c in enumerate(counts) if c} == dict(expected)


def test_token_counts_script_on_a_handwritten_corpus(tmp_path):
    data = tmp_path / "c.bin"
    with BinarizedWriter(str(data), vocab_size=10) as w:
        w.add_batch([[1, 2, 2, 9], [9, 9, 0]])
    out = tmp_path / "sub" / "counts.pickle"
    run_script("scripts/token_counts.py", "--data_file", data, "--token_counts_dump", out)
    assert load_token_counts(str(out)).tolist() == [1, 1, 2, 0, 0, 0, 0, 0, 0, 3]
    assert os.listdir(out.parent) == ["counts.pickle"]


@pytest.mark.parametrize("vocab_size", [300, 70000])  # uint16 and uint32 token files
def test_count_tokens_across_blocks_matches_numpy(tmp_path, monkeypatch, vocab_size):
    monkeypatch.setattr(preprocessing, "_BLOCK", 7)  # many blocks, the last one partial
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, vocab_size, size=n).tolist() for n in (5, 13, 1, 40, 8)]
    seqs[2] = [vocab_size - 1]
    path = str(tmp_path / "c.bin")
    with BinarizedWriter(path, vocab_size=vocab_size) as w:
        w.add_batch(seqs)
    counts = preprocessing.count_tokens(BinarizedCorpus.open(path), vocab_size)
    assert counts.dtype == np.int64 and counts.shape == (vocab_size,)
    assert counts.tolist() == np.bincount(np.concatenate(seqs), minlength=vocab_size).tolist()


def test_token_counts_refuses_an_id_outside_vocab_size(tmp_path):
    data = tmp_path / "legacy.pickle"  # a legacy corpus records no vocabulary size
    with open(data, "wb") as f:
        pickle.dump([np.array([1, 2, 3], np.uint16), np.array([4, 60, 5], np.uint16)], f)
    out = tmp_path / "counts.pickle"
    proc = run_in_process("scripts/token_counts.py", "--data_file", data, "--token_counts_dump", out,
                          "--vocab_size", "50", expect_ok=False)
    assert proc.returncode == 2
    errors = _error_lines(proc)
    assert len(errors) == 1 and str(data) in errors[0] and "60" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_token_counts_refuses_a_vocab_size_other_than_recorded(binarized, tmp_path):
    data, _ = binarized["bert"]
    out = tmp_path / "counts.pickle"
    proc = run_in_process("scripts/token_counts.py", "--data_file", data, "--token_counts_dump", out,
                          "--vocab_size", "30522", expect_ok=False)
    assert proc.returncode == 2
    errors = _error_lines(proc)
    assert len(errors) == 1 and "--vocab_size" in errors[0] and str(data) in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_token_counts_vocab_size_zero_is_refused(tmp_path, capsys):
    token_counts = load_script("token_counts")
    data = tmp_path / "legacy.pickle"  # no recorded vocabulary: 0 must not fall back to the 30522 default
    with open(data, "wb") as f:
        pickle.dump([np.array([1, 2, 3], np.uint16)], f)
    out = tmp_path / "counts.npy"
    with pytest.raises(SystemExit) as exit_info:
        token_counts.main(["--data_file", str(data), "--token_counts_dump", str(out), "--vocab_size", "0"])
    assert exit_info.value.code == 2
    assert "--vocab_size" in capsys.readouterr().err
    assert not out.exists()
    token_counts.main(["--data_file", str(data), "--token_counts_dump", str(out), "--vocab_size", "4"])
    assert load_token_counts(str(out)).tolist() == [0, 1, 1, 1]


def test_token_counts_save_load_and_size_check(tmp_path):
    path = str(tmp_path / "counts.pickle")
    save_token_counts(path, [5, 0, 7])
    assert load_token_counts(path).tolist() == [5, 0, 7]
    assert load_token_counts(path).dtype == np.int64
    with pytest.raises(ValueError, match="3"):
        load_token_counts(path, vocab_size=4)
    with pytest.raises(FileNotFoundError, match="nope"):
        load_token_counts(str(tmp_path / "nope"))


# ---------------------------------------------------------------------------------------- legacy pickles


@pytest.mark.parametrize("protocol", sorted({pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL, 3}))
@pytest.mark.parametrize("dtype", [np.uint16, np.int32])  # the original's choices for small / large vocabularies
def test_legacy_pickle_loads(tmp_path, protocol, dtype):
    rng = np.random.default_rng(1)
    seqs = [np.concatenate([[2], rng.integers(5, 200, size=int(n)), [3]]).astype(dtype)
            for n in rng.integers(0, 40, size=50)]
    path = tmp_path / "binarized_text.bert-base-uncased.pickle"
    with open(path, "wb") as f:
        pickle.dump(seqs, f, protocol=protocol)

    corpus = BinarizedCorpus.open(str(path))
    assert corpus.n_sequences == 50
    assert _sequences(corpus) == [s.tolist() for s in seqs]
    assert corpus.max_token_id == max(int(s.max()) for s in seqs)

    params = dict(max_len=512, mlm=True,
                                   special_tok_ids={"pad_token": 0, "unk_token": 1, "cls_token": 2, "sep_token": 3})
    dataset = LmSeqsDataset(corpus, **params)
    kept = [s.tolist() for s in seqs if len(s) >= 12]
    assert len(dataset) == len(kept)
    assert [dataset[i][0].tolist() for i in range(len(dataset))] == kept


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _OpensFile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_pickle_that_would_run_code_is_refused(tmp_path):
    # positive control: an ordinary unpickler does run this pickle's payload
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_OpensFile(control))).close()
    assert control.exists()

    for name, evil in (("shell", _RunsShell), ("open", _OpensFile)):
        marker = tmp_path / f"marker-{name}"
        for payload in (evil(marker), [np.array([2, 5, 3], np.uint16), evil(marker)]):
            path = tmp_path / f"evil-{name}.pickle"
            path.write_bytes(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))
            with pytest.raises(ValueError, match=re.escape(str(path))):
                BinarizedCorpus.open(str(path))
            with pytest.raises(ValueError, match=re.escape(str(path))):
                load_token_counts(str(path))
            with pytest.raises(ValueError):
                load_legacy_pickle(str(path))
            assert not marker.exists()


def test_legacy_pickle_of_something_else_is_refused(tmp_path):
    path = tmp_path / "ints.pickle"
    path.write_bytes(pickle.dumps([[1, 2, 3]]))  # lists, not numpy arrays
    with pytest.raises(ValueError, match=re.escape(str(path))):
        BinarizedCorpus.open(str(path))
    path.write_bytes(b"this is not a pickle at all")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        BinarizedCorpus.open(str(path))


def test_legacy_token_counts_pickle_loads(tmp_path):
    path = tmp_path / "token_counts.bert-base-uncased.pickle"
    counts = [0, 3, 0, 12, 7, 1]
    with open(path, "wb") as f:
        pickle.dump(counts, f, protocol=pickle.HIGHEST_PROTOCOL)
    loaded = load_token_counts(str(path), vocab_size=6)
    assert loaded.tolist() == counts
    assert loaded.dtype == np.int64


# ----------------------------------------------------------------------------------- README file names


def test_pickle_name_resolves_to_the_bin_file(tmp_path):
    stem = tmp_path / "binarized_text.bert-base-uncased"
    with BinarizedWriter(f"{stem}.bin", vocab_size=100) as w:
        w.add_batch([[2, 10, 11, 3]])
    assert resolve_data_file(f"{stem}.pickle") == f"{stem}.bin"
    assert _sequences(BinarizedCorpus.open(f"{stem}.pickle")) == [[2, 10, 11, 3]]
    # an existing pickle wins; a name with no file at all is left alone (and reported as missing)
    assert resolve_data_file(str(tmp_path / "other.pickle")) == str(tmp_path / "other.pickle")
    with pytest.raises(FileNotFoundError, match="other.pickle"):
        BinarizedCorpus.open(str(tmp_path / "other.pickle"))
    with open(f"{stem}.pickle", "wb") as f:
        pickle.dump([np.array([2, 7, 3], np.uint16)], f)
    assert resolve_data_file(f"{stem}.pickle") == f"{stem}.pickle"
    assert _sequences(BinarizedCorpus.open(f"{stem}.pickle")) == [[2, 7, 3]]


# ------------------------------------------------------------------------------------------ LmSeqsDataset

PAD, UNK, CLS, SEP, MASK = 7, 8, 5, 6, 9
BERT_IDS = {"pad_token": PAD, "unk_token": UNK, "cls_token": CLS, "sep_token": SEP, "mask_token": MASK}


def _mlm_params(max_len=512):
    return dict(max_len=max_len, mlm=True, special_tok_ids=dict(BERT_IDS))


def _items(dataset):
    out = []
    for i in range(len(dataset)):
        ids, n = dataset[i]
        assert ids.dtype == np.int64 and len(ids) == n
        out.append(ids.tolist())
    return out


def _body(rng, n, low=10, high=200):
    return rng.integers(low, high, size=n).tolist()


def test_long_sequences_are_cut_into_wrapped_chunks():
    rng = np.random.default_rng(2)
    body = _body(rng, 100)
    before, after = [CLS] + _body(rng, 15) + [SEP], [CLS] + _body(rng, 13) + [SEP]
    exactly_max = [CLS] + _body(rng, 18) + [SEP]
    dataset = LmSeqsDataset([before, [CLS] + body + [SEP], exactly_max, after], **_mlm_params(20))
    items = _items(dataset)
    assert items[0] == before and items[-2] == exactly_max and items[-1] == after
    chunks = items[1:-2]
    assert len(chunks) == 6  # 100 = 5 * 18 + 10: the last chunk has 12 tokens and is kept
    for chunk in chunks:
        assert chunk[0] == CLS and chunk[-1] == SEP and len(chunk) <= 20
        assert CLS not in chunk[1:-1] and SEP not in chunk[1:-1]
    assert [len(c) for c in chunks] == [20] * 5 + [12]
    assert [t for c in chunks for t in c[1:-1]] == body


def test_short_sequences_are_dropped():
    rng = np.random.default_rng(3)
    seqs = {n: [CLS] + _body(rng, n - 2) + [SEP] for n in (3, 10, 11, 12, 13)}
    dataset = LmSeqsDataset(list(seqs.values()), **_mlm_params())
    assert _items(dataset) == [seqs[12], seqs[13]]


def test_mostly_unknown_sequences_are_dropped():
    rng = np.random.default_rng(4)

    def seq(n_unk, length=20):
        body = _body(rng, length - 2)
        for pos in rng.choice(length - 2, size=n_unk, replace=False):
            body[pos] = UNK
        return [CLS] + body + [SEP]

    half, under, all_unk, clean = seq(10), seq(9), seq(18), seq(0)
    odd_half, odd_under = seq(11, 22), seq(10, 21)  # 11/22 = 0.5 dropped, 10/21 < 0.5 kept
    dataset = LmSeqsDataset([half, under, all_unk, clean, odd_half, odd_under], **_mlm_params())
    assert _items(dataset) == [under, clean, odd_under]


def test_clm_skips_the_unknown_filter_when_unk_is_the_boundary_token():
    eot = 0
    params = dict(max_len=16, mlm=False,
                                   special_tok_ids={"bos_token": eot, "eos_token": eot, "unk_token": eot})
    rng = np.random.default_rng(5)
    full_of_eot = [eot] * 14
    normal = [eot] + _body(rng, 12) + [eot]
    long = [eot] + _body(rng, 20) + [eot]
    dataset = LmSeqsDataset([full_of_eot, normal, long], **params)
    items = _items(dataset)
    assert items[:2] == [full_of_eot, normal]
    # the long one: 20 body tokens in chunks of 14; the 6-token tail chunk (8 tokens) is too short
    assert items[2:] == [[eot] + long[1:15] + [eot]]

    batch = [dataset[1], dataset[0], (np.array([eot, 11, 12, eot]), 4)]
    ids, lengths = dataset.batch_sequences(batch)
    assert lengths.tolist() == [14, 14, 4]
    assert ids.dtype == torch.long and ids.shape == (3, 14)
    assert ids[2].tolist() == [eot, 11, 12, eot] + [eot] * 10  # no pad token: padded with unk (= eot)


def test_clm_pads_with_unk_when_there_is_no_pad_token():
    params = dict(max_len=64, mlm=False,
                                   special_tok_ids={"bos_token": 1, "eos_token": 2, "unk_token": 3})
    rng = np.random.default_rng(6)
    a, b = [1] + _body(rng, 14) + [2], [1] + _body(rng, 10) + [2]
    dataset = LmSeqsDataset([a, b], **params)
    ids, lengths = dataset.batch_sequences([dataset[0], dataset[1]])
    assert lengths.tolist() == [16, 12]
    assert ids.tolist() == [a, b + [3] * 4]


def test_mlm_batch_pads_with_pad_id():
    rng = np.random.default_rng(7)
    seqs = [[CLS] + _body(rng, n) + [SEP] for n in (10, 25, 14)]
    dataset = LmSeqsDataset(seqs, **_mlm_params())
    ids, lengths = dataset.batch_sequences([dataset[i] for i in range(3)])
    assert ids.dtype == torch.long and lengths.dtype == torch.long
    assert lengths.tolist() == [12, 27, 16]
    assert ids.tolist() == [s + [PAD] * (27 - len(s)) for s in seqs]


def _reference_dataset(seqs, max_len, bos, eos, unk):
    """The documented behaviour, written plainly: split, drop <= 11 tokens, drop >= 50% unknown."""
    views = []
    for s in seqs:
        if len(s) <= max_len:
            views.append(list(s))
            continue
        body = list(s)
        if body[0] == bos:
            body = body[1:]
        if body[-1] == eos:
            body = body[:-1]
        for i in range(0, len(body), max_len - 2):
            views.append([bos] + body[i:i + max_len - 2] + [eos])
    views = [v for v in views if len(v) >= 12]
    if unk is not None and unk not in (bos, eos):
        views = [v for v in views if v.count(unk) / len(v) < 0.5]
    return views


def _random_corpus(rng, n_seqs=400):
    seqs = []
    for _ in range(n_seqs):
        n = int(rng.integers(1, 90))
        unk_rate = rng.choice([0.0, 0.1, 0.45, 0.5, 0.55, 0.9])
        body = [UNK if rng.random() < unk_rate else int(rng.integers(10, 200)) for _ in range(n)]
        seqs.append([CLS] + body + [SEP] if rng.random() < 0.95 else body)  # a few without boundary tokens
    return seqs


@pytest.mark.parametrize("scan_tokens", [1, 7, 50, 333])
def test_unknown_scan_in_blocks_gives_the_same_result(tmp_path, monkeypatch, scan_tokens):
    rng = np.random.default_rng(8)
    seqs = _random_corpus(rng)
    expected = _reference_dataset(seqs, 32, CLS, SEP, UNK)
    # the corpus exercises every rule: long sequences are split, short and mostly-unknown views dropped
    assert sum(len(s) > 32 for s in seqs) > 50 and sum(len(s) < 12 for s in seqs) > 20
    assert len(_reference_dataset(seqs, 32, CLS, SEP, None)) - len(expected) > 50 and len(expected) > 100

    one_block = LmSeqsDataset(seqs, **_mlm_params(32))
    assert _items(one_block) == expected

    path = str(tmp_path / "c.bin")
    with BinarizedWriter(path, vocab_size=200) as w:
        w.add_batch(seqs)
    corpus = BinarizedCorpus.open(path)
    monkeypatch.setattr(lm_seqs_dataset, "_UNK_SCAN_TOKENS", scan_tokens)
    for data in (corpus, seqs):  # file-backed (blocks read from the file) and in memory
        blocks = LmSeqsDataset(data, **_mlm_params(32))
        assert _items(blocks) == expected
        np.testing.assert_array_equal(blocks.starts, one_block.starts)
        np.testing.assert_array_equal(blocks.lengths, one_block.lengths)


# ------------------------------------------------------------------------------------- damaged files


def _write_small_corpus(path):
    with BinarizedWriter(str(path), vocab_size=100) as w:
        w.add_batch([[2] + list(range(10, 40)) + [3], [2, 50, 51, 3]])


@pytest.mark.parametrize("keep", [-1, -8, -20, 4096 + 10, 100, 9])
def test_truncated_data_file_is_refused_naming_it(tmp_path, keep):
    path = tmp_path / "damaged.bin"
    _write_small_corpus(path)
    blob = path.read_bytes()
    path.write_bytes(blob[:keep])
    with pytest.raises(ValueError, match=re.escape(str(path))):
        BinarizedCorpus.open(str(path))


def test_empty_data_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "empty.bin"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        BinarizedCorpus.open(str(path))
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        BinarizedCorpus.open(str(tmp_path / "missing.bin"))


def test_truncated_legacy_pickle_and_counts_are_refused_naming_them(tmp_path):
    path = tmp_path / "legacy.pickle"
    path.write_bytes(pickle.dumps([np.arange(20, dtype=np.uint16)] * 3)[:-10])
    with pytest.raises(ValueError, match=re.escape(str(path))):
        BinarizedCorpus.open(str(path))
    counts = tmp_path / "counts.npy"
    save_token_counts(str(counts), np.arange(1000))
    counts.write_bytes(counts.read_bytes()[:-100])
    with pytest.raises(ValueError, match=re.escape(str(counts))):
        load_token_counts(str(counts))


def test_token_counts_script_reports_a_truncated_file(tmp_path):
    path = tmp_path / "damaged.bin"
    _write_small_corpus(path)
    path.write_bytes(path.read_bytes()[:-3])
    proc = run_in_process("scripts/token_counts.py", "--data_file", path, "--token_counts_dump", tmp_path / "c.npy",
                          expect_ok=False)
    assert proc.returncode == 2
    errors = _error_lines(proc)
    assert len(errors) == 1 and str(path) in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_token_counts_script_refuses_a_text_file_naming_the_flag(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not a corpus\n" * 100)
    line = expect_error(capsys, load_script("token_counts").main,
                        ["--data_file", str(text), "--token_counts_dump", str(tmp_path / "out" / "c.npy")],
                        "--data_file", text, "not a binarized corpus")
    assert line.startswith("error: --data_file ")
    assert not (tmp_path / "out").exists()


def test_binarization_ignores_padding_and_truncation_in_tokenizer_json(tiny, tmp_path):
    """A tokenizer.json that pads/truncates to a fixed length (as the real bert-base-uncased one does) must not
    change the stored sequences: each keeps its true length."""
    import shutil

    from transformers import BertTokenizer

    from lm_seqs_dataset import BinarizedCorpus
    from distil.preprocessing import binarize

    folder = tmp_path / "padded-tok"
    shutil.copytree(tiny["bert"], folder)
    tok = BertTokenizer.from_pretrained(folder)
    tok.backend_tokenizer.enable_padding(length=16, pad_id=tok.pad_token_id, pad_token=tok.pad_token)
    tok.backend_tokenizer.enable_truncation(max_length=16)
    tok.backend_tokenizer.save(str(folder / "tokenizer.json"))
    lines = ["the city", " ".join(["music"] * 40)]
    corpus = tmp_path / "two.txt"
    corpus.write_text("\n".join(lines) + "\n")
    out = binarize(str(corpus), "bert", str(folder), str(tmp_path / "out"))
    data = BinarizedCorpus.open(out)
    plain = BertTokenizer.from_pretrained(tiny["bert"])
    for i, line in enumerate(lines):
        expected = [plain.cls_token_id] + plain(line, add_special_tokens=False)["input_ids"] + [plain.sep_token_id]
        assert data.sequence(i).tolist() == expected


# ------------------------------------------------------------------------------ index built block-wise


class _Untouchable(np.memmap):
    """A memory map that refuses to be indexed: proves the index build reads the file, not the mapping."""

    def __getitem__(self, key):
        raise AssertionError("read through the memory map")


@pytest.mark.parametrize("scan_tokens, chunk", [(1, 1), (40, 3), (500, 64), (1 << 22, 1 << 18)])
@pytest.mark.parametrize("special", ["bert", "gpt2", "no_unk"])
def test_index_built_block_by_block_matches_the_reference(tmp_path, monkeypatch, scan_tokens, chunk, special):
    rng = np.random.default_rng(9)
    seqs = _random_corpus(rng, n_seqs=300)
    seqs[5], seqs[40] = [], [CLS]  # sequences too short to have both boundary tokens
    seqs[60] = [CLS] + [UNK] * 200 + [SEP]  # longer than a block of every size tried
    ids = {"bert": dict(BERT_IDS), "gpt2": {"bos_token": SEP, "eos_token": SEP, "unk_token": SEP},
           "no_unk": {"pad_token": PAD, "cls_token": CLS, "sep_token": SEP}}[special]
    mlm = special != "gpt2"
    bos, eos = (CLS, SEP) if mlm else (SEP, SEP)
    expected = _reference_dataset(seqs, 32, bos, eos, ids.get("unk_token"))
    params = dict(max_len=32, mlm=mlm, special_tok_ids=ids)
    path = str(tmp_path / "c.bin")
    with BinarizedWriter(path, vocab_size=200) as w:
        w.add_batch(seqs)
    monkeypatch.setattr(lm_seqs_dataset, "_UNK_SCAN_TOKENS", scan_tokens)
    monkeypatch.setattr(lm_seqs_dataset, "_OFFSETS_CHUNK", chunk)
    corpus = BinarizedCorpus.open(path)
    assert isinstance(corpus.offsets, np.memmap)
    corpus.tokens, corpus.offsets = corpus.tokens.view(_Untouchable), corpus.offsets.view(_Untouchable)
    built = LmSeqsDataset(corpus, **params)
    assert built.starts.dtype == np.int64 and built.lengths.dtype == np.int32 and built.wrapped.dtype == bool
    assert len(built.starts) == len(built.lengths) == len(built.wrapped) == len(expected)

    in_memory = LmSeqsDataset(seqs, **params)
    assert _items(in_memory) == expected
    for name in ("starts", "lengths", "wrapped"):
        np.testing.assert_array_equal(getattr(built, name), getattr(in_memory, name))


def test_sequence_blocks_respect_both_bounds(tmp_path, monkeypatch):
    monkeypatch.setattr(lm_seqs_dataset, "_OFFSETS_CHUNK", 4)
    lens = [3, 0, 5, 9, 1, 1, 1, 1, 1, 20, 2, 0, 0, 4]
    path = str(tmp_path / "c.bin")
    with BinarizedWriter(path, vocab_size=100) as w:
        w.add_batch([[1] * n for n in lens])
    corpus = BinarizedCorpus.open(path)
    for max_tokens in (None, 1, 6, 10, 1000):
        runs = list(corpus.iter_sequence_blocks(max_tokens))
        assert np.concatenate([r[:-1] for r in runs] + [runs[-1][-1:]]).tolist() == corpus.offsets.tolist()
        for r in runs:
            assert 1 <= len(r) - 1 <= 4
            assert max_tokens is None or len(r) == 2 or r[-1] - r[0] <= max_tokens


@pytest.mark.parametrize("where", ["first", "last", "inside_a_chunk", "across_chunks"])
def test_corrupted_offsets_are_found_in_any_chunk(tmp_path, monkeypatch, where):
    monkeypatch.setattr(lm_seqs_dataset, "_OFFSETS_CHUNK", 4)
    path = tmp_path / "c.bin"
    with BinarizedWriter(str(path), vocab_size=100) as w:
        w.add_batch([[1, 2, 3]] * 11)  # offsets 0, 3, ..., 33: chunks [0:4) [4:8) [8:12)
    at, offsets = BinarizedCorpus.open(str(path)).metadata["offsets_at"], list(range(0, 34, 3))
    index, value = {"first": (0, 1), "last": (11, 32), "inside_a_chunk": (6, 14), "across_chunks": (4, 8)}[where]
    offsets[index] = value
    blob = bytearray(path.read_bytes())
    blob[at:] = np.array(offsets, dtype=np.int64).tobytes()
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="corrupted sequence offsets"):
        BinarizedCorpus.open(str(path))
