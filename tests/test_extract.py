"""Tests for scripts/extract_distilbert.py, scripts/extract.py and distil/extraction.py on tiny teachers built here."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertModel,
    DistilBertConfig,
    DistilBertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    RobertaConfig,
    RobertaForMaskedLM,
)

from distil import extraction
from conftest import REPO, expect_error, load_script, randomise
from utils import UserError

extract_cli, extract_distilbert_cli = load_script("extract"), load_script("extract_distilbert")

VOCAB = 99
N_LAYERS = 4
RANDOM_INIT_LINE = re.compile(r"Student keys left to random init: (.*)$", re.MULTILINE)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=N_LAYERS, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=64)
    model = BertForMaskedLM(config)
    randomise(model, seed=0, scale=0.1)
    with torch.no_grad():
        # DistilBERT has no token type embeddings and the extraction drops them, so the student computes
        # word + position while the teacher computes word + position + token_type[0]. Only with that row at
        # zero do the two models compute the same function, which the logits test relies on.
        model.bert.embeddings.token_type_embeddings.weight[0].zero_()
    path = tmp_path_factory.mktemp("bert")
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory):
    config = RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=N_LAYERS, num_attention_heads=2,
                           intermediate_size=37, max_position_embeddings=66, type_vocab_size=1,
                           bos_token_id=0, pad_token_id=1, eos_token_id=2)
    model = RobertaForMaskedLM(config)
    randomise(model, seed=1, scale=0.1)
    path = tmp_path_factory.mktemp("roberta")
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=N_LAYERS, n_head=2, n_positions=64,
                        bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
    model = GPT2LMHeadModel(config)
    randomise(model, seed=2, scale=0.1)
    path = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def bert_base_model_dir(tmp_path_factory):
    """A BERT checkpoint without the MLM head: loading it as BertForMaskedLM gives a random head."""
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("bert_base_model")
    BertModel(config).save_pretrained(path)
    return str(path)


def _load(model_class, path):
    return model_class.from_pretrained(path).eval()


def _input_ids(low=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, VOCAB, (2, 11), generator=generator)


def _write_json(path, config):
    config.to_json_file(str(path))
    return str(path)


# ------------------------------------------------------------------------------------------------------
# Layer choice
# ------------------------------------------------------------------------------------------------------


def test_default_layers():
    assert extraction.default_layers(12) == [0, 2, 4, 7, 9, 11]
    assert extraction.default_layers(24) == [0, 5, 9, 14, 18, 23]
    assert extraction.default_layers(4) == [0, 1, 2, 3]
    assert extraction.default_layers(6) == [0, 1, 2, 3, 4, 5]
    assert extraction.default_layers(12, 3) == [0, 6, 11]
    assert extraction.default_layers(12, 1) == [11]
    for n_teacher in range(1, 40):
        for n_student in range(1, n_teacher + 1):
            layers = extraction.default_layers(n_teacher, n_student)
            assert len(layers) == n_student
            assert layers == sorted(set(layers))
            assert layers[-1] == n_teacher - 1
            if n_student > 1:
                assert layers[0] == 0


@pytest.mark.parametrize("text, expected", [("0,2,4", [0, 2, 4]), (" 1, 3 ", [1, 3]), ("5", [5])])
def test_parse_layers(text, expected):
    assert extraction.parse_layers(text) == expected


@pytest.mark.parametrize("text", ["", "a,b", "1;2", "1.5"])
def test_parse_layers_rejects(text):
    with pytest.raises(UserError, match="--layers"):
        extraction.parse_layers(text)


@pytest.mark.parametrize("layers, message", [
    ([0, 4], "out of range"),
    ([-1, 2], "out of range"),
    ([0, 2, 2], "repeated"),
    ([2, 0], "increasing"),
    ([], "no layer"),
])
def test_check_layers_rejects(layers, message):
    with pytest.raises(UserError, match=message):
        extraction.check_layers(layers, 4)


# ------------------------------------------------------------------------------------------------------
# Same-architecture extraction (RoBERTa, GPT-2)
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type, model_class", [("gpt2", GPT2LMHeadModel), ("roberta", RobertaForMaskedLM)])
def test_all_layers_reproduce_teacher(model_type, model_class, gpt2_dir, roberta_dir):
    teacher = _load(model_class, {"gpt2": gpt2_dir, "roberta": roberta_dir}[model_type])
    state_dict = extraction.extract_state_dict(teacher, model_type, list(range(N_LAYERS)))
    assert list(state_dict) == list(model_class(teacher.config).state_dict())

    student = model_class(teacher.config).eval()
    result = student.load_state_dict(state_dict, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []

    input_ids = _input_ids()
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -3:] = 0
    with torch.no_grad():
        expected = teacher(input_ids=input_ids, attention_mask=attention_mask).logits
        actual = student(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type, model_class", [("gpt2", GPT2LMHeadModel), ("roberta", RobertaForMaskedLM)])
def test_subset_student_layer_i_is_teacher_layer(model_type, model_class, gpt2_dir, roberta_dir):
    teacher = _load(model_class, {"gpt2": gpt2_dir, "roberta": roberta_dir}[model_type])
    layers = [1, 3]
    config = extraction.same_architecture_student_config(teacher.config, len(layers))
    student = model_class(config)
    result = student.load_state_dict(extraction.extract_state_dict(teacher, model_type, layers), strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []

    def blocks(model):
        return model.transformer.h if model_type == "gpt2" else model.roberta.encoder.layer

    assert len(blocks(student)) == len(layers)
    for student_idx, teacher_idx in enumerate(layers):
        expected = blocks(teacher)[teacher_idx].state_dict()
        actual = blocks(student)[student_idx].state_dict()
        assert list(actual) == list(expected)
        for name in expected:
            assert torch.equal(actual[name], expected[name]), (student_idx, name)
    # The teacher itself must not have been shortened by the extraction.
    assert teacher.config.num_hidden_layers == N_LAYERS


def test_roberta_no_vocab_transform_leaves_head_transform_out(roberta_dir):
    teacher = _load(RobertaForMaskedLM, roberta_dir)
    with_head = extraction.extract_state_dict(teacher, "roberta", [0, 3])
    without_head = extraction.extract_state_dict(teacher, "roberta", [0, 3], vocab_transform=False)
    assert set(with_head) - set(without_head) == {
        "lm_head.dense.weight", "lm_head.dense.bias", "lm_head.layer_norm.weight", "lm_head.layer_norm.bias",
    }
    assert torch.equal(with_head["lm_head.dense.weight"], teacher.lm_head.dense.weight)


def test_extract_state_dict_rejects_wrong_teacher(gpt2_dir):
    teacher = _load(GPT2LMHeadModel, gpt2_dir)
    with pytest.raises(UserError, match="gpt2"):
        extraction.extract_state_dict(teacher, "roberta", [0, 1])
    with pytest.raises(UserError, match="gpt2"):
        extraction.extract_distilbert_state_dict(teacher, [0, 1])


# ------------------------------------------------------------------------------------------------------
# BERT -> DistilBERT
# ------------------------------------------------------------------------------------------------------


def _expected_distilbert_sources(teacher, layers, vocab_transform):
    """Student key -> teacher tensor, reached through the teacher's modules (independent of the key map)."""
    bert = teacher.bert
    expected = {
        "distilbert.embeddings.word_embeddings.weight": bert.embeddings.word_embeddings.weight,
        "distilbert.embeddings.position_embeddings.weight": bert.embeddings.position_embeddings.weight,
        "distilbert.embeddings.LayerNorm.weight": bert.embeddings.LayerNorm.weight,
        "distilbert.embeddings.LayerNorm.bias": bert.embeddings.LayerNorm.bias,
    }
    for student_idx, teacher_idx in enumerate(layers):
        block = bert.encoder.layer[teacher_idx]
        sources = {
            "attention.q_lin": block.attention.self.query,
            "attention.k_lin": block.attention.self.key,
            "attention.v_lin": block.attention.self.value,
            "attention.out_lin": block.attention.output.dense,
            "sa_layer_norm": block.attention.output.LayerNorm,
            "ffn.lin1": block.intermediate.dense,
            "ffn.lin2": block.output.dense,
            "output_layer_norm": block.output.LayerNorm,
        }
        for name, module in sources.items():
            expected[f"distilbert.transformer.layer.{student_idx}.{name}.weight"] = module.weight
            expected[f"distilbert.transformer.layer.{student_idx}.{name}.bias"] = module.bias
    head = teacher.cls.predictions
    if vocab_transform:
        expected["vocab_transform.weight"] = head.transform.dense.weight
        expected["vocab_transform.bias"] = head.transform.dense.bias
        expected["vocab_layer_norm.weight"] = head.transform.LayerNorm.weight
        expected["vocab_layer_norm.bias"] = head.transform.LayerNorm.bias
    expected["vocab_projector.weight"] = head.decoder.weight
    expected["vocab_projector.bias"] = head.bias
    return expected


