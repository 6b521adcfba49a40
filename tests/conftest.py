"""Tiny local tokenizers, teachers and student configs, built once per test session (no network)."""
import os
import random
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

WORDS = ("the a of and to in is was for on that with as by at from his her it an were which are this be has "
         "had first new one two three after city river king war game music film album song team season year "
         "world north south school church station village island bridge road house party army battle ship "
         "played released recorded wrote built opened called named became moved won lost began ended served "
         "small large early late local national famous ancient modern several many other only major").split()
RARE = "zygote quixotic xylophone jubilant vexillology".split()


def make_corpus_lines(n_lines=300, seed=0):
    """Deterministic English-like lines of varied length, a few blank and a few very short ones."""
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        if i % 37 == 5:
            lines.append("")
            continue
        n = rng.choice([3, 5]) if i % 23 == 7 else rng.randint(12, 70)
        words = [rng.choice(WORDS) if rng.random() > 0.02 else rng.choice(RARE) for _ in range(n)]
        lines.append(" ".join(words).capitalize() + " .")
    return lines


def run_script(*args, expect_ok=True, timeout=300, env=None):
    """Run a repo script with this interpreter; returns CompletedProcess. Fails the test on surprise."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=full_env)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    if not expect_ok and proc.returncode == 0:
        raise AssertionError(f"{args} unexpectedly succeeded:\n{proc.stderr[-3000:]}")
    return proc


def _train_wordpiece(lines, folder):
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizer

    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(lines, vocab_size=200, min_frequency=1,
                           special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    os.makedirs(folder, exist_ok=True)
    wp.save_model(folder)
    tok = BertTokenizer(os.path.join(folder, "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(folder)
    return tok


def _train_bpe(lines, folder, special_tokens, tokenizer_class):
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(lines, vocab_size=300, min_frequency=1, special_tokens=special_tokens)
    os.makedirs(folder, exist_ok=True)
    bpe.save_model(folder)
    tok = tokenizer_class(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"))
    tok.save_pretrained(folder)
    return tok


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Everything the end-to-end tests need, as paths: corpus, tokenizers, teachers, student configs."""
    from transformers import (BertConfig, BertForMaskedLM, DistilBertConfig, GPT2Config, GPT2LMHeadModel,
                              GPT2Tokenizer, RobertaConfig, RobertaForMaskedLM, RobertaTokenizer)
    import torch

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny")
    lines = make_corpus_lines()
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")
    paths = {"root": root, "corpus": corpus, "lines": lines}

    bert_tok = _train_wordpiece(lines, str(root / "bert"))
    BertForMaskedLM(BertConfig(vocab_size=len(bert_tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=37, max_position_embeddings=64)).save_pretrained(root / "bert")
    paths["bert"] = root / "bert"
    DistilBertConfig(vocab_size=len(bert_tok), dim=32, n_layers=1, n_heads=2, hidden_dim=37,
                     max_position_embeddings=64).to_json_file(root / "distilbert.json")
    paths["distilbert_config"] = root / "distilbert.json"

    rob_tok = _train_bpe(lines, str(root / "roberta"), ["<s>", "<pad>", "</s>", "<unk>", "<mask>"], RobertaTokenizer)
    rob_cfg = dict(vocab_size=len(rob_tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=37, max_position_embeddings=66, type_vocab_size=1, pad_token_id=rob_tok.pad_token_id,
                   bos_token_id=rob_tok.bos_token_id, eos_token_id=rob_tok.eos_token_id)
    RobertaForMaskedLM(RobertaConfig(**rob_cfg)).save_pretrained(root / "roberta")
    RobertaConfig(**dict(rob_cfg, num_hidden_layers=1)).to_json_file(root / "roberta_student.json")
    paths["roberta"], paths["roberta_config"] = root / "roberta", root / "roberta_student.json"

    gpt_tok = _train_bpe(lines, str(root / "gpt2"), ["<|endoftext|>"], GPT2Tokenizer)
    eos = gpt_tok.eos_token_id
    gpt_cfg = dict(vocab_size=len(gpt_tok), n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=eos,
                   eos_token_id=eos)
    GPT2LMHeadModel(GPT2Config(**gpt_cfg)).save_pretrained(root / "gpt2")
    GPT2Config(**dict(gpt_cfg, n_layer=1)).to_json_file(root / "gpt2_student.json")
    paths["gpt2"], paths["gpt2_config"] = root / "gpt2", root / "gpt2_student.json"
    return paths


@pytest.fixture(scope="session")
def binarized(tiny):
    """The tiny corpus binarized and counted with each tokenizer: {type: (data_file, counts_file)}."""
    out = {}
    for kind in ("bert", "roberta", "gpt2"):
        prefix = tiny["root"] / f"data_{kind}"
        run_script("scripts/binarized_data.py", "--file_path", tiny["corpus"], "--tokenizer_type", kind,
                   "--tokenizer_name", tiny[kind], "--dump_file", prefix)
        data = f"{prefix}.{kind}.bin"
        counts = tiny["root"] / f"counts_{kind}.pickle"
        run_script("scripts/token_counts.py", "--data_file", data, "--token_counts_dump", counts)
        out[kind] = (data, counts)
    return out
