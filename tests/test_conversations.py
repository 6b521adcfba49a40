"""Conversations in (issue 32, item 1): the chat template's rendering, the assistant-token loss mask (exact spans,
single- and multi-turn, against the template's own return_assistant_tokens_mask), the corpus format's loss mask
(version 2; version 1 unchanged), cutting at turn boundaries, and one-line errors for bad input."""
import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from conftest import CHATML_GENERATION_TEMPLATE, expect_error, load_script, make_chat_model
from distil.conversations import assistant_char_spans, end_of_turn_ids, render_with_mask, _mask_from_spans
from lm_seqs_dataset import HEADER_BYTES, MAGIC, BinarizedCorpus, BinarizedWriter

TWO_TURNS = [{"role": "user", "content": "what is the capital of France ?"},
             {"role": "assistant", "content": "Paris ."},
             {"role": "user", "content": "and Italy ?"},
             {"role": "assistant", "content": "Rome it is nice ."}]
END = {"qwen2": "<|im_end|>", "llama": "<|eot_id|>"}


@pytest.fixture(scope="module")
def chat_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return {"qwen2": make_chat_model(root / "qwen2", "qwen2"), "llama": make_chat_model(root / "llama", "llama"),
            "generation": make_chat_model(root / "generation", "qwen2", CHATML_GENERATION_TEMPLATE)}