@pytest.mark.parametrize("layers, vocab_transform", [([1, 3], True), ([0, 2, 3], False)])
def test_distilbert_every_weight_comes_from_its_teacher_tensor(bert_dir, layers, vocab_transform):
    teacher = _load(BertForMaskedLM, bert_dir)
    state_dict = extraction.extract_distilbert_state_dict(teacher, layers, vocab_transform)
    expected = _expected_distilbert_sources(teacher, layers, vocab_transform)
    assert list(state_dict) == list(expected)
    for key, tensor in expected.items():
        assert torch.equal(state_dict[key], tensor), key

    config = extraction.distilbert_config_from_bert(teacher.config, len(layers))
    student_keys = list(DistilBertForMaskedLM(config).state_dict())
    # Same names (and order) as the student class; only the deliberately random head transform is absent.
    random_keys = [] if vocab_transform else [
        "vocab_transform.weight", "vocab_transform.bias", "vocab_layer_norm.weight", "vocab_layer_norm.bias",
    ]
    assert [key for key in student_keys if key not in random_keys] == list(state_dict)
    assert extraction.keys_left_to_random_init(state_dict, config, DistilBertForMaskedLM, "test") == random_keys
    # Subset: student layer i is teacher layer layers[i].
    student = DistilBertForMaskedLM(config)
    student.load_state_dict(state_dict, strict=False)
    for student_idx, teacher_idx in enumerate(layers):
        assert torch.equal(student.distilbert.transformer.layer[student_idx].ffn.lin1.weight,
                           teacher.bert.encoder.layer[teacher_idx].intermediate.dense.weight)


