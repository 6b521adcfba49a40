"""General distillation of bare encoders (no LM head: --student_type/--teacher_type encoder) on hidden states:
the run, what it writes, the layer-map refusals, and the intermediate-layer loss on the LM-head path."""
import json

import numpy as np
import pytest
import torch

from conftest import run_script, tiny_distiller

# ------------------------------------------------------------------------------------------------ the maths


def test_hidden_layer_loss_equals_direct_computation():
    from distil.losses import hidden_layer_loss

    g = torch.Generator().manual_seed(0)
    s = [torch.randn(2, 5, 8, generator=g) for _ in range(2)]
    t = [torch.randn(2, 5, 8, generator=g) for _ in range(2)]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    cos = [1 - torch.nn.functional.cosine_similarity(a[mask], b[mask], dim=-1).mean() for a, b in zip(s, t)]
    mse = [((a[mask] - b[mask]) ** 2).mean() for a, b in zip(s, t)]  # positions x dims, padding left out
    assert hidden_layer_loss(s, t, mask, "cos") == pytest.approx(float(sum(cos) / 2), rel=1e-5)
    assert hidden_layer_loss(s, t, mask, "mse") == pytest.approx(float(sum(mse) / 2), rel=1e-5)
    padded = [torch.cat([a, torch.full((2, 3, 8), 1e4)], 1) for a in s]  # what padding holds must not count
    wide_mask = torch.cat([mask, torch.zeros(2, 3, dtype=torch.bool)], 1)
    assert hidden_layer_loss(padded, [torch.cat([b, torch.zeros(2, 3, 8)], 1) for b in t], wide_mask,
                             "mse") == pytest.approx(float(sum(mse) / 2), rel=1e-5)


def test_layer_loss_on_the_lm_head_path_leaves_the_other_losses_bit_exact(tmp_path):
    """A DistilBERT student and a BERT teacher (LM heads): adding --alpha_hidden changes no other loss, and the
    hidden term is the cosine loss between the student block and the teacher block the map names."""
    from distil.losses import cosine_loss

    def first_step_losses(extra):
        distiller, prepare, batches = tiny_distiller("bert_mlm", tmp_path / str(len(extra)), extra=extra, dropout=0.0)
        torch.manual_seed(1)  # the same masking draw for both runs
        batch = prepare(*batches[0])
        s_out, t_out = distiller._forward(batch.input_ids, batch.attention_mask, batch.rows, batch.padded)
        return distiller, batch, distiller.compute_losses(s_out, t_out, batch.attention_mask, batch.lm_labels,
                                                          batch.rows)

    _, _, plain = first_step_losses({})
    distiller, batch, with_layers = first_step_losses({"alpha_hidden": 1.0, "hidden_layer_map": ((0, 1),)})
    assert set(with_layers) == set(plain) | {"hidden"}
    for name, value in plain.items():
        assert torch.equal(value, with_layers[name]), name
    with torch.no_grad():
        mask = batch.attention_mask
        s = distiller.student.distilbert(batch.input_ids, attention_mask=mask.long(), output_hidden_states=True)
        t = distiller.teacher.bert(batch.input_ids, attention_mask=mask.long(), output_hidden_states=True)
        direct = cosine_loss(s.hidden_states[1], t.hidden_states[2], mask)  # student block 0, teacher block 1
    assert float(with_layers["hidden"].detach()) == pytest.approx(float(direct), abs=1e-5)


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def encoders(tiny, tmp_path_factory):
    """A random 4-layer BertModel teacher (no LM head, as a sentence-embedding model ships) with the tiny
    WordPiece tokenizer, and a student of its blocks 0 and 3 built as experiments/minilm_figures.sh builds one."""
    from transformers import AutoModel, BertConfig, BertModel, BertTokenizer

    from distil.extraction_auto import build_auto_student

    root = tmp_path_factory.mktemp("encoders")
    tok = BertTokenizer.from_pretrained(tiny["bert"])
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                         intermediate_size=37, max_position_embeddings=64)).save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    student, _ = build_auto_student(AutoModel.from_pretrained(root / "teacher"), [0, 3])
    student.save_pretrained(root / "student")
    tok.save_pretrained(root / "student")
    return {"root": root, "teacher": root / "teacher", "student": root / "student"}


