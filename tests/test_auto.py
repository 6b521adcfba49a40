"""Beyond BERT and GPT-2: distil tiny Llama-style (causal) and ModernBERT-style (masked) models end to end."""
import json

import numpy as np
import pytest
import torch

from conftest import run_in_process, run_script


def _losses(dump, name):
    records = [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]
    return [r[name] for r in records if r["split"] == "train"]


def _assert_falls(values, margin):
    assert len(values) >= 6, values
    first, last = np.mean(values[:2]), np.mean(values[-2:])
    assert last < first - margin, (first, last)


@pytest.fixture(scope="module")
def llama_teacher(tiny, tmp_path_factory):
    """A random 4-layer Llama with a byte-level BPE tokenizer that has BOS/EOS but no pad and no unk token."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("llama") / "teacher"
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(tiny["lines"], vocab_size=320, min_frequency=1, special_tokens=["<s>", "</s>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=64, max_position_embeddings=64,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         initializer_range=0.3)  # peaked predictions: something for a student to imitate
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def modernbert_teacher(tiny, tmp_path_factory):
    """A random 4-layer ModernBERT (global attention every 2 layers) with the tiny WordPiece tokenizer."""
    from transformers import BertTokenizer, ModernBertConfig, ModernBertForMaskedLM

    folder = tmp_path_factory.mktemp("modernbert") / "teacher"
    tok = BertTokenizer.from_pretrained(tiny["bert"])
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    config = ModernBertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                              intermediate_size=64, max_position_embeddings=64, global_attn_every_n_layers=2,
                              local_attention=8, pad_token_id=tok.pad_token_id, cls_token_id=tok.cls_token_id,
                              sep_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                              initializer_range=0.3)  # peaked predictions: something for a student to imitate
    ModernBertForMaskedLM(config).save_pretrained(folder)
    return folder


def _binarize(tiny, tokenizer_folder, prefix, counts=False):
    """In-process (conftest.run_in_process: the scripts' own command lines, without an interpreter start);
    test_llama_half_depth_distillation runs binarized_data.py --tokenizer_type auto as a real command line."""
    run_in_process("scripts/binarized_data.py", "--file_path", tiny["corpus"], "--tokenizer_type", "auto",
                   "--tokenizer_name", tokenizer_folder, "--dump_file", prefix)
    data = f"{prefix}.{tokenizer_folder.name}.bin"
    if counts:
        run_in_process("scripts/token_counts.py", "--data_file", data, "--token_counts_dump", f"{prefix}.counts")
    return data


@pytest.fixture(scope="module")
def llama_data(tiny, llama_teacher, tmp_path_factory):
    """The tiny corpus binarized with the Llama tokenizer, once for the file's tests that only read it."""
    return _binarize(tiny, llama_teacher, tmp_path_factory.mktemp("llama_data") / "data")


COMMON = ["--n_epoch", "2", "--batch_size", "8", "--gradient_accumulation_steps", "1", "--log_interval", "8",
          "--n_gpu", "0", "--learning_rate", "3e-3", "--warmup_prop", "0", "--student_type", "auto",
          "--teacher_type", "auto"]


def test_llama_half_depth_distillation(tiny, llama_teacher, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_script("scripts/binarized_data.py", "--file_path", tiny["corpus"], "--tokenizer_type", "auto",
               "--tokenizer_name", llama_teacher, "--dump_file", tmp_path / "data")
    data = tmp_path / f"data.{llama_teacher.name}.bin"
    student = tmp_path / "student"
    run_script("scripts/extract.py", "--model_type", "auto", "--model_name", llama_teacher, "--layers", "0,3",
               "--dump_folder", student)
    dump = tmp_path / "run"
    run_script("train.py", *COMMON, "--student_config", student / "config.json", "--student_pretrained_weights",
               student, "--teacher_name", llama_teacher, "--data_file", data, "--dump_path", dump,
               "--alpha_ce", "1", "--alpha_clm", "0.1", "--alpha_cos", "0.5")
    _assert_falls(_losses(dump, "loss_ce"), margin=0.1)
    model = AutoModelForCausalLM.from_pretrained(dump)
    assert model.config.num_hidden_layers == 2
    tok = AutoTokenizer.from_pretrained(dump)
    ids = torch.tensor([tok("the city of music")["input_ids"]])
    assert torch.isfinite(model(ids).logits).all()
    out = tmp_path / "eval.json"
    run_script("scripts/evaluate.py", "--model", dump, "--model_type", "auto", "--teacher", llama_teacher,
               "--teacher_type", "auto", "--data_file", data, "--max_batches", "2", "--output", out)
    record = json.loads(out.read_text())
    assert record["perplexity"] > 1 and 0 <= record["top1_agreement"] <= 1


def test_modernbert_half_depth_distillation(tiny, modernbert_teacher, tmp_path):
    from transformers import AutoModelForMaskedLM

    data = _binarize(tiny, modernbert_teacher, tmp_path / "data", counts=True)
    student = tmp_path / "student"
    run_script("scripts/extract.py", "--model_type", "auto", "--mlm", "--model_name", modernbert_teacher,
               "--layers", "0,3", "--dump_folder", student)
    dump = tmp_path / "run"
    run_script("train.py", *COMMON, "--mlm", "--student_config", student / "config.json",
               "--student_pretrained_weights", student, "--teacher_name", modernbert_teacher, "--data_file", data,
               "--token_counts", f"{tmp_path / 'data'}.counts", "--dump_path", dump, "--alpha_ce", "1",
               "--alpha_mlm", "0.1", "--alpha_clm", "0", "--alpha_cos", "0.5")
    _assert_falls(_losses(dump, "loss_ce"), margin=0.1)
    model = AutoModelForMaskedLM.from_pretrained(dump)
    assert model.config.num_hidden_layers == 2


def test_hidden_projection_for_different_widths(tiny, llama_teacher, llama_data, tmp_path):
    from safetensors.torch import load_file
    from transformers import LlamaConfig

    data = llama_data
    narrow = LlamaConfig.from_pretrained(llama_teacher)
    narrow.hidden_size, narrow.num_hidden_layers, narrow.intermediate_size = 16, 1, 32
    narrow.to_json_file(tmp_path / "narrow.json")
    args = [*COMMON, "--n_epoch", "1", "--student_config", tmp_path / "narrow.json", "--teacher_name", llama_teacher,
            "--data_file", data, "--alpha_ce", "1", "--alpha_clm", "0", "--alpha_cos", "1"]
    proc = run_in_process("train.py", *args, "--dump_path", tmp_path / "refused", expect_ok=False)
    assert "student 16" in proc.stderr and "teacher 32" in proc.stderr and "--hidden_projection" in proc.stderr

    dump = tmp_path / "run"
    run_script("train.py", *args, "--dump_path", dump, "--hidden_projection", "--max_steps", "4")
    exported = load_file(dump / "model.safetensors")
    assert not any("projection" in key for key in exported)
    checkpoint = sorted((dump / "checkpoints").iterdir())[-1]
    state = torch.load(checkpoint, weights_only=True)
    assert state["hidden_projection"]["weight"].shape == (32, 16)


def test_different_vocabularies_are_refused(tiny, llama_teacher, llama_data, tmp_path):
    from transformers import LlamaConfig

    data = llama_data
    other = LlamaConfig.from_pretrained(llama_teacher)
    other.vocab_size += 7
    other.to_json_file(tmp_path / "other.json")
    proc = run_in_process("train.py", *COMMON, "--student_config", tmp_path / "other.json", "--teacher_name",
                          llama_teacher, "--data_file", data, "--dump_path", tmp_path / "run", "--alpha_ce", "1",
                          "--alpha_clm", "0", expect_ok=False)
    teacher_vocab = LlamaConfig.from_pretrained(llama_teacher).vocab_size
    assert f"({teacher_vocab + 7} tokens" in proc.stderr and f"({teacher_vocab} tokens" in proc.stderr
