"""Shared helpers: logging, seeding, process-group setup, run metadata.

`init_distributed(args)` is the one place that decides how many processes there are, which device each
one drives and which one is the master. A single `python train.py` is simply a world of size 1.
"""
import json
import logging
import os
import random
import socket
import sys

import numpy as np
import torch

logging.basicConfig(
    format="%(asctime)s - %(levelname)s - %(name)s - PID: %(process)d - %(message)s",
    datefmt="%m/%d/%Y %H:%M:%S",
    level=logging.INFO,
)
logger = logging.getLogger("distil")


class UserError(Exception):
    """A problem with the user's input (a flag, a file): reported as one line, exit status 2."""


def fail(message):
    """Print a one-line error and exit non-zero. For scripts' entry points only."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _env_int(name, default):
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def init_distributed(args):
    """Fill in args.world_size, global_rank, local_rank, is_master, multi_gpu, device; init the group.

    Works with `torchrun` (RANK, LOCAL_RANK, WORLD_SIZE in the environment) and with the README's
    `python -m torch.distributed.launch` recipe (the same variables, plus N_GPU_NODE / N_NODES /
    NODE_RANK, which we only use for logging). NCCL drives GPUs; gloo lets a CPU-only machine run
    several processes, which is how the tests exercise the distributed code.
    """
    args.world_size = _env_int("WORLD_SIZE", 1)
    args.global_rank = _env_int("RANK", 0)
    args.local_rank = _env_int("LOCAL_RANK", args.local_rank if args.local_rank >= 0 else 0)
    args.n_nodes = _env_int("N_NODES", _env_int("NNODES", 1))
    args.node_id = _env_int("NODE_RANK", _env_int("GROUP_RANK", 0))
    args.multi_gpu = args.world_size > 1  # historical name: "more than one process"
    args.is_master = args.global_rank == 0

    use_cuda = args.n_gpu > 0 and torch.cuda.is_available()
    if args.n_gpu > 0 and not torch.cuda.is_available():
        logger.warning("--n_gpu %d asked for GPUs but CUDA is not available: training on the CPU.", args.n_gpu)
        args.n_gpu = 0
    if args.multi_gpu and use_cuda and args.n_gpu != args.world_size:
        logger.info("--n_gpu %d differs from WORLD_SIZE %d: WORLD_SIZE wins.", args.n_gpu, args.world_size)
    if use_cuda:
        torch.cuda.set_device(args.local_rank)
        args.device = torch.device("cuda", args.local_rank)
    else:
        args.device = torch.device("cpu")

    if args.multi_gpu and not torch.distributed.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        kwargs = {"device_id": args.device} if use_cuda else {}
        torch.distributed.init_process_group(backend=backend, init_method="env://", **kwargs)
    prefix = f"--- Global rank: {args.global_rank} - "
    logger.info(prefix + f"world size {args.world_size}, node {args.node_id}/{args.n_nodes}, "
                f"local rank {args.local_rank}, device {args.device}, host {socket.gethostname()}")
    if not args.is_master:
        logging.getLogger("distil").setLevel(logging.WARNING)


def cleanup_distributed():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def git_info(path=None):
    """Commit and branch of the code that ran, or a note saying why they are unknown."""
    try:
        import git

        repo = git.Repo(path or os.path.dirname(os.path.abspath(__file__)), search_parent_directories=True)
        return {"repo_id": str(repo), "repo_sha": str(repo.head.object.hexsha),
                "repo_branch": str(repo.active_branch) if not repo.head.is_detached else "detached",
                "dirty": repo.is_dirty()}
    except Exception as exc:  # not a checkout, git missing: metadata only, never fatal
        return {"unavailable": f"{type(exc).__name__}: {exc}"}


def write_json_atomic(path, payload):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    os.replace(tmp, path)


SPECIAL_TOKEN_NAMES = ("cls_token", "sep_token", "bos_token", "eos_token", "pad_token", "unk_token", "mask_token")


def special_token_ids(tokenizer):
    """{'cls_token': 101, ...} for the special tokens this tokenizer defines, under the original's names."""
    ids = {name: getattr(tokenizer, name + "_id", None) for name in SPECIAL_TOKEN_NAMES}
    return {name: int(i) for name, i in ids.items() if i is not None}


# ------------------------------------------------------------------------------- resumable checkpoints

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
    if not isinstance(state, dict) or state.get("format") != "distil-checkpoint-v1":
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
