"""Tests for `scripts/extract.py --model_type auto` on tiny random teachers built here (no network)."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    ModernBertConfig,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    RobertaConfig,
)

from distil import extraction
from distil import extraction_auto
from conftest import REPO, expect_error, load_script, randomise
from utils import UserError

extract_cli = load_script("extract")
SCRIPTS_DIR = os.path.join(REPO, "scripts")

VOCAB = 128
N_LAYERS = 4
SEQ = 16  # longer than every sliding window below, so that full and local attention give different results
SMALL = dict(hidden_size=32, num_hidden_layers=N_LAYERS, num_attention_heads=2, intermediate_size=64,
             vocab_size=VOCAB)
DECODER = dict(SMALL, num_key_value_heads=1)

# name -> (config, masked LM?, module path of the blocks, teacher layers for the half-depth student)
# The half-depth choices are those for which a config rebuilt from the teacher's rule (rather than sliced)
# would give some kept block a different attention type: see test_the_half_depth_choices_have_teeth.
ARCHS = {
    "llama": (LlamaConfig(**DECODER), False, "model.layers", [1, 3]),
    # Layers 0, 1 full attention, 2, 3 sliding window of 4; tied embeddings as in the small Qwen2 models.
    "qwen2": (Qwen2Config(**DECODER, use_sliding_window=True, sliding_window=4, max_window_layers=2,
                          tie_word_embeddings=True), False, "model.layers", [0, 2]),
    "mistral": (MistralConfig(**DECODER, sliding_window=4), False, "model.layers", [1, 3]),
    # Layers 0, 2 global, 1, 3 local (window of 4 tokens); ModernBERT needs its layer 0 (see the errors).
    "modernbert": (ModernBertConfig(**SMALL, global_attn_every_n_layers=2, local_attention=4, pad_token_id=0,
                                    bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2),
                   True, "model.layers", [0, 2]),
    "gpt2": (GPT2Config(n_embd=32, n_layer=N_LAYERS, n_head=2, n_positions=64, vocab_size=VOCAB,
                        bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1), False, "transformer.h", [1, 3]),
    "bert": (BertConfig(**SMALL, max_position_embeddings=64), True, "bert.encoder.layer", [1, 3]),
    "roberta": (RobertaConfig(**SMALL, max_position_embeddings=66, type_vocab_size=1, bos_token_id=0,
                              pad_token_id=1, eos_token_id=2), True, "roberta.encoder.layer", [0, 3]),
}
TOKENIZER_NAMES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "vocab.json", "merges.txt"}


@pytest.fixture(scope="module")
def teacher_dirs(tmp_path_factory):
    paths = {}
    for seed, (name, (config, mlm, _, _)) in enumerate(ARCHS.items()):
        model_class = AutoModelForMaskedLM if mlm else AutoModelForCausalLM
        model = model_class.from_config(copy.deepcopy(config))
        randomise(model, seed, scale=0.3)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        paths[name] = str(path)
    return paths


def _load(name, path):
    model_class = AutoModelForMaskedLM if ARCHS[name][1] else AutoModelForCausalLM
    return model_class.from_pretrained(path).eval()


def _inputs(name):
    generator = torch.Generator().manual_seed(7)
    input_ids = torch.randint(3, VOCAB, (2, SEQ), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    if ARCHS[name][1]:
        attention_mask[1, -3:] = 0  # encoders: a padded row too
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _logits(model, name):
    with torch.no_grad():
        return model(**_inputs(name), use_cache=False).logits if not ARCHS[name][1] else \
            model(**_inputs(name)).logits


def _extract(name, teacher_dirs, folder, *extra):
    argv = ["--model_type", "auto", "--model_name", teacher_dirs[name], "--dump_folder", str(folder), *extra]
    if ARCHS[name][1]:
        argv.append("--mlm")
    extract_cli.main(argv)


def _block_tensors(block):
    return dict(block.state_dict())


def _attention_settings(block):
    """Everything in a block that says how it attends (full or sliding window), by submodule."""
    return {path: {key: value for key, value in vars(module).items()
                   if key in ("attention_type", "layer_type", "sliding_window")}
            for path, module in block.named_modules()}


# ------------------------------------------------------------------------------------------------------
# Whole teacher, half the teacher
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ARCHS))
def test_all_layers_reproduce_the_teacher(name, teacher_dirs, tmp_path):
    folder = tmp_path / "student"
    # No --layers: a 4-layer teacher is not deeper than the default 6-layer student, so every layer is kept.
    _extract(name, teacher_dirs, folder)
    teacher, student = _load(name, teacher_dirs[name]), _load(name, folder)
    assert type(student) is type(teacher)
    assert student.config.num_hidden_layers == N_LAYERS
    expected = _logits(teacher, name)
    assert expected.abs().max() > 1  # a vanishing output would make the comparison vacuous
    torch.testing.assert_close(_logits(student, name), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(ARCHS))
def test_half_the_layers(name, teacher_dirs, tmp_path):
    config, mlm, stack_path, layers = ARCHS[name]
    folder, checkpoint = tmp_path / "student", tmp_path / "student.pth"
    _extract(name, teacher_dirs, folder, "--layers", ",".join(map(str, layers)),
             "--dump_checkpoint", str(checkpoint))

    teacher, student = _load(name, teacher_dirs[name]), _load(name, folder)
    assert type(student) is type(teacher)
    with open(folder / "config.json") as handle:
        saved = json.load(handle)
    count_field = "n_layer" if name == "gpt2" else "num_hidden_layers"
    assert saved[count_field] == len(layers) == student.config.num_hidden_layers
    if "layer_types" in saved:
        assert saved["layer_types"] == [teacher.config.layer_types[index] for index in layers]
    if name == "qwen2":
        assert saved["max_window_layers"] == 1  # teacher layers 0 and 2 sit on either side of its boundary

    teacher_stack, student_stack = teacher.get_submodule(stack_path), student.get_submodule(stack_path)
    assert len(student_stack) == len(layers)
    for student_idx, teacher_idx in enumerate(layers):
        expected, actual = _block_tensors(teacher_stack[teacher_idx]), _block_tensors(student_stack[student_idx])
        assert list(actual) == list(expected)
        for key in expected:
            assert torch.equal(actual[key], expected[key]), (student_idx, key)
        assert _attention_settings(student_stack[student_idx]) == _attention_settings(teacher_stack[teacher_idx])
    outside = {key: tensor for key, tensor in teacher.state_dict().items() if not key.startswith(stack_path + ".")}
    student_state = student.state_dict()
    for key, tensor in outside.items():
        assert torch.equal(student_state[key], tensor), key

    # The same function as the teacher with the dropped blocks skipped, each kept block attending as it did
    # in the teacher: the reference runs the teacher's own blocks. Qwen2 picks a block's mask by its position
    # in config.layer_types, so the reference needs that list to follow its blocks too.
    skipping = copy.deepcopy(teacher)
    parent_path, _, child = stack_path.rpartition(".")
    setattr(skipping.get_submodule(parent_path), child, nn.ModuleList([teacher_stack[i] for i in layers]))
    if getattr(teacher.config, "layer_types", None) is not None:
        skipping.config.layer_types = [teacher.config.layer_types[index] for index in layers]
    torch.testing.assert_close(_logits(student, name), _logits(skipping, name), atol=1e-5, rtol=1e-5)

    state_dict = torch.load(checkpoint, weights_only=True)
    assert list(state_dict) == list(student_state)
    for key, tensor in state_dict.items():
        assert torch.equal(tensor, student_state[key]), key


def test_the_half_depth_choices_have_teeth():
    """Rebuilding the attention pattern from the teacher's rule instead of slicing it would differ."""
    for name in ("qwen2", "modernbert"):
        config, _, _, layers = ARCHS[name]
        sliced = [config.layer_types[index] for index in layers]
        rebuilt = type(config)(**{**config.to_dict(), "num_hidden_layers": len(layers), "layer_types": None})
        assert rebuilt.layer_types != sliced, name


