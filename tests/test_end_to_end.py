"""Every script end to end on the tiny local models: binarize -> count -> train -> reload."""
import json
import os

import numpy as np
import torch

from conftest import run_in_process, run_script

COMMON = ["--n_epoch", "1", "--batch_size", "4", "--gradient_accumulation_steps", "2", "--log_interval", "3",
          "--checkpoint_interval", "5", "--n_gpu", "0", "--learning_rate", "1e-3"]


def _train(tiny, binarized, dump, student, teacher, extra=(), expect_ok=True, in_process=False):
    """train.py's command line; in_process (conftest.run_in_process: its __main__ in this process, no interpreter
    start) for the tests that read only the files it writes, not its log."""
    data, counts = binarized[teacher]
    config = {"distilbert": tiny["distilbert_config"], "roberta": tiny["roberta_config"],
              "gpt2": tiny["gpt2_config"]}[student]
    args = ["train.py", "--student_type", student, "--student_config", config, "--teacher_type", teacher,
            "--teacher_name", tiny[teacher], "--dump_path", dump, "--data_file", data, *COMMON, *extra]
    if "--mlm" in extra:
        args += ["--token_counts", counts]
    return (run_in_process if in_process else run_script)(*args, expect_ok=expect_ok)


def _eval_records(dump):
    records = [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["split"] == "eval"]


def _assert_complete_dump(dump, model_class, pth=False):
    from transformers import AutoTokenizer

    model = model_class.from_pretrained(dump)
    assert model.config.vocab_size > 0
    AutoTokenizer.from_pretrained(dump)
    params = json.loads((dump / "parameters.json").read_text())
    assert params["dump_path"] == str(dump)
    assert (dump / "model_epoch_0.pth").is_file() == pth  # the original's per-epoch copy only with --save_pth
    assert any(f.startswith("events") for f in os.listdir(dump / "log" / "train"))
    return model


def test_distilbert_from_bert_mlm_all_losses(tiny, binarized, tmp_path):
    from transformers import DistilBertForMaskedLM

    dump = tmp_path / "run"
    proc = _train(tiny, binarized, dump, "distilbert", "bert",
                  ["--mlm", "--alpha_ce", "5.0", "--alpha_mlm", "2.0", "--alpha_clm", "0.0", "--alpha_mse", "0.1",
                   "--alpha_cos", "1.0", "--freeze_pos_embs", "--eval_data_file", binarized["bert"][0],
                   "--eval_interval", "20", "--eval_max_batches", "2", "--eval_batch_size", "8", "--save_pth"])
    model = _assert_complete_dump(dump, DistilBertForMaskedLM, pth=True)
    evals = _eval_records(dump)
    assert [r["step"] for r in evals][:2] == [20, 40] and len(evals) >= 3  # intervals, then the epoch end
    for r in evals:
        assert r["mlm_loss"] > 0 and 0 <= r["top1_agreement"] <= 1 and r["kl_teacher_student"] >= 0
        assert abs(r["pseudo_perplexity"] - np.exp(r["mlm_loss"])) < 1e-6 * r["pseudo_perplexity"]
    assert "Training is finished" in proc.stderr
    # the final weights are the last epoch's checkpoint
    epoch = torch.load(dump / "model_epoch_0.pth", weights_only=True)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, epoch[key], rtol=0, atol=0)


def test_gpt2_clm(tiny, binarized, tmp_path):
    from transformers import GPT2LMHeadModel

    dump = tmp_path / "run"
    _train(tiny, binarized, dump, "gpt2", "gpt2",
           ["--alpha_ce", "5.0", "--alpha_clm", "2.0", "--alpha_mse", "0.1", "--alpha_cos", "1.0",
            "--eval_data_file", binarized["gpt2"][0], "--eval_max_batches", "2"], in_process=True)
    _assert_complete_dump(dump, GPT2LMHeadModel)
    (record,) = _eval_records(dump)  # no interval: once, after the epoch
    assert record["clm_loss"] > 0 and record["perplexity"] > 1 and "top1_agreement" in record


def test_roberta_mlm_freezes_embeddings(tiny, binarized, tmp_path):
    from transformers import RobertaConfig, RobertaForMaskedLM

    init = RobertaForMaskedLM(RobertaConfig.from_pretrained(tiny["roberta_config"]))
    init_file = tmp_path / "init.pth"
    torch.save(init.state_dict(), init_file)
    dump = tmp_path / "run"
    _train(tiny, binarized, dump, "roberta", "roberta",
           ["--mlm", "--alpha_ce", "1.0", "--alpha_mlm", "1.0", "--alpha_clm", "0.0", "--freeze_pos_embs",
            "--freeze_token_type_embds", "--student_pretrained_weights", init_file], in_process=True)
    model = _assert_complete_dump(dump, RobertaForMaskedLM)
    before, after = init.state_dict(), model.state_dict()
    for frozen in ("roberta.embeddings.position_embeddings.weight", "roberta.embeddings.token_type_embeddings.weight"):
        torch.testing.assert_close(after[frozen], before[frozen], rtol=0, atol=0)
    assert not torch.equal(after["roberta.embeddings.word_embeddings.weight"],
                           before["roberta.embeddings.word_embeddings.weight"])