def test_distilbert_all_layers_reproduce_teacher_logits(bert_dir):
    teacher = _load(BertForMaskedLM, bert_dir)
    state_dict = extraction.extract_distilbert_state_dict(teacher, list(range(N_LAYERS)), True)
    config = DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=N_LAYERS, n_heads=2, hidden_dim=37,
                              activation="gelu", sinusoidal_pos_embds=False, max_position_embeddings=64)
    student = DistilBertForMaskedLM(config).eval()
    result = student.load_state_dict(state_dict, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []

    input_ids = _input_ids(low=1)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -4:] = 0
    with torch.no_grad():
        expected = teacher(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=torch.zeros_like(input_ids)).logits
        actual = student(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------
# The command lines
# ------------------------------------------------------------------------------------------------------


def _run_script(script, *args):
    return subprocess.run([sys.executable, os.path.join("scripts", script), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def _logged_random_keys(text):
    match = RANDOM_INIT_LINE.search(text)
    assert match, text
    return set() if match.group(1).strip() == "none" else set(match.group(1).strip().split(", "))


def test_cli_extract_distilbert(bert_dir, tmp_path):
    out = tmp_path / "out" / "x.pth"  # the missing parent folder is created
    proc = _run_script("extract_distilbert.py", "--model_type", "bert", "--model_name", bert_dir,
                       "--dump_checkpoint", str(out), "--vocab_transform", "--layers", "0,3")
    assert proc.returncode == 0, proc.stderr
    assert _logged_random_keys(proc.stderr) == set()
    assert os.listdir(out.parent) == ["x.pth"]  # no temporary file left behind

    state_dict = torch.load(out, weights_only=True)
    config = DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=37,
                              max_position_embeddings=64)
    student = DistilBertForMaskedLM(config)
    result = student.load_state_dict(state_dict, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    teacher = _load(BertForMaskedLM, bert_dir)
    assert torch.equal(student.distilbert.transformer.layer[1].attention.q_lin.weight,
                       teacher.bert.encoder.layer[3].attention.self.query.weight)
    assert torch.equal(student.vocab_transform.weight, teacher.cls.predictions.transform.dense.weight)


def test_cli_extract_gpt2_with_student_config(gpt2_dir, tmp_path):
    teacher = _load(GPT2LMHeadModel, gpt2_dir)
    student_config = extraction.same_architecture_student_config(teacher.config, 2)
    config_path = _write_json(tmp_path / "student.json", student_config)
    out = tmp_path / "g.pth"
    # --student_config with 2 layers and no --layers: the default spread for 2 of 4 layers is 0,3.
    proc = _run_script("extract.py", "--model_type", "gpt2", "--model_name", gpt2_dir,
                       "--dump_checkpoint", str(out), "--student_config", config_path)
    assert proc.returncode == 0, proc.stderr
    assert "teacher layers 0,3" in proc.stderr
    logged = _logged_random_keys(proc.stderr)

    student = GPT2LMHeadModel(GPT2Config.from_pretrained(config_path))
    result = student.load_state_dict(torch.load(out, weights_only=True), strict=False)
    assert set(result.missing_keys) == logged == set()
    assert result.unexpected_keys == []
    assert torch.equal(student.transformer.h[1].attn.c_attn.weight, teacher.transformer.h[3].attn.c_attn.weight)


def test_main_logs_random_init_keys(bert_dir, tmp_path, caplog):
    out = tmp_path / "x.pth"
    with caplog.at_level("INFO", logger="distil"):
        extract_distilbert_cli.main(["--model_name", bert_dir, "--dump_checkpoint", str(out)])
    logged = _logged_random_keys(caplog.text)
    config = DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=N_LAYERS, n_heads=2, hidden_dim=37,
                              max_position_embeddings=64)
    result = DistilBertForMaskedLM(config).load_state_dict(torch.load(out, weights_only=True), strict=False)
    assert result.unexpected_keys == []
    assert set(result.missing_keys) == logged == {
        "vocab_transform.weight", "vocab_transform.bias", "vocab_layer_norm.weight", "vocab_layer_norm.bias",
    }


def test_dump_folder_loads_with_from_pretrained(bert_dir, tmp_path):
    # Sinusoidal as in the shipped training configs: the copied learned positions must win, also through
    # save_pretrained / from_pretrained.
    student_config = DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=37,
                                      max_position_embeddings=64, sinusoidal_pos_embds=True)
    config_path = _write_json(tmp_path / "distil.json", student_config)
    out, folder = tmp_path / "x.pth", tmp_path / "student"
    extract_distilbert_cli.main(["--model_name", bert_dir, "--dump_checkpoint", str(out), "--vocab_transform",
                             "--layers", "1,2", "--student_config", config_path, "--dump_folder", str(folder)])
    student = DistilBertForMaskedLM.from_pretrained(folder)
    assert student.config.n_layers == 2
    state_dict = torch.load(out, weights_only=True)
    loaded = student.state_dict()
    assert list(loaded) == list(state_dict)
    for key, tensor in state_dict.items():
        assert torch.equal(loaded[key], tensor), key
    teacher = _load(BertForMaskedLM, bert_dir)
    assert torch.equal(student.distilbert.embeddings.position_embeddings.weight,
                       teacher.bert.embeddings.position_embeddings.weight)


# ------------------------------------------------------------------------------------------------------
# Errors: exit status 2, one line naming the flag, no output
# ------------------------------------------------------------------------------------------------------


@pytest.fixture
def bad_student_configs(tmp_path):
    wide = DistilBertConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=2, hidden_dim=37,
                            max_position_embeddings=64)
    small_vocab = DistilBertConfig(vocab_size=VOCAB - 1, dim=32, n_layers=2, n_heads=2, hidden_dim=37,
                                   max_position_embeddings=64)
    three_layers = DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=3, n_heads=2, hidden_dim=37,
                                    max_position_embeddings=64)
    return {
        "wide": _write_json(tmp_path / "wide.json", wide),
        "small_vocab": _write_json(tmp_path / "small_vocab.json", small_vocab),
        "three_layers": _write_json(tmp_path / "three_layers.json", three_layers),
        "gpt2": _write_json(tmp_path / "gpt2.json", GPT2Config(n_layer=2)),
    }


