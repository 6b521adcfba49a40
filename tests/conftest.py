"""Shared test helpers: tiny local tokenizers, teachers and student configs built once per test session (no
network), running scripts (one process or two under torchrun), one-line error checks, a tiny Distiller."""
import dataclasses
import itertools
import os
import random
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

WORDS = ("the a of and to in is was for on that with as by at from his her it an were which are this be has "
         "had first new one two three after city river king war game music film album song team season year "
         "world north south school church station village island bridge road house party army battle ship "
         "played released recorded wrote built opened called named became moved won lost began ended served "
         "small large early late local national famous ancient modern several many other only major").split()
RARE = "zygote quixotic xylophone jubilant vexillology".split()


def pytest_configure(config):
    """Under pytest-xdist, each worker's torch gets its share of the cores: by default every worker would start a
    thread per core (2 workers on 2 cores: 4 busy threads). Scripts the tests start run on one (run_script)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers:
        import torch

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // workers))


# The files with the longest runs (measured with --durations on 2 cores), longest first: collection puts them at the
# head of the run, so that under `-n 2 --dist loadfile --no-loadscope-reorder` (.ci/run) the two workers start on
# them and the many short files fill the gaps at the end. In alphabetical order a long few-test file (test_resume,
# test_task_training) could be handed out last, with one worker idle while the other runs it.
LONGEST_FIRST = ("test_demo.py", "test_end_to_end.py", "test_resume.py", "test_auto.py", "test_fsdp.py",
                 "test_task_training.py", "test_teacher_cache.py", "test_ner.py", "test_encoder_distillation.py",
                 "test_distributed.py", "test_evaluate.py", "test_benchmark.py", "test_extract_auto.py",
                 "test_run_length.py", "test_extract.py", "test_data.py", "test_losses.py")


def pytest_collection_modifyitems(config, items):
    """Files in LONGEST_FIRST order, then the others as collected; tests keep their order within a file."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))


def make_corpus_lines(n_lines=300, seed=0):
    """Deterministic English-like lines of varied length, a few blank and a few very short ones."""
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        if i % 37 == 5:
            lines.append("")
            continue
        n = rng.choice([3, 5]) if i % 23 == 7 else rng.randint(12, 70)
        words = [rng.choice(WORDS) if rng.random() > 0.02 else rng.choice(RARE) for _ in range(n)]
        lines.append(" ".join(words).capitalize() + " .")
    return lines


def hang_guard(seconds):
    """A subprocess's time limit: `seconds` (a wide margin over its time on 2 free cores) stretched by how busy the
    machine is now (1-minute load per core, at least 1), so a loaded machine slows a test down but does not fail
    it. It catches a hang; it is not a speed check."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return seconds * max(1.0, os.getloadavg()[0] / cores)


def run_script(*args, expect_ok=True, timeout=300, env=None):
    """Run a repo script with this interpreter; returns CompletedProcess. Fails the test on surprise.
    timeout: the hang guard on 2 free cores, in seconds, scaled by hang_guard."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    full_env.update(env or {})
    limit = hang_guard(timeout)
    try:
        proc = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                              timeout=limit, env=full_env)
    except subprocess.TimeoutExpired as exc:
        def tail(out, n):
            return (out.decode(errors="replace") if isinstance(out, bytes) else out or "")[-n:]

        raise AssertionError(
            f"TIMEOUT (hang guard): {' '.join(map(str, args))} still running after {limit:.0f} s ({timeout} s "
            f"scaled by the load, now {os.getloadavg()[0]:.1f}); killed.\n{tail(exc.stdout, 2000)}\n"
            f"{tail(exc.stderr, 4000)}") from None
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    if not expect_ok and proc.returncode == 0:
        raise AssertionError(f"{args} unexpectedly succeeded:\n{proc.stderr[-3000:]}")
    return proc


