"""The benchmark scripts and their library (bench/reference_step.py, bench/step.py, bench/models.py): the
measuring helpers, and smoke runs of both scripts on tiny settings."""
import json
import os

import numpy as np
import pytest
import torch

from bench.models import BERT_SPECIAL
from bench.step import loss_rows, make_sequences, our_losses
from conftest import expect_error, load_script, run_script
from bench.reference_step import reference_losses, weighted_total

bench_preprocessing = load_script("experiments/bench_preprocessing")

SMOKE_MODEL = ["--steps", "2", "--warmup", "1", "--loss_steps", "1", "--loss_warmup", "0", "--vocab_size", "300",
               "--hidden_size", "32", "--heads", "2", "--ffn", "37", "--teacher_layers", "2", "--student_layers", "1",
               "--batch_size", "3", "--seq_len", "24"]


# ------------------------------------------------------------------------------------------- helpers


def test_cpu_alloc_peak_sees_torch_allocations():
    from distil.measuring import cpu_alloc_peak

    def two_live_then_one():
        a = torch.empty(1 << 20)  # 4 MiB
        b = torch.empty(1 << 20)
        del a, b
        return torch.empty(1 << 19)  # 2 MiB, never live with the others

    peak = cpu_alloc_peak(two_live_then_one)
    assert peak is not None, "the profiler's event tree is unavailable: CPU loss-only memory cannot be measured"
    assert 8 << 20 <= peak < 9 << 20


def test_reference_and_our_losses_agree():
    """The reference formulas on full logits and the training step's loss function on the loss rows compute the
    same losses (else the timings compare different work)."""
    from distiller import DistillationConfig

    g = torch.Generator().manual_seed(0)
    bs, s, v, d = 3, 7, 11, 5
    attn = torch.arange(s)[None, :] < torch.tensor([7, 5, 3])[:, None]
    labels = torch.where(torch.rand(bs, s, generator=g) < 0.4, torch.randint(v, (bs, s), generator=g), -100)
    labels[~attn] = -100
    tensors = [torch.randn(bs, s, v, generator=g), torch.randn(bs, s, v, generator=g),
               torch.randn(bs, s, d, generator=g), torch.randn(bs, s, d, generator=g)]
    for mlm, restrict in ((True, False), (True, True), (False, False)):
        p = DistillationConfig(dump_path="-", temperature=2.0, mlm=mlm, restrict_ce_to_mask=restrict, alpha_ce=5.0,
                               alpha_mlm=2.0 if mlm else 0.0, alpha_clm=0.0 if mlm else 2.0, alpha_mse=0.5,
                               alpha_cos=1.0)
        lab = labels if mlm else labels.masked_fill(attn, 1)
        ref = reference_losses(*tensors, attn, lab, p)
        rows = loss_rows(attn, lab, p)
        ours = our_losses(tensors[0].flatten(0, 1)[rows], tensors[1].flatten(0, 1)[rows], *tensors[2:],
                                    attn, lab, rows, p)
        assert set(ref) | {"logits"} == set(ours)
        for k in ref:
            torch.testing.assert_close(ours[k], ref[k], rtol=1e-5, atol=1e-5, msg=f"{k} mlm={mlm} restrict={restrict}")
        torch.testing.assert_close(weighted_total(ours, p), weighted_total(ref, p), rtol=1e-5,
                                   atol=1e-5)


def test_batches_have_grouped_realistic_lengths():
    batches = make_sequences(20, 5, 64, 30522, BERT_SPECIAL, mlm=True, seed=0)
    lengths = [[len(x) for x in b] for b in batches]
    assert all(12 <= n <= 64 for b in lengths for n in b)
    assert all(max(b) - min(b) <= 3 for b in lengths)  # like train.py's 4-token length buckets
    assert len({max(b) for b in lengths}) > 5  # but the batches differ
    for b in batches:
        for x in b:
            assert x[0] == BERT_SPECIAL["cls_token"] and x[-1] == BERT_SPECIAL["sep_token"]
            assert (x[1:-1] >= 999).all() and (x[1:-1] < 30521).all()