def test_errors(bert_dir, gpt2_dir, bert_base_model_dir, bad_student_configs, tmp_path, capsys):
    out = tmp_path / "nothing" / "x.pth"
    distil, same = extract_distilbert_cli.main, extract_cli.main
    base = ["--dump_checkpoint", str(out)]

    expect_error(capsys, distil, ["--model_name", gpt2_dir, *base], "--model_name", gpt2_dir, "gpt2")
    expect_error(capsys, same, ["--model_type", "roberta", "--model_name", gpt2_dir, *base],
                  "--model_name", "gpt2", "roberta")
    expect_error(capsys, distil, ["--model_name", str(tmp_path / "missing"), *base], "--model_name")
    expect_error(capsys, distil, ["--model_name", bert_base_model_dir, *base], "--model_name", "LM head")
    expect_error(capsys, distil, ["--model_name", bert_dir, "--layers", "0,4", *base], "--layers", "out of range")
    expect_error(capsys, same, ["--model_type", "gpt2", "--model_name", gpt2_dir, "--layers", "0,7", *base],
                  "--layers", "out of range")
    expect_error(capsys, distil, ["--model_name", bert_dir, "--layers", "2,1", *base], "--layers")
    expect_error(capsys, distil, ["--model_name", bert_dir, "--layers", "1,1", *base], "--layers")
    expect_error(capsys, distil, ["--model_name", bert_dir, "--layers", "one", *base], "--layers")
    for name, needle in [("wide", "hidden size"), ("small_vocab", "vocab size"), ("gpt2", "gpt2")]:
        path = bad_student_configs[name]
        expect_error(capsys, distil, ["--model_name", bert_dir, "--student_config", path, *base],
                      "--student_config", path, needle)
    path = bad_student_configs["three_layers"]
    expect_error(capsys, distil, ["--model_name", bert_dir, "--student_config", path, "--layers", "0,3", *base],
                  "--student_config", path, "3 layers")
    expect_error(capsys, distil, ["--model_name", bert_dir, "--dump_checkpoint", str(tmp_path)],
                  "--dump_checkpoint")
    not_json = tmp_path / "not.json"
    not_json.write_text("{ not json")
    expect_error(capsys, distil, ["--model_name", bert_dir, "--student_config", str(not_json), *base],
                 "--student_config", not_json, "cannot load a model config")
    weights = os.path.join(bert_dir, "model.safetensors")
    with open(weights, "rb") as f:
        head = f.read(9999)
    for name, content in (("corrupt", os.urandom(4096)), ("truncated", head)):
        broken = tmp_path / f"teacher_{name}"
        shutil.copytree(bert_dir, broken)
        (broken / "model.safetensors").write_bytes(content)
        expect_error(capsys, distil, ["--model_name", str(broken), *base], "--model_name", broken,
                     "cannot load the weights")
    assert not out.parent.exists()