def run_in_process(script, *args, expect_ok=True, env=None):
    """Run a repo script's command line (its `if __name__ == "__main__"` block included, so the same error
    handling and exit status) inside this process: no interpreter start and no torch/transformers import, seconds
    saved per run. For tests about what a script does with its arguments; each script keeps at least one real
    command-line run (run_script) elsewhere. Returns a CompletedProcess with the exit status and what was printed
    (print()s and the `error:` line; not the log records, which go to the handler logging set up first)."""
    import contextlib
    import io
    import runpy
    import traceback

    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_env, saved_cwd = sys.argv, dict(os.environ), os.getcwd()
    returncode = 0
    try:
        sys.argv = [script, *argv]
        os.environ.update(env or {})
        os.chdir(REPO)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(os.path.join(REPO, script), run_name="__main__")
            except SystemExit as exc:
                code = exc.code
                returncode = code if isinstance(code, int) else (0 if code is None else 1)
                if isinstance(code, str):
                    print(code, file=sys.stderr)
            except Exception:  # what an uncaught exception does to a real run: a traceback, exit status 1
                traceback.print_exc()
                returncode = 1
    finally:
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
    proc = subprocess.CompletedProcess([script, *argv], returncode, out.getvalue(), err.getvalue())
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"{script} {argv} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    if not expect_ok and proc.returncode == 0:
        raise AssertionError(f"{script} {argv} unexpectedly succeeded:\n{proc.stderr[-3000:]}")
    return proc


def load_script(name):
    """scripts/<name>.py (or `experiments/<name>` named with its folder) as a module, to call its main()
    in-process (a test may; project modules never import a script)."""
    import importlib.util

    path = os.path.join(REPO, f"{name}.py" if "/" in name else os.path.join("scripts", f"{name}.py"))
    spec = importlib.util.spec_from_file_location(f"_script_{name.replace('/', '_')}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# torchrun's master ports come from a block of ports for each pytest-xdist worker (gw0, gw1, ...; a serial run
# uses the first), below Linux's ephemeral range (32768-60999). A port taken from the kernel (bind to port 0) and
# released lies in that range, where an outgoing connection, such as one between another worker's gloo ranks, can
# take it before torchrun binds it. Each session starts at a random place in its block: two test sessions on one
# machine rarely meet.
PORT_BLOCK = 500
FIRST_PORT = 20000
_port_counter = itertools.count(random.SystemRandom().randrange(PORT_BLOCK))


def free_port():
    """A TCP port nothing listens on, from this worker's block, a different one at each call."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    first = FIRST_PORT + int(worker.lstrip("gw") or 0) % 24 * PORT_BLOCK  # 24 blocks end at 32000
    for _ in range(PORT_BLOCK):
        port = first + next(_port_counter) % PORT_BLOCK
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # in use: another program's, or a port of ours still closing
                continue
        return port
    raise RuntimeError(f"no free TCP port in {first}-{first + PORT_BLOCK - 1}")


def run_torchrun(*args, nproc=2, **kwargs):
    """run_script under `python -m torch.distributed.run` with nproc CPU (gloo) processes on this machine."""
    return run_script("-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
                      f"--master_port={free_port()}", *args, **kwargs)


def expect_error(capsys, main, argv, *needles):
    """main(argv) exits with status 2 after exactly one `error:` line, containing every needle, and no traceback."""
    with pytest.raises(SystemExit) as excinfo:
        main([str(a) for a in argv])
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "Traceback" not in err, err[-2000:]
    for needle in needles:
        assert str(needle) in error_lines[0], error_lines[0]
    return error_lines[0]


def randomise(model, seed, scale):
    """Distinct random values in every parameter. Default init leaves biases at 0 and norms at 1, so a
    mapping that swapped two of them would go unnoticed; random values make each tensor identifiable."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * scale)


# --------------------------------------------------------------------------------------- a tiny Distiller

BERT_SPECIAL = {"pad_token": 0, "unk_token": 1, "cls_token": 2, "sep_token": 3, "mask_token": 4}


def tiny_models(config_name, vocab=300, seq_len=24, dropout=0.1):
    """(teacher, student) with random weights: BERT -> 1-layer DistilBERT (bert_*), Llama -> 1-layer Llama with
    tied embeddings (llama_*), or GPT-2 -> 1-layer GPT-2."""
    from transformers import (BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM, GPT2Config,
                              GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM)

    if config_name.startswith("bert"):
        teacher = BertForMaskedLM(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64,
                                             max_position_embeddings=seq_len))
        student = DistilBertForMaskedLM(DistilBertConfig(vocab_size=vocab, dim=32, n_layers=1, n_heads=2,
                                                         hidden_dim=64, max_position_embeddings=seq_len,
                                                         dropout=dropout, attention_dropout=dropout))
        return teacher, student
    if config_name.startswith("llama"):
        common = dict(vocab_size=vocab, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                      intermediate_size=64, max_position_embeddings=seq_len, bos_token_id=vocab - 1,
                      eos_token_id=vocab - 1, tie_word_embeddings=True)
        return (LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, **common)),
                LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, **common)))
    common = dict(vocab_size=vocab, n_embd=32, n_head=2, n_inner=64, n_positions=seq_len, bos_token_id=vocab - 1,
                  eos_token_id=vocab - 1, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, **common)), GPT2LMHeadModel(GPT2Config(n_layer=1, **common))


