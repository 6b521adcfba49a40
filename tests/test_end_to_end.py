"""Every script end to end on the tiny local models: binarize -> count -> train -> reload."""
import json
import os

import numpy as np
import pytest
import torch

from conftest import run_script

COMMON = ["--n_epoch", "1", "--batch_size", "4", "--gradient_accumulation_steps", "2", "--log_interval", "3",
          "--checkpoint_interval", "5", "--n_gpu", "0", "--learning_rate", "1e-3"]


def _train(tiny, binarized, dump, student, teacher, extra=(), expect_ok=True):
    data, counts = binarized[teacher]
    config = {"distilbert": tiny["distilbert_config"], "roberta": tiny["roberta_config"],
              "gpt2": tiny["gpt2_config"]}[student]
    args = ["train.py", "--student_type", student, "--student_config", config, "--teacher_type", teacher,
            "--teacher_name", tiny[teacher], "--dump_path", dump, "--data_file", data, *COMMON, *extra]
    if "--mlm" in extra:
        args += ["--token_counts", counts]
    return run_script(*args, expect_ok=expect_ok)


def _assert_complete_dump(dump, model_class):
    from transformers import AutoTokenizer

    model = model_class.from_pretrained(dump)
    assert model.config.vocab_size > 0
    AutoTokenizer.from_pretrained(dump)
    params = json.loads((dump / "parameters.json").read_text())
    assert params["dump_path"] == str(dump)
    assert (dump / "model_epoch_0.pth").is_file()
    assert any(f.startswith("events") for f in os.listdir(dump / "log" / "train"))
    return model


def test_distilbert_from_bert_mlm_all_losses(tiny, binarized, tmp_path):
    from transformers import DistilBertForMaskedLM

    dump = tmp_path / "run"
    proc = _train(tiny, binarized, dump, "distilbert", "bert",
                  ["--mlm", "--alpha_ce", "5.0", "--alpha_mlm", "2.0", "--alpha_clm", "0.0", "--alpha_mse", "0.1",
                   "--alpha_cos", "1.0", "--freeze_pos_embs"])
    model = _assert_complete_dump(dump, DistilBertForMaskedLM)
    assert "Training is finished" in proc.stderr
    # the final weights are the last epoch's checkpoint
    epoch = torch.load(dump / "model_epoch_0.pth", weights_only=True)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, epoch[key], rtol=0, atol=0)


def test_gpt2_clm(tiny, binarized, tmp_path):
    from transformers import GPT2LMHeadModel

    dump = tmp_path / "run"
    _train(tiny, binarized, dump, "gpt2", "gpt2",
           ["--alpha_ce", "5.0", "--alpha_clm", "2.0", "--alpha_mse", "0.1", "--alpha_cos", "1.0"])
    _assert_complete_dump(dump, GPT2LMHeadModel)


def test_roberta_mlm_freezes_embeddings(tiny, binarized, tmp_path):
    from transformers import RobertaConfig, RobertaForMaskedLM

    init = RobertaForMaskedLM(RobertaConfig.from_pretrained(tiny["roberta_config"]))
    init_file = tmp_path / "init.pth"
    torch.save(init.state_dict(), init_file)
    dump = tmp_path / "run"
    _train(tiny, binarized, dump, "roberta", "roberta",
           ["--mlm", "--alpha_ce", "1.0", "--alpha_mlm", "1.0", "--alpha_clm", "0.0", "--freeze_pos_embs",
            "--freeze_token_type_embds", "--student_pretrained_weights", init_file])
    model = _assert_complete_dump(dump, RobertaForMaskedLM)
    before, after = init.state_dict(), model.state_dict()
    for frozen in ("roberta.embeddings.position_embeddings.weight", "roberta.embeddings.token_type_embeddings.weight"):
        torch.testing.assert_close(after[frozen], before[frozen], rtol=0, atol=0)
    assert not torch.equal(after["roberta.embeddings.word_embeddings.weight"],
                           before["roberta.embeddings.word_embeddings.weight"])
