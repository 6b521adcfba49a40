"""--teacher_cache: scripts/cache_teacher.py writes the teacher's top-k, train.py trains from it without the
teacher. With k = the vocabulary size (float32) a run reproduces the live teacher's run; with a small k the
loss is the divergence over the k ids and the tail; the cache refuses a run it was not built for; an
interrupted build resumes to the same files."""
import json

import numpy as np
import pytest
import torch

from conftest import load_script, run_script

def subset_corpus(source, target, n, start=0):
    """A binarized corpus of `n` sequences of `source` (from `start`), written where `target` says: the tests
    train on a few batches, not the whole tiny corpus."""
    from lm_seqs_dataset import BinarizedCorpus, BinarizedWriter

    corpus = BinarizedCorpus.open(source)
    with BinarizedWriter(str(target), corpus.metadata["vocab_size"]) as writer:
        writer.add_batch([np.asarray(corpus.sequence(i)) for i in range(start, start + n)])
    return str(target)


@pytest.fixture(scope="module")
def small(binarized, tmp_path_factory):
    """{kind: (data file, token counts)} with 40 of the tiny corpus's sequences."""
    root = tmp_path_factory.mktemp("small")
    return {kind: (subset_corpus(binarized[kind][0], root / f"{kind}.bin", 40), binarized[kind][1])
            for kind in ("bert", "gpt2")}


COMMON = ["--n_epoch", "1", "--batch_size", "4", "--gradient_accumulation_steps", "2", "--log_interval", "1",
          "--checkpoint_interval", "1000", "--n_gpu", "0", "--learning_rate", "1e-3", "--seed", "3"]


def _cache(tiny, small, folder, kind, *extra):
    data, counts = small[kind]
    args = ["scripts/cache_teacher.py", "--teacher_type", kind, "--teacher_name", tiny[kind], "--data_file", data,
            "--cache_dir", folder, "--n_gpu", "0", "--batch_size", "8", *extra]
    if "--mlm" in extra:
        args += ["--token_counts", counts]
    return run_script(*args)


def _train(tiny, small, dump, kind, *extra, expect_ok=True):
    student = {"gpt2": "gpt2", "bert": "distilbert"}[kind]
    config = {"gpt2": tiny["gpt2_config"], "bert": tiny["distilbert_config"]}[kind]
    data, counts = small[kind]
    args = ["train.py", "--student_type", student, "--student_config", config, "--teacher_type", kind,
            "--dump_path", dump, "--data_file", data, *COMMON, *extra]
    if "--teacher_cache" not in extra:
        args += ["--teacher_name", tiny[kind]]
    return run_script(*args, expect_ok=expect_ok)


def _train_losses(dump):
    records = [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["split"] == "train"]