def tiny_sequences(n_batches, batch_size, seq_len, vocab, special, mlm, seed=0):
    """Batches of framed token-id sequences (start id, body, end id), lengths varying from batch to batch."""
    rng = np.random.default_rng(seed)
    start = special["cls_token"] if mlm else special["bos_token"]
    end = special["sep_token"] if mlm else special["eos_token"]
    first_id = max(special.values()) + 1 if mlm else 0
    out = []
    for _ in range(n_batches):
        center = int(rng.integers(14, seq_len + 1))
        batch = []
        for _ in range(batch_size):
            length = max(12, center - int(rng.integers(0, 3)))
            body = rng.integers(first_id, vocab - 1, size=length - 2)
            batch.append(np.concatenate([[start], body, [end]]).astype(np.int64))
        out.append(batch)
    return out


def tiny_distiller(config_name, dump_path, extra=None, device="cpu", bf16=False, n_batches=6, sequences=None,
                   dropout=0.1):
    """A Distiller on tiny random models (bert_mlm, bert_mlm_restrict, gpt2_clm or llama_clm), its batch preparation,
    and n_batches collated batches of 3, the second one without padding (or `sequences`: batches of token
    id arrays, every id below 299). extra: DistillationConfig fields to override, and `mlm_mask_prop`."""
    import torch

    from distiller import DistillationConfig, Distiller
    from lm_seqs_dataset import LmSeqsDataset
    from distil.masking import MlmMasking, smoothed_token_probs
    from utils import RunContext

    extra = dict(extra or {})
    mask_prop = extra.pop("mlm_mask_prop", 0.15)
    device = torch.device(device)
    vocab, seq_len, mlm = 300, 24, config_name.startswith("bert")
    torch.manual_seed(0)
    teacher, student = tiny_models(config_name, vocab, seq_len, dropout)
    teacher.to(device).eval().requires_grad_(False)
    student.to(device)
    special = dict(BERT_SPECIAL) if mlm else {"bos_token": vocab - 1, "eos_token": vocab - 1, "unk_token": vocab - 1}
    if sequences is None:
        sequences = tiny_sequences(n_batches, 3, seq_len, vocab, special, mlm)
        sequences[1] = [s[:12] for s in sequences[1]]  # one batch without padding: every sequence 12 tokens
    config = DistillationConfig(
        dump_path=str(dump_path), mlm=mlm, student_type={"bert": "distilbert", "llama": "auto"}.get(
            config_name.split("_")[0], "gpt2"), alpha_ce=5.0,
        alpha_cos=1.0, alpha_mlm=2.0 if mlm else 0.0, alpha_clm=0.0 if mlm else 2.0,
        restrict_ce_to_mask=config_name == "bert_mlm_restrict", batch_size=len(sequences[0]),
        gradient_accumulation_steps=1,
        n_epoch=1, seed=0, bf16=bf16, max_model_input_size=seq_len, log_interval=10_000)
    config = dataclasses.replace(config, **extra)
    flat = [s for batch in sequences for s in batch]
    dataset = LmSeqsDataset(flat, special_tok_ids=special, mlm=mlm, max_len=seq_len)
    masking = None
    if mlm:
        counts = np.bincount(np.concatenate(flat), minlength=vocab)
        masking = MlmMasking(token_probs=smoothed_token_probs(counts, special.values(), 0.7).to(device),
                             mask_prop=mask_prop, split=(0.8, 0.1, 0.1), mask_id=special["mask_token"],
                             vocab_size=vocab, restrict_to_mask=config.restrict_ce_to_mask)
    distiller = Distiller(config, RunContext(device=device), dataset, student, teacher,
                          masking=masking)
    prepare = distiller.prepare_batch_mlm if mlm else distiller.prepare_batch_clm
    batches = [dataset.batch_sequences([(s, len(s)) for s in batch]) for batch in sequences]
    return distiller, prepare, batches


def run_loop(distiller, prepare, batches):
    """The body of Distiller.train's loop, for each batch."""
    distiller.student.train()
    for token_ids, lengths in batches:
        distiller.step(*prepare(token_ids, lengths))
        distiller.iter()
        if distiller._at_boundary:
            distiller.after_optimizer_step()


