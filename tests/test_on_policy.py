"""On-policy distillation (issue 33): the student answers the corpus's prompts, the teacher grades its tokens.

Prompt tokens are never targets; rollouts stop at end-of-turn and nothing after is trained; the same seed draws the
same rollouts; a run whose draws pick no on-policy batch is the off-policy run bit for bit; a resumed run ends
with the weights of an uninterrupted one; a mixed run reads the teacher cache for its off-policy batches; bad
flags are one line."""
import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import expect_error, load_script, make_chat_model
from distil.conversations import end_of_turn_ids
from distil.rollouts import OnPolicy

N_RECORDS = 12


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """A tiny teacher and student with a ChatML template, and a masked corpus of 12 one-question conversations
    (3 batches of 4), plus the same conversations without a mask (--train_on all)."""
    root = tmp_path_factory.mktemp("on_policy")
    teacher = make_chat_model(root / "teacher", "qwen2", layers=2)
    student = make_chat_model(root / "student", "qwen2", layers=1, seed=1)
    records = [{"messages": [{"role": "user", "content": f"what is the capital of {c} ? tell me more"},
                             {"role": "assistant", "content": f"it is {a} ."}]}
               for c, a in [("France", "Paris"), ("Italy", "Rome")] * (N_RECORDS // 2)]
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    binarize = load_script("binarized_chat").main
    binarize(["--file_path", str(data), "--tokenizer_name", teacher, "--dump_file", str(root / "chat"),
              "--max_seq_length", "128"])
    binarize(["--file_path", str(data), "--tokenizer_name", teacher, "--dump_file", str(root / "plain"),
              "--max_seq_length", "128", "--train_on", "all"])
    return {"root": root, "teacher": teacher, "student": student, "data": root / "chat.teacher.bin",
            "plain": root / "plain.teacher.bin"}


def _args(chat, dump, *extra, steps=3):
    return [str(a) for a in ["--student_type", "auto", "--teacher_type", "auto", "--student_config",
                             f"{chat['student']}/config.json", "--student_pretrained_weights", chat["student"],
                             "--data_file", chat["data"], "--dump_path", dump, "--n_gpu", "0", "--batch_size", "4",
                             "--gradient_accumulation_steps", "1", "--max_steps", steps, "--alpha_ce", "2",
                             "--alpha_clm", "1", "--alpha_cos", "0", "--warmup_prop", "0", "--log_interval", "1",
                             "--seed", "3", "--max_new_tokens", "8", *extra]]


def _with_teacher(chat, dump, *extra, **kwargs):
    return _args(chat, dump, "--teacher_name", chat["teacher"], *extra, **kwargs)


def _train_records(dump):
    return [r for r in map(json.loads, (dump / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]


def _weights(dump):
    return load_file(str(dump / "model.safetensors"))


def _first_batch(distiller):
    distiller.batch_sampler.set_epoch(0)
    distiller.batch_sampler.skip = 0
    return next(iter(distiller.dataloader))  # (token_ids, lengths, loss_mask)


@pytest.fixture(scope="module")
def on_policy_run(chat, tmp_path_factory):
    """A λ = 1 run of train.py (every batch the student's own answers): its Distiller, for the tests to reuse."""
    import train

    dump = tmp_path_factory.mktemp("lmbda1") / "run"
    distiller = train.main(_with_teacher(chat, dump, "--lmbda", "1", "--kd_loss", "reverse_kl"))
    return distiller, dump


def test_rollouts_stop_at_end_of_turn_and_are_masked_after_it(chat, on_policy_run):
    distiller, _ = on_policy_run
    on_policy = distiller.on_policy
    stop = set(on_policy.stop_ids)
    from transformers import AutoTokenizer

    assert stop == set(end_of_turn_ids(AutoTokenizer.from_pretrained(chat["teacher"])))
    assert AutoTokenizer.from_pretrained(chat["teacher"]).convert_tokens_to_ids("<|im_end|>") in stop
    token_ids, lengths, loss_mask = _first_batch(distiller)
    # A random student says <|im_end|> about once in 300 tokens: scaling its output row makes it likely at some
    # positions (and unlikely at others), so that answers both stop and run out of room.
    student = copy.deepcopy(distiller.student)
    with torch.no_grad():
        student.get_output_embeddings().weight[sorted(stop)] *= 30
    finished = cut = 0
    for index in range(6):
        ids, new_lengths, mask = on_policy.rollouts(student, token_ids, lengths, loss_mask, 0, index)
        for row in range(len(token_ids)):
            prompt_len = int(loss_mask[row].nonzero()[0])  # the corpus's answer started here
            assert torch.equal(ids[row, :prompt_len], token_ids[row, :prompt_len])  # the prompt, unchanged
            answer = ids[row, prompt_len: int(new_lengths[row])].tolist()
            assert 1 <= len(answer) <= 8
            # the mask is exactly the answer: nothing of the prompt, nothing after the answer's last token
            assert mask[row, prompt_len: int(new_lengths[row])].all()
            assert not mask[row, :prompt_len].any() and not mask[row, int(new_lengths[row]):].any()
            stops = [i for i, t in enumerate(answer) if t in stop]
            if stops:
                assert stops == [len(answer) - 1]  # it stops at the first end-of-turn token, which is trained
                finished += 1
            else:
                assert len(answer) == 8  # cut at --max_new_tokens
                cut += 1
    assert finished and cut  # both ends were exercised (the test can fail)


def test_prompt_tokens_are_never_trained(on_policy_run):
    """On an on-policy batch the gradient reaches the student's last hidden states only at positions that predict
    an answer token: no prompt token (or padding) is ever a target."""
    distiller, _ = on_policy_run
    captured = {}

    def keep(module, args, out):
        if out.requires_grad:  # the training forward, not the rollout's (no gradient there)
            out.retain_grad()
            captured["hidden"] = out

    handle = distiller.student.model.norm.register_forward_hook(keep)
    try:
        token_ids, lengths, loss_mask = _first_batch(distiller)
        batch = distiller.on_policy.batch(distiller.student, token_ids, lengths, loss_mask, 0, 0, distiller.device)
        distiller.step(*batch, alpha=distiller.on_policy.alpha(distiller.alpha))
    finally:
        handle.remove()
    grad = captured["hidden"].grad
    mask = batch.lm_labels != -100  # the answer tokens: the only targets
    predicts_answer = torch.zeros_like(mask)
    predicts_answer[:, :-1] = mask[:, 1:]
    assert torch.equal(batch.loss_positions, predicts_answer)
    assert grad[predicts_answer].abs().sum() > 0
    assert torch.count_nonzero(grad[~predicts_answer]) == 0


def test_same_seed_same_rollouts(on_policy_run):
    """A batch's draws depend on (seed, epoch, batch index, rank) alone, not on what was drawn before it."""
    distiller, _ = on_policy_run
    token_ids, lengths, loss_mask = _first_batch(distiller)
    base = distiller.on_policy

    def rollouts(seed=3, rank=0, index=1):
        other = OnPolicy(1.0, seed=seed, rank=rank, stop_ids=base.stop_ids, pad_id=base.pad_id, max_len=base.max_len,
                         max_new_tokens=8)
        return other.rollouts(distiller.student, token_ids, lengths, loss_mask, 0, index)

    first = rollouts()
    rollouts(index=2)  # draws in between change nothing
    again = rollouts()
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    for changed in (rollouts(seed=4), rollouts(rank=1), rollouts(index=0)):
        assert not torch.equal(changed[0], first[0]) or not torch.equal(changed[1], first[1])
    # the on/off choice is as reproducible, and λ sets its share
    picks = [OnPolicy(0.5, seed=3, rank=0, stop_ids=[0], pad_id=0, max_len=8).chooses(0, i) for i in range(400)]
    assert picks == [OnPolicy(0.5, seed=3, rank=0, stop_ids=[0], pad_id=0, max_len=8).chooses(0, i)
                     for i in range(400)]
    assert 150 < sum(picks) < 250


def test_on_policy_run_logs_generation_time_and_trains(on_policy_run):
    _, dump = on_policy_run
    records = _train_records(dump)
    assert len(records) == 3
    for r in records:
        assert r["on_policy_batches"] == 1 and r["rollout_seconds"] > 0 and 0 < r["rollout_share"] <= 1
        assert 1 <= r["rollout_mean_tokens"] <= 8
        assert "loss_ce" in r and "loss_clm" not in r  # on-policy batches: the teacher's divergence alone


def test_no_on_policy_batch_trains_exactly_as_the_off_policy_path(chat, tmp_path):
    """λ so small that no batch is drawn on-policy: the choices are made every batch, yet losses and weights are
    bit for bit those of a run without --lmbda (no global generator is touched)."""
    import train

    train.main(_with_teacher(chat, tmp_path / "off"))
    train.main(_with_teacher(chat, tmp_path / "tiny", "--lmbda", "1e-9"))
    off, tiny = _train_records(tmp_path / "off"), _train_records(tmp_path / "tiny")
    assert [r["on_policy_batches"] for r in tiny] == [0, 0, 0] and "on_policy_batches" not in off[0]
    for a, b in zip(off, tiny):
        assert (a["loss"], a["loss_ce"], a["loss_clm"]) == (b["loss"], b["loss_ce"], b["loss_clm"])
    w_off, w_tiny = _weights(tmp_path / "off"), _weights(tmp_path / "tiny")
    assert w_off.keys() == w_tiny.keys() and all(torch.equal(w_off[k], w_tiny[k]) for k in w_off)
    # ... and a run with on-policy batches does differ (the comparison can fail)
    train.main(_with_teacher(chat, tmp_path / "half", "--lmbda", "0.5"))
    w_half = _weights(tmp_path / "half")
    assert not all(torch.equal(w_off[k], w_half[k]) for k in w_off)


def test_resume_mid_run_gives_the_uninterrupted_weights(chat, tmp_path):
    """λ = 0.5 over 2 epochs of 3 batches; resuming from the checkpoint of iteration 2 (mid-epoch, after both an
    on- and an off-policy batch) ends with the uninterrupted run's weights, bit for bit."""
    import train

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    extra = ("--lmbda", "0.5", "--checkpoint_interval", "2", "--save_total_limit", "5")
    train.main(_with_teacher(chat, full, *extra, steps=5))
    picks = [r["on_policy_batches"] for r in _train_records(full)]
    assert 0 < sum(picks[:2]) < 2 and 0 < sum(picks[2:]) < 3  # both kinds, before and after the checkpoint
    checkpoint = full / "checkpoints" / "step_000000002.pt"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(checkpoint, resumed / "checkpoints" / checkpoint.name)
    train.main(_with_teacher(chat, resumed, *extra, "--resume", steps=5))
    assert [r["on_policy_batches"] for r in _train_records(resumed)] == picks[2:]
    a, b = _weights(full), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mixed_run_reads_the_cache_for_its_off_policy_batches(chat, tmp_path):
    """--teacher_cache with --teacher_name and --lmbda: off-policy batches from the cache (no teacher forward),
    on-policy ones scored live; with every id cached in float32 it is the live mixed run."""
    import train

    cache = tmp_path / "cache"
    load_script("cache_teacher").main([str(a) for a in [
        "--teacher_type", "auto", "--teacher_name", chat["teacher"], "--data_file", chat["data"],
        "--cache_dir", cache, "--n_gpu", "0", "--k", "300", "--log_probs_dtype", "float32", "--temperature", "2.0"]])
    live = train.main(_with_teacher(chat, tmp_path / "live", "--lmbda", "0.5"))
    calls = []
    mixed_args = _with_teacher(chat, tmp_path / "mixed", "--lmbda", "0.5", "--teacher_cache", cache)
    original = torch.nn.Module.__call__

    def count_teacher(module, *a, **k):
        if type(module).__name__ == "TeacherLM":
            calls.append(1)
        return original(module, *a, **k)

    torch.nn.Module.__call__ = count_teacher
    try:
        train.main(mixed_args)
    finally:
        torch.nn.Module.__call__ = original
    a, b = _train_records(tmp_path / "live"), _train_records(tmp_path / "mixed")
    on = [r["on_policy_batches"] for r in a]
    assert on == [r["on_policy_batches"] for r in b] and 0 < sum(on) < 3
    assert len(calls) == sum(on)  # the teacher ran for the on-policy batches only
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5, abs=1e-6)
    assert live.teacher_cache is None


@pytest.mark.parametrize("extra, needles", [
    (["--lmbda", "1.5"], ["--lmbda 1.5", "[0, 1]"]),
    (["--lmbda", "-0.1"], ["--lmbda -0.1", "[0, 1]"]),
    (["--lmbda", "0.5", "--fsdp"], ["--lmbda", "--fsdp"]),
    (["--lmbda", "0.5", "--alpha_ce", "0"], ["--lmbda", "--alpha_ce"]),
    (["--lmbda", "0.5", "--rollout_top_p", "0"], ["--rollout_top_p 0.0"]),
    (["--lmbda", "0.5", "--max_new_tokens", "0"], ["--max_new_tokens 0"]),
    (["--lmbda", "0.5", "--rollout_temperature", "-1"], ["--rollout_temperature -1.0"]),
])
def test_bad_flags_are_one_line(chat, tmp_path, capsys, extra, needles):
    expect_error(capsys, _train_main, _with_teacher(chat, tmp_path / "x", *extra), *needles)
    assert not (tmp_path / "x").exists()


def test_mlm_and_unmasked_corpus_are_refused(chat, tmp_path, capsys):
    args = _with_teacher(chat, tmp_path / "x", "--lmbda", "0.5")
    mlm = args + ["--mlm", "--alpha_clm", "0", "--token_counts", str(tmp_path / "counts.pickle")]
    expect_error(capsys, _train_main, mlm, "--lmbda", "--mlm")
    plain = [str(chat["plain"]) if a == str(chat["data"]) else a for a in args]
    expect_error(capsys, _train_main, plain, "--lmbda 0.5", str(chat["plain"]), "loss mask")
    assert not (tmp_path / "x").exists()


def test_a_tokenizer_without_a_chat_template_is_refused(chat, tmp_path, capsys):
    """Where an answer ends is the template's end-of-turn token: without a template, on-policy is refused."""
    teacher = tmp_path / "no_template"
    shutil.copytree(chat["teacher"], teacher)
    (teacher / "chat_template.jinja").unlink()
    args = [str(teacher) if a == chat["teacher"] else a for a in _with_teacher(chat, tmp_path / "x", "--lmbda", "1")]
    expect_error(capsys, _train_main, args, "--lmbda", "no chat template")
    assert not (tmp_path / "x").exists()


def _train_main(argv):
    import train

    try:
        train.main(argv)
    except train.UserError as exc:
        train.fail(str(exc))


def test_two_ranks_answer_their_own_prompts(chat, tmp_path):
    """torchrun, 2 gloo ranks, λ = 1: each rank answers its own batches (draws keyed by rank) and the run ends in
    step, with the generation metrics logged by rank 0."""
    from conftest import run_torchrun

    dump = tmp_path / "ddp"
    run_torchrun("train.py", *_with_teacher(chat, dump, "--lmbda", "1", "--n_gpu", "2", steps=2), timeout=300)
    records = _train_records(dump)
    assert len(records) == 2 and all(r["on_policy_batches"] == 1 and r["rollout_seconds"] > 0 for r in records)
    assert (dump / "model.safetensors").exists()