def test_cli_error_exit_status(gpt2_dir, tmp_path):
    out = tmp_path / "x.pth"
    proc = _run_script("extract_distilbert.py", "--model_type", "bert", "--model_name", gpt2_dir,
                       "--dump_checkpoint", str(out))
    assert proc.returncode == 2
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "--model_name" in error_lines[0], proc.stderr
    assert not out.exists()


# ------------------------------------------------------------------------------------------------------
# Shipped training configs
# ------------------------------------------------------------------------------------------------------

# Each shipped student config, the config class that must read it, and the teacher it is extracted from.
SHIPPED = [
    ("distilbert-base-uncased.json", DistilBertConfig, BertConfig(vocab_size=30522)),
    ("distilbert-base-cased.json", DistilBertConfig, BertConfig(vocab_size=28996)),
    ("distilbert-base-multilingual-cased.json", DistilBertConfig, BertConfig(vocab_size=119547)),
    ("distilroberta-base.json", RobertaConfig,
     RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
                   bos_token_id=0, pad_token_id=1, eos_token_id=2)),
    ("distilgpt2.json", GPT2Config, GPT2Config()),
]


@pytest.mark.parametrize("name, config_class, teacher_config", SHIPPED, ids=[s[0] for s in SHIPPED])
def test_shipped_configs_fit_their_teacher(name, config_class, teacher_config):
    path = os.path.join(REPO, "training_configs", name)
    with open(path) as handle:
        assert "model_type" in json.load(handle)
    config = config_class.from_pretrained(path)
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (6, 768, 12)
    assert config.vocab_size == teacher_config.vocab_size

    layers = extraction.default_layers(teacher_config.num_hidden_layers, config.num_hidden_layers)
    # Meta tensors: only the shapes matter, and a base-size teacher costs nothing there.
    with torch.device("meta"):
        if config.model_type == "distilbert":
            assert config.sinusoidal_pos_embds and config.hidden_dim == 3072 and config.pad_token_id == 0
            teacher = BertForMaskedLM(teacher_config)
            state_dict = extraction.extract_distilbert_state_dict(teacher, layers, vocab_transform=True)
            reference = extraction.distilbert_config_from_bert(teacher_config, len(layers))
            student_class = DistilBertForMaskedLM
        else:
            student_class = RobertaForMaskedLM if config.model_type == "roberta" else GPT2LMHeadModel
            teacher = student_class(teacher_config)
            state_dict = extraction.extract_state_dict(teacher, config.model_type, layers)
            reference = extraction.same_architecture_student_config(teacher_config, len(layers))
    extraction.check_student_config(config, reference, path)
    assert extraction.keys_left_to_random_init(state_dict, config, student_class, path) == []
