"""Resumable training state on disk: what a checkpoint holds, how it is written and found again.

`dump_path/checkpoints/step_<iteration>.pt` holds everything needed to continue a run exactly (weights,
optimizer, schedule, scaler, counters, the RNG of every rank). It is written to a temporary file, fsynced
and renamed, so a crash never leaves half a checkpoint under the real name; only the newest
--save_total_limit are kept; loading uses weights_only=True, so a tampered file cannot run code.
"""
import os
import random

import numpy as np
import torch

from utils import logger

FORMAT = "distil-checkpoint-v1"
# The loop's counters a checkpoint restores, and the settings that must not change across a resume (the
# batches already consumed are skipped by position, which only means the same thing with these equal).
RESUMABLE_COUNTERS = ("epoch", "n_iter", "n_total_iter", "n_optimizer_steps", "n_skipped_steps",
                      "n_consecutive_bad_steps", "n_sequences_epoch", "total_loss_epoch", "n_finite_iter_epoch")
MUST_MATCH_ON_RESUME = ("world_size", "batch_size", "gradient_accumulation_steps", "seed", "group_by_size", "mlm",
                        "student_type", "n_epoch")

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step_"


def rng_state():
    """Every random generator the loop draws from, as plain tensors and numbers (loadable with weights_only)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def checkpoint_path(dump_path, step):
    return os.path.join(dump_path, CHECKPOINT_DIR, f"{CHECKPOINT_PREFIX}{step:09d}.pt")


def list_checkpoints(dump_path):
    """Resumable checkpoints in dump_path, oldest first (temporary files of an interrupted write excluded)."""
    folder = os.path.join(dump_path, CHECKPOINT_DIR)
    if not os.path.isdir(folder):
        return []
    names = sorted(n for n in os.listdir(folder) if n.startswith(CHECKPOINT_PREFIX) and n.endswith(".pt"))
    return [os.path.join(folder, n) for n in names]


def save_atomic(obj, path):
    """torch.save to a temporary file, fsync, then rename: a crash never leaves a half-written `path`."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    dir_fd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint_file(path):
    """Load a resumable checkpoint, or raise ValueError naming the file if it is truncated or corrupted."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip reader errors, unpickling errors, EOF: all mean the file is unusable
        raise ValueError(f"{path}: truncated or corrupted checkpoint ({str(exc).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path}: not a checkpoint written by this train.py")
    return state


def find_resumable_checkpoint(dump_path):
    """The newest checkpoint that loads, skipping (and naming) corrupted ones; None if there is none."""
    for path in reversed(list_checkpoints(dump_path)):
        try:
            return path, load_checkpoint_file(path)
        except ValueError as exc:
            logger.warning("Skipping %s", exc)
    return None, None


def rotate_checkpoints(dump_path, keep):
    for path in list_checkpoints(dump_path)[:-keep] if keep > 0 else []:
        os.remove(path)


def check_same_run(state, run, path):
    """Raise ValueError naming the first MUST_MATCH_ON_RESUME setting that differs between `run` and the
    checkpoint `state` loaded from `path`."""
    for name in MUST_MATCH_ON_RESUME:
        saved, now = state["run"].get(name), run[name]
        if saved != now:
            raise ValueError(f"{path}: written with {name}={saved!r}, this run has {name}={now!r}; resuming "
                             "exactly needs the same value")