def test_modernbert_keeps_global_and_local_blocks(teacher_dirs, tmp_path):
    # Teacher layers 0, 2 global, 3 local: the every-other-layer rule applied to the student's positions
    # would make its layer 1 local and its layer 2 global.
    _extract("modernbert", teacher_dirs, tmp_path / "s", "--layers", "0,2,3")
    student = _load("modernbert", tmp_path / "s")
    kinds = [(block.attention_type, block.attn.sliding_window) for block in student.model.layers]
    # sliding_window is ModernBERT's half window + 1: local_attention=4 -> 3.
    assert kinds == [("full_attention", None), ("full_attention", None), ("sliding_attention", 3)]


def test_in_memory_student_is_renumbered_for_the_kv_cache(teacher_dirs):
    teacher = _load("llama", teacher_dirs["llama"])
    student, changed = extraction_auto.build_auto_student(teacher, [1, 3])
    assert changed == ["num_hidden_layers"]
    assert [block.self_attn.layer_idx for block in student.model.layers] == [0, 1]
    # The teacher is left as it was unless inplace=True.
    assert [block.self_attn.layer_idx for block in teacher.model.layers] == [0, 1, 2, 3]
    assert teacher.config.num_hidden_layers == N_LAYERS

    input_ids = _inputs("llama")["input_ids"]
    with torch.no_grad():
        full = student(input_ids=input_ids, use_cache=False).logits
        prefix = student(input_ids=input_ids[:, :-1], use_cache=True)
        last = student(input_ids=input_ids[:, -1:], cache=prefix.cache, use_cache=True)
    torch.testing.assert_close(last.logits[:, -1], full[:, -1], atol=1e-5, rtol=1e-5)