def test_teacher_free_training_loads_no_teacher_and_loss_falls(tiny, binarized, tmp_path):
    """The paper's 'no distillation' baseline: MLM alone. A teacher path that does not exist proves none is loaded."""
    from transformers import DistilBertForMaskedLM

    data, counts = binarized["bert"]
    dump = tmp_path / "run"
    proc = run_script("train.py", "--student_type", "distilbert", "--student_config", tiny["distilbert_config"],
                      "--teacher_type", "bert", "--teacher_name", tmp_path / "no-such-teacher",
                      "--tokenizer_name", tiny["bert"], "--mlm", "--alpha_ce", "0", "--alpha_mlm", "1",
                      "--alpha_clm", "0", "--dump_path", dump, "--data_file", data, "--token_counts", counts,
                      "--n_epoch", "6", "--batch_size", "8", "--gradient_accumulation_steps", "1",
                      "--learning_rate", "3e-3", "--warmup_prop", "0.0", "--log_interval", "10", "--n_gpu", "0")
    assert "No teacher" in proc.stderr
    records = [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss_mlm"] for r in records if r["split"] == "train"]
    assert len(losses) >= 10
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < first - 0.3, (first, last)
    DistilBertForMaskedLM.from_pretrained(dump)


def test_extraction_then_training_recipe(tiny, binarized, tmp_path):
    """README recipe on tiny models: extract_distilbert -> train.py --student_pretrained_weights -> reload."""
    from transformers import BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM

    from distil.models import build_student

    teacher = BertForMaskedLM.from_pretrained(tiny["bert"])
    cfg = teacher.config
    student_config = tmp_path / "student.json"
    DistilBertConfig(vocab_size=cfg.vocab_size, dim=cfg.hidden_size, n_layers=1, n_heads=cfg.num_attention_heads,
                     hidden_dim=cfg.intermediate_size, max_position_embeddings=cfg.max_position_embeddings,
                     activation="gelu").to_json_file(student_config)
    init = tmp_path / "init.pth"
    # In-process: test_extract.py::test_cli_extract_distilbert runs this script's real command line.
    run_in_process("scripts/extract_distilbert.py", "--model_type", "bert", "--model_name", tiny["bert"],
                   "--dump_checkpoint", init, "--vocab_transform", "--layers", "1", "--student_config",
                   student_config)
    extracted = torch.load(init, weights_only=True)

    # train.py's student starts from exactly the extracted values, and they are the teacher's layer 1
    student = build_student("distilbert", str(student_config), mlm=True, pretrained_weights=str(init))
    state = student.state_dict()
    assert set(state) == set(extracted)
    for key, value in extracted.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)
    torch.testing.assert_close(state["distilbert.transformer.layer.0.attention.q_lin.weight"],
                               teacher.state_dict()["bert.encoder.layer.1.attention.self.query.weight"], rtol=0, atol=0)

    dump = tmp_path / "run"
    _train(tiny, binarized, dump, "distilbert", "bert",
           ["--mlm", "--alpha_ce", "5.0", "--alpha_mlm", "2.0", "--alpha_clm", "0.0", "--alpha_cos", "1.0",
            "--freeze_pos_embs", "--student_pretrained_weights", init, "--student_config", student_config],
           in_process=True)
    trained = DistilBertForMaskedLM.from_pretrained(dump).state_dict()
    pos = "distilbert.embeddings.position_embeddings.weight"
    torch.testing.assert_close(trained[pos], extracted[pos], rtol=0, atol=0)  # frozen by --freeze_pos_embs


def test_compiled_training_runs_and_learns(tiny, binarized, tmp_path):
    """--compile (inductor, on the CPU here): the compiled forwards train like the eager ones."""
    from transformers import DistilBertForMaskedLM

    dump = tmp_path / "run"
    proc = _train(tiny, binarized, dump, "distilbert", "bert",
                  ["--mlm", "--alpha_ce", "5.0", "--alpha_mlm", "2.0", "--alpha_clm", "0.0", "--alpha_cos", "1.0",
                   "--compile"])
    assert "torch.compile" in proc.stderr
    _assert_complete_dump(dump, DistilBertForMaskedLM)
    losses = [r["loss"] for r in map(json.loads, (dump / "metrics.jsonl").read_text().splitlines())
              if r["split"] == "train"]
    assert len(losses) >= 5 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
