"""--fsdp: the student and teacher sharded with FSDP2, on 2 (and 3) CPU processes with gloo.

The runs go through train.py (a small wrapper around train.main saves what the tests compare): an FSDP run
ends with the student of a DDP run of the same seed and data, a killed FSDP run resumed with --resume ends
with the uninterrupted one, the export loads with from_pretrained, the sharded teacher gives the logits of
the whole one, and a sharded checkpoint loads on another number of ranks at an epoch boundary.
"""
import json
import os
import shutil

import pytest
import torch

from conftest import REPO, expect_error, run_script, run_torchrun

FLAGS = ["--n_epoch", "1", "--batch_size", "8", "--gradient_accumulation_steps", "2", "--log_interval", "4",
         "--checkpoint_interval", "10", "--save_total_limit", "10", "--n_gpu", "0", "--learning_rate", "1e-3",
         "--mlm", "--alpha_ce", "5", "--alpha_mlm", "2", "--alpha_clm", "0", "--alpha_cos", "1",
         "--student_type", "distilbert", "--teacher_type", "bert"]

# train.main, then what the tests compare: rank 0's gathered student weights (Distiller.student_state_dict, the
# same call the final export makes), its parameter statistics against those weights, and the sharded teacher's
# outputs against the same teacher loaded whole, on one of the run's batches. With RECORD_SYNCS, every
# Distiller.step runs under the host-synchronisation recorder of test_host_syncs.py.
WRAPPER = """
import os, sys
sys.path.insert(0, {repo!r})
sys.path.insert(0, os.path.join({repo!r}, "tests"))
import torch
import distiller as distiller_module
import fault_injection  # with FAULT=kill in the environment, a rank kills itself at FAULT_ITER
import train
from host_syncs import HostSyncRecorder
from distil.models import RowLogitsLM, load_teacher

out = os.environ["OUT"]
syncs, recorded = [], []
if os.environ.get("RECORD_SYNCS"):
    step = distiller_module.Distiller.step

    def recorded_step(self, *args, **kwargs):
        with HostSyncRecorder() as recorder:
            step(self, *args, **kwargs)
        syncs.extend(op + ": " + stack.strip().splitlines()[-1] for op, stack in recorder.events)
        recorded.append(self.n_total_iter)

    distiller_module.Distiller.step = recorded_step
try:
    distiller = train.main(sys.argv[1:])
    state = distiller.student_state_dict()
    report = {{"sharded": distiller.sharding is not None, "host_syncs": syncs, "recorded_steps": len(recorded)}}
    if distiller.sharding is not None:
        report["stats"] = distiller.sharding.parameter_statistics(distiller.student.named_parameters())
        args = train.parse_args(sys.argv[1:])
        whole = load_teacher(args.teacher_type, args.teacher_name, args.mlm)
        batch = distiller.prepare_batch_mlm(*next(iter(distiller.dataloader)))
        teacher = distiller.teacher_lm
        report["teacher_is_sharded"] = all(type(p).__name__ == "DTensor" for p in teacher.parameters())
        report["teacher_rows"] = teacher(batch.input_ids, batch.attention_mask, batch.rows)
        report["whole_rows"] = RowLogitsLM(whole)(batch.input_ids, batch.attention_mask, batch.rows)
        report["teacher_logits"] = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        report["whole_logits"] = whole(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    if os.environ.get("THEN_RESUME"):  # what --resume THEN_RESUME would do next, on these ranks
        from distil import checkpointing
        try:
            distiller.load_training_state(checkpointing.load_checkpoint_file(os.environ["THEN_RESUME"]),
                                          os.environ["THEN_RESUME"])
        except ValueError as exc:
            report["then_resume_error"] = str(exc)
    if distiller.is_master:
        torch.save(state, os.path.join(out, "gathered.pt"))
        torch.save(report, os.path.join(out, "report.pt"))
    torch.distributed.barrier()  # leave together (see the end of train.main)
except (train.UserError, ValueError, FileNotFoundError, train.TrainingError) as exc:
    train.fail(str(exc))
finally:
    train.cleanup_distributed()
"""