def encoder_args(encoders, binarized, dump, *extra):
    return ["--student_type", "encoder", "--student_config", encoders["student"] / "config.json",
            "--student_pretrained_weights", encoders["student"], "--teacher_type", "encoder", "--teacher_name",
            encoders["teacher"], "--data_file", binarized["bert"][0], "--dump_path", dump, *extra]


def test_bare_encoders_distil_on_hidden_states_and_the_output_loads_everywhere(encoders, binarized, tmp_path):
    from transformers import AutoModel

    dump = tmp_path / "distilled"
    run_script("train.py", *encoder_args(encoders, binarized, dump, "--alpha_ce", "0", "--alpha_clm", "0",
                                         "--alpha_cos", "1", "--alpha_hidden", "1", "--hidden_layer_map", "0:0,1:3",
                                         "--n_epoch", "2", "--batch_size", "32", "--gradient_accumulation_steps", "1",
                                         "--learning_rate", "1e-3", "--log_interval", "2"))
    records = [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert len(train) >= 6 and "loss_ce" not in train[0] and "loss_mlm" not in train[0]
    for name in ("loss_cos", "loss_hidden"):
        first, last = np.mean([r[name] for r in train[:2]]), np.mean([r[name] for r in train[-2:]])
        assert last < 0.9 * first, (name, first, last)

    # What a user loads: the bare encoder class, every weight present, and different from where it started.
    model, info = AutoModel.from_pretrained(dump, output_loading_info=True)
    assert type(model).__name__ == "BertModel" and not info["missing_keys"] and not info["unexpected_keys"]
    before = AutoModel.from_pretrained(encoders["student"]).state_dict()
    after = model.state_dict()
    assert not torch.equal(before["encoder.layer.1.output.dense.weight"], after["encoder.layer.1.output.dense.weight"])

    # The task scripts fine-tune it (their loader builds a classification head on the bare encoder).
    rows = ["\t".join([("zygote " if i % 2 else "xylophone ") + "the city river was built", str(i % 2)])
            for i in range(48)]
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows[:32]) + "\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\n" + "\n".join(rows[32:]) + "\n")
    run_script("run_glue_w_distillation.py", "--task_name", "sst2", "--train_file", tmp_path / "train.tsv",
               "--validation_file", tmp_path / "dev.tsv", "--model_name_or_path", dump, "--output_dir",
               tmp_path / "sst2", "--do_train", "--do_eval", "--num_train_epochs", "1", "--max_seq_length", "32",
               "--save_steps", "0", "--cache_dir", tmp_path / "cache")
    scores = json.loads((tmp_path / "sst2" / "eval_results.json").read_text())
    assert "accuracy" in scores["metrics"]


@pytest.mark.parametrize("flags, needles", [
    (("--alpha_hidden", "1", "--hidden_layer_map", "0:0,2:1"), ("--hidden_layer_map", "student has no block 2")),
    (("--alpha_hidden", "1", "--hidden_layer_map", "0:0,1:4"), ("--hidden_layer_map", "teacher has no block 4")),
    (("--alpha_hidden", "1", "--hidden_layer_map", "0-1"), ("--hidden_layer_map", "student:teacher", "'0-1'")),
    (("--alpha_hidden", "1", "--hidden_layer_map", "1:1,1:3"), ("--hidden_layer_map", "block 1 is mapped twice")),
    (("--alpha_hidden", "1"), ("--alpha_hidden needs --hidden_layer_map",)),
    (("--alpha_cos", "1", "--hidden_layer_map", "0:0"), ("--hidden_layer_map", "--alpha_hidden > 0")),
    (("--alpha_cos", "1", "--alpha_clm", "0.5"), ("no LM head", "--alpha_clm 0.5")),
])
def test_layer_maps_and_lm_losses_that_do_not_fit_are_refused(encoders, binarized, tmp_path, flags, needles):
    defaults = {"--alpha_ce": "0", "--alpha_clm": "0"}
    defaults.update(dict(zip(flags[::2], flags[1::2])))
    refused(encoder_args(encoders, binarized, tmp_path / "run", *[x for kv in defaults.items() for x in kv]),
            *needles)
    assert not (tmp_path / "run").exists()


