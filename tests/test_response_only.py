"""Response-only losses (issue 32, item 2): with a corpus's loss mask, no loss reads a position outside it (the
models still read the whole conversation); a corpus without a mask trains as before; evaluation scores the same
positions; train.py runs on a chat corpus and refuses what it cannot do in one line."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import load_script, make_chat_model, tiny_distiller
from distil.evaluation import evaluate
from distil.losses import IGNORE_INDEX
from distil.masking import Batch, attention_mask_from_lengths, clm_labels, non_padding_positions
from lm_seqs_dataset import BinarizedCorpus, BinarizedWriter, LmSeqsDataset


def _masked_batch(seed=0, bs=3, seq=20):
    """(ids, lengths, loss_mask): a 'prompt' of 6 tokens, an 'answer' of 6 (the mask), then 8 tokens after it."""
    rng = np.random.default_rng(seed)
    ids = torch.from_numpy(rng.integers(0, 298, size=(bs, seq)))
    lengths = torch.full((bs,), seq)
    mask = torch.zeros(bs, seq, dtype=torch.bool)
    mask[:, 6:12] = True
    return ids, lengths, mask


@pytest.fixture(scope="module")
def gradients(tmp_path_factory):
    """grads(ids, lengths, mask) -> (student parameter gradients, gradient at its last hidden states) of one step
    (accumulating: no optimizer step, so every call starts from the same weights)."""
    distiller, _, _ = tiny_distiller("gpt2_clm", tmp_path_factory.mktemp("grad"),
                                     extra={"gradient_accumulation_steps": 4}, dropout=0.0)
    distiller.student.train()
    captured = {}

    def keep(module, args, out):  # the student's last hidden states: what every loss reads
        out.retain_grad()
        captured["hidden"] = out

    distiller.student.transformer.ln_f.register_forward_hook(keep)

    def grads(ids, lengths, mask):
        distiller.student.zero_grad(set_to_none=True)
        distiller.step(*distiller.prepare_batch(ids, lengths, mask))
        assert distiller.n_optimizer_steps == 0
        return ({n: p.grad.clone() for n, p in distiller.student.named_parameters() if p.grad is not None},
                captured["hidden"].grad)

    return grads


def test_no_loss_reads_a_position_outside_the_mask(gradients):
    ids, lengths, mask = _masked_batch()
    grads, hidden_grad = gradients(ids, lengths, mask)
    read = torch.zeros_like(mask)
    read[:, :-1] = mask[:, 1:]  # position i is read when it predicts a masked token i + 1
    assert hidden_grad[read].abs().sum() > 0
    assert torch.count_nonzero(hidden_grad[~read]) == 0  # KD, CLM and cosine alike
    # a token after the last answer is neither a target nor context of one: the gradients are bit for bit the same
    changed = ids.clone()
    changed[:, 13:] = (changed[:, 13:] + 7) % 298
    other, _ = gradients(changed, lengths, mask)
    assert grads.keys() == other.keys() and all(torch.equal(grads[n], other[n]) for n in grads)
    # ... while a prompt token is context: changing one changes the gradient (the test can fail)
    prompt_changed = ids.clone()
    prompt_changed[:, 2] = (prompt_changed[:, 2] + 7) % 298
    third, _ = gradients(prompt_changed, lengths, mask)
    assert not all(torch.equal(grads[n], third[n]) for n in grads)


def test_a_corpus_without_a_mask_trains_exactly_as_before(tmp_path):
    """The batch an unmasked corpus gets is the one it always got: same labels, rows, and bit-identical losses."""
    distiller, prepare, batches = tiny_distiller("gpt2_clm", tmp_path, dropout=0.0)
    token_ids, lengths = batches[0]
    new = distiller.prepare_batch(token_ids, lengths)
    attn = attention_mask_from_lengths(lengths, token_ids.size(1))
    old = Batch(token_ids, attn, clm_labels(token_ids, attn), non_padding_positions(lengths, token_ids.size(1)),
                True)
    assert new.loss_positions is None and torch.equal(new.rows, old.rows) and torch.equal(new.lm_labels,
                                                                                         old.lm_labels)
    losses = []
    for batch in (new, old):
        s_out, t_out = distiller._forward(batch.input_ids, batch.attention_mask, batch.rows, batch.padded)
        out = distiller.compute_losses(s_out, t_out, batch.attention_mask, batch.lm_labels, batch.rows)
        losses.append({k: v.detach() for k, v in out.items()})
    assert all(torch.equal(losses[0][k], losses[1][k]) for k in losses[0])


def test_evaluation_scores_the_masked_tokens_only(tmp_path):
    ids, lengths, mask = _masked_batch(seq=16)
    path = str(tmp_path / "masked.bin")
    with BinarizedWriter(path, vocab_size=300, loss_mask=True) as writer:
        writer.add_flat(ids.flatten().numpy(), lengths.numpy(), mask.flatten().numpy())
    corpus = BinarizedCorpus.open(path)
    special = {"bos_token": 299, "eos_token": 299, "unk_token": 299}
    dataset = LmSeqsDataset(corpus, special_tok_ids=special, mlm=False, max_len=24)
    distiller, _, _ = tiny_distiller("gpt2_clm", tmp_path / "run", dropout=0.0)
    student = distiller.student
    result = evaluate(student, dataset, mlm=False, batch_size=2, device="cpu", special_tok_ids=special)
    assert result["n_tokens"] == int(mask.sum())
    with torch.no_grad():
        logits = student(ids).logits  # (bs, seq, vocab): position i predicts i + 1
    targets = ids.masked_fill(~mask, IGNORE_INDEX)[:, 1:]
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    assert result["clm_loss"] == pytest.approx(float(expected), rel=1e-5)


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_run")
    teacher = make_chat_model(root / "teacher", "qwen2", layers=2)
    student = make_chat_model(root / "student", "qwen2", layers=1, seed=1)
    records = [{"messages": [{"role": "user", "content": f"what is the capital of {c} ?"},
                             {"role": "assistant", "content": f"{a} ."}]}
               for c, a in [("France", "Paris"), ("Italy", "Rome")] * 6]
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    load_script("binarized_chat").main(["--file_path", str(data), "--tokenizer_name", teacher, "--dump_file",
                                        str(root / "chat"), "--max_seq_length", "128"])
    return {"root": root, "teacher": teacher, "student": student, "data": root / "chat.teacher.bin"}


def _train_args(chat_run, dump, *extra):
    return [str(a) for a in ["--student_type", "auto", "--teacher_type", "auto", "--student_config",
                             f"{chat_run['student']}/config.json", "--student_pretrained_weights", chat_run["student"],
                             "--data_file", chat_run["data"], "--dump_path", dump, "--n_gpu", "0", "--batch_size", "4",
                             "--gradient_accumulation_steps", "1", "--max_steps", "3", "--alpha_ce", "2",
                             "--alpha_clm", "1", "--alpha_cos", "0", "--warmup_prop", "0", "--log_interval", "1",
                             "--seed", "3", *extra]]


def _train_losses(dump):
    return [r for r in map(json.loads, (dump / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]


def test_train_py_on_a_chat_corpus_live_and_from_a_cache_of_the_masked_rows(chat_run, tmp_path):
    """The cache holds only the rows the losses read; with every id kept (float32) it reproduces the live run."""
    import train
    from utils import UserError

    cache = tmp_path / "cache"
    load_script("cache_teacher").main([str(a) for a in [
        "--teacher_type", "auto", "--teacher_name", chat_run["teacher"], "--data_file", chat_run["data"],
        "--cache_dir", cache, "--n_gpu", "0", "--k", "300", "--log_probs_dtype", "float32", "--temperature", "2.0"]])
    corpus = BinarizedCorpus.open(str(chat_run["data"]))
    n_loss_positions = sum(int(np.count_nonzero(corpus.loss_mask[corpus.offsets[i] + 1: corpus.offsets[i + 1]]))
                           for i in range(corpus.n_sequences))
    assert json.loads((cache / "cache.json").read_text())["n_rows"] == n_loss_positions < corpus.n_tokens / 2
    # in this process (as the command line runs it, without starting Python twice more)
    train.main(_train_args(chat_run, tmp_path / "live", "--teacher_name", chat_run["teacher"], "--eval_data_file",
                           chat_run["data"]))
    train.main(_train_args(chat_run, tmp_path / "cached", "--teacher_cache", cache))
    live, cached = _train_losses(tmp_path / "live"), _train_losses(tmp_path / "cached")
    assert len(live) == len(cached) == 3
    for a, b in zip(live, cached):
        for key in ("loss", "loss_ce", "loss_clm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    evaluated = [r for r in map(json.loads, (tmp_path / "live" / "metrics.jsonl").read_text().splitlines())
                 if r["split"] == "eval"]
    assert evaluated and all(r["n_tokens"] == n_loss_positions for r in evaluated)  # the masked positions only
    with pytest.raises(UserError, match="loss mask.*causal"):
        train.check_loss_mask(train.parse_args(_train_args(chat_run, tmp_path / "x", "--mlm")), corpus)
    with pytest.raises(UserError, match="binarize it with scripts/binarized_chat.py --max_seq_length 16"):
        train.check_loss_mask(train.parse_args(_train_args(chat_run, tmp_path / "x")), corpus, max_len=16)