def _args(tiny, binarized, dump, extra=()):
    data, counts = binarized["bert"]
    args = ["--student_config", tiny["distilbert_config"], "--teacher_name", tiny["bert"], "--data_file", data,
            "--token_counts", counts, "--dump_path", dump, "--eval_data_file", data, "--eval_max_batches", "3",
            "--eval_batch_size", "1",  # 3 held-out sequences on 2 ranks: one rank has fewer (a hang before)
            *FLAGS, *extra]
    return [str(a) for a in args]


def _run(tmp, tiny, binarized, name, extra=(), nproc=2, expect_ok=True, env=None):
    """train.py under torchrun through the wrapper; returns (process, dump folder, folder of the saved results)."""
    wrapper = tmp / "wrapper.py"
    wrapper.write_text(WRAPPER.format(repo=REPO))
    out = tmp / f"{name}_out"
    out.mkdir(exist_ok=True)
    dump = tmp / name
    proc = run_torchrun(wrapper, *_args(tiny, binarized, dump, extra), nproc=nproc, expect_ok=expect_ok,
                        env=dict(env or {}, OUT=str(out)))
    return proc, dump, out


def _load(path):
    return torch.load(path, weights_only=False)


def _assert_same(a, b, atol):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


@pytest.fixture(scope="module")
def runs(tiny, binarized, tmp_path_factory):
    """A 2-rank DDP run and the same run with --fsdp (and --gradient_checkpointing: recomputation in backward
    replays the same dropout masks, so it changes no number)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    _, ddp_dump, ddp_out = _run(tmp, tiny, binarized, "ddp")
    proc, fsdp_dump, fsdp_out = _run(tmp, tiny, binarized, "fsdp",
                                     ["--fsdp", "--gradient_checkpointing", "--save_pth"],
                                     env={"RECORD_SYNCS": "1"})
    return {"tmp": tmp, "ddp": (ddp_dump, ddp_out), "fsdp": (fsdp_dump, fsdp_out), "fsdp_log": proc.stderr}


def test_fsdp_ends_with_the_ddp_student(runs):
    """Same seed and data: the FSDP student equals the DDP one up to float rounding. Forward and backward run on
    the same full weights; only the reductions differ (a reduce-scatter per batch instead of an all-reduce per
    accumulation group, and the gradient norm summed from shard norms), which moves the last bits."""
    (ddp_dump, ddp_out), (fsdp_dump, fsdp_out) = runs["ddp"], runs["fsdp"]
    assert "FSDP: student sharded over 2 ranks" in runs["fsdp_log"]
    assert "FSDP: teacher sharded over 2 ranks" in runs["fsdp_log"]
    assert "Teacher built on the meta device" in runs["fsdp_log"]  # each rank read its shards only
    assert not _load(ddp_out / "report.pt")["sharded"] and _load(fsdp_out / "report.pt")["sharded"]
    fsdp, ddp = _load(fsdp_out / "gathered.pt"), _load(ddp_out / "gathered.pt")
    _assert_same(fsdp, ddp, atol=1e-6)
    _assert_same(_load(fsdp_dump / "model_epoch_0.pth"), fsdp, atol=0)  # the end-of-epoch save, gathered too
    # the losses logged along the way and the held-out evaluation (run through the sharded models) agree too
    logs = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (fsdp_dump, ddp_dump)]
    assert len(logs[0]) == len(logs[1]) > 3
    for a, b in zip(*logs):
        assert a["split"] == b["split"] and a["step"] == b["step"]
        for key in ("loss", "mlm_loss", "kl_teacher_student"):
            assert (key in a) == (key in b), (key, a, b)
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5), (key, a, b)
    assert "eval" in {record["split"] for record in logs[0]}


def test_fsdp_step_makes_no_host_sync(runs):
    """The step stays free of host synchronisations under FSDP (the recorder of test_host_syncs.py, on each
    Distiller.step of the FSDP run): the global gradient norm stays a device tensor, and so does the skip flag."""
    report = _load(runs["fsdp"][1] / "report.pt")
    assert report["recorded_steps"] == 28  # every step of the epoch
    assert report["host_syncs"] == []


def test_export_loads_and_matches_the_gathered_weights(runs):
    from safetensors.torch import load_file
    from transformers import DistilBertForMaskedLM

    (ddp_dump, _), (fsdp_dump, fsdp_out) = runs["ddp"], runs["fsdp"]
    gathered = _load(fsdp_out / "gathered.pt")
    model = DistilBertForMaskedLM.from_pretrained(fsdp_dump)
    loaded = model.state_dict()
    assert loaded.keys() == gathered.keys()
    for key in loaded:
        assert torch.equal(loaded[key], gathered[key]), key
    # the same files as a DDP export: the tied output projection is written once
    assert sorted(load_file(fsdp_dump / "model.safetensors")) == sorted(load_file(ddp_dump / "model.safetensors"))
    assert (fsdp_dump / "tokenizer.json").exists() or (fsdp_dump / "vocab.txt").exists()


def test_sharded_teacher_gives_the_whole_teachers_outputs(runs):
    """The teacher was built on the meta device and each rank read its rows from the safetensors: its outputs
    are those of the teacher loaded whole by from_pretrained."""
    report = _load(runs["fsdp"][1] / "report.pt")
    assert report["teacher_is_sharded"]
    for sharded, whole in zip(report["teacher_rows"], report["whole_rows"]):  # (row logits, hidden states)
        torch.testing.assert_close(sharded, whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(report["teacher_logits"], report["whole_logits"], rtol=0, atol=1e-6)


def test_parameter_statistics_of_the_shards(runs):
    report, gathered = (_load(runs["fsdp"][1] / name) for name in ("report.pt", "gathered.pt"))
    assert set(report["stats"]) == set(gathered) - {"vocab_projector.weight"}  # named_parameters skips the tie
    for name, (mean, std) in report["stats"].items():
        ref = gathered[name].double()
        assert mean == pytest.approx(ref.mean().item(), abs=1e-9)
        assert std == pytest.approx(ref.std().item() if ref.numel() > 1 else 0.0, rel=1e-6, abs=1e-9)


def test_sharded_checkpoints_are_complete_folders(runs):
    dump = runs["fsdp"][0]
    folders = sorted((dump / "checkpoints").iterdir())
    assert folders and all(f.is_dir() and ".tmp" not in f.name for f in folders)
    for folder in folders:
        assert {".metadata", "trainer_state.pt", "__0_0.distcp", "__1_0.distcp"} <= set(os.listdir(folder))
    state = torch.load(folders[-1] / "trainer_state.pt", weights_only=True)
    assert state["format"] == "distil-checkpoint-sharded-v1" and len(state["rng"]) == 2
    assert state["counters"]["epoch"] == 1 and state["counters"]["n_iter"] == 0  # the end-of-epoch one


def test_kill_then_resume_matches_uninterrupted(tiny, binarized, runs):
    """SIGKILL on rank 1 at iteration 25 (the last checkpoint is at 20), then --resume: the same final student
    as the uninterrupted FSDP run. The resumed run keeps the teacher whole (--teacher_replicated): the
    teacher's outputs, hence the result, do not depend on how it is placed."""
    tmp = runs["tmp"]
    proc, dump, out = _run(tmp, tiny, binarized, "killed", ["--fsdp", "--gradient_checkpointing"], expect_ok=False,
                           env={"FAULT": "kill", "FAULT_ITER": "25", "FAULT_RANK": "1"})
    assert not (dump / "model.safetensors").exists()
    assert sorted(os.listdir(dump / "checkpoints"))[-1] == "step_000000020"
    proc, _, out = _run(tmp, tiny, binarized, "killed",
                        ["--fsdp", "--gradient_checkpointing", "--teacher_replicated", "--resume"])
    assert "Resumed from" in proc.stderr and "iteration 20." in proc.stderr
    assert "teacher replicated on every rank" in proc.stderr
    _assert_same(_load(out / "gathered.pt"), _load(runs["fsdp"][1] / "gathered.pt"), atol=1e-6)


