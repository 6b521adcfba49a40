"""A model name that is not a local folder goes to the Hugging Face hub. Without network, transformers used to
retry for minutes and end with a message hiding the cause; now one line says so at once: under HF_HUB_OFFLINE
when the hub cache lacks the name, else when a short connection to the hub fails. No test touches the network:
the hub is a closed port on this machine (HF_ENDPOINT) or HF_HUB_OFFLINE is set."""
import socket
import time

import pytest

import utils
from conftest import expect_error, load_script, run_script
from utils import UserError, check_hub_name


@pytest.fixture
def closed_hub(monkeypatch):
    """HF_ENDPOINT on a local port nothing listens on: the connection check fails at once, offline or not."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    utils.hub_unreachable.cache_clear()
    yield port
    utils.hub_unreachable.cache_clear()


def test_offline_name_is_one_line_at_once(tiny, tmp_path):
    """The issue's command, under HF_HUB_OFFLINE=1 in a fresh process: one error line, no retries."""
    start = time.time()
    proc = run_script("scripts/binarized_data.py", "--file_path", tiny["corpus"], "--tokenizer_type", "gpt2",
                      "--tokenizer_name", "distil-tests/no-such-tokenizer", "--dump_file", tmp_path / "data",
                      expect_ok=False, env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "--tokenizer_name distil-tests/no-such-tokenizer: no such local folder" in errors[0]
    assert "HF_HUB_OFFLINE" in errors[0] and "retry" not in proc.stderr.lower()
    assert time.time() - start < 100  # a hang guard (imports on a busy machine), not a speed check
    assert not list(tmp_path.glob("data*"))


def test_unreachable_hub_is_said_by_every_loader(closed_hub, tiny, tmp_path, capsys):
    # binarized_data.py (distil/preprocessing.py)
    expect_error(capsys, load_script("binarized_data").main,
                 ["--file_path", tiny["corpus"], "--tokenizer_type", "gpt2", "--tokenizer_name", "gpt2",
                  "--dump_file", tmp_path / "data"],
                 "--tokenizer_name gpt2: no such local folder", "hub cannot be reached", f"127.0.0.1:{closed_hub}")
    # train.py (distil/models.py): the teacher's name
    import train

    expect_error(capsys, lambda argv: _main_or_fail(train, argv),
                 ["--student_type", "gpt2", "--student_config", tiny["gpt2_config"], "--teacher_type", "gpt2",
                  "--teacher_name", "openai-community/gpt2", "--alpha_ce", "1", "--alpha_clm", "1", "--data_file",
                  tmp_path / "unused.bin", "--dump_path", tmp_path / "run", "--n_gpu", "0"],
                 "openai-community/gpt2: no such local folder", "hub cannot be reached")
    assert not (tmp_path / "run").exists()
    # the task scripts (tasks/models.py)
    import run_glue_w_distillation as glue

    expect_error(capsys, glue.main, ["--task_name", "sst2", "--model_name_or_path", "distilbert-base-uncased",
                                     "--output_dir", tmp_path / "glue", "--do_eval"],
                 "--model_name_or_path distilbert-base-uncased: no such local folder", "hub cannot be reached")


def _main_or_fail(module, argv):
    try:
        module.main(argv)
    except UserError as exc:
        utils.fail(str(exc))


def test_what_is_not_a_hub_name_or_can_be_had_is_left_alone(closed_hub, tiny, tmp_path, monkeypatch):
    check_hub_name("--teacher_name", str(tiny["gpt2"]))  # a local folder
    check_hub_name("--student_config", "configs/missing.json")  # a file name: its own error comes later
    check_hub_name("--teacher_name", "/absolute/missing/folder")
    # In the hub cache: offline, that is enough; with the hub down, the line says how to use the cache.
    (tmp_path / "cache" / "models--org--cached").mkdir(parents=True)
    with pytest.raises(UserError, match="set HF_HUB_OFFLINE=1 to load it from the hub cache"):
        check_hub_name("--model_name_or_path", "org/cached", cache_dir=str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    check_hub_name("--model_name_or_path", "org/cached", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set: it is not in the hub cache"):
        check_hub_name("--model_name_or_path", "org/not-cached", cache_dir=str(tmp_path / "cache"))
    # A hub that answers: the name goes on to transformers.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        utils.hub_unreachable.cache_clear()
        check_hub_name("--model_name_or_path", "org/anything")