def test_a_bare_checkpoint_as_an_lm_teacher_points_to_encoder(encoders, binarized, tiny, tmp_path):
    argv = ["--student_type", "distilbert", "--student_config", tiny["distilbert_config"], "--teacher_type", "bert",
            "--teacher_name", encoders["teacher"], "--mlm", "--token_counts", binarized["bert"][1], "--alpha_mlm",
            "1", "--alpha_clm", "0", "--data_file", binarized["bert"][0], "--dump_path", tmp_path / "run"]
    refused(argv, "--teacher_name", "lacks", "--teacher_type encoder")
    argv[argv.index("distilbert")] = "encoder"
    refused(argv, "--student_type encoder and --teacher_type encoder go together")


def refused(argv, *needles):
    """train.main(argv) raises the UserError that train.py prints as its one `error:` line (exit status 2)."""
    import train
    from utils import UserError

    with pytest.raises(UserError) as excinfo:
        train.main([str(a) for a in argv])
    message = str(excinfo.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


# ------------------------------------------------------------------------------------------------ the scripts


def test_unlabelled_text_cuts_passages_and_drops_headings_labels_and_repeats(tmp_path):
    from conftest import load_script

    (tmp_path / "wiki.txt").write_text(" = Heading = \n\nOne two three. Four five six seven. Eight nine.\n"
                                       "Ten eleven twelve thirteen fourteen fifteen sixteen.\n")
    squad = {"data": [{"title": "t", "paragraphs": [{"context": "A context here.", "qas": [
        {"id": "q", "question": "Which question?", "answers": [{"text": "A", "answer_start": 0}]}]}]}]}
    (tmp_path / "squad.json").write_text(json.dumps(squad))
    (tmp_path / "pairs.tsv").write_text("sentence1\tsentence2\tlabel\nFirst one.\tSecond one.\t1\n"
                                        "A context here.\tFirst one.\t0\n")
    out = tmp_path / "out.txt"
    script = load_script("experiments/unlabelled_text")
    script.main(["--output", str(out), "--max_words", "5", "--text", str(tmp_path / "wiki.txt"), "--squad",
                 str(tmp_path / "squad.json"), "--glue", str(tmp_path / "pairs.tsv")])
    assert out.read_text().splitlines() == [
        "One two three.", "Four five six seven.", "Eight nine.",
        "Ten eleven twelve thirteen fourteen fifteen sixteen.",  # one sentence longer than --max_words stays whole
        "A context here.", "First one.", "Second one."]  # the question, the labels and the repeats are gone
    script.main(["--output", str(out), "--max_passages", "2", "--text", str(tmp_path / "wiki.txt")])
    assert out.read_text().splitlines() == ["One two three. Four five six seven. Eight nine.",
                                            "Ten eleven twelve thirteen fourteen fifteen sixteen."]


def test_sts_zero_shot_is_the_correlation_of_mean_pooled_cosines(encoders, tmp_path):
    from scipy import stats
    from transformers import AutoModel, AutoTokenizer

    from conftest import load_script

    pairs = [("the city river", "a city river was"), ("king of the north", "the ship was lost"),
             ("played a song", "music album song played"), ("a bridge", "the first bridge in the city"),
             ("war and battle", "the army won the battle"), ("small house", "large ancient church")]
    gold = [4.0, 0.5, 3.2, 2.0, 3.9, 1.0]
    (tmp_path / "sts.tsv").write_text("sentence1\tsentence2\tlabel\n" +
                                      "".join(f"{a}\t{b}\t{g}\n" for (a, b), g in zip(pairs, gold)))
    rows = load_script("experiments/sts_zero_shot").main(["--sts_file", str(tmp_path / "sts.tsv"), "--model", "T",
                                              str(encoders["teacher"]), "--batch_size", "4",
                                              "--output", str(tmp_path / "sts")])
    # Each sentence alone (no padding at all), mean over its tokens.
    model, tok = AutoModel.from_pretrained(encoders["teacher"]).eval(), AutoTokenizer.from_pretrained(encoders["teacher"])
    with torch.no_grad():
        def embed(text):
            return model(**tok(text, return_tensors="pt")).last_hidden_state[0].mean(0)
        cosines = [float(torch.nn.functional.cosine_similarity(embed(a), embed(b), dim=0)) for a, b in pairs]
    assert rows[0]["spearman"] == pytest.approx(100 * stats.spearmanr(cosines, gold)[0], abs=1e-6)
    assert rows[0]["pearson"] == pytest.approx(100 * stats.pearsonr(cosines, gold)[0], abs=1e-3)
    assert json.loads((tmp_path / "sts.json").read_text())["rows"][0]["model"] == "T"


def test_pair_probe_fits_a_ridge_on_frozen_pair_encodings(encoders, tmp_path):
    import numpy as np
    from scipy import stats
    from transformers import AutoModel, AutoTokenizer

    from conftest import load_script

    words = "the city river king north ship lost played song music album bridge first war battle army".split()
    rng = np.random.default_rng(0)
    rows = [(" ".join(rng.choice(words, 3)), " ".join(rng.choice(words, 4)), float(rng.uniform(0, 5)))
            for _ in range(30)]
    for name, part in (("train", rows[:20]), ("dev", rows[20:])):
        (tmp_path / f"{name}.tsv").write_text("sentence1\tsentence2\tlabel\n" +
                                              "".join(f"{a}\t{b}\t{g}\n" for a, b, g in part))
    result = load_script("experiments/pair_probe").main([
        "--train_file", str(tmp_path / "train.tsv"), "--dev_file", str(tmp_path / "dev.tsv"), "--max_train_samples",
        "16", "--ridge", "0.5", "--batch_size", "7", "--model", "T", str(encoders["teacher"]),
        "--output", str(tmp_path / "probe")])[0]["features"]
    assert set(result) == {"cls", "pooler", "mean"}
    # The same probe by hand: each pair alone, as one sequence (what the task scripts feed), [CLS] features,
    # a ridge with an unpenalised bias through numpy's least squares on the augmented system.
    model, tok = AutoModel.from_pretrained(encoders["teacher"]).eval(), AutoTokenizer.from_pretrained(encoders["teacher"])
    with torch.no_grad():
        feats = np.stack([model(**tok(a, b, return_tensors="pt")).last_hidden_state[0, 0].double().numpy()
                          for a, b, _ in rows])
    x, y = feats[:16], np.array([g for _, _, g in rows[:16]])
    design = np.vstack([np.c_[x, np.ones(16)], np.c_[np.sqrt(0.5) * np.eye(x.shape[1]), np.zeros(x.shape[1])]])
    coef = np.linalg.lstsq(design, np.r_[y, np.zeros(x.shape[1])], rcond=None)[0]
    predicted = np.c_[feats[20:], np.ones(10)] @ coef
    expected = 100 * stats.spearmanr(predicted, [g for _, _, g in rows[20:]])[0]
    assert result["cls"]["spearman"] == pytest.approx(expected, abs=1e-4)
    assert result["cls"]["feature_std"] == pytest.approx(x.std(0).mean(), rel=1e-4)
    assert "| T |" in (tmp_path / "probe.md").read_text()


def test_pair_probe_names_the_bad_file(encoders, tmp_path):
    from conftest import run_script

    (tmp_path / "bad.tsv").write_text("sentence1\tsentence2\tscore\na\tb\t1\n")
    proc = run_script("experiments/pair_probe.py", "--train_file", tmp_path / "bad.tsv", "--dev_file",
                      tmp_path / "bad.tsv", "--model", "T", encoders["teacher"], expect_ok=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-1000:]
    assert "--train_file" in errors[0] and "no column 'label'" in errors[0], errors[0]