def test_synthetic_corpus_is_well_formed(tmp_path):
    from lm_seqs_dataset import BinarizedCorpus

    BERT_SPECIAL = bench_preprocessing.BERT_SPECIAL
    bench_preprocessing._SYNTHETIC_CHUNK = 10_007  # several chunks, each ending mid-sequence
    try:
        bench_preprocessing.write_synthetic_corpus(str(tmp_path / "s.bin"), 50_000, seed=1)
    finally:
        bench_preprocessing._SYNTHETIC_CHUNK = 1 << 24
    corpus = BinarizedCorpus.open(str(tmp_path / "s.bin"))
    assert corpus.n_tokens == 50_000
    lengths = np.diff(corpus.offsets)
    assert lengths.min() >= 2 and lengths.max() <= 400 + 20
    tokens = np.asarray(corpus.tokens)
    assert (tokens[corpus.offsets[:-1]] == BERT_SPECIAL["cls_token"]).all()
    assert (tokens[corpus.offsets[1:] - 1] == BERT_SPECIAL["sep_token"]).all()


# ---------------------------------------------------------------------------------------- smoke runs


def test_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_script("scripts/benchmark.py", "--config", "all", "--device", "cpu", *SMOKE_MODEL, "--json", out)
    text = proc.stdout
    for name in ("bert_mlm", "bert_mlm_restrict", "gpt2_clm"):
        assert name in text
    assert text.count("ratio") >= 3 and "seq/s" in text and "loss only" in text and "reference" in text
    assert "WARNING" not in text

    report = json.loads(out.read_text())
    assert [r["config"] for r in report["results"]] == ["bert_mlm", "bert_mlm_restrict", "gpt2_clm"]
    for r in report["results"]:
        for side in ("ours", "reference"):
            s = r[side]
            assert s["sequences_per_s"] > 0 and s["tokens_per_s"] > s["sequences_per_s"]
            assert s["peak_step_bytes"] is not None and s["alloc_peak_bytes"] > 0
        # Same models, batches, masking and seed: the first step's losses must be the same on both sides.
        ours, ref = r["ours"]["first_losses"], r["reference"]["first_losses"]
        assert set(ours) == set(ref)
        assert ours["total"] == pytest.approx(ref["total"], rel=1e-4)
        lo = r["loss_only"]
        assert lo["same_loss"]
        for side in ("ours", "reference"):
            assert lo[side]["ms"] > 0 and lo[side]["peak_bytes"] > 0
        assert set(r["ratios"]) >= {"throughput", "peak_step_mem", "loss_only_time", "loss_only_peak_mem"}
        assert all(v is not None and v > 0 for v in r["ratios"].values())
    restrict = report["results"][1]
    assert restrict["loss_only"]["rows"] < report["results"][0]["loss_only"]["rows"]
    # MFU counts the FLOPs each side executes: ours runs the LM heads at the loss rows only (at most every position)
    for r in report["results"]:
        assert r["ours"]["executed_flops"] <= r["reference"]["executed_flops"] == r["model_flops_per_run"]
    assert restrict["ours"]["executed_flops"] < report["results"][0]["ours"]["executed_flops"]


def test_fsdp_memory_per_rank_smoke(tmp_path):
    """--fsdp_ranks: the Distiller under FSDP2 on 2 gloo processes; each holds half of every sharded part. With
    --bf16 the student's sharded weights stay fp32 (bf16 only while gathered) and the teacher is stored in bf16."""
    out = tmp_path / "fsdp.json"
    proc = run_script("scripts/benchmark.py", "--fsdp_ranks", "2", "--config", "gpt2_clm", "--device", "cpu",
                      "--bf16", *SMOKE_MODEL, "--json", out)
    assert "FSDP2 per rank" in proc.stdout and "Under DDP every rank holds all of it" in proc.stdout
    (two,) = json.loads(out.read_text())["fsdp"]
    assert two["world_size"] == 2 and len(two["ranks"]) == 2
    # shards partition the tensors: together the ranks hold each fp32 weight exactly once
    assert sum(r["student_bytes"] for r in two["ranks"]) == 4 * two["student_params"]
    assert sum(r["grad_bytes"] for r in two["ranks"]) == 4 * two["student_params"]
    assert sum(r["teacher_bytes"] for r in two["ranks"]) == 2 * two["teacher_params"]
    for r in two["ranks"]:
        assert 0.4 < r["student_bytes"] / (4 * two["student_params"]) < 0.6
        assert 0.4 < r["optimizer_bytes"] / (8 * two["student_params"]) < 0.6  # two moments (+ step counters)
        assert r["step_alloc_peak_bytes"] > 0 and r["rss_peak_bytes"] >= r["after_setup_bytes"] > 0
        assert r["seconds_per_step"] > 0


