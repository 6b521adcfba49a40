"""GGUF teachers: scripts/convert_gguf.py turns a GGUF file (written here with the gguf package) into a model
folder that from_pretrained, train.py and extract.py load; a .gguf given to them says what to run."""
import importlib.util
import json

import numpy as np
import pytest
import torch

from conftest import expect_error, load_script

HAVE_GGUF = all(importlib.util.find_spec(name) is not None for name in ("gguf", "accelerate"))
needs_gguf = pytest.mark.skipif(not HAVE_GGUF, reason="the optional packages gguf and accelerate are not installed")

N_LAYERS, HIDDEN, FFN, HEADS, KV_HEADS = 2, 32, 48, 4, 2


def write_tiny_gguf(path, vocab_json, merges_txt, seed=0):
    """A random 2-layer Llama in float32 GGUF with a byte-level BPE tokenizer (tokenizer.ggml.model gpt2).
    Returns the token embedding matrix written (GGUF stores it as is; q/k projections are permuted)."""
    import gguf

    vocab = json.loads(vocab_json.read_text())
    tokens = [tok for tok, _ in sorted(vocab.items(), key=lambda item: item[1])]
    merges = [line for line in merges_txt.read_text().splitlines() if line and not line.startswith("#")]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(N_LAYERS)
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t == "<|endoftext|>" else gguf.TokenType.NORMAL
                            for t in tokens])
    writer.add_token_merges(merges)
    eos = vocab["<|endoftext|>"]
    writer.add_bos_token_id(eos)
    writer.add_eos_token_id(eos)
    rng = np.random.default_rng(seed)

    def tensor(name, *shape):  # GGUF lists dimensions innermost first; numpy arrays are (out, in)
        value = (rng.standard_normal(shape) * 0.2).astype(np.float32)
        writer.add_tensor(name, value)
        return value

    embeddings = tensor("token_embd.weight", len(tokens), HIDDEN)
    head_dim = HIDDEN // HEADS
    for i in range(N_LAYERS):
        tensor(f"blk.{i}.attn_norm.weight", HIDDEN)
        tensor(f"blk.{i}.attn_q.weight", HIDDEN, HIDDEN)
        tensor(f"blk.{i}.attn_k.weight", KV_HEADS * head_dim, HIDDEN)
        tensor(f"blk.{i}.attn_v.weight", KV_HEADS * head_dim, HIDDEN)
        tensor(f"blk.{i}.attn_output.weight", HIDDEN, HIDDEN)
        tensor(f"blk.{i}.ffn_norm.weight", HIDDEN)
        tensor(f"blk.{i}.ffn_gate.weight", FFN, HIDDEN)
        tensor(f"blk.{i}.ffn_up.weight", FFN, HIDDEN)
        tensor(f"blk.{i}.ffn_down.weight", HIDDEN, FFN)
    tensor("output_norm.weight", HIDDEN)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return embeddings


@pytest.fixture(scope="module")
def tiny_gguf(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    embeddings = write_tiny_gguf(path, tiny["gpt2"] / "vocab.json", tiny["gpt2"] / "merges.txt")
    return path, embeddings


@needs_gguf
def test_converted_folder_is_the_gguf_model(tiny, tiny_gguf, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, embeddings = tiny_gguf
    folder = tmp_path / "converted"
    load_script("convert_gguf").main(["--gguf_file", str(path), "--dump_folder", str(folder)])
    err = capsys.readouterr().err
    assert "Convert: write the folder 4/4 stages" in err and "/5 stages" not in err, err[-2000:]  # the bar's end
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())

    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == N_LAYERS
    assert torch.equal(model.get_input_embeddings().weight, torch.from_numpy(embeddings))
    tok = AutoTokenizer.from_pretrained(folder)
    reference_tok = AutoTokenizer.from_pretrained(tiny["gpt2"])
    text = "The city of music was built"
    assert tok(text)["input_ids"] == reference_tok(text)["input_ids"]

    # The same predictions as the model transformers reads from the GGUF file itself.
    direct = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, direct(ids).logits, rtol=0, atol=0)


@needs_gguf
def test_conversion_refuses_bad_input(tiny, tiny_gguf, tmp_path, capsys):
    main = load_script("convert_gguf").main
    path, _ = tiny_gguf
    expect_error(capsys, main, ["--gguf_file", tmp_path / "missing.gguf", "--dump_folder", tmp_path / "out"],
                 "--gguf_file", "no such file")
    expect_error(capsys, main, ["--gguf_file", tiny["corpus"], "--dump_folder", tmp_path / "out"],
                 "--gguf_file", "not a GGUF file")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    expect_error(capsys, main, ["--gguf_file", path, "--dump_folder", busy], "--dump_folder", "not an empty folder")
    assert (busy / "keep.txt").read_text() == "mine"


def test_missing_optional_packages_are_named(tmp_path, capsys, monkeypatch):
    module = load_script("convert_gguf")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(16))
    expect_error(capsys, module.main, ["--gguf_file", path, "--dump_folder", tmp_path / "out"],
                 "gguf", "pip install gguf accelerate")


def test_train_and_extract_point_a_gguf_to_the_converter(tiny, tmp_path, capsys):
    import train
    from utils import UserError

    gguf_file = tmp_path / "model.Q4_1.gguf"
    gguf_file.write_bytes(b"GGUF" + bytes(16))
    args = train.parse_args(["--student_type", "auto", "--teacher_type", "auto", "--student_config",
                             str(tiny["gpt2_config"]), "--teacher_name", str(gguf_file), "--data_file", "x.bin",
                             "--dump_path", str(tmp_path / "run")])
    with pytest.raises(UserError, match="--teacher_name .*scripts/convert_gguf.py --gguf_file"):
        train.sanity_checks(args)
    expect_error(capsys, load_script("extract").main, ["--model_type", "auto", "--model_name", gguf_file,
                                                       "--dump_folder", tmp_path / "student"],
                 "--model_name", "scripts/convert_gguf.py")
    assert not (tmp_path / "run").exists() and not (tmp_path / "student").exists()