def test_sharded_checkpoint_on_three_ranks(tiny, binarized, runs):
    """At an epoch boundary a sharded checkpoint loads on another number of ranks (DCP reshards): resuming the
    finished 2-rank run on 3 ranks exports the same weights. Mid-epoch it is a one-line error."""
    tmp = runs["tmp"]
    dump = tmp / "three"
    shutil.copytree(runs["fsdp"][0], dump)
    mid_epoch = dump / "checkpoints" / "step_000000020"
    proc, _, out = _run(tmp, tiny, binarized, "three", ["--fsdp", "--gradient_checkpointing", "--resume"], nproc=3,
                        env={"THEN_RESUME": str(mid_epoch)})
    assert "Resuming on 3 ranks a checkpoint written by 2" in proc.stderr
    _assert_same(_load(out / "gathered.pt"), _load(runs["fsdp"][1] / "gathered.pt"), atol=0)
    # the mid-epoch one, loaded the way --resume loads it, is refused
    error = _load(out / "report.pt")["then_resume_error"]
    assert f"{mid_epoch}: written mid-epoch by 2 ranks, this run has 3" in error


def _train_main(argv):
    """train.py's entry point in this process: a UserError becomes one `error:` line and exit status 2."""
    import train

    try:
        train.main(argv)
    except train.UserError as exc:
        train.fail(str(exc))


