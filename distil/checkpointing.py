"""Resumable training state on disk: what a checkpoint holds, how it is written and found again.

`dump_path/checkpoints/step_<iteration>.pt` holds everything needed to continue a run exactly (weights,
optimizer, schedule, scaler, counters, the RNG of every rank). It is written to a temporary file, fsynced
and renamed, so a crash never leaves half a checkpoint under the real name; only the newest
--save_total_limit are kept; loading uses weights_only=True, so a tampered file cannot run code.

A run sharded with --fsdp (distil/distributed/sharding.py) writes a folder `step_<iteration>/` instead: the student and
optimizer shards through torch.distributed.checkpoint (one file per rank plus `.metadata`, no rank ever
holding the whole model) and `trainer_state.pt` (the rest, as above, written by the master). The folder is
written under a temporary name and renamed once every rank has finished. DCP can load those shards on another
number of ranks (see Distiller.load_training_state for when the loop allows it).
"""
import os
import random
import shutil

import numpy as np
import torch

from utils import logger

FORMAT = "distil-checkpoint-v1"
SHARDED_FORMAT = "distil-checkpoint-sharded-v1"  # a folder: DCP shards + TRAINER_STATE
TRAINER_STATE = "trainer_state.pt"
# The loop's counters a checkpoint restores, and the settings that must not change across a resume (the
# batches already consumed are skipped by position, which only means the same thing with these equal).
RESUMABLE_COUNTERS = ("epoch", "n_iter", "n_total_iter", "n_optimizer_steps", "n_skipped_steps",
                      "n_consecutive_bad_steps", "n_sequences_epoch", "total_loss_epoch", "n_finite_iter_epoch")
MUST_MATCH_ON_RESUME = ("world_size", "batch_size", "gradient_accumulation_steps", "seed", "group_by_size", "mlm",
                        "student_type", "n_epoch", "max_steps", "lmbda")
# What a checkpoint written before a setting existed ran with (the on-policy share, distil/rollouts.py: none).
DEFAULT_WHEN_UNSAVED = {"lmbda": 0.0}

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


def checkpoint_path(dump_path, step, sharded=False):
    """Where the checkpoint of this iteration goes: a file, or a folder for a sharded (--fsdp) run."""
    name = f"{CHECKPOINT_PREFIX}{step:09d}"
    return os.path.join(dump_path, CHECKPOINT_DIR, name if sharded else f"{name}.pt")


def is_sharded(path):
    """Whether `path` is a sharded (--fsdp) checkpoint folder rather than a one-file checkpoint."""
    return os.path.isdir(path)


def list_checkpoints(dump_path):
    """Resumable checkpoints in dump_path (files and sharded folders), oldest first; temporary files and
    folders of an interrupted write are excluded."""
    folder = os.path.join(dump_path, CHECKPOINT_DIR)
    if not os.path.isdir(folder):
        return []
    names = []
    for name in os.listdir(folder):
        if not name.startswith(CHECKPOINT_PREFIX):
            continue
        stem = name[:-3] if name.endswith(".pt") else name
        if stem[len(CHECKPOINT_PREFIX):].isdigit() and (name.endswith(".pt") or os.path.isdir(os.path.join(folder, name))):
            names.append((stem, name))
    return [os.path.join(folder, name) for _, name in sorted(names)]


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
    """Load a resumable checkpoint, or raise ValueError naming the file if it is truncated or corrupted.

    For a sharded folder only its trainer state is read here (the shards are read by load_sharded, once the
    sharded model exists)."""
    sharded = is_sharded(path)
    file = os.path.join(path, TRAINER_STATE) if sharded else path
    if sharded and not os.path.isfile(os.path.join(path, ".metadata")):
        raise ValueError(f"{path}: truncated or corrupted checkpoint (no .metadata of its shards)")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip reader errors, unpickling errors, EOF: all mean the file is unusable
        raise ValueError(f"{path}: truncated or corrupted checkpoint ({str(exc).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or state.get("format") != (SHARDED_FORMAT if sharded else FORMAT):
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
    """Delete all but the newest `keep` checkpoints, and the folders a crashed sharded save left behind.
    Master only, between saves."""
    for path in list_checkpoints(dump_path)[:-keep] if keep > 0 else []:
        if is_sharded(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    folder = os.path.join(dump_path, CHECKPOINT_DIR)
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        if name.startswith(CHECKPOINT_PREFIX) and name.endswith((".tmp", ".old")):
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


# ------------------------------------------------------------------------------- sharded (--fsdp) checkpoints


def _fsync_dir(path):
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_sharded(path, model, optimizer, trainer_state, is_master):
    """Write a sharded checkpoint folder: model and optimizer shards (torch.distributed.checkpoint, every rank
    writes its own file) and trainer_state (a dict of plain tensors and numbers, written by the master).

    Collective. The folder is built as `path.tmp` and renamed to `path` by the master once every rank's shards
    and the metadata are on disk (fsynced), so a crash leaves either the complete folder or no folder under
    that name. A leftover `.tmp` folder of a crashed write is removed first.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    tmp = f"{path}.tmp"
    if is_master:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    torch.distributed.barrier()
    # Returns on every rank only after the master has written .metadata, i.e. after every rank's shard.
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)
    if is_master:
        save_atomic(dict(trainer_state, format=SHARDED_FORMAT), os.path.join(tmp, TRAINER_STATE))
        _fsync_dir(tmp)
        if os.path.exists(path):  # the same iteration saved twice (a periodic and an end-of-epoch save)
            old = f"{path}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
        _fsync_dir(os.path.dirname(path))
    torch.distributed.barrier()


def load_sharded(path, model, optimizer):
    """Load the model and optimizer shards of a sharded checkpoint into a model sharded the same way (on this
    number of ranks or another: DCP reshards). Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    try:
        dcp.load(state, checkpoint_id=path)
    except Exception as exc:  # DCP wraps every rank's failure; the first line of the first names the problem
        detail = next((line for line in str(exc).splitlines() if "Error" in line), str(exc).splitlines()[0])
        raise ValueError(f"{path}: cannot load its shards into this model ({detail.strip()[:300]})") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def check_same_run(state, run, path):
    """Raise ValueError naming the first MUST_MATCH_ON_RESUME setting that differs between `run` and the
    checkpoint `state` loaded from `path`."""
    for name in MUST_MATCH_ON_RESUME:
        saved, now = state["run"].get(name, DEFAULT_WHEN_UNSAVED.get(name)), run[name]
        if saved != now:
            raise ValueError(f"{path}: written with {name}={saved!r}, this run has {name}={now!r}; resuming "
                             "exactly needs the same value")
