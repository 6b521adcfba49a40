"""experiments/peer_benchmark.py (our step against TRL's GKDTrainer): runs without trl (our side alone, and a clear
refusal when the comparison needs it); with trl installed, the two sides compute the same losses on a tiny shape."""
import json
import os
import runpy
import sys

import pytest
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "experiments", "peer_benchmark.py")
sys.path.insert(0, os.path.join(REPO, "experiments"))
import peer_benchmark  # noqa: E402

TINY = ["--threads", "1", "--vocab", "300", "--hidden", "32", "--ffn", "64", "--heads", "2", "--kv_heads", "2",
        "--teacher_layers", "2", "--student_layers", "1", "--seq_len", "16", "--batch_size", "2", "--steps", "2",
        "--warmup", "1"]


def test_refuses_in_one_line_without_trl(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "trl", None)  # importlib then finds no trl, as on a machine without it
    monkeypatch.setattr(sys, "argv", [SCRIPT, *TINY])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(SCRIPT, run_name="__main__")
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "trl is not installed" in err and "--sides ours" in err


def plain_forward_kl(args):
    """KL(teacher || student) at temperature 1 over every position that has a next token, from the full logits
    of the initial models on the first batch: what both sides' first loss must be."""
    s = peer_benchmark.shape_of(args)
    teacher, student = peer_benchmark.build_models(s, args.seed)
    ids = peer_benchmark.make_batches(1, s, args.seed)[0]
    with torch.no_grad():
        log_p = F.log_softmax(teacher(ids).logits[:, :-1].double(), -1)
        log_q = F.log_softmax(student(ids).logits[:, :-1].double(), -1)
    return float((log_p.exp() * (log_p - log_q)).sum() / (ids.size(0) * (ids.size(1) - 1)))


def test_our_side_alone_runs_and_computes_the_forward_kl(tmp_path, capsys):
    out = tmp_path / "peer.json"
    peer_benchmark.main([*TINY, "--sides", "ours", "--runs", "1", "--json", out])
    printed = capsys.readouterr().out
    assert "ours" in printed and "torch.mm at the models' shapes" in printed and "trl " not in printed
    result = json.loads(out.read_text())
    run = result["runs"]["ours"][0]
    assert len(run["seconds"]) == 3 and len(run["losses"]) == 3
    assert run["rss_peak"] >= run["rss_start"] > 0 and run["flops_per_step"] > 0
    assert result["summary"]["ours"]["s_per_step"] > 0 and result["summary"]["matmul_flops_per_s"] > 0
    expected = plain_forward_kl(peer_benchmark.parse_args(TINY))
    assert run["losses"][0] == pytest.approx(expected, rel=1e-5)
    assert run["losses"][1] != run["losses"][0]  # the batches differ from step to step


def test_both_sides_compute_the_same_losses():
    pytest.importorskip("trl")  # an optional dependency: CI never needs it
    args = peer_benchmark.parse_args(TINY)
    ours, theirs = peer_benchmark.run_side("ours", args), peer_benchmark.run_side("trl", args)
    assert ours["student_checksum"] == theirs["student_checksum"]
    assert ours["warmup_steps"] == theirs["warmup_steps"] and not theirs["gradient_checkpointing"]
    # the first loss (same weights), then the ones after each side's own AdamW update
    assert ours["losses"] == pytest.approx(theirs["losses"], rel=1e-5)
