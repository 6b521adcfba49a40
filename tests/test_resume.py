"""Durable runs: resume after SIGKILL or SIGTERM, non-finite steps, corrupted files."""
import json
import math
import os
import time

import pytest
import torch

from conftest import hang_guard, run_in_process, run_script, run_torchrun

FLAGS = ["--n_epoch", "2", "--batch_size", "4", "--gradient_accumulation_steps", "2", "--log_interval", "2",
         "--checkpoint_interval", "3", "--n_gpu", "0", "--learning_rate", "1e-3", "--mlm", "--alpha_ce", "5",
         "--alpha_mlm", "2", "--alpha_clm", "0", "--alpha_cos", "1", "--student_type", "distilbert",
         "--teacher_type", "bert"]


def _args(tiny, binarized, dump, extra=()):
    data, counts = binarized["bert"]
    return ["--student_config", tiny["distilbert_config"], "--teacher_name", tiny["bert"], "--data_file", data,
            "--token_counts", counts, "--dump_path", dump, *FLAGS, *extra]


def _final(dump):
    from safetensors.torch import load_file

    return load_file(os.path.join(dump, "model.safetensors"))


def _assert_same_weights(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


@pytest.fixture(scope="module")
def reference_run(tiny, binarized, tmp_path_factory):
    dump = tmp_path_factory.mktemp("reference") / "run"
    run_script("tests/fault_injection.py", *_args(tiny, binarized, dump))
    return dump


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tiny, binarized, reference_run, tmp_path):
    dump = tmp_path / "run"
    proc = run_script("tests/fault_injection.py", *_args(tiny, binarized, dump), expect_ok=False,
                      env={"FAULT": "kill", "FAULT_ITER": "20"})
    assert proc.returncode == -9
    assert not (dump / "model.safetensors").exists()
    checkpoints = sorted(os.listdir(dump / "checkpoints"))
    assert checkpoints and not any(".tmp" in name for name in checkpoints)
    proc = run_script("train.py", *_args(tiny, binarized, dump, ["--resume"]))
    assert "Resumed from" in proc.stderr and "iteration 18" in proc.stderr  # last boundary after 18 = 3*6
    _assert_same_weights(_final(dump), _final(reference_run))
    # rotation keeps at most --save_total_limit (3) checkpoints
    assert len(os.listdir(dump / "checkpoints")) <= 3


def test_sigterm_on_one_rank_stops_both_and_resume_matches(tiny, binarized, tmp_path):
    ref_dir, run_dir = tmp_path / "ref_weights", tmp_path / "run_weights"
    ref_dir.mkdir(), run_dir.mkdir()
    run_torchrun("tests/fault_injection.py", *_args(tiny, binarized, tmp_path / "ref"), env={"FINAL_WEIGHTS_DIR": str(ref_dir)})

    dump = tmp_path / "run"
    start = time.time()
    proc = run_torchrun("tests/fault_injection.py", *_args(tiny, binarized, dump),
                     env={"FAULT": "term", "FAULT_ITER": "9", "FAULT_RANK": "1"})
    assert time.time() - start < hang_guard(60)  # both stopped promptly, not at a collective's timeout (30 min)
    assert proc.returncode == 0
    assert "SIGTERM received" in proc.stderr and "Resume with the same command plus --resume" in proc.stderr
    assert not (dump / "model.safetensors").exists()
    run_torchrun("tests/fault_injection.py", *_args(tiny, binarized, dump, ["--resume"]),
              env={"FINAL_WEIGHTS_DIR": str(run_dir)})
    for rank in (0, 1):
        _assert_same_weights(torch.load(run_dir / f"rank{rank}.pt", weights_only=True),
                             torch.load(ref_dir / f"rank{rank}.pt", weights_only=True))


def test_nan_on_one_rank_is_skipped_everywhere(tiny, binarized, tmp_path):
    out = tmp_path / "weights"
    out.mkdir()
    dump = tmp_path / "run"
    proc = run_torchrun("tests/fault_injection.py", *_args(tiny, binarized, dump),
                     env={"FAULT": "nan", "FAULT_ITER": "5", "FAULT_RANK": "1", "FINAL_WEIGHTS_DIR": str(out)})
    assert proc.stderr.count("step skipped on every rank") == 2  # logged by both ranks
    records = [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in records if r["split"] == "train"][-1]["skipped_steps"] == 1
    epoch_losses = [r["loss"] for r in records if r["split"] == "train_epoch"]
    assert len(epoch_losses) == 2 and all(math.isfinite(x) for x in epoch_losses)  # the NaN iteration left out
    rank0, rank1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    _assert_same_weights(rank0, rank1, atol=0)
    assert all(torch.isfinite(v).all() for v in rank0.values())


def test_too_many_bad_steps_stops_with_checkpoint(tiny, binarized, tmp_path):
    dump = tmp_path / "run"
    proc = run_script("tests/fault_injection.py", *_args(tiny, binarized, dump, ["--max_bad_steps", "3"]),
                      expect_ok=False, env={"FAULT": "nan_forever", "FAULT_ITER": "7"})
    assert proc.returncode == 2
    assert "3 consecutive steps with a non-finite loss" in proc.stderr
    # the last good state is the one before the first NaN (iteration 6), carried unchanged through skipped steps
    last = sorted(os.listdir(dump / "checkpoints"))[-1]
    state = torch.load(dump / "checkpoints" / last, weights_only=True)
    assert state["counters"]["n_skipped_steps"] == 3
    assert all(torch.isfinite(v).all() for v in state["student"].values())


def test_corrupted_inputs_are_named(tiny, binarized, reference_run, tmp_path):
    import shutil

    # a checkpoint cut in half: named when given explicitly; skipped (and named) when looking for the latest
    dump = tmp_path / "run"
    shutil.copytree(reference_run, dump)
    checkpoints = sorted((dump / "checkpoints").iterdir())
    newest = checkpoints[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    # The refusals run in-process (conftest.run_in_process: train.py's own __main__, same error line and status).
    proc = run_in_process("train.py", *_args(tiny, binarized, dump, ["--resume", newest]), expect_ok=False)
    assert proc.returncode == 2 and f"{newest}: truncated or corrupted checkpoint" in proc.stderr
    proc = run_script("train.py", *_args(tiny, binarized, dump, ["--resume"]))
    assert f"Skipping {newest}" in proc.stderr and f"Resumed from {checkpoints[-2]}" in proc.stderr

    # a data file and a token-counts file cut short
    data, counts = binarized["bert"]
    bad_data, bad_counts = tmp_path / "data.bin", tmp_path / "counts.npy"
    bad_data.write_bytes(open(data, "rb").read()[:-100])
    bad_counts.write_bytes(open(counts, "rb").read()[:-100])
    proc = run_in_process("train.py", *_args(tiny, binarized, tmp_path / "a", ["--data_file", bad_data]),
                          expect_ok=False)
    assert f"{bad_data}: truncated or corrupted" in proc.stderr
    proc = run_in_process("train.py", *_args(tiny, binarized, tmp_path / "b", ["--token_counts", bad_counts]),
                          expect_ok=False)
    assert f"{bad_counts}: truncated or corrupted" in proc.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