def test_bad_input_is_one_line(tiny, binarized, runs, tmp_path, capsys):
    """A sharded checkpoint resumed without --fsdp (or the reverse), and flags that do not go together."""
    fsdp_dump = runs["fsdp"][0]
    latest = sorted((fsdp_dump / "checkpoints").iterdir())[-1]
    expect_error(capsys, _train_main, _args(tiny, binarized, fsdp_dump, ["--resume"]),
                 f"--resume {latest}: a sharded checkpoint written with --fsdp; resume it with --fsdp under torchrun")
    expect_error(capsys, _train_main, _args(tiny, binarized, tmp_path / "x", ["--teacher_replicated"]),
                 "--teacher_replicated only applies with --fsdp")
    expect_error(capsys, _train_main, _args(tiny, binarized, tmp_path / "x", ["--fsdp", "--fp16"]), "--fsdp", "--fp16")
    assert not (tmp_path / "x").exists()
    # the reverse needs several processes (--fsdp alone runs unsharded): every rank says it, in one line
    proc, _, _ = _run(runs["tmp"], tiny, binarized, "ddp", ["--fsdp", "--resume"], expect_ok=False)
    assert proc.returncode != 0
    # (the two ranks write to one pipe, so their lines may interleave: count the messages, not the lines)
    assert proc.stderr.count("written without --fsdp; resume it without --fsdp") == 2, proc.stderr[-3000:]


def test_fsdp_with_one_process_warns_and_trains_unsharded(tiny, binarized, tmp_path):
    """(--gradient_checkpointing works without FSDP too.)"""
    dump = tmp_path / "one"
    proc = run_script("train.py", *_args(tiny, binarized, dump, ["--fsdp", "--checkpoint_interval", "1000",
                                                                 "--gradient_checkpointing"]))
    assert "--fsdp with a single process: nothing to shard across, training unsharded" in proc.stderr
    assert "Gradient checkpointing: the student's blocks are recomputed in backward" in proc.stderr
    assert (dump / "model.safetensors").exists()
    assert all(name.endswith(".pt") for name in os.listdir(dump / "checkpoints"))  # one-file checkpoints
