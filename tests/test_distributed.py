"""Two processes with gloo on the CPU: the run finishes and both ranks hold the same student."""
import torch

from conftest import REPO, run_torchrun

WRAPPER = """
import os, sys
sys.path.insert(0, {repo!r})
import torch
import train
distiller = train.main(sys.argv[1:])
torch.save(distiller.student.state_dict(), os.path.join({out!r}, "rank%s.pt" % os.environ["RANK"]))
train.cleanup_distributed()
"""


def test_two_process_gloo_run_keeps_ranks_identical(tiny, binarized, tmp_path):
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER.format(repo=REPO, out=str(tmp_path)))
    data, counts = binarized["bert"]
    dump = tmp_path / "run"
    proc = run_torchrun(wrapper, "--student_type", "distilbert", "--student_config", tiny["distilbert_config"],
                        "--teacher_type", "bert", "--teacher_name", tiny["bert"], "--mlm",
                        "--alpha_ce", "5", "--alpha_mlm", "2", "--alpha_clm", "0", "--alpha_cos", "1",
                        "--dump_path", dump, "--data_file", data, "--token_counts", counts, "--n_gpu", "0",
                        "--n_epoch", "2", "--batch_size", "4", "--gradient_accumulation_steps", "2",
                        "--learning_rate", "1e-3", "--log_interval", "4")
    assert "world size 2" in proc.stderr
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    initial = torch.load(dump / "model_epoch_0.pth", weights_only=True)  # written by the master only
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0, msg=key)
    # training happened: the weights moved between epoch 0 and the end
    assert any(not torch.equal(rank0[k], initial[k]) for k in rank0)
    assert not (dump / "model_epoch_1.pth").with_suffix(".pth.tmp").exists()
