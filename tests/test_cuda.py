"""CUDA paths: bf16/fp16 training, the step without host synchronisations, device-side step skipping.

These need a GPU and are skipped (and reported as skipped) without one; experiments/gpu_checks.sh runs them
together with the GPU benchmark.
"""
import json

import pytest
import torch

from distil.measuring import cuda_sync_warnings
from conftest import run_loop, run_script, tiny_distiller

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("config_name", ["bert_mlm", "bert_mlm_restrict", "gpt2_clm"])
def test_cuda_step_synchronises_only_where_documented(tmp_path, config_name):
    """PyTorch's own sync detector: none in an MLM step; a causal LM only in transformers' mask builder."""
    distiller, prepare, batches = tiny_distiller(config_name, tmp_path, device="cuda", bf16=True)
    run_loop(distiller, prepare, batches[:2])  # warm-up: lazy CUDA initialisation synchronises
    torch.cuda.synchronize()
    syncs = cuda_sync_warnings(lambda: run_loop(distiller, prepare, batches[2:]))
    per_forward = 0 if config_name.startswith("bert") else 1  # transformers' packed-sequence check
    assert len(syncs) <= per_forward * 2 * len(batches[2:]), syncs
    distiller._settle_outcomes()
    assert distiller.n_optimizer_steps == len(batches) and distiller.n_skipped_steps == 0


def test_cuda_nan_step_is_skipped_on_the_device(tmp_path):
    distiller, prepare, batches = tiny_distiller("bert_mlm", tmp_path, device="cuda", bf16=True)
    run_loop(distiller, prepare, batches[:1])
    before = {k: v.clone() for k, v in distiller.student.state_dict().items()}
    original = distiller.compute_losses
    distiller.compute_losses = lambda *a: {k: v * float("nan") for k, v in original(*a).items()}
    run_loop(distiller, prepare, batches[1:2])
    distiller._settle_outcomes()
    assert distiller.n_skipped_steps == 1 and distiller.n_optimizer_steps == 1
    for name, value in distiller.student.state_dict().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("precision", ["--bf16", "--fp16"])
def test_cuda_training_end_to_end(tiny, binarized, tmp_path, precision):
    from transformers import DistilBertForMaskedLM

    data, counts = binarized["bert"]
    dump = tmp_path / "run"
    run_script("train.py", "--student_type", "distilbert", "--student_config", tiny["distilbert_config"],
               "--teacher_type", "bert", "--teacher_name", tiny["bert"], "--dump_path", dump, "--data_file", data,
               "--token_counts", counts, "--mlm", "--alpha_ce", "5.0", "--alpha_mlm", "2.0", "--alpha_clm", "0.0",
               "--alpha_cos", "1.0", "--n_epoch", "2", "--batch_size", "8", "--gradient_accumulation_steps", "1",
               "--log_interval", "5", "--learning_rate", "1e-3", "--n_gpu", "1", precision)
    losses = [r["loss"] for r in map(json.loads, (dump / "metrics.jsonl").read_text().splitlines())
              if r["split"] == "train"]
    assert len(losses) >= 4 and all(x == x for x in losses)
    assert sum(losses[-2:]) < sum(losses[:2])
    DistilBertForMaskedLM.from_pretrained(dump)
