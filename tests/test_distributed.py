"""Two processes with gloo on the CPU: the run finishes, both ranks hold the same student, and DDP all-reduces
the gradients once per optimizer step (not once per accumulated batch)."""
import json

import torch

from conftest import REPO, run_torchrun

WRAPPER = """
import json, os, sys
sys.path.insert(0, {repo!r})
import torch
import distiller as distiller_module
import train
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

# A DDP communication hook that counts the gradient all-reduces (one call per bucket) and then does them.
calls = {{"buckets": 0, "first_buckets": 0}}
setup_ddp = distiller_module.Distiller._setup_ddp

def counting_setup_ddp(self):
    setup_ddp(self)

    def hook(state, bucket):
        calls["buckets"] += 1
        calls["first_buckets"] += bucket.index() == 0
        return allreduce_hook(state, bucket)

    self.model.register_comm_hook(None, hook)

distiller_module.Distiller._setup_ddp = counting_setup_ddp
distiller = train.main(sys.argv[1:])
torch.save(distiller.student.state_dict(), os.path.join({out!r}, "rank%s.pt" % os.environ["RANK"]))
with open(os.path.join({out!r}, "rank%s.json" % os.environ["RANK"]), "w") as f:
    json.dump(dict(calls, n_iter=distiller.n_total_iter, n_steps=distiller.n_optimizer_steps + distiller.n_skipped_steps), f)
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
                        "--learning_rate", "1e-3", "--log_interval", "4", "--save_pth")
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
    # DDP's no_sync holds the forward as well as the backward: gradients are all-reduced once per optimizer step
    # (--gradient_accumulation_steps 2: half the batches), not after every batch.
    for rank in (0, 1):
        calls = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert calls["n_iter"] > calls["n_steps"] > 0, calls
        assert calls["first_buckets"] == calls["n_steps"], calls


def test_torchrun_with_one_process_gets_a_one_rank_group(monkeypatch):
    """torchrun --nproc_per_node=1 (a one-GPU machine): a one-rank process group, so DDP and --fsdp run their
    collectives over it (experiments/gpu_checks.sh checks the NCCL path that way); a plain process gets none."""
    from conftest import free_port
    from distil.distributed.sharding import use_fsdp
    from utils import cleanup_distributed, init_distributed

    plain = init_distributed(n_gpu=0)
    assert not plain.distributed and not use_fsdp(True, plain)
    for name, value in (("TORCHELASTIC_RUN_ID", "test"), ("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0"),
                        ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port()))):
        monkeypatch.setenv(name, value)
    try:
        ctx = init_distributed(n_gpu=0)
        assert ctx.distributed and ctx.world_size == 1 and torch.distributed.get_world_size() == 1
        assert use_fsdp(True, ctx)
    finally:
        cleanup_distributed()