# --------------------------------------------------------------------------------------- tiny models on disk


def _train_wordpiece(lines, folder):
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizer

    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(lines, vocab_size=200, min_frequency=1,
                           special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    os.makedirs(folder, exist_ok=True)
    wp.save_model(folder)
    tok = BertTokenizer(os.path.join(folder, "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(folder)
    return tok


def _train_bpe(lines, folder, special_tokens, tokenizer_class):
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(lines, vocab_size=300, min_frequency=1, special_tokens=special_tokens)
    os.makedirs(folder, exist_ok=True)
    bpe.save_model(folder)
    tok = tokenizer_class(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"))
    tok.save_pretrained(folder)
    return tok


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Everything the end-to-end tests need, as paths: corpus, tokenizers, teachers, student configs."""
    from transformers import (BertConfig, BertForMaskedLM, DistilBertConfig, GPT2Config, GPT2LMHeadModel,
                              GPT2Tokenizer, RobertaConfig, RobertaForMaskedLM, RobertaTokenizer)
    import torch

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny")
    lines = make_corpus_lines()
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")
    paths = {"root": root, "corpus": corpus, "lines": lines}

    bert_tok = _train_wordpiece(lines, str(root / "bert"))
    BertForMaskedLM(BertConfig(vocab_size=len(bert_tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=37, max_position_embeddings=64)).save_pretrained(root / "bert")
    paths["bert"] = root / "bert"
    DistilBertConfig(vocab_size=len(bert_tok), dim=32, n_layers=1, n_heads=2, hidden_dim=37,
                     max_position_embeddings=64).to_json_file(root / "distilbert.json")
    paths["distilbert_config"] = root / "distilbert.json"

    rob_tok = _train_bpe(lines, str(root / "roberta"), ["<s>", "<pad>", "</s>", "<unk>", "<mask>"], RobertaTokenizer)
    rob_cfg = dict(vocab_size=len(rob_tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=37, max_position_embeddings=66, type_vocab_size=1, pad_token_id=rob_tok.pad_token_id,
                   bos_token_id=rob_tok.bos_token_id, eos_token_id=rob_tok.eos_token_id)
    RobertaForMaskedLM(RobertaConfig(**rob_cfg)).save_pretrained(root / "roberta")
    RobertaConfig(**dict(rob_cfg, num_hidden_layers=1)).to_json_file(root / "roberta_student.json")
    paths["roberta"], paths["roberta_config"] = root / "roberta", root / "roberta_student.json"

    gpt_tok = _train_bpe(lines, str(root / "gpt2"), ["<|endoftext|>"], GPT2Tokenizer)
    eos = gpt_tok.eos_token_id
    gpt_cfg = dict(vocab_size=len(gpt_tok), n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=eos,
                   eos_token_id=eos)
    GPT2LMHeadModel(GPT2Config(**gpt_cfg)).save_pretrained(root / "gpt2")
    GPT2Config(**dict(gpt_cfg, n_layer=1)).to_json_file(root / "gpt2_student.json")
    paths["gpt2"], paths["gpt2_config"] = root / "gpt2", root / "gpt2_student.json"
    return paths


@pytest.fixture(scope="session")
def binarized(tiny):
    """The tiny corpus binarized and counted with each tokenizer: {type: (data_file, counts_file)}. In-process
    (six script runs, once per worker): test_end_to_end and test_data run these scripts' command lines."""
    out = {}
    for kind in ("bert", "roberta", "gpt2"):
        prefix = tiny["root"] / f"data_{kind}"
        run_in_process("scripts/binarized_data.py", "--file_path", tiny["corpus"], "--tokenizer_type", kind,
                       "--tokenizer_name", tiny[kind], "--dump_file", prefix)
        data = f"{prefix}.{kind}.bin"
        counts = tiny["root"] / f"counts_{kind}.pickle"
        run_in_process("scripts/token_counts.py", "--data_file", data, "--token_counts_dump", counts)
        out[kind] = (data, counts)
    return out


def cls_last_tokenizer(vocab_file):
    """A context-first tokenizer with CLS last, XLNet's layout (`A <sep> B <sep> <cls>`, segment 2 for CLS, padding
    on the left), on a WordPiece vocabulary: SQuAD windows then put the context first and CLS at their end."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = [line.rstrip("\n") for line in open(vocab_file, encoding="utf-8")]
    backend = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    special = [("[SEP]", vocab.index("[SEP]")), ("[CLS]", vocab.index("[CLS]"))]
    backend.post_processor = processors.TemplateProcessing(
        single="$A:0 [SEP]:0 [CLS]:2", pair="$A:0 [SEP]:0 $B:1 [SEP]:1 [CLS]:2", special_tokens=special)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                                   cls_token="[CLS]", mask_token="[MASK]", padding_side="left")


@pytest.fixture(scope="session")
def real_folders(tiny):
    """Folders laid out as users get them, for the task scripts: `distilbert`, a DistilBERT masked LM saved with a
    DistilBertTokenizer (transformers' own choice for DistilBERT checkpoints: it returns no token_type_ids), on
    the tiny BERT's vocabulary; `xlnet`, an XLNet LM (max_position_embeddings -1: no limit) with a context-first,
    CLS-last tokenizer."""
    import torch
    from transformers import (DistilBertConfig, DistilBertForMaskedLM, DistilBertTokenizer, XLNetConfig,
                              XLNetLMHeadModel)

    torch.manual_seed(0)
    root = tiny["root"] / "real"
    vocab_file = os.path.join(tiny["bert"], "vocab.txt")
    out = {"root": root, "distilbert": root / "distilbert", "xlnet": root / "xlnet"}
    tok = DistilBertTokenizer(vocab_file, do_lower_case=True)
    tok.save_pretrained(out["distilbert"])
    DistilBertForMaskedLM(DistilBertConfig.from_json_file(tiny["distilbert_config"])).save_pretrained(
        out["distilbert"])
    tok = cls_last_tokenizer(vocab_file)
    tok.save_pretrained(out["xlnet"])
    XLNetLMHeadModel(XLNetConfig(vocab_size=len(tok), d_model=32, n_layer=1, n_head=2, d_inner=37,
                                 pad_token_id=tok.pad_token_id)).save_pretrained(out["xlnet"])
    return out


# --------------------------------------------------------------------------------------- tiny chat models

# Two chat-template families, as their real tokenizers spell them (no network): ChatML (Qwen2, SmolLM2), with a
# default system turn, and Llama 3's headers. GENERATION: ChatML with {% generation %} around each answer, the
# form whose assistant mask transformers computes itself (return_assistant_tokens_mask).
CHATML_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHATML_GENERATION_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ message['content'] }}<|im_end|>{% endif %}{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
CHAT_WORDS = ("system user assistant You are a helpful . ? what is the capital of France Paris it nice "
              "and Italy Rome yes no thanks hello tell me more context question answer").split()


def make_chat_model(folder, style="qwen2", template=None, layers=2, seed=0):
    """A tiny random causal LM with a word-level tokenizer and a chat template, saved to folder (returned).
    style: 'qwen2' (Qwen2ForCausalLM, ChatML, EOS <|im_end|>) or 'llama' (LlamaForCausalLM, Llama 3 headers,
    EOS <|eot_id|>); template overrides the style's."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    if style == "qwen2":
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        kwargs = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>")
        template = template or CHATML_TEMPLATE
    else:
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                    "<|eot_id|>", "<unk>"]
        kwargs = dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", unk_token="<unk>")
        template = template or LLAMA3_TEMPLATE
    if style == "qwen2":  # what a Qwen2 checkpoint saves: a byte-level BPE, loaded as Qwen2Tokenizer
        from transformers import Qwen2Tokenizer

        lines = [" ".join(CHAT_WORDS[i:] + CHAT_WORDS[:i]) + "\n" for i in range(len(CHAT_WORDS))]
        tokenizer = _train_bpe(lines, str(folder), specials, Qwen2Tokenizer)
        tokenizer.add_special_tokens(dict(kwargs, additional_special_tokens=specials[1:]))
    else:  # what a Llama 3 checkpoint saves: a tokenizer.json loaded as PreTrainedTokenizerFast
        vocab = {token: i for i, token in enumerate(specials + CHAT_WORDS)}
        backend = Tokenizer(models.WordLevel(vocab, unk_token=kwargs["unk_token"]))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
        tokenizer.add_special_tokens({"additional_special_tokens": [t for t in specials if t not in kwargs.values()]})
    tokenizer.chat_template = template
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                  eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                  pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(Qwen2Config(**common)) if style == "qwen2" else LlamaForCausalLM(LlamaConfig(**common))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
