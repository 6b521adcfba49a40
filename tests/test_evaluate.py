"""distil/evaluation.py and scripts/evaluate.py: fixed masking, metrics against hand computations, sharding, the
command line."""
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from distil import evaluation as ev
from conftest import REPO, load_script, run_script, run_torchrun
from lm_seqs_dataset import BinarizedCorpus, LmSeqsDataset
from distil.masking import fixed_mlm_mask
from distil.models import max_input_size, model_classes
from utils import UserError, special_token_ids

evaluate_cli = load_script("evaluate")

IGNORE = -100


def _load(tiny, kind, seed=None):
    """The tiny teacher of this kind, or (seed given) a fresh model of the same shape initialised with seed.

    The fresh model's output layer is not tied to its input embeddings: a random model with tied embeddings
    mostly predicts its input token (logits = h . E with h ~ E[input]), so two independent random GPT-2s
    agree on ~60% of next tokens, which is the architecture talking, not the teacher.
    """
    config_class, model_class, _ = model_classes(kind)
    if seed is None:
        return model_class.from_pretrained(tiny[kind]).eval()
    torch.manual_seed(seed)
    return model_class(config_class.from_pretrained(tiny[kind], tie_word_embeddings=False)).eval()


@pytest.fixture(scope="module")
def setups(tiny, binarized):
    """kind -> (dataset, special ids, mlm) for the tiny corpus binarized with that kind's tokenizer."""
    out = {}
    for kind, mlm in (("bert", True), ("gpt2", False)):
        tokenizer = model_classes(kind)[2].from_pretrained(tiny[kind])
        special = special_token_ids(tokenizer)
        config = model_classes(kind)[0].from_pretrained(tiny[kind])
        dataset = LmSeqsDataset(BinarizedCorpus.open(binarized[kind][0]), special_tok_ids=special, mlm=mlm,
                                max_len=max_input_size(config, tokenizer))
        out[kind] = (dataset, special, mlm)
    return out


def _evaluate(setups, kind, model, **kw):
    dataset, special, mlm = setups[kind]
    kw.setdefault("batch_size", 8)
    return ev.evaluate(model, dataset, mlm=mlm, device="cpu", special_tok_ids=special, **kw)


# --------------------------------------------------------------------------------------------- masking


def test_fixed_mask_picks_ceil_15_percent_of_non_special_real_tokens_and_masks_them_all(setups):
    dataset, special, _ = setups["bert"]
    indices = list(range(10))
    token_ids, lengths = dataset.batch_sequences([dataset[i] for i in indices])
    mask_id = special["mask_token"]
    inputs, labels = fixed_mlm_mask(token_ids, lengths, indices, special_ids=special.values(), mask_id=mask_id)
    specials = set(special.values())
    for row in range(len(indices)):
        n = int(lengths[row])
        eligible = [j for j in range(n) if int(token_ids[row, j]) not in specials]
        picked = (labels[row] != IGNORE).nonzero().flatten().tolist()
        assert len(picked) == math.ceil(0.15 * len(eligible))
        assert set(picked) <= set(eligible)  # never a special token, never padding
        assert labels[row, picked].tolist() == token_ids[row, picked].tolist()
        assert (inputs[row, picked] == mask_id).all()  # always [MASK]: no 80/10/10
    untouched = labels == IGNORE
    assert torch.equal(inputs[untouched], token_ids[untouched])


def test_fixed_mask_depends_on_seed_and_sequence_index_only(setups):
    dataset, special, _ = setups["bert"]
    kw = dict(special_ids=special.values(), mask_id=special["mask_token"])
    batch = dataset.batch_sequences([dataset[i] for i in (3, 4, 5)])
    first = fixed_mlm_mask(*batch, [3, 4, 5], seed=7, **kw)[1]
    again = fixed_mlm_mask(*batch, [3, 4, 5], seed=7, **kw)[1]
    assert torch.equal(first, again)
    # sequence 4 alone (another row, other padding) is masked at the same positions
    alone_ids, alone_len = dataset.batch_sequences([dataset[4]])
    alone = fixed_mlm_mask(alone_ids, alone_len, [4], seed=7, **kw)[1]
    assert torch.equal(alone[0], first[1, : int(alone_len[0])])
    assert not torch.equal(fixed_mlm_mask(*batch, [3, 4, 5], seed=8, **kw)[1], first)