def test_clm_cache_with_every_id_reproduces_the_live_teacher(tiny, small, tmp_path):
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(tiny["gpt2"]).vocab_size
    _cache(tiny, small, tmp_path / "cache", "gpt2", "--k", str(vocab), "--log_probs_dtype", "float32")
    losses = ["--alpha_ce", "2.0", "--alpha_clm", "1.0"]
    _train(tiny, small, tmp_path / "live", "gpt2", *losses)
    _train(tiny, small, tmp_path / "cached", "gpt2", *losses, "--teacher_cache", tmp_path / "cache")
    live, cached = _train_losses(tmp_path / "live"), _train_losses(tmp_path / "cached")
    assert len(live) == len(cached) > 5
    for a, b in zip(live, cached):
        assert a["step"] == b["step"]
        for key in ("loss", "loss_ce", "loss_clm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)


@pytest.mark.parametrize("kd_loss", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_small_k_is_the_divergence_over_the_k_ids_and_the_tail(kd_loss):
    """The fused loss on a TopKTeacher equals the divergence between the two distributions coarsened to the k
    cached ids plus one 'any other id' outcome (autograd reference: values and gradients), rows dropped by
    kd_rows, T = 2; and the cache's own rows (topk_rows) are those k values and that tail."""
    from distil.divergences import TopKTeacher
    from distil.losses import weighted_logit_loss
    from distil.teacher_cache import topk_rows
    from test_divergences import BETA, reference

    g = torch.Generator().manual_seed(0)
    s, t = (torch.randn(6, 20, generator=g, dtype=torch.float64) * 3 for _ in range(2))
    k, T = 4, 2.0
    kd_rows = torch.tensor([True, True, False, True, True, True])
    ids, log_probs = topk_rows(t, k, T)
    p_t = torch.softmax(t / T, -1)
    hand_ids = p_t.topk(k, -1).indices
    assert torch.equal(ids, hand_ids)
    torch.testing.assert_close(log_probs[:, -1].double().exp(), 1 - p_t.gather(1, hand_ids).sum(-1), rtol=1e-5,
                               atol=1e-7)

    s_ref = s.clone().requires_grad_(True)
    p_s = torch.softmax(s_ref / T, -1)
    coarse_s = torch.cat([p_s.gather(1, hand_ids), 1 - p_s.gather(1, hand_ids).sum(-1, keepdim=True)], -1)
    coarse_t = torch.cat([p_t.gather(1, hand_ids), 1 - p_t.gather(1, hand_ids).sum(-1, keepdim=True)], -1)
    expected = reference(coarse_s, coarse_t, kd_loss)[kd_rows].mean() * T ** 2
    expected.backward()

    x = s.float().requires_grad_(True)
    total, ce, mse, _ = weighted_logit_loss(x, TopKTeacher(ids, log_probs.float()), None, T, 1.0, 0.0, 0.0, kd_rows,
                                            kd_loss=kd_loss, jsd_beta=BETA)
    total.backward()
    assert float(mse) == 0.0
    torch.testing.assert_close(ce.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), s_ref.grad, rtol=1e-4, atol=1e-6)


def _open_bert(tiny, small, cache_dir):
    from lm_seqs_dataset import BinarizedCorpus, LmSeqsDataset
    from distil.models import framing_token_ids, load_tokenizer
    from distil.teacher_cache import TeacherCache
    from utils import special_token_ids

    cache = TeacherCache(str(cache_dir))
    special = framing_token_ids(special_token_ids(load_tokenizer("bert", str(tiny["bert"]), "-")), True)
    dataset = LmSeqsDataset(BinarizedCorpus.open(small["bert"][0]), special_tok_ids=special, mlm=True,
                            max_len=cache.meta["max_len"])
    return cache, dataset, special


def test_mlm_cache_fixes_each_epochs_masking_and_holds_the_live_teacher(tiny, small, tmp_path):
    """In process: the cache's batches carry a masking fixed per (epoch, sequence) (replayed identically, new
    in each epoch, ceil(15%) of each sequence, corrupted only where predicted), and with k = V its rows are the
    live teacher's log_softmax(t / T) on those very inputs, at the predicted rows (--restrict_ce_to_mask)."""
    from transformers import BertForMaskedLM

    from distil.divergences import complete_teacher_log_probs
    from distil.models import TeacherLM

    teacher = BertForMaskedLM.from_pretrained(tiny["bert"]).eval()
    vocab = teacher.config.vocab_size
    data, counts = small["bert"]
    load_script("cache_teacher").main(["--teacher_type", "bert", "--teacher_name", str(tiny["bert"]), "--mlm",
                                       "--data_file", data, "--token_counts", str(counts), "--restrict_ce_to_mask",
                                       "--n_epoch", "2", "--k", str(vocab), "--log_probs_dtype", "float32",
                                       "--temperature", "1.5", "--cache_dir", str(tmp_path / "c"), "--n_gpu", "0"])
    cache, dataset, special = _open_bert(tiny, small, tmp_path / "c")
    indices = torch.tensor([7, 0, 31])
    token_ids, lengths = dataset.batch_sequences([dataset[int(i)] for i in indices])
    draws = []
    for epoch in (0, 1, 0):
        batch, topk = cache.prepare_batch(token_ids, lengths, indices, epoch, torch.device("cpu"))
        predicted = batch.lm_labels != -100
        assert torch.equal(batch.lm_labels[predicted], token_ids[predicted])
        assert torch.equal(batch.input_ids[~predicted], token_ids[~predicted])
        assert (batch.input_ids[predicted] == special["mask_token"]).float().mean() > 0.5
        assert predicted.sum(1).tolist() == [int(np.ceil(0.15 * n)) for n in lengths.tolist()]
        assert torch.equal(batch.rows, predicted.flatten().nonzero().squeeze(-1))
        draws.append(batch.input_ids)
        with torch.no_grad():
            mask = batch.attention_mask if batch.padded else None
            t_logits, _ = TeacherLM(teacher)(batch.input_ids, mask, batch.rows)
        live = torch.log_softmax(t_logits / 1.5, -1)
        cached = complete_teacher_log_probs(topk, torch.zeros_like(live))
        torch.testing.assert_close(cached, live, rtol=1e-5, atol=1e-5)
    assert torch.equal(draws[0], draws[2]) and not torch.equal(draws[0], draws[1])


def test_interrupted_build_resumes_to_the_same_files(tiny, small, tmp_path, monkeypatch):
    """A build stopped after its first batch is not usable; the same command finishes it, and every file equals
    an uninterrupted build's. Also the refusals of scripts/cache_teacher.py and of an unfinished cache."""
    from distil import models
    from distil.teacher_cache import TeacherCache
    from utils import UserError

    script = load_script("cache_teacher")
    data = small["gpt2"][0]
    argv = ["--teacher_type", "gpt2", "--teacher_name", str(tiny["gpt2"]), "--data_file", data, "--k", "5",
            "--batch_size", "64", "--n_gpu", "0", "--cache_dir"]
    script.main(argv + [str(tmp_path / "whole")])

    calls = []
    forward = models.TeacherLM.forward

    def crash_on_second_batch(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return forward(self, *args)

    monkeypatch.setattr(models.TeacherLM, "forward", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        script.main(argv + [str(tmp_path / "resumed")])
    with pytest.raises(UserError, match="interrupted"):
        TeacherCache(str(tmp_path / "resumed"))
    monkeypatch.setattr(models.TeacherLM, "forward", forward)
    script.main(argv + [str(tmp_path / "resumed")])
    for name in ("ids.bin", "log_probs.bin", "row_offsets.npy", "item_offsets.npy"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name
    with pytest.raises(UserError, match="already holds this complete cache"):
        script.main(argv + [str(tmp_path / "whole")])
    with pytest.raises(UserError, match="other settings"):
        script.main(argv[:-1] + ["--temperature", "1.0", "--cache_dir", str(tmp_path / "whole")])


def test_train_refuses_a_run_the_cache_was_not_built_for(tiny, small, tmp_path):
    """Another corpus, tokenizer or maximum length, another temperature, more MLM epochs than cached, or a loss
    the cache cannot feed: one line naming the flag, exit status 2, before anything is written."""
    import train
    from utils import UserError

    data, counts = small["bert"]
    load_script("cache_teacher").main(["--teacher_type", "bert", "--teacher_name", str(tiny["bert"]), "--mlm",
                                       "--data_file", data, "--token_counts", str(counts), "--n_epoch", "1", "--k",
                                       "8", "--cache_dir", str(tmp_path / "c"), "--n_gpu", "0"])
    base = ["--student_type", "distilbert", "--student_config", str(tiny["distilbert_config"]), "--teacher_type",
            "bert", "--mlm", "--alpha_ce", "1", "--alpha_mlm", "1", "--alpha_clm", "0", "--dump_path",
            str(tmp_path / "run"), "--teacher_cache", str(tmp_path / "c"), "--n_gpu", "0", "--n_epoch", "1"]
    from distil.models import load_tokenizer

    other = subset_corpus(data, tmp_path / "other.bin", 30, start=5)  # the same tokenizer, other sequences
    tokenizer = load_tokenizer("bert", str(tiny["bert"]), "-")
    tokenizer.add_tokens(["zzzq"])  # one more token than the cache's
    tokenizer.save_pretrained(tmp_path / "tok")
    short = tmp_path / "short.json"
    config = json.loads(open(tiny["distilbert_config"]).read())
    short.write_text(json.dumps(dict(config, max_position_embeddings=40)))
    cases = [
        (["--data_file", other], "another corpus"),
        (["--data_file", data, "--tokenizer_name", str(tmp_path / "tok")], "another tokenizer"),
        (["--data_file", data, "--student_config", str(short)], "at most 64 tokens"),
        (["--data_file", data, "--temperature", "3"], "--temperature"),
        (["--data_file", data, "--n_epoch", "2"], "masking of 1 epochs"),
        # 40 sequences, batches of 5, 50 batches per step: one step per epoch, so 3 steps need 3 epochs
        (["--data_file", data, "--max_steps", "3"], r"--max_steps 3 needs 3 epochs.*cache_teacher.py --n_epoch 3"),
        (["--data_file", data, "--alpha_cos", "1"], "--alpha_mse, --alpha_cos and --alpha_hidden"),
    ]
    for extra, needle in cases:
        argv = base + extra
        if "--student_config" in extra:
            i = argv.index("--student_config")
            argv = argv[:i] + argv[i + 2:]
        with pytest.raises(UserError, match=needle):
            train.main(argv)
        assert not (tmp_path / "run").exists()
    # through the command line: one line, exit status 2
    proc = run_script("train.py", *base, "--data_file", data, "--temperature", "3", expect_ok=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "--teacher_cache" in errors[0], proc.stderr[-2000:]
    # and the run it was built for trains (MLM, from the cached masking), recording which teacher it learnt from
    run_script("train.py", *base, "--data_file", data, "--batch_size", "8", "--gradient_accumulation_steps", "2")
    assert (tmp_path / "run" / "model.safetensors").is_file()
    params = json.loads((tmp_path / "run" / "parameters.json").read_text())
    assert params["cached_teacher"]["name"] == str(tiny["bert"])


def _crash_on_second_batch(monkeypatch):
    """TeacherLM.forward raises KeyboardInterrupt at its second call (a build stopped after one batch)."""
    from distil import models

    calls, forward = [], models.TeacherLM.forward

    def crash(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return forward(self, *args)

    monkeypatch.setattr(models.TeacherLM, "forward", crash)
    return lambda: monkeypatch.setattr(models.TeacherLM, "forward", forward)


def test_the_cache_checks_the_vocabulary_and_records_the_teacher(tiny, small, tmp_path):
    """cache_teacher.py gives a build the vocabulary check of a live run (a same-size --tokenizer_name with two
    ids swapped was cached, then trained from), and cache.json names the teacher: its name, a digest of its
    config and one of its own tokenizer's token table."""
    from transformers import GPT2Config

    from test_vocabularies import swapped_tokenizer
    from utils import UserError

    script = load_script("cache_teacher")
    argv = ["--teacher_type", "gpt2", "--teacher_name", str(tiny["gpt2"]), "--data_file", small["gpt2"][0], "--k",
            "4", "--n_gpu", "0", "--batch_size", "64"]
    swapped = swapped_tokenizer(tiny, tmp_path / "swapped")
    with pytest.raises(UserError, match=f"--tokenizer_name {swapped}: id 40 is"):
        script.main(argv + ["--tokenizer_name", str(swapped), "--cache_dir", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()
    script.main(argv + ["--cache_dir", str(tmp_path / "c")])
    teacher = json.loads((tmp_path / "c" / "cache.json").read_text())["teacher"]
    assert teacher["name"] == str(tiny["gpt2"])
    # the run's tokenizer is the teacher's own here: the two records agree
    assert teacher["vocabulary"] == json.loads((tmp_path / "c" / "cache.json").read_text())["tokenizer"]
    # another architecture (the 1-layer student's config as a teacher) has another config digest
    from transformers import GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config.from_json_file(tiny["gpt2_config"])).save_pretrained(tmp_path / "small_teacher")
    script.main(argv[:3] + [str(tmp_path / "small_teacher"), "--tokenizer_name", str(tiny["gpt2"])] + argv[4:]
                + ["--cache_dir", str(tmp_path / "c2"), "--assume_same_token_ids"])
    other = json.loads((tmp_path / "c2" / "cache.json").read_text())["teacher"]
    assert len(other["config_sha256"]) == 64 and other["config_sha256"] != teacher["config_sha256"]
    assert other["vocabulary"] is None  # that folder has no tokenizer: nothing to record


def test_a_resumed_build_refuses_another_teacher(tiny, small, tmp_path, monkeypatch):
    """A build interrupted with one teacher and resumed with another of the same shape finished 'complete' with
    rows from both; now one line naming --teacher_name, and the original teacher still finishes it."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from conftest import randomise
    from distil.teacher_cache import TeacherCache
    from utils import UserError

    other = GPT2LMHeadModel.from_pretrained(tiny["gpt2"])
    randomise(other, 1, 0.1)
    other.save_pretrained(tmp_path / "other")
    AutoTokenizer.from_pretrained(tiny["gpt2"]).save_pretrained(tmp_path / "other")
    script = load_script("cache_teacher")
    argv = ["--teacher_type", "gpt2", "--data_file", small["gpt2"][0], "--k", "4", "--n_gpu", "0", "--batch_size",
            "8", "--cache_dir", str(tmp_path / "c"), "--teacher_name"]
    restore = _crash_on_second_batch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        script.main(argv + [str(tiny["gpt2"])])
    restore()
    with pytest.raises(UserError, match=f"--cache_dir {tmp_path / 'c'} was begun with --teacher_name "
                                        f"{tiny['gpt2']}.*--teacher_name {tmp_path / 'other'}"):
        script.main(argv + [str(tmp_path / "other")])
    script.main(argv + [str(tiny["gpt2"])])
    assert TeacherCache(str(tmp_path / "c")).meta["teacher"]["name"] == str(tiny["gpt2"])


def test_cache_and_run_cut_sequences_at_the_same_max_seq_length(tiny, small, tmp_path):
    """cache_teacher.py --max_seq_length: a train.py --max_seq_length run takes the cache built with the same
    value; another length is refused naming --max_seq_length (not the tokenizer's and student's sizes)."""
    import train
    from utils import UserError

    load_script("cache_teacher").main(["--teacher_type", "gpt2", "--teacher_name", str(tiny["gpt2"]), "--data_file",
                                       small["gpt2"][0], "--k", "4", "--n_gpu", "0", "--max_seq_length", "24",
                                       "--cache_dir", str(tmp_path / "c")])
    argv = ["--student_type", "gpt2", "--student_config", str(tiny["gpt2_config"]), "--teacher_type", "gpt2",
            "--data_file", small["gpt2"][0], "--teacher_cache", str(tmp_path / "c"), "--alpha_ce", "1",
            "--alpha_clm", "1", "--dump_path", str(tmp_path / "run"), *COMMON, "--max_steps", "1"]
    with pytest.raises(UserError, match=r"at most 24 tokens, this run cuts them at 32 .*--max_seq_length"):
        train.main(argv + ["--max_seq_length", "32"])
    assert not (tmp_path / "run").exists()
    train.main(argv + ["--max_seq_length", "24"])
    assert (tmp_path / "run" / "model.safetensors").is_file()


class _HostToDevice:
    """Shapes of the tensors copied from the host to the meta device (the stand-in for a GPU here) inside."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        shapes = self.shapes = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if func.overloadpacket is torch.ops.aten._to_copy and args[0].device.type == "cpu" \
                        and out.device.type == "meta":
                    shapes.append(tuple(args[0].shape))
                return out

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_prepare_batch_builds_mask_labels_and_rows_on_the_device(tiny, small, tmp_path, kind):
    """As the live path (masking.prepare_batch_*): only the token ids, the lengths and the cached values cross
    from the host; the attention mask, labels and loss rows are built on the device, and nothing in it would
    make the host wait for a GPU (the recorder of test_host_syncs.py)."""
    from host_syncs import HostSyncRecorder
    from lm_seqs_dataset import BinarizedCorpus, LmSeqsDataset
    from distil.models import framing_token_ids, load_tokenizer
    from distil.teacher_cache import TeacherCache
    from utils import special_token_ids

    mlm = kind == "bert"
    data, counts = small[kind]
    extra = ["--mlm", "--restrict_ce_to_mask", "--n_epoch", "1", "--token_counts", str(counts)] if mlm else []
    load_script("cache_teacher").main(["--teacher_type", kind, "--teacher_name", str(tiny[kind]), "--data_file", data,
                                       "--k", "4", "--n_gpu", "0", "--cache_dir", str(tmp_path / "c"), *extra])
    cache = TeacherCache(str(tmp_path / "c"))
    special = framing_token_ids(special_token_ids(load_tokenizer(kind, str(tiny[kind]), "-")), mlm)
    dataset = LmSeqsDataset(BinarizedCorpus.open(small[kind][0]), special_tok_ids=special, mlm=mlm,
                            max_len=cache.meta["max_len"])
    indices = torch.tensor([3, 11, 0, 25])
    token_ids, lengths = dataset.batch_sequences([dataset[int(i)] for i in indices])
    assert (lengths < token_ids.shape[1]).any()  # padded: the mask matters
    with _HostToDevice() as copies:
        batch, topk = cache.prepare_batch(token_ids, lengths, indices, 0, torch.device("meta"))
    assert all(t.device.type == "meta" for t in (*batch[:4], *topk))
    assert copies.shapes.count(tuple(token_ids.shape)) == 1, copies.shapes  # the ids; no mask, no labels
    with HostSyncRecorder() as recorder:
        cache.prepare_batch(token_ids, lengths, indices, 0, torch.device("cpu"))
    assert recorder.events == [], [op for op, _ in recorder.events]