def _runs(mask):
    """(start, end) of each run of True."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


@pytest.mark.parametrize("style", ["qwen2", "llama"])
@pytest.mark.parametrize("n_turns", [1, 2])
def test_the_mask_covers_exactly_each_answer_and_its_end_of_turn_token(chat_models, style, n_turns):
    tokenizer = AutoTokenizer.from_pretrained(chat_models[style])
    messages = TWO_TURNS[: 2 * n_turns]
    ids, mask, turn_ends = render_with_mask(tokenizer, messages)
    assert ids == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    runs = _runs(mask)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert len(runs) == n_turns and [int(e) for _, e in runs] == turn_ends
    for (start, end), answer in zip(runs, answers):
        # the tokens of the answer followed by the template's end-of-turn token, nothing before or after
        assert tokenizer.decode(ids[start:end]).replace(" ", "") == (answer + END[style]).replace(" ", "")
        assert tokenizer.convert_ids_to_tokens(ids[end - 1]) == END[style]
    assert end_of_turn_ids(tokenizer) == [tokenizer.convert_tokens_to_ids(END[style])]


def test_prefix_rendering_agrees_with_the_templates_own_assistant_mask(chat_models):
    tokenizer = AutoTokenizer.from_pretrained(chat_models["generation"])
    out = tokenizer.apply_chat_template(TWO_TURNS, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    own = np.asarray(out["assistant_masks"], dtype=bool)
    text, spans = assistant_char_spans(tokenizer, TWO_TURNS)  # the path for templates without markers
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert encoded["input_ids"] == out["input_ids"]
    assert own.sum() > 0 and np.array_equal(_mask_from_spans(encoded["offset_mapping"], spans), own)
    ids, mask, _ = render_with_mask(tokenizer, TWO_TURNS)  # the markers' path
    assert ids == out["input_ids"] and np.array_equal(mask, own)


def _write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_binarized_chat_writes_a_masked_corpus_and_cuts_at_turn_boundaries(chat_models, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(chat_models["llama"])
    full_ids, full_mask, ends = render_with_mask(tokenizer, TWO_TURNS)
    data = _write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": TWO_TURNS},
        {"prompt": "what is the capital of France ?", "completion": "Paris ."},
        {"prompt": [{"role": "user", "content": " ".join(["hello"] * 40)}], "completion": "yes"},  # too long
    ])
    max_len = ends[0] + 2  # the first answer fits, the second does not
    load_script("binarized_chat").main(["--file_path", str(data), "--tokenizer_name", chat_models["llama"],
                                                "--dump_file", str(tmp_path / "chat"), "--max_seq_length",
                                                str(max_len)])
    corpus = BinarizedCorpus.open(str(tmp_path / "chat.llama.bin"))
    assert corpus.metadata["format_version"] == 2 and corpus.n_sequences == 2  # the long one dropped
    first = np.asarray(corpus.sequence(0))
    assert first.tolist() == full_ids[: ends[0]]  # cut after the first whole answer
    mask0 = np.asarray(corpus.loss_mask[: ends[0]], dtype=bool)
    assert np.array_equal(mask0, full_mask[: ends[0]])
    single, single_mask, _ = render_with_mask(tokenizer, TWO_TURNS[:2])
    assert np.asarray(corpus.sequence(1)).tolist() == single
    assert np.array_equal(np.asarray(corpus.loss_mask[corpus.offsets[1]:], dtype=bool), single_mask)


def test_a_corpus_without_a_mask_is_still_format_version_1_byte_for_byte(tmp_path):
    path = str(tmp_path / "plain.bin")
    with BinarizedWriter(path, vocab_size=300) as writer:
        writer.add_flat(np.arange(20), [12, 8])
    raw = open(path, "rb").read()
    n = int(np.frombuffer(raw[len(MAGIC): len(MAGIC) + 4], np.uint32)[0])
    header = json.loads(raw[len(MAGIC) + 4: len(MAGIC) + 4 + n])
    assert header["format_version"] == 1 and "loss_mask_at" not in header
    # the layout version 1 always had: header, uint16 tokens, 8-aligned int64 offsets, nothing after them
    expected = raw[:HEADER_BYTES] + np.arange(20, dtype=np.uint16).tobytes() + \
        np.array([0, 12, 20], dtype=np.int64).tobytes()
    assert raw == expected
    assert BinarizedCorpus.open(path).loss_mask is None


def test_bad_input_is_one_line_naming_the_line(chat_models, tmp_path, capsys):
    main = load_script("binarized_chat").main
    base = ["--tokenizer_name", chat_models["llama"], "--dump_file", str(tmp_path / "out")]
    good = {"messages": TWO_TURNS}
    bad_json = _write_jsonl(tmp_path / "bad.jsonl", [good, "{not json"])
    expect_error(capsys, main, ["--file_path", bad_json] + base, f"{bad_json}:2", "not a JSON object")
    no_answer = _write_jsonl(tmp_path / "no_answer.jsonl", [good, good, {"messages": TWO_TURNS[:1]}])
    expect_error(capsys, main, ["--file_path", no_answer] + base, f"{no_answer}:3", "no assistant turn")
    bad_role = _write_jsonl(tmp_path / "role.jsonl", [{"messages": [{"role": "bot", "content": "x"}]}])
    expect_error(capsys, main, ["--file_path", bad_role] + base, f"{bad_role}:1", "'bot'")
    answer_first = _write_jsonl(tmp_path / "first.jsonl", [good, {"messages": TWO_TURNS[1:]}])
    expect_error(capsys, main, ["--file_path", answer_first] + base, f"{answer_first}:2", "opens with an assistant")
    neither = _write_jsonl(tmp_path / "neither.jsonl", [{"text": "hello"}])
    expect_error(capsys, main, ["--file_path", neither] + base, f"{neither}:1", "'prompt'")
    no_template = tmp_path / "no_template"
    make_chat_model(no_template, "llama")
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in no_template.glob("chat_template.*"):
        extra.unlink()
    expect_error(capsys, main, ["--file_path", bad_json, "--tokenizer_name", no_template, "--dump_file",
                                tmp_path / "out"], "no chat template")
    assert not list(tmp_path.glob("out*"))  # nothing written by a failed run


def test_parquet_and_json_array_files_give_the_same_corpus_as_json_lines(chat_models, tmp_path):
    import datasets

    records = [{"conversation": TWO_TURNS}, {"conversation": TWO_TURNS[:2]}]
    _write_jsonl(tmp_path / "a.jsonl", records)
    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "b.parquet"))
    (tmp_path / "c.json").write_text(json.dumps(records))
    main = load_script("binarized_chat").main
    corpora = []
    for name in ("a.jsonl", "b.parquet", "c.json"):
        main(["--file_path", str(tmp_path / name), "--tokenizer_name", chat_models["qwen2"], "--dump_file",
              str(tmp_path / name.split(".")[0]), "--messages_column", "conversation"])
        corpus = BinarizedCorpus.open(str(tmp_path / f"{name.split('.')[0]}.qwen2.bin"))
        corpora.append((np.asarray(corpus.tokens).tolist(), np.asarray(corpus.loss_mask).tolist()))
    assert corpora[0] == corpora[1] == corpora[2] and sum(corpora[0][1]) > 0