def test_bench_preprocessing_smoke(tiny, tmp_path):
    out, work = tmp_path / "prep.json", tmp_path / "work"
    work.mkdir()
    proc = run_script("experiments/bench_preprocessing.py", "--text", tiny["corpus"], "--tokenizer", tiny["bert"],
                      "--repeat", "3", "--synthetic_tokens", "200000", "--tmp_dir", work, "--json", out)
    text = proc.stdout
    for tag in ("(i) ", "(ii) ", "(iii) ", "(iv) ", "(v) ", "ratio (ii)/(i)", "ratio (ii)/(iii)"):
        assert tag in text, tag
    assert "same ids from all ways (first 200 lines):     True" in text
    assert "same counts: True" in text

    report = json.loads(out.read_text())
    t = report["tokenization"]
    n_lines = sum(1 for line in tiny["lines"] if line.strip()) * 3
    assert t["lines"] == n_lines
    for key in ("bare_tokenizer", "binarize", "original_python", "original_fast"):
        assert t[key]["lines_per_s"] > 0
    assert t["original_python"]["tokenizer_class"] == "BertTokenizerLegacy"
    for key in ("ratio_binarize_vs_bare", "ratio_binarize_vs_original", "ratio_count_tokens_speedup"):
        assert t[key] > 0
    assert t["same_counts"] and t["same_ids_fast_loop"] and t["same_ids_python_loop"]
    s = report["synthetic"]
    assert s["tokens"] == 200_000 and s["dataset_tokens"] <= 200_000 and s["sequences"] > 400
    assert s["uss_peak_bytes"] >= s["uss_before_bytes"] > 0 and s["build_seconds"] > 0
    assert os.listdir(work) == []  # the temporary text, binarized files and synthetic corpus are gone


def test_bench_preprocessing_needs_work_to_do():
    proc = run_script("experiments/bench_preprocessing.py", expect_ok=False)
    assert "nothing to do" in proc.stderr


def test_bench_preprocessing_refuses_inputs_of_the_wrong_kind(tiny, tmp_path, capsys):
    binary = tmp_path / "corpus.bin"
    binary.write_bytes(b"DSTLBIN\x01\x00" * 100)
    expect_error(capsys, bench_preprocessing.main, ["--text", binary, "--tokenizer", tiny["bert"]],
                 f"--text {binary}", "not a text file")
    broken = tmp_path / "tokenizer"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{ not json")
    expect_error(capsys, bench_preprocessing.main, ["--text", tiny["corpus"], "--tokenizer", broken],
                 f"--tokenizer {broken}", "cannot load")


def test_peak_flops_by_device_name():
    """Each device name gets its own peak: an H200 NVL (PCIe card) is not an SXM H200, nor an H100 NVL an H100."""
    from bench.models import peak_flops_of

    assert peak_flops_of("NVIDIA H200") == peak_flops_of("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_of("NVIDIA H200 NVL") == peak_flops_of("NVIDIA H100 NVL") == 835e12
    assert peak_flops_of("NVIDIA H100 PCIe") == 756e12 and peak_flops_of("NVIDIA GH200 480GB") == 989e12
    assert peak_flops_of("Some Future GPU") is None


def test_step_flops_count_the_heads_at_the_rows_they_run():
    """With head_rows, both LM heads are counted at those rows only (ours; fewer with --restrict_ce_to_mask);
    without, at every position. The difference is the heads' parameters (counted here from the head modules
    themselves) times 2 (teacher forward) and 6 (student forward and backward) per row left out."""
    from transformers import BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM

    from bench.models import step_flops

    teacher = BertForMaskedLM(BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, max_position_embeddings=24))
    student = DistilBertForMaskedLM(DistilBertConfig(vocab_size=300, dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                                                     max_position_embeddings=24))
    batches = [(torch.zeros(3, 20, dtype=torch.long),), (torch.zeros(2, 24, dtype=torch.long),)]
    head_t = sum(p.numel() for p in teacher.cls.parameters())
    head_s = sum(p.numel() for m in (student.vocab_transform, student.vocab_layer_norm, student.vocab_projector)
                 for p in m.parameters())
    every = step_flops(teacher, student, batches)
    rows = step_flops(teacher, student, batches, head_rows=[9, 7])
    assert every - rows == (60 - 9 + 48 - 7) * (2 * head_t + 6 * head_s)