def test_gpt2_auto_matches_the_gpt2_recipe(teacher_dirs, tmp_path):
    checkpoint = tmp_path / "auto.pth"
    _extract("gpt2", teacher_dirs, tmp_path / "s", "--layers", "0,2,3", "--dump_checkpoint", str(checkpoint))
    auto = torch.load(checkpoint, weights_only=True)
    teacher = _load("gpt2", teacher_dirs["gpt2"])
    fixed = extraction.extract_state_dict(teacher, "gpt2", [0, 2, 3])
    assert list(auto) == list(fixed)
    for key in fixed:
        assert torch.equal(auto[key], fixed[key]), key


def test_index_attributes_are_found_by_value():
    teacher = AutoModelForMaskedLM.from_config(copy.deepcopy(ARCHS["modernbert"][0]))
    assert extraction_auto.index_attributes(teacher.model.layers) == {("", "layer_idx"): 0, ("attn", "layer_idx"): 0}
    assert extraction_auto.find_layer_stack(teacher) == ("model.layers", "num_hidden_layers")


# ------------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_with_tokenizer(teacher_dirs, tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = tmp_path_factory.mktemp("llama_tok")
    AutoModelForCausalLM.from_pretrained(teacher_dirs["llama"]).save_pretrained(path)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)
    return str(path)


def test_tokenizer_is_copied(llama_with_tokenizer, tmp_path):
    folder = tmp_path / "s"
    extract_cli.main(["--model_type", "auto", "--model_name", llama_with_tokenizer, "--dump_folder", str(folder),
                  "--layers", "0,3"])
    text = "w5 w17 w99 nope w3"
    assert AutoTokenizer.from_pretrained(folder)(text)["input_ids"] == \
        AutoTokenizer.from_pretrained(llama_with_tokenizer)(text)["input_ids"] == [5, 17, 99, 0, 3]
    assert AutoModelForCausalLM.from_pretrained(folder).config.num_hidden_layers == 2


def test_no_tokenizer_is_made_up(teacher_dirs, tmp_path):
    # AutoTokenizer would happily build a default tokenizer for a folder that has none.
    _extract("gpt2", teacher_dirs, tmp_path / "s", "--layers", "0,3")
    files = set(os.listdir(tmp_path / "s"))
    assert "config.json" in files and "model.safetensors" in files
    assert not files & TOKENIZER_NAMES


# ------------------------------------------------------------------------------------------------------
# Errors: exit status 2, one line, nothing written
# ------------------------------------------------------------------------------------------------------


def test_errors(teacher_dirs, tmp_path, capsys):
    out = tmp_path / "nothing" / "student"
    llama, modernbert = teacher_dirs["llama"], teacher_dirs["modernbert"]
    auto = ["--model_type", "auto", "--dump_folder", str(out)]

    expect_error(capsys, extract_cli.main, [*auto, "--model_name", llama, "--layers", "0,4"], "--layers", "index 4 is out of range")
    expect_error(capsys, extract_cli.main, [*auto, "--model_name", llama, "--layers", "3,1"], "--layers", "increasing")
    expect_error(capsys, extract_cli.main, ["--model_type", "auto", "--model_name", llama], "--dump_folder")
    expect_error(capsys, extract_cli.main, [*auto, "--model_name", llama, "--student_config", llama], "--student_config")
    expect_error(capsys, extract_cli.main, [*auto, "--model_name", llama, "--no_vocab_transform"], "--no_vocab_transform")
    expect_error(capsys, extract_cli.main, ["--model_type", "gpt2", "--model_name", teacher_dirs["gpt2"], "--mlm"], "--mlm")
    expect_error(capsys, extract_cli.main, [*auto, "--model_name", modernbert], "modernbert", "add --mlm")
    expect_error(capsys, extract_cli.main, [*auto, "--model_name", llama, "--mlm"], "llama", "drop --mlm")
    expect_error(capsys, extract_cli.main, [*auto, "--model_name", str(tmp_path / "missing")], "--model_name", "no such directory")
    # The teacher's own folder is not empty: never overwritten.
    expect_error(capsys, extract_cli.main, ["--model_type", "auto", "--model_name", llama, "--dump_folder", llama],
                  "--dump_folder", "not empty")
    # ModernBERT's first block has no attention LayerNorm: teacher layer 1 cannot take that place.
    expect_error(capsys, extract_cli.main, [*auto, "--model_name", modernbert, "--mlm", "--layers", "1,3"],
                  "--layers 1,3", "teacher layer 1 cannot become layer 0", "attn_norm")
    assert not out.parent.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".extract-")]