def test_fixed_mask_is_uniform_over_eligible_positions(setups):
    dataset, special, _ = setups["bert"]
    token_ids, lengths = dataset.batch_sequences([dataset[0]])
    counts = torch.zeros(token_ids.shape[1])
    n_seeds = 400
    for seed in range(n_seeds):
        _, labels = fixed_mlm_mask(token_ids, lengths, [0], special_ids=special.values(),
                                      mask_id=special["mask_token"], seed=seed)
        counts += (labels[0] != IGNORE).float()
    eligible = torch.tensor([int(t) not in set(special.values()) for t in token_ids[0]])
    freq = counts[eligible] / n_seeds
    expected = math.ceil(0.15 * int(eligible.sum())) / int(eligible.sum())
    # binomial sd with 400 draws at p ~ 0.15 is ~0.018: 0.07 is ~4 sd, and catches a biased picker
    assert (freq - expected).abs().max() < 0.07
    assert counts[~eligible].sum() == 0


# --------------------------------------------------------------------------------------------- teacher vs student


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_student_identical_to_teacher_has_zero_kl_and_full_agreement(tiny, setups, kind):
    out = _evaluate(setups, kind, _load(tiny, kind), teacher=_load(tiny, kind))
    assert out["n_tokens"] > 100
    assert abs(out["kl_teacher_student"]) < 1e-6
    assert out["top1_agreement"] == 1.0


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_random_student_disagrees_with_teacher(tiny, setups, kind):
    # The teacher is random too, so its argmax is not "the right answer" and agreement need not be near
    # 1/vocab: a near-uniform random model tends to favour a few tokens whatever the context, so agreement
    # is lumpy (close to 0 or to 1 over large groups of positions). What holds regardless: the value is a
    # deterministic function of the two init seeds (no flakiness), independent untied inits share their
    # favourite tokens with probability ~1/vocab (200-300 tokens; measured 0.0 for bert, < 0.01 for gpt2),
    # and a bug that compares a model with itself gives exactly 1.0. `< 0.5` separates those cases with a
    # wide margin; KL > 1e-3 (measured ~0.013, float noise ~1e-7) does the same for the divergence.
    out = _evaluate(setups, kind, _load(tiny, kind, seed=1), teacher=_load(tiny, kind))
    assert out["top1_agreement"] < 0.5
    assert out["kl_teacher_student"] > 1e-3


# --------------------------------------------------------------------------------------------- reproducibility


def test_mlm_loss_is_reproducible_and_changes_with_the_seed(tiny, setups):
    model = _load(tiny, "bert")
    a = _evaluate(setups, "bert", model, seed=0)
    torch.manual_seed(123)  # global RNG state must not matter
    b = _evaluate(setups, "bert", model, seed=0)
    c = _evaluate(setups, "bert", model, seed=1)
    assert a["mlm_loss"] == b["mlm_loss"]
    assert a["mlm_loss"] != c["mlm_loss"]
    assert a["pseudo_perplexity"] == pytest.approx(math.exp(a["mlm_loss"]), rel=1e-12)
    # batching (padding, order) does not change which tokens are masked, nor the loss beyond float noise
    d = _evaluate(setups, "bert", model, seed=0, batch_size=3)
    assert d["n_tokens"] == a["n_tokens"]
    assert d["mlm_loss"] == pytest.approx(a["mlm_loss"], rel=1e-5)


def test_models_are_evaluated_in_eval_mode_and_their_modes_restored(tiny, setups):
    student = _load(tiny, "bert", seed=1)
    reference = _evaluate(setups, "bert", student, max_batches=3)
    student.train()
    student.bert.embeddings.eval()  # e.g. a frozen part kept in eval mode by the trainer
    modes = {name: m.training for name, m in student.named_modules()}
    # dropout (0.1 in the tiny config) would change the loss if evaluate left train mode on
    assert _evaluate(setups, "bert", student, max_batches=3)["mlm_loss"] == reference["mlm_loss"]
    assert {name: m.training for name, m in student.named_modules()} == modes


# ----------------------------------------------------------------------------------- against a hand computation


