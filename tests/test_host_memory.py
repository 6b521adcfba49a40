"""distil/host_memory.py: fixed glibc malloc thresholds give freed host memory back to the OS; train.py and the
task scripts set them before anything loads."""
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO

glibc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")

# A training step's pattern in miniature: a large block freed (which raises glibc's dynamic mmap threshold), then
# blocks of a few MiB interleaved with small tensors that stay alive, then those blocks freed. Prints the MiB of
# resident memory the freed blocks leave behind.
_RETAINED = textwrap.dedent("""
    import sys
    import psutil, torch
    sys.path.insert(0, {repo!r})
    from distil.host_memory import fix_malloc_thresholds
    if sys.argv[1] == "fixed":
        if not fix_malloc_thresholds(environ={{}}):
            raise SystemExit("not set")
    rss = lambda: psutil.Process().memory_info().rss / 2 ** 20
    big = torch.ones(16 << 20, dtype=torch.uint8)
    del big
    before = rss()
    blocks, keep = [], []
    for _ in range(24):
        blocks.append(torch.ones(4 << 20, dtype=torch.uint8))
        keep.append(torch.ones(16 << 10, dtype=torch.uint8))
    del blocks
    print(rss() - before)
""")


def retained_mib(mode):
    script = _RETAINED.format(repo=str(REPO))
    out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return float(out.stdout.strip().splitlines()[-1])


@glibc
def test_fixed_thresholds_return_freed_tensors_to_the_os():
    # 24 blocks of 4 MiB = 96 MiB freed: kept in the heap with glibc's defaults, unmapped with fixed thresholds
    default, fixed = retained_mib("default"), retained_mib("fixed")
    assert default > 64, f"the defaults kept only {default:.0f} MiB: the test no longer shows the heap's retention"
    assert fixed < 16, f"fixed thresholds still kept {fixed:.0f} MiB of freed blocks"


def test_a_users_own_malloc_settings_are_kept():
    from distil.host_memory import fix_malloc_thresholds

    assert fix_malloc_thresholds(environ={"MALLOC_MMAP_THRESHOLD_": "65536"}) is False
    assert fix_malloc_thresholds(environ={"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}) is False
    assert fix_malloc_thresholds(environ={}, libc_name="libnot-a-libc.so.0") is False


@pytest.mark.parametrize("script", ["train", "tasks.training"])
def test_the_training_entry_points_fix_the_thresholds_first(monkeypatch, tmp_path, script):
    import importlib

    module = importlib.import_module(script)

    class Called(Exception):
        pass

    def record(*args, **kwargs):
        raise Called

    monkeypatch.setattr(module, "fix_malloc_thresholds", record)
    with pytest.raises(Called):
        if script == "train":
            module.main(["--dump_path", str(tmp_path / "run"), "--data_file", str(tmp_path / "none.bin"),
                         "--student_type", "gpt2", "--student_config", str(tmp_path / "none.json"),
                         "--teacher_type", "gpt2", "--teacher_name", str(tmp_path / "none")])
        else:
            module.task_main(lambda args: None, None)


def test_saved_for_backward_counts_activations_once_and_no_weights():
    import torch

    from distil.measuring import SavedForBackward

    layer = torch.nn.Linear(32, 64)
    x = torch.randn(8, 32, requires_grad=True)
    with SavedForBackward(layer.parameters()) as saved:
        h = torch.relu(layer(x))  # linear keeps x (and its weight, left out); relu keeps its output
        y = (h * h).sum()  # mul keeps h twice: one storage
    assert saved.bytes == 8 * 32 * 4 + 8 * 64 * 4
    y.backward()
    with SavedForBackward() as none:
        with torch.no_grad():
            layer(x)
    assert none.bytes == 0