class ToyConfig(PreTrainedConfig):
    model_type = "toy_extract_auto"

    def __init__(self, hidden_size=8, num_hidden_layers=2, vocab_size=16, split=True, **kwargs):
        self.hidden_size, self.num_hidden_layers, self.vocab_size = hidden_size, num_hidden_layers, vocab_size
        self.split = split
        super().__init__(**kwargs)


class ToyForCausalLM(PreTrainedModel):
    """Blocks as two parallel lists (split) or an nn.Sequential: neither is one list of blocks."""

    config_class = ToyConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        make = lambda: nn.Linear(config.hidden_size, config.hidden_size)  # noqa: E731
        if config.split:
            self.attn = nn.ModuleList(make() for _ in range(config.num_hidden_layers))
            self.mlp = nn.ModuleList(make() for _ in range(config.num_hidden_layers))
        else:
            self.blocks = nn.Sequential(*(make() for _ in range(config.num_hidden_layers)))
        self.head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def forward(self, input_ids, **kwargs):
        return self.head(self.embed(input_ids))


@pytest.fixture(scope="module")
def toy_dirs(tmp_path_factory):
    AutoConfig.register(ToyConfig.model_type, ToyConfig, exist_ok=True)
    AutoModelForCausalLM.register(ToyConfig, ToyForCausalLM, exist_ok=True)
    paths = {}
    for split in (True, False):
        path = tmp_path_factory.mktemp(f"toy_split_{split}")
        ToyForCausalLM(ToyConfig(split=split)).save_pretrained(path)
        paths[split] = str(path)
    return paths


def test_layer_list_not_found(toy_dirs, tmp_path, capsys):
    out = tmp_path / "student"
    line = expect_error(capsys, extract_cli.main, ["--model_type", "auto", "--model_name", toy_dirs[True], "--dump_folder", str(out)],
                         "cannot find the layer list of a toy_extract_auto model")
    assert "several module lists" in line and "attn, mlp" in line
    line = expect_error(capsys, extract_cli.main, ["--model_type", "auto", "--model_name", toy_dirs[False], "--dump_folder",
                                  str(out)], "cannot find the layer list of a toy_extract_auto model")
    assert "no torch.nn.ModuleList of 2 blocks" in line
    assert not out.exists()
    with pytest.raises(UserError, match="cannot find the layer list"):
        extraction_auto.build_auto_student(ToyForCausalLM(ToyConfig(split=True)), [0])


def test_cli(teacher_dirs, tmp_path):
    folder = tmp_path / "student"
    proc = subprocess.run([sys.executable, os.path.join(SCRIPTS_DIR, "extract.py"), "--model_type", "auto",
                           "--model_name", teacher_dirs["qwen2"], "--layers", "0,3", "--dump_folder", str(folder)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "student built from teacher layers 0,3" in proc.stderr
    assert "Config fields updated: num_hidden_layers, max_window_layers, layer_types" in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["student"]  # the staging folder was renamed, not left behind
    config = AutoConfig.from_pretrained(folder)
    assert config.layer_types == ["full_attention", "sliding_attention"]

    proc = subprocess.run([sys.executable, os.path.join(SCRIPTS_DIR, "extract.py"), "--model_type", "auto",
                           "--model_name", teacher_dirs["qwen2"], "--layers", "0,9", "--dump_folder",
                           str(tmp_path / "other")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "out of range" in error_lines[0], proc.stderr