def _kl_agree(s_logits, t_logits):
    log_p_s, log_p_t = torch.log_softmax(s_logits.double(), -1), torch.log_softmax(t_logits.double(), -1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()
    return float(kl), int((s_logits.argmax(-1) == t_logits.argmax(-1)).sum())


@torch.no_grad()
def test_mlm_metrics_match_a_direct_computation(tiny, setups):
    dataset, special, _ = setups["bert"]
    student, teacher = _load(tiny, "bert", seed=1), _load(tiny, "bert")
    n_seq, ce, kl, agree, n_tok = 40, 0.0, 0.0, 0, 0
    for i in range(n_seq):  # one unpadded sequence at a time
        ids = torch.as_tensor(dataset[i][0])[None]
        inputs, labels = fixed_mlm_mask(ids, torch.tensor([ids.shape[1]]), [i], special_ids=special.values(),
                                           mask_id=special["mask_token"], seed=3)
        pos = labels[0] != IGNORE
        s, t = student(input_ids=inputs).logits[0][pos], teacher(input_ids=inputs).logits[0][pos]
        ce += float(F.cross_entropy(s.double(), labels[0][pos], reduction="sum"))
        k, a = _kl_agree(s, t)
        kl, agree, n_tok = kl + k, agree + a, n_tok + int(pos.sum())
    out = _evaluate(setups, "bert", student, teacher=teacher, seed=3, batch_size=8, max_batches=n_seq // 8)
    assert out["n_sequences"] == n_seq and out["n_tokens"] == n_tok
    assert out["mlm_loss"] == pytest.approx(ce / n_tok, rel=1e-5)
    assert out["pseudo_perplexity"] == pytest.approx(math.exp(ce / n_tok), rel=1e-5)
    assert out["kl_teacher_student"] == pytest.approx(kl / n_tok, rel=1e-4)
    assert out["top1_agreement"] == agree / n_tok


@torch.no_grad()
def test_clm_metrics_match_a_direct_computation(tiny, setups):
    dataset, _, _ = setups["gpt2"]
    student, teacher = _load(tiny, "gpt2", seed=2), _load(tiny, "gpt2")
    n_seq, ce, kl, agree, n_tok = 24, 0.0, 0.0, 0, 0
    for i in range(n_seq):
        ids = torch.as_tensor(dataset[i][0])
        s, t = student(input_ids=ids[None]).logits[0, :-1], teacher(input_ids=ids[None]).logits[0, :-1]
        ce += float(F.cross_entropy(s.double(), ids[1:], reduction="sum"))
        k, a = _kl_agree(s, t)
        kl, agree, n_tok = kl + k, agree + a, n_tok + len(ids) - 1
    out = _evaluate(setups, "gpt2", student, teacher=teacher, batch_size=6, max_batches=n_seq // 6)
    assert out["n_tokens"] == n_tok
    assert out["clm_loss"] == pytest.approx(ce / n_tok, rel=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(ce / n_tok), rel=1e-5)
    assert out["kl_teacher_student"] == pytest.approx(kl / n_tok, rel=1e-4)
    assert out["top1_agreement"] == agree / n_tok


# --------------------------------------------------------------------------------------------- distributed


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_rank_shards_are_disjoint_and_cover_the_evaluated_set(tiny, setups, kind):
    # Without an initialised process group each rank returns its own shard's numbers: recombined by
    # token counts they must give the single-process result.
    student, teacher = _load(tiny, kind, seed=1), _load(tiny, kind)
    kw = dict(teacher=teacher, max_batches=5, batch_size=7)
    full = _evaluate(setups, kind, student, **kw)
    shards = [_evaluate(setups, kind, student, world_size=3, rank=r, **kw) for r in range(3)]
    loss = "mlm_loss" if setups[kind][2] else "clm_loss"
    assert full["n_sequences"] == 35 and [s["n_sequences"] for s in shards] == [12, 12, 11]
    assert sum(s["n_tokens"] for s in shards) == full["n_tokens"]
    for key in (loss, "kl_teacher_student", "top1_agreement"):
        combined = sum(s[key] * s["n_tokens"] for s in shards) / full["n_tokens"]
        assert combined == pytest.approx(full[key], rel=1e-5, abs=1e-9), key


def test_every_rank_runs_as_many_forwards(tiny, setups):
    """3 sequences on 2 ranks, one per batch: rank 1 has one sequence, but runs as many forwards (student and
    teacher) as rank 0. Under FSDP each forward is a collective: a rank with fewer would hang the others."""
    student, teacher = _load(tiny, "bert", seed=1), _load(tiny, "bert")
    calls = []
    for model in (student, teacher):
        model.bert.embeddings.register_forward_hook(lambda module, args, out: calls.append(module))
    counts = []
    for rank in (0, 1):
        calls.clear()
        out = _evaluate(setups, "bert", student, teacher=teacher, max_batches=3, batch_size=1, world_size=2,
                        rank=rank)
        counts.append((len(calls), out["n_sequences"]))
    assert counts == [(4, 2), (4, 1)]  # two forwards (student, teacher) per batch; padding is not counted


def test_evaluation_runs_in_the_given_precision_and_only_at_the_scored_rows(tiny, setups):
    """The vocabulary projection runs at the positions a metric reads (n_tokens rows, not every position),
    under autocast in the run's dtype; the metrics stay close to float32's."""
    model = _load(tiny, "bert")
    heads = []
    model.cls.register_forward_hook(lambda module, args, out: heads.append((args[0].shape, out.dtype)))
    full = _evaluate(setups, "bert", model, max_batches=2)
    assert sum(shape[0] for shape, _ in heads) == full["n_tokens"] and all(len(s) == 2 for s, _ in heads)
    heads.clear()
    bf16 = _evaluate(setups, "bert", model, max_batches=2, amp_dtype=torch.bfloat16)
    assert {dtype for _, dtype in heads} == {torch.bfloat16}
    assert bf16["n_tokens"] == full["n_tokens"]
    assert bf16["mlm_loss"] == pytest.approx(full["mlm_loss"], rel=2e-2) and bf16["mlm_loss"] != full["mlm_loss"]


GLOO_WRAPPER = """
import json, os, sys
sys.path.insert(0, {repo!r})
import torch, torch.distributed as dist
from distil import evaluation as ev
from lm_seqs_dataset import BinarizedCorpus, LmSeqsDataset
from distil.models import model_classes
from utils import special_token_ids
dist.init_process_group("gloo")
_, model_class, tok_class = model_classes("bert")
tok = tok_class.from_pretrained({folder!r})
special = special_token_ids(tok)
dataset = LmSeqsDataset(BinarizedCorpus.open({data!r}), special_tok_ids=special, mlm=True, max_len=64)
model = model_class.from_pretrained({folder!r})
out = ev.evaluate(model, dataset, mlm=True, batch_size=5, device="cpu", special_tok_ids=special, teacher=model,
                  max_batches=6, world_size=dist.get_world_size(), rank=dist.get_rank())
json.dump(out, open(os.path.join({out!r}, "rank%d.json" % dist.get_rank()), "w"))
dist.barrier()  # a rank that leaves while its peer still talks aborts the peer
dist.destroy_process_group()
"""


def test_two_gloo_ranks_return_the_same_global_numbers(tiny, binarized, setups, tmp_path):
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(GLOO_WRAPPER.format(repo=REPO, folder=str(tiny["bert"]), data=str(binarized["bert"][0]),
                                           out=str(tmp_path)))
    run_torchrun(wrapper, timeout=120)
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0 == rank1
    model = _load(tiny, "bert")
    single = _evaluate(setups, "bert", model, teacher=model, batch_size=5, max_batches=6)
    assert rank0["n_sequences"] == single["n_sequences"] == 30
    assert rank0["n_tokens"] == single["n_tokens"]
    assert rank0["mlm_loss"] == pytest.approx(single["mlm_loss"], rel=1e-5)


# --------------------------------------------------------------------------------------------- size and speed


def test_count_parameters_counts_shared_tensors_once_and_can_skip_frozen_ones():
    a, b = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)
    tied = torch.nn.Linear(3, 4)
    tied.weight = a.weight  # shares a's 12 weights, adds 4 biases
    model = torch.nn.ModuleList([a, b, tied])
    assert ev.count_parameters(model) == (12 + 4) + (8 + 2) + 4
    b.requires_grad_(False)
    assert ev.count_parameters(model, trainable_only=True) == (12 + 4) + 4


def test_inference_speed_is_positive_and_restores_train_mode(tiny, setups):
    model = _load(tiny, "gpt2")
    model.train()
    speed = ev.inference_speed(model, setups["gpt2"][0], batch_size=4, device="cpu", n_batches=2)
    assert math.isfinite(speed) and speed > 0
    assert model.training and all(m.training for m in model.modules())


# --------------------------------------------------------------------------------------------- command line


def test_cli_mlm_with_teacher_writes_json(tiny, binarized, setups, tmp_path):
    out_file = tmp_path / "res" / "eval.json"
    proc = run_script("scripts/evaluate.py", "--model", tiny["bert"], "--model_type", "bert", "--teacher", tiny["bert"],
                      "--data_file", binarized["bert"][0], "--mlm", "--batch_size", "8", "--seed", "0",
                      "--max_batches", "3", "--output", out_file)
    record = json.loads(out_file.read_text())
    assert {"model", "mlm_loss", "pseudo_perplexity", "kl_teacher_student", "top1_agreement", "n_tokens",
            "n_parameters"} <= set(record)
    assert record["model"] == str(tiny["bert"])
    assert record["top1_agreement"] == 1.0
    assert "pseudo_perplexity" in proc.stdout
    model = _load(tiny, "bert")
    direct = _evaluate(setups, "bert", model, max_batches=3)
    assert record["n_tokens"] == direct["n_tokens"]
    assert record["mlm_loss"] == pytest.approx(direct["mlm_loss"], rel=1e-6)
    assert record["n_parameters"] == sum(p.numel() for p in model.parameters())


def test_cli_gpt2_without_teacher(tiny, binarized, tmp_path, capsys):
    # in-process (main() is the whole CLI but for the error wrapper): saves a subprocess's ~5 s of imports
    out_file = tmp_path / "eval.json"
    evaluate_cli.main(["--model", str(tiny["gpt2"]), "--model_type", "gpt2", "--data_file", str(binarized["gpt2"][0]),
             "--max_batches", "2", "--batch_size", "4", "--output", str(out_file)])
    record = json.loads(out_file.read_text())
    assert {"clm_loss", "perplexity", "n_tokens"} <= set(record)
    assert "kl_teacher_student" not in record and "mlm_loss" not in record
    assert record["perplexity"] == pytest.approx(math.exp(record["clm_loss"]), rel=1e-9)
    assert "perplexity" in capsys.readouterr().out


def test_cli_bad_data_file_is_one_error_line_and_exit_2(tiny, tmp_path):
    proc = run_script("scripts/evaluate.py", "--model", tiny["bert"], "--model_type", "bert", "--data_file",
                      tmp_path / "missing.bin", expect_ok=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2
    assert len(lines) == 1 and lines[0].startswith("error: --data_file ") and "missing.bin" in lines[0], proc.stderr


@pytest.mark.parametrize("case", ["model", "vocab", "mlm_gpt2", "corrupt_weights", "unknown_type", "data_is_counts"])
def test_cli_user_errors_name_the_flag(tiny, binarized, tmp_path, case):
    args = {"model": tiny["bert"], "model_type": "bert", "data_file": binarized["bert"][0]}
    broken = tmp_path / "broken"
    if case in ("corrupt_weights", "unknown_type"):
        shutil.copytree(tiny["bert"], broken)
        if case == "corrupt_weights":
            (broken / "model.safetensors").write_bytes(b"\x00" * 64 + b"garbage")
        else:
            (broken / "config.json").write_text('{"model_type": "no_such_model"}')
        args["model"] = broken
    elif case == "data_is_counts":
        args["data_file"] = binarized["bert"][1]
    if case == "model":
        args["model"] = tmp_path / "no_model"
    elif case == "vocab":  # a 300-token roberta student against the 200-token bert teacher
        args.update(model=tiny["roberta"], model_type="roberta", teacher=tiny["bert"], teacher_type="bert",
                    data_file=binarized["roberta"][0])
    elif case == "mlm_gpt2":
        args.update(model=tiny["gpt2"], model_type="gpt2", data_file=binarized["gpt2"][0], mlm="")
    flags = [x for k, v in args.items() for x in ((f"--{k}", str(v)) if v != "" else (f"--{k}",))]
    with pytest.raises(UserError) as err:
        evaluate_cli.main(flags)
    expected = {"model": ["--model", "no_model"], "vocab": ["vocabulary", "300", "200", "--teacher"],
                "mlm_gpt2": ["--mlm", "gpt2"], "corrupt_weights": ["--model", str(broken), "cannot load a bert"],
                "unknown_type": ["--model", str(broken), "cannot load a bert"],
                "data_is_counts": ["--data_file", str(binarized["bert"][1]), "not a binarized corpus"]}[case]
    assert all(word in str(err.value) for word in expected), str(err.value)
