"""Framing tokens of an instruct/chat tokenizer: binarized_data.py --start_token / --end_token (or none), and
the chunks of long sequences framed the same way in training and evaluation."""
import pytest

from conftest import expect_error, load_script


@pytest.fixture(scope="module")
def chat_tokenizer(tiny, tmp_path_factory):
    """Like SmolLM2-Instruct's: BOS and EOS are the turn markers, <|endoftext|> is the document separator."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("chat") / "tok"
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(tiny["lines"], vocab_size=320, min_frequency=1,
                            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|im_end|>")
    tok.save_pretrained(folder)
    return folder, tok


def _binarize(tiny, folder, dump, *flags):
    from lm_seqs_dataset import BinarizedCorpus

    load_script("binarized_data").main(["--file_path", str(tiny["corpus"]), "--tokenizer_type", "auto",
                                        "--tokenizer_name", str(folder), "--dump_file", str(dump), *flags])
    return BinarizedCorpus.open(f"{dump}.{folder.name}.bin")


def test_auto_frames_with_bos_eos_and_the_user_can_choose(tiny, chat_tokenizer, tmp_path):
    folder, tok = chat_tokenizer
    start, end, eot = (tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"))
    line = next(line for line in tiny["lines"] if line)
    body = tok(line, add_special_tokens=False)["input_ids"]

    auto = _binarize(tiny, folder, tmp_path / "auto")
    assert list(auto.sequence(0)) == [start, *body, end]
    chosen = _binarize(tiny, folder, tmp_path / "eot", "--start_token", "<|endoftext|>", "--end_token", "<|endoftext|>")
    assert list(chosen.sequence(0)) == [eot, *body, eot] and chosen.metadata["framing"] == [eot, eot]
    bare = _binarize(tiny, folder, tmp_path / "none", "--start_token", "none", "--end_token", "none")
    assert list(bare.sequence(0)) == body and bare.metadata["framing"] == [None, None]
    assert bare.n_tokens == auto.n_tokens - 2 * auto.n_sequences


def test_chunks_of_long_sequences_get_the_corpus_framing(tiny, chat_tokenizer, tmp_path):
    from lm_seqs_dataset import LmSeqsDataset
    from distil.models import framing_token_ids
    from utils import special_token_ids

    folder, tok = chat_tokenizer
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    corpus = _binarize(tiny, folder, tmp_path / "eot", "--start_token", "<|endoftext|>", "--end_token", "<|endoftext|>")
    special = framing_token_ids(special_token_ids(tok), mlm=False, framing=corpus.metadata["framing"])
    dataset = LmSeqsDataset(corpus, special_tok_ids=special, mlm=False, max_len=16)
    assert dataset.wrapped.any()
    for i in range(len(dataset)):
        ids, n = dataset[i]
        assert ids[0] == eot and ids[n - 1] == eot and n <= 16


def test_an_unknown_framing_token_is_one_error_line(tiny, chat_tokenizer, tmp_path, capsys):
    folder, _ = chat_tokenizer
    expect_error(capsys, load_script("binarized_data").main,
                 ["--file_path", tiny["corpus"], "--tokenizer_type", "auto", "--tokenizer_name", folder,
                  "--dump_file", tmp_path / "x", "--start_token", "<|no_such_token|>"],
                 "--start_token", "<|no_such_token|>", "not a token")
    assert not list(tmp_path.iterdir())


def test_the_teacher_cache_frames_chunks_as_training_does(tiny, chat_tokenizer, tmp_path):
    """cache_teacher.py must cut and frame long sequences exactly as train.py will read them, or the cached rows
    stop matching the batches' positions."""
    import numpy as np
    from transformers import GPT2Config, GPT2LMHeadModel

    from lm_seqs_dataset import LmSeqsDataset
    from distil.models import framing_token_ids
    from utils import special_token_ids

    folder, tok = chat_tokenizer
    corpus = _binarize(tiny, folder, tmp_path / "eot", "--start_token", "<|endoftext|>", "--end_token", "<|endoftext|>")
    teacher = tmp_path / "teacher"
    config = GPT2Config(vocab_size=len(tok), n_positions=16, n_embd=16, n_layer=1, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(teacher)
    tok.save_pretrained(teacher)
    load_script("cache_teacher").main(["--teacher_type", "auto", "--teacher_name", str(teacher), "--data_file",
                                       corpus.path, "--cache_dir", str(tmp_path / "cache"), "--k", "4", "--n_gpu", "0"])
    special = framing_token_ids(special_token_ids(tok), mlm=False, framing=corpus.metadata["framing"])
    as_trained = LmSeqsDataset(corpus, special_tok_ids=special, mlm=False, max_len=16)
    assert as_trained.wrapped.any()
    cached = np.load(tmp_path / "cache" / "item_offsets.npy")
    assert np.diff(cached).tolist() == [int(n) for n in as_trained.lengths]
