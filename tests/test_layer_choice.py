"""extract.py --eval_data_file: the student's held-out loss next to the teacher's (and a uniform guess's),
before any training, so a poor choice of --layers shows at once."""
import logging
import math
import re
import shutil

import pytest
import torch

from conftest import expect_error, load_script


@pytest.fixture(scope="module")
def llama_with_gpt2_tokenizer(tiny, tmp_path_factory):
    from transformers import GPT2Tokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama") / "teacher"
    shutil.copytree(tiny["gpt2"], folder)
    tok = GPT2Tokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=64, max_position_embeddings=64,
                         bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, initializer_range=0.3)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_extraction_reports_teacher_and_student_losses(llama_with_gpt2_tokenizer, binarized, tmp_path, caplog):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distil.evaluation import evaluate
    from lm_seqs_dataset import BinarizedCorpus, LmSeqsDataset
    from distil.models import framing_token_ids
    from utils import special_token_ids

    data, _ = binarized["gpt2"]
    teacher = llama_with_gpt2_tokenizer
    student = tmp_path / "student"
    with caplog.at_level(logging.INFO, logger="distil"):
        load_script("extract").main(["--model_type", "auto", "--model_name", str(teacher), "--layers", "0,3",
                                     "--dump_folder", str(student), "--eval_data_file", str(data),
                                     "--eval_max_batches", "2", "--eval_max_seq_length", "32"])
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Held-out CLM loss"))
    found = dict(re.findall(r"(teacher|training|guess) (\d+\.\d+)", line))

    # The same numbers as the evaluation of the models written / read, on the same data.
    corpus = BinarizedCorpus.open(data)
    tok = AutoTokenizer.from_pretrained(teacher)
    special = framing_token_ids(special_token_ids(tok), False, corpus.metadata.get("framing"))
    dataset = LmSeqsDataset(corpus, special_tok_ids=special, mlm=False, max_len=32)
    for key, folder in (("teacher", teacher), ("training", student)):
        model = AutoModelForCausalLM.from_pretrained(folder)
        loss = evaluate(model, dataset, mlm=False, batch_size=8, device="cpu", special_tok_ids=special,
                        max_batches=2)["clm_loss"]
        assert float(found[key]) == pytest.approx(loss, abs=1e-3)
    assert float(found["guess"]) == pytest.approx(math.log(len(tok)), abs=1e-3)
    assert float(found["training"]) != pytest.approx(float(found["teacher"]), abs=1e-3)


def test_eval_data_file_is_for_auto_only(tiny, binarized, tmp_path, capsys):
    expect_error(capsys, load_script("extract").main,
                 ["--model_type", "gpt2", "--model_name", tiny["gpt2"], "--dump_checkpoint", tmp_path / "s.pth",
                  "--eval_data_file", binarized["gpt2"][0]], "--eval_data_file", "auto")
